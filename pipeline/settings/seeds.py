"""The `seeds` section: the experiment after pretraining, trained again with other seeds."""

from __future__ import annotations

from pydantic import Field, NonNegativeInt, field_validator

from pipeline.settings.base import Section


class SeedsSettings(Section):
    """`seeds`: replicated runs. Each seed of `replicas` reruns every stage after pretraining that trains,
    merges, builds or selects a model, and its evaluation, with that seed in place of sft.seed,
    merge.seed and moe.seed; the pretrained base model and the mixture's rows are shared. The report
    pools the runs (docs/tutorials/settings-and-comparing.md, "Replicated seeds")."""

    replicas: list[NonNegativeInt] = Field(
        default_factory=list,
        description="Training seeds beyond the main run's, e.g. [1, 2]: each is a run of stages "
        "<stage>_seed@<entry>-<seed> writing models/replicas/<seed>/ and metrics/replicas/<seed>/. Adding a "
        "seed computes only its own stages (and the report); removing one keeps its results in DVC's cache.",
    )

    @field_validator("replicas")
    @classmethod
    def _distinct(cls, replicas: list[int]) -> list[int]:
        repeated = sorted({seed for seed in replicas if replicas.count(seed) > 1})
        if repeated:
            raise ValueError(f"seeds {repeated} appear more than once: list each seed once")
        return replicas


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = SeedsSettings
