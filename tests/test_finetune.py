"""The SFT code path (pipeline/sft.py) behind the finetune stage: real axolotl runs on the tiny
model, replay passages, lineage; configs valid for CPU and GPU."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from ruamel.yaml import YAML
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import records, sft
from pipeline.settings.base import PROJECT_ROOT, InputError
from pipeline.settings.sft import SFTSettings
from pipeline.stage import RunFailed

# replay_rows=0: the SFT rows alone (the default mixes in pretraining passages, tested on their own below)
TINY_SFT = SFTSettings(
    max_steps=30, learning_rate=5e-3, micro_batch_size=16, sequence_len=64, warmup_steps=3, replay_rows=0
)


def finetune_into(root: Path, settings: SFTSettings, base: Path, dataset: Path, replay_text: Path | None = None):
    """What the finetune@addition stage runs, with its folders under root."""
    target = sft.Target("expert", "addition", "finetune@addition", "finetune.experts.addition", root / "out",
                        root / "work", root / "live")  # fmt: skip
    return sft.run(settings, str(base), dataset, target, replay_text=replay_text)


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
    assert {"model.safetensors", "config.json", "tokenizer.json", "axolotl.yaml", "README.md", "lineage.json"} <= names
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


def test_expert_folder_says_what_it_is_and_where_it_came_from(expert, tiny_data):
    _, root, _ = expert
    lineage = json.loads((root / "out" / "lineage.json").read_text())
    assert (lineage["kind"], lineage["name"], lineage["stage"]) == ("expert", "addition", "finetune@addition")
    assert lineage["parents"] == ["base/pretrain"]  # the id the pretrained folder declares, not its path
    assert lineage["settings"]["sft"] == TINY_SFT.model_dump(mode="json")
    assert lineage["settings"]["dataset"] == str(tiny_data / "sft" / "addition.jsonl")


def test_loss_is_on_the_answer_only(expert, tiny_data, tmp_path):
    """axolotl's own preprocessing of a real row: prompt tokens are masked, the answer is not."""
    _, root, base = expert
    config = sft.axolotl_config(TINY_SFT, str(base), str(tiny_data / "sft" / "addition.jsonl"), tmp_path, False)
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


def test_lora_adapter_is_merged_into_a_full_model_and_replay_rows_join_the_sft_rows(
    tiny_pretrained, tiny_data, tmp_path
):
    """One axolotl run checks both (each run costs ~20 s): LoRA, and replay passages on top of the SFT rows."""
    settings = TINY_SFT.model_copy(
        update={"adapter": "lora", "max_steps": 10, "lora_r": 4, "lora_alpha": 8, "replay_rows": 32}
    )
    base = tiny_pretrained[1] / "model"
    summary = finetune_into(tmp_path, settings, base, tiny_data / "sft" / "addition.jsonl",
                            replay_text=tiny_data / "corpus" / "train.jsonl")  # fmt: skip
    # axolotl kept 300 + 32 rows: the replay passages are subtracted before the dropped-rows check
    assert summary["data/rows"] == summary["data/rows_trained_on"] == 300 and summary["data/replay_rows"] == 32
    config = YAML(typ="safe").load((tmp_path / "out" / "axolotl.yaml").read_text())
    sft_rows, replay = config["datasets"]
    assert sft_rows["type"] == "chat_template"
    # the saved copy names the scratch work folder (deleted by now) by a placeholder, not by its path
    assert replay == {"path": "<work>/replay.jsonl", "ds_type": "json", "type": "completion", "field": "text"}
    assert (config["output_dir"], config["dataset_prepared_path"]) == ("<work>/output", "<work>/prepared")
    assert str(tmp_path / "work") not in (tmp_path / "out" / "axolotl.yaml").read_text()
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in names and not any("adapter" in n for n in names)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(base / "model.safetensors")
    assert merged.keys() == original.keys()  # no lora_A/lora_B left: a plain model
    assert any(not torch.equal(merged[k], original[k]) for k in original)


def test_rows_too_long_fail_before_training(tiny_pretrained, tiny_data, tmp_path):
    settings = TINY_SFT.model_copy(update={"sequence_len": 12})
    with pytest.raises(
        InputError,
        match=r"are longer than sequence_len 12 tokens; axolotl drops them.*finetune.experts.addition.sequence_len",
    ):
        finetune_into(tmp_path, settings, tiny_pretrained[1] / "model", tiny_data / "sft" / "counting.jsonl")
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def replay_passages(tiny_data: Path, base: Path, out: Path, **settings) -> list[str]:
    sft.write_replay(tiny_data / "corpus" / "train.jsonl", str(base), SFTSettings(**settings), out)
    return [json.loads(line)["text"] for line in out.read_text().splitlines()]


