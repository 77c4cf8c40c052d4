"""`report` stage: every model's scores, with their uncertainty, and the comparisons that matter.

    python -m stages.report --eval-metrics metrics/eval --eval-raw metrics/eval_raw \
        --selection metrics/select.json \
        --curves pretrain=metrics/pretrain finetune=metrics/finetune mixture=metrics/mixture_finetune \
        --routing metrics/routing --runs metrics/runs --replicas metrics/replicas --out metrics/report \
        --headline metrics/headline.json

Inputs: metrics/eval/<kind>/<name>.json (each model's metrics; the folder is its kind, one of
pipeline/kinds.py's MODEL_KINDS) and, from the same eval stage, metrics/eval_raw/<kind>/<name>/
items.json (0/1 per item for every binary metric) and lineage.json (which stage made the model,
from which parents, with which settings); the select stage's JSON; the training stages' dvclive
folders; the MoE stages' routing JSONs.

Every exact-match or accuracy score is shown with its Wilson 95% confidence interval over its
items. The pairs that answer the research question (each trained MoE against the best dense
model trained on the same mixture, and against the untrained MoE it started from; the best
merge against the best expert; a searched merge against every hand-written recipe and the best
expert) get McNemar's exact test on the pooled skill items, Holm-adjusted over the pairs, and one
generated sentence each (the findings).

With replicated runs (`seeds.replicas`: --replicas holds <seed>/eval and <seed>/eval_raw, laid out
like the main run's), every comparison is also pooled over the runs: the difference with a crossed
bootstrap interval over seeds and items, the exact item sign-flip test pooled over seeds,
Holm-adjusted, and in how many runs the ordering holds (pipeline/stats.py says why these).

Outputs in --out:
- leaderboard.md: findings; across seeds (with replicated runs: the pooled findings and tests, each
  model's score in every run and pooled); models (rows, by kind) x the main metrics, in each column the cells
  holding its best value in bold (every tied cell; none when one model alone has the metric); the
  selected merges; the paired tests; every task/metric, bolded the same way;
- skill_matrix.png: models (rows, by kind) x skills, exact-answer accuracy, all skills pooled apart
  (without a `skills` task, e.g. a profile scored on standard tasks: a note saying so);
- curves.png: training and validation loss, one panel per training run;
- routing.png: tokens routed to each expert of each MoE (without routing JSONs: a note);
- merge_search.png: each merge search's validation score by trial and the best so far (without a
  search: a note); the Merge search section says whether search beat the hand-written recipes;
- index.html: all of the above in one self-contained page (images inlined, no CDN, no script
  from outside), with each model's lineage;
- cards/<kind>/<name>.md: a model card with the model's eval results and lineage.
--headline: a flat JSON of a few numbers (best pooled exact match of each kind with its interval;
each trained MoE's difference and adjusted p against the dense model and its untrained MoE; with
replicated runs the same pooled over them under `seeds/`, with `seeds/<pair>/holds`), a DVC metric
whose keys stay short for `dvc exp show`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_path, write_json, write_text
from pipeline.kinds import KINDS, MODEL_KINDS, run_sections
from pipeline.lineage import json_block, render_card
from pipeline.settings.base import InputError
from pipeline.stage import start
from pipeline.stats import crossed_bootstrap, discordant_counts, holm, mcnemar_exact, paired_sign_flip, proportion

log = logging.getLogger("stages.report")

LOWER_IS_BETTER = ("word_perplexity", "bits_per_byte", "byte_perplexity", "loss")
POOLED = "all_skills/exact_match"  # every skill's exact-match items, concatenated: what models are ranked by
ALPHA = 0.05  # family-wise significance level of the paired tests
PAIR_COLUMNS = ["A", "B", "score A [95% CI]", "score B [95% CI]", "difference", "A only / B only right",
                "p", "Holm-adjusted p", "verdict"]  # fmt: skip
NO_PAIRS = (
    "No comparisons yet: they need a trained MoE and a dense model or its untrained MoE, or a merge and "
    "an expert, each with the pooled skill items."
)


@dataclass(frozen=True)
class Model:
    """One evaluated model: its id (`<kind>/<name>`), metrics, per-item outcomes and lineage."""

    id: str
    metrics: dict[str, float]
    items: dict[str, list[int]]
    lineage: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.id.partition("/")[0]

    @property
    def name(self) -> str:
        return self.id.partition("/")[2]


@dataclass(frozen=True)
class Score:
    """A metric's value and, for a share of items right, its Wilson 95% interval."""

    value: float
    low: float | None = None
    high: float | None = None

    @classmethod
    def of(cls, outcomes: list[int]) -> Score:
        return cls(*proportion(outcomes))

    def text(self, digits: int = 3) -> str:
        """`0.915 [0.87, 0.95]`, or the value alone when there is no interval."""
        if self.low is None:
            return f"{self.value:.4g}"
        return f"{self.value:.{digits}f} [{self.low:.2f}, {self.high:.2f}]"


@dataclass(frozen=True)
class Pair:
    """A comparison the research question asks for: is A better than B on the skills?"""

    key: str  # short and stable: the headline's keys
    question: str
    a: str
    b: str
    in_headline: bool


@dataclass(frozen=True)
class PairedTest:
    pair: Pair
    score_a: Score
    score_b: Score
    only_a: int  # items A answers right and B wrong
    only_b: int
    items: int
    p: float
    p_adjusted: float
    pair_outcomes: tuple[list[int], list[int]] = ((), ())  # A's and B's 0/1 per item

    @property
    def significant(self) -> bool:
        return self.p_adjusted < ALPHA


def model_order(model_id: str) -> tuple[int, str]:
    """Kinds in MODEL_KINDS order (-1: not a kind), names alphabetically within a kind."""
    kind, _, name = model_id.partition("/")
    return MODEL_KINDS.index(kind) if kind in MODEL_KINDS else -1, name


def read_json(path: Path, hint: str) -> Any:
    if not path.is_file():
        raise InputError(f"{path} is missing: {hint}")
    return json.loads(path.read_text())


def load_models(eval_dir: Path, raw_dir: Path) -> dict[str, Model]:
    """Model id -> Model, from metrics/eval/<kind>/<name>.json and eval_raw/<kind>/<name>/, in report order."""
    paths = {path.relative_to(eval_dir).with_suffix("").as_posix(): path for path in eval_dir.rglob("*.json")}
    strays = sorted(model_id for model_id in paths if "/" not in model_id or model_order(model_id)[0] < 0)
    if strays:
        raise InputError(
            f"{eval_dir} holds metrics outside the kind folders ({', '.join(MODEL_KINDS)}): {strays}; "
            "remove them (left over from an older layout?)"
        )
    models = {}
    for model_id in sorted(paths, key=model_order):
        hint = f"rerun the eval stage of {model_id}"
        items = read_json(raw_dir / model_id / "items.json", hint)
        lineage = read_json(raw_dir / model_id / "lineage.json", hint)
        models[model_id] = Model(model_id, json.loads(paths[model_id].read_text()), items, lineage)
    return models


