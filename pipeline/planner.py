"""The pre-flight check of the whole experiment (the check stage, `make check`): params.yaml, the
files and folders its settings name, and every stage's declarations in dvc.yaml, before DVC runs
(and deletes the outputs of) any stage.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.settings.base import CORPUS_SPLITS, LOCAL_INPUTS, PROJECT_ROOT, ParamsError, PathSetting, one_of
from pipeline.settings.data import DataSettings
from pipeline.settings.params_file import Params, input_paths, load_params, path_settings
from pipeline.settings.stage_view import stage_files, stage_params, undeclared_inputs


def existing_input_files(
    params: Params, root: Path = PROJECT_ROOT, outputs: Collection[Path] | None = None
) -> dict[str, Path]:
    """Dotted key -> file, for the settings that name a file there before the run: the user's own
    (data/local, an absolute path), not one inside a stage's output, which the run rewrites. What
    content checks can read up front. `outputs`: every stage's outputs (default: from dvc.yaml)."""
    if outputs is None:
        outputs = [Path(out.fs_path) for stage in load_stages(root) for out in stage.outs]
    return {
        key: path
        for key, path in input_paths(params, root).items()
        if path.is_file() and not any(path.is_relative_to(out) for out in outputs)
    }


class PlannedOutput(NamedTuple):
    """An output of a stage, and the names of the files it will hold when they are known in advance."""

    stage: str
    files: tuple[str, ...] | None  # None: anything may appear inside (a model folder, a hub snapshot)


def data_stage_files(settings: DataSettings) -> dict[str, tuple[str, ...]]:
    """The files the data stage writes into each output folder, keyed by the option naming the folder."""
    skills = tuple(f"{skill}.jsonl" for skill in settings.skills.names)
    return {
        "--corpus": tuple(f"{split}.jsonl" for split in CORPUS_SPLITS),
        "--sft": skills,
        "--eval": (*skills, "stories.jsonl"),
        "--validation": skills,
        "--preference": tuple(f"{split}/{skill}" for split in ("train", "eval") for skill in skills),
    }


def planned_outputs(stages: list[Any], params: Params) -> dict[Path, PlannedOutput]:
    """Every stage output -> what the run will write there. The data stage's folders are found by
    the options of its command, which is where dvc.yaml hands it their paths."""
    planned = {Path(out.fs_path): PlannedOutput(stage.name, None) for stage in stages for out in stage.outs}
    for stage in stages:
        if stage.name != "data":
            continue
        words = stage.cmd.split()
        for option, files in data_stage_files(params.data).items():
            if option in words[:-1]:
                planned[Path(stage.wdir) / words[words.index(option) + 1]] = PlannedOutput(stage.name, files)
    return planned


def _holding_output(path: Path, planned: dict[Path, PlannedOutput]) -> Path | None:
    return next((out for out in planned if path.is_relative_to(out)), None)  # outputs never overlap


def will_exist(path: Path, planned: dict[Path, PlannedOutput]) -> bool:
    """Whether `path` is there when its readers run: on disk now, or written by a stage."""
    output = _holding_output(path, planned)
    if output is None:
        return path.exists()
    files = planned[output].files
    return files is None or path == output or path.relative_to(output).as_posix() in files


def _listing(folder: Path, files: tuple[str, ...], root: Path) -> str:
    """`data/sft/{addition,sorting}.jsonl` for files of one type, else a comma-separated list."""
    shown = folder.relative_to(root) if folder.is_relative_to(root) else folder
    suffixes = {Path(name).suffix for name in files}
    if len(files) > 1 and len(suffixes) == 1:
        return f"{shown}/{{{','.join(Path(name).stem for name in files)}}}{suffixes.pop()}"
    return ", ".join(f"{shown}/{name}" for name in files)


def _path_problem(setting: PathSetting, planned: dict[Path, PlannedOutput], root: Path) -> str | None:
    """What is wrong with the file or folder a setting names, as the end of a sentence, or None."""
    path = root / setting.path
    output = _holding_output(path, planned)
    if output is not None:
        if will_exist(path, planned):
            return None
        stage, files = planned[output]
        return f"which the {stage} stage does not produce; it makes {_listing(output, files or (), root)}"
    if not path.exists():
        return (
            f"which does not exist, and no stage produces it. Put your own files under {LOCAL_INPUTS}/; models "
            "and datasets from the Hugging Face hub come in through a params.yaml `hub` entry (into data/hub/<name>)"
        )
    if setting.suffixes and path.is_dir():
        return f"a folder: it must be a {one_of(setting.suffixes)} file"
    if not setting.suffixes and not path.is_dir():
        return "a file: it must be a folder (a Hugging Face model folder)"
    return None


