"""`quantize@<run>` stage: post-training quantization of one model's linear weights with torchao.

    python -m stages.quantize --run addition_int4 --out models/quantized/addition_int4 \
        --metrics metrics/runs/quantize/addition_int4.json

Every nn.Linear of the model except the output head (tied to the embeddings here) has its weight
rounded to weight_dtype, symmetric, with one scale per group of group_size weights along each row
(the input dimension); embeddings, norms and the head stay as they are. The numerics are exactly
those of torchao's QAT fake quantizers, so that a `qat` run trains against the very rounding it
gets here (tests/test_quantize.py checks the tensors are equal):

- int4: `Int4WeightFakeQuantizer`, what axolotl's `qat: {weight_dtype: int4}` trains with: each
  row is first rounded to float8 e4m3 (one scale per row), then per group scale = max|w| / 8 and
  codes round(w / scale) clamped to [-8, 7];
- int8: `IntxFakeQuantizer` (symmetric, per group): scale = max|w| / 127.5, codes in [-128, 127].

The output is the quantize-dequantize ("fake-quantized") model: a plain float model (safetensors)
whose linear weights are code x scale, so the eval stage scores it with the same tasks and
intervals as every model. It measures the quality cost of the quantized weights, exactly; it does
not save memory. The metrics JSON says what the real weights would weigh (`bytes/*`: the codes at
4 or 8 bits plus one scale per group, against the float weights) and how far each weight moved
(`weight_error/*`: RMS(w_quantized - w) / RMS(w) per layer, mean and max); quantization.json in
the model folder has the per-layer figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_dir, write_json
from pipeline.lineage import json_block, model_id, render_card, write_lineage
from pipeline.quantization import check_group_size, model_skeleton, quantized_linears
from pipeline.settings.base import InputError
from pipeline.settings.quantize import QuantizeRun
from pipeline.sft import MODEL_FILES
from pipeline.stage import configure_environment, start

log = logging.getLogger("stages.quantize")

BITS = {"int4": 4, "int8": 8}
FP8_ROW_SCALE_FLOOR = 1e-12  # as Int4WeightFakeQuantizer (torchao 0.17)
INT4_SCALE_FLOOR = 1e-6  # as Int4WeightFakeQuantizer (torchao 0.17)


def quantize_weight(
    weight: torch.Tensor, weight_dtype: str, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, dequantized weight) of a [out, in] weight, with the numerics of torchao's
    QAT fake quantizer for weight_dtype; the dequantized weight is codes x scale, in weight's dtype."""
    from torchao.quantization.quant_primitives import _do_fake_quantize_affine

    if weight_dtype == "int4":
        # Int4WeightFakeQuantizer._fp8_activations_forward (axolotl's int4 QAT), step by step
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quant_primitives import (
            _choose_scale_float8,
            _dequantize_affine_float8,
            _quantize_affine_float8,
        )
        from torchao.quantization.utils import get_block_size

        fp8 = torch.float8_e4m3fn
        row_scale = _choose_scale_float8(weight, get_block_size(weight.shape, PerRow()), fp8,
                                         hp_value_lb=FP8_ROW_SCALE_FLOOR)  # fmt: skip
        rounded = _dequantize_affine_float8(_quantize_affine_float8(weight, row_scale, fp8), row_scale, weight.dtype)
        groups = rounded.view(rounded.shape[0], -1, group_size)
        scales = torch.clamp(groups.abs().amax(dim=-1) / 8, min=INT4_SCALE_FLOOR)
        codes, dequantized = _do_fake_quantize_affine(rounded, (1, group_size), scales, torch.zeros_like(scales),
                                                      torch.int8, -8, 7)  # fmt: skip
    else:
        # IntxFakeQuantizer._per_channel_or_group_forward with IntxFakeQuantizeConfig(torch.int8, group_size=...)
        from torchao.quantization.qat.fake_quantize_config import IntxFakeQuantizeConfig
        from torchao.quantization.utils import get_group_qparams_symmetric

        config = IntxFakeQuantizeConfig(torch.int8, group_size=group_size)
        scales, zeros = get_group_qparams_symmetric(weight, 8, group_size, config.scale_precision, eps=config.eps)
        zeros = zeros.to(config.zero_point_precision)
        codes, dequantized = _do_fake_quantize_affine(weight, (1, group_size), scales, zeros, torch.int32, -128, 127)
    return codes.round().to(torch.int8), scales, dequantized.to(weight.dtype)


