"""The `compute` section: how every stage that computes with torch does it on a CPU."""

from __future__ import annotations

from pydantic import (
    Field,
)

from pipeline.settings.base import (
    Section,
)


class ComputeSettings(Section):
    """How every stage that computes with torch does it on a CPU (read by pipeline/stage.py).

    Both settings decide the bytes of the results, so every such stage declares this section.
    """

    portable_kernels: bool = Field(
        True,
        description="Run the AVX2 code paths of torch, MKL and oneDNN on every x86 CPU, so Intel (AVX-512) and "
        "AMD machines can compute the same bytes (slower where wider units exist: docs/how-to/reproducibility.md). "
        "false: each CPU's fastest kernels, bitwise repeatable on that machine only.",
    )
    threads: int | None = Field(
        2,
        ge=1,
        description="CPU threads per process (torch, OpenMP, MKL, tokenizers). Reductions split work by thread, so "
        "results depend on it. null: OMP_NUM_THREADS from the environment, else every core (divided among the "
        "processes under torchrun). Stages side by side (`dvc queue start -j 2`): docs/tutorials/gpus-and-machines.md.",
    )


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = ComputeSettings
