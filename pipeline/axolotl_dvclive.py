"""An axolotl plugin that sends the trainer's logs to dvclive (axolotl has no dvclive reporter).

The finetune stage lists `pipeline.axolotl_dvclive.DVCLivePlugin` under `plugins:` in the
generated axolotl config and names the dvclive folder in PIPELINE_DVCLIVE_DIR
(`pipeline.stage.DVCLIVE_DIR_VARIABLE`). Curves are indexed by optimizer step (transformers'
own DVCLiveCallback counts log calls instead).
"""

from __future__ import annotations

import os
from typing import Any

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

from pipeline.curves import curve_logger
from pipeline.stage import DVCLIVE_DIR_VARIABLE, skip_final_garbage_collection

skip_final_garbage_collection()  # in axolotl's process too, which loads this plugin

CURVES = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "learning_rate": "train/lr",
    "eval_loss": "eval/loss",
    # DPO (trl): how often, and by how much, the implicit reward prefers the chosen answer
    "rewards/accuracies": "train/rewards/accuracies",
    "rewards/margins": "train/rewards/margins",
    "eval_rewards/accuracies": "eval/rewards/accuracies",
    "eval_rewards/margins": "eval/rewards/margins",
}


class DVCLiveLogger(TrainerCallback):
    def __init__(self, folder: str):
        self.live = curve_logger(folder)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.live.step = state.global_step
        for key, name in CURVES.items():
            if isinstance(logs.get(key), int | float):
                self.live.log_metric(name, logs[key])


class DVCLivePlugin(BasePlugin):
    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list[Any]:
        folder = os.environ.get(DVCLIVE_DIR_VARIABLE)
        return [DVCLiveLogger(folder)] if folder else []
