"""The experiment's roster: the names of its experts and merges, in params.yaml's order.

Merges, the selection, the MoEs and the SFT mixture need the experts' names (and the mixture and
the MoE prompts their datasets), not their training settings. DVC can only declare a params key
whole, and declaring `finetune.experts` would make every such stage stale when one expert's
learning rate changes. So the check stage, which reads all of params.yaml anyway, writes the
roster to a file, and those stages depend on that file by hash: they rerun when a name or a
dataset changes, never for a training setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.settings.base import InputError


class Roster(NamedTuple):
    experts: dict[str, str]  # expert -> its SFT dataset, in params.yaml's order
    merges: dict[str, list[str]]  # merge recipe -> the experts it merges, in order


def roster_of(params: Any) -> Roster:
    """The roster of validated params (pipeline/settings/params_file.py Params)."""
    experts = {name: expert.dataset for name, expert in params.finetune.experts.items()}
    merges = {name: list(recipe.experts or experts) for name, recipe in params.merge.recipes.items()}
    return Roster(experts, merges)


def roster_json(roster: Roster) -> str:
    return json.dumps(roster._asdict(), indent=2) + "\n"


def read_roster(path: Path) -> Roster:
    try:
        return Roster(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"{path}: not a roster the check stage wrote ({error}); run `dvc repro check`") from None
