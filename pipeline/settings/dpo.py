"""The `dpo` section: preference tuning runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    Field,
    model_validator,
)

from pipeline.settings.base import (
    SFT_DATASET_SUFFIXES,
    Name,
    PathSetting,
    Section,
    SFTDatasetFile,
)
from pipeline.settings.sft import SFTOverrides

PREFERENCE_ROW = '{"messages": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "..."}'


class DPORun(SFTOverrides):
    """One preference-tuning run: the model it starts from, its preference pairs, and SFT settings that differ
    from dpo.defaults."""

    model: str = Field(
        description="Model folder to start from: an expert (models/experts/<name>), the dense baseline "
        "(models/dense/<name>), or any local or hub model folder."
    )
    dataset: SFTDatasetFile = Field(
        description=f"Preference pairs (.jsonl/.json/.parquet), one per row: {PREFERENCE_ROW}. Generated ones are "
        "data/preference/train/<skill>.jsonl; a hub dataset's file in this shape works too (data/hub/<name>/...)."
    )
    eval_dataset: SFTDatasetFile | None = Field(
        None,
        description="Held-out pairs in the same shape (data/preference/eval/<skill>.jsonl): the stage measures how "
        "often the start and the trained model prefer the chosen answer. null: not measured.",
    )
    beta: float | None = Field(None, gt=0, description="DPO's beta for this run (default: dpo.beta).")

    @model_validator(mode="after")
    def _full_or_lora_only(self) -> DPORun:
        if self.adapter == "qlora":
            raise ValueError("adapter qlora is not supported for a DPO run: use none or lora")
        return self


class DPOSettings(Section):
    """`dpo@<run>` stages: direct preference optimisation with axolotl's `rl: dpo` (python -m stages.dpo).
    Off by default: no runs."""

    defaults: SFTOverrides = Field(
        default_factory=lambda: SFTOverrides(max_steps=200, learning_rate=1.0e-4, warmup_steps=10, replay_rows=0),
        description="What the DPO runs change of the shared `sft` settings.",
    )
    beta: float = Field(0.1, gt=0, description="Strength of DPO's pull towards the start model (axolotl rl_beta).")
    runs: dict[Name, DPORun] = Field(
        default_factory=dict,
        description="Run name -> start model, preference data and overrides; each is a dpo@<name> stage, evaluated "
        "as dpo/<name>.",
    )

    def paths(self, root: Path) -> dict[str, PathSetting]:
        named = {}
        for name, run in self.runs.items():
            named[f"runs.{name}.model"] = PathSetting(run.model)
            named[f"runs.{name}.dataset"] = PathSetting(run.dataset, SFT_DATASET_SUFFIXES)
            if run.eval_dataset:
                named[f"runs.{name}.eval_dataset"] = PathSetting(run.eval_dataset, SFT_DATASET_SUFFIXES)
        return named


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = DPOSettings
