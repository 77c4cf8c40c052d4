"""`finetune@<expert>` stage: one SFT expert, trained by axolotl from a generated config.

    python -m stages.finetune --expert addition --base-model models/pretrain \
        --out models/experts/addition --work .tmp/addition \
        --live metrics/finetune/addition --metrics metrics/finetune/addition.json

The expert's settings are the shared `sft` ones, with finetune.defaults' and then
finetune.experts.<expert>'s overrides; the
training itself is pipeline/sft.py (shared with the dense baseline and the MoE runs): a
generated axolotl config saved with the model, row checks, dvclive curves, atomic output, and
`replay_rows` passages of finetune.replay_text mixed in to keep the general text ability.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import sft
from pipeline.atomic import write_json
from pipeline.settings.sft import resolve_sft
from pipeline.stage import add_seed_argument, configure_environment, stage_name, start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--expert", required=True, help="expert name (a key of finetune.experts)")
    parser.add_argument("--base-model", required=True, help="model folder to start from")
    sft.add_output_arguments(parser)
    add_seed_argument(parser)
    args = parser.parse_args(argv)
    stage = stage_name(f"finetune@{args.expert}", args.seed)
    params = start(stage)
    expert = params.finetune.experts[args.expert]
    target = sft.Target("expert", args.expert, stage, f"finetune.experts.{args.expert}", args.out, args.work, args.live)
    configure_environment()
    settings = resolve_sft(params.sft, params.finetune.defaults, expert)
    if args.seed is not None:
        settings = settings.model_copy(update={"seed": args.seed})
    summary = sft.run(settings, args.base_model, Path(expert.dataset), target,
                      replay_text=Path(params.finetune.replay_text))  # fmt: skip
    write_json(args.metrics, summary)


if __name__ == "__main__":
    main()
