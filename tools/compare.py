"""Runs side by side in a few columns: the headline metrics and the settings that differ.

    make compare             # python -m tools.compare: the workspace, HEAD and HEAD's experiments
    make diff REV=main~1     # python -m tools.compare --rev main~1: the same numbers against a commit

`dvc exp show` alone prints every metric of every model (hundreds of columns). This reads the
same data from DVC (`dvc exp show --json`, `dvc metrics diff --json`, `dvc params diff --json`)
and keeps metrics/headline.json, which the report stage writes to answer the experiment's
question: the best all-skills exact match of each kind of model (`<kind>/best_em`) and each
trained MoE's difference and Holm-adjusted p-value against its baseline (`<pair>/diff`, `/p_adj`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from pipeline.profiles import leaves

HEADLINE = "metrics/headline.json"
# the headline's interval bounds make the table twice as wide: `dvc exp show` has them
SHOWN_SUFFIXES = ("/best_em", "/diff", "/p_adj")


def dvc_json(*args: str) -> Any:
    """The JSON a `dvc ... --json` command prints (DVC's own messages go to stderr)."""
    result = subprocess.run(["dvc", *args, "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: `dvc {' '.join(args)}` failed:\n{result.stderr.strip()}")
    return json.loads(result.stdout or "{}")


def runs(shown: list[dict]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, settings, headline metrics) of every row of `dvc exp show --json`: the workspace,
    each baseline commit, and the experiments on it."""
    found = []

    def add(rev: str, name: str | None, data: dict | None) -> None:
        data = data or {}
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        metrics = ((data.get("metrics") or {}).get(HEADLINE) or {}).get("data") or {}
        found.append((name or (rev if rev == "workspace" else rev[:7]), leaves(params), metrics))

    for row in shown:
        add(row["rev"], row.get("name"), row.get("data"))
        for experiment in row.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                add(rev["rev"], rev.get("name"), rev.get("data"))
    return found


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def side_by_side(shown: list[dict]) -> str:
    rows = runs(shown)
    metrics = sorted({key for _, _, numbers in rows for key in numbers if key.endswith(SHOWN_SUFFIXES)})
    settings = sorted({key for _, params, _ in rows for key in params})
    differing = [key for key in settings if len({json.dumps(params.get(key)) for _, params, _ in rows}) > 1]
    header = ["run", *metrics, *differing]
    table = [[name, *(numbers.get(key) for key in metrics), *(params.get(key) for key in differing)]
             for name, params, numbers in rows]  # fmt: skip
    notes = [
        f"{len(rows)} runs; metrics from {HEADLINE} (their 95% intervals: `<kind>/best_em_low`, `_high`); "
        + (f"settings that differ: {len(differing)}." if differing else "no setting differs."),
        "Every column: `dvc exp show`; some: `dvc exp show --drop '.*' --keep 'Experiment|<regex>'`.",
    ]
    if not metrics:
        notes.insert(0, f"No run has {HEADLINE} yet: `dvc repro` (or `dvc pull`) makes it.")
    return markdown(header, table) + "\n\n" + "\n".join(notes)


def against(rev: str, metrics: dict, params: dict) -> str:
    """The headline metrics and the settings that differ between `rev` and the workspace."""
    numbers = sorted(item for item in (metrics.get(HEADLINE) or {}).items() if item[0].endswith(SHOWN_SUFFIXES))
    settings = sorted((params.get("params.yaml") or {}).items())
    metric_rows = [[key, d.get("old"), d.get("new"), d.get("diff")] for key, d in numbers]
    setting_rows = [[key, d.get("old"), d.get("new")] for key, d in settings]
    return "\n".join([
        f"Headline metrics, {rev} -> workspace:",
        markdown(["metric", rev, "workspace", "change"], metric_rows) if metric_rows else "(none changed)",
        f"\nSettings, {rev} -> workspace:",
        markdown(["setting", rev, "workspace"], setting_rows) if setting_rows else "(none differ)",
        f"\nEvery metric that moved: `dvc metrics diff {rev}`; plots: `dvc plots diff {rev} -o plots/`.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="compare the workspace with this git revision (a commit, branch or experiment)")
    args = parser.parse_args(argv)
    if args.rev:
        metrics = dvc_json("metrics", "diff", args.rev, "--targets", HEADLINE)
        print(against(args.rev, metrics, dvc_json("params", "diff", args.rev)))
    else:
        print(side_by_side(dvc_json("exp", "show")))


if __name__ == "__main__":
    main()
