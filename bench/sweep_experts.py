"""Expert recipes side by side: how well each SFT setting teaches a skill and what it costs.

    python -m bench.sweep_experts --experts addition --set max_steps=400,600 --set replay_rows=0,1000

Needs `dvc repro pretrain` first (it starts from finetune.base_model and reads data/). For each
combination of the --set values (applied over the `sft` settings, finetune.defaults and the expert's own settings)
it trains the expert through the finetune stage's code (real axolotl), evaluates it with the
eval stage (real lm-eval) and prints one markdown row: its own skill's exact match, the best of
the other skills, story completion, held-out word perplexity and the wall time. This is the
measurement behind the default expert recipe in params.yaml (docs/design/results.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import sft
from pipeline.settings.base import PROJECT_ROOT
from pipeline.settings.params_file import load_params
from pipeline.settings.sft import resolve_sft
from pipeline.stage import configure_environment


def parse_grid(pairs: list[str]) -> dict[str, list]:
    grid = {}
    for pair in pairs:
        key, _, values = pair.partition("=")
        grid[key] = [json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
                     for value in values.split(",")]  # fmt: skip
    return grid


def evaluate(model: Path, work: Path, expert: str) -> dict[str, float]:
    metrics = work / "metrics.json"
    subprocess.run(
        [sys.executable, "-m", "stages.eval", "--stage", "eval@pretrain", "--name", f"expert/{expert}",
         "--model", str(model), "--eval-sets", "data/eval", "--corpus", "data/corpus",
         "--raw", str(work / "raw"), "--metrics", str(metrics)],
        check=True, cwd=PROJECT_ROOT, capture_output=True,
    )  # fmt: skip
    return json.loads(metrics.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", nargs="+", default=["addition"])
    parser.add_argument("--set", action="append", default=[], help="SETTING=V1,V2,... (an SFT setting)")
    args = parser.parse_args()
    params = load_params()
    configure_environment()
    grid = parse_grid(args.set)
    skills = list(params.finetune.experts)
    print("| expert | " + " | ".join(grid) + " | own skill EM | best other EM | stories acc | word ppl | seconds |")
    print("| --- |" + " ---: |" * (len(grid) + 5))
    for expert, values in itertools.product(args.experts, itertools.product(*grid.values())):
        overrides = dict(zip(grid, values, strict=True))
        recipe = resolve_sft(params.sft, params.finetune.defaults, params.finetune.experts[expert])
        settings = recipe.model_copy(update=overrides)
        work = Path(tempfile.mkdtemp(prefix="sweep-", dir=PROJECT_ROOT / "models"))
        try:
            started = time.perf_counter()
            target = sft.Target("expert", expert, f"finetune@{expert}", f"finetune.experts.{expert}",
                                work / "model", work / "axolotl", work / "live")  # fmt: skip
            sft.run(settings, params.finetune.base_model, Path(params.finetune.experts[expert].dataset), target,
                    replay_text=Path(params.finetune.replay_text))  # fmt: skip
            seconds = time.perf_counter() - started
            metrics = evaluate(work / "model", work, expert)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        others = max(metrics.get(f"{s}/exact_match", 0) for s in skills if s != expert)
        print(f"| {expert} | " + " | ".join(str(v) for v in values)
              + f" | {metrics[f'{expert}/exact_match']:.3f} | {others:.3f} | {metrics['stories/acc']:.3f}"
              f" | {metrics['perplexity/word_perplexity']:.4g} | {seconds:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
