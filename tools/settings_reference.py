"""docs/reference/settings.md, generated from the schema of params.yaml (pipeline/settings/).

    python -m tools.settings_reference           # write the page
    python -m tools.settings_reference --check   # exit 1 when the page is not what the schema makes now

Each setting is documented once, where it is defined: a field's `description=`, a section's (or a
nested section's) model docstring. The page lists every section in params.yaml's order, and in it
every setting by its dotted key (`<name>` for an entry of a named collection), with its type, its
default as YAML writes it, the limits pydantic checks and that description. The settings a run may
override of `sft` are one row per collection, not a copy of the `sft` table each.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.atomic import write_text
from pipeline.settings.base import PROJECT_ROOT, Name
from pipeline.settings.params_file import Params
from pipeline.settings.sft import SFTOverrides

PAGE = Path("docs/reference/settings.md")
COMMAND = "python -m tools.settings_reference"
ENTRY = "<name>"
OVERRIDES_SECTION = "sft"  # the section whose settings an SFTOverrides model may change
LIMITS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.MultipleOf, "multiple_of", "multiple of"),
)
# A string YAML reads back as itself without quotes, in a flow collection too.
PLAIN_STRING = re.compile(r"[A-Za-z_./<][\w./<>@+-]*(?: [\w./<>@+-]+)*")
YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"}
UNIONS = (typing.Union, types.UnionType)


class Row(NamedTuple):
    key: str
    type: str
    default: str
    allowed: str
    description: str


class PageSection(NamedTuple):
    name: str
    description: str
    rows: list[Row]


# Types


def unwrap(annotation: Any, metadata: tuple[Any, ...] = ()) -> tuple[Any, tuple[Any, ...]]:
    """(the type under any Annotated layers, their metadata and `metadata`)."""
    while typing.get_origin(annotation) is Annotated:
        metadata = (*metadata, *annotation.__metadata__)
        annotation = annotation.__origin__
    return annotation, metadata


def is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def suffixes_checked(metadata: tuple[Any, ...]) -> tuple[str, ...] | None:
    """The file suffixes a validator of base.file_setting checks, if one does."""
    for item in metadata:
        func = getattr(item, "func", None)
        if isinstance(func, partial) and "suffixes" in func.keywords:
            return func.keywords["suffixes"]
    return None


def type_text(annotation: Any, metadata: tuple[Any, ...] = ()) -> str:
    """A type as a reader says it: `int or null`, `one of a, b`, `list of str`, `mapping name -> entry`."""
    if annotation == Name:
        return "name"
    annotation, metadata = unwrap(annotation, metadata)
    suffixes = suffixes_checked(metadata)
    if suffixes:
        return "file (" + "/".join(suffixes) + ")"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return ("one of " if len(args) > 1 else "only ") + ", ".join(code(str(arg)) for arg in args)
    if origin in UNIONS:
        return " or ".join("null" if arg is type(None) else type_text(arg) for arg in args)
    if origin is list:
        return f"list of {grouped(type_text(args[0]))}"
    if origin is dict:
        value = "entry" if is_model(unwrap(args[1])[0]) else grouped(type_text(args[1]))
        return f"mapping {type_text(args[0])} -> {value}"
    if is_model(annotation):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def grouped(text: str) -> str:
    """`text` in parentheses where `list of` or `->` before it would make it ambiguous."""
    return f"({text})" if " or " in text or text.startswith("one of ") else text


def limits(metadata: tuple[Any, ...]) -> list[str]:
    found = []
    for item in metadata:
        if isinstance(item, FieldInfo):  # Annotated[int, Field(ge=1)] inside a union or a collection
            found += limits(tuple(item.metadata))
        for kind, attribute, sign in LIMITS:
            if isinstance(item, kind):
                found.append(f"{sign} {number(getattr(item, attribute))}")
        if isinstance(item, annotated_types.MinLen):
            found.append(f"at least {item.min_length} " + ("entry" if item.min_length == 1 else "entries"))
        if isinstance(item, annotated_types.MaxLen):
            found.append(f"at most {item.max_length} entries")
    return found


def allowed_text(annotation: Any, metadata: tuple[Any, ...]) -> str:
    """The limits pydantic checks on a value (of the value under `| None` too) and on a collection's names."""
    annotation, metadata = unwrap(annotation, metadata)
    found = limits(metadata)
    if typing.get_origin(annotation) in UNIONS:
        found += [limit for arg in typing.get_args(annotation) for limit in limits(unwrap(arg)[1])]
    if typing.get_origin(annotation) is dict and typing.get_args(annotation)[0] == Name:
        found.append("names: lowercase letters, digits, _")
    return ", ".join(found)


def number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else repr(value)


# Defaults


