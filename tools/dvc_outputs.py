"""What `make clean` removes, derived from dvc.yaml: every output the pipeline makes, and its scratch folders.

    python -m tools.dvc_outputs [--dry-run]

The paths, from DVC and dvc.yaml rather than typed out:
- every output (outs, metrics, plots) of dvc.yaml's stages resolved against params.yaml (foreach
  entries included), and every output dvc.lock records (stages since removed included);
- for every output template of a stage, the folder above its first part that is no `paths` var
  (`${paths.dpo}/${key}`: models/dpo): the outputs of foreach entries that params.yaml does not
  have now (the optional runs' dpo, adapters, ..., none by default; a merge recipe taken out);
- every `paths` var no stage declares as a dependency or an output: the folders that stages only
  name on their command lines (--work, --checkpoints, --timing);
- the atomic writes' scratch folder (pipeline/atomic.py).

Files git tracks stay (data/params_checked.txt, data/hub/README.md, metrics/runs/README.md): a
folder holding some loses only what git does not track. Neither the DVC cache nor the virtual
environment is touched, nor any input: a `paths` var only ever read (data/local), or an output of
a .dvc file.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
PATHS_VAR = re.compile(r"\$\{\s*paths\.(\w+)\s*\}")
OUTPUT_KINDS = ("outs", "metrics", "plots")


def declared(entries: list[Any] | None) -> list[str]:
    """The paths of a dvc.yaml list of deps or outputs (an entry is a path or {path: options})."""
    return [str(next(iter(entry))) if isinstance(entry, dict) else str(entry) for entry in entries or []]


def inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def fill(template: str, paths: dict[str, str]) -> str:
    """The template with its `paths` vars filled in (other interpolations left as they are)."""
    return PATHS_VAR.sub(lambda match: str(paths[match.group(1)]).rstrip("/"), template)


def folder_of(filled: str) -> str:
    """A filled template itself, or the folder above its first interpolation (`models/dpo/${key}`: models/dpo)."""
    if "${" not in filled:
        return filled
    folder = filled[: filled.index("${")].rpartition("/")[0]
    if not folder:
        raise SystemExit(f"dvc.yaml: {filled!r} starts with no `paths` var: which folder it is in is unknown")
    return folder


def dvc_yaml_paths(root: Path) -> tuple[set[str], set[str], set[str]]:
    """(output folders of the stage templates, other folders their commands write, input folders), from dvc.yaml."""
    text = YAML(typ="safe").load((root / "dvc.yaml").read_text())
    paths = {name: value for var in text.get("vars") or [] if isinstance(var, dict) for name, value in
             (var.get("paths") or {}).items()}  # fmt: skip
    outputs, written, in_outputs, in_deps = set(), set(), set(), set()
    for stage in (text.get("stages") or {}).values():
        body = stage.get("do", stage)
        for template in (path for kind in OUTPUT_KINDS for path in declared(body.get(kind))):
            outputs.add(folder_of(fill(template, paths)))
            in_outputs |= set(PATHS_VAR.findall(template))
        deps = [fill(template, paths) for template in declared(body.get("deps"))]
        in_deps |= {name for template in declared(body.get("deps")) for name in PATHS_VAR.findall(template)}
        # a path on the command line that is no dependency (nor holds or lies in one) is one the stage
        # writes: its outputs, and what it does not declare (--work, --checkpoints, --live, --timing)
        cmd = body.get("cmd") or ""
        for token in (" ".join(cmd) if isinstance(cmd, list) else cmd).split():
            token = token.rpartition("=")[2]  # `--curves pretrain=<path>`
            if PATHS_VAR.match(token):
                path = fill(token, paths)
                if not any(inside(path, dep) or inside(dep, path) for dep in deps):
                    written.add(folder_of(path))
    written |= {str(paths[name]) for name in paths.keys() - in_outputs - in_deps}  # only on command lines: logs
    inputs = {str(paths[name]) for name in in_deps - in_outputs}
    return outputs, written, inputs


def stage_outputs(root: Path) -> set[str]:
    """Every output of dvc.yaml's stages as DVC resolves them now, and every output dvc.lock records."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = {out.def_path for stage in repo.index.stages if stage.relpath == "dvc.yaml" for out in stage.outs}
    lock = root / "dvc.lock"
    if lock.is_file():
        entries = (YAML(typ="safe").load(lock.read_text()) or {}).get("stages") or {}
        found |= {str(out["path"]) for entry in entries.values() for out in entry.get("outs") or []}
    return found


def git_tracked(root: Path) -> set[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True)
    if listed.returncode != 0:
        raise SystemExit(
            f"git ls-files failed: cannot tell git's files from outputs, so nothing removed\n{listed.stderr}"
        )
    return {path for path in listed.stdout.split("\0") if path}


def clean_paths(root: Path, tracked: set[str]) -> list[str]:
    """The paths to remove, none inside another and none a file git tracks: outputs, their folders, scratch."""
    from pipeline.atomic import SCRATCH

    template_outputs, written, inputs = dvc_yaml_paths(root)
    candidates = stage_outputs(root) | template_outputs | written | {SCRATCH.as_posix()}
    for path in candidates:
        if Path(path).is_absolute() or ".." in Path(path).parts or path in ("", "."):
            raise SystemExit(f"refusing to clean {path!r}: not a folder inside the project")
        for kept in inputs:
            if inside(kept, path):
                raise SystemExit(f"refusing to clean {path!r}: it holds {kept!r}, which stages only read")
    candidates -= tracked
    return sorted(path for path in candidates if not any(inside(path, other) and path != other for other in candidates))


def remove(path: Path, relative: str, tracked: set[str]) -> list[str]:
    """Remove `path` except the files git tracks in it; what was removed."""
    if relative in tracked or not (path.exists() or path.is_symlink()):
        return []
    if path.is_dir() and not path.is_symlink():
        if any(inside(name, relative) for name in tracked):
            return [
                gone for child in sorted(path.iterdir()) for gone in remove(child, f"{relative}/{child.name}", tracked)
            ]
        shutil.rmtree(path)
    else:
        path.unlink()
    return [relative]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the paths (existing or not); remove nothing")
    args = parser.parse_args()
    tracked = git_tracked(ROOT)
    for path in clean_paths(ROOT, tracked):
        kept = sorted(name for name in tracked if inside(name, path))
        if args.dry_run:
            print(path + (f"  (keeps git's {', '.join(kept)})" if kept else ""))
        else:
            for gone in remove(ROOT / path, path, tracked):
                print(f"removed {gone}")


if __name__ == "__main__":
    sys.exit(main())
