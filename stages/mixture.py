"""`mixture` stage: the rows every dense and MoE run trains on, drawn once from the experts' SFT data.

    python -m stages.mixture --roster-experts data/roster/experts.json --out data/mixture

mixture.rows rows of the experts' datasets (the roster's, pipeline/roster.py) in the proportions of
mixture.weights, drawn with mixture.seed. Written once, the runs depend on the file by hash: they
are guaranteed the same rows, and an expert's training setting reruns none of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir, dumps_json
from pipeline.mixture import MIXTURE_COUNTS, MIXTURE_ROWS
from pipeline.records import dataset_format
from pipeline.roster import read_roster_file
from pipeline.settings.mixture import MixtureSettings
from pipeline.stage import start

log = logging.getLogger("stages.mixture")


def write_mixture(settings: MixtureSettings, datasets: dict[str, Path], seed: int, out: Path) -> dict[str, int]:
    """Draw the training mixture into `out` (jsonl); return rows per expert."""
    from datasets import load_dataset

    weights = settings.weights or dict.fromkeys(datasets, 1.0)
    total = sum(weights.values())
    counts = {name: round(settings.rows * weight / total) for name, weight in weights.items() if weight > 0}
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for name, count in counts.items():
        path = datasets[name]
        messages = load_dataset(dataset_format(path), data_files=str(path), split="train")["messages"]
        # with replacement only when the mixture asks for more rows than the dataset has
        picks = (
            rng.sample(range(len(messages)), count)
            if count <= len(messages)
            else rng.choices(range(len(messages)), k=count)
        )
        rows.extend({"messages": messages[i]} for i in picks)
    rng.shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--roster-experts", type=Path, required=True, help="the roster's experts.json (datasets)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: the rows and the counts per expert")
    args = parser.parse_args(argv)
    params = start("mixture")
    datasets = {name: Path(dataset) for name, dataset in read_roster_file(args.roster_experts).items()}
    with atomic_dir(args.out) as tmp:
        counts = write_mixture(params.mixture, datasets, params.mixture.seed, tmp / MIXTURE_ROWS)
        (tmp / MIXTURE_COUNTS).write_text(dumps_json(counts))
    log.info("mixture of %d rows: %s", sum(counts.values()), ", ".join(f"{n} {c}" for n, c in counts.items()))


if __name__ == "__main__":
    main()
