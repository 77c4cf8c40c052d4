"""dvc.yaml tells the truth: what each stage runs, imports, reads and writes is declared there.

DVC reruns a stage only when something it declares changes. Everything a stage's code depends on
that dvc.yaml does not name would make the cache lie: an edited module, a file passed on the
command line, a setting. These checks derive those from the code and the commands themselves.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.settings.base import PROJECT_ROOT
from pipeline.settings.params_file import Params, load_params
from pipeline.settings.stage_view import stage_files, stage_params

# Command-line values that are neither inputs nor outputs: scratch folders a stage empties
# itself, pretrain's resumable checkpoints (see dvc.yaml), the logs of volatile facts (timings)
# that nothing may hash, and model ids (expert/addition), which look like paths.
NOT_FILES = {"--work", "--checkpoints", "--timing", "--name"}


@pytest.fixture(scope="module")
def stages() -> Iterator[list[Any]]:
    """Every stage of the default experiment and one of each optional run (dpo, adapters, qat, quantize,
    gguf: none by default), as the post-sft profile makes them, read in a mirror of the project whose
    paths resolve to the project's own files."""
    from dvc.repo import Repo

    from stages.check import profile_project

    with profile_project("post-sft", PROJECT_ROOT) as mirror, Repo(str(mirror)) as repo:
        yield list(repo.index.stages)


def files(stage: Any) -> list[Path]:
    """The stage's file dependencies, as paths in the project."""
    return [path.resolve() for path in stage_files(stage)]


def module_file(name: str) -> Path | None:
    """The project's file for module `name` (e.g. pipeline.sft), or None outside the project."""
    path = PROJECT_ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file() and candidate.relative_to(PROJECT_ROOT).parts[0] in ("stages", "pipeline"):
            return candidate
    return None


def project_imports(module: str) -> set[Path]:
    """The project files that running `python -m module` executes: its own, and every module of
    stages/ or pipeline/ it imports, at the top or inside functions, directly or not. A string
    naming one (axolotl loads `pipeline.axolotl_dvclive.DVCLivePlugin` by name) counts too.
    Package __init__ files holding only a docstring are left out: they cannot change a result."""
    found: set[Path] = set()
    pending = [module]
    while pending:
        path = module_file(pending.pop())
        if path is None or path in found:
            continue
        found.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                pending.append(node.module)
                pending += [f"{node.module}.{alias.name}" for alias in node.names]  # from pipeline import sft
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                named = re.fullmatch(r"((?:stages|pipeline)(?:\.settings)?\.\w+)(\.\w+)*", node.value)
                pending += [named.group(1)] if named else []
    return {path for path in found if path.name != "__init__.py" or not docstring_only(path)}


def docstring_only(path: Path) -> bool:
    return all(isinstance(node, ast.Expr) for node in ast.parse(path.read_text()).body)


def command_module(stage: Any) -> str:
    (module,) = re.findall(r"python -m (\S+)", stage.cmd)
    return module


def stage_code(stage: Any) -> set[Path]:
    """The project files a stage executes: its module's imports, and the schema of every params
    section it declares (pipeline/settings/stage_view.py imports pipeline/settings/<section>.py by
    name), with theirs."""
    sections = {key.split(".")[0] for key in stage_params(stage)}
    modules = [command_module(stage), *(f"pipeline.settings.{section}" for section in sections)]
    return set().union(*(project_imports(module) for module in modules))


def test_every_module_a_stage_runs_is_a_dependency(stages):
    problems = []
    for stage in stages:
        declared = {path for path in files(stage) if path.suffix == ".py"}
        needed = stage_code(stage)
        for path in sorted(needed - declared):
            problems.append(f"{stage.addressing}: imports {path.relative_to(PROJECT_ROOT)}, not in its deps")
        for path in sorted(declared - needed):
            problems.append(f"{stage.addressing}: depends on {path.relative_to(PROJECT_ROOT)}, which it never imports")
    assert not problems, "\n".join(problems)


def test_import_derivation_follows_function_level_imports_and_plugin_names():
    """The derivation itself: merge imports mergekit inside a function (not ours), the SFT stages
    reach the axolotl plugin only through its name in the generated config."""
    finetune = {path.name for path in project_imports("stages.finetune")}
    assert {"finetune.py", "sft.py", "axolotl_dvclive.py", "curves.py", "stage.py", "stage_view.py"} <= finetune
    assert "eval.py" not in finetune and "__init__.py" not in finetune


def test_every_path_on_a_command_line_is_a_dependency_or_an_output(stages):
    problems = []
    for stage in stages:
        declared = files(stage) + [Path(out.fs_path).resolve() for out in stage.outs]
        words = stage.cmd.split()
        for flag, value in zip(words, words[1:], strict=False):
            if not flag.startswith("--") or flag in NOT_FILES:
                continue
            for word in [value, *words[words.index(value) + 1 :]]:  # --curves a=x b=y takes several
                if word.startswith("--"):
                    break
                path = PROJECT_ROOT / word.partition("=")[2 if "=" in word else 0]
                if "/" not in word:
                    continue
                # a declared file or folder, one inside such a folder, or a folder holding outputs (--live)
                if not any(path == p or path.is_relative_to(p) or p.is_relative_to(path) for p in declared):
                    problems.append(f"{stage.addressing}: {flag} {word} is neither a dependency nor an output")
    assert not problems, "\n".join(problems)


def leaf_keys(model: Any, prefix: str = "") -> list[str]:
    values = model.model_dump(mode="json") if prefix == "" else model
    keys: list[str] = []
    for name, value in values.items():
        if isinstance(value, dict):  # an empty one ({} hub entries) has no setting to change
            keys += leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_setting_reruns_some_stage(stages):
    """DVC reruns a stage when a params key it declares changes: every leaf of the settings (the
    defaults params.yaml leaves out included) must be under some stage's declared keys, or changing
    it would change nothing. (A stage reading a key it does not declare fails: DeclaredView.)"""
    declared = {key for stage in stages for key in stage_params(stage)}
    every = leaf_keys(Params()) + leaf_keys(load_params())
    orphans = sorted({key for key in every if not any(key == d or key.startswith(d + ".") for d in declared)})
    assert not orphans, f"settings no stage declares: {orphans}"


def test_torch_stages_declare_the_compute_settings(stages):
    """compute.* decides the bytes of every result torch computes (pipeline/stage.py)."""
    for stage in stages:
        module = command_module(stage)
        without_torch = (
            "stages.check",
            "stages.data",
            "stages.mixture",
            "stages.tokenize",
            "stages.select",
            "stages.report",
            "stages.hub",
        )
        computes = module not in without_torch
        assert ("compute" in stage_params(stage)) == computes, stage.addressing
