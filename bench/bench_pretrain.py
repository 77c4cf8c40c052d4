"""Pretraining throughput: tokens/s and MFU of the stage's loop, and its overhead over a bare loop.

    python -m bench.bench_pretrain            (or `make bench`)
    python -m bench.bench_pretrain --compile  (also time torch.compile on the bare loop)

A bench-size Llama (hidden 256, 6 layers, MLP 1024, seq 256) trains on the default corpus:
1. through `stages.pretrain.run` (sampling, accumulation, clipping, schedule, logging), with
   tokens/s read from its own dvclive curve (eval and checkpoint time excluded);
2. in a bare loop: forward, loss, backward, AdamW step on the same model and batch shape.
MFU = tokens/s x FLOPs per token (6N + attention) / the measured fp32 matmul peak.
Targets (issue 3): MFU >= 40%; stage overhead over the bare loop <= 5%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from pipeline.params import ModelSettings, PretrainSettings, TokenizeSettings, WorldSettings, load_params
from stages import data, pretrain, tokenize

BENCH_MODEL = ModelSettings(
    hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=8, intermediate_size=1024, max_position_embeddings=256
)
STEPS, WARMUP_STEPS = 40, 10


def bench_settings(peak: float) -> PretrainSettings:
    return PretrainSettings(
        model=BENCH_MODEL,
        seq_len=256,
        micro_batch_size=16,
        batch_tokens=16 * 256,
        max_steps=STEPS,
        warmup_steps=5,
        log_interval=WARMUP_STEPS,
        eval_interval=10_000,
        eval_max_batches=1,
        checkpoint_interval=10_000,
        sample_prompts=["The"],
        sample_max_new_tokens=1,
        peak_flops=peak,
    )


def bare_tokens_per_second(settings: PretrainSettings, tokenizer, tokens, compile_model: bool) -> float:
    torch.manual_seed(0)
    model = pretrain.build_model(settings.model, tokenizer)
    optimizer = pretrain.build_optimizer(model, settings)
    step_model = torch.compile(model) if compile_model else model
    sampler = pretrain.BatchSampler(tokens, settings.seq_len, "windows", {"bos": 1, "eos": 2, "pad": 0}, 0)
    inputs, targets = sampler.next_batch(settings.micro_batch_size)
    times = []
    for _ in range(STEPS):
        started = time.perf_counter()
        loss = pretrain.causal_lm_loss(step_model(input_ids=inputs).logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return settings.batch_tokens / statistics.median(times[WARMUP_STEPS:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile", action="store_true", help="also time the bare loop under torch.compile")
    args = parser.parse_args()
    peak = pretrain.measure_peak_flops(torch.device("cpu"), torch.float32)
    params = load_params()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = params.data.model_copy(update={"world": WorldSettings(corpus_megabytes=1.0)})
        data.run(small, root / "corpus", root / "sft", root / "eval")
        tokenize.run(TokenizeSettings(), root / "corpus", root / "tokenizer", root / "tokens")
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        settings = bench_settings(peak)
        outputs = pretrain.Outputs(root / "model", root / "checkpoints", root / "live", root / "samples.md")
        pretrain.run(settings, root / "tokens", root / "tokenizer", outputs)
        curve = (root / "live/plots/metrics/train/tokens_per_second.tsv").read_text().splitlines()[2:]
        stage_tps = statistics.median(float(row.split("\t")[-1]) for row in curve)  # windows after the first
        tokens = np.memmap(root / "tokens/train.bin", dtype="uint16", mode="r")
        bare_tps = bare_tokens_per_second(settings, tokenizer, tokens, compile_model=False)
        compiled_tps = bare_tokens_per_second(settings, tokenizer, tokens, True) if args.compile else None
        model = pretrain.build_model(settings.model, tokenizer)
        flops = pretrain.flops_per_token(settings.model, model, settings.seq_len)
        n_params = sum(p.numel() for p in model.parameters())

    print(f"device: CPU, {torch.get_num_threads()} threads; measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(
        f"model: {n_params / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOP/token, {settings.batch_tokens} tokens/step"
    )
    for name, tps in (("stage loop", stage_tps), ("bare loop", bare_tps), ("bare + compile", compiled_tps)):
        if tps:
            print(f"{name:15}: {tps:8.0f} tokens/s   MFU {tps * flops / peak:6.1%}")
    overhead = bare_tps / stage_tps - 1
    print(f"stage overhead over the bare loop: {overhead:+.1%} (target <= +5%)")
    print(f"MFU of the stage loop: {stage_tps * flops / peak:.1%} (target >= 40%)")


if __name__ == "__main__":
    main()
