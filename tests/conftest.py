"""Session fixtures built once: tiny generated data, a tokenizer and a tiny pretrained model."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.settings.data import DataSettings, SkillSettings, WorldSettings
from pipeline.settings.pretrain import ModelSettings, PretrainSettings
from pipeline.settings.tokenize import TokenizeSettings
from pipeline.stage import configure_environment
from stages import data, pretrain, tokenize

configure_environment()  # tests never reach the hub, and keep caches inside the project

TINY_DATA = DataSettings(
    world=WorldSettings(corpus_megabytes=0.3),
    skills=SkillSettings(train_examples=300, eval_examples=60, validation_examples=40),
    story_eval_examples=40,
)

TINY_MODEL = ModelSettings(
    hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64, max_position_embeddings=64
)
TINY_PRETRAIN = PretrainSettings(
    model=TINY_MODEL,
    seq_len=32,
    micro_batch_size=8,
    batch_tokens=256,
    max_steps=200,
    warmup_steps=10,
    learning_rate=1e-2,
    log_interval=10,
    eval_interval=50,
    eval_max_batches=4,
    checkpoint_interval=100,
    sample_max_new_tokens=8,
    peak_flops=1e11,  # skip the matmul micro-benchmark in tests
)


def outputs_in(root: Path) -> pretrain.Outputs:
    return pretrain.Outputs(
        root / "model", root / "checkpoints", root / "live", root / "samples.md", root / "timing.json"
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output of the data stage on TINY_DATA: a folder with corpus/, sft/ and eval/."""
    root = tmp_path_factory.mktemp("data")
    data.run(TINY_DATA, root / "corpus", root / "sft", root / "eval", root / "validation")
    return root


@pytest.fixture(scope="session")
def tiny_tokenized(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(tokenizer folder, tokens folder, summary) of the tokenize stage on the tiny corpus."""
    root = tmp_path_factory.mktemp("tokenized")
    summary = tokenize.run(TokenizeSettings(), tiny_data / "corpus", root / "tokenizer", root / "tokens")
    return root / "tokenizer", root / "tokens", summary


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_tokenized, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """(summary, output folder) of the pretrain stage on the tiny data: model/ is a loadable model."""
    tokenizer_dir, tokens_dir, _ = tiny_tokenized
    root = tmp_path_factory.mktemp("pretrain")
    summary = pretrain.run(TINY_PRETRAIN, tokens_dir, tokenizer_dir, outputs_in(root))
    return summary, root
