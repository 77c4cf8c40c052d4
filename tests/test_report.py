"""The report stage: intervals, paired tests, findings, headline, plots, and a page a real browser renders.

Every model is written by hand as the eval stage writes it: metrics/eval/<kind>/<name>.json and
eval_raw/<kind>/<name>/{items.json, lineage.json}. A model that scores k of a skill's 100 items
answers its first k, so two models' discordant items are known: for the same skill, the
difference of their counts, all in one direction.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pipeline.settings.base import InputError
from pipeline.stats import wilson_interval
from stages import report

SKILLS = ("addition", "comparison", "counting", "sorting")
# model id -> items right of 100 per skill, in SKILLS order
SCORES = {
    "base/pretrain": (0, 0, 0, 0),
    "expert/addition": (96, 0, 0, 0),
    "expert/sorting": (0, 0, 0, 60),
    "merge/ties": (50, 0, 0, 40),
    "moe/experts": (30, 30, 30, 30),
    "dense/mix": (60, 60, 60, 60),
    "dense/short": (50, 50, 50, 50),
    "moe_trained/full": (90, 90, 90, 90),
    "moe_trained/router": (60, 60, 60, 60),
}
LINEAGE = {
    "base/pretrain": {"stage": "pretrain", "parents": ["data/tokens"], "settings": {"learning_rate": 0.003}},
    "moe_trained/full": {"stage": "mixture_finetune@full", "parents": ["moe/experts"], "settings": {"mode": "full"}},
    "moe_trained/router": {"stage": "mixture_finetune@router", "parents": ["moe/experts"]},
}
ROUTING = {
    "experts": ["ties", "linear"],
    "skills": {"addition": [[0.7, 0.3], [0.6, 0.4]], "sorting": [[0.2, 0.8], [0.5, 0.5]]},
}
SELECTION = {"metric": "addition/exact_match", "selected": ["ties"], "missing": 1, "scores": {"ties": 0.5}}


def outcomes(right: int, items: int = 100) -> list[int]:
    return [1] * right + [0] * (items - right)


def write_model(root: Path, model_id: str, scores: tuple[int, ...]) -> None:
    """The eval stage's three files for one model, consistent with each other."""
    items = {f"{skill}/exact_match": outcomes(right) for skill, right in zip(SKILLS, scores, strict=True)}
    items["all_skills/exact_match"] = [x for skill in SKILLS for x in items[f"{skill}/exact_match"]]
    items["addition_choice/acc"] = outcomes(70)
    items["stories/acc"] = outcomes(38 if model_id == "base/pretrain" else 36, 40)
    metrics = {key: round(sum(values) / len(values), 4) for key, values in items.items()}
    metrics["perplexity/word_perplexity"] = 4.7 if model_id == "base/pretrain" else 9.0
    kind, _, name = model_id.partition("/")
    lineage = {"kind": kind, "name": name, "parents": [], **LINEAGE.get(model_id, {})}
    (root / "eval" / kind).mkdir(parents=True, exist_ok=True)
    (root / "eval" / f"{model_id}.json").write_text(json.dumps(metrics))
    (root / "eval_raw" / model_id).mkdir(parents=True, exist_ok=True)
    (root / "eval_raw" / model_id / "items.json").write_text(json.dumps(items))
    (root / "eval_raw" / model_id / "lineage.json").write_text(json.dumps(lineage))


def build(root: Path, curves: dict[str, Path] | None = None, **options: Path) -> dict[str, float]:
    return report.run(root / "eval", root / "eval_raw", curves or {}, root / "out", root / "headline.json", **options)


@pytest.fixture()
def project(tmp_path) -> Path:
    for model_id, scores in SCORES.items():
        write_model(tmp_path, model_id, scores)
    return tmp_path


