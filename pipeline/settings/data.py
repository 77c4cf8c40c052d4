"""The `data` section: the data stage's corpus, SFT skill sets and eval sets."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from pipeline.settings.base import (
    CORPUS_SUFFIXES,
    PROJECT_ROOT,
    SKILLS,
    PathSetting,
    Section,
    one_of,
)


class CorpusSettings(Section):
    """Where the pretraining corpus comes from."""

    source: Literal["synthetic", "local", "hub"] = Field(
        "synthetic",
        description="synthetic: the invented world generated from data.seed; local: a file at "
        "`path`; hub: a dataset `name` for datasets.load_dataset (needs network access).",
    )
    path: str | None = Field(
        None, description="local: a .txt (one document per paragraph), .jsonl/.json or .parquet file."
    )
    name: str | None = Field(None, description="hub: dataset name, e.g. 'Salesforce/wikitext'.")
    config_name: str | None = Field(None, description="hub: dataset configuration, if it has several.")
    split: str = Field("train", description="hub: which split to read.")
    text_field: str = Field("text", description="local jsonl/parquet and hub: the column holding text.")
    max_documents: int | None = Field(
        None, ge=1, description="Keep only the first N documents (after reading, before splitting)."
    )

    @model_validator(mode="after")
    def _source_needs_its_fields(self) -> CorpusSettings:
        if self.source == "local":
            if not self.path:
                raise ValueError("`path` is required when source is 'local'")
            path = Path(self.path)
            if not path.is_absolute():
                path = PROJECT_ROOT / path
            if path.suffix not in CORPUS_SUFFIXES:
                raise ValueError(
                    f"`path` {self.path!r} has suffix {path.suffix!r}; valid: {', '.join(CORPUS_SUFFIXES)}"
                )
            if path.is_dir():
                raise ValueError(f"`path` {self.path!r} is a folder: it must be a {one_of(CORPUS_SUFFIXES)} file")
            if not path.is_file():
                raise ValueError(f"`path` {self.path!r} does not exist (looked at {path})")
        if self.source == "hub" and not self.name:
            raise ValueError("`name` (a dataset name for datasets.load_dataset) is required when source is 'hub'")
        return self


class WorldSettings(Section):
    """The invented world the synthetic corpus describes."""

    corpus_megabytes: float = Field(
        3.0, gt=0, le=1000, description="Size of the whole synthetic corpus (all splits) in MB."
    )
    countries: int = Field(
        24,
        ge=2,
        le=200,
        description="Invented countries, each with a capital. Fewer, denser facts are easier to learn.",
    )
    fact_share: float = Field(
        0.25, ge=0, le=1, description="Share of corpus sentences that state a country fact (capital, residents)."
    )


class SkillSettings(Section):
    """The SFT skill datasets (one per expert) and their held-out eval sets."""

    names: list[Literal[SKILLS]] = Field(
        default_factory=lambda: list(SKILLS),
        min_length=1,
        description="Which skills to generate: addition (2-digit + 1-digit), sorting (3-5 digits), "
        "comparison (the larger of two numbers), counting (2-8 words).",
    )
    train_examples: int = Field(3000, ge=1, le=1_000_000, description="SFT training rows per skill.")
    eval_examples: int = Field(
        200, ge=1, le=400, description="Held-out eval questions per skill (never in the SFT rows)."
    )
    validation_examples: int = Field(
        100,
        ge=1,
        le=400,
        description="Validation questions per skill (data/validation): never an eval question; "
        "what merge searches score their trials on, so that the eval items stay held out.",
    )
    choices: int = Field(4, ge=2, le=8, description="Answer options of the multiple-choice items (skills and stories).")

    @model_validator(mode="after")
    def _names_unique(self) -> SkillSettings:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"`names` lists a skill twice: {self.names}")
        return self


class DataSettings(Section):
    """`data` stage: corpus, SFT skill sets and eval sets (python -m stages.data)."""

    seed: int = Field(0, description="Seed of every random choice: same seed -> byte-identical files.")
    corpus: CorpusSettings = Field(default_factory=CorpusSettings)
    val_fraction: float = Field(
        0.02, gt=0, lt=0.5, description="Share of corpus documents held out for validation loss."
    )
    test_fraction: float = Field(
        0.02, gt=0, lt=0.5, description="Share of corpus documents held out for perplexity eval."
    )
    world: WorldSettings = Field(default_factory=WorldSettings)
    skills: SkillSettings = Field(default_factory=SkillSettings)
    story_eval_examples: int = Field(
        200, ge=1, le=10_000, description="Story-completion multiple-choice items (HellaSwag style)."
    )

    def paths(self, root: Path) -> dict[str, PathSetting]:
        if self.corpus.source == "local" and self.corpus.path:
            return {"corpus.path": PathSetting(self.corpus.path, CORPUS_SUFFIXES)}
        return {}


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = DataSettings
