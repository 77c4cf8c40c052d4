"""`moe_finetune@<run>` stage: the MoE trained by axolotl on a mixture of the experts' SFT data.

    python -m stages.moe_finetune --run full --moe models/moe --out models/moe_trained/full \
        --work models/.finetune_work/moe_full --live metrics/moe_finetune/full \
        --metrics metrics/moe_finetune/full.json --eval-sets data/eval --routing metrics/routing/moe_full.json

The mixture draws moe_finetune.mixture_rows rows from the experts' datasets in the proportions of
moe_finetune.mixture (seeded). Training goes through the finetune stage's code (same generated,
saved axolotl config, dvclive curves, row checks, atomic output) with the run's mode:
full (every weight), router (only the routers' gate weights, through axolotl's
`unfrozen_parameters`) or lora (LoRA on the attention projections, merged at the end). The router
load-balancing loss is on when moe_finetune.router_aux_loss_coef > 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json
from pipeline.params import MoEFinetuneSettings, MoERun, SFTSettings
from pipeline.stage import configure_environment, start
from stages import finetune
from stages.moe import EXPERT_NAMES, routing_fractions

log = logging.getLogger("stages.moe_finetune")

# transformers' Mixtral names each layer's router `model.layers.<i>.mlp.gate`; axolotl escapes
# every '.' of the pattern itself (so they are written plain here)
ROUTER_PARAMETERS = r"^model.layers.\d+.mlp.gate.weight$"


def write_mixture(settings: MoEFinetuneSettings, datasets: dict[str, Path], seed: int, out: Path) -> dict[str, int]:
    """Draw the training mixture into `out` (jsonl); return rows per expert."""
    from datasets import load_dataset

    weights = settings.mixture or dict.fromkeys(datasets, 1.0)
    total = sum(weights.values())
    counts = {name: round(settings.mixture_rows * weight / total) for name, weight in weights.items() if weight > 0}
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for name, count in counts.items():
        path = datasets[name]
        messages = load_dataset(finetune.dataset_format(path), data_files=str(path), split="train")["messages"]
        # with replacement only when the mixture asks for more rows than the dataset has
        picks = (
            rng.sample(range(len(messages)), count)
            if count <= len(messages)
            else rng.choices(range(len(messages)), k=count)
        )
        rows.extend({"messages": messages[i]} for i in picks)
    rng.shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return counts


def mode_settings(run: MoERun, defaults: SFTSettings) -> SFTSettings:
    settings = run.resolve(defaults)
    return settings.model_copy(update={"adapter": "lora" if run.mode == "lora" else "none"})


def mode_config(run: MoERun, settings: MoEFinetuneSettings) -> dict[str, Any]:
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
    parser.add_argument("--run", required=True, help="a key of moe_finetune.runs")
    parser.add_argument("--moe", required=True, help="the MoE model folder to train")
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for axolotl's own outputs")
    parser.add_argument("--live", type=Path, required=True, help="dvclive folder (curves)")
    parser.add_argument("--metrics", type=Path, required=True, help="summary JSON (a DVC metric)")
    parser.add_argument("--eval-sets", type=Path, required=True, help="held-out questions, for the routing shares")
    parser.add_argument("--routing", type=Path, required=True, help="JSON: skill -> layer -> share per expert")
    args = parser.parse_args(argv)
    params = start(f"moe_finetune@{args.run}")
    settings = params.moe_finetune
    run = settings.runs[args.run]
    sft = mode_settings(run, settings.defaults)
    datasets = {name: Path(expert.dataset) for name, expert in params.finetune.experts.items()}
    configure_environment()
    mixture = args.work.parent / f"{args.work.name}_mixture.jsonl"
    counts = write_mixture(settings, datasets, sft.seed, mixture)
    log.info("training mixture: %s", ", ".join(f"{n} {c}" for n, c in counts.items()))
    summary = finetune.run(
        sft, args.run, args.moe, mixture, args.out, args.work, args.live,
        where=f"moe_finetune.runs.{args.run}", extra_config=mode_config(run, settings),
        stage=f"moe_finetune@{args.run}", card_title=f"Trained MoE `{args.run}` ({run.mode})",
    )  # fmt: skip
    mixture.unlink()
    summary.update({f"mixture/{name}": count for name, count in counts.items()})
    write_json(args.metrics, summary)
    names = json.loads((Path(args.moe) / EXPERT_NAMES).read_text())
    write_json(args.routing, {"experts": names, "skills": routing_fractions(args.out, args.eval_sets)})


if __name__ == "__main__":
    main()
