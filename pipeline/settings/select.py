"""The `select` section: which merges go on into the MoE."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
)

from pipeline.settings.base import (
    Section,
)


class SelectSettings(Section):
    """`select` stage: the merges that go on into the MoE, by measured quality."""

    metric: str = Field(
        "all_skills/exact_match", description="An eval metric (a key of metrics/eval/<model>.json); higher is better."
    )
    top_k: int = Field(4, ge=1, description="How many merges to select (the MoE's experts, by default).")
    min_score: float | None = Field(None, description="Only merges scoring at least this qualify.")
    on_too_few: Literal["keep", "fail"] = Field(
        "keep",
        description="Fewer than top_k merges qualify: keep those that do (the selection says how many are "
        "missing), or fail. No qualifying merge at all always fails.",
    )


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = SelectSettings
