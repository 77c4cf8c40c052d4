"""Post-training quantization (stages/quantize.py) and quantization-aware training (stages/qat.py):
real int4/int8 rounding of the linear layers, torchao's QAT numerics exactly, and an axolotl QAT
run whose output is a plain model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline import sft
from pipeline.lineage import model_id
from pipeline.settings.base import InputError
from pipeline.settings.qat import QATRun
from pipeline.settings.quantize import QuantizeRun
from pipeline.settings.sft import SFTSettings
from stages import qat, quantize

GROUP = 32


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny Llama (tied embeddings; linear input sizes 64 and 128) saved as a model folder."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=True)  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)


@pytest.mark.parametrize("weight_dtype", ["int4", "int8"])
def test_ptq_rounds_every_decoder_linear_and_nothing_else(tiny_model, tmp_path, weight_dtype):
    out = tmp_path / "quantized"
    summary = quantize.run(QuantizeRun(model=str(tiny_model), weight_dtype=weight_dtype, group_size=GROUP),
                           "tiny", "quantize@tiny", out)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is LlamaForCausalLM and model.lm_head.weight is model.model.embed_tokens.weight
    before, after = tensors(tiny_model), tensors(out)
    assert before.keys() == after.keys() and all(t.dtype == torch.float32 for t in after.values())
    bits = quantize.BITS[weight_dtype]
    linears = [name for name in after if name.endswith("proj.weight")]
    assert len(linears) == summary["layers"] == 2 * 7
    for name in linears:
        groups = after[name].view(after[name].shape[0], -1, GROUP)
        distinct = max(len(group.unique()) for group in groups.flatten(0, 1))
        assert distinct <= 2**bits, f"{name}: {distinct} values in a group of {GROUP}"
        assert not torch.equal(after[name], before[name])
    for name in set(after) - set(linears):  # embeddings (and the tied head), norms: untouched
        assert torch.equal(after[name], before[name]), name
    error = summary["weight_error/relative_rms_mean"]
    assert (0.05 < error < 0.2) if weight_dtype == "int4" else (0.001 < error < 0.01)
    assert summary["weight_error/relative_rms_max"] >= error
    # codes at `bits` bits plus one float32 scale per group, against 4 bytes per weight
    quantized = summary["parameters/quantized"]
    assert summary["bytes/linear_float"] == 4 * quantized
    assert summary["bytes/linear_quantized"] == quantized * bits // 8 + quantized // GROUP * 4
    assert summary["bytes/model_float"] - summary["bytes/model_quantized"] == (
        summary["bytes/linear_float"] - summary["bytes/linear_quantized"]
    )
    lineage = json.loads((out / "lineage.json").read_text())
    assert (lineage["kind"], lineage["parents"]) == ("quantized", [model_id(tiny_model)])
    per_layer = json.loads((out / "quantization.json").read_text())["layers"]
    assert set(per_layer) == {name.removesuffix(".weight") for name in linears}


def test_ptq_is_deterministic(tiny_model, tmp_path):
    settings = QuantizeRun(model=str(tiny_model))
    for name in ("first", "second"):
        quantize.run(settings, "tiny", "quantize@tiny", tmp_path / name)
    for file in ("model.safetensors", "quantization.json", "lineage.json", "README.md"):
        assert (tmp_path / "first" / file).read_bytes() == (tmp_path / "second" / file).read_bytes()


def test_group_size_that_does_not_divide_the_layers_is_refused_before_work(tiny_model, tmp_path):
    with pytest.raises(InputError, match=r"quantize\.runs\.tiny\.group_size is 48.*\(64, 128\).*64") as error:
        quantize.run(QuantizeRun(model=str(tiny_model), group_size=48), "tiny", "quantize@tiny", tmp_path / "q")
    assert "32, 64" in str(error.value) and not (tmp_path / "q").exists()
    with pytest.raises(InputError, match=r"quantize\.runs\.tiny\.model: .* is not a model folder"):
        quantize.run(QuantizeRun(model=str(tmp_path)), "tiny", "quantize@tiny", tmp_path / "q")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ptq_numerics_are_torchaos_qat_fake_quantizers(dtype):
    """The codes x scales the quantize stage writes are, bit for bit, the weights torchao's QAT
    fake quantizers (int4: the one axolotl's `qat: {weight_dtype: int4}` uses) compute."""
    from torchao.quantization.qat.fake_quantize_config import Int4WeightFakeQuantizeConfig, IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    torch.manual_seed(0)
    weight = (torch.randn(48, 128) * 0.05).to(dtype)
    weight[0, :GROUP] = 0  # an all-zero group: the scale floor
    references = {"int4": Int4WeightFakeQuantizeConfig(group_size=GROUP),
                  "int8": IntxFakeQuantizeConfig(torch.int8, group_size=GROUP)}  # fmt: skip
    for weight_dtype, config in references.items():
        codes, scales, dequantized = quantize.quantize_weight(weight, weight_dtype, GROUP)
        assert torch.equal(dequantized, FakeQuantizerBase.from_config(config)(weight)), weight_dtype
        low, high = (-8, 7) if weight_dtype == "int4" else (-128, 127)
        assert codes.dtype == torch.int8 and low <= codes.min() and codes.max() <= high
        rebuilt = codes.view(48, -1, GROUP).float() * scales.float().view(48, -1, 1)
        assert torch.equal(rebuilt.view(48, 128).to(dtype), dequantized)


def test_axolotl_qat_trains_against_the_weights_the_quantize_stage_writes(tiny_model):
    """axolotl's QAT preparation plus the stage's plugin: every decoder linear fake-quantized, the head
    plain and tied; the prepared model's logits equal those of the PTQ model of the same weights."""
    from axolotl.utils.quantization import prepare_model_for_qat
    from axolotl.utils.schemas.enums import TorchAOQuantDType

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ptq = AutoModelForCausalLM.from_pretrained(tiny_model)
    quantize.quantize_model(ptq, "int4", GROUP)
    prepare_model_for_qat(model, TorchAOQuantDType.int4, GROUP)
    qat.FloatOutputHead().post_model_load(None, model)
    fake = [name for name, module in model.named_modules() if hasattr(module, "weight_fake_quantizer")]
    assert len(fake) == 2 * 7 and not any("lm_head" in name for name in fake)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ptq(tokens).logits)


