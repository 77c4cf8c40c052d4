"""The whole default experiment from a fresh clone: `dvc repro` timed stage by stage, and checked.

    python -m bench.bench_pipeline      (or `make bench`)
    python -m bench.bench_pipeline --set sft.seed=1 --keep /tmp/seed1   (another seed for every SFT run, kept)
    python -m bench.bench_pipeline --noop .    (only the no-op `dvc repro` of an up-to-date project)

Clones the committed project into a temporary folder, runs `dvc repro` there exactly as
`make run` does (same environment, nothing cached), stamps the time at which DVC starts each
stage and each phase of it (start-up, preparation, work, saving: see PHASES), and prints seconds per
stage, per kind of stage and phase, and against the 15-minute target. Then:
- whether the clone's dvc.lock records the same output hashes as the committed one (with the
  default settings, it must: docs/how-to/reproducibility.md), naming any output that differs;
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
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.dvc_lock import lock_outputs
from pipeline.settings.base import PROJECT_ROOT

TARGET_SECONDS = 900  # the default experiment in a quarter of an hour (after the install)
BIN = Path(sys.executable).parent
KINDS = (
    ("replicated runs (seeds)", r"_seed@"),  # first: the rest is the main run's split
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


# Where a stage process is, from the lines it logs (stamped as they arrive): start-up (DVC's checks,
# the interpreter, imports, the settings) ends when the settings are validated; then preparation (data,
# tokenizer, model load; axolotl's own start-up) until the work starts; the work is training steps
# (axolotl's trainer, the pretraining loop), an evaluation or a merge; saving (writing the outputs,
# axolotl's exit, DVC hashing and caching them) runs to the next stage's start. A stage that marks no
# work (data, tokenize, check, select, report) counts everything after its start-up as work.
PHASES = ("start-up", "preparation", "work", "saving")
MARKERS = (
    (re.compile(r"settings validated|settings and input files are valid"), "preparation"),
    (
        re.compile(
            r"Starting trainer|M parameters, \d+ steps of|evaluating \S+ on |merging .+ with |building a \d+-exp"
        ),
        "work",
    ),
    (re.compile(r"Training completed|metrics: \{"), "saving"),
)


@dataclass
class StageTime:
    """Seconds in each phase of one stage's run (PHASES)."""

    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    marked_work: bool = False

    def total(self) -> float:
        return sum(self.phases.values())


def timed_repro(project: Path) -> tuple[dict[str, StageTime], float]:
    """Stage -> its phases' seconds, and the total, of one `dvc repro` (a stage ends when the next one
    starts)."""
    started = time.perf_counter()
    process = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=project, env=environment(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    stages: dict[str, StageTime] = {}
    current, phase, since = None, "start-up", started
    for line in process.stdout:
        now = time.perf_counter()
        match = re.match(r"Running stage '([^']+)'", line)
        if match:
            if current:
                stages[current].phases[phase] += now - since
            current, phase, since = match.group(1), "start-up", now
            stages[current] = StageTime()
            print(f"  {now - started:6.1f} s  {current}", flush=True)
            continue
        marked = next((name for pattern, name in MARKERS if pattern.search(line)), None)
        if current and marked and PHASES.index(marked) > PHASES.index(phase):
            stages[current].phases[phase] += now - since
            stages[current].marked_work |= marked == "work"
            phase, since = marked, now
    if process.wait() != 0:
        raise SystemExit("error: dvc repro failed in the clone; run `make run` to see why")
    total = time.perf_counter() - started
    if current:
        stages[current].phases[phase] += started + total - since
    for timing in stages.values():
        if not timing.marked_work:  # no work marker: all but the start-up is the stage's work
            timing.phases["work"] += timing.phases["preparation"] + timing.phases["saving"]
            timing.phases["preparation"] = timing.phases["saving"] = 0.0
    return stages, total


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


def print_split(stages: dict[str, StageTime], total: float) -> None:
    """Seconds per kind of stage, and how each kind's time splits into PHASES."""
    kinds: dict[str, list[StageTime]] = defaultdict(list)
    for stage, timing in stages.items():
        kinds[next((name for name, pattern in KINDS if re.search(pattern, stage)), "other")].append(timing)
    print(f"\n{'kind of stage':<28}{'stages':>7}{'seconds':>9}{'share':>7}" + "".join(f"{p:>13}" for p in PHASES))
    for name, _ in (*KINDS, ("other", "")):
        if name in kinds:
            seconds = sum(timing.total() for timing in kinds[name])
            split = "".join(f"{sum(t.phases[p] for t in kinds[name]):>13.1f}" for p in PHASES)
            print(f"{name:<28}{len(kinds[name]):>7}{seconds:>9.1f}{seconds / total:>7.0%}{split}")
    split = "".join(f"{sum(t.phases[p] for t in stages.values()):>13.1f}" for p in PHASES)
    print(f"{'total (dvc repro)':<28}{len(stages):>7}{total:>9.1f}{'':>7}{split}")
    print(f"{total / TARGET_SECONDS:.2f}x the {TARGET_SECONDS // 60}-minute target")


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
        if args.set:  # rewriting params.yaml, even to the same values, would change its layout
            set_params(project, args.set)
        print(f"dvc repro of the default params.yaml{' with ' + ', '.join(args.set) if args.set else ''} in a fresh "
              f"clone ({project}):")  # fmt: skip
        stages, total = timed_repro(project)
        if not args.set:
            compare_with_committed(project)
        noop_repro(project)
    print_split(stages, total)
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
