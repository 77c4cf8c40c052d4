"""A CPU-sized stand-in for vonjack/Phi-3-mini-4k-instruct-LLaMAfied, built locally (no download).

`python -m tests.phi3_standin OUT` writes a LlamaForCausalLM folder with the real model's config
layout at tiny sizes, seeded random weights (safetensors) and a tokenizer with Phi-3's layout:
a Llama-style SentencePiece BPE with byte fallback (ids 0-2 <unk> <s> </s>, 256 byte tokens,
32000 base ids), Phi-3's special tokens at ids 32000-32010 and Phi-3's chat template.

The real model's values relied on (its config cannot be downloaded here; written from memory of
microsoft/Phi-3-mini-4k-instruct and vonjack's LLaMAfied conversion, which renames the fused
qkv/gate_up weights into Llama's and keeps every other value): LlamaForCausalLM, vocab_size
32064 (the 32011 tokenizer ids padded to a multiple of 64), bos 1, eos 32000 (<|endoftext|>),
pad 32000, hidden_act silu, rms_norm_eps 1e-5, rope_theta 10000 without scaling,
max_position_embeddings 4096, untied embeddings, no attention bias, as many KV heads as heads,
bfloat16 weights; hidden 3072, 32 layers, 32 heads, MLP 8192 (shrunk here). The tokenizer: a
Llama fast tokenizer (tokenizer_class LlamaTokenizer, legacy false, BOS prepended by encode()),
eos/pad <|endoftext|>; the special tokens' ids are the public Phi-3 ones.
From memory and uncertain: rstrip of the Phi-3 special tokens (false here, so text round-trips)
and the exact chat template revision (the one with a system role and a final eos, below).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

BASE_VOCAB = 32000  # SentencePiece ids of Llama-2's and Phi-3's tokenizer
VOCAB_SIZE = 32064  # the embedding rows: Phi-3 pads its 32011 ids to a multiple of 64
BASE_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))  # ids 3-258: byte fallback
# Phi-3's added tokens, id -> text (all special; <|end|> ends every chat turn)
PHI3_TOKENS = {
    32000: "<|endoftext|>",
    32001: "<|assistant|>",
    32002: "<|placeholder1|>",
    32003: "<|placeholder2|>",
    32004: "<|placeholder3|>",
    32005: "<|placeholder4|>",
    32006: "<|system|>",
    32007: "<|end|>",
    32008: "<|placeholder5|>",
    32009: "<|placeholder6|>",
    32010: "<|user|>",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# The real model's config values that the stand-in keeps (see the module docstring).
PHI3_LLAMAFIED_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}
# The real sizes are hidden 3072, 32 layers, 32 heads (= KV heads), MLP 8192: ~3.8B parameters.
TINY_SIZES = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 176,  # ~8192/3072 of hidden, as in Phi-3
}


def training_texts(seed: int) -> list[str]:
    """Local text only: the project's synthetic world corpus and chat-style questions."""
    from pipeline.settings.data import WorldSettings
    from stages.data import synthetic_documents

    rng = random.Random(seed)
    documents, _ = synthetic_documents(WorldSettings(corpus_megabytes=0.3), rng)
    questions = [f"What is {rng.randint(0, 99)} plus {rng.randint(0, 9)}? Answer with the number." for _ in range(500)]
    return documents + questions


def learned_pieces(texts: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """BPE pieces (in the order they were learned) and merges, SentencePiece-style: words keep a
    leading "▁" and no merge crosses a word boundary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # Llama's SentencePiece model splits digits: every digit is its own piece
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    return pieces, merges


def build_tokenizer(out: Path, seed: int = 0) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja in Phi-3's layout."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces, merges = learned_pieces(training_texts(seed))
    vocab: dict[str, int] = {}
    for piece in (*BASE_SPECIALS, *BYTE_TOKENS, *pieces):
        vocab.setdefault(piece, len(vocab))
    if len(vocab) > BASE_VOCAB:
        raise ValueError(f"learned {len(vocab)} ids, more than the {BASE_VOCAB} base ids")
    # the synthetic text saturates well below 32000 pieces: the rest are placeholders no merge reaches,
    # so that Phi-3's added tokens land at their real ids
    for filler in range(BASE_VOCAB - len(vocab)):
        vocab[f"<unused{filler}>"] = len(vocab)
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(model)
    # the legacy Llama layout (Phi-3's tokenizer.json): normalizer, no pre-tokenizer
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(text, normalized=False, special=True) for text in BASE_SPECIALS])
    for token_id, text in sorted(PHI3_TOKENS.items()):
        tokenizer.add_special_tokens([AddedToken(text, normalized=False, special=True)])
        assert tokenizer.token_to_id(text) == token_id, (text, tokenizer.token_to_id(text))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    fast.save_pretrained(out)
    # Phi-3's tokenizer_config names the Llama tokenizer class: transformers 5 then loads it the way it
    # would load the real one (its own Metaspace pre-tokenizer, no "▁" after special tokens)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="LlamaTokenizer", legacy=False, add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_model(out: Path, seed: int = 0) -> None:
    """config.json, generation_config.json and model.safetensors: random weights, seeded."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{key: value for key, value in PHI3_LLAMAFIED_CONFIG.items() if key != "architectures"},
                         **TINY_SIZES)  # fmt: skip
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[32000, 32001, 32007], pad_token_id=32000)
    model.save_pretrained(out)


def build(out: Path, seed: int = 0) -> Path:
    """The stand-in's model folder at `out` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, seed)
    build_model(out, seed)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.phi3_standin OUT")
    print(build(Path(sys.argv[1])))
