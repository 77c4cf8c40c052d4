"""Reading preference pairs (DPO's datasets): this project's `messages` rows or trl's `prompt` ones.

read_pairs raises an InputError naming the file and the row, before axolotl starts (stages/dpo.py)
or before any stage runs (stages/check.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.records import dataset_format, json_records, open_parquet
from pipeline.settings.base import InputError
from pipeline.settings.dpo import PREFERENCE_ROW

# A preference pair as the dpo stage reads it: (prompt messages, chosen answer, rejected answer).
Pair = tuple[list[dict[str, str]], str, str]
# The prompt column: this project's `messages`, or trl's `prompt` (taken when both exist: datasets
# that have both keep the whole chosen conversation in `messages`).
PROMPT_COLUMNS = ("prompt", "messages")


def prompt_column(columns: list[str]) -> str | None:
    return next((name for name in PROMPT_COLUMNS if name in columns), None)


def prompt_messages(value: Any) -> list[dict[str, str]] | None:
    """The prompt as chat messages (a bare string is one user message, as axolotl reads it), or None."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        return None
    messages = []
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):  # fmt: skip
            return None
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def answer_text(value: Any) -> str | None:
    """An answer: a string, a message, or a conversation whose last message it is (axolotl's reading)."""
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_pairs(path: Path) -> tuple[list[Pair], str]:
    """The pairs of a .jsonl/.json/.parquet preference file, and its prompt column; InputError naming
    the file and the row unless every row has a prompt and two different answers."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"preference dataset {path} is a folder; give one .jsonl/.json/.parquet file of pairs")
    if not path.is_file():
        raise InputError(f"preference dataset {path} does not exist (rows like {PREFERENCE_ROW})")
    dataset_format(path)  # InputError for another suffix
    if path.suffix == ".parquet":
        parquet = open_parquet(path)
        columns = parquet.schema_arrow.names
        rows = enumerate(parquet.read().to_pylist(), start=1)
        where_format = "row {}"
    else:
        records = list(json_records(path))
        columns = sorted({key for _, row in records if isinstance(row, dict) for key in row})
        rows = ((where, row) for where, row in records)
        where_format = "{}"
    column = prompt_column(columns)
    missing = [name for name in ("chosen", "rejected") if name not in columns] + ([] if column else ["messages"])
    if missing:
        raise InputError(
            f"preference dataset {path} has no {', '.join(missing)} column (columns: {columns}); each row must "
            f"look like {PREFERENCE_ROW}"
        )
    pairs = []
    for where, row in rows:
        where = where_format.format(where)
        messages = prompt_messages(row.get(column)) if isinstance(row, dict) else None
        chosen = answer_text(row.get("chosen")) if isinstance(row, dict) else None
        rejected = answer_text(row.get("rejected")) if isinstance(row, dict) else None
        if messages is None or chosen is None or rejected is None:
            bad = [name for name, value in ((column, messages), ("chosen", chosen), ("rejected", rejected))
                   if value is None]  # fmt: skip
            raise InputError(
                f"{path} {where}: {', '.join(bad)} is missing or not a non-empty string (or chat messages); each "
                f"row must look like {PREFERENCE_ROW}"
            )
        pairs.append((messages, chosen, rejected))
    if not pairs:
        raise InputError(f"preference dataset {path} has no rows; write one {PREFERENCE_ROW} per line")
    return pairs, column
