"""Atomic outputs: build in a hidden temporary sibling, then rename into place.

A stage killed midway (even with kill -9) leaves at most a `.NAME.tmp-PID` sibling that the
next run removes; never a half-written file or folder under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clear_stale_temporaries(final: Path) -> None:
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        _remove(stale)


@contextmanager
def atomic_path(final: Path | str, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if final.exists() and final.is_dir() and not final.is_symlink():
            # os.replace cannot swap a folder for a non-empty one: move the old aside first.
            old = final.parent / f".{final.name}.tmp-old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def atomic_dir(final: Path | str) -> Any:
    """Context manager yielding an empty temporary folder that becomes `final` on success."""
    return atomic_path(final, is_dir=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def dumps_json(data: Any) -> str:
    """Stable JSON (sorted keys, fixed indent, newline at the end) so unchanged data hashes the same."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: Path | str, data: Any) -> None:
    write_text(path, dumps_json(data))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Plain (non-atomic) JSONL writer, for files inside a folder built with atomic_dir."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
