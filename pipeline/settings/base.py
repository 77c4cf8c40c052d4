"""Shared pieces of the settings schema: field types, the base of every section, the error types."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)
from ruamel.yaml import YAML

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SKILLS = ("addition", "sorting", "comparison", "counting")  # stages/data.py generates each (a test checks)
# Where users put their own files that settings name (a local corpus, eval task data, a base
# model's folder): every stage that may read such a file depends on this folder (dvc.yaml).
LOCAL_INPUTS = "data/local"
CORPUS_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SFT_DATASET_SUFFIXES = (".jsonl", ".json", ".parquet")  # pipeline/records.py DATASET_FORMATS (a test checks they agree)
REPLAY_TEXT_SUFFIXES = (".jsonl", ".parquet")  # what pipeline/sft.py read_texts reads
TASK_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # stages/eval.py TASK_DATA_LOADERS (a test checks they agree)
CORPUS_SPLITS = ("train", "val", "test")  # the data stage's corpus files, <split>.jsonl


def one_of(suffixes: tuple[str, ...]) -> str:
    return ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]


def _has_suffix(path: str, suffixes: tuple[str, ...]) -> str:
    suffix = Path(path).suffix
    if not suffix:
        raise ValueError(f"{path!r} must be a {one_of(suffixes)} file, not a folder")
    if suffix not in suffixes:
        raise ValueError(f"{path!r} has suffix {suffix!r}: it must be a {one_of(suffixes)} file")
    return path


def file_setting(suffixes: tuple[str, ...]) -> Any:
    """The type of a setting that names a file of one of these types (its suffix is checked here,
    the file itself by `check()`)."""
    return Annotated[str, AfterValidator(partial(_has_suffix, suffixes=suffixes))]


SFTDatasetFile = file_setting(SFT_DATASET_SUFFIXES)
ReplayTextFile = file_setting(REPLAY_TEXT_SUFFIXES)
TaskDataFile = file_setting(TASK_DATA_SUFFIXES)


def _plain_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError("use lowercase letters, digits and _ in the name (it names files and DVC stages)")
    return name


# The name of an entry that becomes stages and files: an expert, a recipe, a hub snapshot, a run.
Name = Annotated[str, AfterValidator(_plain_name)]


# Upper bounds on sizes and counts catch a slipped magnitude (max_steps: 10**12 started a run with
# an ETA of forever) and leave room for real GPU-scale runs.
MAX_SEQUENCE_TOKENS = 1_048_576  # a 1M-token context
SequenceTokens = Annotated[int, Field(ge=8, le=MAX_SEQUENCE_TOKENS)]
MicroBatch = Annotated[int, Field(ge=1, le=16_384)]  # sequences per device per forward pass
MAX_EXPERTS = 1_024  # experts of one MoE layer (the largest MoEs have a few hundred)
QuantGroup = Annotated[int, Field(ge=1, le=65_536)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def paths(self, root: Path) -> dict[str, PathSetting]:
        """The settings here that name a file or folder some stage reads: their key within the
        section -> what must be there (`make check` looks; DVC must know them as dependencies)."""
        return {}


class PathSetting(NamedTuple):
    """A setting's value that names a file or folder, and what it must be there."""

    path: str  # as written in params.yaml
    suffixes: tuple[str, ...] = ()  # a file of one of these types; none: a folder


class InputError(ValueError):
    """Bad input a user can fix: the message names the file, row or setting and what would be valid.

    Helpers raise it; a stage's process prints the message alone, without a traceback (see
    pipeline/stage.py), and exits with status 1.
    """


class ParamsError(InputError):
    """params.yaml is invalid, or a stage read a key its dvc.yaml entry does not declare."""


def read_yaml(path: Path) -> Any:
    try:
        return YAML(typ="safe").load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except Exception as error:  # ruamel raises several unrelated error types for bad YAML
        raise ParamsError(f"{path}: not valid YAML: {error}") from None


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model at `loc`, for 'unknown key' messages."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return sorted(model.model_fields)


def format_validation_error(error: ValidationError, source: str, schema: Any, section: str = "") -> str:
    """One line per bad setting of `source`, named by its dotted key; `schema` is the model that
    failed, validating `section` of params.yaml (none: the whole file)."""
    lines = [f"{source}: {error.error_count()} invalid setting(s):"]
    for item in error.errors():
        loc = tuple(part for part in item["loc"] if part != "[key]")  # a bad name: the entry it names
        key = ".".join(str(part) for part in (section, *loc) if part != "") or "(top level)"
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(schema, loc[:-1]) if isinstance(schema, type) else []
            lines.append(f"  {key}: unknown key; valid keys here: {', '.join(valid)}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = "" if item["type"].startswith("value_error") else f" (got {item['input']!r})"
            lines.append(f"  {key}: {message}{got}")
    return "\n".join(lines)
