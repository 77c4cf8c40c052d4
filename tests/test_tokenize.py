"""The tokenize stage: a tokenizer every tool loads, and token files that hold the corpus exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.settings.base import InputError
from pipeline.settings.tokenize import TokenizeSettings
from stages import tokenize


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenized):
    return AutoTokenizer.from_pretrained(tiny_tokenized[0])


def test_round_trip(tokenizer, tiny_data):
    for row in read_jsonl(tiny_data / "corpus" / "val.jsonl")[:20]:
        ids = tokenizer(row["text"])["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == row["text"]
    odd = "Ünïcödé, emoji 🙂 and\ttabs\nnew lines: 12345"
    assert tokenizer.decode(tokenizer(odd)["input_ids"], skip_special_tokens=True) == odd


def test_special_tokens(tokenizer):
    assert [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token] == [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    ]
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        0,
        1,
        2,
        3,
    ]
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
    # A special token written in text is one token, not split into characters.
    assert tokenizer.eos_token_id in tokenizer("end</s>")["input_ids"]


def test_digits_are_split(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("47 plus 8 is 55", add_special_tokens=False)["input_ids"])
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == ["4", "7", "8", "5", "5"]


def test_chat_template_renders_the_sft_format(tokenizer):
    messages = [{"role": "user", "content": "What is 4 plus 3?"}, {"role": "assistant", "content": "7"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<s>Q: What is 4 plus 3?\nA:\n7</s>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>Q: What is 4 plus 3?\nA:\n"
    # The answer tokens are the same whether the model sees the prompt or the whole turn.
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head


def test_token_files_hold_every_document(tiny_tokenized, tiny_data, tokenizer):
    _, tokens_dir, summary = tiny_tokenized
    meta = json.loads((tokens_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tokenizer) == summary["vocab_size"]
    for split in ("train", "val"):
        ids = np.memmap(tokens_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
        documents = [row["text"] for row in read_jsonl(tiny_data / "corpus" / f"{split}.jsonl")]
        assert len(ids) == meta[f"{split}_tokens"] == summary[f"{split}/tokens"]
        assert int(ids.max()) < meta["vocab_size"]
        assert (ids == tokenizer.bos_token_id).sum() == (ids == tokenizer.eos_token_id).sum() == len(documents)
        decoded = tokenizer.decode(ids.tolist()).split("</s>")
        assert [d.removeprefix("<s>") for d in decoded[:-1]] == documents


def test_vocab_size_bounds_the_trained_vocabulary(tiny_data, tmp_path):
    summary = tokenize.run(TokenizeSettings(vocab_size=400), tiny_data / "corpus", tmp_path / "tok", tmp_path / "ids")
    assert summary["vocab_size"] == 400


def test_token_dtype_widens_for_large_vocabularies():
    assert tokenize.token_dtype(65_536) == np.uint16
    assert tokenize.token_dtype(65_537) == np.uint32


def test_base_model_tokenizer_is_used_as_is(tiny_tokenized, tiny_data, tmp_path):
    """With tokenize.base_model set, that model's tokenizer is copied and used, not retrained."""
    base = tiny_tokenized[0]
    settings = TokenizeSettings(base_model=str(base), vocab_size=400)
    summary = tokenize.run(settings, tiny_data / "corpus", tmp_path / "tok", tmp_path / "ids")
    assert summary["vocab_size"] == tiny_tokenized[2]["vocab_size"]
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text()) == json.loads(
        (base / "tokenizer.json").read_text()
    )
    assert (tmp_path / "ids" / "train.bin").read_bytes() == (tiny_tokenized[1] / "train.bin").read_bytes()


def test_missing_base_model_is_a_clear_error(tiny_data, tmp_path):
    settings = TokenizeSettings(base_model=str(tmp_path / "no-such-model"))
    with pytest.raises(InputError, match="^tokenize.base_model=.*no-such-model"):
        tokenize.run(settings, tiny_data / "corpus", tmp_path / "tok", tmp_path / "ids")
    assert not (tmp_path / "tok").exists()
