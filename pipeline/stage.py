"""What every stage does first: logging, a private environment, validated settings."""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import logging
import os
import signal
import sys
import warnings
from typing import Any

from pipeline.settings.base import PROJECT_ROOT, InputError
from pipeline.settings.stage_view import load_stage_params

log = logging.getLogger("pipeline")

# The environment variable naming the folder where the axolotl plugin (pipeline/axolotl_dvclive.py)
# writes its curves: set by the finetune stage, read inside axolotl's process. It lives here so the
# stage need not import axolotl (9 s) to launch it.
DVCLIVE_DIR_VARIABLE = "PIPELINE_DVCLIVE_DIR"


def configure_environment(*, hub_access: bool = False) -> None:
    """Keep caches inside the project, telemetry off, and the hub offline unless settings need it.

    Values already in the environment win, so a user can always override one.
    """
    os.environ.setdefault("HF_HOME", str(PROJECT_ROOT / ".cache" / "huggingface"))
    offline = "0" if hub_access else "1"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, offline)
    for name, value in {
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        "DVC_NO_ANALYTICS": "1",
    }.items():
        os.environ.setdefault(name, value)


# The x86 code paths that every CPU of the project's machine kinds can run (Intel Xeon with
# AVX-512, AMD EPYC): torch's own kernels, MKL's (its reproducible CNR mode) and oneDNN's.
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# torch's OpenMP and MKL pools, and the Rust pool of the tokenizers (tokenize, SFT data preparation).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")
# OpenMP's wait policy is the user's: libgomp reads OMP_WAIT_POLICY once, when torch loads, and every
# stage and axolotl inherit it. Measured with bench/bench_parallel.py (2-core Xeon, idle, an SFT-sized
# step of the default model, 2 threads): libgomp's default (spin ~300,000 times, then sleep) takes
# 112 ms alone and 370 ms beside a twin; PASSIVE (sleep at once) 216 ms alone and 242 ms beside a
# twin. One stage at a time, the default is twice as fast; stages side by side (`dvc queue start
# -j 2`) want PASSIVE (docs/tutorials/gpus-and-machines.md, "Stages side by side"). Waiting decides
# no arithmetic (same losses).


def thread_count(setting: int | None) -> int:
    """`compute.threads`; null: OMP_NUM_THREADS when the environment has one (the user's, or the 1 that
    torchrun gives each process unless told otherwise), else every core this process may use, shared
    among the processes torchrun started on this machine."""
    if setting is not None:
        return setting
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise InputError(
                f"OMP_NUM_THREADS={value!r} in the environment (compute.threads: null takes it): "
                "give a whole number >= 1, or unset it to use every core"
            )
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def configure_threads(setting: int | None) -> int:
    """Size torch's, OpenMP's, MKL's and the tokenizers' threads for this process and the ones it
    starts (axolotl); return the count. A stage that does not declare `compute` (its bytes do not
    depend on threads) passes None: it takes OMP_NUM_THREADS or every core."""
    threads = thread_count(setting)
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    if "torch" in sys.modules:  # imported at the top of the stage module: its pools exist already
        import torch

        torch.set_num_threads(threads)
    return threads


def configure_compute(settings: Any) -> None:  # the `compute` section (pipeline/settings/compute.py)
    """Fix the CPU kernels and thread count for this process and the ones it starts (axolotl).

    torch, MKL and oneDNN read these variables once, at their first operation: this must run
    before any tensor is made. Unlike configure_environment, the settings win over the
    environment, since they decide the bytes of the results and DVC tracks them.
    """
    for name in PORTABLE_KERNELS:
        os.environ.pop(name, None)
    if settings.portable_kernels:
        os.environ.update(PORTABLE_KERNELS)
    threads = configure_threads(settings.threads)
    if "torch" in sys.modules:  # imported at the top of the stage module: check it has not chosen its kernels
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        if settings.portable_kernels and capability not in ("AVX2", "DEFAULT", "NO AVX"):
            raise RuntimeError(f"torch already chose its {capability} kernels: configure_compute came too late")
    log.info("compute: %s kernels, %d threads", "portable (AVX2)" if settings.portable_kernels else "native", threads)