def plain(value: Any) -> Any:
    """A default as the data params.yaml would hold: a model as the keys it was given."""
    if isinstance(value, BaseModel):
        given = value.model_fields_set
        return {name: plain(getattr(value, name)) for name in type(value).model_fields if name in given}
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def yaml_flow(value: Any) -> str:
    """`value` in YAML's flow style, on one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value if is_plain(value) else json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_flow(key)}: {yaml_flow(item)}" for key, item in value.items()) + "}"
    return "[" + ", ".join(yaml_flow(item) for item in value) + "]"


def is_plain(text: str) -> bool:
    try:
        float(text)
        return False
    except ValueError:
        return bool(PLAIN_STRING.fullmatch(text)) and text.lower() not in YAML_WORDS


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    return code(yaml_flow(plain(field.get_default(call_default_factory=True))))


# Rows


def docstring(model: type[BaseModel]) -> str:
    """A model's docstring as one paragraph per blank-line-separated block."""
    blocks = inspect.cleandoc(model.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(block.split()) for block in blocks)


def described(field: FieldInfo) -> str:
    """A field's description; a nested section's is its model's docstring."""
    return field.description or (docstring(field.annotation) if is_model(field.annotation) else "")


def entry_model(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """(model, key suffix) of a setting whose value is a section, or a collection of them."""
    annotation, _ = unwrap(annotation)
    if is_model(annotation):
        return annotation, ""
    if typing.get_origin(annotation) is dict and is_model(unwrap(typing.get_args(annotation)[1])[0]):
        return unwrap(typing.get_args(annotation)[1])[0], f".{ENTRY}"
    return None


def field_rows(key: str, field: FieldInfo) -> list[Row]:
    """The row of one setting, then the rows of the section or entries it holds."""
    row = Row(
        key=key,
        type=type_text(field.annotation, tuple(field.metadata)),
        default=default_text(field),
        allowed=allowed_text(field.annotation, tuple(field.metadata)),
        description=described(field),
    )
    nested = entry_model(field.annotation)
    return [row, *model_rows(nested[0], key + nested[1])] if nested else [row]


def model_rows(model: type[BaseModel], prefix: str) -> list[Row]:
    """The rows of a section's settings; those an overrides model copies from `sft` as one row."""
    inherited = SFTOverrides.model_fields if issubclass(model, SFTOverrides) else {}
    rows = [row for name, field in model.model_fields.items() if name not in inherited
            for row in field_rows(f"{prefix}.{name}", field)]  # fmt: skip
    return rows + ([overrides_row(prefix)] if inherited else [])


def overrides_row(prefix: str) -> Row:
    link = f"[`{OVERRIDES_SECTION}`](#{OVERRIDES_SECTION})"
    return Row(
        key=f"{prefix}.<{OVERRIDES_SECTION} setting>",
        type=f"as in {link}",
        default="inherited",
        allowed=f"as in {link}",
        description=f"Any {link} setting, given here to differ from the value it would inherit (left out: inherited).",
    )


def sections() -> list[PageSection]:
    """Every section of params.yaml, in its order, with its description and rows."""
    found = []
    for name, field in Params.model_fields.items():
        if is_model(field.annotation):
            found.append(PageSection(name, docstring(field.annotation), model_rows(field.annotation, name)))
        else:
            found.append(PageSection(name, field.description or "", field_rows(name, field)))
    return found


# The page


def code(text: str) -> str:
    """`text` as a Markdown code span (longer fences when it holds backticks)."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    padded = f" {text} " if text.startswith("`") or text.endswith("`") else text
    return f"{fence}{padded}{fence}"


def prose(text: str) -> str:
    """Schema text as Markdown: `<` and `*` outside code spans are shown, not read as HTML or emphasis."""
    parts = text.split("`")
    for index in range(0, len(parts), 2):
        parts[index] = parts[index].replace("<", "&lt;").replace("*", r"\*")
    return "`".join(parts)


def cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def table(rows: list[Row]) -> list[str]:
    lines = ["| setting | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        columns = (code(row.key), row.type, row.default, row.allowed, prose(row.description))
        lines.append("| " + " | ".join(cell(column) for column in columns) + " |")
    return lines


def render() -> str:
    """The whole page."""
    found = sections()
    lines = [
        "# Settings reference",
        "",
        f"Generated from the schema (pipeline/settings/) by `{COMMAND}`: edit the descriptions there, not this page.",
        "",
        f"Every key of params.yaml, by section; `{ENTRY}` stands for the name of an entry of a collection.",
        "",
        *(f"- [{section.name}](#{section.name})" for section in found),
    ]
    for section in found:
        lines += ["", f"## {section.name}", "", prose(section.description), "", *table(section.rows)]
    return "\n".join(lines) + "\n"


def is_current(root: Path = PROJECT_ROOT) -> bool:
    page = root / PAGE
    return page.is_file() and page.read_text() == render()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is stale; write nothing")
    args = parser.parse_args()
    if args.check:
        if is_current():
            return 0
        print(f"{PAGE} is stale: run `{COMMAND}`", file=sys.stderr)
        return 1
    write_text(PROJECT_ROOT / PAGE, render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
