"""`tokenize` stage: a byte-level BPE tokenizer, and the corpus encoded as flat token ids.

    python -m stages.tokenize --corpus data/corpus --tokenizer models/tokenizer \
        --tokens data/tokens --metrics metrics/tokenize.json

Inputs: corpus/{train,val}.jsonl from the data stage.
Outputs:
- tokenizer/: a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json with the
  chat template) that transformers, axolotl, mergekit and lm-eval load. Trained on the train
  split, or copied from `tokenize.base_model` when that is set.
- tokens/{train,val}.bin: every document as `bos ids... eos`, concatenated; read them with
  `numpy.memmap(path, dtype=meta["dtype"])`. tokens/meta.json: dtype, vocab size and counts.

Run it as `python -m stages.tokenize`: as a script, this file would shadow the standard
library's `tokenize` module.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_dir, write_json
from pipeline.settings.base import InputError
from pipeline.settings.tokenize import TokenizeSettings
from pipeline.stage import configure_environment, start

log = logging.getLogger("stages.tokenize")


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def train_tokenizer(settings: TokenizeSettings, texts: list[str]) -> Any:
    """Train byte-level BPE on `texts`; return a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [settings.pad_token, settings.bos_token, settings.eos_token, settings.unk_token]
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Digits first, so "2026" becomes 2 0 2 6 and arithmetic is done digit by digit.
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if settings.split_digits
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.vocab_size,
        min_frequency=settings.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tokenizer.token_to_id(settings.bos_token)
    # Like Llama's tokenizer: encode() prepends BOS; the chat template writes its own.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{settings.bos_token} $A",
        pair=f"{settings.bos_token} $A {settings.bos_token} $B",
        special_tokens=[(settings.bos_token, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=settings.bos_token,
        eos_token=settings.eos_token,
        pad_token=settings.pad_token,
        unk_token=settings.unk_token,
        chat_template=settings.chat_template,
    )


def load_base_tokenizer(base_model: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_model)
    except Exception as error:
        raise InputError(
            f"tokenize.base_model={base_model!r}: cannot load its tokenizer ({error}). Give a local "
            "Hugging Face model folder, or a hub id with network access (HF_HUB_OFFLINE=0)."
        ) from None


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def encode_split(
    tokenizer: Any, texts: list[str], out_path: Path, batch_size: int, dtype: np.dtype, progress: bool = True
) -> int:
    """Write every document as [bos] ids [eos] to `out_path`; return the number of tokens.

    Calls the Rust tokenizer's encode_batch directly: it runs on all cores and skips the
    Python-side work of transformers' __call__.
    """
    backend = tokenizer.backend_tokenizer
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    n_tokens = 0
    with (
        open(out_path, "wb") as handle,
        tqdm(total=len(texts), desc=f"encode {out_path.stem}", unit="doc", disable=not progress) as bar,
    ):
        for start_index in range(0, len(texts), batch_size):
            batch = texts[start_index : start_index + batch_size]
            ids: list[int] = []
            for encoding in backend.encode_batch(batch, add_special_tokens=False):
                ids += bos
                ids += encoding.ids
                ids += eos
            np.asarray(ids, dtype=dtype).tofile(handle)
            n_tokens += len(ids)
            bar.update(len(batch))
    return n_tokens


def run(settings: TokenizeSettings, corpus_dir: Path, tokenizer_dir: Path, tokens_dir: Path) -> dict[str, Any]:
    """Build the tokenizer folder and the token files; return summary counts."""
    splits = {name: read_texts(corpus_dir / f"{name}.jsonl") for name in ("train", "val")}
    if settings.base_model:
        log.info("using the tokenizer of %s", settings.base_model)
        tokenizer = load_base_tokenizer(settings.base_model)
    else:
        log.info(
            "training byte-level BPE (vocab_size <= %d) on %d documents", settings.vocab_size, len(splits["train"])
        )
        tokenizer = train_tokenizer(settings, splits["train"])
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    with atomic_dir(tokenizer_dir) as tmp:
        tokenizer.save_pretrained(tmp)

    summary: dict[str, Any] = {"vocab_size": vocab_size}
    meta: dict[str, Any] = {"dtype": dtype.name, "vocab_size": vocab_size}
    with atomic_dir(tokens_dir) as tmp:
        for name, texts in splits.items():
            started = time.perf_counter()
            n_tokens = encode_split(tokenizer, texts, tmp / f"{name}.bin", settings.batch_size, dtype)
            seconds = time.perf_counter() - started
            log.info(
                "%s: %d documents -> %d tokens in %.2f s (%.0f tokens/s)",
                name,
                len(texts),
                n_tokens,
                seconds,
                n_tokens / max(seconds, 1e-9),
            )
            meta[f"{name}_tokens"] = summary[f"{name}/tokens"] = n_tokens
            meta[f"{name}_documents"] = summary[f"{name}/documents"] = len(texts)
            summary[f"{name}/tokens_per_document"] = round(n_tokens / len(texts), 2)
        write_json(tmp / "meta.json", meta)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="folder with train.jsonl and val.jsonl")
    parser.add_argument("--tokenizer", type=Path, required=True, help="output tokenizer folder")
    parser.add_argument("--tokens", type=Path, required=True, help="output folder of the token files")
    parser.add_argument("--metrics", type=Path, required=True, help="summary JSON (a DVC metric)")
    args = parser.parse_args(argv)
    params = start("tokenize")
    base = params.tokenize.base_model
    configure_environment(hub_access=bool(base) and not Path(base).exists())
    summary = run(params.tokenize, args.corpus, args.tokenizer, args.tokens)
    write_json(args.metrics, summary)


if __name__ == "__main__":
    main()