def resolve_device(setting: str = "auto") -> str:
    """The torch device a stage computes on: `auto` is the first GPU when there is one, else the CPU."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def use_bf16(precision: str, device: str) -> bool:
    """Whether to compute in bfloat16: `bf16`, or `auto` on a GPU that supports it (fp32 on CPU)."""
    if precision != "auto":
        return precision in ("bf16", "bfloat16")
    import torch

    return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class RunFailed(RuntimeError):
    """Training or a tool failed in a way its message explains (a diverged loss, axolotl's exit
    status): printed as one line, like bad input, since a traceback would say nothing more."""


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # Import-time noise of the stack on a CPU machine: torchao's CUDA-only kernels fail to load,
    # torch warns about its own enum registration, and bitsandbytes (imported through peft by
    # mergekit) cannot fetch its optional CPU kernel offline. None of it affects a run.
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Skipping publisher trust check")


def skip_final_garbage_collection() -> None:
    """At exit, leave the objects alive then out of the interpreter's last garbage collections.

    With torch, transformers and the rest loaded, those take about 1 s per stage process and 2 s
    in axolotl's (some 25 s of the default run) and free nothing the operating system would not.
    Every exit handler still runs; the stage's outputs are closed by then.
    """
    atexit.register(gc.freeze)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the process that started this one (DVC, or the stage for
    axolotl) dies, so that no orphan goes on to replace an output DVC has since restored.

    Linux only (elsewhere a no-op). Also usable as a subprocess `preexec_fn`.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def exit_on_termination() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit, so that `finally` blocks and context managers run:
    temporaries are removed (pipeline/atomic.py) and axolotl is stopped (pipeline/sft.py)."""

    def stop(signum: int, _frame: Any) -> None:
        # the stage is on its way out: a second signal (DVC's death and a teammate's kill, say) must
        # not cut that clean-up short and leave a scratch folder behind
        for other in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)
        raise SystemExit(f"stopped by {signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def report_input_errors() -> None:
    """Print bad input (InputError, params included) and RunFailed as the one-line message, not a
    traceback; the exit status stays 1."""
    default = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        if isinstance(error, InputError | RunFailed):
            print(f"error: {error}", file=sys.stderr)
        else:
            default(kind, error, traceback)

    sys.excepthook = hook


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed", type=int, help="this stage in the replicated run of this seed of seeds.replicas: the seed "
        "replaces sft.seed, merge.seed and moe.seed, and the stage is dvc.yaml's <stage>_seed@<entry>-<seed>",
    )  # fmt: skip


def stage_name(stage: str, seed: int | None) -> str:
    """dvc.yaml's name of `stage` (`finetune@addition`, `select`) in the replicated run of `seed`
    (`finetune_seed@addition-1`, `select_seed@1`: DVC's matrix names), or `stage` for the main run."""
    if seed is None:
        return stage
    entry, _, key = stage.partition("@")
    return f"{entry}_seed@{key}-{seed}" if key else f"{entry}_seed@{seed}"


def start(stage: str) -> Any:
    """Set up logging and return the settings `stage` declares; exit with the message on bad params.

    The stage stops cleanly on SIGTERM/SIGHUP and when DVC dies, and prints bad input as one line.
    A stage that declares `compute` gets its kernels and threads fixed here (configure_compute);
    any other takes its threads from the environment (configure_threads).
    """
    skip_final_garbage_collection()
    setup_logging()
    exit_on_termination()
    die_with_parent()
    report_input_errors()
    params = load_stage_params(stage)  # bad params: the one-line message of report_input_errors
    log.info("stage %s: settings validated", stage)
    if params.declares("compute"):
        configure_compute(params.compute)
    else:
        configure_threads(None)
    return params