def score(model: Model, metric: str) -> Score | None:
    if metric not in model.metrics:
        return None
    if not model.items.get(metric):
        return Score(model.metrics[metric])
    _, low, high = proportion(model.items[metric])
    return Score(model.metrics[metric], low, high)


def skill_names(models: dict[str, Model]) -> list[str]:
    metrics = {metric for model in models.values() for metric in model.metrics}
    return sorted(m.split("/")[0] for m in metrics if m.endswith("/exact_match") and m != POOLED)


def metric_names(models: dict[str, Model]) -> list[str]:
    return sorted({metric for model in models.values() for metric in model.metrics})


def leaderboard_columns(models: dict[str, Model]) -> list[str]:
    """The leaderboard's columns: each skill's exact match, all skills pooled, stories, perplexity."""
    wanted = [f"{skill}/exact_match" for skill in skill_names(models)]
    wanted += [POOLED, "stories/acc", "perplexity/word_perplexity"]
    return [metric for metric in wanted if metric in metric_names(models)]


def best_values(models: dict[str, Model], metrics: list[str]) -> dict[str, float]:
    """metric -> best value, for the metrics more than one model has (lowest for LOWER_IS_BETTER)."""
    best = {}
    for metric in metrics:
        values = [model.metrics[metric] for model in models.values() if metric in model.metrics]
        if len(values) > 1:
            best[metric] = min(values) if metric.endswith(LOWER_IS_BETTER) else max(values)
    return best


def table_cells(models: dict[str, Model], metrics: list[str]) -> dict[str, list[tuple[Score | None, bool]]]:
    """model id -> (score, whether it equals the column's best value: ties are all best) per metric."""
    best = best_values(models, metrics)
    return {
        model_id: [(score(model, m), m in best and model.metrics.get(m) == best[m]) for m in metrics]
        for model_id, model in models.items()
    }


def best_of(models: dict[str, Model], kind: str) -> str | None:
    """The model of `kind` with the highest pooled skill exact match; ties go to the first name."""
    scored = [model for model in models.values() if model.kind == kind and model.items.get(POOLED)]
    if not scored:
        return None
    return min(scored, key=lambda model: (-Score.of(model.items[POOLED]).value, model.name)).id


def untrained_parent(model: Model, models: dict[str, Model]) -> str | None:
    """The `moe/...` model a trained MoE started from, as its lineage names it (when evaluated)."""
    parents = [parent for parent in model.lineage.get("parents", []) if parent.partition("/")[0] == "moe"]
    return next((parent for parent in parents if parent in models and models[parent].items.get(POOLED)), None)


def scored_parent(model: Model, models: dict[str, Model]) -> str | None:
    """The first model of the lineage's parents that was evaluated on the skills."""
    return next((p for p in model.lineage.get("parents", []) if p in models and models[p].items.get(POOLED)), None)


def same_data_expert(model: Model, models: dict[str, Model]) -> str | None:
    """The SFT expert trained on the same dataset as `model` (an adapter or QAT run), when evaluated."""
    dataset = model.lineage.get("settings", {}).get("dataset")
    experts = [m for m in models.values() if m.kind == "expert" and m.items.get(POOLED)]
    return next((m.id for m in experts if dataset and m.lineage.get("settings", {}).get("dataset") == dataset), None)


# The optional runs after SFT, each against what it should be judged by.
AFTER_SFT_QUESTIONS = {
    "dpo": ("vs_start", "DPO model vs the model it started from", scored_parent),
    "quantized": ("vs_start", "Quantized model vs the model it quantizes", scored_parent),
    "adapter": ("vs_expert", "Adapter-trained model vs the full fine-tune on the same data", same_data_expert),
    "qat": ("vs_expert", "QAT expert vs the expert trained without it on the same data", same_data_expert),
}


def research_pairs(models: dict[str, Model]) -> list[Pair]:
    """The comparisons that answer the research question, each when both sides were evaluated."""
    trained = [model for model in models.values() if model.kind == "moe_trained" and model.items.get(POOLED)]
    dense, merge, expert = best_of(models, "dense"), best_of(models, "merge"), best_of(models, "expert")
    pairs = []
    if dense:
        question = "Trained MoE vs the best dense model trained on the same mixture"
        pairs += [Pair(f"vs_dense/{model.name}", question, model.id, dense, True) for model in trained]
    if merge and expert:
        pairs.append(Pair("merge_vs_expert", "Best merge vs best expert", merge, expert, False))
    for model in trained:
        parent = untrained_parent(model, models)
        if parent:
            question = "Trained MoE vs the untrained MoE it started from"
            pairs.append(Pair(f"vs_untrained/{model.name}", question, model.id, parent, True))
    for model in models.values():
        if model.kind in AFTER_SFT_QUESTIONS and model.items.get(POOLED):
            key, question, other = AFTER_SFT_QUESTIONS[model.kind]
            if b := other(model, models):
                pairs.append(Pair(f"{key}/{model.id}", question, model.id, b, False))
    return pairs + search_pairs(models)


def search_pairs(models: dict[str, Model]) -> list[Pair]:
    """Each searched merge against every hand-written recipe (the best of them in the headline) and
    the best expert. The search chose its merge on the validation split; these are held-out items."""
    merges = [model for model in models.values() if model.kind == "merge" and model.items.get(POOLED)]
    best_merge, expert = best_of(models, "merge"), best_of(models, "expert")
    pairs = []
    for model in (m for m in models.values() if m.kind == "search" and m.items.get(POOLED)):
        question = "Searched merge (chosen on validation) vs a hand-written recipe"
        for merge in merges:
            best = merge.id == best_merge
            key = f"search_vs_best_merge/{model.name}" if best else f"search_vs_merge/{model.name}/{merge.name}"
            pairs.append(Pair(key, question, model.id, merge.id, best))
        if expert:
            question = "Searched merge vs the best expert"
            pairs.append(Pair(f"search_vs_expert/{model.name}", question, model.id, expert, False))
    return pairs


