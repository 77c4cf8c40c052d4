"""One SFT code path for every model trained with axolotl: the experts, the dense baseline and the
MoE training runs.

`run()` turns validated SFT settings into an axolotl config (saved as axolotl.yaml with the
model), runs `axolotl.cli.train` in a subprocess (and `axolotl.cli.merge_lora` for LoRA),
checks while axolotl starts up (before it trains) and again in its prepared dataset that no more
than `max_dropped_share` of the rows are too long for `sequence_len` (axolotl drops those
without a word), and copies only the model files from axolotl's work folder into the output, so
that an identical rerun gives identical output hashes (axolotl's own output folder also holds
timestamped logs). With `replay_rows`, passages of pretraining text join the SFT rows.

With `processes` > 1 (or several machines: torchrun's PET_NNODES in the environment) training runs
under torchrun, one process per GPU (gloo on CPU), with DDP, FSDP2 or DeepSpeed ZeRO as
`distributed` says; the data checks and the merge still run once, in this process. On several
machines the stage runs on each (PET_NODE_RANK 0, 1, ...); only the first writes the model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from pipeline import stage
from pipeline.atomic import atomic_dir, atomic_path
from pipeline.curves import last_value
from pipeline.lineage import json_block, model_id, render_card, write_lineage
from pipeline.records import DATASET_FORMATS, dataset_format, json_records, open_parquet
from pipeline.settings.base import PROJECT_ROOT, InputError
from pipeline.settings.sft import SFTSettings
from pipeline.stage import DVCLIVE_DIR_VARIABLE, RunFailed, die_with_parent

log = logging.getLogger("pipeline.sft")

LORA_ADAPTERS = ("lora", "qlora")  # trained as an adapter and merged into the model at the end
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")  # fmt: skip


def use_bf16(settings: SFTSettings) -> bool:
    """Whether axolotl trains in bfloat16: the rule of every stage, on this machine's device."""
    return stage.use_bf16(settings.precision, stage.resolve_device())


