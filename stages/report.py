"""`report` stage: every model's eval metrics and lineage in one place people want to read.

    python -m stages.report --eval-metrics metrics/eval --curves pretrain=metrics/pretrain \
        --lock dvc.lock --out metrics/report

Inputs: metrics/eval/<model>.json (eval stage), dvclive folders of the training stages, and
dvc.lock for lineage (which stage made each model, from what, with which settings).
Outputs in --out:
- leaderboard.md: model x task/metric, the best of each column in bold;
- skill_matrix.png: models x skills heatmap of exact-answer accuracy;
- curves.png: training and validation loss of every training stage;
- index.html: all of the above in one self-contained page (images inlined, no CDN, no script
  from outside), with each model's settings and parents;
- cards/<model>.md: a model card with the model's eval results and lineage.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import re
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.atomic import atomic_path, write_text
from pipeline.stage import start

log = logging.getLogger("stages.report")

LOWER_IS_BETTER = ("word_perplexity", "bits_per_byte", "byte_perplexity", "loss")


GROUPS = ("base", "experts", "merges", "MoE", "trained MoE")


def model_group(name: str) -> str:
    if name == "pretrain":
        return "base"
    if name.startswith("merge/"):
        return "merges"
    if name == "moe":
        return "MoE"
    return "trained MoE" if name.startswith("moe_") else "experts"


def model_order(name: str) -> tuple[int, str]:
    """Columns read base first, then experts, merges, the MoE and the trained MoEs."""
    return GROUPS.index(model_group(name)), name


def comparison_rows(table: dict[str, dict[str, float]], metric: str = "all_skills/exact_match") -> list[list[str]]:
    """[group, its best model, its score] per group: does the MoE beat what it was built from?"""
    rows = []
    for group in GROUPS:
        scored = {name: row[metric] for name, row in table.items() if model_group(name) == group and metric in row}
        if scored:
            best = max(scored, key=lambda name: (scored[name], name))
            rows.append([group, best, f"{scored[best]:.4g}"])
    return rows


def comparison_markdown(table: dict[str, dict[str, float]], metric: str = "all_skills/exact_match") -> str:
    rows = comparison_rows(table, metric)
    if not rows:
        return ""
    lines = [f"## Best of each kind by `{metric}`", "", "| kind | best model | score |", "| --- | --- | ---: |"]
    lines += [f"| {group} | {model} | {score} |" for group, model, score in rows]
    return "\n".join(lines) + "\n"


def load_eval_metrics(folder: Path) -> dict[str, dict[str, float]]:
    """Model name (the file's path below `folder`, e.g. pretrain or merge/ties) -> its metrics."""
    names = {path.relative_to(folder).with_suffix("").as_posix(): path for path in folder.rglob("*.json")}
    return {name: json.loads(names[name].read_text()) for name in sorted(names, key=model_order)}


def selection_text(selection: dict[str, Any] | None) -> str:
    """One sentence on which merges the select stage chose, with their scores."""
    if not selection:
        return ""
    scores = selection["scores"]
    chosen = ", ".join(f"{name} ({scores[name]:.4g})" for name in selection["selected"])
    missing = f"; {selection['missing']} fewer than top_k qualified" if selection.get("missing") else ""
    return f"Merges selected for the mixture of experts by `{selection['metric']}`: {chosen}{missing}."


def metric_names(table: dict[str, dict[str, float]]) -> list[str]:
    return sorted({metric for row in table.values() for metric in row})


def best_per_metric(table: dict[str, dict[str, float]]) -> dict[str, float]:
    best = {}
    for metric in metric_names(table):
        values = [row[metric] for row in table.values() if metric in row]
        best[metric] = min(values) if metric.endswith(LOWER_IS_BETTER) else max(values)
    return best


def leaderboard_rows(table: dict[str, dict[str, float]]) -> list[tuple[str, list[tuple[str, bool]]]]:
    """(metric, [(cell text, is best)] per model): one row per task/metric, one column per model."""
    best = best_per_metric(table)
    rows = []
    for metric in metric_names(table):
        cells = []
        for row in table.values():
            value = row.get(metric)
            text = "" if value is None else f"{value:.4g}"
            cells.append((text, value is not None and value == best[metric] and len(table) > 1))
        rows.append((metric, cells))
    return rows


def leaderboard_markdown(table: dict[str, dict[str, float]], selection: dict[str, Any] | None = None) -> str:
    lines = [
        "# Leaderboard",
        "",
        "Each task/metric (rows) for each model (columns); the best of each row is in **bold**",
        "(lowest for perplexity and bits per byte, highest otherwise).",
        "",
        "| task/metric | " + " | ".join(table) + " |",
        "| --- |" + " ---: |" * len(table),
    ]
    for metric, cells in leaderboard_rows(table):
        lines.append(f"| {metric} | " + " | ".join(f"**{t}**" if best else t for t, best in cells) + " |")
    if selection:
        lines += ["", selection_text(selection)]
    comparison = comparison_markdown(table)
    return "\n".join(lines) + "\n" + (f"\n{comparison}" if comparison else "")


def skill_names(table: dict[str, dict[str, float]]) -> list[str]:
    return sorted({column.split("/")[0] for row in table.values() for column in row if column.endswith("/exact_match")})


def plot_skill_matrix(table: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    skills, models = skill_names(table), list(table)
    values = np.array([[table[m].get(f"{s}/exact_match", np.nan) for s in skills] for m in models])
    figure, axes = plt.subplots(figsize=(1.6 + 1.3 * max(1, len(skills)), 1.2 + 0.5 * len(models)))
    image = axes.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(skills)), skills)
    axes.set_yticks(range(len(models)), models)
    for i in range(len(models)):
        for j in range(len(skills)):
            if not np.isnan(values[i, j]):
                axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                          color="white" if values[i, j] < 0.5 else "black")  # fmt: skip
    axes.set_title("Exact-answer accuracy per skill")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    save_figure(figure, path)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, max(1, len(curves)), figsize=(5.5 * max(1, len(curves)), 3.6), squeeze=False)
    for axes, (name, live_dir) in zip(panels[0], curves.items(), strict=False):
        for metric, style in (("train/loss", "-"), ("val/loss", "o-"), ("eval/loss", "o-")):
            steps, values = read_curve(live_dir, metric)
            if steps:
                axes.plot(steps, values, style, label=metric, markersize=3)
        axes.set_title(f"{name}: loss")
        axes.set_xlabel("step")
        axes.set_ylabel("nat/token")
        axes.set_yscale("log")
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def plot_routing(routing: dict[str, dict[str, Any]], path: Path) -> None:
    """Per MoE model: share of tokens per expert in each layer (top) and for each skill (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, panels = plt.subplots(2, len(routing), figsize=(4.2 * len(routing), 6.4), squeeze=False)
    for column, (model, data) in enumerate(routing.items()):
        skills = sorted(data["skills"])
        shares = np.array([data["skills"][skill] for skill in skills])  # (skills, layers, experts)
        for row, (values, labels, title) in enumerate(
            ((shares.mean(axis=0), [f"layer {i}" for i in range(shares.shape[1])], "per layer"),
             (shares.mean(axis=1), skills, "per skill"))
        ):  # fmt: skip
            axes = panels[row][column]
            axes.imshow(values, vmin=0, vmax=1, cmap="magma", aspect="auto")
            axes.set_xticks(range(len(data["experts"])), data["experts"], rotation=30, ha="right")
            axes.set_yticks(range(len(labels)), labels)
            for i in range(values.shape[0]):
                for j in range(values.shape[1]):
                    axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                              color="white" if values[i, j] < 0.5 else "black")  # fmt: skip
            axes.set_title(f"{model}: tokens routed, {title}")
    figure.tight_layout()
    save_figure(figure, path)


def save_figure(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    # PNG metadata would carry the matplotlib version and nothing else: keep the bytes stable.
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)


def lock_stages(lock_path: Path) -> dict[str, dict[str, Any]]:
    """Stage name -> its entry in dvc.lock (what actually ran); empty before the first run."""
    if not lock_path.is_file():
        return {}
    return (YAML(typ="safe").load(lock_path.read_text()) or {}).get("stages") or {}


def lineage(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Output path -> {stage, command, parents, params} of the stage that made it."""
    produced: dict[str, dict[str, Any]] = {}
    for stage, entry in stages.items():
        info = {
            "stage": stage,
            "command": entry.get("cmd", ""),
            "parents": [dep["path"] for dep in entry.get("deps", []) if not dep["path"].endswith(".py")],
            "params": entry.get("params", {}).get("params.yaml", {}),
        }
        for out in entry.get("outs", []):
            produced[out["path"]] = info
    return produced


