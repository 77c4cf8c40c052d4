"""The params.yaml schema: the shipped file validates; every bad input names its key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel
from ruamel.yaml import YAML

from pipeline.params import (
    PROJECT_ROOT,
    DeclaredView,
    Params,
    ParamsError,
    check,
    declared_params,
    load_params,
)
from tests.project import params_error


def write_params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_shipped_params_are_valid_and_every_declared_key_exists():
    params = load_params()
    assert params.data.corpus.source == "synthetic"
    report = check()
    assert any(line.strip().startswith("tokenize:") for line in report)


def test_shipped_params_spell_out_every_setting_dvc_tracks():
    """DVC only sees keys written in params.yaml: a default changed in the schema would not rerun a stage."""
    raw = YAML(typ="safe").load((PROJECT_ROOT / "params.yaml").read_text())

    def missing(model, values, prefix=""):
        for name in type(model).model_fields:
            if name not in values:
                yield prefix + name
            elif isinstance(getattr(model, name), BaseModel):
                yield from missing(getattr(model, name), values[name], f"{prefix}{name}.")

    params = Params.model_validate(raw)
    allowed_defaults = {
        "data.corpus.path",
        "data.corpus.name",
        "data.corpus.config_name",
        "data.corpus.split",
        "data.corpus.text_field",
        "data.corpus.max_documents",
    }
    assert set(missing(params, raw)) <= allowed_defaults


def test_empty_file_gives_defaults(tmp_path):
    params = load_params(write_params(tmp_path, ""))
    assert params.tokenize.vocab_size == 2048


def test_unknown_key_names_path_and_valid_keys(tmp_path):
    message = params_error(tmp_path, "data:\n  world:\n    contries: 3\n")
    assert "data.world.contries: unknown key" in message
    assert "countries" in message and "corpus_megabytes" in message


def test_unknown_section(tmp_path):
    message = params_error(tmp_path, "pretrian:\n  steps: 3\n")
    assert "pretrian: unknown key" in message and "tokenize" in message


def test_wrong_type_and_range_are_both_reported(tmp_path):
    message = params_error(tmp_path, "tokenize:\n  vocab_size: many\ndata:\n  val_fraction: 0.7\n")
    assert "tokenize.vocab_size" in message and "'many'" in message
    assert "data.val_fraction" in message and "less than 0.5" in message
    assert "2 invalid setting(s)" in message


def test_invalid_choice_lists_valid_ones(tmp_path):
    message = params_error(tmp_path, "data:\n  corpus:\n    source: web\n")
    assert "data.corpus.source" in message and "'synthetic', 'local' or 'hub'" in message


def test_unknown_skill(tmp_path):
    message = params_error(tmp_path, "data:\n  skills:\n    names: [addition, poetry]\n")
    assert "data.skills.names.1" in message and "'counting'" in message


def test_duplicate_skill(tmp_path):
    assert "twice" in params_error(tmp_path, "data:\n  skills:\n    names: [addition, addition]\n")


@pytest.mark.parametrize(
    ("corpus", "expected"),
    [
        ("{source: local}", "`path` is required"),
        ("{source: local, path: nowhere/corpus.txt}", "does not exist"),
        ("{source: local, path: corpus.csv}", "valid: .txt, .jsonl, .json, .parquet"),
        ("{source: hub}", "`name`"),
    ],
)
def test_corpus_source_needs_its_fields(tmp_path, corpus, expected):
    message = params_error(tmp_path, f"data:\n  corpus: {corpus}\n")
    assert "data.corpus" in message and expected in message


def test_special_tokens_must_differ(tmp_path):
    message = params_error(tmp_path, "tokenize:\n  pad_token: '</s>'\n")
    assert "tokenize" in message and "distinct" in message


def test_not_yaml(tmp_path):
    assert "not valid YAML" in params_error(tmp_path, "data: [unclosed\n")


def test_declared_params_come_from_dvc_yaml():
    assert declared_params("tokenize") == ["tokenize"]
    assert declared_params("data") == ["data"]
    with pytest.raises(ParamsError, match="no stage named 'pretrainn'"):
        declared_params("pretrainn")


def test_view_allows_declared_keys_and_refuses_others():
    params = load_params()
    view = DeclaredView(params, "", frozenset({"tokenize", "data.world.countries"}), "demo")
    assert view.tokenize is params.tokenize  # fully declared: the real object
    assert view.data.world.countries == 24
    with pytest.raises(ParamsError, match=r"reads params key 'data.seed'.*add it under `params:`"):
        _ = view.data.seed
    with pytest.raises(ParamsError, match="'data.world.fact_share'"):
        _ = view.data.world.fact_share


def test_make_check_cli_reports_bad_key(tmp_path):
    """`python -m pipeline.params` (what `make check` runs) exits non-zero naming the key."""
    project = tmp_path / "project"
    for code in ("pipeline", "stages", "data/local"):
        shutil.copytree(PROJECT_ROOT / code, project / code, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "dvc.yaml", project / "dvc.yaml")
    shipped = (PROJECT_ROOT / "params.yaml").read_text()
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=project, check=True)

    def make_check(params_text: str) -> subprocess.CompletedProcess:
        (project / "params.yaml").write_text(params_text)
        return subprocess.run([sys.executable, "-m", "pipeline.params"], cwd=project, capture_output=True, text=True)

    result = make_check(shipped.replace("vocab_size: 2048", "vocab_size: -3"))
    assert result.returncode != 0
    assert "tokenize.vocab_size" in result.stderr and "greater than or equal to 300" in result.stderr

    result = make_check(shipped.replace("vocab_size: 2048", "vocab_size: 500"))
    assert result.returncode == 0, result.stderr
    assert "params.yaml is valid" in result.stdout
    assert "finetune@addition: compute, finetune.base_model" in result.stdout

    # dvc.yaml interpolates hub and finetune.experts from params.yaml: without them, say so plainly
    result = make_check("tokenize:\n  vocab_size: 500\n")
    assert result.returncode != 0 and "dvc.yaml cannot be resolved" in result.stderr
    assert "Could not find 'hub'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("pretrain", "expected"),
    [
        ("{seq_len: 512}", "seq_len 512 is longer than model.max_position_embeddings 256"),
        ("{batch_tokens: 5000}", "batch_tokens 5000 must be a multiple of micro_batch_size * seq_len = 4096"),
        ("{model: {hidden_size: 90}}", "hidden_size 90 must be divisible by num_heads 4"),
        ("{model: {num_kv_heads: 3}}", "num_heads 4 must be divisible by num_kv_heads 3"),
        ("{model: {architecture: mixtral, num_experts: 2, experts_per_token: 3}}", "experts_per_token 3 is more"),
        ("{warmup_steps: 400}", "warmup_steps 400 must be below max_steps 330"),
        ("{optimizer: sgd}", "'adamw' or 'lion'"),
        ("{schedule: linear}", "'cosine', 'one_cycle' or 'constant'"),
    ],
)
def test_pretrain_settings_are_checked_together(tmp_path, pretrain, expected):
    message = params_error(tmp_path, f"pretrain: {pretrain}\n")
    assert "pretrain" in message and expected in message


def test_expert_names_need_only_be_plain(tmp_path):
    """Model ids carry their kind (expert/moe is not moe/<variant>), so moe* and pretrain are expert names too."""
    names = ("moe", "pretrain", "addition", "sorting")  # the default merge recipes name addition and sorting
    text = "finetune:\n  experts:\n" + "".join(f"    {name}: {{dataset: data/sft/{name}.jsonl}}\n" for name in names)
    assert list(load_params(write_params(tmp_path, text)).finetune.experts) == list(names)
    message = params_error(tmp_path, "finetune:\n  experts:\n    Moe-1: {dataset: data/sft/addition.jsonl}\n")
    assert "expert name 'Moe-1': use lowercase letters, digits and _" in message


def test_a_file_a_setting_names_must_be_a_dependency_of_its_readers(tmp_path):
    """A local corpus outside every dependency of the data stage: DVC would never rerun the stage
    when it changes, so it is refused with the setting's name; under data/local/ it is fine."""
    from pipeline.params import LOCAL_INPUTS, undeclared_inputs

    outside = tmp_path / "corpus.txt"
    outside.write_text("Some text.\n")
    params = load_params(write_params(tmp_path, f"data:\n  corpus: {{source: local, path: {outside}}}\n"))
    deps = [PROJECT_ROOT / "stages/data.py", PROJECT_ROOT / LOCAL_INPUTS]
    (problem,) = undeclared_inputs("data", ["data"], deps, params, PROJECT_ROOT)
    assert "data.corpus.path" in problem and "stage 'data'" in problem and "data/local/" in problem
    # a stage that does not declare the setting does not read the file
    assert undeclared_inputs("tokenize", ["tokenize"], deps, params, PROJECT_ROOT) == []
    # a folder the stage depends on holds it: fine
    assert undeclared_inputs("data", ["data"], [*deps, tmp_path], params, PROJECT_ROOT) == []
