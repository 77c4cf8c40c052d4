"""`qat@<run>` stage: one expert trained with quantization-aware training (axolotl's `qat:`, torchao).

    python -m stages.qat --run addition --base-model models/pretrain --out models/qat/addition \
        --work .tmp/qat_addition --live metrics/runs/qat/addition \
        --metrics metrics/runs/qat/addition.json

Trained like an expert (the settings resolve the same way: sft, finetune.defaults, then
qat.runs.<run>; pipeline/sft.py does the training), except that axolotl swaps every linear layer
for torchao's FakeQuantizedLinear: the forward pass sees the weights rounded to int4 per group of
group_size (torchao's Int4WeightFakeQuantizer: each row first rounded to float8, then to 16 levels
per group), the backward pass goes straight through the rounding to the float weights. So the
model learns weights that lose little when rounded. The output head stays unrounded (the
FloatOutputHead plugin below), since the quantize stage does not quantize it either.

At the end axolotl converts the layers back to plain nn.Linear: the saved model holds the float
("latent") weights, a plain Llama folder. Quantize it with a `quantize` run of the same
weight_dtype and group_size (stages/quantize.py uses the same numerics) to get the model QAT
trained for, and compare with the plain expert quantized the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline import sft
from pipeline.atomic import write_json
from pipeline.settings.base import InputError
from pipeline.settings.qat import QATRun
from pipeline.settings.sft import SFTSettings, resolve_sft
from pipeline.stage import configure_environment, start

# The plugins of every SFT run (pipeline/sft.py's axolotl_config) and this stage's: the list replaces it.
PLUGINS = ["pipeline.axolotl_dvclive.DVCLivePlugin", "stages.qat.FloatOutputHead"]


def qat_config(run: QATRun, settings: SFTSettings, where: str) -> dict[str, Any]:
    """The axolotl keys of a QAT run (on top of the generated SFT config)."""
    if settings.adapter in sft.LORA_ADAPTERS:
        raise InputError(f"{where}.adapter is {settings.adapter}; QAT trains the full weights (axolotl refuses "
                         "QAT with an adapter): leave adapter unset")  # fmt: skip
    # weight-only: no activation_dtype; axolotl then fake-quantizes with torchao's Int4WeightFakeQuantizer
    qat = {"weight_dtype": run.weight_dtype, "group_size": run.group_size, "quantize_embedding": False}
    return {"qat": qat, "plugins": PLUGINS}


def check_base_model(base_model: str, run: QATRun, where: str) -> None:
    """group_size must divide the input size of every fake-quantized layer (before axolotl starts)."""
    from pipeline.quantization import check_group_size, model_skeleton  # imported here: torch (seconds)

    if not (Path(base_model) / "config.json").is_file():
        return  # a hub id or a missing folder: the finetune checks and axolotl say so
    check_group_size(model_skeleton(Path(base_model)), run.group_size, where)


def __getattr__(name: str) -> Any:
    """FloatOutputHead, the axolotl plugin, built on first use: axolotl's process imports it by name,
    while the stage itself never imports axolotl (9 s)."""
    if name != "FloatOutputHead":
        raise AttributeError(name)
    from axolotl.integrations.base import BasePlugin
    from axolotl.utils.logging import get_logger

    # named under axolotl's: axolotl's logging shows other packages' lines only from WARNING up
    log = get_logger("axolotl.stages.qat")

    class FloatOutputHead(BasePlugin):
        """Turn the output head back into a plain nn.Linear after axolotl's QAT preparation (torchao
        fake-quantizes every nn.Linear, the head included); runs after it (`post_model_load`). The
        weight stays the same Parameter, so a head tied to the embeddings stays tied."""

        def post_model_load(self, cfg: Any, model: Any) -> None:
            head = model.get_output_embeddings()
            if hasattr(head, "to_linear"):
                model.set_output_embeddings(head.to_linear())
            fake = [module for module in model.modules() if hasattr(module, "weight_fake_quantizer")]
            log.info("QAT: %d linear layers fake-quantized (%s), the output head kept float", len(fake),
                     fake[0].weight_fake_quantizer if fake else "none")  # fmt: skip

    globals()[name] = FloatOutputHead
    return FloatOutputHead


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run name (a key of qat.runs)")
    parser.add_argument("--base-model", required=True, help="model folder to start from")
    sft.add_output_arguments(parser)
    args = parser.parse_args(argv)
    stage = f"qat@{args.run}"
    params = start(stage)
    run = params.qat.runs[args.run]
    where = f"qat.runs.{args.run}"
    settings = resolve_sft(params.sft, params.finetune.defaults, run)
    extra_config = qat_config(run, settings, where)
    configure_environment()
    check_base_model(args.base_model, run, where)
    target = sft.Target("qat", args.run, stage, where, args.out, args.work, args.live)
    summary = sft.run(settings, args.base_model, Path(run.dataset), target,
                      replay_text=Path(params.finetune.replay_text), extra_config=extra_config)  # fmt: skip
    write_json(args.metrics, summary)


if __name__ == "__main__":
    main()
