"""`finetune@<expert>` stage: one SFT expert, trained by axolotl from a generated config.

    python -m stages.finetune --expert addition --base-model models/pretrain \
        --out models/experts/addition --work models/.finetune_work/addition \
        --live metrics/finetune/addition --metrics metrics/finetune/addition.json

The stage turns the validated settings (finetune.defaults + finetune.experts.<expert>) into an
axolotl config (saved as axolotl.yaml in the output folder), runs `axolotl.cli.train` in a
subprocess (and `axolotl.cli.merge_lora` for LoRA), checks while axolotl starts up (before it
trains) and again in its prepared dataset that no more than `max_dropped_share` of the rows are
too long for `sequence_len` (axolotl drops those without a word), and copies
only the model files from axolotl's work folder into the output, so that an identical rerun
gives identical output hashes (axolotl's own output folder also holds timestamped logs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from pipeline.atomic import atomic_dir, dumps_json, write_json
from pipeline.params import PROJECT_ROOT, SFTSettings
from pipeline.stage import DVCLIVE_DIR_VARIABLE, configure_environment, start

log = logging.getLogger("stages.finetune")

DATASET_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")  # fmt: skip


def use_bf16(settings: SFTSettings) -> bool:
    import torch

    if settings.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return settings.precision == "bf16"


def axolotl_config(settings: SFTSettings, base_model: str, dataset: str, work_dir: Path, bf16: bool) -> dict[str, Any]:
    """The axolotl configuration for one expert (keys as in axolotl's config reference)."""
    config: dict[str, Any] = {
        "base_model": base_model,
        "datasets": [
            {
                # as given: a relative path resolves against the project root, where axolotl
                # runs, so the saved config does not depend on where the project is checked out
                "path": dataset,
                "ds_type": dataset_format(dataset),
                "type": "chat_template",
                "field_messages": "messages",
            }
        ],
        "chat_template": "tokenizer_default",
        # loss on the assistant's answer (and its end-of-turn token) only; the prompt is masked
        "roles_to_train": ["assistant"],
        "train_on_eos": "turn",
        "sequence_len": settings.sequence_len,
        "sample_packing": settings.sample_packing,
        "pad_to_multiple_of": settings.pad_to_multiple_of,
        "micro_batch_size": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "max_steps": settings.max_steps,
        "learning_rate": settings.learning_rate,
        "optimizer": settings.optimizer,
        "weight_decay": settings.weight_decay,
        "lr_scheduler": settings.lr_scheduler,
        "warmup_steps": settings.warmup_steps,
        "val_set_size": settings.val_set_size,
        "eval_steps": settings.max_steps if settings.val_set_size else None,  # one eval, at the end
        "seed": settings.seed,
        "output_dir": str(work_dir / "output"),
        "dataset_prepared_path": str(work_dir / "prepared"),
        "logging_steps": max(1, min(10, settings.max_steps // 10)),
        # quoted: axolotl reads YAML 1.1, where a bare `no` is the boolean false
        "save_strategy": DoubleQuotedScalarString("no"),
        "bf16": bf16,
        "fp16": False,  # on CPU axolotl would otherwise pick fp16 and fail on a dtype mismatch
        "tf32": False,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "plugins": ["pipeline.axolotl_dvclive.DVCLivePlugin"],
    }
    config["attn_implementation"] = "flash_attention_2" if settings.flash_attention else "sdpa"
    if settings.adapter == "lora":
        config.update(
            adapter="lora",
            lora_r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            lora_target_linear=settings.lora_target_linear,
            # axolotl's Triton LoRA kernels need CUDA
            lora_mlp_kernel=bf16,
            lora_qkv_kernel=bf16,
            lora_o_kernel=bf16,
        )
    return {key: value for key, value in config.items() if value is not None}


def dataset_format(dataset: str | Path) -> str:
    """axolotl's `ds_type` for a local file."""
    suffix = Path(dataset).suffix
    if suffix not in DATASET_FORMATS:
        raise SystemExit(f"error: expert dataset {dataset}: use a {', '.join(DATASET_FORMATS)} file of chat messages")
    return DATASET_FORMATS[suffix]


def count_long_rows(dataset: Path, tokenizer: Any, sequence_len: int) -> tuple[int, int]:
    """(rows, rows longer than sequence_len once rendered with the chat template)."""
    from datasets import load_dataset

    rows = load_dataset(dataset_format(dataset), data_files=str(dataset), split="train")
    if "messages" not in rows.column_names:
        raise SystemExit(f"error: expert dataset {dataset} has no `messages` column (columns: {rows.column_names})")
    lengths = [len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
               for messages in rows["messages"]]  # fmt: skip
    too_long = sum(length > sequence_len for length in lengths)
    return len(lengths), too_long


def check_dropped(settings: SFTSettings, dataset: Path, where: str, rows: int, dropped: int, when: str) -> None:
    """`where`: the params key of the run's settings (finetune.experts.<expert>, moe_finetune.runs.<run>)."""
    if not rows:
        raise SystemExit(f"error: {where}: dataset {dataset} has no rows")
    if dropped == rows or dropped / rows > settings.max_dropped_share:
        defaults = where.split(".")[0] + ".defaults"
        raise SystemExit(
            f"error: {dropped} of {rows} rows of {dataset} {when} longer than sequence_len {settings.sequence_len} "
            f"tokens; axolotl drops them (max_dropped_share is {settings.max_dropped_share}). Raise "
            f"{where}.sequence_len (or {defaults}.sequence_len), or max_dropped_share."
        )


def prepared_rows(work_dir: Path) -> int:
    """Rows axolotl kept: its prepared (tokenized and filtered) dataset, before the val split."""
    from datasets import load_from_disk

    (prepared,) = [p for p in (work_dir / "prepared").iterdir() if p.is_dir()]
    return len(load_from_disk(str(prepared)))


def start_axolotl(module: str, config_path: Path, live_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, DVCLIVE_DIR_VARIABLE: str(live_dir.resolve()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    command = [sys.executable, "-m", module, str(config_path), *extra]
    log.info("running %s", " ".join(command))
    return subprocess.Popen(command, env=env, cwd=PROJECT_ROOT)


def wait_for_axolotl(process: subprocess.Popen) -> None:
    if process.wait() != 0:
        command = " ".join(process.args[1:])
        raise SystemExit(f"error: `{command}` failed with exit code {process.returncode} (its log is above)")


def run(
    settings: SFTSettings,
    expert: str,
    base_model: str,
    dataset: Path,
    out_dir: Path,
    work_dir: Path,
    live_dir: Path,
    *,
    where: str | None = None,
    extra_config: dict[str, Any] | None = None,
    stage: str | None = None,
    card_title: str | None = None,
) -> dict[str, Any]:
    """Fine-tune one model; write the model folder and its curves; return summary metrics.

    The MoE training stage reuses this with its own settings key (`where`), extra axolotl keys
    (`extra_config`), stage name and model card title.
    """
    where = where or f"finetune.experts.{expert}"
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    config = {
        **axolotl_config(settings, base_model, str(dataset), work_dir, use_bf16(settings)),
        **(extra_config or {}),
    }
    config_path = work_dir / "axolotl.yaml"
    with open(config_path, "w") as handle:
        YAML().dump(config, handle)
    # The curves go to the work folder first and replace live_dir only when all went well.
    work_live = work_dir / "live"
    # axolotl spends its first ~10 s importing, on one core: the data check runs meanwhile on
    # the other. A failed check stops axolotl before it has trained.
    training = start_axolotl("axolotl.cli.train", config_path, work_live)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_model)
        rows, too_long = count_long_rows(dataset, tokenizer, settings.sequence_len)
        check_dropped(settings, dataset, where, rows, too_long, "are")
    except BaseException:
        training.kill()
        training.wait()
        shutil.rmtree(work_dir)
        raise
    log.info("%d rows, %d longer than %d tokens", rows, too_long, settings.sequence_len)
    wait_for_axolotl(training)
    kept = prepared_rows(work_dir)
    check_dropped(settings, dataset, where, rows, rows - kept, "were")  # what axolotl really did
    trained = work_dir / "output"
    if settings.adapter == "lora":
        wait_for_axolotl(start_axolotl("axolotl.cli.merge_lora", config_path, work_live, f"--lora-model-dir={trained}"))
        trained = trained / "merged"

    with atomic_dir(out_dir) as tmp:
        for path in sorted(trained.iterdir()):
            if (
                path.name in MODEL_FILES
                or path.suffix == ".safetensors"
                or path.name.endswith(".safetensors.index.json")
            ):
                shutil.copy2(path, tmp / path.name)
        if "model_config" in config:
            restore_model_config(tmp / "config.json", Path(base_model) / "config.json", config["model_config"])
        shutil.copy2(config_path, tmp / "axolotl.yaml")
        summary = {**summarize(work_live), "data/rows": rows, "data/rows_trained_on": kept}
        card = model_card(card_title or f"Expert `{expert}`", stage or f"finetune@{expert}", base_model, str(dataset),
                          settings, summary)  # fmt: skip
        (tmp / "README.md").write_text(card)
    if live_dir.exists():
        shutil.rmtree(live_dir)
    live_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(work_live, live_dir)
    shutil.rmtree(work_dir)
    return summary


def restore_model_config(config_path: Path, base_config_path: Path, overrides: dict[str, Any]) -> None:
    """Undo axolotl's training-time `model_config` overrides in the saved config.json.

    They are training settings (e.g. Mixtral's output_router_logits for the load-balancing
    loss), which would otherwise stay on for inference and break generation with a KV cache.
    """
    saved, base = json.loads(config_path.read_text()), json.loads(base_config_path.read_text())
    for key in overrides:
        if key in base:
            saved[key] = base[key]
        else:
            saved.pop(key, None)
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def summarize(live_dir: Path) -> dict[str, Any]:
    """Last train loss and eval loss, from the dvclive summary the plugin wrote."""
    values = json.loads((live_dir / "metrics.json").read_text())
    summary = {f"{group}/loss": round(values[group]["loss"], 4) for group in ("train", "eval") if group in values}
    summary["steps"] = values.get("step")
    return summary


def model_card(
    title: str, stage: str, base_model: str, dataset: str, settings: SFTSettings, summary: dict[str, Any]
) -> str:
    return f"""# {title}

Trained by this project's `{stage}` stage with axolotl from `{base_model}` on
`{dataset}` (loss on the answers only). The generated axolotl config is `axolotl.yaml`.

## Final metrics

```json
{dumps_json(summary)}```

## SFT settings

```json
{dumps_json(settings.model_dump(mode="json"))}```
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--expert", required=True, help="expert name (a key of finetune.experts)")
    parser.add_argument("--base-model", required=True, help="model folder to start from")
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for axolotl's own outputs")
    parser.add_argument("--live", type=Path, required=True, help="dvclive folder (curves)")
    parser.add_argument("--metrics", type=Path, required=True, help="summary JSON (a DVC metric)")
    args = parser.parse_args(argv)
    params = start(f"finetune@{args.expert}")
    expert = params.finetune.experts[args.expert]
    settings = expert.resolve(params.finetune.defaults)
    configure_environment()
    summary = run(settings, args.expert, args.base_model, Path(expert.dataset), args.out, args.work, args.live)
    write_json(args.metrics, summary)


if __name__ == "__main__":
    main()