def path_problems(params: Params, planned: dict[Path, PlannedOutput], root: Path = PROJECT_ROOT) -> list[str]:
    """Settings naming a file or folder that will not be there, or not of its kind, when its readers
    run: one line each, naming the setting and what would be valid."""
    problems = []
    for key, setting in path_settings(params, root).items():
        problem = _path_problem(setting, planned, root)
        if problem:
            problems.append(f"{key} is {setting.path!r}, {problem}")
    return problems


def lookup(node: Any, key: str) -> Any:
    """The value at dotted `key` (e.g. `finetune.experts`) of validated params."""
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def load_stages(root: Path = PROJECT_ROOT) -> list[Any]:
    """The stages of dvc.yaml, resolved against params.yaml (messages name them by `stage.name`,
    which, unlike `addressing`, does not depend on the current directory)."""
    from dvc.repo import Repo  # imported here: DVC takes a second to import

    with Repo(str(root)) as repo:
        try:
            return list(repo.index.stages)
        except Exception as error:  # DVC's parse errors for dvc.yaml come in several types
            raise ParamsError(f"dvc.yaml cannot be resolved against params.yaml: {error}") from None


# Stages that read the experts' datasets named in the roster (pipeline/roster.py) rather than in
# the settings they declare: each must depend on every such file (the folders they lie in).
READS_ROSTER_DATASETS = ("mixture", "moe", "moe_seed")  # dvc.yaml entries


def check(root: Path = PROJECT_ROOT) -> list[str]:
    """Validate params.yaml, the files and folders its settings name, and every stage's declarations
    in dvc.yaml; return a report."""
    params = load_params(root / "params.yaml")
    stages = load_stages(root)
    planned = planned_outputs(stages, params)
    report, problems = [], path_problems(params, planned, root)
    named = input_paths(params, root)
    datasets = {key: path for key, path in named.items() if key.startswith("finetune.experts.")}
    for stage in stages:
        keys = stage_params(stage)
        problems.extend(undeclared_inputs(stage.name, keys, stage_files(stage), named, root))
        if stage.name.split("@")[0] in READS_ROSTER_DATASETS:
            # it reads the experts' datasets through the roster, as if it declared their settings
            problems.extend(undeclared_inputs(stage.name, list(datasets), stage_files(stage), datasets, root))
        for key in keys:
            try:
                lookup(params, key)
            except (AttributeError, KeyError):
                problems.append(
                    f"dvc.yaml: stage {stage.name!r} declares params key {key!r}, "
                    "which params.yaml's schema does not have"
                )
        report.append(f"  {stage.name}: {', '.join(keys) or '(no params)'}")
    # path_problems reports the files settings name, with their setting
    problems.extend(missing_dependencies(stages, planned, set(named.values()), root))
    if problems:
        raise ParamsError("\n".join(problems))
    return report


def missing_dependencies(
    stages: list[Any], planned: dict[Path, PlannedOutput], named: Collection[Path], root: Path
) -> list[str]:
    """Deps that will not be there when their stage runs: DVC would stop there mid-run; say so up front."""
    problems = []
    for stage in stages:
        for dep in stage.deps:
            if getattr(dep, "params", None) is not None or dep.protocol != "local":
                continue
            path = Path(dep.fs_path)
            # there, written by a stage, or a folder that outputs go into
            if path in named or will_exist(path, planned) or any(out.is_relative_to(path) for out in planned):
                continue
            shown = path.relative_to(root) if path.is_relative_to(root) else path
            problems.append(
                f"dvc.yaml: stage {stage.name!r} depends on {shown}, "
                "which does not exist and no stage produces. A model or dataset from the Hugging Face hub "
                "comes in through a params.yaml `hub` entry (fetched into data/hub/<name>; see "
                "docs/tutorials/your-own-data.md)."
            )
    return problems
