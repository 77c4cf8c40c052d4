"""The `merge_search` section: searches over mergekit recipes, scored on the validation split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, field_validator, model_validator

from pipeline.settings.base import Name, Section
from pipeline.settings.merge import MERGE_METHODS

# The methods a search can take: those that weigh each expert (a weight per model); their density,
# where they have one, is searched too.
SEARCHABLE_METHODS = tuple(sorted(name for name, spec in MERGE_METHODS.items() if "weight" in spec.model_parameters))
MAX_TRIALS = 10_000


class Interval(Section):
    """A closed range a searched parameter is drawn from."""

    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value.")

    @model_validator(mode="after")
    def _ordered(self) -> Interval:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class SearchRun(Section):
    """One search for a merge recipe: a merge_search@<name> stage. Each trial merges the experts with
    the parameters the sampler proposes and scores the merge on the validation split (data/validation,
    never the held-out eval items); the best trial's merge is the stage's model, search/<name>."""

    methods: list[str] = Field(
        default_factory=lambda: ["ties"],
        min_length=1,
        description="mergekit methods to search among (the method is a searched choice when there are several); "
        "each must weigh its experts: " + ", ".join(SEARCHABLE_METHODS) + ".",
    )
    experts: list[str] | None = Field(None, description="Expert names to merge (default: every expert in "
                                      "finetune.experts).")  # fmt: skip
    weight: Interval = Field(
        default_factory=lambda: Interval(low=0.0, high=1.0), description="Range of each expert's weight."
    )
    density: Interval = Field(
        default_factory=lambda: Interval(low=0.1, high=1.0),
        description="Range of each expert's density (the share of its task vector kept), for methods that take one.",
    )
    normalize: bool | None = Field(
        None,
        description="The methods' `normalize`: false makes the weights absolute (each expert's task vector scaled by "
        "its weight, so the search finds the scale too), true divides them by their sum; null: mergekit's default "
        "for the method (true for ties, dare_ties and della; false for task_arithmetic and dare_linear).",
    )
    trials: int = Field(50, ge=1, le=MAX_TRIALS, description="Trials the study holds when the stage ends. Raising "
                        "it runs only the new ones; lowering it uses the first `trials` of the study.")  # fmt: skip
    sampler: Literal["tpe", "cmaes", "random"] = Field(
        "tpe", description="Optuna's sampler: tpe (Tree-structured Parzen Estimator), cmaes (CMA-ES) or random."
    )
    seed: NonNegativeInt = Field(
        0,
        description="Seed of the sampler and of the methods that drop parameters at random (dare_*, della*): the "
        "same settings and seed give the same trials.",
    )

    @field_validator("methods")
    @classmethod
    def _methods_weigh_experts(cls, methods: list[str]) -> list[str]:
        unfit = [method for method in methods if method not in SEARCHABLE_METHODS]
        if unfit:
            raise ValueError(
                f"{unfit} cannot be searched (no weight per expert); valid: {', '.join(SEARCHABLE_METHODS)}"
            )
        if len(set(methods)) != len(methods):
            raise ValueError(f"a method is listed twice: {methods}")
        return methods

    def uses_density(self) -> bool:
        return any("density" in MERGE_METHODS[method].model_parameters for method in self.methods)


class MergeSearchSettings(Section):
    """`merge_search@<name>` stages: Optuna searches over mergekit recipes (python -m stages.merge_search).
    Off by default: no runs. Each keeps its study (every trial) in models/search_studies/<name>.db, so a
    stopped search resumes; `optuna-dashboard` on that file shows it."""

    runs: dict[Name, SearchRun] = Field(
        default_factory=dict,
        description="Search name -> its space and budget; each is a merge_search@<name> stage, evaluated as "
        "search/<name> and compared with every merge recipe and the best expert in the report.",
    )


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = MergeSearchSettings