def relative_rms_error(original: torch.Tensor, quantized: torch.Tensor) -> float:
    original, quantized = original.double(), quantized.double()
    return float((quantized - original).pow(2).mean().sqrt() / original.pow(2).mean().sqrt().clamp_min(1e-30))


@torch.no_grad()
def quantize_model(model: torch.nn.Module, weight_dtype: str, group_size: int) -> dict[str, Any]:
    """Replace every quantized layer's weight by its dequantized one, in place; return per-layer
    figures and the byte counts of the real weights."""
    layers, float_bytes, packed_bytes = {}, 0, 0
    for name, layer in quantized_linears(model).items():
        weight = layer.weight.data
        codes, scales, dequantized = quantize_weight(weight, weight_dtype, group_size)
        layers[name] = {"relative_rms_error": round(relative_rms_error(weight, dequantized), 6),
                        "parameters": weight.numel()}  # fmt: skip
        float_bytes += weight.numel() * weight.element_size()
        packed_bytes += codes.numel() * BITS[weight_dtype] // 8 + scales.numel() * scales.element_size()
        layer.weight.data.copy_(dequantized)
    # every tensor once: tied embeddings and head count once
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    errors = [layer["relative_rms_error"] for layer in layers.values()]
    summary = {
        "layers": len(layers),
        "parameters/quantized": sum(layer["parameters"] for layer in layers.values()),
        "parameters/total": sum(p.numel() for p in model.parameters()),
        "bytes/linear_float": float_bytes,
        "bytes/linear_quantized": packed_bytes,
        "bytes/model_float": model_bytes,
        "bytes/model_quantized": model_bytes - float_bytes + packed_bytes,
        "weight_error/relative_rms_mean": round(sum(errors) / len(errors), 6),
        "weight_error/relative_rms_max": max(errors),
    }
    return {"summary": summary, "layers": layers}


def run(settings: QuantizeRun, name: str, stage: str, out: Path) -> dict[str, Any]:
    """Quantize settings.model into `out` (a plain float model folder); return the summary metrics."""
    from transformers import AutoModelForCausalLM

    where = f"quantize.runs.{name}"
    source = Path(settings.model)
    if not (source / "config.json").is_file():
        raise InputError(f"{where}.model: {source} is not a model folder (no config.json)")
    check_group_size(model_skeleton(source), settings.group_size, where)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    log.info("quantizing %s to %s, groups of %d", source, settings.weight_dtype, settings.group_size)
    figures = quantize_model(model, settings.weight_dtype, settings.group_size)
    summary = figures["summary"]
    log.info("%d layers, weight error (relative RMS) %.4f mean, %.4f max; %d -> %d bytes",
             summary["layers"], summary["weight_error/relative_rms_mean"], summary["weight_error/relative_rms_max"],
             summary["bytes/model_float"], summary["bytes/model_quantized"])  # fmt: skip
    scheme = settings.model_dump(mode="json")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for file_name in MODEL_FILES:  # the tokenizer (config files are written by save_pretrained)
            if (source / file_name).is_file() and not (tmp / file_name).exists():
                shutil.copy2(source / file_name, tmp / file_name)
        (tmp / "quantization.json").write_text(json.dumps({**scheme, **figures}, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(name, stage, scheme, summary))
        write_lineage(tmp, "quantized", name, stage, [model_id(source)], scheme)
    return summary


def model_card(name: str, stage: str, scheme: dict[str, Any], summary: dict[str, Any]) -> str:
    intro = f"""Made by this project's `{stage}` stage: `{scheme["model"]}` with every linear layer but the
output head quantized to {scheme["weight_dtype"]} (symmetric, one scale per {scheme["group_size"]} weights of a
row; torchao's QAT numerics) and saved dequantized, as a plain float model: it has the quality of
the quantized weights, not their size (`bytes/model_quantized` is what they would weigh).
Per-layer errors: `quantization.json`."""
    return render_card(f"`quantized/{name}`", intro, {"Scheme": json_block(scheme), "Metrics": json_block(summary)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run name (a key of quantize.runs)")
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--metrics", type=Path, required=True, help="summary JSON (a DVC metric)")
    args = parser.parse_args(argv)
    stage = f"quantize@{args.run}"
    params = start(stage)
    configure_environment()
    summary = run(params.quantize.runs[args.run], args.run, stage, args.out)
    write_json(args.metrics, summary)


if __name__ == "__main__":
    main()
