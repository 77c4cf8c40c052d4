"""Tokenize throughput: the stage's encode path against a bare `tokenizers` encode_batch.

    python -m bench.bench_tokenize        (or `make bench`)

Both sides encode the same default corpus (train split) with the same trained tokenizer and
batch size. The stage's side also reads the JSONL, frames documents with BOS/EOS and writes
the token file; its overhead over the bare call should stay under 20%.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from pipeline.settings.params_file import load_params
from stages import data, tokenize

REPEATS = 5


def median_seconds(function) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    params = load_params()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data.run(params.data, root / "corpus", root / "sft", root / "eval")
        train_path = root / "corpus" / "train.jsonl"
        texts = tokenize.read_texts(train_path)
        tokenizer = tokenize.train_tokenizer(params.tokenize, texts)
        dtype = tokenize.token_dtype(len(tokenizer))
        batch_size = params.tokenize.batch_size
        backend = tokenizer.backend_tokenizer

        def bare() -> None:
            for start in range(0, len(texts), batch_size):
                backend.encode_batch(texts[start : start + batch_size], add_special_tokens=False)

        def stage() -> None:
            tokenize.encode_split(
                tokenizer, tokenize.read_texts(train_path), root / "train.bin", batch_size, dtype, progress=False
            )

        n_tokens = tokenize.encode_split(tokenizer, texts, root / "train.bin", batch_size, dtype, progress=False)
        bare_seconds, stage_seconds = median_seconds(bare), median_seconds(stage)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {len(texts)} documents, {megabytes:.1f} MB, {n_tokens} tokens, vocab {len(tokenizer)}")
    print(f"bare encode_batch : {bare_seconds * 1e3:8.1f} ms  {n_tokens / bare_seconds / 1e6:6.2f} M tokens/s")
    print(
        f"stage encode path : {stage_seconds * 1e3:8.1f} ms  {n_tokens / stage_seconds / 1e6:6.2f} M tokens/s"
        f"  ({megabytes / stage_seconds:.1f} MB/s)"
    )
    overhead = stage_seconds / bare_seconds - 1
    print(f"overhead          : {overhead:+.1%} (target: under +20%) -> {'OK' if overhead < 0.2 else 'OVER TARGET'}")


if __name__ == "__main__":
    main()
