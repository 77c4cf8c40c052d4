"""The `adapters` section: experts trained with peft adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from pipeline.settings.base import (
    SFT_DATASET_SUFFIXES,
    Name,
    PathSetting,
    Section,
)
from pipeline.settings.finetune import ExpertSettings


class AdapterRun(ExpertSettings):
    """One expert trained with a peft adapter (LoRA, LoHa or LoKr) and merged into a plain model."""

    method: Literal["lora", "loha", "lokr"] = Field(
        description="peft's LoRA (low-rank B·A), LoHa (Hadamard product of two low-rank pairs) or LoKr (Kronecker "
        "product); rank lora_r, alpha lora_alpha, on every linear layer of the decoder."
    )

    @model_validator(mode="after")
    def _method_sets_the_adapter(self) -> AdapterRun:
        if self.adapter is not None:
            raise ValueError("set `method` (lora, loha or lokr), not `adapter`, for an adapters run")
        return self


class AdapterSettings(Section):
    """`adapter@<run>` stages: experts trained with other low-rank adapters than axolotl's LoRA, on the experts'
    data, masking and settings (python -m stages.adapters). Off by default: no runs."""

    runs: dict[Name, AdapterRun] = Field(
        default_factory=dict,
        description="Run name -> dataset, method and overrides (resolved like an expert's: sft, then "
        "finetune.defaults, then these); each is an adapter@<name> stage, evaluated as adapter/<name>.",
    )

    def paths(self, root: Path) -> dict[str, PathSetting]:
        return {
            f"runs.{name}.dataset": PathSetting(run.dataset, SFT_DATASET_SUFFIXES) for name, run in self.runs.items()
        }


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = AdapterSettings
