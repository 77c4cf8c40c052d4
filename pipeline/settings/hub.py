"""The `hub` section: pinned snapshots of Hugging Face hub repositories."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
)

from pipeline.settings.base import (
    Name,
    Section,
)


class HubSource(Section):
    """One snapshot of a Hugging Face hub repository: the hub@<name> stage fetches it into data/hub/<name>."""

    repo_id: str = Field(description="Repository id, e.g. 'vonjack/Phi-3-mini-4k-instruct-LLaMAfied'.")
    repo_type: Literal["model", "dataset"] = Field("model", description="Whether repo_id names a model or a dataset.")
    revision: str = Field(
        description="A commit sha (reproducible), or a branch or tag: resolved once when the stage runs; "
        "DVC reruns the download when this setting changes, not when the branch moves."
    )
    allow_patterns: list[str] | None = Field(
        None, description="Fetch only matching files, e.g. ['*.json', '*.safetensors'] or ['data/train-*.parquet']."
    )


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = dict[Name, HubSource]