def paired_tests(models: dict[str, Model], pairs: list[Pair]) -> list[PairedTest]:
    """McNemar's exact test on the pooled skill items of each pair, Holm-adjusted over all pairs."""
    outcomes = {}
    for pair in pairs:
        a, b = models[pair.a].items[POOLED], models[pair.b].items[POOLED]
        if len(a) != len(b):
            raise InputError(
                f"{pair.a} and {pair.b} were scored on different skill items ({len(a)} vs {len(b)}): "
                "evaluate every model with the same eval settings"
            )
        outcomes[pair.key] = (a, b)
    p_values = {key: mcnemar_exact(a, b) for key, (a, b) in outcomes.items()}
    adjusted = holm(p_values)
    tests = []
    for pair in pairs:
        a, b = outcomes[pair.key]
        only_a, only_b = discordant_counts(a, b)
        tests.append(
            PairedTest(
                pair, Score.of(a), Score.of(b), only_a, only_b, len(a), p_values[pair.key], adjusted[pair.key], (a, b)
            )  # fmt: skip
        )
    return tests


# --- Replicated runs: the experiment trained again with other seeds (metrics/replicas/<seed>/) ---
MAIN_RUN = "main"  # the label of the run made by the settings' own seeds


@dataclass(frozen=True)
class PooledTest:
    """One comparison of the research question, pooled over the runs of every seed."""

    pair: Pair  # as the main run poses it
    seeds: tuple[str, ...]  # run labels, the main run first
    sides: tuple[tuple[str, str], ...]  # (A, B) in each run: "the best merge" may be another merge per seed
    differences: tuple[float, ...]  # A's score minus B's in each run
    score_a: Score  # over seeds and items, with the crossed bootstrap's interval
    score_b: Score
    difference: Score
    p: float  # the item sign-flip test pooled over seeds
    p_adjusted: float

    @property
    def significant(self) -> bool:
        return self.p_adjusted < ALPHA

    @property
    def holds(self) -> int:
        """In how many runs A and B are ordered as in the pooled difference."""
        direction = np.sign(self.difference.value)
        return sum(1 for difference in self.differences if direction and np.sign(difference) == direction)


def load_seeds(models: dict[str, Model], replicas_dir: Path, replicas: list[int]) -> dict[str, dict[str, Model]]:
    """Run label -> its models: the main run, then the run of each seed of `replicas` (seeds.replicas),
    from <replicas_dir>/<seed>/eval and eval_raw, laid out as the main run's. Folders of seeds no
    longer listed are left alone (the check stage removes them from the workspace)."""
    seeds = {MAIN_RUN: models}
    for seed in replicas:
        folder = replicas_dir / str(seed)
        if not (folder / "eval").is_dir():
            raise InputError(f"{folder / 'eval'} is missing: seeds.replicas lists {seed}; run its stages (dvc repro)")
        seeds[str(seed)] = load_models(folder / "eval", folder / "eval_raw")
    return seeds


def seed_outcomes(seeds: dict[str, dict[str, Model]], ids: list[str]) -> np.ndarray:
    """(runs x items) pooled skill outcomes of model ids[k] in run k."""
    rows = [seeds[label][model_id].items[POOLED] for label, model_id in zip(seeds, ids, strict=True)]
    if len({len(row) for row in rows}) > 1:
        raise InputError(
            f"the runs of {', '.join(sorted(set(ids)))} were scored on different numbers of skill items: "
            "evaluate every seed with the same eval settings"
        )
    return np.array(rows)


def pooled_tests(seeds: dict[str, dict[str, Model]]) -> list[PooledTest]:
    """The main run's research pairs that every run has, each pooled over the runs, Holm-adjusted."""
    pairs = {label: {pair.key: pair for pair in research_pairs(models)} for label, models in seeds.items()}
    shared = [pair for key, pair in pairs[MAIN_RUN].items() if all(key in run_pairs for run_pairs in pairs.values())]
    sides, outcomes = {}, {}
    for pair in shared:
        sides[pair.key] = tuple((pairs[label][pair.key].a, pairs[label][pair.key].b) for label in seeds)
        a_ids, b_ids = zip(*sides[pair.key], strict=True)
        outcomes[pair.key] = (seed_outcomes(seeds, list(a_ids)), seed_outcomes(seeds, list(b_ids)))
    p_values = {key: paired_sign_flip(a, b) for key, (a, b) in outcomes.items()}
    adjusted = holm(p_values)
    tests = []
    for pair in shared:
        a, b = outcomes[pair.key]
        tests.append(
            PooledTest(
                pair, tuple(seeds), sides[pair.key], tuple(a.mean(axis=1) - b.mean(axis=1)),
                Score(*crossed_bootstrap(a)), Score(*crossed_bootstrap(b)), Score(*crossed_bootstrap(a - b)),
                p_values[pair.key], adjusted[pair.key],
            )
        )  # fmt: skip
    return tests


def side_text(ids: tuple[str, ...]) -> str:
    """`merge/slerp`, or the main run's model and a note when a seed picked another."""
    if len(set(ids)) == 1:
        return f"`{ids[0]}`"
    return f"`{ids[0]}` (in the main run; the best of its kind in each seed)"


def pooled_finding(test: PooledTest) -> str:
    a_ids, b_ids = zip(*test.sides, strict=True)
    a, b, runs, d = side_text(a_ids), side_text(b_ids), len(test.seeds), test.difference
    interval = f"{d.value:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
    if not test.significant:
        sentence = (
            f"no significant difference between {a} and {b} pooled over {runs} seeds ({interval}; adjusted "
            f"p = {format_p(test.p_adjusted)}; the pooled ordering holds in {test.holds} of {runs})"
        )
    else:
        winner, loser = (a, b) if d.value > 0 else (b, a)
        sentence = (
            f"{winner} scores higher than {loser} in {test.holds} of {runs} seeds (pooled difference "
            f"{interval}; sign-flip p = {format_p(test.p_adjusted)}, Holm-adjusted)"
        )
    return f"{test.pair.question}: {sentence}."


POOLED_COLUMNS = ["A", "B", "difference in each run", "pooled difference [95% CI]", "ordering holds",
                  "p", "Holm-adjusted p", "verdict"]  # fmt: skip


def pooled_row(test: PooledTest) -> list[str]:
    d = test.difference
    return [
        f"`{test.pair.a}`",
        f"`{test.pair.b}`",
        ", ".join(f"{difference:+.3f}" for difference in test.differences),
        f"{d.value:+.3f} [{d.low:+.2f}, {d.high:+.2f}]",
        f"{test.holds} of {len(test.seeds)}",
        format_p(test.p),
        format_p(test.p_adjusted),
        verdict(test) + (", not in every seed" if test.significant and test.holds < len(test.seeds) else ""),
    ]


