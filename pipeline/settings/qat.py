"""The `qat` section: quantization-aware training runs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
)

from pipeline.settings.base import (
    SFT_DATASET_SUFFIXES,
    Name,
    PathSetting,
    QuantGroup,
    Section,
)
from pipeline.settings.finetune import ExpertSettings


class QATRun(ExpertSettings):
    """One expert trained with quantization-aware training: axolotl fake-quantizes its linear weights."""

    # axolotl 0.19 fake-quantizes int4 weights only ("Int8WeightOnlyConfig is not supported by torchao QAT")
    weight_dtype: Literal["int4"] = Field("int4", description="The integer type the weights are fake-quantized to.")
    group_size: QuantGroup = Field(32, description="Weights per quantization scale, along each row.")


class QATSettings(Section):
    """`qat@<run>` stages: experts trained with axolotl's quantization-aware training (torchao), to be quantized
    afterwards by a `quantize` run (python -m stages.qat). Off by default: no runs."""

    runs: dict[Name, QATRun] = Field(
        default_factory=dict,
        description="Run name -> dataset, quantization and overrides (resolved like an expert's); each is a "
        "qat@<name> stage, evaluated as qat/<name>.",
    )

    def paths(self, root: Path) -> dict[str, PathSetting]:
        return {
            f"runs.{name}.dataset": PathSetting(run.dataset, SFT_DATASET_SUFFIXES) for name, run in self.runs.items()
        }


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = QATSettings
