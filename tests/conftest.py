"""Session fixtures: a tiny generated dataset and a tokenizer trained on it, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.params import DataSettings, SkillSettings, TokenizeSettings, WorldSettings
from pipeline.stage import configure_environment
from stages import data, tokenize

configure_environment()  # tests never reach the hub, and keep caches inside the project

TINY_DATA = DataSettings(
    world=WorldSettings(corpus_megabytes=0.3),
    skills=SkillSettings(train_examples=300, eval_examples=60),
    story_eval_examples=40,
)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output of the data stage on TINY_DATA: a folder with corpus/, sft/ and eval/."""
    root = tmp_path_factory.mktemp("data")
    data.run(TINY_DATA, root / "corpus", root / "sft", root / "eval")
    return root


@pytest.fixture(scope="session")
def tiny_tokenized(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(tokenizer folder, tokens folder, summary) of the tokenize stage on the tiny corpus."""
    root = tmp_path_factory.mktemp("tokenized")
    summary = tokenize.run(TokenizeSettings(), tiny_data / "corpus", root / "tokenizer", root / "tokens")
    return root / "tokenizer", root / "tokens", summary