def seed_rows(seeds: dict[str, dict[str, Model]]) -> list[list[str]]:
    """Each model trained in every run: its pooled skill score in each run, and over all of them."""
    rows = []
    for model_id, model in seeds[MAIN_RUN].items():
        if not all(model_id in models and models[model_id].items.get(POOLED) for models in seeds.values()):
            continue  # not replicated (the base model is shared), or not scored on the skills
        outcomes = seed_outcomes(seeds, [model_id] * len(seeds))
        rows.append([model.kind, model.name, *(f"{row.mean():.3f}" for row in outcomes),
                     Score(*crossed_bootstrap(outcomes)).text()])  # fmt: skip
    return rows


def seeds_intro(seeds: dict[str, dict[str, Model]], tests: list[PooledTest]) -> str:
    return (
        f"The experiment after pretraining ran {len(seeds)} times, with the training seeds of the settings "
        f"(`{MAIN_RUN}`) and with seeds {', '.join(label for label in seeds if label != MAIN_RUN)} (`seeds.replicas`); "
        "the pretrained base model is shared. Each pooled score is the mean over the runs and their items; its 95% "
        "interval comes from a bootstrap that draws runs and, shared by the drawn runs, items (a crossed "
        "bootstrap), so it covers the training seed as well as the sampling of questions. Each p-value is the "
        "exact item sign-flip test pooled over the runs (McNemar's test for one run), Holm-adjusted over the "
        f"{len(tests)} comparisons, significant below {ALPHA}."
    )


def seeds_markdown(seeds: dict[str, dict[str, Model]], tests: list[PooledTest], scores: list[list[str]]) -> str:
    if len(seeds) < 2:
        return ""
    findings = "\n".join(f"- {pooled_finding(test)}" for test in tests) or f"- {NO_PAIRS}"
    pairs = markdown_table(POOLED_COLUMNS, [pooled_row(test) for test in tests], left=2)
    table = markdown_table(["kind", "model", *seeds, "pooled [95% CI]"], scores, left=2)
    return (
        f"## Across seeds\n\n{seeds_intro(seeds, tests)}\n\n{findings}\n\n{pairs}\n\n"
        f"Pooled skill exact match of every model trained in each run:\n\n{table}"
    )


