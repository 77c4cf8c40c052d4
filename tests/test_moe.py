"""The MoE stages: mergekit-moe builds, routing shares, settings checks, and router-only training."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

from pipeline.params import MoEFinetuneSettings, MoERun, MoESettings, SFTSettings
from stages import finetune, moe, moe_finetune
from tests.project import params_error


def build_moe(settings: MoESettings, sources: dict[str, str], out, allow_all_same: bool = False, prompts=None):
    config = moe.moe_config(settings, sources, prompts or {}, next(iter(sources.values())))
    moe.build(settings, config, list(sources), allow_all_same, out)
    return out


@pytest.fixture(scope="module")
def copies_moe(tiny_pretrained, tmp_path_factory):
    """A 3-expert MoE whose experts are all the tiny base model (a 'direct MoE')."""
    base = str(tiny_pretrained[1] / "model")
    out = tmp_path_factory.mktemp("moe") / "moe"
    settings = MoESettings(source="base", num_experts=3, gate_mode="random")
    return build_moe(settings, {f"copy_{i}": base for i in range(3)}, out, allow_all_same=True)


def batch_loss(model, tokenizer) -> float:
    ids = tokenizer(["The capital of Norfennor is", "Seven plus two is nine."], return_tensors="pt", padding=True)
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**ids, labels=labels).loss.item()


def test_moe_of_identical_experts_reproduces_the_model(copies_moe, tiny_pretrained):
    base_dir = tiny_pretrained[1] / "model"
    mixture = AutoModelForCausalLM.from_pretrained(copies_moe)
    assert isinstance(mixture, MixtralForCausalLM) and mixture.config.num_local_experts == 3
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    expected = batch_loss(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer)
    assert batch_loss(mixture, tokenizer) == pytest.approx(expected, abs=1e-5)


def test_moe_keeps_the_intended_tokenizer_and_a_card(copies_moe, tiny_pretrained):
    ours, base = AutoTokenizer.from_pretrained(copies_moe), AutoTokenizer.from_pretrained(tiny_pretrained[1] / "model")
    assert ours.pad_token == base.pad_token != ours.bos_token  # mergekit-moe would make it BOS
    assert ours.padding_side == base.padding_side == "right"
    assert ours.chat_template == base.chat_template
    assert json.loads((copies_moe / moe.EXPERT_NAMES).read_text()) == ["copy_0", "copy_1", "copy_2"]
    assert "gate mode\n`random`" in (copies_moe / "README.md").read_text()
    assert (copies_moe / "mergekit_moe.yaml").is_file()


def test_routing_shares_cover_every_skill_layer_and_expert(copies_moe, tiny_data):
    shares = moe.routing_fractions(copies_moe, tiny_data / "eval", limit=8)
    assert set(shares) == {"addition", "comparison", "counting", "sorting"}
    for layers in shares.values():
        assert len(layers) == 2 and all(len(row) == 3 and sum(row) == pytest.approx(1, abs=1e-3) for row in layers)


def test_prompts_default_to_the_experts_sft_questions(tiny_data):
    datasets = {"addition": tiny_data / "sft/addition.jsonl", "sorting": tiny_data / "sft/sorting.jsonl"}
    settings = MoESettings(gate_mode="hidden", prompt_examples=2)
    prompts = moe.expert_prompts(settings, {"ties": "x", "addition": "y"}, {"ties": ["addition", "sorting"],
                                 "addition": ["addition"]}, datasets)  # fmt: skip
    assert len(prompts["ties"].positive) == 4 and len(prompts["addition"].positive) == 2
    assert "plus" in prompts["addition"].positive[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("moe: {source: experts, experts: [addition, sorting], experts_per_token: 3}",
         "moe.experts_per_token 3 is more than the 2 experts"),
        ("moe: {source: base, gate_mode: hidden}", "copies of the base have none: set moe.prompts for ['copy_0'"),
        ("moe: {source: base}\nmoe_finetune: {runs: {}}", "only differs from that model after training"),
        ("moe_finetune: {runs: {r: {mode: router, adapter: lora}}}", "set `mode`"),
        ("moe_finetune: {mixture: {adition: 1}}", "'adition', which is not in finetune.experts"),
    ],
)  # fmt: skip
def test_invalid_moe_settings_fail_before_any_work(tmp_path, text, expected):
    assert expected in params_error(tmp_path, text + "\n")


def test_identical_prompts_in_hidden_mode_are_refused_before_building():
    same = {"ties": moe.ExpertPrompts(positive=["What is 2 plus 3?"])}
    prompts = {"ties": same["ties"], "linear": same["ties"]}
    with pytest.raises(SystemExit, match="same prompts"):
        moe.moe_config(MoESettings(gate_mode="hidden"), {"ties": "a", "linear": "b"}, prompts, "a")
    with pytest.raises(SystemExit, match="has none"):
        moe.moe_config(MoESettings(gate_mode="cheap_embed"), {"ties": "a", "linear": "b"}, {}, "a")


def test_mixture_follows_the_weights(tiny_data, tmp_path):
    datasets = {s: tiny_data / f"sft/{s}.jsonl" for s in ("addition", "sorting", "counting")}
    settings = MoEFinetuneSettings(mixture={"addition": 3, "sorting": 1, "counting": 0}, mixture_rows=200)
    counts = moe_finetune.write_mixture(settings, datasets, 0, tmp_path / "mix.jsonl")
    assert counts == {"addition": 150, "sorting": 50}
    rows = [json.loads(line) for line in (tmp_path / "mix.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and sum("plus" in r["messages"][0]["content"] for r in rows) == 150


def test_router_only_training_changes_only_the_gates(copies_moe, tiny_data, tmp_path):
    run = MoERun(mode="router")
    sft = moe_finetune.mode_settings(run, SFTSettings(max_steps=8, learning_rate=5e-2, micro_batch_size=8,
                                                      sequence_len=64, warmup_steps=1, val_set_size=0.0))  # fmt: skip
    settings = MoEFinetuneSettings(mixture_rows=64)
    datasets = {s: tiny_data / f"sft/{s}.jsonl" for s in ("addition", "sorting")}
    moe_finetune.write_mixture(settings, datasets, 0, tmp_path / "mix.jsonl")
    summary = finetune.run(sft, "router", str(copies_moe), tmp_path / "mix.jsonl", tmp_path / "out", tmp_path / "work",
                           tmp_path / "live", where="moe_finetune.runs.router",
                           extra_config=moe_finetune.mode_config(run, settings))  # fmt: skip
    assert summary["steps"] == 8
    before = AutoModelForCausalLM.from_pretrained(copies_moe).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(".mlp.gate.weight" in name for name in changed), changed
    assert len(changed) == 2  # one router per layer
    # the load-balancing loss was a training setting: the saved model generates with its KV cache
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert trained.config.output_router_logits is False
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer(["What is 2 plus 3?", "Sort 3 1 2."], return_tensors="pt", padding=True)
    assert trained.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] > ids["input_ids"].shape[1]
