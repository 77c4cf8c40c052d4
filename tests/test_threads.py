"""Threads, and OpenMP's wait policy left to the user, as a stage process really gets them (pipeline/stage.py).

Each case runs in a process of its own, as `python -m stages.<stage>` would: the `stages` package
first, then a stage module that imports torch at its top (pretrain), then the stage's start-up.
libgomp itself reports the spin count it adopted when torch loaded (OMP_DISPLAY_ENV=VERBOSE).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from pipeline.settings.base import PROJECT_ROOT, InputError
from pipeline.stage import thread_count

PROBE = """
import json, os, sys
import stages.pretrain  # what `python -m stages.pretrain` imports first: the package, then torch
import torch
from pipeline.settings.compute import ComputeSettings
from pipeline.stage import configure_compute, start

how, value = sys.argv[1], json.loads(sys.argv[2])
if how == "compute":
    configure_compute(ComputeSettings(threads=value))
else:
    start(value)
names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS", "OMP_WAIT_POLICY")
print(json.dumps({"torch": torch.get_num_threads(), **{name: os.environ.get(name) for name in names}}))
"""


def probe(how: str, value: object, **environment: str) -> tuple[dict, str]:
    """Run PROBE; return what it printed and the spin count libgomp adopted when torch loaded."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE")}
    env |= {"OMP_DISPLAY_ENV": "VERBOSE", "PYTHONPATH": str(PROJECT_ROOT), **environment}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, how, json.dumps(value)], env=env, cwd=PROJECT_ROOT, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    spin = re.search(r"GOMP_SPINCOUNT = '(\d+)'", done.stdout + done.stderr)
    assert spin, "libgomp printed no GOMP_SPINCOUNT: is torch built with another OpenMP?"
    return json.loads(done.stdout.strip().splitlines()[-1]), spin.group(1)


def test_null_threads_take_the_environment_and_openmp_keeps_its_default_wait():
    figures, spin = probe("compute", None, OMP_NUM_THREADS="1")
    assert figures["torch"] == 1
    assert figures["MKL_NUM_THREADS"] == figures["RAYON_NUM_THREADS"] == "1"
    assert figures["OMP_WAIT_POLICY"] is None
    assert spin == "300000"  # libgomp's default: fastest for one stage at a time


def test_a_users_passive_wait_reaches_openmp():
    # what docs/tutorials/gpus-and-machines.md's `OMP_WAIT_POLICY=PASSIVE dvc queue start -j 2` relies on
    figures, spin = probe("compute", 2, OMP_WAIT_POLICY="PASSIVE")
    assert figures["OMP_WAIT_POLICY"] == "PASSIVE" and spin == "0"


def test_the_setting_wins_over_the_environment():
    figures, spin = probe("compute", 2, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert figures["torch"] == 2 and figures["OMP_NUM_THREADS"] == "2"
    assert figures["OMP_WAIT_POLICY"] == "ACTIVE" and spin != "300000"


def test_a_stage_without_compute_sizes_its_pools_from_the_environment():
    # tokenize's bytes do not depend on threads (it declares no `compute`): its tokenizers pool follows the user
    figures, _ = probe("start", "tokenize", OMP_NUM_THREADS="1")
    assert figures["RAYON_NUM_THREADS"] == "1" and figures["torch"] == 1


def test_null_threads_without_environment_use_every_core_shared_by_torchrun(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert thread_count(None) == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))
    assert thread_count(None) == 1


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_omp_num_threads_is_named(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(InputError, match="OMP_NUM_THREADS=.*whole number >= 1"):
        thread_count(None)
