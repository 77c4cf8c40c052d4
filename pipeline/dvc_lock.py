"""What a dvc.lock records, read as plain YAML: each stage's entry and every output's hash.

Its readers (the check stage's stale-output removal, the pipeline tests, the pipeline benchmark)
need no DVC repository for it, nor DVC's second of import time.
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml import YAML


def lock_stages(text: str) -> dict[str, dict[str, Any]]:
    """Stage name -> its dvc.lock entry (deps, params, outs); none for an empty lock."""
    return (YAML(typ="safe").load(text) or {}).get("stages") or {}


def lock_outputs(text: str) -> dict[str, str]:
    """Every output a dvc.lock records: path -> md5 (a folder's is the hash of its listing)."""
    return {out["path"]: out["md5"] for entry in lock_stages(text).values() for out in entry.get("outs") or []}
