"""The `merge` section: mergekit recipes, and what mergekit asks of each method's inputs."""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from pipeline.settings.base import (
    Name,
    Section,
)


class MergeMethod(NamedTuple):
    """What mergekit 0.1.5 asks of a merge method's inputs (its registry's contracts, copied here so
    that validating params.yaml does not import mergekit; tests/test_merge.py checks they agree)."""

    base: str  # required | optional | ignored
    min_inputs: int  # inputs count the base model too
    max_inputs: int | None
    shared_parameters: tuple[str, ...]  # one value for the whole merge (normalize, lambda, t, ...)
    model_parameters: tuple[str, ...]  # one value per input model (weight, density, ...)
    required: tuple[str, ...]


MERGE_METHODS = {
    "multislerp": MergeMethod("optional", 1, None, ("normalize_weights", "eps"), ("weight",), ("weight",)),
    "nearswap": MergeMethod("required", 2, 2, ("t",), (), ("t",)),
    "ram": MergeMethod("required", 1, None, ("epsilon",), (), ()),
    "ramplus_tl": MergeMethod("required", 1, None, ("r", "alpha", "epsilon"), (), ()),
    "sce": MergeMethod("required", 1, None, ("int8_mask", "select_topk"), (), ()),
    "linear": MergeMethod("ignored", 1, None, ("normalize",), ("weight",), ("weight",)),
    "slerp": MergeMethod("required", 2, 2, ("t",), (), ("t",)),
    "nuslerp": MergeMethod("optional", 1, None, ("nuslerp_row_wise", "nuslerp_flatten"), ("weight",), ("weight",)),
    "passthrough": MergeMethod("ignored", 1, 1, (), ("scale",), ()),
    "model_stock": MergeMethod("required", 3, None, ("filter_wise",), (), ()),
    "arcee_fusion": MergeMethod("required", 2, 2, (), (), ()),
    "karcher": MergeMethod("ignored", 1, None, ("max_iter", "tol"), (), ()),
    "task_arithmetic": MergeMethod(
        "required", 1, None, ("int8_mask", "normalize", "rescale", "lambda"), ("weight", "density"), ("weight",)
    ),
    "ties": MergeMethod(
        "required", 1, None, ("int8_mask", "normalize", "rescale", "lambda"), ("weight", "density"), ("weight",)
    ),
    "dare_ties": MergeMethod(
        "required", 1, None, ("int8_mask", "normalize", "rescale", "lambda"), ("weight", "density"), ("weight",)
    ),
    "dare_linear": MergeMethod(
        "required", 1, None, ("int8_mask", "normalize", "rescale", "lambda"), ("weight", "density"), ("weight",)
    ),
    "breadcrumbs": MergeMethod(
        "required",
        1,
        None,
        ("int8_mask", "normalize", "rescale", "lambda"),
        ("weight", "density", "gamma"),
        ("weight",),
    ),
    "breadcrumbs_ties": MergeMethod(
        "required",
        1,
        None,
        ("int8_mask", "normalize", "rescale", "lambda"),
        ("weight", "density", "gamma"),
        ("weight",),
    ),
    "della": MergeMethod(
        "required",
        1,
        None,
        ("int8_mask", "normalize", "rescale", "lambda"),
        ("weight", "density", "epsilon"),
        ("weight",),
    ),
    "della_linear": MergeMethod(
        "required",
        1,
        None,
        ("int8_mask", "normalize", "rescale", "lambda"),
        ("weight", "density", "epsilon"),
        ("weight",),
    ),
}


class MergeRecipe(Section):
    """One merge of experts with mergekit: a merge@<recipe> stage."""

    method: str = Field(description="A mergekit method: " + ", ".join(sorted(MERGE_METHODS)) + ".")
    experts: list[str] | None = Field(
        None, description="Expert names to merge (default: every expert in finetune.experts)."
    )
    parameters: dict[str, float | bool | dict[str, float]] = Field(
        default_factory=dict,
        description="The method's parameters. Per-model ones (weight, density, ...) take one number for every "
        "expert or {expert: number}; shared ones (normalize, lambda, t, ...) one value.",
    )

    @field_validator("method")
    @classmethod
    def _method_is_mergekits(cls, method: str) -> str:
        if method not in MERGE_METHODS:
            raise ValueError(f"{method!r} is not a mergekit method; valid: {', '.join(sorted(MERGE_METHODS))}")
        return method

    @model_validator(mode="after")
    def _parameters_fit_the_method(self) -> MergeRecipe:
        spec = MERGE_METHODS[self.method]
        valid = spec.shared_parameters + spec.model_parameters
        for name, value in self.parameters.items():
            if name not in valid:
                raise ValueError(f"{self.method} has no parameter {name!r}; valid: {', '.join(valid) or 'none'}")
            if isinstance(value, dict) and name not in spec.model_parameters:
                raise ValueError(f"parameter {name!r} of {self.method} takes one value, not one per expert")
        missing = [name for name in spec.required if name not in self.parameters]
        if missing:
            raise ValueError(f"{self.method} needs parameters {missing}")
        return self

    def base_is_first_expert(self) -> bool:
        """Two-model methods (slerp, nearswap, arcee_fusion) interpolate from one expert towards the other."""
        spec = MERGE_METHODS[self.method]
        return spec.base == "required" and spec.max_inputs == 2

    def uses_base_model(self) -> bool:
        """Methods on task vectors (task_arithmetic, ties, dare, model_stock, ...) need the common base."""
        return MERGE_METHODS[self.method].base == "required" and not self.base_is_first_expert()


class MergeSettings(Section):
    """`merge@<recipe>` stages: mergekit merges of the experts (python -m stages.merge)."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the merge and its output."
    )
    seed: int = Field(0, description="Seed of the methods that drop parameters at random (dare_*, della*).")
    recipes: dict[Name, MergeRecipe] = Field(
        default_factory=lambda: {
            "linear": MergeRecipe(method="linear", parameters={"weight": 1.0}),
            "slerp": MergeRecipe(method="slerp", experts=["addition", "sorting"], parameters={"t": 0.5}),
            "task_arithmetic": MergeRecipe(method="task_arithmetic", parameters={"weight": 0.5}),
            "ties": MergeRecipe(method="ties", parameters={"weight": 0.25, "density": 0.5}),
            "dare_ties": MergeRecipe(method="dare_ties", parameters={"weight": 0.25, "density": 0.5}),
            "model_stock": MergeRecipe(method="model_stock"),
        },
        description="Recipe name -> merge recipe; each is a merge@<recipe> stage.",
    )


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = MergeSettings
