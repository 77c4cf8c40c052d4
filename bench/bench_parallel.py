"""Two stage processes side by side (`dvc queue start -j 2`): threads per process and OpenMP's wait policy.

    python -m bench.bench_parallel                 (or `make bench`; about 10 minutes at the defaults)
    python -m bench.bench_parallel --repeats 5     (tighter medians)
    python -m bench.bench_parallel --quick         (one shape, short windows: checks the script, no figures)

A tiny Llama like the default pretrain model (hidden 128, 4 layers, MLP 384, vocab 2048) trains
with forward, loss, backward and AdamW on one fixed batch, in two shapes: `sft` (32 x 32 tokens,
like a default expert's step) and `pretrain` (32 x 128). Each run is a process of its own with the
shipped portable kernels, and with, for every combination of
- threads per process: 2 or 1 (torch.set_num_threads and OMP_NUM_THREADS),
- OMP_WAIT_POLICY: unset (libgomp's default: an idle thread spins about 300,000 times, some
  0.1-1 ms, before it sleeps) or PASSIVE (it sleeps at once),
- alone, or as one of a pair of identical processes started together: both wait at a barrier
  after their warm-up, time their steps, and keep stepping until the other has finished, so every
  timed step of either ran beside the other.
The arms alternate (forward, then backward order) for --repeats rounds; each figure is the median
over rounds of a run's median step time. This machine's throughput drifts +-30% within a minute
and other work may share it: the load average is printed, compare ratios of one round, repeat.

How to read it: `slowdown` = a step's time in a pair / alone (2.0 is a fair share of the cores;
far above 2 the two processes waste the cores fighting); `pair steps/s` = both processes' steps
per second together, against one process alone with 2 threads (1.0: as fast as running them one
after the other). Then the bytes: the losses of the warm-up steps must be bit-identical across
wait policies and alone/pair for one thread count (waiting decides no arithmetic); 1 and 2
threads may differ (reductions split by thread).
"""

from __future__ import annotations

import argparse
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

from pipeline.stage import PORTABLE_KERNELS, THREAD_VARIABLES

SHAPES = {"sft": (32, 32), "pretrain": (32, 128)}  # (batch, tokens per sequence)
# default: libgomp's own; PASSIVE / ACTIVE: OMP_WAIT_POLICY; a number: GOMP_SPINCOUNT (spins before sleeping)
POLICIES = ("default", "PASSIVE")
THREADS = (2, 1)
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
WARMUP_STEPS = 3


# One measurement, in a process of its own (its OpenMP settings are fixed before torch loads)


