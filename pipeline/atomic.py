"""Atomic outputs: build in a temporary folder or file, then rename into place.

Temporaries live in the project's scratch folder `.tmp/` (untracked; no stage depends on it),
never beside the output, where they would sit inside a folder a later stage depends on (a merge's
temporary inside models/merged, which the MoE hashes). A stage that fails or is stopped (SIGTERM,
Ctrl-C, DVC dying: pipeline/stage.py) removes its temporary; one killed outright (kill -9) leaves
it in .tmp/, where the next atomic write of any stage removes it. Never a half-written file or
folder under the final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCRATCH = Path(".tmp")  # relative to the project root, a stage's working directory
_PID = re.compile(r"\.tmp-(?:old-)?(\d+)$")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def scratch_for(final: Path) -> tuple[Path, str]:
    """(folder, name prefix) of `final`'s temporaries: the project's .tmp/ when `final` is inside
    the working directory and on the same file system (a rename cannot cross file systems),
    else beside `final` (outputs outside a project, e.g. in tests)."""
    root = Path.cwd()
    try:
        relative = final.absolute().relative_to(root)
    except ValueError:
        return final.parent, f".{final.name}"
    scratch = root / SCRATCH
    scratch.mkdir(exist_ok=True)
    if os.stat(scratch).st_dev != os.stat(final.parent).st_dev:
        return final.parent, f".{final.name}"
    return scratch, "__".join(relative.parts)


def clear_stale_temporaries(folder: Path, prefix: str) -> None:
    """Remove temporaries of `prefix` (any process) and of processes no longer running (any
    output) from `folder`: leftovers of stages killed outright."""
    for path in folder.glob("*.tmp-*"):
        pid = _PID.search(path.name)
        if path.name.startswith(f"{prefix}.tmp-") or (pid and not _running(int(pid.group(1)))):
            _remove(path)


@contextmanager
def atomic_path(final: Path | str, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder, prefix = scratch_for(final)
    clear_stale_temporaries(folder, prefix)
    clear_stale_temporaries(final.parent, f".{final.name}")  # beside it: where older versions put them
    tmp = folder / f"{prefix}.tmp-{os.getpid()}"
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if final.exists() and final.is_dir() and not final.is_symlink():
            # os.replace cannot swap a folder for a non-empty one: move the old aside first.
            old = folder / f"{prefix}.tmp-old-{os.getpid()}"
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