@pytest.fixture()
def built(project, tiny_pretrained) -> Path:
    """The report of SCORES, with the tiny pretraining run's curves, a selection and routing shares."""
    (project / "select.json").write_text(json.dumps(SELECTION))
    (project / "routing").mkdir()
    (project / "routing" / "moe_full.json").write_text(json.dumps(ROUTING))
    curves = {"pretrain": tiny_pretrained[1] / "live"}
    build(project, curves, selection_path=project / "select.json", routing_dir=project / "routing")
    return project / "out"


def findings(out: Path) -> list[str]:
    text = (out / "leaderboard.md").read_text()
    return re.findall(r"^- (.*)$", text.split("## Findings")[1].split("##")[0], re.M)


def test_findings_say_what_the_paired_tests_found(built):
    assert findings(built) == [
        "Trained MoE vs the best dense model trained on the same mixture: `moe_trained/full` scores higher than "
        "`dense/mix` on the skills (0.90 [0.87, 0.93] vs 0.60 [0.55, 0.65]; McNemar p = 6e-36, Holm-adjusted).",
        "Trained MoE vs the best dense model trained on the same mixture: No significant difference between "
        "`moe_trained/router` and `dense/mix` (0.60 vs 0.60; adjusted p = 1).",
        "Best merge vs best expert: No significant difference between `merge/ties` and `expert/addition` "
        "(0.23 vs 0.24; adjusted p = 1).",
        "Trained MoE vs the untrained MoE it started from: `moe_trained/full` scores higher than `moe/experts` "
        "on the skills (0.90 [0.87, 0.93] vs 0.30 [0.26, 0.35]; McNemar p = 5.7e-72, Holm-adjusted).",
        "Trained MoE vs the untrained MoE it started from: `moe_trained/router` scores higher than `moe/experts` "
        "on the skills (0.60 [0.55, 0.65] vs 0.30 [0.26, 0.35]; McNemar p = 6e-36, Holm-adjusted).",
    ]
    text = (built / "leaderboard.md").read_text()
    assert text.index("## Findings") < text.index("## Leaderboard") < text.index("## Paired tests")


def test_paired_tests_table_names_the_test_and_its_counts(built):
    text = (built / "leaderboard.md").read_text()
    assert "McNemar's exact test on the 400 paired skill items" in text
    assert "p-values Holm-adjusted over the 5 comparisons" in text
    # full vs dense: 30 more items right per skill, none fewer; p = 2 * 2^-120
    assert (
        "| `moe_trained/full` | `dense/mix` | 0.900 [0.87, 0.93] | 0.600 [0.55, 0.65] | +0.300 | 120 / 0 "
        "| 1.5e-36 | 6e-36 | A higher |"
    ) in text
    # the expert is right on 46 addition items the merge misses, the merge on 40 sorting items: p = 0.59
    assert "| `merge/ties` | `expert/addition` | 0.225 [0.19, 0.27] | 0.240 [0.20, 0.28] | -0.015 | 40 / 46 " in text
    assert "| 0.59 | 1 | no significant difference |" in text


def test_findings_follow_the_items(project):
    """The same pair, three sets of items: the finding changes with the numbers, nothing is fixed."""
    pair = "`moe_trained/router`"
    for scores, expected in (
        ((60, 60, 60, 60), f"No significant difference between {pair} and `dense/mix` (0.60 vs 0.60;"),
        ((80, 80, 80, 80), f"{pair} scores higher than `dense/mix` on the skills (0.80 [0.76, 0.84] vs 0.60"),
        ((40, 40, 40, 40), f"`dense/mix` scores higher than {pair} on the skills (0.60 [0.55, 0.65] vs 0.40"),
    ):
        write_model(project, "moe_trained/router", scores)
        build(project)
        assert any(expected in line for line in findings(project / "out")), findings(project / "out")


