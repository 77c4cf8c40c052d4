"""GGUF export: the tiny model through llama.cpp's converter and quantizer, answering in llama.cpp."""

from __future__ import annotations

import json

import pytest

from pipeline import llama_cpp
from pipeline.settings.base import InputError
from pipeline.settings.gguf import GGUFRun
from stages import gguf
from tests.project import params_error


def test_missing_llama_cpp_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv(llama_cpp.CACHE_VARIABLE, str(tmp_path / "empty"))
    with pytest.raises(InputError) as raised:
        gguf.run("tiny", GGUFRun(model="models/none"), tmp_path / "none", tmp_path / "eval", 5, 8, tmp_path / "out", 1)
    assert "make llama-cpp" in str(raised.value)
    assert str(tmp_path / "empty" / llama_cpp.VERSION) in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_types_start_with_f16(tmp_path):
    message = params_error(tmp_path, "gguf:\n  runs:\n    tiny: {model: models/pretrain, types: [q8_0, f16]}\n")
    assert "gguf.runs.tiny.types" in message and "f16 first" in message


def test_project_tokenizer_is_llama_cpp_starcoder_type(tiny_tokenized, tmp_path):
    tokenizer_dir = tiny_tokenized[0]
    assert gguf.llama_cpp_pre_tokenizer(tokenizer_dir) == "starcoder"
    config = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    config["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False  # "2026" as one piece: another type
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    assert gguf.llama_cpp_pre_tokenizer(tmp_path) is None


@pytest.mark.scale  # builds llama.cpp on first use (~13 min on 2 cores; cached outside the project), then ~20 s
def test_gguf_files_load_and_answer_in_llama_cpp(tiny_pretrained, tiny_data, tmp_path):
    llama_cpp.ensure()
    model_dir = tiny_pretrained[1] / "model"
    settings = GGUFRun(model=str(model_dir), types=["f16", "q8_0", "q4_0"])
    metrics = gguf.run("tiny", settings, model_dir, tiny_data / "eval", 10, 8, tmp_path / "out", 2)

    assert metrics["questions"] == 40  # 10 per skill, 4 skills
    assert metrics["tokenizer_agreement"] == 1.0  # llama.cpp splits the prompts as transformers does
    assert metrics["f16/answer_agreement"] == 1.0  # the verification: f16 answers as transformers
    for gguf_type in ("q8_0", "q4_0"):  # quantized files loaded and answered (what they answer is measured)
        assert 0.0 <= metrics[f"{gguf_type}/answer_agreement"] <= 1.0
        assert 0.0 <= metrics[f"{gguf_type}/exact_match_low"] <= metrics[f"{gguf_type}/exact_match_high"] <= 1.0
    sizes = [metrics[f"{gguf_type}/size_bytes"] for gguf_type in ("f16", "q8_0", "q4_0")]
    assert sizes == sorted(sizes, reverse=True)
    files = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert files == ["README.md", "model-f16.gguf", "model-q4_0.gguf", "model-q8_0.gguf"]
    assert "q8_0" in gguf.tensor_types(tmp_path / "out" / "model-q8_0.gguf")

    again = gguf.run("tiny", settings, model_dir, tiny_data / "eval", 10, 8, tmp_path / "again", 2)
    assert again == metrics
    for path in (tmp_path / "out").iterdir():  # same bytes on a rerun
        assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes(), path.name
