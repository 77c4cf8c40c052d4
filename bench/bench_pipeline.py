"""The whole default experiment from a fresh clone: `dvc repro` timed stage by stage, and checked.

    python -m bench.bench_pipeline      (or `make bench`)
    python -m bench.bench_pipeline --set sft.seed=1 --keep /tmp/seed1   (another seed for every SFT run, kept)
    python -m bench.bench_pipeline --noop .    (only the no-op `dvc repro` of an up-to-date project)

Clones the committed project into a temporary folder, runs `dvc repro` there exactly as
`make run` does (same environment, nothing cached), stamps the time at which DVC starts each
stage, and prints seconds per stage, per kind of stage, and against the 10-minute target. Then:
- whether the clone's dvc.lock records the same output hashes as the committed one (with the
  default settings, it must: README, Reproducibility), naming any output that differs;
- a no-op `dvc repro` (everything up to date) timed 5 times, interleaved with nothing else:
  median and min-max (target <= 2 s);
- the fixed start-up of the tools that each stage process pays again (importing axolotl,
  lm-eval, mergekit; a DVC call), so the table shows where time goes.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from pipeline.dvc_lock import lock_outputs
from pipeline.params import PROJECT_ROOT

TARGET_SECONDS = 600
BIN = Path(sys.executable).parent
KINDS = (
    ("data + tokenize", r"^(data|tokenize)$"),
    ("pretrain", r"^pretrain$"),
    ("experts (axolotl)", r"^finetune@"),
    ("merges (mergekit)", r"^merge@"),
    ("select", r"^select$"),
    ("MoE builds (mergekit-moe)", r"^moe@"),
    ("dense baseline (axolotl)", r"^dense@"),
    ("MoE training (axolotl)", r"^moe_finetune@"),
    ("evals (lm-eval)", r"^eval"),
    ("report", r"^report$"),
)


def environment() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1",
            "DVC_NO_ANALYTICS": "1"}  # fmt: skip


def timed_repro(project: Path) -> tuple[dict[str, float], float]:
    """Stage -> seconds, and the total, of one `dvc repro` (a stage ends when the next one starts)."""
    started = time.perf_counter()
    process = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=environment(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    marks: list[tuple[str, float]] = []
    for line in process.stdout:
        match = re.match(r"Running stage '([^']+)'", line)
        if match:
            marks.append((match.group(1), time.perf_counter()))
            print(f"  {marks[-1][1] - started:6.1f} s  {match.group(1)}", flush=True)
    if process.wait() != 0:
        raise SystemExit("error: dvc repro failed in the clone; run `make run` to see why")
    total = time.perf_counter() - started
    ends = [mark for _, mark in marks[1:]] + [started + total]
    return {stage: end - start for (stage, start), end in zip(marks, ends, strict=True)}, total


def compare_with_committed(project: Path) -> None:
    committed = subprocess.run(["git", "show", "HEAD:dvc.lock"], cwd=project, capture_output=True, text=True)
    if committed.returncode:
        print("\nno committed dvc.lock to compare with")
        return
    expected, got = lock_outputs(committed.stdout), lock_outputs((project / "dvc.lock").read_text())
    differ = sorted(path for path in expected.keys() | got.keys() if expected.get(path) != got.get(path))
    if differ:
        print(f"\nthe clone's outputs DIFFER from the committed dvc.lock in {len(differ)} of {len(expected)}:")
        print("\n".join(f"  {path}" for path in differ))
    else:
        print(f"\nthe clone reproduces the committed dvc.lock: all {len(expected)} outputs have the same hashes")


def noop_repro(project: Path, runs: int = 5) -> None:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        command = [str(BIN / "dvc"), "repro"]
        done = subprocess.run(command, cwd=project, env=environment(), capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if "Running stage" in done.stdout or done.returncode:
            raise SystemExit(f"error: the project is not up to date, or dvc repro failed:\n{done.stdout}{done.stderr}")
    print(f"\nno-op dvc repro ({len(lock_outputs((project / 'dvc.lock').read_text()))} outputs up to date): median "
          f"{statistics.median(seconds):.2f} s, min-max {min(seconds):.2f}-{max(seconds):.2f} s over {runs} runs "
          "(target <= 2 s)")  # fmt: skip


def startup_seconds(statement: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], cwd=PROJECT_ROOT, env=environment(), check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - started


def set_params(project: Path, assignments: list[str]) -> None:
    """KEY=VALUE (dotted key, YAML value) into the clone's params.yaml, keeping its comments."""
    from ruamel.yaml import YAML

    yaml = YAML()
    params = yaml.load((project / "params.yaml").read_text())
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for parent in parents:
            node = node[parent]
        node[leaf] = YAML(typ="safe").load(value)
    with open(project / "params.yaml", "w") as handle:
        yaml.dump(params, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE: change a setting in the clone")
    parser.add_argument("--keep", type=Path, help="clone into this new folder and keep it (its outputs and cache)")
    parser.add_argument("--noop", type=Path, help="only time a no-op `dvc repro` of this up-to-date project")
    args = parser.parse_args()
    if args.noop:
        noop_repro(args.noop)
        return
    with tempfile.TemporaryDirectory() as tmp:
        project = args.keep or Path(tmp) / "project"
        subprocess.run(["git", "clone", "-q", str(PROJECT_ROOT), str(project)], check=True)
        set_params(project, args.set)
        print(f"dvc repro of the default params.yaml{' with ' + ', '.join(args.set) if args.set else ''} in a fresh "
              f"clone ({project}):")  # fmt: skip
        stages, total = timed_repro(project)
        if not args.set:
            compare_with_committed(project)
        noop_repro(project)
    kinds: dict[str, list[float]] = defaultdict(list)
    for stage, seconds in stages.items():
        kind = next((name for name, pattern in KINDS if re.search(pattern, stage)), "other")
        kinds[kind].append(seconds)
    print(f"\n{'kind of stage':<28}{'stages':>7}{'seconds':>9}{'share':>7}")
    for name, _ in (*KINDS, ("other", "")):
        if name in kinds:
            seconds = sum(kinds[name])
            print(f"{name:<28}{len(kinds[name]):>7}{seconds:>9.1f}{seconds / total:>7.0%}")
    print(
        f"{'total (dvc repro)':<28}{len(stages):>7}{total:>9.1f}   {total / TARGET_SECONDS:.2f}x the 10-minute target"
    )
    print("\nfixed start-up each stage process pays (imports, measured alone):")
    for name, statement in (
        ("python + torch + transformers", "import torch, transformers"),
        ("axolotl (train CLI)", "import axolotl.cli.train, axolotl.train"),
        ("lm-eval (+ HF model class)", "import lm_eval, lm_eval.models.huggingface"),
        ("mergekit", "import mergekit.merge, mergekit.scripts.moe"),
        ("dvc (Repo, as each stage's params check)", "from dvc.repo import Repo"),
    ):
        print(f"  {name:<42}{startup_seconds(statement):>6.1f} s")


if __name__ == "__main__":
    main()
