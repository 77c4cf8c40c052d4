"""The layers quantization rounds (every nn.Linear but the output head) and the check of a group
size against them, on a model skeleton (no weights read): for the quantize stage (stages/quantize.py)
and the qat stage (stages/qat.py), which checks its group size before training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.settings.base import InputError


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The layers the quantize stage quantizes, by name: every nn.Linear but the output head."""
    head = model.get_output_embeddings()
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}  # fmt: skip


def check_group_size(model: torch.nn.Module, group_size: int, where: str) -> None:
    """Raise InputError unless group_size divides the input size of every layer to quantize
    (works on a meta-device model: nothing is computed)."""
    sizes = sorted({layer.in_features for layer in quantized_linears(model).values()})
    if not sizes:
        raise InputError(f"{where}: the model has no linear layer to quantize (besides its output head)")
    if any(size % group_size for size in sizes):
        divisors = [d for d in range(1, sizes[0] + 1) if all(size % d == 0 for size in sizes)]
        raise InputError(
            f"{where}.group_size is {group_size}, which does not divide every linear layer's input size "
            f"({', '.join(map(str, sizes))}); use one of {', '.join(map(str, divisors[-6:]))}"
        )


def model_skeleton(folder: Path) -> torch.nn.Module:
    """The model of `folder` on the meta device (no weights read): for checks before work."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
