"""A copy of the project as `git clone` would give it, and ways to drive DVC in it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.settings.base import PROJECT_ROOT, ParamsError
from pipeline.settings.params_file import load_params

BIN = Path(sys.executable).parent
Completed = subprocess.CompletedProcess


# The data, model and eval of the end-to-end tests' pipeline, shrunk so pretraining takes seconds
# (set_params keys: `__` for each level).
TINY_PRETRAINING: dict[str, object] = {
    "data__world__corpus_megabytes": 0.2,
    "data__skills__train_examples": 100,
    "data__skills__eval_examples": 20,
    "data__story_eval_examples": 20,
    "pretrain__model__hidden_size": 32,
    "pretrain__model__num_layers": 2,
    "pretrain__model__num_heads": 2,
    "pretrain__model__num_kv_heads": 2,
    "pretrain__model__intermediate_size": 64,
    "pretrain__model__max_position_embeddings": 64,
    "pretrain__seq_len": 32,
    "pretrain__micro_batch_size": 8,
    "pretrain__batch_tokens": 256,
    "pretrain__max_steps": 20,
    "pretrain__warmup_steps": 2,
    "pretrain__eval_interval": 10,
    "pretrain__checkpoint_interval": 10,
    "pretrain__sample_max_new_tokens": 4,
    "pretrain__peak_flops": 1.0e11,
    "eval__limit": 4,
}


def sh(project: Path, *args: str, check: bool = True, env: dict[str, str] | None = None) -> Completed:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **(env or {})}
    result = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(
    project: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return sh(project, str(BIN / "dvc"), *args, check=check, env=env)


def stages_run(result: Completed) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", result.stdout))


def set_params(project: Path, **updates: object) -> None:
    """Set keys in the project's params.yaml (`a__b=1` sets a.b), keeping its comments."""
    yaml = YAML()
    path = project / "params.yaml"
    params = yaml.load(path.read_text())
    for dotted, value in updates.items():
        *parents, leaf = dotted.split("__")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    with open(path, "w") as handle:
        yaml.dump(params, handle)


def copy_project(root: Path) -> Path:
    """Copy tracked and untracked-but-not-ignored files into `root` (no outputs, no caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = PROJECT_ROOT / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    return root


# ```<language> <attributes>, the code, then ``` alone on a line
CODE_BLOCK = re.compile(r"^```(?P<language>\w*)(?P<attributes>[^\n]*)\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)
EDITS = {"file", "append-to", "insert-after"}  # the attributes of a block that edits the project


def code_blocks(text: str) -> list[tuple[int, str, dict[str, str], str]]:
    """(line, language, attributes, code) of each fenced block of a Markdown text; an attribute
    without `=` (``yaml params``) has the value ""."""
    return [
        (
            text.count("\n", 0, match.start()) + 1,
            match["language"],
            dict((word.split("=", 1) + [""])[:2] for word in shlex.split(match["attributes"])),
            match["code"],
        )
        for match in CODE_BLOCK.finditer(text)
    ]


def apply_edit(root: Path, attributes: dict[str, str], code: str) -> None:
    """Apply a documentation block that edits the project: file= (a new file), append-to=, or
    insert-after=<line> with file=, as docs/design/contributing.md annotates them."""
    if "append-to" in attributes:
        path = root / attributes["append-to"]
        path.write_text(path.read_text().rstrip("\n") + "\n\n" + code)
    elif "insert-after" in attributes:
        path, anchor = root / attributes["file"], attributes["insert-after"]
        lines = path.read_text().splitlines(keepends=True)
        where = [i for i, line in enumerate(lines) if line.rstrip("\n") == anchor]
        assert len(where) == 1, f"{attributes['file']} has the line {anchor!r} {len(where)} times, not once"
        lines.insert(where[0] + 1, code)
        path.write_text("".join(lines))
    else:
        path = root / attributes["file"]
        assert not path.exists(), f"{attributes['file']} exists already"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)


def commit_all(project: Path) -> None:
    sh(project, "git", "init", "-q")
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "tiny")


def params_error(tmp_path: Path, text: str) -> str:
    """The error message of a params.yaml with `text` (which must be invalid)."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    return str(raised.value)
