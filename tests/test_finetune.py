"""The finetune stage: real axolotl runs on the tiny model; configs valid for CPU and GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.params import PROJECT_ROOT, SFTSettings
from stages import finetune

TINY_SFT = SFTSettings(max_steps=30, learning_rate=5e-3, micro_batch_size=16, sequence_len=64, warmup_steps=3)


def finetune_into(root: Path, settings: SFTSettings, base: Path, dataset: Path) -> dict:
    return finetune.run(settings, "addition", str(base), dataset, root / "out", root / "work", root / "live")


@pytest.fixture(scope="module")
def expert(tiny_pretrained, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("expert")
    base = tiny_pretrained[1] / "model"
    summary = finetune_into(root, TINY_SFT, base, tiny_data / "sft" / "addition.jsonl")
    return summary, root, base


def curve(root: Path, name: str) -> list[float]:
    rows = (root / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[-1]) for row in rows]


def test_expert_trains_through_axolotl(expert):
    summary, root, base = expert
    losses = curve(root, "train/loss")
    assert len(losses) >= 5 and losses[-1] < 0.7 * losses[0]
    assert summary["steps"] == 30 and summary["eval/loss"] < 0.7 * losses[0]
    assert summary["data/rows"] == summary["data/rows_trained_on"] == 300  # none too long, none lost
    assert curve(root, "eval/loss") and curve(root, "train/lr")


def test_expert_folder_is_a_clean_loadable_model(expert):
    _, root, base = expert
    out = root / "out"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "axolotl.yaml", "README.md"} <= names
    assert "debug.log" not in names and not (root / "work").exists()  # timestamped logs stay out
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 41 plus 7?"}],
                                           tokenize=False, add_generation_prompt=True)  # fmt: skip
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    before = load_file(base / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_loss_is_on_the_answer_only(expert, tiny_data, tmp_path):
    """axolotl's own preprocessing of a real row: prompt tokens are masked, the answer is not."""
    _, root, base = expert
    config = finetune.axolotl_config(TINY_SFT, str(base), str(tiny_data / "sft" / "addition.jsonl"), tmp_path, False)
    config_path = tmp_path / "axolotl.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    subprocess.run([sys.executable, "-m", "axolotl.cli.preprocess", str(config_path)], cwd=PROJECT_ROOT,
                   check=True, capture_output=True)  # fmt: skip
    prepared = next(p for p in (tmp_path / "prepared").iterdir() if p.is_dir())
    row = load_from_disk(str(prepared))[0]
    tokenizer = AutoTokenizer.from_pretrained(base)
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    text = tokenizer.decode(row["input_ids"])
    answer = text.split("A:\n")[1].removesuffix("</s>")
    assert tokenizer.decode(trained) == f"{answer}</s>"  # exactly the answer and its end of turn
    assert text.startswith("<s>Q: What is") and row["labels"][: text.index("A:") // 4].count(-100) > 0


def test_lora_adapter_is_merged_into_a_full_model(tiny_pretrained, tiny_data, tmp_path):
    settings = TINY_SFT.model_copy(update={"adapter": "lora", "max_steps": 10, "lora_r": 4, "lora_alpha": 8})
    base = tiny_pretrained[1] / "model"
    finetune_into(tmp_path, settings, base, tiny_data / "sft" / "addition.jsonl")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in names and not any("adapter" in n for n in names)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    assert merged.keys() == original.keys()  # no lora_A/lora_B left: a plain model
    assert any(not torch.equal(merged[k], original[k]) for k in original)


def test_rows_too_long_fail_before_training(tiny_pretrained, tiny_data, tmp_path):
    settings = TINY_SFT.model_copy(update={"sequence_len": 12})
    with pytest.raises(
        SystemExit,
        match=r"are longer than sequence_len 12 tokens; axolotl drops them.*finetune.experts.addition.sequence_len",
    ):
        finetune_into(tmp_path, settings, tiny_pretrained[1] / "model", tiny_data / "sft" / "counting.jsonl")
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_cpu_config_has_the_settings_cpu_needs():
    config = finetune.axolotl_config(SFTSettings(adapter="lora"), "base", "data.jsonl", Path("/w"), bf16=False)
    assert (config["bf16"], config["fp16"], config["attn_implementation"]) == (False, False, "sdpa")
    assert not any(config[k] for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"))
    assert config["roles_to_train"] == ["assistant"] and config["save_strategy"] == "no"


def test_gpu_profile_config_passes_axolotls_own_validation():
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    settings = SFTSettings(adapter="lora", precision="bf16", flash_attention=True, sample_packing=True,
                           gradient_checkpointing=True, micro_batch_size=2, gradient_accumulation_steps=2)  # fmt: skip
    config = finetune.axolotl_config(settings, "base", "data.jsonl", Path("/w"), bf16=True)
    validated = validate_config(DictDefault(config))
    assert validated.bf16 is True and validated.attn_implementation == "flash_attention_2"
    assert validated.adapter == "lora" and validated.sample_packing is True
    assert validated.pad_to_multiple_of == settings.pad_to_multiple_of == 8


def test_parquet_datasets_and_their_checks(tiny_tokenized, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenized[0])
    short = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes"}]
    long = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "No"}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": short}, {"messages": short}, {"messages": long}]), path)
    assert finetune.count_long_rows(path, tokenizer, 64) == (3, 1)
    config = finetune.axolotl_config(SFTSettings(), "base", str(path), tmp_path, bf16=False)
    assert config["datasets"][0]["ds_type"] == "parquet"
    wrong = tmp_path / "plain.jsonl"
    wrong.write_text('{"text": "no messages here"}\n')
    with pytest.raises(SystemExit, match="has no `messages` column"):
        finetune.count_long_rows(wrong, tokenizer, 64)
    with pytest.raises(SystemExit, match=r"use a .jsonl, .json, .parquet file"):
        finetune.dataset_format("chat.csv")
