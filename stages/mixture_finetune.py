"""`dense@<run>` and `moe_finetune@<run>` stages: a model trained by axolotl on the experts' SFT mixture.

    python -m stages.mixture_finetune --kind dense --run multitask --start models/pretrain --mixture data/mixture \
        --out models/dense/multitask --work .tmp/dense_multitask \
        --live metrics/dense/multitask --metrics metrics/dense/multitask.json
    python -m stages.mixture_finetune --kind moe --run experts --start models/moe/experts --mixture data/mixture \
        --out models/moe_trained/experts --work .tmp/moe_experts \
        --live metrics/moe_finetune/experts --metrics metrics/moe_finetune/experts.json \
        --eval-sets data/eval --routing metrics/routing/moe_trained/experts.json

Every run trains on the same rows, the mixture stage's (stages/mixture.py), with the shared `sft`
settings, mixture.defaults' overrides and the run's own, through pipeline/sft.py, the experts'
code path. `dense` runs start from finetune.base_model (the step-matched dense baseline); `moe`
runs from a moe.variants MoE, in their mode: full (every weight), router (only the routers' gate
weights, through axolotl's `unfrozen_parameters`) or lora (LoRA on the attention projections,
merged at the end), with the router load-balancing loss when mixture.router_aux_loss_coef > 0. A
run without a mode follows the `adapter` setting (lora or qlora: lora, none: full); the lora mode
keeps qlora's 4-bit model.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pipeline import sft
from pipeline.atomic import write_json
from pipeline.mixture import MIXTURE_COUNTS, MIXTURE_ROWS
from pipeline.routing import routing_metrics
from pipeline.settings.base import InputError
from pipeline.settings.mixture import MixtureSettings, MoERun
from pipeline.settings.sft import SFTSettings, resolve_sft
from pipeline.stage import add_seed_argument, configure_environment, stage_name, start

log = logging.getLogger("stages.mixture_finetune")

# transformers' Mixtral names each layer's router `model.layers.<i>.mlp.gate`; axolotl escapes
# every '.' of the pattern itself (so they are written plain here)
ROUTER_PARAMETERS = r"^model.layers.\d+.mlp.gate.weight$"


def run_mode(run: MoERun, settings: SFTSettings) -> str:
    """The run's mode; left unset, it follows the SFT settings' adapter (lora or qlora: lora, none: full)."""
    return run.mode or ("lora" if settings.adapter in sft.LORA_ADAPTERS else "full")


def mode_settings(run: MoERun, defaults: SFTSettings) -> SFTSettings:
    """The run's SFT settings: `defaults` with its overrides, the adapter set by its mode. The lora
    mode keeps `adapter: qlora` (LoRA on the 4-bit model); full and router train unquantized weights."""
    settings = run.resolve(defaults)
    if run_mode(run, settings) != "lora":
        return settings.model_copy(update={"adapter": "none"})
    return settings if settings.adapter in sft.LORA_ADAPTERS else settings.model_copy(update={"adapter": "lora"})


def mode_config(run: MoERun, settings: MixtureSettings) -> dict[str, Any]:
    """axolotl keys for the run's mode and the router's load-balancing loss."""
    config: dict[str, Any] = {}
    if run.mode == "router":
        config["unfrozen_parameters"] = [ROUTER_PARAMETERS]
    if settings.router_aux_loss_coef > 0:
        # Mixtral adds router_aux_loss_coef x its load-balancing loss when it outputs router logits
        config["model_config"] = {"output_router_logits": True, "router_aux_loss_coef": settings.router_aux_loss_coef}
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("dense", "moe"), required=True, help="a dense run or a MoE run")
    parser.add_argument("--run", required=True, help="a key of mixture.dense_runs or mixture.moe_runs")
    start_model = parser.add_mutually_exclusive_group(required=True)
    start_model.add_argument("--start", help="the model folder to train")
    start_model.add_argument("--moe-variants", type=Path, help="moe: the folder of moe.variants' models; the run's "
                             "`moe` setting picks the one to train")  # fmt: skip
    parser.add_argument("--mixture", type=Path, required=True, help="the mixture stage's folder")
    sft.add_output_arguments(parser)
    parser.add_argument("--eval-sets", type=Path, help="moe: held-out questions, for the routing shares")
    parser.add_argument("--routing", type=Path, help="moe: JSON of skill -> layer -> share per expert")
    add_seed_argument(parser)
    args = parser.parse_args(argv)
    stage = stage_name(f"{'dense' if args.kind == 'dense' else 'moe_finetune'}@{args.run}", args.seed)
    params = start(stage)
    settings = params.mixture
    defaults = resolve_sft(params.sft, settings.defaults)
    if args.kind == "dense":
        where, kind = f"mixture.dense_runs.{args.run}", "dense"
        sft_settings, extra_config = settings.dense_runs[args.run].resolve(defaults), {}
    else:
        where, kind = f"mixture.moe_runs.{args.run}", "moe_trained"
        run = settings.moe_runs[args.run]
        sft_settings, extra_config = mode_settings(run, defaults), mode_config(run, settings)
        if args.moe_variants is not None:
            args.start = str(args.moe_variants / run.moe)
    if args.start is None:
        raise InputError("--moe-variants picks a MoE run's start; a dense run needs --start")
    if args.seed is not None:
        sft_settings = sft_settings.model_copy(update={"seed": args.seed})
    configure_environment()
    mixture, counts = args.mixture / MIXTURE_ROWS, json.loads((args.mixture / MIXTURE_COUNTS).read_text())
    log.info("training mixture: %s", ", ".join(f"{n} {c}" for n, c in counts.items()))
    target = sft.Target(kind, args.run, stage, where, args.out, args.work, args.live)
    summary = sft.run(sft_settings, args.start, mixture, target, replay_text=Path(params.finetune.replay_text),
                      extra_config=extra_config)  # fmt: skip
    if not summary:  # another machine of a several-machine run: the first one writes the outputs
        return
    summary.update({f"mixture/{name}": count for name, count in counts.items()})
    write_json(args.metrics, summary)
    if args.kind == "moe":
        write_json(args.routing, routing_metrics(args.out, args.eval_sets, built=Path(args.start)))


if __name__ == "__main__":
    main()