def test_qat_refuses_what_axolotl_cannot_train(tiny_model):
    settings = SFTSettings()
    with pytest.raises(InputError, match=r"qat\.runs\.x\.adapter is lora"):
        qat.qat_config(QATRun(dataset="data/sft/addition.jsonl"), settings.model_copy(update={"adapter": "lora"}),
                       "qat.runs.x")  # fmt: skip
    with pytest.raises(InputError, match=r"qat\.runs\.x\.group_size is 96"):
        qat.check_base_model(str(tiny_model), QATRun(dataset="data/sft/addition.jsonl", group_size=96), "qat.runs.x")


@pytest.mark.scale  # an axolotl run: ~35 s, and CI is near its budget (`make test-scale`)
def test_axolotl_qat_run_saves_a_plain_float_model(tiny_pretrained, tiny_data, tmp_path, capfd):
    """A few QAT steps through the SFT code path: the fake quantizers were in the model, and are gone
    from what it saved (plain float weights, off the int4 grid: the latent weights)."""
    base = tiny_pretrained[1] / "model"
    settings = SFTSettings(max_steps=8, learning_rate=5e-3, micro_batch_size=16, sequence_len=64, warmup_steps=2,
                           replay_rows=0)  # fmt: skip
    run = QATRun(dataset=str(tiny_data / "sft" / "addition.jsonl"), group_size=GROUP)
    target = sft.Target("qat", "addition", "qat@addition", "qat.runs.addition", tmp_path / "out", tmp_path / "work",
                        tmp_path / "live")  # fmt: skip
    summary = sft.run(settings, str(base), Path(run.dataset), target,
                      extra_config=qat.qat_config(run, settings, target.where))  # fmt: skip
    assert summary["steps"] == 8
    logged = "".join(capfd.readouterr())  # axolotl's own output (the plugin's line)
    assert "QAT: 14 linear layers fake-quantized (FakeQuantizer(Int4WeightFakeQuantizeConfig(group_size=32" in logged
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is LlamaForCausalLM and model.lm_head.weight is model.model.embed_tokens.weight
    trained, start = tensors(out), tensors(base)
    assert trained.keys() == start.keys() and all(type(t) is torch.Tensor and t.dtype == torch.float32
                                                   for t in trained.values())  # fmt: skip
    weight = trained["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(weight, start["model.layers.0.mlp.up_proj.weight"])
    assert len(weight.view(weight.shape[0], -1, GROUP)[0, 0].unique()) > 16  # not rounded: latent weights
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["kind"] == "qat" and lineage["settings"]["qat"] == {"weight_dtype": "int4", "group_size": 32,
                                                                        "quantize_embedding": False}  # fmt: skip