def test_leaderboard_has_models_as_rows_with_intervals(built):
    text = (built / "leaderboard.md").read_text()
    leaderboard = text.split("## Leaderboard")[1].split("## Paired tests")[0]
    columns = [f"{s}/exact_match" for s in SKILLS] + ["all_skills/exact_match", "stories/acc"]
    assert "| kind | model | " + " | ".join(columns) + " | perplexity/word_perplexity |" in leaderboard
    rows = re.findall(r"^\| (\w+) \| (\w+) \|", leaderboard, re.M)[1:]
    assert ["/".join(row) for row in rows] == list(SCORES)  # base, experts, merges, MoE, dense, trained MoE
    # Wilson 95% intervals from the items (96 of 100, 0 of 100, ...); the best of each column in bold
    assert "| expert | addition | **0.960 [0.90, 0.98]** | 0.000 [0.00, 0.04] |" in leaderboard
    assert "| base | pretrain | 0.000 [0.00, 0.04] |" in leaderboard
    assert "**0.950 [0.83, 0.99]** | **4.7** |" in leaderboard  # stories; perplexity: lower is better
    assert "| moe_trained | full | 0.900 [0.83, 0.94] | **0.900 [0.83, 0.94]** |" in leaderboard
    assert "**0.900 [0.87, 0.93]** | 0.900 [0.77, 0.96] | 9 |" in leaderboard  # all skills: 360 of 400
    assert "| addition_choice/acc |" in text.split("## Every task/metric")[1]  # the full table below
    assert "Merges selected for the mixture of experts by `addition/exact_match`: ties (0.5); 1 fewer" in text


def test_headline_metrics_are_few_stable_numbers(built):
    path = built.parent / "headline.json"
    headline = json.loads(path.read_text())
    kinds = ("base", "expert", "merge", "moe", "dense", "moe_trained")
    pairs = ("vs_dense/full", "vs_dense/router", "vs_untrained/full", "vs_untrained/router")
    assert set(headline) == {f"{k}/best_em{end}" for k in kinds for end in ("", "_low", "_high")} | {
        f"{p}/{m}" for p in pairs for m in ("diff", "p_adj")
    }
    assert list(headline) == sorted(headline)  # stable order in the file
    low, high = wilson_interval(360, 400)
    best = [headline[f"moe_trained/best_em{end}"] for end in ("", "_low", "_high")]
    assert best == [0.9, round(low, 4), round(high, 4)]
    assert headline["dense/best_em"] == 0.6 and headline["expert/best_em"] == 0.24  # dense/mix, expert/addition
    assert headline["vs_dense/full/diff"] == 0.3 and 0 < headline["vs_dense/full/p_adj"] < 1e-4
    assert headline["vs_dense/full/p_adj"] == float(f"{headline['vs_dense/full/p_adj']:.2g}")  # not rounded to 0
    assert headline["vs_dense/router/diff"] == 0.0 and headline["vs_dense/router/p_adj"] == 1.0
    assert headline["vs_untrained/router/diff"] == 0.3


def test_without_the_compared_kinds_there_are_no_pairs(tmp_path):
    for model_id in ("base/pretrain", "expert/addition", "expert/sorting"):
        write_model(tmp_path, model_id, SCORES[model_id])
    headline = build(tmp_path)
    assert findings(tmp_path / "out") == [report.NO_PAIRS]
    assert "## Paired tests" not in (tmp_path / "out" / "leaderboard.md").read_text()
    assert set(headline) == {f"{k}/best_em{end}" for k in ("base", "expert") for end in ("", "_low", "_high")}


def test_inputs_outside_the_contract_are_named(project):
    (project / "eval" / "pretrain.json").write_text("{}")  # the old layout, no kind folder
    with pytest.raises(InputError, match=r"outside the kind folders .*\['pretrain'\]"):
        build(project)
    (project / "eval" / "pretrain.json").unlink()
    (project / "eval_raw" / "dense" / "mix" / "items.json").unlink()
    with pytest.raises(InputError, match=r"dense/mix/items.json is missing: rerun the eval stage of dense/mix"):
        build(project)
    write_model(project, "dense/mix", SCORES["dense/mix"])
    items = json.loads((project / "eval_raw" / "dense" / "mix" / "items.json").read_text())
    items["all_skills/exact_match"] = items["all_skills/exact_match"][:200]
    (project / "eval_raw" / "dense" / "mix" / "items.json").write_text(json.dumps(items))
    with pytest.raises(InputError, match=r"^moe_trained/full and dense/mix were scored on different skill items"):
        build(project)


