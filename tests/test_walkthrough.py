"""docs/design/contributing.md's new-stage walkthrough, followed literally on a copy of the project.

Each annotated code block of the document is applied as it says (a new file, text appended, text
inserted after a line), then the new `prune` stage runs through DVC on a tiny pretrained model and
the copy's own tests/test_graph.py checks its declarations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.settings.base import PROJECT_ROOT
from tests.project import (
    EDITS,
    TINY_PRETRAINING,
    apply_edit,
    code_blocks,
    commit_all,
    copy_project,
    dvc,
    set_params,
    sh,
    stages_run,
)

pytestmark = pytest.mark.slow  # data, tokenize, pretrain, prune and eval through DVC: about a minute

DOC = PROJECT_ROOT / "docs" / "design" / "contributing.md"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project with the walkthrough applied, one prune run, and data and model shrunk
    (as tests/test_dvc_pipeline.py does) for what the prune run needs: data, tokenize, pretrain."""
    root = copy_project(tmp_path_factory.mktemp("walkthrough") / "project")
    (root / "dvc.lock").unlink()  # the committed lock belongs to the default settings
    blocks = [
        (attributes, code) for _, _, attributes, code in code_blocks(DOC.read_text()) if attributes.keys() & EDITS
    ]
    assert {"stages/prune.py", "pipeline/settings/prune.py"} <= {a.get("file") for a, _ in blocks}
    for attributes, code in blocks:
        apply_edit(root, attributes, code)
    set_params(
        root,
        prune__runs={"small": {"model": "models/pretrain", "sparsity": 0.5}},
        **TINY_PRETRAINING,
    )
    commit_all(root)  # profiles apply over the committed params.yaml: the graph tests see prune@small
    return root


def test_make_check_passes(project):
    sh(project, sys.executable, "-m", "stages.check")


def test_the_pruned_model_is_made_and_evaluated(project):
    result = dvc(project, "repro", "prune@small", "eval_pruned@small")
    assert {"prune@small", "eval_pruned@small"} <= stages_run(result)
    weights = load_file(project / "models/pruned/small/model.safetensors")
    linear = {name: w for name, w in weights.items() if name.startswith("model.layers.") and w.dim() == 2}
    assert len(linear) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name, weight in linear.items():
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), name
    assert (weights["model.embed_tokens.weight"] == 0).float().mean().item() < 0.01
    assert (project / "metrics/eval/pruned/small.json").is_file()
    lineage = json.loads((project / "metrics/eval_raw/pruned/small/lineage.json").read_text())
    assert (lineage["kind"], lineage["parents"]) == ("pruned", ["base/pretrain"])
    assert json.loads((project / "metrics/runs/prune/small.json").read_text())["sparsity/linear"] == 0.5


def test_the_copys_graph_tests_pass(project):
    """The copy's own tests/test_graph.py, run in the copy: its PROJECT_ROOT is the copy's. The prune
    run of params.yaml is in every profile alike: the sensitivity test reads two of them."""
    result = sh(project, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_graph.py",
                "-k", "not gpu-small and not phi3-moe", check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    # what the derivation reads: the copy, with the walkthrough's READERS entries
    probe = "from tests.test_graph import PROJECT_ROOT, READERS; print(PROJECT_ROOT, 'prune.runs.{}' in READERS)"
    assert sh(project, sys.executable, "-c", probe).stdout.split() == [str(project.resolve()), "True"]


def test_make_clean_covers_the_new_outputs(project):
    listed = sh(project, sys.executable, "-m", "tools.dvc_outputs", "--dry-run").stdout
    assert "models/pruned" in listed and "metrics/runs/prune" in listed


def test_the_walkthroughs_code_passes_the_linter(project):
    """ruff leaves docs/ alone (its blocks include fragments): the files they make must pass it here."""
    ruff = Path(sys.executable).with_name("ruff")
    files = ["stages/prune.py", "pipeline/settings/prune.py", "pipeline/settings/params_file.py", "pipeline/kinds.py"]
    for command in (["check"], ["format", "--check"]):
        result = sh(project, str(ruff), *command, *files, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
