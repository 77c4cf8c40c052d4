"""What a model is, written where it is made: `lineage.json` and a `README.md` model card in
every model folder.

    {"kind": "moe_trained", "name": "experts", "stage": "moe_finetune@experts",
     "parents": ["moe/experts"], "settings": {...}}

The kind is one of pipeline/kinds.py's and `<kind>/<name>` is the model's id in the eval
metrics (metrics/eval/<kind>/<name>.json) and the report, which read this file instead of
guessing from names or commands. Parents are ids, or paths for models made outside the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.atomic import dumps_json

LINEAGE_FILE = "lineage.json"


def model_id(folder: str | Path) -> str:
    """The id a model folder declares, or its path when it declares none (a model from outside)."""
    path = Path(folder) / LINEAGE_FILE
    if not path.is_file():
        return str(folder)
    lineage = json.loads(path.read_text())
    return f"{lineage['kind']}/{lineage['name']}"


def write_lineage(folder: Path, kind: str, name: str, stage: str, parents: list[str], settings: Any) -> None:
    """Write lineage.json into a model folder being built (`settings`: any JSON-able value)."""
    lineage = {"kind": kind, "name": name, "stage": stage, "parents": parents, "settings": settings}
    (folder / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")


def render_card(title: str, intro: str, sections: dict[str, str]) -> str:
    """A model card (README.md in Markdown): a title, a paragraph on what made the model, then
    sections by heading. Every stage that makes a model or describes one writes it with this."""
    return f"# {title}\n\n{intro}\n" + "".join(f"\n## {heading}\n\n{body}" for heading, body in sections.items())


def json_block(value: Any) -> str:
    """A fenced JSON block of a card section (stable JSON: sorted keys)."""
    return f"```json\n{dumps_json(value)}```\n"
