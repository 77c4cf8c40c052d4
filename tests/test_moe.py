"""The MoE stages: mergekit-moe builds, routing shares, settings checks, and router-only training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

from pipeline import sft
from pipeline.lineage import write_lineage
from pipeline.roster import roster_of
from pipeline.routing import EXPERT_NAMES, routing_fractions
from pipeline.settings.base import InputError
from pipeline.settings.mixture import MixtureSettings, MoERun
from pipeline.settings.moe import MoESettings, MoEVariant
from pipeline.settings.params_file import Params
from pipeline.settings.sft import SFTSettings
from stages import mixture, mixture_finetune, moe
from tests.project import params_error


def build_moe(settings: MoESettings, variant: str, sources: dict[str, str], out, prompts=None):
    config = moe.moe_config(settings, sources, prompts or {}, next(iter(sources.values())))
    moe.build(settings, variant, config, sources, out)
    return out


@pytest.fixture(scope="module")
def copies_moe(tiny_pretrained, tmp_path_factory):
    """A 3-expert MoE whose experts are all the tiny base model (sparse upcycling)."""
    base = str(tiny_pretrained[1] / "model")
    out = tmp_path_factory.mktemp("moe") / "moe"
    settings = MoESettings(variants={"upcycled": MoEVariant(source="base", num_experts=3)}, gate_mode="random")
    sources, _ = moe.variant_sources(settings.variants["upcycled"], roster_of(Params()), None, None, None, base)
    return build_moe(settings, "upcycled", sources, out)


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
    assert json.loads((copies_moe / EXPERT_NAMES).read_text()) == ["copy_0", "copy_1", "copy_2"]
    card = (copies_moe / "README.md").read_text()
    assert "gate mode\n`random`" in card and "`moe/upcycled`" in card and "source `base`" in card
    assert (copies_moe / "mergekit_moe.yaml").is_file()


def test_moe_folder_names_its_kind_and_its_sources(copies_moe, tiny_pretrained, tmp_path):
    lineage = json.loads((copies_moe / "lineage.json").read_text())
    assert (lineage["kind"], lineage["name"], lineage["stage"]) == ("moe", "upcycled", "moe@upcycled")
    assert lineage["parents"] == ["base/pretrain"]  # three copies of one model: one parent
    assert lineage["settings"]["variant"] == {"source": "base", "experts": None, "num_experts": 3}
    assert lineage["settings"]["gate_mode"] == "random" and "variants" not in lineage["settings"]
    # SFT experts as sources (Branch-Train-MiX): each expert's id is a parent
    experts = tmp_path / "experts"
    for name in ("addition", "sorting"):
        shutil.copytree(tiny_pretrained[1] / "model", experts / name)
        (experts / name / "lineage.json").unlink()
        write_lineage(experts / name, "expert", name, f"finetune@{name}", ["base/pretrain"], {})
    settings = MoESettings(variants={"btx": MoEVariant(source="experts", experts=["sorting", "addition"])})
    sources, parents = moe.variant_sources(settings.variants["btx"], roster_of(Params()), None, None, experts, "unused")
    assert sources == {"sorting": str(experts / "sorting"), "addition": str(experts / "addition")}
    assert parents == {"sorting": ["sorting"], "addition": ["addition"]}
    lineage = json.loads((build_moe(settings, "btx", sources, tmp_path / "btx") / "lineage.json").read_text())
    assert (lineage["kind"], lineage["name"]) == ("moe", "btx")
    assert lineage["parents"] == ["expert/addition", "expert/sorting"]


def test_selected_merges_variant_takes_the_selection(tmp_path):
    selection = tmp_path / "select.json"
    selection.write_text(json.dumps({"selected": ["ties", "linear"]}))
    params = Params.model_validate({"merge": {"recipes": {
        "ties": {"method": "ties", "parameters": {"weight": 0.5, "density": 0.5}},
        "linear": {"method": "linear", "experts": ["addition", "sorting"], "parameters": {"weight": 1.0}},
    }}})  # fmt: skip
    variant = MoEVariant(source="selected_merges")
    sources, parents = moe.variant_sources(variant, roster_of(params), selection, tmp_path / "merged", None, "unused")
    assert sources == {"ties": str(tmp_path / "merged/ties"), "linear": str(tmp_path / "merged/linear")}
    assert parents == {"ties": ["addition", "sorting", "comparison", "counting"], "linear": ["addition", "sorting"]}


def test_routing_shares_cover_every_skill_layer_and_expert(copies_moe, tiny_data):
    shares = routing_fractions(copies_moe, tiny_data / "eval", limit=8)
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
        ("moe: {variants: {two: {source: experts, experts: [addition, sorting]}}, experts_per_token: 3}\n"
         "mixture: {moe_runs: {}}",
         "moe.experts_per_token 3 is more than the 2 experts that moe.variants.two gives"),
        ("moe: {variants: {up: {source: base}}, gate_mode: hidden}\nmixture: {moe_runs: {r: {moe: up}}}",
         "the copies of the base in moe.variants.up have none: set moe.prompts for ['copy_0'"),
        ("mixture: {moe_runs: {merges: {moe: merges}, experts: {moe: experts}}}",
         "moe.variants.upcycled copies one model into every expert: the MoE only differs from that model after "
         "training, and no mixture.moe_runs entry trains it"),
        ("mixture: {moe_runs: {up: {moe: upcycled}, r: {moe: expertz}}}",
         "mixture.moe_runs.r.moe is 'expertz', not one of moe.variants (merges, experts, upcycled)"),
        ("mixture: {moe_runs: {r: {moe: experts, mode: router, adapter: lora}}}",
         "mixture.moe_runs.r: set `mode` (full, router or lora), not `adapter`"),
        ("mixture: {weights: {adition: 1}}", "mixture.weights names 'adition', which is not in finetune.experts"),
        ("mixture: {weights: {addition: 0}}", "mixture.weights: at least one weight must be positive"),
        ("moe: {variants: {Big: {source: experts}}}\nmixture: {moe_runs: {}}",
         "moe.variants.Big: use lowercase letters"),
        ("mixture: {dense_runs: {multi-task: {}}}", "mixture.dense_runs.multi-task: use lowercase letters"),
        ("moe: {variants: {m: {source: selected_merges}}}\nmerge: {recipes: {}}\nmixture: {moe_runs: {}}",
         "moe.variants.m.source is selected_merges but merge.recipes is empty"),
    ],
)  # fmt: skip
def test_invalid_moe_settings_fail_before_any_work(tmp_path, text, expected):
    assert expected in params_error(tmp_path, text + "\n")


def test_identical_prompts_in_hidden_mode_are_refused_before_building():
    same = {"ties": moe.ExpertPrompts(positive=["What is 2 plus 3?"])}
    prompts = {"ties": same["ties"], "linear": same["ties"]}
    with pytest.raises(InputError, match="^every expert of the MoE .* has the same prompts"):
        moe.moe_config(MoESettings(gate_mode="hidden"), {"ties": "a", "linear": "b"}, prompts, "a")
    with pytest.raises(InputError, match="^moe.gate_mode cheap_embed .* has none"):
        moe.moe_config(MoESettings(gate_mode="cheap_embed"), {"ties": "a", "linear": "b"}, {}, "a")


def test_mixture_follows_the_weights(tiny_data, tmp_path):
    datasets = {s: tiny_data / f"sft/{s}.jsonl" for s in ("addition", "sorting", "counting")}
    settings = MixtureSettings(weights={"addition": 3, "sorting": 1, "counting": 0}, rows=200)
    counts = mixture.write_mixture(settings, datasets, 0, tmp_path / "mix.jsonl")
    assert counts == {"addition": 150, "sorting": 50}
    rows = [json.loads(line) for line in (tmp_path / "mix.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and sum("plus" in r["messages"][0]["content"] for r in rows) == 150


def test_each_mode_sets_what_it_trains():
    defaults, settings = SFTSettings(), MixtureSettings()
    assert mixture_finetune.mode_settings(MoERun(moe="experts", mode="lora"), defaults).adapter == "lora"
    assert mixture_finetune.mode_settings(MoERun(moe="experts", mode="full"), defaults).adapter == "none"
    # left unset, the mode follows the SFT settings' adapter: `sft.adapter: lora` is never ignored
    lora = SFTSettings(adapter="lora")
    assert mixture_finetune.mode_settings(MoERun(moe="experts"), lora).adapter == "lora"
    assert mixture_finetune.mode_settings(MoERun(moe="experts"), defaults).adapter == "none"
    assert mixture_finetune.mode_settings(MoERun(moe="experts", mode="full"), lora).adapter == "none"
    router = mixture_finetune.mode_config(MoERun(moe="experts", mode="router"), settings)
    assert router["unfrozen_parameters"] == [mixture_finetune.ROUTER_PARAMETERS]
    assert router["model_config"] == {"output_router_logits": True, "router_aux_loss_coef": 0.02}
    no_aux = settings.model_copy(update={"router_aux_loss_coef": 0.0})
    assert mixture_finetune.mode_config(MoERun(moe="experts", mode="full"), no_aux) == {}


def test_router_only_training_changes_only_the_gates(copies_moe, tiny_data, tmp_path):
    run = MoERun(moe="upcycled", mode="router")
    tiny = SFTSettings(max_steps=8, learning_rate=5e-2, micro_batch_size=8, sequence_len=64, warmup_steps=1,
                       val_set_size=0.0, replay_rows=0)  # fmt: skip
    sft_settings = mixture_finetune.mode_settings(run, tiny)
    settings = MixtureSettings(rows=64)
    datasets = {s: tiny_data / f"sft/{s}.jsonl" for s in ("addition", "sorting")}
    mixture.write_mixture(settings, datasets, 0, tmp_path / "mix.jsonl")
    target = sft.Target("moe_trained", "router", "moe_finetune@router", "mixture.moe_runs.router", tmp_path / "out",
                        tmp_path / "work", tmp_path / "live")  # fmt: skip
    extra_config = mixture_finetune.mode_config(run, settings)
    summary = sft.run(sft_settings, str(copies_moe), tmp_path / "mix.jsonl", target, extra_config=extra_config)
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
    # the trained MoE names the MoE it started from, and its mode's training settings
    lineage = json.loads((tmp_path / "out" / "lineage.json").read_text())
    assert (lineage["kind"], lineage["name"], lineage["stage"]) == ("moe_trained", "router", "moe_finetune@router")
    assert lineage["parents"] == ["moe/upcycled"]
    assert lineage["settings"]["unfrozen_parameters"] == [mixture_finetune.ROUTER_PARAMETERS]
