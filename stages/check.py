"""`check` stage: validate everything before any stage runs; remove outputs of removed stages.

    python -m stages.check --out data/params_checked.txt --roster data/roster

Every other stage depends on this one's output, so `dvc repro` (whichever command started it)
runs the check first whenever params.yaml, data/local or the check's code changed, and a bad
setting or input file stops the run before DVC deletes any stage's outputs to rerun it (DVC
cannot depend on dvc.yaml itself; a stage whose entry changed validates its own settings).
It checks what `make check` does (pipeline/planner.py: the settings, their declarations, the
files they name) and the content of the user's input files that exist before the run
(`check_input_files`); the files stages of the run make (data/sft, data/eval, data/preference) are
checked by the stages that read them.

It also removes from the workspace the outputs of stages that no longer exist, such as the
model and scores of a merge recipe taken out of params.yaml: they would otherwise stay inside
folders that later stages depend on (models/merged, metrics/eval) and that the report reads.
They stay in DVC's cache, so bringing the recipe back restores them without recomputing.

The stamp says only that the check passed: always the same bytes, so a rerun of the check
never reruns the stages after it. The roster (pipeline/roster.py: the experts' and merges' names,
the experts' datasets) changes only when those do: the stages that need names depend on it
instead of on every expert's settings.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import llama_cpp
from pipeline.atomic import write_text
from pipeline.corpus import check_corpus_file
from pipeline.dvc_lock import lock_stages
from pipeline.kinds import KINDS
from pipeline.planner import check, existing_input_files, load_stages, lookup
from pipeline.preference import read_pairs
from pipeline.roster import roster_of, write_roster
from pipeline.settings.base import PROJECT_ROOT, InputError
from pipeline.settings.params_file import Params, load_params
from pipeline.sft import check_sft_dataset
from pipeline.stage import report_input_errors, setup_logging

log = logging.getLogger("stages.check")

PASSED = "params.yaml, dvc.yaml and the input files they name passed the checks of stages/check.py\n"


def check_input_files(params: Params, root: Path, stages: list[Any]) -> None:
    """Raise InputError naming each existing input file its reader would reject, and where."""
    # the settings naming a data file, by kind (pipeline/kinds.py): preference pairs for dpo, else SFT rows
    data_files = {
        f"{kind.section}.{entry}.{setting}": kind.name
        for kind in KINDS
        if kind.section
        for entry in lookup(params, kind.section)
        for setting in kind.dataset_files
    }
    problems = []
    outputs = [Path(out.fs_path) for stage in stages for out in stage.outs]
    for key, path in existing_input_files(params, root, outputs).items():
        try:
            if data_files.get(key) == "dpo":
                read_pairs(path)
            elif key in data_files:
                check_sft_dataset(path)
            elif key == "data.corpus.path":
                check_corpus_file(path, params.data.corpus.text_field)
        except InputError as error:
            problems.append(f"{key}: {error}")
    if problems:
        raise InputError("\n".join(problems))


def stale_outputs(current: list[Any], root: Path) -> list[Path]:
    """Outputs that dvc.lock records for stages dvc.yaml no longer has, still in the workspace.

    Only paths DVC recorded (hence cached) are candidates, and never one a current stage makes,
    holds or lies in (an old stage's `models/moe` holds today's `models/moe/<variant>`).
    """
    lock_path = root / "dvc.lock"
    recorded = lock_stages(lock_path.read_text()) if lock_path.is_file() else {}
    names = {stage.name for stage in current}
    produced = {Path(out.fs_path) for stage in current for out in stage.outs}
    stale = []
    for name, entry in recorded.items():
        if name in names:
            continue
        for out in entry.get("outs") or []:
            path = root / out["path"]
            overlaps = any(path.is_relative_to(made) or made.is_relative_to(path) for made in produced)
            if not overlaps and (path.exists() or path.is_symlink()):
                stale.append(path)
    return sorted(stale)


def remove_stale_outputs(stages: list[Any], root: Path) -> list[Path]:
    stale = stale_outputs(stages, root)
    for path in stale:
        log.info("removing %s: its stage is no longer in dvc.yaml (DVC's cache keeps it)", path.relative_to(root))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        # and the folders left empty that held it (a removed seed's models/replicas/<seed>/experts/),
        # up to the top-level ones (models/, metrics/)
        folder = path.parent
        while folder.parent != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return stale


# What a profile's check must not share with the project: its settings, DVC's state and git.
NOT_MIRRORED = ("params.yaml", ".dvc", ".git")


@contextmanager
def profile_project(name: str, root: Path) -> Iterator[Path]:
    """A folder that is the project (every top-level entry a link to it) with the settings of
    profile `name` as its params.yaml: DVC resolves dvc.yaml against them there, while every file
    a check looks at is the project's own. params.yaml itself is left alone."""
    from pipeline.profiles import profile_text

    text = profile_text(name, root)  # validates the settings, naming the profile
    with tempfile.TemporaryDirectory(prefix=f"check-{name}-") as folder:
        mirror = Path(folder)
        for entry in root.iterdir():
            if entry.name not in NOT_MIRRORED:
                (mirror / entry.name).symlink_to(entry)
        (mirror / ".dvc").mkdir()
        # outside git; DVC's site cache inside the folder, not one more under /var/tmp per check
        site_cache = mirror / ".dvc" / "site"
        (mirror / ".dvc" / "config").write_text(f"[core]\n    no_scm = true\n    site_cache_dir = {site_cache}\n")
        (mirror / "params.yaml").write_text(text)
        yield mirror


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the stage's stamp; without it (`make check`), only validate")
    parser.add_argument("--roster", type=Path, help="the folder to write the roster into (with --out)")
    parser.add_argument("--profile", help="validate profiles/<name>.yaml over params.yaml instead (params.yaml is "
                        "not written); for `make check PROFILE=<name>`")  # fmt: skip
    args = parser.parse_args()
    setup_logging()
    report_input_errors()
    if args.profile:
        if args.out:
            parser.error("--profile only validates: leave out --out")
        with profile_project(args.profile, PROJECT_ROOT) as project:
            report = check(project)
            check_input_files(load_params(project / "params.yaml"), project, load_stages(project))
        print(f"profile {args.profile!r} (profiles/{args.profile}.yaml over params.yaml) and the input files it "
              "names are valid; stages read:")  # fmt: skip
        print("\n".join(report))
        return
    report = check(PROJECT_ROOT)  # raises InputError naming every bad setting
    stages = load_stages(PROJECT_ROOT)  # for the two steps below (DVC takes about a second)
    params = load_params(PROJECT_ROOT / "params.yaml")
    check_input_files(params, PROJECT_ROOT, stages)
    if params.gguf.runs:  # llama.cpp is built apart (make llama-cpp): say so now, not after the training stages
        llama_cpp.require()
    if args.out is None:
        print("params.yaml and the input files it names are valid; stages read:")
        print("\n".join(report))
        return
    log.info("settings and input files are valid")
    remove_stale_outputs(stages, PROJECT_ROOT)
    if args.roster:
        write_roster(args.roster, roster_of(params))
    write_text(args.out, PASSED)


if __name__ == "__main__":
    main()
