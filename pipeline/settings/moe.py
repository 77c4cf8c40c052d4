"""The `moe` section: the mixtures of experts mergekit-moe builds."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
)

from pipeline.settings.base import (
    MAX_EXPERTS,
    Name,
    Section,
)


class ExpertPrompts(Section):
    """Prompts that should (positive) or should not (negative) be routed to one MoE expert."""

    positive: list[str] = Field(
        min_length=1, description="Prompts whose tokens should go to this expert (mergekit-moe positive_prompts)."
    )
    negative: list[str] = Field(
        default_factory=list,
        description="Prompts whose tokens should not go to this expert (mergekit-moe negative_prompts).",
    )


class MoEVariant(Section):
    """One mixture of experts to build: where its experts come from."""

    source: Literal["selected_merges", "experts", "base"] = Field(
        description="The merges the select stage chose, the SFT experts, or finetune.base_model copied into "
        "every expert (sparse upcycling: it only becomes more than the base through training, so a "
        "mixture.moe_runs entry must train it)."
    )
    experts: list[str] | None = Field(None, description="source experts: which SFT experts (default: all).")
    num_experts: int = Field(4, ge=2, le=MAX_EXPERTS, description="source base: how many copies of the base model.")


def _default_variants() -> dict[str, MoEVariant]:
    return {
        "merges": MoEVariant(source="selected_merges"),
        "experts": MoEVariant(source="experts"),
        "upcycled": MoEVariant(source="base"),
    }


class MoESettings(Section):
    """`moe@<variant>` stages: Mixtral-architecture mixtures of experts built by mergekit-moe (python -m stages.moe)."""

    variants: dict[Name, MoEVariant] = Field(
        default_factory=_default_variants,
        description="Variant name -> its source; each is a moe@<name> stage, evaluated as moe/<name>.",
    )
    gate_mode: Literal["hidden", "cheap_embed", "random", "uniform_random"] = Field(
        "random",
        description="How mergekit-moe initialises the routers: from the hidden states (hidden) or embeddings "
        "(cheap_embed) of each expert's prompts, or at random (advised when the MoE is trained afterwards).",
    )
    experts_per_token: int = Field(2, ge=1, description="Experts each token is routed to.")
    prompts: dict[str, ExpertPrompts] = Field(
        default_factory=dict,
        description="Source name (expert, recipe, or copy_<i> for source base) -> its prompts, for the hidden and "
        "cheap_embed gates. Default for an expert: the first prompt_examples questions of its SFT data; for a "
        "merge: those of the experts it merges.",
    )
    prompt_examples: int = Field(4, ge=1, le=10_000, description="Questions per expert in the default prompts.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype mergekit-moe builds and saves the MoE in."
    )
    seed: int = Field(0, description="Seed of the random gates.")


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = MoESettings