def png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_plots_are_real_pngs(built):
    for name in ("skill_matrix.png", "curves.png", "routing.png"):
        data = (built / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_curves_are_a_grid_of_at_most_three_columns(project, tiny_pretrained):
    live = tiny_pretrained[1] / "live"
    build(project, {name: live for name in ("pretrain", "a", "b", "c")})
    width, height = png_size(project / "out" / "curves.png")
    assert (width, height) == (round(3 * 5.5 * 110), round(2 * 3.8 * 110))  # 3 panels of 5.5 in, 2 rows, at 110 dpi


def test_html_is_self_contained_with_findings_first_and_lineage(built):
    page = (built / "index.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing loads from elsewhere
    assert page.count('src="data:image/png;base64,') == 3
    assert page.index('id="findings"') < page.index("id='leaderboard'") < page.index("id='pairs'")
    assert "<code>moe_trained/full</code> scores higher than <code>dense/mix</code>" in page
    assert re.findall(r"<tr data-model='([^']+)'>", page.split("id='leaderboard'")[1].split("</table>")[0]) == list(
        SCORES
    )
    assert "<td class=best>0.960 <span class='ci'>[0.90, 0.98]</span></td>" in page
    assert re.search(r"<details><summary>Every task/metric</summary>.*id='all-metrics'", page)
    captions = re.findall(r"<figcaption>([^<]+)</figcaption>", page)
    assert len(captions) == 3 and all(len(c) > 80 and c.endswith(".") for c in captions)  # sentences, not names
    assert "Made by the <code>mixture_finetune@full</code> stage from <code>moe/experts</code>." in page
    assert "&quot;learning_rate&quot;: 0.003" in page


def test_model_cards_carry_metrics_and_lineage(built):
    card = (built / "cards" / "moe_trained" / "full.md").read_text()
    assert "Made by the `mixture_finetune@full` stage from `moe/experts`." in card
    assert "| `all_skills/exact_match` | 0.900 [0.87, 0.93] |" in card and '"mode": "full"' in card
    card = (built / "cards" / "base" / "pretrain.md").read_text()
    assert "| `perplexity/word_perplexity` | 4.7 |" in card and '"learning_rate": 0.003' in card
    cards = sorted(path.relative_to(built / "cards").as_posix() for path in (built / "cards").rglob("*.md"))
    assert cards == sorted(f"{model_id}.md" for model_id in SCORES)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_a_real_browser(built, tmp_path):
    """Headless Chromium (Debian's package; `make test` installs it where it may) loads the page: tables,
    images, no overflow."""
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing on CI: `make test` (its browser target) should have installed it")
        pytest.skip("Chromium is not installed (apt-get install chromium; `make test` installs it on CI)")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--window-size=1280,900",
    ]  # fmt: skip
    # A copy of the page that writes, once loaded, how wide its content is (the report has no script).
    measure = "<script>addEventListener('load', () => { document.body.dataset.scrollWidth = "
    measure += "document.documentElement.scrollWidth; document.body.dataset.viewport = innerWidth; });</script>"
    page = tmp_path / "measured.html"
    page.write_text((built / "index.html").read_text().replace("</body>", measure + "</body>"))
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = dom.stdout
    assert dom.count('data-rendered="yes"') == 3, "every image decoded and rendered"
    assert 'data-rendered="no"' not in dom
    leaderboard = re.search(r'<table id="leaderboard">.*?</table>', dom, re.S).group(0)
    assert re.findall(r'<tr data-model="([^"]+)">', leaderboard) == list(SCORES)  # models are the rows
    scroll_width = int(re.search(r'data-scroll-width="(\d+)"', dom).group(1))
    viewport = int(re.search(r'data-viewport="(\d+)"', dom).group(1))
    assert viewport == 1280 and scroll_width <= viewport, "the page fits a 1280 px wide window"
    screenshot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={screenshot}", (built / "index.html").resolve().as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    assert screenshot.stat().st_size > 20_000  # a page with pictures, not a blank one


def test_runs_after_sft_are_compared_with_their_start_and_tabled(project):
    """A DPO model is tested against the model it started from, an adapter-trained one against the expert
    on the same data, and each optional run's own measurements (metrics/runs/<section>) get a table."""
    LINEAGE["dpo/tuned"] = {"stage": "dpo@tuned", "parents": ["dense/mix"]}
    LINEAGE["adapter/loha"] = {"stage": "adapter@loha", "parents": ["base/pretrain"], "settings": {"dataset": "a"}}
    LINEAGE["expert/addition"] = {"stage": "finetune@addition", "parents": [], "settings": {"dataset": "a"}}
    try:
        write_model(project, "expert/addition", SCORES["expert/addition"])
        write_model(project, "dpo/tuned", (90, 60, 60, 60))
        write_model(project, "adapter/loha", (80, 0, 0, 0))
    finally:
        for model_id in ("dpo/tuned", "adapter/loha", "expert/addition"):
            LINEAGE.pop(model_id)
    runs = project / "runs"
    (runs / "dpo").mkdir(parents=True)
    (runs / "dpo" / "tuned.json").write_text(json.dumps({"preference": {"accuracy_start": 0.5, "accuracy": 0.9}}))
    (runs / "gguf").mkdir()
    (runs / "gguf" / "addition.json").write_text(json.dumps({"q4_0": {"agreement": 0.96}}))
    build(project, runs_dir=runs)
    text = (project / "out" / "leaderboard.md").read_text()
    assert "DPO model vs the model it started from: `dpo/tuned` scores higher than `dense/mix`" in text
    assert "Adapter-trained model vs the full fine-tune on the same data: `expert/addition` scores higher" in text
    assert "### Preference tuning (DPO)\n\n| metric | tuned |" in text
    assert "| preference/accuracy | 0.9 |" in text and "| q4_0/agreement | 0.96 |" in text
    page = (project / "out" / "index.html").read_text()
    assert "<table id='runs-gguf'>" in page and "<h2>After SFT</h2>" in page


def test_a_searched_merge_is_tested_against_every_recipe_and_the_best_expert(project):
    """The searched merge (chosen on validation) against each hand-written recipe (the best one in the
    headline) and the best expert on the held-out items; the search's section says whether it beat
    the recipes, tables its recipe and plots its validation curve."""
    write_model(project, "merge/linear", (10, 0, 0, 0))
    write_model(project, "search/tuned", (70, 0, 0, 40))  # ties' 90 items and 20 more
    runs = project / "runs" / "merge_search"
    (runs / "tuned").mkdir(parents=True)
    summary = {"trials": 3, "best_trial": 2, "recipe": {"method": "ties", "weight": {"addition": 0.7}}}
    (runs / "tuned.json").write_text(json.dumps(summary))
    (runs / "tuned" / "trials.csv").write_text("trial,exact_match,best\n0,0.1,0.1\n1,0.05,0.1\n2,0.3,0.3\n")
    headline = build(project, runs_dir=project / "runs")
    text = (project / "out" / "leaderboard.md").read_text()
    assert "`search/tuned` scores higher than `merge/linear`" in text and "than `merge/ties`" in text
    assert "Searched merge vs the best expert: No significant difference between `search/tuned` and" in text
    assert "significantly above 2 and below 0 of the 2 hand-written recipes" in text
    assert "Against the best of them, `merge/ties` (0.23 [0.19, 0.27]), the difference is +0.050" in text
    assert "the search beat the hand-written recipes" in text
    assert "| recipe/weight/addition | 0.7 |" in text and "After SFT" not in text
    assert headline["search_vs_best_merge/tuned/diff"] == 0.05 and headline["search/best_em"] == 0.275
    assert "search_vs_merge/tuned/linear/diff" not in headline
    assert png_size(project / "out" / "merge_search.png")[0] > 300
    assert "<ul id='search-verdicts'>" in (project / "out" / "index.html").read_text()


def test_without_runs_after_sft_the_report_has_no_such_section(built):
    assert "After SFT" not in (built / "leaderboard.md").read_text()


def test_replicated_seeds_are_pooled_with_their_spread(project):
    """Two more seeds (metrics/replicas/<seed>/, laid out like the main run): each comparison is pooled
    over the three runs, says in how many it holds, and the headline carries the pooled figures."""
    replicas = project / "replicas"
    for model_id, scores in SCORES.items():
        if model_id != "base/pretrain":  # the base model is shared, not trained again
            write_model(replicas / "1", model_id, scores)  # seed 1 answers as the main run
            write_model(replicas / "2", model_id, scores)
    write_model(replicas / "2", "moe_trained/full", (80, 80, 80, 80))  # seed 2: smaller gains
    write_model(replicas / "2", "dense/mix", (70, 70, 70, 70))
    write_model(replicas / "2", "moe_trained/router", (50, 50, 50, 50))
    write_model(replicas / "2", "merge/linear", (70, 0, 0, 60))  # another merge is the best one in seed 2
    headline = build(project, replicas_dir=replicas, replicas=[1, 2])
    text = (project / "out" / "leaderboard.md").read_text()
    seeds = text.split("## Across seeds")[1].split("\n## ")[0]
    assert "ran 3 times, with the training seeds of the settings (`main`) and with seeds 1, 2" in seeds
    # full vs dense: +0.3, +0.3, +0.1. Items 60-89 of each skill favour full in every run that differs
    # there and none favours dense, so the 120 item totals all point one way: p = 2 * 2^-120
    assert "`moe_trained/full` scores higher than `dense/mix` in 3 of 3 seeds (pooled difference +0.23 [" in seeds
    assert "| `moe_trained/full` | `dense/mix` | +0.300, +0.300, +0.100 | +0.233 [" in seeds
    assert "| 3 of 3 | 1.5e-36 | 6e-36 | A higher |" in seeds  # Holm: the second smallest of 5 p-values, x 4
    # router vs dense: 0, 0, -0.2: significant for the models at hand, but dense wins in one seed only
    assert "| `moe_trained/router` | `dense/mix` | +0.000, +0.000, -0.200 | -0.067 [" in seeds
    assert "| 1 of 3 | 1.7e-24 | 3.3e-24 | B higher, not in every seed |" in seeds
    assert "the best of its kind in each seed" in seeds  # the best merge is not the same merge in seed 2
    assert "| moe_trained | full | 0.900 | 0.900 | 0.800 | 0.867 [" in seeds
    assert "| base |" not in seeds and "| merge | linear |" not in seeds  # only models of every run
    assert headline["seeds/runs"] == 3 and headline["seeds/vs_dense/full/holds"] == 3
    assert headline["seeds/vs_dense/full/diff"] == 0.2333 and headline["seeds/vs_dense/full/p_adj"] == 6e-36
    assert headline["seeds/moe_trained/best_em"] == 0.8667  # (0.9 + 0.9 + 0.8) / 3
    assert headline["seeds/moe_trained/best_em_low"] < 0.8667 < headline["seeds/moe_trained/best_em_high"]
    assert "seeds/base/best_em" not in headline  # the base model is in the main run only
    page = (project / "out" / "index.html").read_text()
    assert "<h2>Across seeds</h2>" in page and "<table id='seed-pairs'>" in page
    assert build(project, replicas_dir=replicas, replicas=[2])["seeds/runs"] == 2  # only the seeds listed
    with pytest.raises(InputError, match=r"replicas/3/eval is missing: seeds.replicas lists 3; run its stages"):
        build(project, replicas_dir=replicas, replicas=[1, 3])
