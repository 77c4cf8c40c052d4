"""The committed dvc.lock describes the committed code: no stage runs, a second or two.

dvc.lock is what `dvc repro` recorded last; the files git tracks, params.yaml and dvc.yaml are what
a clone gets. They must agree, or a clone that pulls every output still reruns stages (and a
reader of dvc.lock learns the hashes of code nobody can check out). Each test compares one part
of every stage's entry with the working tree: the hashes of the files git tracks, the settings,
the set of stages, and each stage's command, dependencies and outputs. Outputs, and dependencies
inside or holding one (data/, models/, metrics/), are DVC's business, not git's: not compared here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo
from dvc_data.hashfile.hash import file_md5
from dvc_data.hashfile.hash_info import HashInfo
from dvc_data.hashfile.meta import Meta
from dvc_data.hashfile.tree import Tree
from ruamel.yaml import YAML

from pipeline.dvc_lock import lock_stages
from tools.dvc_outputs import inside

ROOT = Path(__file__).resolve().parents[1]


def fail_on(problems: list[tuple[str, str]], title: str) -> None:
    """Fail listing each (stage, problem) with the way to fix it."""
    if problems:
        pytest.fail(
            f"{title}:\n"
            + "\n".join(
                f"  {stage}: {problem} (run `dvc repro {stage}` and commit dvc.lock)" for stage, problem in problems
            ),
            pytrace=False,
        )


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text())


@pytest.fixture(scope="module")
def lock() -> dict[str, dict[str, Any]]:
    """Stage name (`finetune@addition`) -> its entry in the committed dvc.lock."""
    return lock_stages((ROOT / "dvc.lock").read_text())


@pytest.fixture(scope="module")
def repo_stages() -> list[Any]:
    """Every stage DVC knows: dvc.yaml's, resolved against params.yaml (foreach expanded), and .dvc files'."""
    with Repo(str(ROOT)) as repo:
        return list(repo.index.stages)


@pytest.fixture(scope="module")
def stages(repo_stages) -> dict[str, Any]:
    """dvc.yaml's stages, resolved: name -> DVC's stage."""
    return {stage.addressing: stage for stage in repo_stages if stage.relpath == "dvc.yaml"}


@pytest.fixture(scope="module")
def tracked() -> set[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: which files are the committed code is unknown")
    return {path for path in listed.stdout.split("\0") if path}


def md5_of(path: str, tracked: set[str], outputs: set[str]) -> str | None:
    """DVC's md5 of `path` as the committed code has it; None where git does not describe it.

    A tracked file: the md5 of its bytes (DVC 3's `hash: md5`, no dos2unix). A folder of tracked
    files (data/local, data/hub, metrics/runs): DVC's folder hash (`<md5>.dir`) of its tracked files,
    unless an output or a .dvc file puts files in it that git does not have.
    """
    if path in tracked:
        return file_md5(str(ROOT / path))
    files = sorted(name for name in tracked if inside(name, path) and (ROOT / name).is_file())
    if not files or any(name.endswith(".dvc") for name in files) or any(inside(out, path) for out in outputs):
        return None
    tree = Tree()
    for name in files:
        tree.add(tuple(name[len(path) + 1 :].split("/")), Meta(), HashInfo("md5", file_md5(str(ROOT / name))))
    tree.digest()
    return tree.hash_info.value


def test_recorded_hashes_match_the_files_git_tracks(lock, repo_stages, tracked):
    """Every dependency (and output) dvc.lock records that git tracks has the recorded md5."""
    outputs = {str(out["path"]) for entry in lock.values() for out in entry.get("outs") or []}
    outputs |= {out.def_path for stage in repo_stages for out in stage.outs}
    problems = []
    for name, entry in lock.items():
        for kind in ("deps", "outs"):
            for item in entry.get(kind) or []:
                path, recorded = str(item["path"]), item.get("md5")
                if item.get("hash") != "md5":
                    problems.append((name, f"{path}: dvc.lock records hash {item.get('hash')!r}, not DVC 3's md5"))
                    continue
                if path in tracked and not (ROOT / path).exists():
                    problems.append((name, f"{path} is tracked by git but missing from the working tree"))
                    continue
                actual = md5_of(path, tracked, outputs)
                if actual is not None and actual != recorded:
                    problems.append((name, f"{path} has md5 {actual}, dvc.lock records {recorded}"))
                elif actual is None and not any(inside(path, out) or inside(out, path) for out in outputs):
                    problems.append(
                        (name, f"{path} is not in git (deleted or never added) and no output of a stage or .dvc file")
                    )
    fail_on(problems, "dvc.lock does not describe the files git tracks")


MISSING = object()


def lookup(params: Any, dotted: str) -> Any:
    """The value DVC reads for `a.b.c`; MISSING where the file leaves it out."""
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return MISSING
        node = node[key]
    return node


def differences(expected: dict, recorded: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value, recorded value) where the two differ, down to the innermost keys; MISSING where absent."""
    found = []
    for key in sorted(set(expected) | set(recorded), key=str):
        value, recorded_value = expected.get(key, MISSING), recorded.get(key, MISSING)
        if isinstance(value, dict) and isinstance(recorded_value, dict):
            found += differences(value, recorded_value, f"{prefix}{key}.")
        elif value is MISSING or recorded_value is MISSING or value != recorded_value:
            found.append((f"{prefix}{key}", value, recorded_value))
    return found


def test_recorded_settings_match_params_yaml(lock, stages):
    """Each stage's recorded settings are the values of the keys it declares, as the params files have them.

    DVC records only the declared keys the file has (a declaration of the whole file: its top-level
    keys), so a key the file leaves out must be absent from dvc.lock too.
    """
    problems = []
    files: dict[str, Any] = {}
    for name, stage in stages.items():
        if name not in lock:
            continue  # test_every_stage_has_an_entry_and_every_entry_a_stage says so
        recorded_files = lock[name].get("params") or {}
        declared = {dep.def_path: dep.params for dep in stage.deps if isinstance(dep, ParamsDependency)}
        for file in sorted(set(declared) | set(recorded_files)):
            if file not in files:
                files[file] = load_yaml(ROOT / file) if (ROOT / file).is_file() else {}
            params = files[file] or {}
            keys = declared.get(file)
            if keys is None:
                expected = {}
            elif not keys:
                expected = dict(params)
            else:
                expected = {key: value for key in keys if (value := lookup(params, key)) is not MISSING}
            recorded = recorded_files.get(file) or {}
            for key, value, recorded_value in differences(expected, recorded):
                where = f"{file} `{key}`"
                if recorded_value is MISSING:
                    problems.append((name, f"{where} is {value!r}, dvc.lock does not record it"))
                elif value is not MISSING:
                    problems.append((name, f"{where} is {value!r}, dvc.lock records {recorded_value!r}"))
                elif lookup(params, key) is not MISSING:
                    problems.append(
                        (name, f"{where}: dvc.lock records {recorded_value!r}, a key the stage does not declare")
                    )
                else:
                    problems.append((name, f"{where}: dvc.lock records {recorded_value!r}, {file} leaves it out"))
    fail_on(problems, "dvc.lock's settings are not params.yaml's")


def test_every_stage_has_an_entry_and_every_entry_a_stage(lock, stages):
    """dvc.yaml's stages, resolved against params.yaml, are exactly the stages dvc.lock records."""
    lines = [
        f"  {name}: a stage of dvc.yaml with no entry in dvc.lock (run `dvc repro {name}` and commit dvc.lock)"
        for name in sorted(set(stages) - set(lock))
    ] + [
        f"  {name}: an entry of dvc.lock that is no stage of dvc.yaml: delete the entry (DVC keeps the entries of "
        "stages taken out of dvc.yaml) and commit dvc.lock"
        for name in sorted(set(lock) - set(stages))
    ]
    if lines:
        pytest.fail("dvc.lock's stages are not dvc.yaml's:\n" + "\n".join(lines), pytrace=False)


def test_recorded_commands_and_paths_match_dvc_yaml(lock, stages):
    """Each stage's recorded command, dependencies and outputs are dvc.yaml's (an edit reruns the stage)."""
    problems = []
    for name, stage in stages.items():
        entry = lock.get(name)
        if entry is None:
            continue  # test_every_stage_has_an_entry_and_every_entry_a_stage says so
        if entry.get("cmd") != stage.cmd:
            problems.append(
                (name, f"the command is\n      {stage.cmd}\n    dvc.lock records\n      {entry.get('cmd')}")
            )
        for kind, declared in (
            ("deps", {dep.def_path for dep in stage.deps if not isinstance(dep, ParamsDependency)}),
            ("outs", {out.def_path for out in stage.outs}),
        ):
            recorded = {str(item["path"]) for item in entry.get(kind) or []}
            for path in sorted(declared - recorded):
                problems.append((name, f"{kind} {path} is in dvc.yaml, not in dvc.lock"))
            for path in sorted(recorded - declared):
                problems.append((name, f"{kind} {path} is in dvc.lock, no longer in dvc.yaml"))
    fail_on(problems, "dvc.lock's commands and paths are not dvc.yaml's")