def axolotl_config(
    settings: SFTSettings,
    base_model: str,
    dataset: str,
    work_dir: Path,
    bf16: bool,
    replay: str | None = None,
    deepspeed_config: Path | None = None,
) -> dict[str, Any]:
    """The axolotl configuration for one expert (keys as in axolotl's config reference)."""
    datasets = [
        {
            # as given: a relative path resolves against the project root, where axolotl
            # runs, so the saved config does not depend on where the project is checked out
            "path": dataset,
            "ds_type": dataset_format(dataset),
            "type": "chat_template",
            "field_messages": "messages",
            # loss on the assistant's answer (and its end-of-turn token) only; the prompt is masked.
            # axolotl reads these two per dataset (a top-level key would be ignored without a word);
            # eot_tokens below is its one top-level key of the three
            "roles_to_train": ["assistant"],
            "train_on_eos": "turn",
        }
    ]
    if replay:
        # plain text, language-model loss on every token (axolotl's `completion` type)
        datasets.append({"path": replay, "ds_type": "json", "type": "completion", "field": "text"})
    config: dict[str, Any] = {
        "base_model": base_model,
        "datasets": datasets,
        "chat_template": "tokenizer_default",
        "eot_tokens": settings.eot_tokens,  # None: axolotl takes the tokenizer's eos
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
    if settings.adapter in LORA_ADAPTERS:
        config.update(
            adapter=settings.adapter,
            load_in_4bit=settings.adapter == "qlora" or None,  # bitsandbytes' 4-bit base weights
            lora_r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            lora_target_linear=settings.lora_target_linear,
            # axolotl's Triton LoRA kernels need CUDA
            lora_mlp_kernel=bf16,
            lora_qkv_kernel=bf16,
            lora_o_kernel=bf16,
        )
    config.update(strategy_config(settings, base_model, deepspeed_config))
    return {key: value for key, value in config.items() if value is not None}


def strategy_config(settings: SFTSettings, base_model: str, deepspeed_config: Path | None) -> dict[str, Any]:
    """axolotl keys for `distributed` (DDP needs none: torchrun's processes make it)."""
    if settings.distributed == "fsdp":
        return {
            "fsdp_version": 2,
            "fsdp_config": {
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": decoder_layer_class(base_model),
                "state_dict_type": "FULL_STATE_DICT",  # the saved model is one plain safetensors file
                "reshard_after_forward": True,
            },
        }
    if settings.distributed.startswith("deepspeed"):
        if deepspeed_config is None:
            raise ValueError(f"distributed is {settings.distributed} but no deepspeed_config path was given")
        return {"deepspeed": str(deepspeed_config)}
    return {}


def decoder_layer_class(base_model: str) -> str:
    """The block FSDP shards as one unit: the model class's own `_no_split_modules` (LlamaDecoderLayer, ...)."""
    import transformers

    config = json.loads((Path(base_model) / "config.json").read_text())
    architecture = config.get("architectures", [None])[0]
    model_class = getattr(transformers, str(architecture), None)
    if not getattr(model_class, "_no_split_modules", None):
        raise InputError(
            f"sft.distributed: fsdp needs the decoder layer class of {base_model}, but transformers has no "
            f"model class {architecture} that names it; use ddp or deepspeed_zero2/3"
        )
    return ",".join(model_class._no_split_modules)


def deepspeed_zero(stage: int) -> dict[str, Any]:
    """A ZeRO config in axolotl's own style: "auto" values are filled in from the axolotl config."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        # gather the shards into a whole model when it is saved
        zero.update(stage3_gather_16bit_weights_on_model_save=True, reduce_bucket_size="auto",
                    stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")  # fmt: skip
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }


def torchrun_launch(settings: SFTSettings) -> bool:
    """Whether axolotl trains under torchrun: several processes here, a sharded strategy, or several
    machines (torchrun's own PET_NNODES in the environment)."""
    return settings.processes > 1 or settings.distributed != "ddp" or "PET_NNODES" in os.environ


def launcher(settings: SFTSettings) -> list[str]:
    """The command that starts `-m <axolotl module>`: python, or torchrun with one process per GPU."""
    if not torchrun_launch(settings):
        return [sys.executable]
    # alone: a rendezvous on a free local port; on several machines torchrun reads PET_NNODES,
    # PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT from the environment (docs/tutorials/gpus-and-machines.md)
    rendezvous = [] if "PET_NNODES" in os.environ else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={settings.processes}"]


def process_environment(settings: SFTSettings, device: str) -> dict[str, str]:
    """Variables for axolotl's processes: threads shared out among them; gloo on CPU."""
    if not torchrun_launch(settings):
        return {}
    # compute.threads (configure_compute put it in OMP_NUM_THREADS) is this machine's share:
    # each process takes its part, or every process would spin on every core
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    each = str(max(1, threads // settings.processes))
    environment = {"OMP_NUM_THREADS": each, "MKL_NUM_THREADS": each}
    if device == "cpu":
        # accelerate picks gloo (and the CPU) only when told; otherwise each process trains alone
        environment["ACCELERATE_USE_CPU"] = "true"
    return environment


def check_machine(settings: SFTSettings, device: str) -> None:
    """Settings this machine cannot run, refused before axolotl starts (`make check` validates a GPU
    profile on any machine, so this is not part of the schema)."""
    if settings.adapter == "qlora" and device == "cpu":
        raise InputError(
            "sft.adapter is qlora, which needs a CUDA GPU (bitsandbytes 4-bit); this machine has none: use lora on CPU"
        )
    if settings.distributed.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise InputError(
            f"sft.distributed is {settings.distributed}, but deepspeed is not installed: `pip install deepspeed` "
            "(GPU machines), or use ddp or fsdp"
        )


CHAT_ROW = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


def check_chat_row(path: Path, where: str, row: Any) -> None:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{path} {where} has no `messages` list; each row must look like {CHAT_ROW}")
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):  # fmt: skip
            raise InputError(
                f"{path} {where}: a message lacks a `role` or `content` string ({json.dumps(message)[:80]}); "
                f"each row must look like {CHAT_ROW}"
            )


def check_chat_parquet(path: Path) -> None:
    """The `messages` column's type and the row count, from the footer alone."""
    import pyarrow

    parquet = open_parquet(path)
    schema = parquet.schema_arrow
    if "messages" not in schema.names:
        raise InputError(f"SFT dataset {path} has no `messages` column (columns: {schema.names})")
    column = schema.field("messages").type
    fields = column.value_type if pyarrow.types.is_list(column) or pyarrow.types.is_large_list(column) else None
    if fields is None or not pyarrow.types.is_struct(fields) or not {"role", "content"} <= set(fields.names):
        raise InputError(
            f"SFT dataset {path}: column `messages` is {column}; it must be a list of {{role, content}} structs"
        )
    if not parquet.metadata.num_rows:
        raise InputError(f"SFT dataset {path} has no rows")


def check_sft_dataset(path: Path) -> None:
    """Raise InputError unless `path` is a chat-messages file axolotl can train on: a .jsonl/.json
    file of UTF-8 JSON rows, each with a non-empty `messages` list of {role, content} messages,
    or a .parquet file with such a column; at least one row. One pass over the file, no tokenizer:
    cheap enough for `make check`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"SFT dataset {path} is a folder; give one {', '.join(DATASET_FORMATS)} file of chat messages")
    if not path.is_file():
        raise InputError(f"SFT dataset {path} does not exist")
    if dataset_format(path) == "parquet":
        check_chat_parquet(path)
        return
    rows = 0
    for where, row in json_records(path):
        check_chat_row(path, where, row)
        rows += 1
    if not rows:
        raise InputError(f"SFT dataset {path} has no rows; write one {CHAT_ROW} per line")


def write_replay(text_file: Path, base_model: str, settings: SFTSettings, out: Path) -> None:
    """Draw settings.replay_rows passages of text_file (seeded) into out (jsonl, `text`).

    A passage is one or more whole sentences of a document, at most replay_max_tokens (and
    sequence_len) tokens long: as short as the SFT rows, so that batches padded to their longest
    row stay short. Each passage is exactly one training row, so the rows axolotl keeps can still
    be checked against the SFT dataset's. The tokenizer is read with the `tokenizers` library
    (fast to import): axolotl starts only once this file exists.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(base_model) / "tokenizer.json"))
    documents = read_texts(text_file)
    order = list(range(len(documents)))
    random.Random(settings.seed).shuffle(order)
    # a passage longer than sequence_len would be cut into several rows (axolotl's completion
    # type splits texts into sequence_len pieces), and the rows kept could no longer be checked
    max_tokens = min(settings.replay_max_tokens, settings.sequence_len)
    passages: list[str] = []
    for index in order:
        sentences = re.split(r"(?<=[.!?])\s+", documents[index].strip())
        passage = ""
        for sentence in sentences:
            longer = f"{passage} {sentence}".strip()
            # +1: axolotl appends the end-of-text token
            if len(tokenizer.encode(longer).ids) + 1 <= max_tokens:
                passage = longer
                continue
            if passage:
                passages.append(passage)
            short_enough = len(tokenizer.encode(sentence).ids) + 1 <= max_tokens
            passage = sentence if short_enough else ""
        if passage:
            passages.append(passage)
        if len(passages) >= settings.replay_rows:
            break
    if len(passages) < settings.replay_rows:
        raise InputError(
            f"replay_rows is {settings.replay_rows}, but {text_file} gives only {len(passages)} passages "
            f"of at most {max_tokens} tokens (replay_max_tokens {settings.replay_max_tokens}, sequence_len "
            f"{settings.sequence_len}): lower replay_rows or raise replay_max_tokens"
        )
    out.write_text("".join(json.dumps({"text": text}) + "\n" for text in passages[: settings.replay_rows]))


def read_texts(path: Path) -> list[str]:
    """The `text` column of a .jsonl or .parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path, columns=["text"]).column("text").to_pylist()
    if path.suffix != ".jsonl":
        raise InputError(f"finetune.replay_text {path}: use a .jsonl or .parquet file with a `text` column")
    texts = []
    for where, row in json_records(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(f'{path} {where} has no `text` string; each row must look like {{"text": "..."}}')
        texts.append(row["text"])
    return texts


def count_long_rows(dataset: Path, tokenizer: Any, sequence_len: int) -> tuple[int, int]:
    """(rows, rows longer than sequence_len once rendered with the chat template)."""
    from datasets import load_dataset

    rows = load_dataset(dataset_format(dataset), data_files=str(dataset), split="train")
    if "messages" not in rows.column_names:
        raise InputError(f"SFT dataset {dataset} has no `messages` column (columns: {rows.column_names})")
    lengths = [len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
               for messages in rows["messages"]]  # fmt: skip
    too_long = sum(length > sequence_len for length in lengths)
    return len(lengths), too_long


def check_dropped(settings: SFTSettings, dataset: Path, where: str, rows: int, dropped: int, when: str) -> None:
    """`where`: the params key of the run's settings (finetune.experts.<expert>, moe_finetune.runs.<run>)."""
    if not rows:
        raise InputError(f"{where}: dataset {dataset} has no rows")
    if dropped == rows or dropped / rows > settings.max_dropped_share:
        raise InputError(
            f"{dropped} of {rows} rows of {dataset} {when} longer than sequence_len {settings.sequence_len} "
            f"tokens; axolotl drops them (max_dropped_share is {settings.max_dropped_share}). Raise "
            f"{where}.sequence_len (or sft.sequence_len, for every run), or max_dropped_share."
        )


def prepared_rows(work_dir: Path) -> int:
    """Rows axolotl kept: its prepared (tokenized and filtered) dataset, before the val split."""
    from datasets import load_from_disk

    (prepared,) = [p for p in (work_dir / "prepared").iterdir() if p.is_dir()]
    return len(load_from_disk(str(prepared)))


def start_axolotl(
    module: str,
    config_path: Path,
    live_dir: Path,
    *extra: str,
    launch: tuple[list[str], dict[str, str]] = ([sys.executable], {}),
) -> subprocess.Popen:
    """launch: the command before `-m module` and the variables it adds (see `launcher`)."""
    prefix, variables = launch
    env = {**os.environ, DVCLIVE_DIR_VARIABLE: str(live_dir.resolve()), **variables,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    command = [*prefix, "-m", module, str(config_path), *extra]
    log.info("running %s", " ".join(command))
    # axolotl dies with the stage: no orphan trains on after a stop
    return subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, preexec_fn=die_with_parent)


def wait_for_axolotl(process: subprocess.Popen) -> None:
    try:
        process.wait()
    except BaseException:  # the stage is stopping (SIGTERM, Ctrl-C): stop axolotl first
        process.kill()
        process.wait()
        raise
    if process.returncode != 0:
        command = " ".join(process.args[1:])
        raise RunFailed(f"`{command}` failed with exit code {process.returncode} (its log is above)")


@dataclass(frozen=True)
class Target:
    """What one SFT run makes and where its files go."""

    kind: str  # pipeline.kinds.MODEL_KINDS: expert, dense or moe_trained
    name: str
    stage: str  # the dvc.yaml stage, e.g. finetune@addition
    where: str  # the params key of the run's settings, named in errors
    out_dir: Path  # the model folder
    work_dir: Path  # axolotl's scratch folder, removed at the end
    live_dir: Path  # dvclive curves


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line paths of what an SFT stage writes (finetune, dense, moe_finetune, adapter, qat, dpo)."""
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    # under .tmp/ (pipeline/atomic.py's scratch): a killed run leaves nothing in the tracked tree
    parser.add_argument("--work", type=Path, required=True, help="axolotl's scratch folder, removed at the end")
    parser.add_argument("--live", type=Path, required=True, help="dvclive folder (curves)")
    parser.add_argument("--metrics", type=Path, required=True, help="summary JSON (a DVC metric)")


def run(
    settings: SFTSettings,
    base_model: str,
    dataset: Path,
    target: Target,
    *,
    replay_text: Path | None = None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune base_model on dataset; write the model folder and its curves; return summary metrics.

    extra_config: axolotl keys on top of the generated ones (the MoE runs' modes). With
    settings.replay_rows, that many passages of replay_text join the SFT rows.
    """
    check_sft_dataset(dataset)  # before axolotl starts: a bad file costs seconds, not its start-up
    check_machine(settings, stage.resolve_device())
    if target.work_dir.exists():
        shutil.rmtree(target.work_dir)
    target.work_dir.mkdir(parents=True)
    try:
        return train(settings, base_model, dataset, target, replay_text, extra_config)
    finally:  # whichever way the run ends: the scratch folder goes (axolotl's checkpoints are not resumed)
        shutil.rmtree(target.work_dir, ignore_errors=True)


def train(
    settings: SFTSettings,
    base_model: str,
    dataset: Path,
    target: Target,
    replay_text: Path | None,
    extra_config: dict[str, Any] | None,
) -> dict[str, Any]:
    work_dir, where = target.work_dir, target.where
    replay = None
    if settings.replay_rows:
        if replay_text is None:
            raise ValueError(f"{where}: replay_rows is {settings.replay_rows} but no replay_text was given")
        replay = work_dir / "replay.jsonl"
        write_replay(replay_text, base_model, settings, replay)
    deepspeed_config = None
    if settings.distributed.startswith("deepspeed"):
        deepspeed_config = work_dir / f"{settings.distributed}.json"
        deepspeed_config.write_text(json.dumps(deepspeed_zero(int(settings.distributed[-1])), indent=2) + "\n")
    config = {
        **axolotl_config(
            settings, base_model, str(dataset), work_dir, use_bf16(settings), replay and str(replay), deepspeed_config
        ),
        **(extra_config or {}),
    }
    device = stage.resolve_device()
    if torchrun_launch(settings) and device == "cpu":
        config["plugins"] = [*config["plugins"], "pipeline.axolotl_cpu_processes.CPUProcessesPlugin"]
    config_path = work_dir / "axolotl.yaml"
    with open(config_path, "w") as handle:
        YAML().dump(config, handle)
    # The curves go to the work folder first and replace live_dir only when all went well.
    work_live = work_dir / "live"
    # axolotl spends its first ~10 s importing, on one core: the data check runs meanwhile on
    # the other. A failed check stops axolotl before it has trained.
    launch = launcher(settings), process_environment(settings, device)
    training = start_axolotl("axolotl.cli.train", config_path, work_live, launch=launch)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_model)
        rows, too_long = count_long_rows(dataset, tokenizer, settings.sequence_len)
        check_dropped(settings, dataset, where, rows, too_long, "are")
    except BaseException:
        training.kill()
        training.wait()
        raise
    log.info("%d rows, %d longer than %d tokens", rows, too_long, settings.sequence_len)
    wait_for_axolotl(training)
    if os.environ.get("PET_NODE_RANK", "0") != "0":
        # another machine of a several-machine run (static rendezvous: global rank 0, which saves
        # the model, is on machine 0): its processes trained their share; the first writes the outputs
        log.info("machine %s of a torchrun run: training done, the first machine writes the model",
                 os.environ["PET_NODE_RANK"])  # fmt: skip
        return {}
    kept = prepared_rows(work_dir) - settings.replay_rows
    check_dropped(settings, dataset, where, rows, rows - kept, "were")  # what axolotl really did
    trained = work_dir / "output"
    if settings.adapter in LORA_ADAPTERS:  # one process merges
        wait_for_axolotl(start_axolotl("axolotl.cli.merge_lora", config_path, work_live, f"--lora-model-dir={trained}"))
        trained = trained / "merged"

    with atomic_dir(target.out_dir) as tmp:
        copy_model_files(trained, tmp)
        if "model_config" in config:
            restore_model_config(tmp / "config.json", Path(base_model) / "config.json", config["model_config"])
        if config.get("merge_method") == "legacy":
            restore_generation_config(tmp / "generation_config.json", Path(base_model))
        write_saved_config(config, work_dir, tmp / "axolotl.yaml")
        if deepspeed_config:  # the file axolotl.yaml names, beside it
            shutil.copy2(deepspeed_config, tmp / deepspeed_config.name)
        summary = {**summarize(work_live), "data/rows": rows, "data/rows_trained_on": kept,
                   "data/replay_rows": settings.replay_rows}  # fmt: skip
        (tmp / "README.md").write_text(sft_model_card(target, base_model, str(dataset), settings, summary))
        lineage_settings = {"sft": settings.model_dump(mode="json"), "dataset": str(dataset), **(extra_config or {})}
        write_lineage(tmp, target.kind, target.name, target.stage, [model_id(base_model)], lineage_settings)
    with atomic_path(target.live_dir) as tmp:
        shutil.move(work_live, tmp)
    return summary


