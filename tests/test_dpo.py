"""Preference tuning (stages/dpo.py) and the data stage's preference pairs: a real axolotl DPO run on
the tiny model, from a parquet file, measured on held-out pairs."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch
from ruamel.yaml import YAML
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline import sft
from pipeline.preference import read_pairs
from pipeline.settings.base import InputError
from pipeline.settings.sft import SFTSettings
from stages import data, dpo
from tests.conftest import TINY_DATA
from tests.test_data import correct_answer, output_files, read_jsonl

# The comparison skill: its pairs (the larger number over another) are learnable by the tiny model
# in a few dozen steps; measured 0.70 -> 0.85 of the 60 held-out pairs (2-core Xeon).
TINY_DPO = SFTSettings(
    max_steps=60, learning_rate=3e-3, micro_batch_size=8, sequence_len=64, warmup_steps=2, replay_rows=0,
    val_set_size=0,
)  # fmt: skip
TRAIN_PAIRS = 256


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory) -> Path:
    """The data stage on TINY_DATA with the preference pairs: corpus/, sft/, eval/ and preference/."""
    root = tmp_path_factory.mktemp("preference_data")
    data.run(TINY_DATA, root / "corpus", root / "sft", root / "eval", root / "validation", root / "preference")
    return root


def test_preference_pairs_leave_the_other_outputs_unchanged(preference_data, tiny_data):
    files = output_files(tiny_data)
    assert [f for f in output_files(preference_data) if f.parts[0] != "preference"] == files
    _, mismatch, errors = filecmp.cmpfiles(tiny_data, preference_data, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors


def test_preference_pairs_choose_the_right_answer(preference_data):
    for skill in TINY_DATA.skills.names:
        train = read_jsonl(preference_data / "preference" / "train" / f"{skill}.jsonl")
        held_out = read_jsonl(preference_data / "preference" / "eval" / f"{skill}.jsonl")
        eval_rows = read_jsonl(preference_data / "eval" / f"{skill}.jsonl")
        assert len(train) == TINY_DATA.skills.train_examples and len(held_out) == len(eval_rows)
        for row in train + held_out:
            assert set(row) == {"messages", "chosen", "rejected"}
            (message,) = row["messages"]
            assert message["role"] == "user"
            assert row["chosen"] == correct_answer(skill, message["content"]) != row["rejected"]
        # held-out pairs: the eval questions, in order, with one of their own distractors
        for pair, item in zip(held_out, eval_rows, strict=True):
            assert pair["messages"][0]["content"] == item["question"] and pair["rejected"] in item["choices"]
        assert not {row["messages"][0]["content"] for row in train} & {row["question"] for row in eval_rows}


@pytest.fixture(scope="module")
def dpo_run(tiny_pretrained, preference_data, tmp_path_factory):
    """A DPO run from the tiny model on comparison pairs given as a parquet file (as a hub dataset's)."""
    root = tmp_path_factory.mktemp("dpo")
    rows = read_jsonl(preference_data / "preference" / "train" / "comparison.jsonl")[:TRAIN_PAIRS]
    train = root / "comparison.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), train)
    start = tiny_pretrained[1] / "model"
    target = sft.Target("dpo", "comparison", "dpo@comparison", "dpo.runs.comparison", root / "out", root / "work",
                        root / "live")  # fmt: skip
    held_out = preference_data / "preference" / "eval" / "comparison.jsonl"
    summary = dpo.run(TINY_DPO, 0.1, str(start), train, held_out, target)
    return summary, root, start


def test_dpo_prefers_the_chosen_answers_more_often_than_its_start(dpo_run):
    summary, _, _ = dpo_run
    assert summary["steps"] == TINY_DPO.max_steps and summary["data/pairs"] == TRAIN_PAIRS
    assert summary["preference/pairs"] == TINY_DATA.skills.eval_examples
    assert summary["preference/trained_accuracy"] > summary["preference/start_accuracy"]
    assert summary["preference/trained_mean_margin"] > summary["preference/start_mean_margin"]
    low, high = summary["preference/trained_accuracy_low"], summary["preference/trained_accuracy_high"]
    assert low < summary["preference/trained_accuracy"] < high


def test_dpo_output_is_a_plain_model_that_says_where_it_came_from(dpo_run):
    _, root, start = dpo_run
    out = root / "out"
    assert {"model.safetensors", "config.json", "tokenizer.json", "axolotl.yaml", "README.md", "lineage.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (root / "work").exists()
    AutoModelForCausalLM.from_pretrained(out)
    before, after = load_file(start / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    lineage = json.loads((out / "lineage.json").read_text())
    assert (lineage["kind"], lineage["stage"], lineage["parents"]) == ("dpo", "dpo@comparison", ["base/pretrain"])
    config = YAML().load(out / "axolotl.yaml")
    assert (config["rl"], config["rl_beta"], config["datasets"][0]["ds_type"]) == ("dpo", 0.1, "parquet")
    assert (root / "live" / "plots" / "metrics" / "train" / "loss.tsv").is_file()


def test_bad_preference_rows_are_refused_before_axolotl_starts(tmp_path):
    path = tmp_path / "pairs.jsonl"
    question = [{"role": "user", "content": "Q"}]
    rows = [{"messages": question, "chosen": "A", "rejected": "B"}, {"messages": question, "chosen": "A"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    target = sft.Target("dpo", "x", "dpo@x", "dpo.runs.x", tmp_path / "out", tmp_path / "work", tmp_path / "live")
    with pytest.raises(InputError, match=r"pairs.jsonl line 2: rejected is missing.*\"chosen\": \"\.\.\.\""):
        dpo.run(TINY_DPO, 0.1, "unused", path, None, target)
    with pytest.raises(InputError, match="does not exist"):
        read_pairs(tmp_path / "missing.jsonl")
    assert not (tmp_path / "work").exists()


def test_dpo_config_is_sfts_with_the_preference_pairs():
    config = dpo.dpo_config(SFTSettings(adapter="lora", sample_packing=True), 0.2, "base", "pairs.jsonl", "prompt",
                            Path("/w"), bf16=False)  # fmt: skip
    assert (config["rl"], config["rl_beta"], config["adapter"]) == ("dpo", 0.2, "lora")
    assert config["sample_packing"] is False  # axolotl refuses packing with rl
    (dataset,) = config["datasets"]
    assert (dataset["type"], dataset["field_messages"]) == ("chat_template.default", "prompt")
    # SFT's masking keys mean nothing here; pad_to_multiple_of would swap in axolotl's collator for older trl
    assert not {"roles_to_train", "train_on_eos", "pad_to_multiple_of"} & set(config)


def test_hub_pairs_in_trls_explicit_prompt_shape_are_read_like_the_projects(tmp_path):
    path = tmp_path / "hub.parquet"
    question = [{"role": "user", "content": "Which is larger, 3 or 9?"}]
    row = {"prompt": question, "chosen": [{"role": "assistant", "content": "9"}],
           "rejected": [{"role": "assistant", "content": "3"}]}  # fmt: skip
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([row]), path)
    pairs, column = read_pairs(path)
    assert column == "prompt" and pairs == [(question, "9", "3")]