def step_loop(spec: dict[str, Any]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=384, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    batch_size, seq_len = SHAPES[spec["shape"]]
    batch = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step() for _ in range(WARMUP_STEPS)]
    Path(spec["ready"]).touch()
    while not all(Path(name).exists() for name in spec["all_ready"]):
        time.sleep(0.01)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < spec["max_steps"] and (len(times) < 3 or time.perf_counter() - began < spec["seconds"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    Path(spec["done"]).touch()
    while not all(Path(name).exists() for name in spec["all_done"]):  # keep the partner's steps shared
        step()
    digest = hashlib.sha256("".join(loss.hex() for loss in losses).encode()).hexdigest()[:12]
    figures = {"step_seconds": statistics.median(times), "steps": len(times), "digest": digest}
    Path(spec["result"]).write_text(json.dumps(figures | {"threads": torch.get_num_threads()}))


def environment(threads: int, policy: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in WAIT_VARIABLES}
    env |= PORTABLE_KERNELS | dict.fromkeys(THREAD_VARIABLES, str(threads))
    if policy.isdigit():
        env["GOMP_SPINCOUNT"] = policy
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    return env


def measure(arm: dict[str, Any], seconds: float, folder: Path) -> list[dict[str, Any]]:
    """Run the arm's process (or pair of processes); return each process's figures."""
    count = 2 if arm["pair"] else 1
    names = [folder / f"{os.getpid()}-{time.monotonic_ns()}-{index}" for index in range(count)]
    specs = [
        {
            **arm,
            "seconds": seconds,
            "max_steps": 200,
            "ready": f"{name}.ready",
            "done": f"{name}.done",
            "result": f"{name}.json",
            "all_ready": [f"{other}.ready" for other in names],
            "all_done": [f"{other}.done" for other in names],
        }
        for name in names
    ]
    env = environment(arm["threads"], arm["policy"])
    processes = [
        subprocess.Popen([sys.executable, "-m", "bench.bench_parallel", "--worker", json.dumps(spec)], env=env)
        for spec in specs
    ]
    for process in processes:
        if process.wait(timeout=900) != 0:
            raise SystemExit(f"a measurement process failed ({arm})")
    return [json.loads(Path(spec["result"]).read_text()) for spec in specs]


# The comparison


def arms(shapes: list[str], threads_options: list[int], policies: list[str]) -> list[dict[str, Any]]:
    return [
        {"shape": shape, "threads": threads, "policy": policy, "pair": pair}
        for shape in shapes
        for threads in threads_options
        for policy in policies
        for pair in (False, True)
    ]


def key(arm: dict[str, Any]) -> tuple:
    return arm["shape"], arm["threads"], arm["policy"], arm["pair"]


def run_rounds(all_arms: list[dict[str, Any]], repeats: int, seconds: float) -> dict[tuple, list[list[dict]]]:
    runs: dict[tuple, list[list[dict]]] = {key(arm): [] for arm in all_arms}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(repeats):
            order = all_arms if round_index % 2 == 0 else all_arms[::-1]
            print(f"round {round_index + 1}/{repeats}: load average {os.getloadavg()[0]:.2f}", flush=True)
            for arm in order:
                processes = measure(arm, seconds, Path(tmp))
                runs[key(arm)].append(processes)
                steps = ", ".join(f"{run['step_seconds'] * 1000:.1f}" for run in processes)
                print(f"  {arm['shape']} {arm['threads']} threads {arm['policy']:>7} "
                      f"{'pair ' if arm['pair'] else 'alone'}: {steps} ms/step", flush=True)  # fmt: skip
    return runs


def median_step(rounds: list[list[dict]]) -> float:
    """The median over rounds of the round's step time (a pair's: the mean of its two processes)."""
    return statistics.median(statistics.fmean(run["step_seconds"] for run in processes) for processes in rounds)


def print_table(shape: str, runs: dict[tuple, list[list[dict]]]) -> None:
    batch, seq_len = SHAPES[shape]
    counts = sorted({threads for (s, threads, _, _) in runs if s == shape}, reverse=True)
    policies = list(dict.fromkeys(policy for (s, _, policy, _) in runs if s == shape))
    reference = median_step(runs[shape, counts[0], policies[0], False])  # one process alone, the first policy
    print(f"\n{shape} ({batch} x {seq_len} tokens a step); reference: 1 process alone, {counts[0]} threads, "
          f"{policies[0]} wait = {reference * 1000:.1f} ms/step")  # fmt: skip
    print(f"{'threads':>7} {'wait policy':>11} {'alone ms':>9} {'pair ms':>9} {'slowdown':>8} "
          f"{'pair steps/s':>12} {'vs alone':>8} {'rounds':>6}")  # fmt: skip
    for threads in counts:
        for policy in policies:
            alone, pair = runs[shape, threads, policy, False], runs[shape, threads, policy, True]
            alone_step, pair_step = median_step(alone), median_step(pair)
            pair_rate = statistics.median(sum(1 / run["step_seconds"] for run in processes) for processes in pair)
            print(f"{threads:>7} {policy:>11} {alone_step * 1000:>9.1f} {pair_step * 1000:>9.1f} "
                  f"{pair_step / alone_step:>7.1f}x {pair_rate:>12.2f} {pair_rate * reference:>7.2f}x "
                  f"{len(alone):>6}")  # fmt: skip
    for threads in counts:
        reference_rounds = runs[shape, threads, policies[0], False]
        for policy in policies[1:]:
            ratios = [
                statistics.fmean(p["step_seconds"] for p in a) / statistics.fmean(d["step_seconds"] for d in b)
                for a, b in zip(runs[shape, threads, policy, False], reference_rounds, strict=True)
            ]
            print(f"  alone, {threads} threads: {policy} / {policies[0]} = {statistics.median(ratios):.2f} "
                  f"(per round: {', '.join(f'{ratio:.2f}' for ratio in ratios)})")  # fmt: skip


def print_bytes(shapes: list[str], runs: dict[tuple, list[list[dict]]]) -> None:
    print("\nsame bytes (losses of the warm-up steps):")
    for shape in shapes:
        by_threads = {}
        for threads in sorted({threads for (s, threads, _, _) in runs if s == shape}, reverse=True):
            digests = {
                run["digest"]
                for (s, t, _, _), rounds in runs.items()
                if (s, t) == (shape, threads)
                for processes in rounds
                for run in processes
            }
            by_threads[threads] = digests
            verdict = f"identical ({next(iter(digests))})" if len(digests) == 1 else f"DIFFER: {sorted(digests)}"
            print(f"  {shape}, {threads} threads, every wait policy, alone and paired: {verdict}")
        if len(by_threads) == 2:
            same = len(set().union(*by_threads.values())) == 1
            verdict = "identical" if same else "differ (allowed: reductions split by thread)"
            print(f"  {shape}, 1 vs 2 threads: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every arm (default 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed window per run (at least 3 steps)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--threads", type=int, nargs="+", choices=THREADS, default=list(THREADS))
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        help="waits to compare, the first the reference: default, PASSIVE, ACTIVE or a GOMP_SPINCOUNT",
    )
    parser.add_argument("--quick", action="store_true", help="the sft shape, 1 round, 1-second windows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        step_loop(json.loads(args.worker))
        return
    from bench.bench_pretrain import machine  # imported here: it imports the stages, not wanted in a worker

    shapes, repeats, seconds = (["sft"], 1, 1.0) if args.quick else (args.shapes, args.repeats, args.seconds)
    print(f"machine: {machine()}; load average now {os.getloadavg()[0]:.2f} (other work on the machine skews "
          f"the figures: compare within a round, repeat); {repeats} rounds, {seconds:g} s windows")  # fmt: skip
    runs = run_rounds(arms(shapes, args.threads, args.policies), repeats, seconds)
    for shape in shapes:
        print_table(shape, runs)
    print_bytes(shapes, runs)


if __name__ == "__main__":
    main()