WORK_PLACEHOLDER = "<work>"  # the run's work folder, in the axolotl.yaml saved with the model

SAVED_CONFIG_HEADER = f"""\
# The axolotl config this model was trained with, generated by pipeline/sft.py. Paths in the run's
# scratch work folder (deleted after the run) start with {WORK_PLACEHOLDER}/ instead: output_dir,
# dataset_prepared_path, the replay passages, a DeepSpeed JSON (saved beside this file). So these
# bytes do not depend on where the work folder was; other paths are as axolotl read them.
"""


def without_work_folder(value: Any, work_dir: Path) -> Any:
    """`value` (a config, or any part of it) with each path inside work_dir written as <work>/..."""
    if isinstance(value, dict):
        return {key: without_work_folder(item, work_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [without_work_folder(item, work_dir) for item in value]
    if isinstance(value, str) and (value == str(work_dir) or value.startswith(f"{work_dir}{os.sep}")):
        return WORK_PLACEHOLDER + value[len(str(work_dir)) :]
    return value


def write_saved_config(config: dict[str, Any], work_dir: Path, path: Path) -> None:
    """The copy of axolotl's config that goes with the model: documentation of the run, without
    scratch paths (axolotl itself ran with the work folder's copy)."""
    with open(path, "w") as handle:
        handle.write(SAVED_CONFIG_HEADER)
        YAML().dump(without_work_folder(config, work_dir), handle)


def copy_model_files(trained: Path, folder: Path) -> None:
    """The model's own files of axolotl's output folder (weights, config, tokenizer), not its logs or
    checkpoints: what makes an identical rerun give identical output hashes."""
    for path in sorted(trained.iterdir()):
        if path.name in MODEL_FILES or path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
            shutil.copy2(path, folder / path.name)


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


def restore_generation_config(saved: Path, base_model: Path) -> None:
    """Undo axolotl's legacy merge (merge_and_unload, the adapters' LoHa/LoKr) turning sampling on
    (`do_sample: true`): the model generates as its base does, like a model merged by axolotl's
    default LoRA merge, which copies the base's file."""
    base = base_model / "generation_config.json"
    if base.is_file():
        saved.write_text(base.read_text())
    elif saved.is_file():
        config = json.loads(saved.read_text())
        config.pop("do_sample", None)
        saved.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def summarize(live_dir: Path) -> dict[str, Any]:
    """Last train loss and eval loss, and the last step, from the curves the plugin wrote."""
    summary: dict[str, Any] = {"steps": None}
    for name in ("train/loss", "eval/loss"):
        if last := last_value(live_dir, name):
            summary[name] = round(last[1], 4)
            summary["steps"] = max(summary["steps"] or 0, last[0])
    return summary


def sft_model_card(
    target: Target, base_model: str, dataset: str, settings: SFTSettings, summary: dict[str, Any]
) -> str:
    intro = f"""Trained by this project's `{target.stage}` stage with axolotl from `{base_model}` on
`{dataset}` (loss on the answers only). The generated axolotl config is `axolotl.yaml`."""
    sections = {"Final metrics": json_block(summary), "SFT settings": json_block(settings.model_dump(mode="json"))}
    return render_card(f"`{target.kind}/{target.name}`", intro, sections)
