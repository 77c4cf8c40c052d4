"""Profiles: other experiments from the same dvc.yaml, each an overlay on the shipped params.yaml.

    python -m pipeline.profiles show gpu-small    # the settings of the profile (params.yaml + overlay)
    python -m pipeline.profiles apply gpu-small   # write them into params.yaml; then `dvc repro`
    python -m pipeline.profiles which             # what params.yaml holds: a profile, and edits of your own
    python -m stages.check --profile gpu-small    # validate them offline; params.yaml untouched

profiles/<name>.yaml holds only the keys that differ from params.yaml (tiny.yaml is empty: the
default experiment). The merge follows the schema (pipeline/settings/): a section (a pydantic
model: `sft`, `data.corpus`, `finetune.defaults`, ...) merges key by key; everything else is
replaced whole: named collections (`hub`, `finetune.experts`, `merge.recipes`, `moe.variants`,
`mixture.moe_runs`, `eval.task_data`, ...), lists and single values. So a profile that names its
own experts gets exactly those, not the default four plus its own.

`apply` merges over the committed params.yaml (`git show HEAD:params.yaml`; outside git, the
file itself), keeping the comments of the keys it leaves alone, validates the result and writes
it atomically. It refuses when params.yaml holds edits of the user's own (settings that are
neither the committed file's nor exactly some profile's: typically a `dvc exp run -S`), naming them
and the command that drops them, so no edit is lost and switching A -> B -> tiny works. Settings
are compared, not text: DVC's `-S` rewrites params.yaml's layout.
"""

from __future__ import annotations

import argparse
import copy
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from pipeline.atomic import write_text
from pipeline.settings.base import PROJECT_ROOT, InputError, ParamsError, format_validation_error
from pipeline.settings.params_file import Params

PROFILES_DIR = "profiles"
DEFAULT_PROFILE = "tiny"


def _represent_null(dumper: Any, _: None) -> Any:
    return dumper.represent_scalar("tag:yaml.org,2002:null", "null")


def _yaml() -> YAML:
    """Round-trip YAML laid out as params.yaml is, so untouched keys keep their bytes and comments."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096  # never wrap a long comment or string
    # `null` as params.yaml writes it (ruamel's default is an empty value)
    yaml.representer.add_representer(type(None), _represent_null)
    return yaml


def profile_names(root: Path = PROJECT_ROOT) -> list[str]:
    return sorted(path.stem for path in (root / PROFILES_DIR).glob("*.yaml"))


def read_overlay(name: str, root: Path = PROJECT_ROOT) -> CommentedMap:
    """The keys profiles/<name>.yaml changes (an empty map for the empty overlay)."""
    path = root / PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"no profile {name!r}: {PROFILES_DIR}/ has {', '.join(profile_names(root)) or 'none'}")
    try:
        overlay = _yaml().load(path.read_text())
    except Exception as error:  # ruamel raises several unrelated error types for bad YAML
        raise InputError(f"{path}: not valid YAML: {error}") from None
    if overlay is None:
        return CommentedMap()
    if not isinstance(overlay, dict):
        raise InputError(f"{path}: a profile is a mapping of params.yaml keys, not a {type(overlay).__name__}")
    return overlay


def _section(model: type[BaseModel], key: Any) -> type[BaseModel] | None:
    """The model of `key` when that field of `model` is a section (merged key by key), else None."""
    field = model.model_fields.get(str(key))
    annotation = field.annotation if field else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def merge_overlay(base: dict, overlay: dict, model: type[BaseModel] = Params) -> dict:
    """`base` (a params.yaml mapping) with `overlay` applied: sections merge key by key, any other
    value is replaced whole. Neither argument changes; the base's comments stay where it is kept."""
    merged = copy.deepcopy(base)
    _merge_into(merged, overlay, model)
    return merged


def _merge_into(target: dict, overlay: dict, model: type[BaseModel]) -> None:
    for key, value in overlay.items():
        section = _section(model, key)
        if section is not None and isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value, section)
        else:
            _replace(target, key, copy.deepcopy(value))
            _take_line_comment(target, overlay, key)


# ruamel keeps the blank lines and comments between one entry and the next in the comment of the
# entry before them (for a block collection: its deepest last entry). They must stay between the
# same two keys when a value is replaced or a key is added.
def _is_block(node: Any) -> bool:
    return isinstance(node, CommentedMap | CommentedSeq) and bool(node) and not node.fa.flow_style()


