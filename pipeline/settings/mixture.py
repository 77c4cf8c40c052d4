"""The `mixture` section: the dense baseline and the MoE runs trained on the experts' SFT mixture."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    model_validator,
)

from pipeline.settings.base import (
    Name,
    Section,
)
from pipeline.settings.sft import SFTOverrides


class MoERun(SFTOverrides):
    """One MoE trained on the mixture: which variant, its mode, and SFT settings that differ from mixture.defaults."""

    moe: str = Field(description="The moe.variants entry to train.")
    mode: Literal["full", "router", "lora"] | None = Field(
        None,
        description="full: every weight; router: only the routers' gate weights; lora: LoRA on the attention "
        "projections (merged into the model at the end). Default: lora when the run's SFT settings say "
        "`adapter: lora`, else full.",
    )

    @model_validator(mode="after")
    def _mode_sets_the_adapter(self) -> MoERun:
        if self.adapter is not None:
            raise ValueError("set `mode` (full, router or lora), not `adapter`, for a MoE run")
        return self


def _default_moe_runs() -> dict[str, MoERun]:
    runs = {name: MoERun(moe=name) for name in ("merges", "experts", "upcycled")}  # moe.variants by default
    runs["experts_router"] = MoERun(moe="experts", mode="router", learning_rate=0.01)
    return runs


class MixtureSettings(Section):
    """`dense@<run>` and `moe_finetune@<run>` stages: models trained with axolotl on one mixture of the
    experts' SFT data, with the same settings, rows and steps unless a run overrides them: the dense
    baseline and the MoE variants (python -m stages.mixture_finetune)."""

    defaults: SFTOverrides = Field(
        default_factory=lambda: SFTOverrides(max_steps=400),
        description="What the mixture runs change of the shared `sft` settings.",
    )
    weights: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Expert name -> weight (>= 0) of its SFT data in the mixture; rows are drawn in these "
        "proportions. Empty (the default): every expert, weight 1; otherwise an expert left out gets no rows.",
    )
    rows: int = Field(4000, ge=1, le=10_000_000, description="SFT rows in the mixture (replay passages come on top).")
    seed: int = Field(
        0, description="Seed of the draw of the mixture's rows (the mixture stage): every run trains on them."
    )
    router_aux_loss_coef: float = Field(0.02, ge=0, description="Weight of the router load-balancing loss (0: off).")
    dense_runs: dict[Name, SFTOverrides] = Field(
        default_factory=lambda: {"multitask": SFTOverrides()},
        description="Run name -> overrides; each is a dense@<name> stage: finetune.base_model trained on the "
        "mixture (the step-matched dense baseline), evaluated as dense/<name>.",
    )
    moe_runs: dict[Name, MoERun] = Field(
        default_factory=_default_moe_runs,
        description="Run name -> MoE variant, mode and overrides; each is a moe_finetune@<name> stage, evaluated "
        "as moe_trained/<name>.",
    )


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = MixtureSettings
