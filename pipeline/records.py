"""Reading the files users give, row by row, with errors that say where.

Every problem is an InputError naming the file and the line (or row): the libraries behind
(datasets, pyarrow, axolotl, lm-eval) fail on the same files with StopIteration, a byte offset
or an UnboundLocalError that names neither.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.settings.base import InputError

# The `datasets` loader (and axolotl's `ds_type`) of each kind of SFT dataset file.
DATASET_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def dataset_format(dataset: str | Path) -> str:
    """axolotl's `ds_type` for a local file."""
    suffix = Path(dataset).suffix
    if suffix not in DATASET_FORMATS:
        raise InputError(f"SFT dataset {dataset}: use a {', '.join(DATASET_FORMATS)} file of chat messages")
    return DATASET_FORMATS[suffix]


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file, read line by line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(
                    f"{path} line {number}: byte {raw[error.start]:#04x} at column {error.start + 1} is not "
                    "UTF-8; save the file as UTF-8"
                ) from None
            yield number, line


def json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(`line N` or `row N`, row) of a JSON Lines file, or of a .json file holding one array."""
    lines = text_lines(path)
    if path.suffix == ".json":
        lines = list(lines)
        if next((line for _, line in lines if line.strip()), "").lstrip().startswith("["):
            yield from json_array_records(path, "".join(line for _, line in lines))
            return
    for number, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(
                f"{path} line {number} is not valid JSON ({error.msg}, column {error.colno}); "
                "write one JSON object per line"
            ) from None
        yield f"line {number}", row


def json_array_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path} line {error.lineno} is not valid JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(rows, list):
        raise InputError(f"{path} holds a JSON {type(rows).__name__}; give an array of rows or one row per line")
    for index, row in enumerate(rows, start=1):
        yield f"row {index}", row


def open_parquet(path: Path) -> Any:
    """pyarrow's ParquetFile (only the footer is read)."""
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as error:
        raise InputError(f"{path} is not a readable parquet file ({error}); write it again") from None