def _last_entry(node: Any) -> tuple[Any, Any]:
    """(collection, key or index) of the deepest last entry of a block collection."""
    key = next(reversed(node)) if isinstance(node, CommentedMap) else len(node) - 1
    return _last_entry(node[key]) if _is_block(node[key]) else (node, key)


def _slots(node: Any, key: Any) -> list[Any]:
    """ruamel's comment slots of an entry; its end-of-line comment is at _slot(node)."""
    return node.ca.items.setdefault(key, [None] * 4)


def _slot(node: Any) -> int:
    return 2 if isinstance(node, CommentedMap) else 0


def _cut_tail(node: Any) -> str:
    """Remove and return the lines that follow the last entry of block collection `node`."""
    holder, last = _last_entry(node)
    slots = _slots(holder, last)
    token = slots[_slot(holder)]
    if token is None or "\n" not in token.value:
        return ""
    line, tail = token.value.split("\n", 1)
    if line.strip():
        token.value = line + "\n"
    else:
        slots[_slot(holder)] = None
    return tail


def _add_tail(holder: Any, key: Any, tail: str) -> None:
    slots = _slots(holder, key)
    token = slots[_slot(holder)]
    if token is None:
        slots[_slot(holder)] = CommentToken("\n" + tail, CommentMark(0), None)
    else:
        token.value = token.value.split("\n", 1)[0] + "\n" + tail


def _replace(target: CommentedMap, key: Any, value: Any) -> None:
    """target[key] = value, the lines that followed the old entry still after it."""
    if key in target:  # a single value's tail is the key's own comment, which stays
        tail = _cut_tail(target[key]) if _is_block(target[key]) else ""
    else:  # a new last entry: the collection's tail moves after it
        tail = _cut_tail(target) if _is_block(target) else ""
    if _is_block(value):
        _cut_tail(value)  # what followed it in the profile
    target[key] = value
    if tail:
        _add_tail(*(_last_entry(value) if _is_block(value) else (target, key)), tail)


def _take_line_comment(target: Any, overlay: Any, key: Any) -> None:
    """The profile's comment on a replaced single value replaces the base's (which may explain the old value)."""
    if _is_block(target[key]) or not isinstance(overlay, CommentedMap):
        return
    theirs = overlay.ca.items.get(key, [None] * 4)[2]
    line = theirs.value.split("\n", 1)[0] if theirs is not None else ""
    if not line.strip().startswith("#"):
        return
    slots = _slots(target, key)
    ours = slots[2]
    rest = ours.value.split("\n", 1)[1] if ours is not None and "\n" in ours.value else ""
    slots[2] = copy.copy(theirs)
    slots[2].value = line + "\n" + rest


def dump(params: dict) -> str:
    stream = io.StringIO()
    _yaml().dump(params, stream)
    return stream.getvalue()


def _load(text: str, source: str) -> CommentedMap:
    try:
        return _yaml().load(text) or CommentedMap()
    except Exception as error:
        raise InputError(f"{source}: not valid YAML: {error}") from None


def profile_params(name: str, base: Path = PROJECT_ROOT / "params.yaml", root: Path = PROJECT_ROOT) -> dict:
    """The settings of profile `name` (in root/profiles) over the params.yaml at `base`: the merged
    mapping, not validated."""
    return merge_overlay(_load(base.read_text(), str(base)), read_overlay(name, root))


def validate(params: dict, source: str) -> Params:
    """The validated settings, or ParamsError naming every bad key (as `make check` does)."""
    try:
        return Params.model_validate(params)
    except ValidationError as error:
        raise ParamsError(format_validation_error(error, source, Params)) from None


