"""Where an expert's fine-tuning time goes: axolotl start-up, data preparation, training steps.

    python -m bench.bench_finetune [--expert NAME]   (or `make bench`; needs `make run` first for the base model)

Runs one expert's generated axolotl config (the first of finetune.experts: `addition` by default)
three ways: importing axolotl's CLI alone (start-up), `axolotl.cli.preprocess` (start-up +
tokenizing the dataset), and `axolotl.cli.train` (start-up + loading the prepared data + model
load + steps + save), and reads the trainer's own `train_runtime` for the steps.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

from pipeline import sft
from pipeline.settings.base import PROJECT_ROOT
from pipeline.settings.params_file import load_params
from pipeline.settings.sft import resolve_sft
from pipeline.stage import configure_environment


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, result.stdout + result.stderr


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert", help="a key of finetune.experts (default: the first)")
    args = parser.parse_args(argv)
    configure_environment()
    params = load_params()
    name = args.expert or next(iter(params.finetune.experts))
    if name not in params.finetune.experts:
        raise SystemExit(f"error: no expert {name!r} in finetune.experts ({', '.join(params.finetune.experts)})")
    expert = params.finetune.experts[name]
    settings = resolve_sft(params.sft, params.finetune.defaults, expert)
    base = params.finetune.base_model
    if not (PROJECT_ROOT / base / "config.json").is_file():
        raise SystemExit(f"error: {base} is missing: run `make run` first")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = sft.axolotl_config(settings, base, expert.dataset, work, sft.use_bf16(settings))
        config["plugins"] = []  # time axolotl alone
        config_path = work / "axolotl.yaml"
        with open(config_path, "w") as handle:
            YAML().dump(config, handle)
        python = sys.executable
        startup, _ = timed([python, "-c", "import axolotl.cli.train, axolotl.train"])
        preprocess, _ = timed([python, "-m", "axolotl.cli.preprocess", str(config_path)])
        train, log = timed([python, "-m", "axolotl.cli.train", str(config_path)])
    steps = float(re.search(r"'train_runtime': '?([\d.]+)", log).group(1))
    print(f"expert {name!r}: {settings.max_steps} steps, micro-batch {settings.micro_batch_size}, "
          f"sequence_len {settings.sequence_len}")  # fmt: skip
    load_and_save = train - startup - steps  # the train run found the data already prepared
    print(f"axolotl start-up (imports)     : {startup:6.1f} s")
    print(f"data preparation (tokenizing)  : {preprocess - startup:6.1f} s")
    print(f"training steps (trainer time)  : {steps:6.1f} s  ({settings.max_steps / steps:.1f} steps/s)")
    print(f"model load, eval, save         : {load_and_save:6.1f} s")
    print(f"one expert in the stage        : {startup + (preprocess - startup) + steps + load_and_save:6.1f} s")


if __name__ == "__main__":
    main()
