"""The adapters stage: LoRA, LoHa and LoKr experts trained through axolotl (LoHa/LoKr by the stage's plugin),
merged into plain models that learned the skill; parameter counts as peft computes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import sft
from pipeline.settings.base import InputError
from pipeline.settings.sft import SFTSettings
from stages import adapters

# the experts' tiny settings (tests/test_finetune.py) at a small rank
TINY_SFT = SFTSettings(max_steps=30, learning_rate=5e-3, micro_batch_size=16, sequence_len=64, warmup_steps=3,
                       replay_rows=0, lora_r=4, lora_alpha=8)  # fmt: skip
ADAPTER_NAMES = ("lora_", "hada_", "lokr_", "base_layer")  # what peft's modules leave in a state dict


def train_into(root: Path, method: str, base: Path, dataset: Path, settings: SFTSettings = TINY_SFT) -> dict:
    """What the adapter@addition_<method> stage runs, with its folders under root."""
    name = f"addition_{method}"
    target = sft.Target("adapter", name, f"adapter@{name}", f"adapters.runs.{name}", root / "out", root / "work",
                        root / "live")  # fmt: skip
    return adapters.run(method, settings, str(base), dataset, target)


# Each run starts axolotl twice (train, merge): ~25 s of CPU. LoHa (the plugin's path) is in the default suite.
@pytest.fixture(
    scope="module",
    params=[pytest.param("lora", marks=pytest.mark.scale), "loha", pytest.param("lokr", marks=pytest.mark.scale)],
)
def trained(request, tiny_pretrained, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"adapter_{request.param}")
    base = tiny_pretrained[1] / "model"
    summary = train_into(root, request.param, base, tiny_data / "sft" / "addition.jsonl")
    return request.param, summary, root, base


def curve(root: Path, name: str) -> list[float]:
    rows = (root / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[-1]) for row in rows]


def test_adapter_trains_and_the_loss_falls(trained):
    method, summary, root, _ = trained
    losses = curve(root, "train/loss")
    assert len(losses) >= 5 and losses[-1] < 0.7 * losses[0]
    assert summary["method"] == method and summary["steps"] == 30 and summary["eval/loss"] < 0.7 * losses[0]
    assert summary["data/rows"] == summary["data/rows_trained_on"] == 300
    assert curve(root, "eval/loss") and curve(root, "train/lr")


def test_adapter_is_merged_into_a_plain_model(trained):
    method, _, root, base = trained
    out = root / "out"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "axolotl.yaml", "README.md", "lineage.json"} <= names
    assert not any("adapter" in name for name in names) and not (root / "work").exists()
    merged, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert merged.keys() == original.keys()  # no peft module left: the base's parameters, nothing more
    assert all(merged[k].shape == original[k].shape for k in original)
    assert any(not torch.equal(merged[k], original[k]) for k in original)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any(part in name for name, _ in model.named_parameters() for part in ADAPTER_NAMES)
    # generates as its base does (axolotl's legacy merge would switch sampling on)
    assert (out / "generation_config.json").read_text() == (base / "generation_config.json").read_text()
    lineage = json.loads((out / "lineage.json").read_text())
    assert (lineage["kind"], lineage["name"], lineage["parents"]) == (
        "adapter",
        f"addition_{method}",
        ["base/pretrain"],
    )
    # axolotl's own LoRA is the experts' `adapter: lora`; LoHa and LoKr override the key
    assert lineage["settings"].get("adapter", lineage["settings"]["sft"]["adapter"]) == method
    assert lineage["settings"]["lora_target_modules"] == list(adapters.LINEAR_LAYERS)


def answer_loss(model_dir: Path, rows: list[dict]) -> float:
    """Mean loss on the answers (and end of turn) of skill questions, prompts masked as in SFT."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    losses = []
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False,
                                               add_generation_prompt=True)  # fmt: skip
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(row["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_adapter_learned_the_skill(trained, tiny_data):
    """Held-out questions of the skill (data/eval: none is in the SFT rows) are answered better than by the base."""
    _, _, root, base = trained
    rows = [json.loads(line) for line in (tiny_data / "eval" / "addition.jsonl").read_text().splitlines()[:40]]
    assert answer_loss(root / "out", rows) < 0.8 * answer_loss(base, rows)


def test_parameter_counts_are_peft_own_and_differ_between_methods(tiny_pretrained):
    from peft import get_peft_model

    base = tiny_pretrained[1] / "model"
    counts = {}
    for method in adapters.METHODS:
        counts[method] = adapters.count_parameters(str(base), method, TINY_SFT)
        # the meta-device count is what peft counts on the real model
        model = AutoModelForCausalLM.from_pretrained(base)
        config = adapters.peft_config(method, 4, 8, 0.05, list(adapters.LINEAR_LAYERS))
        trainable, total = get_peft_model(model, config).get_nb_trainable_parameters()
        assert (counts[method]["params/trainable"], counts[method]["params/total"]) == (trainable, total)
        assert counts[method]["params/trainable_share"] == round(trainable / total, 6)
    # LoRA's r x (in + out) per adapted layer; LoHa has two such pairs (twice as many)
    model = AutoModelForCausalLM.from_pretrained(base)
    layers = [m for n, m in model.named_modules() if n.split(".")[-1] in adapters.LINEAR_LAYERS]
    lora = sum(4 * (layer.in_features + layer.out_features) for layer in layers)
    assert counts["lora"]["params/trainable"] == lora and counts["loha"]["params/trainable"] == 2 * lora
    assert len({c["params/trainable"] for c in counts.values()}) == 3
    assert counts["lora"]["params/total"] - counts["lora"]["params/trainable"] == model.num_parameters()


def test_axolotl_accepts_each_method_with_the_plugin():
    """The config each method trains with passes axolotl's own validation once the plugin is registered."""
    from axolotl.integrations.base import PluginManager
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    PluginManager.get_instance().register(adapters.PLUGIN)
    settings = TINY_SFT.model_copy(update={"adapter": "lora"})
    for method in adapters.METHODS:
        config = {**sft.axolotl_config(settings, "base", "data.jsonl", Path("/w"), bf16=True),
                  **adapters.axolotl_keys(method, settings)}  # fmt: skip
        validated = validate_config(DictDefault(config))
        assert validated.adapter == method and validated.lora_target_modules == list(adapters.LINEAR_LAYERS)
        assert validated.lora_mlp_kernel == (method == "lora")  # axolotl's LoRA kernels patch LoRA layers only


def test_an_unknown_method_fails_before_training(tiny_pretrained, tiny_data, tmp_path):
    with pytest.raises(InputError, match=r"adapters.runs.addition_dora.method is 'dora'; use one of lora, loha, lokr"):
        train_into(tmp_path, "dora", tiny_pretrained[1] / "model", tiny_data / "sft" / "addition.jsonl")
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", adapters.PEFT_METHODS)
def test_the_plugin_merges_without_dropout(method, tiny_pretrained, tmp_path):
    """axolotl's merge step loads the trained adapter through the plugin: the merged weights are the base plus
    peft's delta, the same every time (LoHa/LoKr drop ranks at random in layers left in training mode)."""
    from axolotl.utils.dict import DictDefault
    from peft import get_peft_model

    base = tiny_pretrained[1] / "model"
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                             adapters.peft_config(method, 4, 8, 0.5, list(adapters.LINEAR_LAYERS)))  # fmt: skip
    for name, parameter in trained.named_parameters():
        if parameter.requires_grad:  # a trained adapter: no factor left at its zero initialisation
            torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    trained.save_pretrained(tmp_path / "adapter")
    cfg = DictDefault(adapter=method, lora_r=4, lora_alpha=8, lora_dropout=0.5, seed=0,
                      lora_target_modules=list(adapters.LINEAR_LAYERS),
                      lora_model_dir=str(tmp_path / "adapter"))  # fmt: skip
    plugin = adapters.PeftAdapterPlugin()
    merged = [plugin.load_adapter(AutoModelForCausalLM.from_pretrained(base), cfg)[0].merge_and_unload().state_dict()
              for _ in range(2)]  # fmt: skip
    expected = trained.eval().merge_and_unload().state_dict()
    assert all(torch.equal(merged[0][k], merged[1][k]) and torch.equal(merged[0][k], expected[k]) for k in expected)
