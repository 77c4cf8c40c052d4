"""Training curves through dvclive: the curves and nothing else.

`log_metric` appends each value to its curve file at once. dvclive also keeps a summary
(metrics.json) of the last values in the curves' folder, and `Live.end()` writes it and prepares
an upload to DVC Studio. The stages write their own summary where dvc.yaml declares it, so that
one would only be an undeclared file inside a folder later stages depend on: it is not written,
and `end()` is never called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def curve_logger(folder: str | Path) -> Any:
    """A dvclive `Live` writing only `folder`/plots/metrics/<name>.tsv (indexed by `live.step`)."""
    from dvclive import Live  # imported here: dvclive imports DVC, a second at import

    class CurvesOnly(Live):
        def make_summary(self) -> None:
            pass

    # No dvc.yaml rewrites and no experiment commits from inside a stage: the stage declares
    # these curves in dvc.yaml itself.
    return CurvesOnly(dir=str(folder), save_dvc_exp=False, dvcyaml=False, report=None)


def last_value(folder: str | Path, name: str) -> tuple[int, float] | None:
    """(step, value) of the last point of curve `name` (e.g. "train/loss"), or None without one."""
    path = Path(folder) / "plots" / "metrics" / f"{name}.tsv"
    rows = path.read_text().splitlines()[1:] if path.is_file() else []
    if not rows:
        return None
    step, value = rows[-1].split("\t")[:2]
    return int(step), float(value)
