"""Pretraining throughput that holds on a noisy machine: the stage's loop against a bare loop, and bf16.

    python -m bench.bench_pretrain                (or `make bench`; about 15 minutes at the defaults)
    python -m bench.bench_pretrain --repeats 9    (tighter medians)
    python -m bench.bench_pretrain --compile      (also the bare loop under torch.compile: minutes per run)
    python -m bench.bench_pretrain --quick        (a tiny model for a few steps: checks the script, no figures)

A bench-size Llama (hidden 256, 6 layers, MLP 1024, seq 256, 4096 tokens a step) trains on a 1 MB
default corpus, with the kernels and threads of params.yaml's `compute`:
1. stage: `stages.pretrain.run` (sampling, clipping, schedule, logging), timed by its own timing
   file: tokens/s per 10-step window (eval and checkpoint time excluded) and its measured peak;
2. bare: forward, loss, backward, AdamW step on the same model and batch shape, timed in the
   same 10-step windows;
3. bf16: the bare loop in fp32 and under bf16 autocast, on CPUs with bf16 units (native kernels:
   the portable AVX2 paths have no bf16 instructions).
Each run is a process of its own; its first window (warm-up) is dropped and its figure is the
median of the others. The two arms of a comparison alternate (A B, B A, A B, ...), --repeats pairs.

How to read it: each arm shows the median over runs with min-max (quartiles from 4 runs on).
A ratio is the ratio of the arms' medians; beside it the median, min and max of the ratios of
the pairs. When the pairs spread wider than the effect, the effect cannot be told from noise:
repeat more, or on a quieter machine. MFU = median tokens/s x FLOPs per token (6N + attention) /
the fp32 matmul peak (the median of the one each run measures). Targets (issue 3): stage
overhead <= 5%, judged on the median; MFU >= 40%.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.settings.base import PROJECT_ROOT
from pipeline.settings.compute import ComputeSettings
from pipeline.settings.data import WorldSettings
from pipeline.settings.params_file import load_params
from pipeline.settings.pretrain import ModelSettings, PretrainSettings
from pipeline.settings.tokenize import TokenizeSettings
from pipeline.stage import configure_compute, configure_environment
from stages import data, tokenize

# torch is imported only inside a measurement process, after configure_compute: the kernel
# variables count only when they are set before torch's first operation.

BENCH_MODEL = ModelSettings(
    hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=8, intermediate_size=1024, max_position_embeddings=256
)
QUICK_MODEL = ModelSettings(
    hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256, max_position_embeddings=64
)
OVERHEAD_TARGET, MFU_TARGET = 0.05, 0.40
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def window_steps(quick: bool) -> int:
    return 2 if quick else 10


def bench_settings(steps: int, quick: bool) -> PretrainSettings:
    seq_len, micro_batch_size = (64, 4) if quick else (256, 16)
    return PretrainSettings(
        model=QUICK_MODEL if quick else BENCH_MODEL,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        batch_tokens=micro_batch_size * seq_len,
        max_steps=steps,
        warmup_steps=min(5, steps - 1),
        log_interval=window_steps(quick),
        eval_interval=10_000,
        eval_max_batches=1,
        checkpoint_interval=10_000,
        sample_prompts=["The"],
        sample_max_new_tokens=1,
    )


def prepare_data(root: Path, quick: bool) -> Path:
    """The default corpus, smaller, tokenized by the stages themselves (no torch in this process)."""
    params = load_params()
    world = WorldSettings(corpus_megabytes=0.2 if quick else 1.0)
    data.run(params.data.model_copy(update={"world": world}), root / "corpus", root / "sft", root / "eval")
    tokenize.run(TokenizeSettings(), root / "corpus", root / "tokenizer", root / "tokens")
    return root


# One measurement, in a process of its own


def measure(spec: dict[str, Any]) -> None:
    """Fix kernels and threads, train as `spec` says, and write the figures to spec["result"]."""
    configure_environment()
    configure_compute(ComputeSettings(portable_kernels=spec["portable_kernels"], threads=spec["threads"]))
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from stages import pretrain

    root = Path(spec["data"])
    settings = bench_settings(spec["steps"], spec["quick"])
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    model = pretrain.build_model(settings.model, tokenizer)
    figures = {
        "flops_per_token": pretrain.flops_per_token(settings.model, model, settings.seq_len),
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "kernels": torch.backends.cpu.get_cpu_capability(),
    }
    del model
    if spec["arm"] == "stage":
        with tempfile.TemporaryDirectory() as tmp:  # fresh checkpoints: a run must never resume another's
            out = Path(tmp)
            outputs = pretrain.Outputs(
                out / "model", out / "ckpt", out / "live", out / "samples.md", out / "timing.json"
            )
            pretrain.run(settings, root / "tokens", root / "tokenizer", outputs)
            timing = json.loads(outputs.timing_path.read_text())
        windows, peak = [row["tokens_per_second"] for row in timing["log"]], timing["peak_flops"]
    else:
        peak = pretrain.measure_peak_flops(torch.device("cpu"), torch.float32)
        meta = json.loads((root / "tokens/meta.json").read_text())
        tokens = np.memmap(root / "tokens/train.bin", dtype=meta["dtype"], mode="r")
        windows, loss, digest = bare_loop(settings, tokenizer, tokens, spec["precision"], spec["compile"])
        figures |= {"loss": loss, "digest": digest}
    tokens_per_second = statistics.median(windows[1:])  # the first window holds the warm-up
    figures |= {"tokens_per_second": tokens_per_second, "peak_flops": peak}
    Path(spec["result"]).write_text(json.dumps(figures))


def bare_loop(
    settings: PretrainSettings, tokenizer: Any, tokens: Any, precision: str, compile_model: bool
) -> tuple[list[float], float, str]:
    """Forward, loss, backward, AdamW step on one fixed batch, timed per window of log_interval steps.

    Returns tokens/s per window, the final loss, and a digest of the final weights and loss bytes.
    """
    import torch

    from stages import pretrain

    torch.manual_seed(settings.seed)
    model = pretrain.build_model(settings.model, tokenizer)
    optimizer = pretrain.build_optimizer(model, settings)
    step_model = torch.compile(model) if compile_model else model
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    sampler = pretrain.BatchSampler(tokens, settings.seq_len, "windows", special, settings.seed)
    inputs, targets = sampler.next_batch(settings.micro_batch_size)
    windows, started = [], time.perf_counter()
    for step in range(1, settings.max_steps + 1):
        with autocast():
            loss = pretrain.causal_lm_loss(step_model(input_ids=inputs).logits, targets)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % settings.log_interval == 0:
            windows.append(settings.log_interval * settings.batch_tokens / (time.perf_counter() - started))
            started = time.perf_counter()
    digest = hashlib.sha256(loss.detach().numpy().tobytes())
    for _, tensor in sorted(model.state_dict().items()):
        digest.update(tensor.detach().float().numpy().tobytes())
    return windows, float(loss), digest.hexdigest()[:16]


# Interleaved runs and their statistics


def run_measurement(spec: dict[str, Any]) -> dict[str, Any]:
    handle, result = tempfile.mkstemp(suffix=".json", dir=spec["data"])
    os.close(handle)
    command = [sys.executable, "-m", "bench.bench_pretrain", "--measure", json.dumps({**spec, "result": result})]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: a measurement failed ({spec}):\n{done.stderr[-3000:]}")
    return json.loads(Path(result).read_text())


def interleaved(arms: dict[str, dict[str, Any]], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Each of two arms `repeats` times, one process per run, alternating: A B, B A, A B, ...

    A fresh process per run is the honest unit: every run starts from the same state (no caches,
    allocator or thread pools warmed by the other arm), and the kernel variables must be set
    before torch starts anyway; its seconds of imports fall outside the timed windows. Reversing
    the order in every other pair keeps a slow drift (another job starting, a CPU clocking down)
    from always landing on the same arm, and each pair's ratio compares two runs minutes apart
    rather than two series a quarter of an hour apart.
    """
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for repeat in range(repeats):
        for name in list(arms) if repeat % 2 == 0 else list(reversed(arms)):
            results[name].append(run_measurement(arms[name]))
            print(f"  pair {repeat + 1}/{repeats}  {name:14} {results[name][-1]['tokens_per_second']:8.0f} tokens/s",
                  flush=True)  # fmt: skip
    return results


