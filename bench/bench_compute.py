"""The cost of `compute.portable_kernels`: the bare pretraining loop on portable (AVX2) and native kernels.

    python -m bench.bench_compute                (or `make bench`; about 8 minutes at the defaults)
    python -m bench.bench_compute --repeats 9    (tighter medians)
    python -m bench.bench_compute --quick        (a tiny model for a few steps: checks the script, no figures)

The bench model and bare loop of bench/bench_pretrain.py (forward, loss, backward, AdamW on one
fixed batch), with params.yaml's thread count, once per process with `portable_kernels` true and
once with false: the variables must be set before torch starts. The arms alternate (A B, B A, ...)
for --repeats pairs; a run's figure is the median of its windows after the first.

How to read it: each arm shows the median over runs with min-max (quartiles from 4 runs on); the
cost is native/portable - 1 as the ratio of the medians, with the median, min and max of the
ratios of the pairs beside it, and a note when the pairs spread wider than the cost. Then the
bytes: every run of one arm must end with the same weights and loss (a digest of both); portable
and native runs may differ from each other (other instructions round differently), which is why
portable is the default: the same bytes on every x86 CPU.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench.bench_pretrain import (
    bench_settings,
    compare,
    interleaved,
    machine,
    parse_arguments,
    prepare_data,
    print_arm,
    print_comparison,
    run_settings,
)
from pipeline.settings.params_file import load_params


def same_bytes(runs: list[dict]) -> str:
    digests = [run["digest"] for run in runs]
    if len(digests) < 2:
        return "one run only: needs --repeats >= 2"
    if len(set(digests)) == 1:
        return f"all {len(digests)} identical (digest {digests[0]}, final loss {runs[0]['loss']!r})"
    return f"DIFFER: {len(set(digests))} distinct digests in {len(digests)} runs ({', '.join(digests)})"


def main() -> None:
    args = parse_arguments(__doc__.split("\n")[0]).parse_args()
    repeats, steps = run_settings(args)
    threads = load_params().compute.threads
    settings = bench_settings(steps, args.quick)
    print(f"machine: {machine()}; {threads or 'all'} threads; {repeats} runs per arm of {steps} steps x "
          f"{settings.batch_tokens} tokens, in {settings.log_interval}-step windows (first dropped)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = prepare_data(Path(tmp), args.quick)
        base = {"data": str(root), "arm": "bare", "steps": steps, "quick": args.quick, "threads": threads,
                "precision": "fp32", "compile": False}  # fmt: skip
        runs = interleaved(
            {"portable": {**base, "portable_kernels": True}, "native": {**base, "portable_kernels": False}}, repeats
        )
    portable, native = runs["portable"], runs["native"]
    print(f"\nfp32 matmul peak: portable {statistics.median(r['peak_flops'] for r in portable) / 1e9:.0f}, "
          f"native {statistics.median(r['peak_flops'] for r in native) / 1e9:.0f} GFLOP/s (medians)")  # fmt: skip
    print_arm("portable", portable)
    print_arm("native", native)
    effect, pairs = compare(portable, native)
    print_comparison("native over portable (the cost of portable kernels)", effect, pairs)
    print("same bytes (final weights and loss):")
    print(f"  portable runs: {same_bytes(portable)}")
    print(f"  native runs  : {same_bytes(native)}")
    across = {run["digest"] for run in portable} & {run["digest"] for run in native}
    verdict = "identical" if across else "differ (allowed: other instructions round differently)"
    print(f"  portable vs native: {verdict}")


if __name__ == "__main__":
    main()
