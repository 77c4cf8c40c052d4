"""What a stage sees of params.yaml: the sections it declares in dvc.yaml, validated, and nothing else.

`load_stage_params(stage)` reads the keys `stage` declares under `params:` in dvc.yaml, validates
just those sections (each with its own module, pipeline/settings/<section>.py, imported by name
here so that a stage's code depends on the schemas it reads and no other), and returns a view
that fails on a read of any key not declared: a stage cannot depend on a setting DVC does not
know about (and would not rerun it for). The rules that span sections are the check stage's
(pipeline/settings/params_file.py), which runs before every stage.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import TypeAdapter, ValidationError

from pipeline.settings.base import (
    LOCAL_INPUTS,
    PROJECT_ROOT,
    ParamsError,
    PathSetting,
    Section,
    format_validation_error,
    read_yaml,
)


def declared(stage: str, root: Path = PROJECT_ROOT) -> tuple[list[str], list[Path]]:
    """(params keys, file and folder dependencies) that `stage` (e.g. 'finetune@addition') declares in dvc.yaml."""
    from dvc.repo import Repo  # imported here: DVC takes a second to import

    with Repo(str(root)) as repo:
        try:
            (resolved,) = repo.stage.collect(stage)
        except Exception as error:
            raise ParamsError(f"dvc.yaml: no stage named {stage!r}: {error}") from None
        return stage_params(resolved), stage_files(resolved)


def stage_params(stage: Any) -> list[str]:
    return [key for dep in stage.deps for key in (getattr(dep, "params", None) or [])]


def stage_files(stage: Any) -> list[Path]:
    return [Path(dep.fs_path) for dep in stage.deps if getattr(dep, "params", None) is None]


def section_schema(section: str) -> Any:
    """The type `section` of params.yaml is validated with: SCHEMA of pipeline/settings/<section>.py."""
    try:
        return importlib.import_module(f"pipeline.settings.{section}").SCHEMA
    except (ModuleNotFoundError, AttributeError):
        raise ParamsError(f"params.yaml has no section {section!r} (pipeline/settings/ has no schema for it)") from None


def load_section(section: str, raw: dict[str, Any], source: str) -> Any:
    """Section `section` of the parsed params file `raw`, validated (defaults where it is left out)."""
    schema = section_schema(section)
    try:
        return TypeAdapter(schema).validate_python(raw.get(section) or {})
    except ValidationError as error:
        raise ParamsError(format_validation_error(error, source, schema, section)) from None


def section_path_settings(sections: dict[str, Any], root: Path) -> dict[str, PathSetting]:
    """The settings of these sections (name -> validated section) that name a file or folder some
    stage reads, by dotted key."""
    return {
        f"{section}.{key}": setting
        for section, value in sections.items()
        if isinstance(value, Section)
        for key, setting in value.paths(root).items()
    }


def section_paths(sections: dict[str, Any], root: Path) -> dict[str, Path]:
    """Dotted key -> absolute path, for the settings of these sections that name a file or folder."""
    return {key: root / setting.path for key, setting in section_path_settings(sections, root).items()}


def undeclared_inputs(stage: str, keys: list[str], files: list[Path], named: dict[str, Path], root: Path) -> list[str]:
    """Files that `stage` reads through its settings (`named`: dotted key -> path) but does not depend
    on: DVC would not rerun it when they change. Each is named with its setting and the ways to fix it."""
    problems = []
    for key, path in named.items():
        if not any(key == k or key.startswith(k + ".") for k in keys):
            continue  # a setting this stage does not read
        if any(path == dep or path.is_relative_to(dep) for dep in files):
            continue
        shown = path.relative_to(root) if path.is_relative_to(root) else path
        problems.append(
            f"{key} is {str(shown)!r}, which stage {stage!r} reads but does not depend on in dvc.yaml, so DVC "
            f"would not rerun it when that changes. Put the file under {LOCAL_INPUTS}/ (a dependency of every "
            "stage that reads files named in params.yaml) or add it to the stage's deps."
        )
    return problems


class DeclaredView:
    """Read-only view of validated params that lets a stage read only its declared keys.

    Reading a key that no declared key covers raises ParamsError; a node whose every key is
    declared is returned as the real pydantic object.
    """

    def __init__(self, value: Any, path: str, declared: frozenset[str], stage: str):
        self._value, self._path, self._declared, self._stage = value, path, declared, stage

    def _child(self, name: str, value: Any) -> Any:
        path = f"{self._path}.{name}" if self._path else name
        if any(path == key or path.startswith(key + ".") for key in self._declared):
            return value
        if any(key.startswith(path + ".") for key in self._declared):
            return DeclaredView(value, path, self._declared, self._stage)
        raise ParamsError(
            f"stage {self._stage!r} reads params key '{path}' but its dvc.yaml entry does not declare it "
            f"(declared: {', '.join(sorted(self._declared))}); add it under `params:` so DVC reruns the "
            "stage when it changes"
        )

    def declares(self, key: str) -> bool:
        """Whether the stage declares `key` (a dotted params.yaml key) itself."""
        return key in self._declared

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._child(name, getattr(self._value, name))

    def __getitem__(self, name: str) -> Any:
        return self._child(name, self._value[name])


def load_stage_params(stage: str, params_path: Path | None = None, root: Path = PROJECT_ROOT) -> Any:
    """Validate the sections of params.yaml that `stage` declares in dvc.yaml, check that every file
    their settings name for it is a dependency, then return a view limited to its declared keys."""
    keys, files = declared(stage, root)
    params_path = params_path or root / "params.yaml"
    raw = read_yaml(params_path) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{params_path}: must be a mapping of sections, got {type(raw).__name__}")
    sections = {section: load_section(section, raw, str(params_path)) for section in {k.split(".")[0] for k in keys}}
    problems = undeclared_inputs(stage, keys, files, section_paths(sections, root), root)
    if problems:
        raise ParamsError("\n".join(problems))
    return DeclaredView(SimpleNamespace(**sections), "", frozenset(keys), stage)