def spread(values: list[float], unit: str = "tokens/s") -> str:
    """Median (min-max, and the quartiles from 4 values on)."""
    text = f"median {statistics.median(values):8.0f} {unit} (min-max {min(values):.0f}-{max(values):.0f}"
    if len(values) >= 4:
        low, _, high = statistics.quantiles(values, n=4)
        text += f", IQR {low:.0f}-{high:.0f}"
    return text + f", n={len(values)})"


def tokens_per_second(runs: list[dict[str, Any]]) -> list[float]:
    return [run["tokens_per_second"] for run in runs]


def compare(slow: list[dict[str, Any]], fast: list[dict[str, Any]]) -> tuple[float, list[float]]:
    """fast/slow - 1 as the ratio of the medians, and per pair (runs i of both arms)."""
    effect = statistics.median(tokens_per_second(fast)) / statistics.median(tokens_per_second(slow)) - 1
    return effect, [f["tokens_per_second"] / s["tokens_per_second"] - 1 for s, f in zip(slow, fast, strict=True)]


def print_comparison(label: str, effect: float, pairs: list[float]) -> None:
    print(f"{label}: {effect:+.1%} (ratio of medians); per pair median {statistics.median(pairs):+.1%}, "
          f"min {min(pairs):+.1%}, max {max(pairs):+.1%}")  # fmt: skip
    width = max(pairs) - min(pairs)
    if width > abs(effect):
        sign = "; the pairs disagree even on its sign" if min(pairs) < 0 < max(pairs) else ""
        print(f"  the pairs spread over {width:.1%}, wider than the effect ({effect:+.1%}): its size is not "
              f"established{sign}. More --repeats or a quieter machine narrow it")  # fmt: skip


