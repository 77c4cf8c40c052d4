"""Checking a local corpus file (data.corpus.path) before the datasets library reads it.

The data stage (stages/data.py) checks it before loading it, the check stage (stages/check.py)
before any stage runs.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.records import json_records, open_parquet, text_lines
from pipeline.settings.base import InputError


def check_corpus_file(path: Path, text_field: str) -> None:
    """Raise InputError naming the file and line unless the local corpus file holds rows the
    datasets library reads: UTF-8 text, JSON rows with `text_field`, or a readable parquet file."""
    if path.suffix == ".parquet":
        rows = open_parquet(path).metadata.num_rows
    elif path.suffix == ".txt":
        rows = sum(1 for _, line in text_lines(path) if line.strip())
    else:
        rows = 0
        for where, row in json_records(path):
            if not isinstance(row, dict) or text_field not in row:
                columns = ", ".join(row) if isinstance(row, dict) else f"none, it is a JSON {type(row).__name__}"
                raise InputError(
                    f"corpus {path} {where} has no data.corpus.text_field={text_field!r} field; columns: {columns}"
                )
            rows += 1
    if not rows:
        raise InputError(f"corpus {path} has no rows; data.corpus.path must name a file of documents")
