"""An axolotl plugin that lets several training processes share a CPU machine (gloo DDP).

axolotl 0.19 puts each process's model on accelerator number LOCAL_RANK whenever WORLD_SIZE > 1
(normalize_config sets `device_map: {"": LOCAL_RANK}`), which fails on a machine without one
("Cannot access accelerator device when none is available"). pipeline/sft.py lists this plugin in
the generated config only for several processes on CPU, where it loads the model onto the CPU;
accelerate (ACCELERATE_USE_CPU, set by pipeline/sft.py) then trains it with DDP over gloo.
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin


class CPUProcessesPlugin(BasePlugin):
    def load_datasets(self, cfg: Any, preprocess: bool = False) -> None:
        # the one plugin hook after normalize_config and before the model is loaded; it loads no
        # data (None: axolotl loads the datasets itself)
        cfg.device_map = "cpu"
        return None