def mfu(runs: list[dict[str, Any]], peak: float) -> float:
    return statistics.median(tokens_per_second(runs)) * runs[0]["flops_per_token"] / peak


def print_arm(name: str, runs: list[dict[str, Any]], peak: float | None = None) -> None:
    """The arm's tokens/s; its MFU against `peak` when given."""
    kernels = "/".join(sorted({run["kernels"] for run in runs}))
    line = f"  {name:14} {spread(tokens_per_second(runs))}"
    if peak:
        line += f"   MFU {mfu(runs, peak):5.1%}"
    print(f"{line}   [{kernels} kernels, {runs[0]['threads']} threads]")


def machine() -> str:
    """lscpu's model name and the CPU count."""
    found = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in found.splitlines() if line.startswith("Model name:")]
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} CPUs"


def bf16_units() -> list[str]:
    """The bf16 instruction-set flags of /proc/cpuinfo this CPU has (none: autocast emulates bf16)."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    return [flag for flag in BF16_FLAGS if flag in flags]


def run_settings(args: argparse.Namespace) -> tuple[int, int]:
    """(repeats, steps) from the arguments, checked: every run needs a window after the warm-up one."""
    window = window_steps(args.quick)
    repeats = args.repeats or (2 if args.quick else 5)
    steps = args.steps or (3 * window if args.quick else 4 * window)
    if steps % window or steps < 2 * window:
        raise SystemExit(f"error: --steps must be a multiple of the {window}-step window and at least {2 * window}")
    return repeats, steps


def parse_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, help="runs of each arm (default 5; 2 with --quick)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 40; 6 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run, not figures")
    return parser


def main() -> None:
    parser = parse_arguments(__doc__.split("\n")[0])
    parser.add_argument("--compile", action="store_true", help="also the bare loop under torch.compile")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one run, in the process the parent started
    args = parser.parse_args()
    if args.measure:
        measure(json.loads(args.measure))
        return
    repeats, steps = run_settings(args)
    compute = load_params().compute
    settings = bench_settings(steps, args.quick)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at the start")
    kernels = "portable" if compute.portable_kernels else "native"
    print(f"compute (params.yaml): {kernels} kernels, {compute.threads or 'all'} threads; {repeats} runs per arm "
          f"of {steps} steps x {settings.batch_tokens} tokens, in {settings.log_interval}-step windows "
          "(first dropped)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = prepare_data(Path(tmp), args.quick)
        base = {"data": str(root), "steps": steps, "quick": args.quick, "threads": compute.threads,
                "portable_kernels": compute.portable_kernels, "precision": "fp32", "compile": False}  # fmt: skip
        loops = interleaved({"stage loop": {**base, "arm": "stage"}, "bare loop": {**base, "arm": "bare"}}, repeats)
        compiled = None
        if args.compile:
            compiled = interleaved({"bare loop": {**base, "arm": "bare"},
                                    "bare + compile": {**base, "arm": "bare", "compile": True}}, repeats)  # fmt: skip
        units = bf16_units()
        precisions = None
        if units:
            native = {**base, "arm": "bare", "portable_kernels": False}
            precisions = interleaved({"bare fp32": native, "bare bf16": {**native, "precision": "bf16"}}, repeats)

    stage, bare = loops["stage loop"], loops["bare loop"]
    # One peak for both arms: the median of every run's measurement, as a peak measured while
    # another job ran would be low and inflate that run's MFU.
    peak = statistics.median(run["peak_flops"] for run in stage + bare)
    print(f"\nmodel: {stage[0]['parameters'] / 1e6:.2f}M parameters, {stage[0]['flops_per_token'] / 1e6:.1f} "
          f"MFLOP/token; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (median); load average "
          f"{os.getloadavg()[0]:.2f} at the end")  # fmt: skip
    print_arm("stage loop", stage, peak)
    print_arm("bare loop", bare, peak)
    effect, pairs = compare(stage, bare)
    print_comparison("stage overhead over the bare loop", effect, pairs)
    above = sum(pair > OVERHEAD_TARGET for pair in pairs)
    print(f"  target <= +{OVERHEAD_TARGET:.0%} on the median: {'met' if effect <= OVERHEAD_TARGET else 'NOT met'} "
          f"({above} of {len(pairs)} pairs above it)")  # fmt: skip
    stage_mfu = mfu(stage, peak)
    print(f"MFU of the stage loop: {stage_mfu:.1%} median (target >= {MFU_TARGET:.0%}: "
          f"{'met' if stage_mfu >= MFU_TARGET else 'NOT met'})")  # fmt: skip
    if compiled:
        print_arm("bare + compile", compiled["bare + compile"], peak)
        effect, pairs = compare(compiled["bare loop"], compiled["bare + compile"])
        print_comparison("torch.compile speed-up of the bare loop", effect, pairs)
    if precisions:
        print(f"bf16 units: {', '.join(units)}; native kernels for both arms")
        print_arm("bare fp32", precisions["bare fp32"])
        print_arm("bare bf16", precisions["bare bf16"])
        print_comparison("bf16 autocast speed-up", *compare(precisions["bare fp32"], precisions["bare bf16"]))
    else:
        flags = " or ".join(BF16_FLAGS)
        print(f"bf16 autocast speed-up: not applicable (no {flags} in /proc/cpuinfo: bf16 would be emulated)")


if __name__ == "__main__":
    main()
