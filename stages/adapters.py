"""`adapter@<run>` stage: an expert trained with a LoRA, LoHa or LoKr adapter (peft) through axolotl, and
merged into a plain model at the end.

    python -m stages.adapters --run addition_loha --base-model models/pretrain \
        --out models/adapters/addition_loha --work .tmp/adapter_addition_loha \
        --live metrics/runs/adapters/addition_loha --metrics metrics/runs/adapters/addition_loha.json

A run's settings resolve as an expert's do (`sft`, then finetune.defaults, then the run's own), and it
trains through the experts' code path (pipeline/sft.py): the same axolotl data preparation (loss on the
answer only), replay passages, row checks, dvclive curves, model card, lineage and atomic output. Only
the adapter differs:

- lora: axolotl's own LoRA, as an expert with `adapter: lora` trains;
- loha, lokr: peft's LoHaConfig / LoKrConfig, which axolotl 0.19 does not build itself; it loads adapters
  that a plugin registers, and `PeftAdapterPlugin` below is that plugin. axolotl then merges the adapter
  with peft's merge_and_unload (its `legacy` merge: its default, shard-by-shard merge knows LoRA only).

Each adapter gets rank lora_r and alpha lora_alpha on the same layers: every linear layer of the decoder
(q/k/v/o and the MLP's gate/up/down), or q/v only with lora_target_linear false. LoHa and LoKr have no
dropout on their input as LoRA has; lora_dropout becomes their `rank_dropout` (peft's dropout over the
adapter's rank dimension during training). The base model is loaded in full precision for every method
(an `adapter: qlora` from the shared settings is not used here). The metrics add the trainable and total
parameter counts as peft counts them (print_trainable_parameters: total = base + adapter).
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from pathlib import Path
from typing import Any

from pipeline import sft
from pipeline.atomic import write_json
from pipeline.settings.base import InputError
from pipeline.settings.sft import SFTSettings, resolve_sft
from pipeline.stage import configure_environment, start

log = logging.getLogger("stages.adapters")

METHODS = ("lora", "loha", "lokr")
PEFT_METHODS = ("loha", "lokr")  # built by the plugin; lora is axolotl's own
# every linear layer of a Llama-style decoder (what lora_target_linear adapts), named for peft
LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_QV = ("q_proj", "v_proj")
PLUGIN = "stages.adapters.PeftAdapterPlugin"


def target_modules(settings: SFTSettings) -> list[str]:
    return list(LINEAR_LAYERS if settings.lora_target_linear else ATTENTION_QV)


def peft_config(method: str, rank: int, alpha: int, dropout: float, targets: list[str]) -> Any:
    """The peft config of one method: as axolotl builds LoRA's (no bias, causal LM), LoHa's and LoKr's alike."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                          task_type="CAUSAL_LM")  # fmt: skip
    config = {"loha": LoHaConfig, "lokr": LoKrConfig}[method]
    return config(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")


def axolotl_keys(method: str, settings: SFTSettings) -> dict[str, Any]:
    """axolotl keys on top of an `adapter: lora` expert's config (sft.axolotl_config) for one method."""
    keys: dict[str, Any] = {"lora_target_modules": target_modules(settings), "lora_target_linear": False}
    if method in PEFT_METHODS:
        keys.update(
            adapter=method,
            plugins=["pipeline.axolotl_dvclive.DVCLivePlugin", PLUGIN],
            merge_method="legacy",  # load the adapter through the plugin, then merge_and_unload
            # axolotl's fused LoRA kernels (on with bf16) would patch LoRA layers only
            lora_mlp_kernel=False,
            lora_qkv_kernel=False,
            lora_o_kernel=False,
        )
    return keys


def count_parameters(base_model: str, method: str, settings: SFTSettings) -> dict[str, Any]:
    """Trainable and total parameters of the adapted model as peft counts them, on a model built on the
    meta device (no weights are read: cheap for any size)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model))
    config = peft_config(method, settings.lora_r, settings.lora_alpha, settings.lora_dropout, target_modules(settings))
    trainable, total = get_peft_model(model, config).get_nb_trainable_parameters()
    return {"params/trainable": trainable, "params/total": total, "params/trainable_share": round(trainable / total, 6)}


def run(
    method: str,
    settings: SFTSettings,
    base_model: str,
    dataset: Path,
    target: sft.Target,
    replay_text: Path | None = None,
) -> dict[str, Any]:
    """Train and merge one adapter run; write the model folder and its curves; return summary metrics."""
    if method not in METHODS:
        raise InputError(f"{target.where}.method is {method!r}; use one of {', '.join(METHODS)}")
    # the LoRA path of pipeline/sft.py: lora_r/alpha/dropout in the config, axolotl's merge at the end
    settings = settings.model_copy(update={"adapter": "lora"})
    began = time.perf_counter()
    summary = sft.run(settings, base_model, dataset, target, replay_text=replay_text,
                      extra_config=axolotl_keys(method, settings))  # fmt: skip
    log.info("%s: trained and merged in %.0f s", target.name, time.perf_counter() - began)  # a log, never an output
    return {**summary, "method": method, **count_parameters(base_model, method, settings)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run name (a key of adapters.runs)")
    parser.add_argument("--base-model", required=True, help="model folder to start from")
    sft.add_output_arguments(parser)
    args = parser.parse_args(argv)
    stage = f"adapter@{args.run}"
    params = start(stage)
    adapter_run = params.adapters.runs[args.run]
    target = sft.Target("adapter", args.run, stage, f"adapters.runs.{args.run}", args.out, args.work, args.live)
    configure_environment()
    settings = resolve_sft(params.sft, params.finetune.defaults, adapter_run)
    summary = run(adapter_run.method, settings, args.base_model, Path(adapter_run.dataset), target,
                  replay_text=Path(params.finetune.replay_text))  # fmt: skip
    write_json(args.metrics, summary)


@functools.cache
def plugin_class() -> type:
    """The axolotl plugin, built on first use: importing axolotl takes ~10 s, which the stage itself
    (that only starts axolotl) need not pay."""
    from axolotl.integrations.base import AdapterCapabilities, BasePlugin

    class PeftAdapterPlugin(BasePlugin):
        """Registers `adapter: loha` and `adapter: lokr` with axolotl and builds them with peft, from the
        config's lora_r, lora_alpha, lora_dropout and lora_target_modules."""

        def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
            return [AdapterCapabilities(name=method) for method in PEFT_METHODS]

        def load_adapter(self, model: Any, cfg: Any, inference: bool = False, config_only: bool = False) -> Any:
            if cfg.adapter not in PEFT_METHODS:
                return None  # not ours: axolotl's own loaders
            import torch
            from peft import PeftModel, get_peft_model

            config = peft_config(cfg.adapter, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                                 list(cfg.lora_target_modules))  # fmt: skip
            if config_only:
                return None, config
            if cfg.lora_model_dir:  # the merge step: the trained adapter on the base, in eval mode (LoHa and
                # LoKr apply their rank dropout in merge_and_unload too while the layers are in training mode)
                return PeftModel.from_pretrained(model, cfg.lora_model_dir, is_trainable=False).eval(), config
            # the adapter's random initial weights from the run's seed: axolotl seeds only its trainer, later
            torch.manual_seed(cfg.seed)
            model = get_peft_model(model, config)
            model.print_trainable_parameters()
            return model, config

    return PeftAdapterPlugin


def __getattr__(name: str) -> Any:
    # axolotl loads plugins by dotted name (`plugins:` in its config): stages.adapters.PeftAdapterPlugin
    if name == "PeftAdapterPlugin":
        return plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
