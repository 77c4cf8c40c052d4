"""The time of a merge search's trial (merge + validation eval), in one process as the stage runs it.

    python -m bench.bench_merge_search [--trials 8]   (or `make bench`; needs `make run` first for the experts)

Runs a search like the merge-search profile's (ties, absolute weights, TPE) over the project's
experts in a scratch study, and prints the set-up (imports, task files: once per stage run) and
each trial's time split into the mergekit merge and the lm-eval score on the validation split,
as the median with its range.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.settings.base import PROJECT_ROOT
from pipeline.settings.merge_search import SearchRun
from pipeline.settings.params_file import load_params
from pipeline.stage import configure_compute, configure_environment


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials to time (default 8)")
    args = parser.parse_args(argv)
    configure_environment()
    params = load_params()
    configure_compute(params.compute)
    experts = {name: str(PROJECT_ROOT / "models/experts" / name) for name in params.finetune.experts}
    validation = PROJECT_ROOT / "data/validation"
    if not all((Path(path) / "config.json").is_file() for path in experts.values()) or not validation.is_dir():
        raise SystemExit("error: the experts or data/validation are missing: run `make run` first")
    started = time.perf_counter()
    from stages import merge_search

    merge_search.quiet_tools()
    with tempfile.TemporaryDirectory() as tmp:
        scorer = merge_search.Scorer.make(params.eval, validation, Path(next(iter(experts.values()))), Path(tmp))
        setup = time.perf_counter() - started
        run = SearchRun(methods=["ties"], normalize=False, trials=args.trials)
        search = merge_search.Search(run, experts, params.finetune.base_model, params.merge.dtype, scorer)
        merges, scores = [], []
        merge, items = search.merge, scorer.items

        def timed_merge(recipe, out_dir):
            begin = time.perf_counter()
            config = merge(recipe, out_dir)
            merges.append(time.perf_counter() - begin)
            return config

        def timed_items(model_dir):
            begin = time.perf_counter()
            result = items(model_dir)
            scores.append(time.perf_counter() - begin)
            return result

        search.merge, scorer.items = timed_merge, timed_items
        study = merge_search.open_study(Path(tmp) / "study.db", "bench")
        merge_search.run_trials(study, search, args.trials)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials]
    rows = {
        "set-up (imports, task files; once per stage run)": f"{setup:.2f} s",
        "trial (merge + validation eval)": spread(durations),
        f"  mergekit merge of {len(experts)} experts": spread(merges),
        f"  lm-eval on the validation split ({study.trials[0].user_attrs['items']} items)": spread(scores),
    }
    width = max(map(len, rows))
    for label, value in rows.items():
        print(f"{label.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