def committed_params(root: Path = PROJECT_ROOT) -> str:
    """The text of params.yaml at git's HEAD (the base every profile applies to); outside a git
    repository, or before the first commit, the working file."""
    shown = subprocess.run(["git", "show", "HEAD:./params.yaml"], cwd=root, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (root / "params.yaml").read_text()


def profile_text(name: str, root: Path = PROJECT_ROOT, base_text: str | None = None) -> str:
    """The params.yaml that `apply name` writes: validated, comments of untouched keys kept."""
    base_text = committed_params(root) if base_text is None else base_text
    overlay = read_overlay(name, root)
    source = f"{PROFILES_DIR}/{name}.yaml over params.yaml"
    # an empty overlay (the default) gives the committed file byte for byte
    text = dump(merge_overlay(_load(base_text, "params.yaml"), overlay)) if overlay else base_text
    validate(_load(text, source), source)
    return text


def leaves(mapping: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every value of a nested mapping that is not a mapping itself (an empty
    mapping and a list are values)."""
    if not isinstance(mapping, dict) or not mapping:
        return {prefix.rstrip("."): mapping} if prefix else {}
    found: dict[str, Any] = {}
    for key, value in mapping.items():
        found.update(leaves(value, f"{prefix}{key}."))
    return found


_ABSENT = object()


def differences(current: dict, base: dict) -> list[str]:
    """`key = value (was value)` for every setting in which `current` differs from `base`."""
    now, before = leaves(current), leaves(base)
    return [
        f"{key} = {now.get(key, '(removed)')} (was {before.get(key, '(absent)')})"
        for key in sorted(now.keys() | before.keys())
        if now.get(key, _ABSENT) != before.get(key, _ABSENT)
    ]


def closest_profile(current: dict, root: Path = PROJECT_ROOT, base_text: str | None = None) -> tuple[str, list[str]]:
    """The profile whose settings params.yaml is closest to, and the edits on top of it. Settings are
    compared, not text: `dvc exp run -S` rewrites params.yaml's layout."""
    base_text = committed_params(root) if base_text is None else base_text
    candidates = {}
    for name in profile_names(root):
        try:
            candidates[name] = _load(profile_text(name, root, base_text), name)
        except InputError:  # a profile being written that does not validate yet: nobody applied it
            continue
    return min(((name, differences(current, given)) for name, given in candidates.items()), key=lambda c: len(c[1]))


def describe(root: Path = PROJECT_ROOT) -> str:
    """One line on what params.yaml holds: a profile, and any edits of the user's own on top of it."""
    path = root / "params.yaml"
    name, edits = closest_profile(_load(path.read_text(), str(path)), root)
    if not edits:
        back = "" if name == DEFAULT_PROFILE else f" (`make run PROFILE={DEFAULT_PROFILE}` goes back to the default)"
        return f"params.yaml holds profile {name!r}{back}"
    return f"params.yaml holds profile {name!r} with edits of your own: {'; '.join(edits)}"


def apply(name: str, root: Path = PROJECT_ROOT) -> Path:
    """Write profile `name` into root/params.yaml; refuse (nothing written) to overwrite edits of the user's own."""
    path = root / "params.yaml"
    base_text = committed_params(root)
    text = profile_text(name, root, base_text)
    current = _load(path.read_text(), str(path)) if path.is_file() else _load(base_text, "params.yaml")
    closest, edits = closest_profile(current, root, base_text)
    if edits:
        raise InputError(
            f"{path.name} holds edits of your own on top of profile {closest!r}, which applying profile "
            f"{name!r} would lose: {'; '.join(edits)}.\n"
            f"If they are the settings of your last `dvc exp run -S`, DVC keeps them with that experiment "
            f"(`dvc exp show`; `dvc exp apply <name>` brings them back). To drop them and run profile {name!r}: "
            f"`git checkout params.yaml && make run PROFILE={name}`. To keep them, put them in "
            f"{PROFILES_DIR}/{name}.yaml (or a new profile) or commit them"
        )
    write_text(path, text)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "command", choices=("show", "apply", "which"),
        help="show: print the settings; apply: write params.yaml; which: say what params.yaml holds",
    )  # fmt: skip
    parser.add_argument("name", nargs="?", help="a profile: the name of a file in profiles/ without .yaml")
    args = parser.parse_args(argv)
    if args.command != "which" and not args.name:
        parser.error(f"{args.command} needs a profile: {', '.join(profile_names())}")
    try:
        if args.command == "which":
            print(describe())
        elif args.command == "show":
            sys.stdout.write(profile_text(args.name))
        else:
            path = apply(args.name)
            print(f"{path.name} holds profile {args.name!r} now; run it: `dvc repro` or `dvc exp run -n {args.name}`")
    except InputError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
