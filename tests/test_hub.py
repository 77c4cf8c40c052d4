"""Hub models and datasets enter through hub@<name> stages: fetched once per revision, then DVC deps.

Nothing here reaches the network: the snapshots sit in a Hugging Face cache built by the test,
read with HF_HUB_OFFLINE=1 (how an air-gapped machine with a filled cache runs the stage too).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from pipeline.planner import check
from pipeline.settings.base import ParamsError
from tests.project import commit_all, copy_project, dvc, set_params, stages_run

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


def fill_cache(cache: Path, repo_type: str, repo_id: str, files: dict[str, Path | str]) -> None:
    """The hub cache's layout: <type>s--<org>--<name>/snapshots/<commit>/..., refs/main -> commit."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copy2(content, snapshot / name)
        else:
            (snapshot / name).write_text(content)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def hub_project(tiny_pretrained, tmp_path_factory):
    """A project whose base model and one expert's dataset come from the (cached) hub."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hf-cache"
    model = tiny_pretrained[1] / "model"
    fill_cache(cache, "model", "tiny-org/tiny-llama", {p.name: p for p in model.iterdir() if p.is_file()})
    rows = "\n".join(json.dumps(row) for row in CHAT * 4) + "\n"
    fill_cache(cache, "dataset", "tiny-org/chat", {"data/train.jsonl": rows, "README.md": "# chat"})
    project = copy_project(root / "project")
    set_params(
        project,
        hub={
            "base": {"repo_id": "tiny-org/tiny-llama", "revision": COMMIT},
            "chat": {
                "repo_id": "tiny-org/chat",
                "repo_type": "dataset",
                "revision": "main",
                "allow_patterns": ["data/*.jsonl"],
            },  # fmt: skip
        },
        finetune__base_model="data/hub/base",
        finetune__experts={"chat": {"dataset": "data/hub/chat/data/train.jsonl"}},
        merge__recipes={"linear": {"method": "linear", "parameters": {"weight": 1.0}}},
        moe__experts_per_token=1,
        # the experts' replay text (finetune.replay_text) is still the data stage's corpus: keep it small
        data__world__corpus_megabytes=0.2,
        data__skills__train_examples=100,
        data__skills__eval_examples=20,
        data__story_eval_examples=20,
    )
    commit_all(project)
    return project, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}


def test_hub_stages_fetch_snapshots_as_dvc_outputs(hub_project, tiny_pretrained):
    project, env = hub_project
    result = dvc(project, "repro", "hub@base", "hub@chat", env=env)
    assert stages_run(result) == {"check", "hub@base", "hub@chat"}
    model = AutoModelForCausalLM.from_pretrained(project / "data/hub/base")
    assert model.num_parameters() == AutoModelForCausalLM.from_pretrained(tiny_pretrained[1] / "model").num_parameters()
    assert sorted(p.name for p in (project / "data/hub/chat").rglob("*") if p.is_file()) == ["train.jsonl"]
    fetched = json.loads((project / "metrics/hub/chat.json").read_text())
    assert fetched["commit"] == COMMIT and fetched["files"] == 1  # the branch resolved to its commit
    again = dvc(project, "repro", "hub@base", "hub@chat", env=env)
    assert not stages_run(again)  # once per revision


def test_stages_reading_hub_snapshots_depend_on_them(hub_project):
    project, env = hub_project
    graph = dvc(project, "dag", "--dot", "finetune@chat", env=env).stdout
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)"', graph))
    assert {("hub@base", "finetune@chat"), ("hub@chat", "finetune@chat"), ("data", "finetune@chat")} <= edges
    assert not any(source == "pretrain" for source, _ in edges)  # the hub model replaced it
    # a dry run fails on a dependency no stage has made yet (DVC hashes it for its run cache):
    # make the replay text first
    dvc(project, "repro", "data", env=env)
    planned = stages_run(dvc(project, "repro", "--dry", "finetune@chat", env=env))
    assert "finetune@chat" in planned and not planned & {"hub@base", "hub@chat", "pretrain"}


def test_a_bare_hub_id_fails_the_check_with_the_way_in(hub_project):
    project, _ = hub_project
    set_params(project, finetune__base_model="tiny-org/tiny-llama")
    try:
        with pytest.raises(
            ParamsError, match=r"finetune.base_model is 'tiny-org/tiny-llama', which does not exist.*`hub` entry"
        ):
            check(project)
        set_params(project, finetune__base_model="data/hub/phi3")
        with pytest.raises(ParamsError, match=r"finetune.base_model is 'data/hub/phi3'.*none named 'phi3'"):
            check(project)
    finally:
        set_params(project, finetune__base_model="data/hub/base")
