"""The `quantize` section: post-training quantization runs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
)

from pipeline.settings.base import (
    Name,
    PathSetting,
    QuantGroup,
    Section,
)

QuantBits = Literal["int4", "int8"]


class QuantizeRun(Section):
    """One model's weights quantized after training (round to nearest, symmetric, per group)."""

    model: str = Field(description="Model folder to quantize: any model of the pipeline (models/experts/<name>, "
                       "models/qat/<name>, ...) or a local one.")  # fmt: skip
    weight_dtype: QuantBits = Field("int4", description="The integer type of the weights.")
    group_size: QuantGroup = Field(32, description="Weights per scale along each row; must divide every input size.")


class QuantizeSettings(Section):
    """`quantize@<run>` stages: post-training quantization with torchao (python -m stages.quantize). Off by
    default: no runs."""

    runs: dict[Name, QuantizeRun] = Field(
        default_factory=dict, description="Run name -> model and scheme; each is a quantize@<name> stage, "
        "evaluated as quantized/<name>."
    )  # fmt: skip

    def paths(self, root: Path) -> dict[str, PathSetting]:
        return {f"runs.{name}.model": PathSetting(run.model) for name, run in self.runs.items()}


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = QuantizeSettings
