"""What every stage does first: logging, a private environment, validated settings."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import warnings
from typing import Any

from pipeline.params import PROJECT_ROOT, ParamsError, load_stage_params

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


def start(stage: str) -> Any:
    """Set up logging and return the settings `stage` declares; exit with the message on bad params."""
    skip_final_garbage_collection()
    setup_logging()
    try:
        params = load_stage_params(stage)
    except ParamsError as error:
        raise SystemExit(f"error: {error}") from None
    log.info("stage %s: settings validated", stage)
    return params