def model_card(name: str, path: str, metrics: dict[str, float], info: dict[str, Any]) -> str:
    rows = "\n".join(f"| `{metric}` | {value:.4g} |" for metric, value in sorted(metrics.items()))
    parents = ", ".join(f"`{parent}`" for parent in info.get("parents", [])) or "(unknown)"
    settings = json.dumps(info.get("params", {}), indent=2, sort_keys=True)
    return f"""# {name}

Model folder `{path}`, made by the `{info.get("stage", "?")}` stage from {parents}.

## Evaluation (lm-evaluation-harness)

| task/metric | value |
| --- | --- |
{rows}

## Settings of the stage that made it

```json
{settings}
```
"""


def image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    # onload/onerror mark each image, so a test (or a reader) can tell it really rendered.
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" '
        "onload=\"this.dataset.rendered='yes'\" onerror=\"this.dataset.rendered='no'\">"
    )


def html_report(
    table: dict[str, dict[str, float]],
    models: dict[str, str],
    lineages: dict[str, dict[str, Any]],
    images: list[Path],
    selection: dict[str, Any] | None = None,
) -> str:
    head = "".join(f"<th>{html.escape(model)}</th>" for model in table)
    body = []
    for metric, cells in leaderboard_rows(table):
        tds = "".join(f"<td class='best'>{text}</td>" if best else f"<td>{text}</td>" for text, best in cells)
        body.append(f"<tr><th>{html.escape(metric)}</th>{tds}</tr>")
    cards = []
    for model, path in models.items():
        info = lineages.get(path, {})
        params = html.escape(json.dumps(info.get("params", {}), indent=2, sort_keys=True))
        parents = ", ".join(f"<code>{html.escape(p)}</code>" for p in info.get("parents", [])) or "(unknown)"
        stage = html.escape(info.get("stage", "?"))
        cards.append(
            f"<section class='model'><h3>{html.escape(model)}</h3>"
            f"<p>Folder <code>{html.escape(path)}</code>, made by stage <code>{stage}</code> "
            f"from {parents}.</p><details><summary>Settings</summary><pre>{params}</pre></details></section>"
        )
    figures = "".join(
        f"<figure>{image_tag(p, p.stem)}<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in images
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Experiment report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.5rem; text-align: right; }}
tbody th {{ text-align: left; font-weight: normal; font-family: monospace; }}
th {{ background: #f4f4f4; }} td.best {{ font-weight: bold; background: #e6f4e6; }}
figure {{ display: inline-block; margin: 1rem; }} img {{ max-width: 100%; }}
pre {{ background: #f8f8f8; padding: 0.5rem; overflow-x: auto; }}
</style></head><body>
<h1>Experiment report</h1>
<h2>Leaderboard</h2>
<p>Best of each row in bold (lowest for perplexity and bits per byte, highest otherwise).</p>
<table id="leaderboard"><thead><tr><th>task/metric</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
<p id="selection">{html.escape(selection_text(selection))}</p>
{comparison_html(table)}
<h2>Plots</h2>{figures}
<h2>Models</h2>{"".join(cards)}
</body></html>
"""


def comparison_html(table: dict[str, dict[str, float]], metric: str = "all_skills/exact_match") -> str:
    rows = comparison_rows(table, metric)
    if not rows:
        return ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return (
        f"<h2>Best of each kind by <code>{html.escape(metric)}</code></h2><table id='comparison'>"
        f"<thead><tr><th>kind</th><th>best model</th><th>score</th></tr></thead><tbody>{body}</tbody></table>"
    )


def evaluated_models(stages: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Model name -> folder, read from the eval stages (`stages.eval --name N --model M`)."""
    models = {}
    for entry in stages.values():
        command = " ".join(str(entry.get("cmd", "")).split())
        name, model = re.search(r"--name\s+(\S+)", command), re.search(r"--model\s+(\S+)", command)
        if "stages.eval" in command and name and model:
            models[name.group(1)] = model.group(1)
    return models


def run(
    eval_dir: Path,
    curves: dict[str, Path],
    lock_path: Path,
    out_dir: Path,
    selection_path: Path | None = None,
    routing_dir: Path | None = None,
) -> dict:
    table = load_eval_metrics(eval_dir)
    if not table:
        raise SystemExit(f"error: no eval metrics in {eval_dir}: run the eval stage first")
    selection = json.loads(selection_path.read_text()) if selection_path else None
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "leaderboard.md", leaderboard_markdown(table, selection))
    images = []
    if skill_names(table):
        plot_skill_matrix(table, out_dir / "skill_matrix.png")
        images.append(out_dir / "skill_matrix.png")
    plot_curves(expand_curves(curves), out_dir / "curves.png")
    images.append(out_dir / "curves.png")
    routing = {p.stem: json.loads(p.read_text()) for p in sorted(routing_dir.glob("*.json"))} if routing_dir else {}
    if routing:
        plot_routing(routing, out_dir / "routing.png")
        images.append(out_dir / "routing.png")
    stages = lock_stages(lock_path)
    models = {name: path for name, path in evaluated_models(stages).items() if name in table}
    lineages = lineage(stages)
    write_text(out_dir / "index.html", html_report(table, models, lineages, images, selection))
    # Model folders belong to the stages that made them, so the cards with eval results live here.
    for name, path in models.items():
        write_text(out_dir / "cards" / f"{name}.md", model_card(name, path, table[name], lineages.get(path, {})))
    log.info("report of %d models in %s", len(table), out_dir)
    return table


def parse_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: {flag} takes NAME=PATH, got {pair!r}")
        result[name] = path
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval-metrics", type=Path, required=True, help="folder of <model>.json eval metrics")
    parser.add_argument("--curves", nargs="+", default=[], help="NAME=DVCLIVE_FOLDER of each training stage")
    parser.add_argument("--selection", type=Path, help="the select stage's JSON (merges chosen for the MoE)")
    parser.add_argument("--routing", type=Path, help="folder of the MoE stages' routing JSONs")
    parser.add_argument("--lock", type=Path, default=Path("dvc.lock"), help="dvc.lock, for lineage")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    start("report")
    curves = {name: Path(path) for name, path in parse_pairs(args.curves, "--curves").items()}
    run(args.eval_metrics, curves, args.lock, args.out, args.selection, args.routing)


if __name__ == "__main__":
    main()