def html_table(header: list[str], rows: list[list[str]], table_id: str) -> str:
    heads = "".join(f"<th>{html.escape(column)}</th>" for column in header)
    body = "".join("<tr>" + "".join(f"<td>{html_pair_cell(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return (
        f"<div class='scroll'><table id='{table_id}'><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def html_seeds(seeds: dict[str, dict[str, Model]], tests: list[PooledTest], scores: list[list[str]]) -> str:
    if len(seeds) < 2:
        return ""
    findings = "".join(f"<li>{inline_code(pooled_finding(test))}</li>" for test in tests) or f"<li>{NO_PAIRS}</li>"
    return (
        f"<h2>Across seeds</h2><p>{inline_code(seeds_intro(seeds, tests))}</p><ul id='seed-findings'>{findings}</ul>"
        f"{html_table(POOLED_COLUMNS, [pooled_row(test) for test in tests], 'seed-pairs')}"
        "<p>Pooled skill exact match of every model trained in each run:</p>"
        f"{html_table(['kind', 'model', *seeds, 'pooled [95% CI]'], scores, 'seed-scores')}"
    )


def seeds_headline(seeds: dict[str, dict[str, Model]], tests: list[PooledTest]) -> dict[str, float]:
    """The pooled figures, under `seeds/`: for `dvc exp show` across replicated experiments."""
    if len(seeds) < 2:
        return {}
    numbers: dict[str, float] = {"seeds/runs": len(seeds)}
    for kind in MODEL_KINDS:
        best = [best_of(models, kind) for models in seeds.values()]
        if all(best):
            share, low, high = crossed_bootstrap(seed_outcomes(seeds, best))
            numbers.update({f"seeds/{kind}/best_em": share, f"seeds/{kind}/best_em_low": low,
                            f"seeds/{kind}/best_em_high": high})  # fmt: skip
    for test in tests:
        if test.pair.in_headline:
            numbers[f"seeds/{test.pair.key}/diff"] = test.difference.value
            numbers[f"seeds/{test.pair.key}/p_adj"] = test.p_adjusted
            numbers[f"seeds/{test.pair.key}/holds"] = test.holds
    return numbers


def format_p(p: float) -> str:
    """0.62, 0.038, or 1.2e-6 below 0.001."""
    if p >= 0.001:
        return f"{p:.2g}"
    mantissa, exponent = f"{p:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def verdict(test: PairedTest | PooledTest) -> str:
    if not test.significant:
        return "no significant difference"
    return "A higher" if test.score_a.value > test.score_b.value else "B higher"


def finding(test: PairedTest) -> str:
    """One sentence (Markdown) that says what the numbers of one paired test say."""
    a, b, sa, sb = test.pair.a, test.pair.b, test.score_a, test.score_b
    if not test.significant:
        sentence = (
            f"No significant difference between `{a}` and `{b}` "
            f"({sa.value:.2f} vs {sb.value:.2f}; adjusted p = {format_p(test.p_adjusted)})"
        )
    else:
        (winner, high), (loser, low) = sorted([(a, sa), (b, sb)], key=lambda side: -side[1].value)
        sentence = (
            f"`{winner}` scores higher than `{loser}` on the skills ({high.text(2)} vs {low.text(2)}; "
            f"McNemar p = {format_p(test.p_adjusted)}, Holm-adjusted)"
        )
    return f"{test.pair.question}: {sentence}."


def tests_description(tests: list[PairedTest]) -> str:
    sizes = sorted({test.items for test in tests})
    items = f"{sizes[0]} paired skill items" if len(sizes) == 1 else "paired skill items"
    return (
        f"McNemar's exact test on the {items} (every skill's exact-match items, the same items for both "
        f"models); p-values Holm-adjusted over the {len(tests)} comparisons, significant below {ALPHA}."
    )


def pair_row(test: PairedTest) -> list[str]:
    """A, B, score A, score B, difference, discordant counts, p, adjusted p, verdict (Markdown)."""
    return [
        f"`{test.pair.a}`",
        f"`{test.pair.b}`",
        test.score_a.text(),
        test.score_b.text(),
        f"{test.score_a.value - test.score_b.value:+.3f}",
        f"{test.only_a} / {test.only_b}",
        format_p(test.p),
        format_p(test.p_adjusted),
        verdict(test),
    ]


def headline(models: dict[str, Model], tests: list[PairedTest]) -> dict[str, float]:
    """The few numbers `dvc exp show` should show: best pooled exact match per kind, the MoE's gains."""
    numbers = {}
    for kind in MODEL_KINDS:
        best = best_of(models, kind)
        if best:
            share, low, high = proportion(models[best].items[POOLED])
            numbers.update({f"{kind}/best_em": share, f"{kind}/best_em_low": low, f"{kind}/best_em_high": high})
    for test in tests:
        if test.pair.in_headline:
            numbers[f"{test.pair.key}/diff"] = test.score_a.value - test.score_b.value
            numbers[f"{test.pair.key}/p_adj"] = test.p_adjusted
    return rounded(numbers)


def rounded(numbers: dict[str, float]) -> dict[str, float]:
    """p-values to two significant digits (1.6e-15, not 0.0); scores and differences to 4 decimals."""
    return {key: float(f"{value:.2g}") if key.endswith("/p_adj") else round(value, 4)
            for key, value in sorted(numbers.items())}  # fmt: skip


def intro(models: dict[str, Model]) -> str:
    kinds = [kind for kind in MODEL_KINDS if any(model.kind == kind for model in models.values())]
    return (
        f"{len(models)} models of {len(kinds)} kinds ({', '.join(kinds)}) evaluated with lm-evaluation-harness "
        "on held-out skill questions, story endings and text. Every share of items answered right is shown "
        "with its 95% Wilson confidence interval in brackets (perplexity has none: it is not a share); the "
        "findings come from paired tests on the same items, and follow the numbers below."
    )


def selection_text(selection: dict[str, Any] | None) -> str:
    """One sentence on which merges the select stage chose, with their scores."""
    if not selection:
        return ""
    scores = selection["scores"]
    chosen = ", ".join(f"{name} ({scores[name]:.4g})" for name in selection["selected"])
    missing = f"; {selection['missing']} fewer than top_k qualified" if selection.get("missing") else ""
    return f"Merges selected for the mixture of experts by `{selection['metric']}`: {chosen}{missing}."


def markdown_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A Markdown table; the first `left` columns align left, the rest right."""
    align = ["---"] * left + ["---:"] * (len(header) - left)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_scores(models: dict[str, Model], metrics: list[str]) -> str:
    """Models as rows (kind, name), metrics as columns; in each column the cells holding its best
    value are bold (see best_values: none when one model alone has the metric)."""
    rows = []
    for model_id, cells in table_cells(models, metrics).items():
        texts = ["" if s is None else (f"**{s.text()}**" if best else s.text()) for s, best in cells]
        rows.append([models[model_id].kind, models[model_id].name, *texts])
    return markdown_table(["kind", "model", *metrics], rows, left=2)


def leaderboard_markdown(
    models: dict[str, Model],
    tests: list[PairedTest],
    selection: dict | None,
    runs: dict[str, Any] | None = None,
    seeds: dict[str, dict[str, Model]] | None = None,
    pooled: list[PooledTest] | None = None,
    seed_scores: list[list[str]] | None = None,
    searches: dict[str, dict[str, Any]] | None = None,
    search_verdicts: dict[str, str] | None = None,
) -> str:
    findings = "\n".join(f"- {finding(test)}" for test in tests) or f"- {NO_PAIRS}"
    pairs = markdown_table(PAIR_COLUMNS, [pair_row(test) for test in tests], left=2)
    sections = [
        f"# Experiment report\n\n{intro(models)}",
        f"## Findings\n\n{findings}",
        seeds_markdown(seeds or {}, pooled or [], seed_scores or []),
        "## Leaderboard\n\nModels by kind; the best of each column in **bold** (lowest for perplexity, highest "
        f"otherwise).\n\n{markdown_scores(models, leaderboard_columns(models))}",
        selection_text(selection),
        f"## Paired tests\n\n{tests_description(tests)}\n\n{pairs}" if tests else "",
        searches_markdown(searches or {}, search_verdicts or {}),
        runs_markdown(runs or {}),
        f"## Every task/metric\n\n{markdown_scores(models, metric_names(models))}",
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


# metrics/runs/<section>/<run>.json: the optional runs' own measurements, a table per section.
RUN_SECTIONS = run_sections()
RUNS_INTRO = (
    "What the optional runs measured themselves (their models' eval scores are in the leaderboard, and each is "
    "compared with its start or its full fine-tune in the paired tests)."
)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"q4_0": {"size": 1}} -> {"q4_0/size": 1}."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def load_runs(runs_dir: Path | None) -> dict[str, dict[str, dict[str, Any]]]:
    """Section -> run name -> its flattened metrics, for the sections with runs."""
    runs = {}
    for section in RUN_SECTIONS:
        folder = runs_dir / section if runs_dir else None
        files = sorted(folder.glob("*.json")) if folder and folder.is_dir() else []
        if files:
            runs[section] = {path.stem: flatten(read_json(path, f"the {section} stage")) for path in files}
    return runs


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def run_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per metric, one column per run (runs are few, metrics many)."""
    keys = sorted({key for metrics in results.values() for key in metrics})
    return [[key, *(format_value(metrics.get(key)) for metrics in results.values())] for key in keys]


def runs_markdown(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    if not runs:
        return ""
    tables = [
        f"### {RUN_SECTIONS[section]}\n\n{markdown_table(['metric', *results], run_rows(results))}"
        for section, results in runs.items()
    ]
    return "\n\n".join(["## After SFT", RUNS_INTRO, *tables])


def html_runs(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    if not runs:
        return ""
    tables = []
    for section, results in runs.items():
        heads = "".join(f"<th>{html.escape(name)}</th>" for name in results)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in run_rows(results)
        )
        tables.append(
            f"<h3>{html.escape(RUN_SECTIONS[section])}</h3><div class='scroll'><table id='runs-{section}'>"
            f"<thead><tr><th>metric</th>{heads}</tr></thead><tbody>{body}</tbody></table></div>"
        )
    return f"<h2>After SFT</h2><p>{html.escape(RUNS_INTRO)}</p>{''.join(tables)}"


# --- Merge searches (merge_search.runs): metrics/runs/merge_search/<name>.json and <name>/trials.csv ---
SEARCHES = "merge_search"


def search_verdict(name: str, tests: list[PairedTest]) -> str:
    """What the held-out items say of search `name` against the hand-written recipes (Markdown)."""
    against = [test for test in tests if test.pair.a == f"search/{name}" and test.pair.b.startswith("merge/")]
    if not against:
        return f"`search/{name}` has no evaluated hand-written recipe to compare with."
    above = sum(test.significant and test.score_a.value > test.score_b.value for test in against)
    below = sum(test.significant and test.score_a.value < test.score_b.value for test in against)
    best = next(test for test in against if test.pair.in_headline)
    a, b = np.array([best.pair_outcomes[0]]), np.array([best.pair_outcomes[1]])
    difference = Score(*crossed_bootstrap(a - b))
    beat = best.significant and difference.value > 0
    return (
        f"On the held-out skill items, `search/{name}` scores {best.score_a.text(2)}: significantly above {above} and "
        f"below {below} of the {len(against)} hand-written recipes (McNemar, Holm-adjusted). Against the best of "
        f"them, `{best.pair.b}` ({best.score_b.text(2)}), the difference is {difference.value:+.3f} "
        f"[{difference.low:+.3f}, {difference.high:+.3f}] (95% bootstrap over the items; adjusted p = "
        f"{format_p(best.p_adjusted)}): the search {'beat' if beat else 'did not beat'} the hand-written recipes."
    )


def search_intro(results: dict[str, dict[str, Any]]) -> str:
    return (
        f"{len(results)} search{'es' if len(results) > 1 else ''} for a merge recipe (Optuna, mergekit): each trial "
        "merges the experts with the parameters the sampler proposes and is scored on the validation split "
        "(questions that are never eval items); the best trial's merge is evaluated on the held-out items like every "
        "model. The table gives each search's trials, best trial, validation scores and recipe; the plot, the "
        "search curve."
    )


def searches_markdown(results: dict[str, dict[str, Any]], verdicts: dict[str, str]) -> str:
    if not results:
        return ""
    verdicts = "\n".join(f"- {verdicts[name]}" for name in results)
    table = markdown_table(["setting", *results], run_rows(results))
    return f"## Merge search\n\n{search_intro(results)}\n\n{verdicts}\n\n{table}"


def html_searches(results: dict[str, dict[str, Any]], verdicts: dict[str, str]) -> str:
    if not results:
        return ""
    verdicts = "".join(f"<li>{inline_code(verdicts[name])}</li>" for name in results)
    rows = [[html.escape(cell) for cell in row] for row in run_rows(results)]
    table = html_table(["setting", *map(html.escape, results)], rows, "merge-search")
    intro = f"<p>{html.escape(search_intro(results))}</p>"
    return f"<h2>Merge search</h2>{intro}<ul id='search-verdicts'>{verdicts}</ul>{table}"


def read_trials(path: Path) -> tuple[list[int], list[float], list[float]]:
    """Trial numbers, their validation scores and the best so far, from a search's trials.csv."""
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    return [int(r["trial"]) for r in rows], [float(r["exact_match"]) for r in rows], [float(r["best"]) for r in rows]


def plot_searches(runs_dir: Path, names: list[str], path: Path) -> None:
    """Each search's validation score per trial (dots) and the best so far (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name in names:
        trials, scores, best = read_trials(runs_dir / SEARCHES / name / "trials.csv")
        (line,) = axes.step(trials, best, where="post", label=f"{name}: best so far")
        axes.plot(trials, scores, "o", color=line.get_color(), alpha=0.4, markersize=4, label=f"{name}: each trial")
    axes.set_xlabel("trial")
    axes.set_ylabel("validation exact match (all skills)")
    axes.set_title("Merge search")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def lineage_sentence(lineage: dict[str, Any]) -> str:
    """Which stage made the model, from what (Markdown), as its lineage.json says."""
    if not lineage.get("stage"):
        return "No lineage recorded: its model folder has no lineage.json."
    parents = ", ".join(f"`{parent}`" for parent in lineage.get("parents", []))
    return f"Made by the `{lineage['stage']}` stage" + (f" from {parents}." if parents else ".")


def model_card(model: Model) -> str:
    rows = [[f"`{metric}`", score(model, metric).text()] for metric in sorted(model.metrics)]
    evaluation = (
        "Shares of items right with their 95% Wilson confidence interval.\n\n"
        f"{markdown_table(['task/metric', 'value [95% CI]'], rows)}\n"
    )
    return render_card(
        model.id,
        lineage_sentence(model.lineage),
        {
            "Evaluation (lm-evaluation-harness)": evaluation,
            "Settings of the stage that made it": json_block(model.lineage.get("settings", {})),
        },
    )


def plot_skill_matrix(models: dict[str, Model], path: Path) -> None:
    """Models (rows, grouped by kind, kinds labelled on the right) x skills; all skills pooled apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    skills, ids = skill_names(models), list(models)
    columns = ([f"{skill}/exact_match" for skill in skills], [POOLED])
    figure, panels = plt.subplots(
        1, 2, figsize=(3.5 + 1.2 * (len(skills) + 1), 1.6 + 0.4 * len(ids)), layout="constrained",
        gridspec_kw={"width_ratios": [max(1, len(skills)), 1]}, squeeze=False,
    )  # fmt: skip
    for axes, metrics, title in zip(panels[0], columns, ("per skill", "all skills, pooled"), strict=True):
        values = np.array([[models[i].metrics.get(m, np.nan) for m in metrics] for i in ids])
        axes.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axes.set_xticks(range(len(metrics)), [m.split("/")[0] for m in metrics])
        axes.set_title(title)
        annotate(axes, values)
        for boundary in kind_boundaries(models):
            axes.axhline(boundary - 0.5, color="white", linewidth=3)
    panels[0][0].set_yticks(range(len(ids)), [models[i].name for i in ids])
    kinds = [models[i].kind for i in ids]
    centers = {kind: np.mean([row for row, k in enumerate(kinds) if k == kind]) for kind in dict.fromkeys(kinds)}
    panels[0][1].set_yticks(list(centers.values()), list(centers), fontweight="bold")
    panels[0][1].yaxis.tick_right()
    figure.suptitle("Exact-answer accuracy on held-out questions (rows: models by kind)")
    save_figure(figure, path)


def annotate(axes: Any, values: Any) -> None:
    """Write each cell's value on a heatmap, dark on bright cells."""
    import numpy as np

    for (row, column), value in np.ndenumerate(values):
        if not np.isnan(value):
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.5 else "black")


def kind_boundaries(models: dict[str, Model]) -> list[int]:
    """Row indices where a new kind starts (after the first)."""
    kinds = [model.kind for model in models.values()]
    return [row for row in range(1, len(kinds)) if kinds[row] != kinds[row - 1]]


def read_curve(live_dir: Path, name: str) -> tuple[list[float], list[float]]:
    path = live_dir / "plots" / "metrics" / f"{name}.tsv"
    if not path.is_file():
        return [], []
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [float(r[0]) for r in rows], [float(r[-1]) for r in rows]


def expand_curves(curves: dict[str, Path]) -> dict[str, Path]:
    """A dvclive folder as is; a folder of dvclive folders (one per expert) as NAME/SUBFOLDER each."""
    expanded = {}
    for name, folder in curves.items():
        if (folder / "plots").is_dir():
            expanded[name] = folder
        else:
            for child in sorted(p for p in folder.glob("*") if (p / "plots").is_dir()):
                expanded[f"{name}/{child.name}"] = child
    return expanded


def plot_curves(curves: dict[str, Path], path: Path) -> None:
    """One panel per training run, at most 3 per row, each 5.5 inches wide."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, max(1, len(curves)))
    rows = max(1, -(-len(curves) // columns))
    figure, panels = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.8 * rows), squeeze=False)
    for axes in panels.flat[len(curves) :]:
        axes.axis("off")
    for axes, (name, live_dir) in zip(panels.flat, curves.items(), strict=False):
        for metric, style in (("train/loss", "-"), ("val/loss", "o-"), ("eval/loss", "o-")):
            steps, values = read_curve(live_dir, metric)
            if steps:
                axes.plot(steps, values, style, label=metric, markersize=3)
        axes.set_title(name)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss (nat/token, log scale)")
        axes.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")  # 2, 3, 4, not 2x10^0
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain)
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def plot_routing(routing: dict[str, dict[str, Any]], path: Path) -> None:
    """One row per MoE model: share of tokens per expert in each layer (left) and for each skill (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, panels = plt.subplots(len(routing), 2, figsize=(10, 3.4 * len(routing)), squeeze=False)
    for row, (model, data) in enumerate(routing.items()):
        skills = sorted(data["skills"])
        shares = np.array([data["skills"][skill] for skill in skills])  # (skills, layers, experts)
        for axes, (values, labels, title) in zip(panels[row], (
            (shares.mean(axis=0), [f"layer {i}" for i in range(shares.shape[1])], "per layer"),
            (shares.mean(axis=1), skills, "per skill"),
        ), strict=True):  # fmt: skip
            axes.imshow(values, vmin=0, vmax=1, cmap="magma", aspect="auto")
            axes.set_xticks(range(len(data["experts"])), data["experts"], rotation=30, ha="right")
            axes.set_yticks(range(len(labels)), labels)
            annotate(axes, values)
            axes.set_title(f"{model}: tokens routed, {title}")
    figure.tight_layout()
    save_figure(figure, path)


def plot_note(message: str, path: Path) -> None:
    """A small figure that says why a plot is not there (the report page leaves it out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(5, 0.8))
    figure.text(0.5, 0.5, message, ha="center", va="center")
    save_figure(figure, path)


def load_routing(folder: Path) -> dict[str, dict[str, Any]]:
    """MoE model (the JSON's path below `folder`, no suffix) -> its routing shares."""
    paths = sorted(folder.rglob("*.json"))
    return {path.relative_to(folder).with_suffix("").as_posix(): json.loads(path.read_text()) for path in paths}


def save_figure(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    # PNG metadata would carry the matplotlib version and nothing else: keep the bytes stable.
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)


CAPTIONS = {
    "skill_matrix": "Share of each skill's held-out questions that each model answers exactly (rows: models, "
    "grouped by kind, kinds named on the right; columns: skills, with all skills' items pooled in the separate "
    "column). Brighter is better; each cell gives the share.",
    "curves": "Training loss (line) and validation loss (dots) in nat/token against the optimizer step, one "
    "panel per training run (pretraining, each expert, each run on the mixture); log scale, lower is better.",
    "merge_search": "Each merge search's validation score (exact match over every skill's validation questions) "
    "per trial (dots) and the best score so far (line): the search curve. The held-out comparison is in the text.",
    "routing": "Share of each skill's question tokens that each MoE model's routers send to each expert, per "
    "layer (left) and per skill over all layers (right). Even rows mean no specialisation; a bright cell is "
    "an expert that those tokens prefer.",
}


def inline_code(text: str) -> str:
    """Markdown's `code` as HTML, the rest escaped: the findings and lineage are written once."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    # onload/onerror mark each image, so a test (or a reader) can tell it really rendered.
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" '
        "onload=\"this.dataset.rendered='yes'\" onerror=\"this.dataset.rendered='no'\">"
    )


def html_cell(cell: tuple[Score | None, bool]) -> str:
    score_, best = cell
    if score_ is None:
        return "<td></td>"
    text = f"{score_.value:.4g}" if score_.low is None else f"{score_.value:.3f}"
    interval = "" if score_.low is None else f" <span class='ci'>[{score_.low:.2f}, {score_.high:.2f}]</span>"
    return f"<td{' class=best' if best else ''}>{text}{interval}</td>"


def html_scores(models: dict[str, Model], metrics: list[str], table_id: str) -> str:
    """Models as rows under a header row per kind; `task<br>metric` column heads keep columns narrow."""
    heads = "".join(f"<th>{'<br>'.join(html.escape(part) for part in m.split('/', 1))}</th>" for m in metrics)
    body, kind = [], None
    for model_id, cells in table_cells(models, metrics).items():
        if models[model_id].kind != kind:
            kind = models[model_id].kind
            body.append(f"<tr class='kind'><th colspan='{len(metrics) + 1}'>{html.escape(kind)}</th></tr>")
        tds = "".join(html_cell(cell) for cell in cells)
        body.append(f"<tr data-model='{html.escape(model_id)}'><th>{html.escape(models[model_id].name)}</th>{tds}</tr>")
    return (
        f"<div class='scroll'><table id='{table_id}'><thead><tr><th>model</th>{heads}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def html_pair_cell(text: str) -> str:
    """A cell of the paired tests' Markdown row as HTML, its interval set in small grey type."""
    return re.sub(r" (\[.*\])", r" <span class='ci'>\1</span>", inline_code(text))


def html_pairs(tests: list[PairedTest]) -> str:
    if not tests:
        return ""
    return (
        f"<h2>Paired tests</h2><p>{inline_code(tests_description(tests))}</p>"
        f"{html_table(PAIR_COLUMNS, [pair_row(test) for test in tests], 'pairs')}"
    )


def html_models(models: dict[str, Model]) -> str:
    sections = []
    for model in models.values():
        settings = html.escape(json.dumps(model.lineage.get("settings", {}), indent=2, sort_keys=True))
        sections.append(
            f"<section class='model'><h3>{html.escape(model.id)}</h3><p>{inline_code(lineage_sentence(model.lineage))}"
            f"</p><details><summary>Settings</summary><pre>{settings}</pre></details></section>"
        )
    return "".join(sections)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 76rem; padding: 0 1rem;
       color: #222; line-height: 1.45; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.45rem; text-align: right; }
thead th { background: #f4f4f4; text-align: center; font-weight: 600; }
tbody th { text-align: left; font-weight: normal; font-family: monospace; }
tr.kind th { background: #e9edf7; font-family: system-ui, sans-serif; font-weight: 600; }
#pairs td { white-space: nowrap; } #pairs td:nth-child(-n+2), #pairs td:last-child { text-align: left; }
td.best { font-weight: bold; background: #e6f4e6; }
.ci { color: #666; font-size: 0.85em; font-weight: normal; white-space: nowrap; }
figure { margin: 1.5rem 0; } img { display: block; width: 100%; height: auto; }
figcaption { color: #444; margin-top: 0.4rem; }
pre { background: #f8f8f8; padding: 0.5rem; overflow-x: auto; }
"""


def html_report(
    models: dict[str, Model],
    tests: list[PairedTest],
    images: list[Path],
    selection: dict[str, Any] | None,
    runs: dict[str, Any] | None = None,
    seeds: dict[str, dict[str, Model]] | None = None,
    pooled: list[PooledTest] | None = None,
    seed_scores: list[list[str]] | None = None,
    searches: dict[str, dict[str, Any]] | None = None,
    search_verdicts: dict[str, str] | None = None,
) -> str:
    findings = "".join(f"<li>{inline_code(finding(test))}</li>" for test in tests) or f"<li>{NO_PAIRS}</li>"
    figures = "".join(
        f"<figure>{image_tag(p, CAPTIONS[p.stem])}<figcaption>{html.escape(CAPTIONS[p.stem])}</figcaption></figure>"
        for p in images
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Experiment report</title><style>{STYLE}</style></head><body>
<h1>Experiment report</h1>
<p id="intro">{html.escape(intro(models))}</p>
<h2>Findings</h2><ul id="findings">{findings}</ul>{html_seeds(seeds or {}, pooled or [], seed_scores or [])}
<h2>Leaderboard</h2>
<p>Models by kind; the best of each column in bold (lowest for perplexity, highest otherwise).</p>
{html_scores(models, leaderboard_columns(models), "leaderboard")}
<p id="selection">{inline_code(selection_text(selection))}</p>
<details><summary>Every task/metric</summary>{html_scores(models, metric_names(models), "all-metrics")}</details>
{html_pairs(tests)}
{html_searches(searches or {}, search_verdicts or {})}{html_runs(runs or {})}
<h2>Plots</h2>{figures}
<h2>Models</h2>{html_models(models)}
</body></html>
"""


def run(
    eval_dir: Path,
    raw_dir: Path,
    curves: dict[str, Path],
    out_dir: Path,
    headline_path: Path,
    selection_path: Path | None = None,
    routing_dir: Path | None = None,
    runs_dir: Path | None = None,
    replicas_dir: Path | None = None,
    replicas: list[int] | None = None,
) -> dict[str, float]:
    """Write the report and the headline metrics; return the headline."""
    models = load_models(eval_dir, raw_dir)
    if not models:
        raise InputError(f"no eval metrics in {eval_dir}: run the eval stages first")
    selection = json.loads(selection_path.read_text()) if selection_path else None
    tests = paired_tests(models, research_pairs(models))
    seeds = load_seeds(models, replicas_dir or Path("metrics/replicas"), replicas or [])
    pooled = pooled_tests(seeds) if len(seeds) > 1 else []
    seed_scores = seed_rows(seeds) if len(seeds) > 1 else []  # once: a bootstrap per model
    runs = load_runs(runs_dir)
    searches = runs.pop(SEARCHES, {})  # a section of its own, with its verdict and curve
    verdicts = {name: search_verdict(name, tests) for name in searches}  # once: a bootstrap each
    trained = {
        kind.runs_metrics: runs_dir / kind.runs_metrics for kind in KINDS if kind.trains and kind.runs_metrics in runs
    }
    curves = {**curves, **trained}  # the runs that train have curves too
    write_text(
        out_dir / "leaderboard.md",
        leaderboard_markdown(models, tests, selection, runs, seeds, pooled, seed_scores, searches, verdicts),
    )
    images = []
    # dvc.yaml declares every plot: one that does not apply (no `skills` task, no MoE) is a note saying why
    if skill_names(models):
        plot_skill_matrix(models, out_dir / "skill_matrix.png")
        images.append(out_dir / "skill_matrix.png")
    else:
        plot_note("No skill matrix: eval.tasks has no `skills` task.", out_dir / "skill_matrix.png")
    plot_curves(expand_curves(curves), out_dir / "curves.png")
    images.append(out_dir / "curves.png")
    routing = load_routing(routing_dir) if routing_dir else {}
    if routing:
        plot_routing(routing, out_dir / "routing.png")
        images.append(out_dir / "routing.png")
    else:
        plot_note("No routing shares: no MoE was trained.", out_dir / "routing.png")
    if searches:
        plot_searches(runs_dir, list(searches), out_dir / "merge_search.png")
        images.append(out_dir / "merge_search.png")
    else:
        plot_note("No merge search: merge_search.runs is empty.", out_dir / "merge_search.png")
    page = html_report(models, tests, images, selection, runs, seeds, pooled, seed_scores, searches, verdicts)
    write_text(out_dir / "index.html", page)
    # Model folders belong to the stages that made them, so the cards with eval results live here.
    for model in models.values():
        write_text(out_dir / "cards" / f"{model.id}.md", model_card(model))
    numbers = rounded({**headline(models, tests), **seeds_headline(seeds, pooled)})
    write_json(headline_path, numbers)
    log.info("report of %d models and %d paired tests (%d runs) in %s", len(models), len(tests), len(seeds), out_dir)
    return numbers


def parse_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep:
            raise InputError(f"{flag} takes NAME=PATH, got {pair!r}")
        result[name] = path
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval-metrics", type=Path, required=True, help="folder of <kind>/<name>.json eval metrics")
    parser.add_argument("--eval-raw", type=Path, required=True, help="folder of <kind>/<name>/{items,lineage}.json")
    parser.add_argument("--curves", nargs="+", default=[], help="NAME=DVCLIVE_FOLDER of each training stage")
    parser.add_argument("--selection", type=Path, help="the select stage's JSON (merges chosen for the MoE)")
    parser.add_argument("--routing", type=Path, help="folder of the MoE stages' routing JSONs")
    parser.add_argument("--runs", type=Path, help="folder of the optional runs' metrics (<section>/<run>.json)")
    parser.add_argument(
        "--replicas", type=Path, help="folder of <seed>/eval and <seed>/eval_raw: the runs of seeds.replicas"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--headline", type=Path, required=True, help="headline metrics JSON (a DVC metric)")
    args = parser.parse_args(argv)
    params = start("report")
    curves = {name: Path(path) for name, path in parse_pairs(args.curves, "--curves").items()}
    run(
        args.eval_metrics,
        args.eval_raw,
        curves,
        args.out,
        args.headline,
        args.selection,
        args.routing,
        args.runs,
        args.replicas,
        params.seeds.replicas,
    )


if __name__ == "__main__":
    main()
