"""The `gguf` section: GGUF exports for llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    field_validator,
)

from pipeline.settings.base import (
    Name,
    PathSetting,
    Section,
)

GGUFType = Literal["f16", "q8_0", "q4_0"]


class GGUFRun(Section):
    """One model exported to GGUF files for llama.cpp."""

    model: str = Field(description="Model folder to export: a Llama-architecture model of the pipeline or a local one.")
    types: list[GGUFType] = Field(
        default_factory=lambda: ["f16", "q8_0", "q4_0"],
        min_length=1,
        description="GGUF weight types to write: f16, then quantized ones made from it (q8_0: 8-bit, q4_0: 4-bit).",
    )

    @field_validator("types")
    @classmethod
    def _f16_first(cls, types: list[str]) -> list[str]:
        if types[0] != "f16" or len(set(types)) != len(types):
            raise ValueError(f"list f16 first (the others are quantized from it), each type once: got {types}")
        return types


class GGUFSettings(Section):
    """`gguf@<run>` stages: GGUF export with llama.cpp's converter, verified by generating with llama.cpp
    (python -m stages.gguf; needs `make llama-cpp` once). Off by default: no runs."""

    runs: dict[Name, GGUFRun] = Field(
        default_factory=dict, description="Run name -> model and types; each is a gguf@<name> stage."
    )
    verify_examples: int = Field(
        50, ge=1, le=100_000, description="Skill questions per skill (from the eval sets) each file answers with "
        "greedy decoding, compared with transformers' answers."
    )  # fmt: skip

    def paths(self, root: Path) -> dict[str, PathSetting]:
        return {f"runs.{name}.model": PathSetting(run.model) for name, run in self.runs.items()}


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = GGUFSettings
