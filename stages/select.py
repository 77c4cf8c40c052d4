"""`select` stage: the best merges by a measured metric, for the MoE stage to build on.

    python -m stages.select --eval-metrics metrics/eval --out metrics/select.json

Reads metrics/eval/merge/<recipe>.json for every recipe in merge.recipes, ranks the merges by
select.metric (higher is better; ties broken by recipe name, so the choice is deterministic),
and writes the top select.top_k with every score it used. A merge qualifies if it has the metric
and scores at least select.min_score. When fewer than top_k qualify, select.on_too_few decides:
keep those that do (`missing` says how many short) or fail; when none qualifies it always fails.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json
from pipeline.roster import read_roster_file
from pipeline.settings.base import InputError
from pipeline.settings.select import SelectSettings
from pipeline.stage import add_seed_argument, stage_name, start

log = logging.getLogger("stages.select")


def select(settings: SelectSettings, scores: dict[str, float | None]) -> dict[str, Any]:
    """The selection from recipe -> score (None: the metric is missing for that merge)."""
    qualified = {name: score for name, score in scores.items()
                 if score is not None and (settings.min_score is None or score >= settings.min_score)}  # fmt: skip
    ranked = sorted(qualified, key=lambda name: (-qualified[name], name))
    selected = ranked[: settings.top_k]
    shown = ", ".join(f"{name}={score}" for name, score in sorted(scores.items()))
    if not selected:
        raise InputError(
            f"no merge qualifies for select.metric {settings.metric!r} with min_score {settings.min_score} "
            f"(scores: {shown}); lower select.min_score or improve the merges"
        )
    missing = settings.top_k - len(selected)
    if missing and settings.on_too_few == "fail":
        raise InputError(
            f"only {len(selected)} of select.top_k={settings.top_k} merges qualify ({shown}); "
            "lower select.min_score or top_k, or set select.on_too_few: keep"
        )
    return {
        "metric": settings.metric,
        "top_k": settings.top_k,
        "min_score": settings.min_score,
        "selected": selected,
        "missing": missing,
        "scores": {name: scores[name] for name in sorted(scores)},
    }


def read_scores(eval_dir: Path, recipes: list[str], metric: str) -> dict[str, float | None]:
    scores = {}
    for recipe in recipes:
        path = eval_dir / f"{recipe}.json"
        if not path.is_file():
            raise InputError(f"{path} is missing: run eval_merge@{recipe} first")
        scores[recipe] = json.loads(path.read_text()).get(metric)
    if all(score is None for score in scores.values()):
        known = sorted(json.loads((eval_dir / f"{recipes[0]}.json").read_text()))
        raise InputError(f"select.metric {metric!r} is in no merge's eval metrics; they have: {', '.join(known)}")
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--roster-merges", type=Path, required=True, help="the roster's merges.json (which merges)")
    parser.add_argument("--eval-metrics", type=Path, required=True, help="folder of the merges' <recipe>.json evals")
    parser.add_argument("--out", type=Path, required=True, help="selection JSON (a DVC metric)")
    add_seed_argument(parser)
    args = parser.parse_args(argv)
    params = start(stage_name("select", args.seed))
    recipes = list(read_roster_file(args.roster_merges))
    if not recipes:
        raise InputError("merge.recipes is empty: there is nothing to select from")
    selection = select(params.select, read_scores(args.eval_metrics, recipes, params.select.metric))
    log.info("selected %s by %s", ", ".join(selection["selected"]), params.select.metric)
    write_json(args.out, selection)


if __name__ == "__main__":
    main()