def test_replay_passages_are_short_runs_of_whole_sentences(tiny_pretrained, tiny_data, tmp_path):
    base = tiny_pretrained[1] / "model"
    passages = replay_passages(tiny_data, base, tmp_path / "replay.jsonl", replay_rows=40, replay_max_tokens=24)
    assert len(passages) == 40 and len(set(passages)) > 30
    tokenizer = AutoTokenizer.from_pretrained(base)
    lengths = [len(tokenizer(passage)["input_ids"]) + 1 for passage in passages]  # axolotl appends </s>
    assert max(lengths) <= 24
    assert any(re.search(r"[.!?] ", passage) for passage in passages)  # sentences run on while they fit
    documents = [" ".join(json.loads(line)["text"].split())
                 for line in (tiny_data / "corpus" / "train.jsonl").read_text().splitlines()]  # fmt: skip
    for passage in passages:
        # where the passage sits in some document: starting and ending at sentence boundaries
        assert any(re.search(rf"(^|[.!?] ){re.escape(passage)}( |$)", document) for document in documents), passage
        assert passage[-1] in ".!?"
    again = replay_passages(tiny_data, base, tmp_path / "again.jsonl", replay_rows=40, replay_max_tokens=24)
    other_seed = replay_passages(tiny_data, base, tmp_path / "seed.jsonl", replay_rows=40, replay_max_tokens=24, seed=1)
    assert again == passages and other_seed != passages


def test_replay_passages_fit_in_one_row(tiny_pretrained, tiny_data, tmp_path):
    """axolotl cuts a completion text longer than sequence_len into pieces: more rows than replay_rows,
    which the rows-kept check would count as SFT rows."""
    base = tiny_pretrained[1] / "model"
    tokenizer = AutoTokenizer.from_pretrained(base)
    for sequence_len in (16, 128):
        passages = replay_passages(tiny_data, base, tmp_path / "replay.jsonl", replay_rows=40, replay_max_tokens=48,
                                   sequence_len=sequence_len)  # fmt: skip
        longest = max(len(tokenizer(passage)["input_ids"]) + 1 for passage in passages)
        assert len(passages) == 40 and (longest <= 16 if sequence_len == 16 else longest > 16)


def test_too_few_replay_passages_is_a_clear_error(tiny_pretrained, tiny_data, tmp_path):
    with pytest.raises(InputError, match=r"replay_rows is 100000, but .*train.jsonl gives only \d+ passages of at most "
                       r"48 tokens .*lower replay_rows or raise replay_max_tokens"):  # fmt: skip
        replay_passages(tiny_data, tiny_pretrained[1] / "model", tmp_path / "replay.jsonl", replay_rows=100_000)
    assert not (tmp_path / "replay.jsonl").exists()


def test_a_failed_axolotl_run_is_one_line_naming_the_command():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RunFailed, match=r"^`-c raise SystemExit\(3\)` failed with exit code 3 \(its log is above\)$"):
        sft.wait_for_axolotl(process)


def test_cpu_config_has_the_settings_cpu_needs():
    config = sft.axolotl_config(SFTSettings(adapter="lora"), "base", "data.jsonl", Path("/w"), bf16=False)
    assert (config["bf16"], config["fp16"], config["attn_implementation"]) == (False, False, "sdpa")
    assert len(config["datasets"]) == 1  # no replay dataset unless asked for
    assert not any(config[k] for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"))
    assert config["save_strategy"] == "no"
    # axolotl reads which tokens get the loss per dataset entry (a top-level key is ignored)
    assert {"roles_to_train", "train_on_eos"}.isdisjoint(config)
    assert (config["datasets"][0]["roles_to_train"], config["datasets"][0]["train_on_eos"]) == (["assistant"], "turn")


def test_gpu_profile_config_passes_axolotls_own_validation():
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    settings = SFTSettings(adapter="lora", precision="bf16", flash_attention=True, sample_packing=True,
                           gradient_checkpointing=True, micro_batch_size=2, gradient_accumulation_steps=2)  # fmt: skip
    config = sft.axolotl_config(settings, "base", "data.jsonl", Path("/w"), bf16=True, replay="replay.jsonl")
    validated = validate_config(DictDefault(config))
    assert validated.bf16 is True and validated.attn_implementation == "flash_attention_2"
    assert validated.adapter == "lora" and validated.sample_packing is True
    assert validated.pad_to_multiple_of == settings.pad_to_multiple_of == 8
    assert [d.type for d in validated.datasets] == ["chat_template", "completion"]
    # the answer-only loss keys reach the chat rows; the replay rows keep the loss on every token
    assert (validated.datasets[0].roles_to_train, validated.datasets[0].train_on_eos) == (["assistant"], "turn")
    assert (validated.datasets[1].roles_to_train, validated.datasets[1].train_on_eos) == (None, None)


def test_parquet_datasets_and_their_checks(tiny_tokenized, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenized[0])
    short = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes"}]
    long = [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "No"}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": short}, {"messages": short}, {"messages": long}]), path)
    assert sft.count_long_rows(path, tokenizer, 64) == (3, 1)
    config = sft.axolotl_config(SFTSettings(), "base", str(path), tmp_path, bf16=False)
    assert config["datasets"][0]["ds_type"] == "parquet"
    wrong = tmp_path / "plain.jsonl"
    wrong.write_text('{"text": "no messages here"}\n')
    with pytest.raises(InputError, match=r"plain.jsonl line 1 has no `messages` list"):
        sft.check_sft_dataset(wrong)
    with pytest.raises(InputError, match=r"use a .jsonl, .json, .parquet file"):
        records.dataset_format("chat.csv")
