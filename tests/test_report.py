"""The report stage: leaderboard, plots, lineage, and an HTML page a real browser renders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stages import report

TABLE = {
    "pretrain": {"addition/exact_match": 0.0, "stories/acc": 0.9, "perplexity/word_perplexity": 4.7},
    "expert_a": {"addition/exact_match": 0.95, "stories/acc": 0.85, "perplexity/word_perplexity": 5.1},
    "merge/ties": {"addition/exact_match": 0.5, "stories/acc": 0.8, "perplexity/word_perplexity": 6.0},
    "moe_full": {"addition/exact_match": 0.9, "all_skills/exact_match": 0.9},
}
ROUTING = {
    "experts": ["ties", "linear"],
    "skills": {"addition": [[0.7, 0.3], [0.6, 0.4]], "sorting": [[0.2, 0.8], [0.5, 0.5]]},
}
SELECTION = {"metric": "addition/exact_match", "selected": ["ties"], "missing": 1, "scores": {"ties": 0.5}}
LOCK = """schema: '2.0'
stages:
  pretrain:
    cmd: python -m stages.pretrain --tokens data/tokens --model models/pretrain
    deps:
    - path: stages/pretrain.py
    - path: data/tokens
    params:
      params.yaml:
        pretrain:
          learning_rate: 0.003
    outs:
    - path: models/pretrain
  eval@pretrain:
    cmd: python -m stages.eval --name pretrain --model models/pretrain --raw x
    deps:
    - path: models/pretrain
    outs:
    - path: metrics/eval_raw/pretrain
"""


@pytest.fixture()
def built(tmp_path, tiny_pretrained) -> Path:
    """A report over TABLE, with the tiny pretraining run's curves and a small dvc.lock."""
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    for model, metrics in TABLE.items():
        (eval_dir / f"{model}.json").parent.mkdir(parents=True, exist_ok=True)
        (eval_dir / f"{model}.json").write_text(json.dumps(metrics))
    (tmp_path / "dvc.lock").write_text(LOCK)
    (tmp_path / "select.json").write_text(json.dumps(SELECTION))
    (tmp_path / "routing").mkdir()
    (tmp_path / "routing" / "moe_full.json").write_text(json.dumps(ROUTING))
    curves = {"pretrain": tiny_pretrained[1] / "live"}
    report.run(
        eval_dir, curves, tmp_path / "dvc.lock", tmp_path / "out", tmp_path / "select.json", tmp_path / "routing"
    )
    return tmp_path / "out"


def test_leaderboard_marks_the_best_of_each_row(built):
    text = (built / "leaderboard.md").read_text()
    assert "| task/metric | pretrain | expert_a | merge/ties | moe_full |" in text  # base, experts, merges, MoE
    assert "| addition/exact_match | 0 | **0.95** | 0.5 | 0.9 |" in text
    assert "| stories/acc | **0.9** | 0.85 | 0.8 |  |" in text
    assert "| perplexity/word_perplexity | **4.7** | 5.1 | 6 |  |" in text  # lower is better
    assert "| trained MoE | moe_full | 0.9 |" in text  # best of each kind (only it has all_skills here)
    assert "selected for the mixture of experts by `addition/exact_match`: ties (0.5); 1 fewer" in text


def test_plots_are_real_pngs(built):
    for name in ("skill_matrix.png", "curves.png", "routing.png"):
        data = (built / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_html_is_self_contained_with_lineage(built):
    page = (built / "index.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing loads from elsewhere
    assert page.count('src="data:image/png;base64,') == 3
    assert "<td>trained MoE</td><td>moe_full</td><td>0.9</td>" in page
    assert "made by stage <code>pretrain</code> from <code>data/tokens</code>" in page
    assert "&quot;learning_rate&quot;: 0.003" in page


def test_model_cards_carry_metrics_and_lineage(built):
    card = (built / "cards" / "pretrain.md").read_text()
    assert "made by the `pretrain` stage from `data/tokens`" in card
    assert "| `stories/acc` | 0.9 |" in card and '"learning_rate": 0.003' in card
    assert not (built / "cards" / "expert_a.md").exists()  # not in dvc.lock: no lineage to show


def test_lineage_reads_what_ran_from_dvc_lock(tmp_path):
    (tmp_path / "dvc.lock").write_text(LOCK)
    stages = report.lock_stages(tmp_path / "dvc.lock")
    info = report.lineage(stages)["models/pretrain"]
    assert info["stage"] == "pretrain" and info["parents"] == ["data/tokens"]
    assert report.evaluated_models(stages) == {"pretrain": "models/pretrain"}
    assert report.lock_stages(tmp_path / "missing.lock") == {}


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_a_real_browser(built, tmp_path):
    """Headless Chromium (Debian's package; .ci/run installs it) loads the page: table and images."""
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing on CI: .ci/run should have installed it")
        pytest.skip("Chromium is not installed (apt-get install chromium); CI installs it")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
    ]  # fmt: skip
    url = (built / "index.html").resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('data-rendered="yes"') == 3, "every image decoded and rendered"
    assert 'data-rendered="no"' not in dom
    leaderboard = re.search(r'<table id="leaderboard">.*?</table>', dom, re.S).group(0)
    rows = re.findall(r"<tr><th>([^<]+)</th>", leaderboard)
    metrics = ["addition/exact_match", "all_skills/exact_match", "perplexity/word_perplexity", "stories/acc"]
    assert rows == ["task/metric", *metrics]
    screenshot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1200,900", f"--screenshot={screenshot}", url],
                   capture_output=True, timeout=120)  # fmt: skip
    assert screenshot.stat().st_size > 20_000  # a page with pictures, not a blank one
