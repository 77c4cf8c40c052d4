"""The experiment's roster: the names of its experts and merges, in params.yaml's order.

Merges, the selection, the MoEs and the SFT mixture need the experts' names (and the mixture and
the MoE prompts their datasets), not their training settings. DVC can only declare a params key
whole, and declaring `finetune.experts` would make every such stage stale when one expert's
learning rate changes. So the check stage, which reads all of params.yaml anyway, writes the
roster into data/roster/, one file per collection, and those stages depend on the files they read
by hash: they rerun when a name or a dataset changes, never for a training setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.atomic import atomic_dir
from pipeline.settings.base import InputError

EXPERTS_FILE = "experts.json"  # expert -> its SFT dataset
MERGES_FILE = "merges.json"  # merge recipe -> the experts it merges


class Roster(NamedTuple):
    experts: dict[str, str]  # expert -> its SFT dataset, in params.yaml's order
    merges: dict[str, list[str]]  # merge recipe -> the experts it merges, in order


def roster_of(params: Any) -> Roster:
    """The roster of validated params (pipeline/settings/params_file.py Params)."""
    experts = {name: expert.dataset for name, expert in params.finetune.experts.items()}
    merges = {name: list(recipe.experts or experts) for name, recipe in params.merge.recipes.items()}
    return Roster(experts, merges)


def write_roster(folder: Path, roster: Roster) -> None:
    with atomic_dir(folder) as tmp:
        (tmp / EXPERTS_FILE).write_text(json.dumps(roster.experts, indent=2) + "\n")
        (tmp / MERGES_FILE).write_text(json.dumps(roster.merges, indent=2) + "\n")


def read_roster_file(path: Path) -> dict[str, Any]:
    """One file of the roster: experts.json or merges.json."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a roster file the check stage wrote ({error}); run `dvc repro check`") from None
