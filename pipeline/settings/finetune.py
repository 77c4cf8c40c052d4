"""The `finetune` section: the SFT experts."""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    Field,
)

from pipeline.settings.base import (
    REPLAY_TEXT_SUFFIXES,
    SFT_DATASET_SUFFIXES,
    SKILLS,
    Name,
    PathSetting,
    ReplayTextFile,
    Section,
    SFTDatasetFile,
)
from pipeline.settings.sft import SFTOverrides


class ExpertSettings(SFTOverrides):
    """One expert: its dataset, and any SFT setting that differs from `sft` and finetune.defaults."""

    dataset: SFTDatasetFile = Field(
        description="A .jsonl/.json/.parquet file of chat messages (`messages` column): generated, local, "
        "or a file of a hub dataset fetched by a `hub` entry (data/hub/<name>/...)."
    )


class FinetuneSettings(Section):
    """`finetune@<expert>` stages: SFT experts with axolotl (python -m stages.finetune)."""

    base_model: str = Field(
        "models/pretrain",
        description="Model folder to fine-tune: the pretrain output (default), any local Hugging Face model "
        "folder, or a hub model fetched by a `hub` entry (data/hub/<name>).",
    )
    replay_text: ReplayTextFile = Field(
        "data/corpus/train.jsonl",
        description="Pretraining-style text (.jsonl/.parquet with a `text` column) that replay_rows draws from.",
    )
    defaults: SFTOverrides = Field(
        default_factory=SFTOverrides, description="What the experts change of the shared `sft` settings."
    )
    experts: dict[Name, ExpertSettings] = Field(
        default_factory=lambda: {skill: ExpertSettings(dataset=f"data/sft/{skill}.jsonl") for skill in SKILLS},
        min_length=1,
        description="Expert name -> its dataset and overrides. Each becomes a finetune@<name> stage.",
    )

    def paths(self, root: Path) -> dict[str, PathSetting]:
        named = {
            "base_model": PathSetting(self.base_model),
            "replay_text": PathSetting(self.replay_text, REPLAY_TEXT_SUFFIXES),
        }
        for name, expert in self.experts.items():
            named[f"experts.{name}.dataset"] = PathSetting(expert.dataset, SFT_DATASET_SUFFIXES)
        return named


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = FinetuneSettings
