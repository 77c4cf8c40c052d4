"""The params.yaml schema: the shipped file validates; every bad input names its key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel
from ruamel.yaml import YAML

from pipeline.planner import check, data_stage_files, existing_input_files, load_stages, path_problems, planned_outputs
from pipeline.settings.base import LOCAL_INPUTS, PROJECT_ROOT, SFT_DATASET_SUFFIXES, ParamsError
from pipeline.settings.data import DataSettings
from pipeline.settings.params_file import Params, load_params
from pipeline.settings.sft import SFTOverrides
from pipeline.settings.stage_view import DeclaredView, declared
from tests.project import copy_project, params_error, set_params, sh


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
            elif isinstance(getattr(model, name), BaseModel) and not isinstance(getattr(model, name), SFTOverrides):
                yield from missing(getattr(model, name), values[name], f"{prefix}{name}.")

    params = Params.model_validate(raw)
    allowed_defaults = {
        "data.corpus.path",
        "data.corpus.name",
        "data.corpus.config_name",
        "data.corpus.split",
        "data.corpus.text_field",
        "data.corpus.max_documents",
        # code more than a value: written once, in the schema (pipeline/settings/tokenize.py)
        "tokenize.chat_template",
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
        ("{source: local, path: TMP/folder.txt}", "is a folder: it must be a .txt, .jsonl, .json or .parquet file"),
    ],
)
def test_corpus_source_needs_its_fields(tmp_path, corpus, expected):
    (tmp_path / "folder.txt").mkdir()
    message = params_error(tmp_path, f"data:\n  corpus: {corpus.replace('TMP', str(tmp_path))}\n")
    assert "data.corpus" in message and expected in message


def test_special_tokens_must_differ(tmp_path):
    message = params_error(tmp_path, "tokenize:\n  pad_token: '</s>'\n")
    assert "tokenize" in message and "distinct" in message


def test_not_yaml(tmp_path):
    assert "not valid YAML" in params_error(tmp_path, "data: [unclosed\n")


def test_declared_keys_come_from_dvc_yaml():
    assert declared("tokenize")[0] == ["tokenize"]
    assert declared("data")[0] == ["data"]
    with pytest.raises(ParamsError, match="no stage named 'pretrainn'"):
        declared("pretrainn")[0]


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
    """`python -m stages.check` (what `make check` runs) exits non-zero naming the key."""
    project = tmp_path / "project"
    for code in ("pipeline", "stages", "data/local", "data/hub", "metrics/runs", "metrics/replicas"):
        shutil.copytree(PROJECT_ROOT / code, project / code, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "dvc.yaml", project / "dvc.yaml")
    shipped = (PROJECT_ROOT / "params.yaml").read_text()
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=project, check=True)

    def make_check(params_text: str) -> subprocess.CompletedProcess:
        (project / "params.yaml").write_text(params_text)
        return subprocess.run([sys.executable, "-m", "stages.check"], cwd=project, capture_output=True, text=True)

    result = make_check(shipped.replace("vocab_size: 2048", "vocab_size: -3"))
    assert result.returncode != 0
    assert "tokenize.vocab_size" in result.stderr and "greater than or equal to 300" in result.stderr

    result = make_check(shipped.replace("vocab_size: 2048", "vocab_size: 500"))
    assert result.returncode == 0, result.stderr
    assert "params.yaml and the input files it names are valid" in result.stdout
    assert "finetune@addition: compute, sft, finetune.base_model" in result.stdout

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


def test_a_mixture_weight_cannot_be_negative(tmp_path):
    """The mixture stage divides by the weights' sum: a negative one would give another expert more rows."""
    message = params_error(tmp_path, "mixture: {weights: {addition: 1, sorting: -0.5}}\n")
    assert "mixture.weights.sorting: Input should be greater than or equal to 0" in message


def test_a_merge_search_names_searchable_methods_known_experts_and_ordered_ranges(tmp_path):
    run = load_params(write_params(tmp_path, "merge_search: {runs: {s: {methods: [ties, dare_linear]}}}\n"))
    assert run.merge_search.runs["s"].uses_density() and run.merge_search.runs["s"].trials == 50
    assert "['slerp'] cannot be searched (no weight per expert); valid: breadcrumbs" in params_error(
        tmp_path, "merge_search: {runs: {s: {methods: [slerp]}}}\n"
    )
    message = params_error(tmp_path, "merge_search: {runs: {s: {experts: [addition, poetry]}}}\n")
    assert "merge_search.runs.s.experts: ['poetry'] are not in finetune.experts" in message
    message = params_error(tmp_path, "merge_search: {runs: {s: {weight: {low: 1, high: 0.5}}}}\n")
    assert "merge_search.runs.s.weight" in message and "low (1.0) must be below high (0.5)" in message


def test_replicated_seeds_are_distinct_and_differ_from_the_main_run(tmp_path):
    assert load_params(write_params(tmp_path, "seeds: {replicas: [2, 1]}\n")).seeds.replicas == [2, 1]
    assert "seeds [1] appear more than once" in params_error(tmp_path, "seeds: {replicas: [1, 2, 1]}\n")
    message = params_error(tmp_path, "sft: {seed: 3}\nseeds: {replicas: [1, 3]}\n")
    assert "seeds.replicas has 3, the main run's seed (sft.seed): it would train the same models again" in message
    assert "greater than or equal to 0" in params_error(tmp_path, "seeds: {replicas: [-1]}\n")


def test_expert_names_need_only_be_plain(tmp_path):
    """Model ids carry their kind (expert/moe is not moe/<variant>), so moe* and pretrain are expert names too."""
    names = ("moe", "pretrain", "addition", "sorting")  # the default merge recipes name addition and sorting
    text = "finetune:\n  experts:\n" + "".join(f"    {name}: {{dataset: data/sft/{name}.jsonl}}\n" for name in names)
    assert list(load_params(write_params(tmp_path, text)).finetune.experts) == list(names)
    message = params_error(tmp_path, "finetune:\n  experts:\n    Moe-1: {dataset: data/sft/addition.jsonl}\n")
    assert "finetune.experts.Moe-1: use lowercase letters, digits and _" in message


def test_a_file_a_setting_names_must_be_a_dependency_of_its_readers(tmp_path):
    """A local corpus outside every dependency of the data stage: DVC would never rerun the stage
    when it changes, so it is refused with the setting's name; under data/local/ it is fine."""
    from pipeline.settings.base import LOCAL_INPUTS
    from pipeline.settings.params_file import input_paths
    from pipeline.settings.stage_view import undeclared_inputs

    outside = tmp_path / "corpus.txt"
    outside.write_text("Some text.\n")
    params = load_params(write_params(tmp_path, f"data:\n  corpus: {{source: local, path: {outside}}}\n"))
    named = input_paths(params)
    deps = [PROJECT_ROOT / "stages/data.py", PROJECT_ROOT / LOCAL_INPUTS]
    (problem,) = undeclared_inputs("data", ["data"], deps, named, PROJECT_ROOT)
    assert "data.corpus.path" in problem and "stage 'data'" in problem and "data/local/" in problem
    # a stage that does not declare the setting does not read the file
    assert undeclared_inputs("tokenize", ["tokenize"], deps, named, PROJECT_ROOT) == []
    # a folder the stage depends on holds it: fine
    assert undeclared_inputs("data", ["data"], [*deps, tmp_path], named, PROJECT_ROOT) == []


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of the project without outputs, with a few files of a user's own in data/local."""
    root = copy_project(tmp_path_factory.mktemp("check") / "project")
    sh(root, "git", "init", "-q")  # DVC wants a git repository
    local = root / LOCAL_INPUTS
    (local / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    (local / "arc.jsonl").write_text('{"question": "?"}\n')
    (local / "folder.jsonl").mkdir()  # a folder with a file's name
    (local / "model.safetensors").write_text("")
    return root


def shipped_with(project: Path, **updates: object) -> Path:
    """The project with the shipped params.yaml changed by `updates` (`a__b=1` sets a.b)."""
    shutil.copy(PROJECT_ROOT / "params.yaml", project / "params.yaml")
    set_params(project, **updates)
    return project


SFT_FILE = "a .jsonl, .json or .parquet file"
ARC = {"eval__tasks": ["skills", "arc_easy"]}


@pytest.mark.parametrize(
    ("updates", "expected"),
    [
        pytest.param(
            {"finetune__experts__addition__dataset": "data/sft/additon.jsonl"},
            "finetune.experts.addition.dataset is 'data/sft/additon.jsonl', which the data stage does not produce; "
            "it makes data/sft/{addition,sorting,comparison,counting}.jsonl",
            id="typo inside the data stage's output",
        ),
        pytest.param(
            {"data__skills__names": ["addition", "sorting", "comparison"]},
            "finetune.experts.counting.dataset is 'data/sft/counting.jsonl', which the data stage does not produce; "
            "it makes data/sft/{addition,sorting,comparison}.jsonl",
            id="a skill the data stage no longer makes",
        ),
        pytest.param(
            {"finetune__replay_text": "data/corpus/trian.jsonl"},
            "finetune.replay_text is 'data/corpus/trian.jsonl', which the data stage does not produce; "
            "it makes data/corpus/{train,val,test}.jsonl",
            id="typo in a corpus split",
        ),
        pytest.param(
            {"finetune__experts__addition__dataset": "data/sft"},
            f"finetune.experts.addition.dataset: 'data/sft' must be {SFT_FILE}, not a folder",
            id="dataset is the data stage's folder",
        ),
        pytest.param(
            {"finetune__experts__addition__dataset": "data/local/folder.jsonl"},
            f"finetune.experts.addition.dataset is 'data/local/folder.jsonl', a folder: it must be {SFT_FILE}",
            id="dataset is a folder in data/local",
        ),
        pytest.param(
            {"finetune__experts__addition__dataset": "data/local/chat.jsnol"},
            f"finetune.experts.addition.dataset: 'data/local/chat.jsnol' has suffix '.jsnol': it must be {SFT_FILE}",
            id="dataset of an unknown type",
        ),
        pytest.param(
            {"finetune__experts__addition__dataset": "data/local/caht.jsonl"},
            "finetune.experts.addition.dataset is 'data/local/caht.jsonl', which does not exist, and no stage "
            "produces it. Put your own files under data/local/",
            id="dataset missing from data/local",
        ),
        pytest.param(
            {"finetune__replay_text": "data/local/folder.jsonl"},
            "finetune.replay_text is 'data/local/folder.jsonl', a folder: it must be a .jsonl or .parquet file",
            id="replay text is a folder",
        ),
        pytest.param(
            {**ARC, "eval__task_data": {"arc_easy": {"test": "data/local/arc_easy.jsonl"}}},
            "eval.task_data.arc_easy.test is 'data/local/arc_easy.jsonl', which does not exist",
            id="task data missing from data/local",
        ),
        pytest.param(
            {**ARC, "eval__task_data": {"arc_easy": {"test": "data/local/folder.jsonl"}}},
            "eval.task_data.arc_easy.test is 'data/local/folder.jsonl', a folder: it must be a .jsonl, .json or "
            ".parquet file",
            id="task data is a folder",
        ),
        pytest.param(
            {**ARC, "eval__task_data": {"arc_easy": {"test": "data/local/arc.csv"}}},
            "eval.task_data.arc_easy.test: 'data/local/arc.csv' has suffix '.csv': it must be a .jsonl, .json or "
            ".parquet file",
            id="task data that lm-eval cannot read",
        ),
        pytest.param(
            {"finetune__base_model": "data/local/model.safetensors"},
            "finetune.base_model is 'data/local/model.safetensors', a file: it must be a folder",
            id="base model is a file",
        ),
        pytest.param(
            {"finetune__base_model": "models/pretrian"},
            "finetune.base_model is 'models/pretrian', which does not exist, and no stage produces it. Put your "
            "own files under data/local/; models and datasets from the Hugging Face hub come in through a "
            "params.yaml `hub` entry",
            id="base model typo",
        ),
        pytest.param(
            {"tokenize__base_model": "data/local/phi3"},
            "tokenize.base_model is 'data/local/phi3', which does not exist",
            id="tokenizer folder missing from data/local",
        ),
        pytest.param(
            {"pretrain__max_steps": 10**12},
            "pretrain.max_steps: Input should be less than or equal to 10000000",
            id="pretraining forever",
        ),
        pytest.param(
            {"finetune__defaults__max_steps": 10**12},
            "finetune.defaults.max_steps: Input should be less than or equal to 1000000",
            id="fine-tuning forever",
        ),
        pytest.param(
            {"finetune__experts__addition__max_steps": 10**12},
            "finetune.experts.addition.max_steps: Input should be less than or equal to 1000000",
            id="an expert's override of max_steps",
        ),
        pytest.param(
            {"mixture__moe_runs__merges__sequence_len": 10**9},
            "mixture.moe_runs.merges.sequence_len: Input should be less than or equal to 1048576",
            id="a MoE run's override of sequence_len",
        ),
        pytest.param(
            {"pretrain__micro_batch_size": 10**6, "pretrain__batch_tokens": 128 * 10**6},
            "pretrain.micro_batch_size: Input should be less than or equal to 16384",
            id="absurd micro batch",
        ),
        pytest.param(
            {"data__skills__train_examples": 10**9},
            "data.skills.train_examples: Input should be less than or equal to 1000000",
            id="absurd SFT rows",
        ),
        pytest.param(
            {"eval__limit": 10**12},
            "eval.limit: Input should be less than or equal to 1000000",
            id="absurd eval limit",
        ),
        pytest.param(
            {"pretrain__model__num_layers": 10**6},
            "pretrain.model.num_layers: Input should be less than or equal to 1024",
            id="absurd depth",
        ),
        pytest.param(
            {
                "dpo__runs": {
                    "x": {"model": "models/experts/addition", "dataset": "data/preference/train/additon.jsonl"}
                }
            },
            "dpo.runs.x.dataset is 'data/preference/train/additon.jsonl'",
            id="preference pairs typo",
        ),
        pytest.param(
            {"quantize__runs": {"q": {"model": "models/experts/additon"}}},
            "quantize.runs.q.model is 'models/experts/additon', which does not exist, and no stage produces it",
            id="model to quantize typo",
        ),
        pytest.param(
            {"gguf__runs": {"g": {"model": "models/experts/addition", "types": ["q4_0"]}}},
            "gguf.runs.g.types: list f16 first",
            id="gguf without f16",
        ),
        pytest.param(
            {"adapters__runs": {"a": {"dataset": "data/sft/addition.jsonl", "method": "loha", "adapter": "lora"}}},
            "set `method` (lora, loha or lokr), not `adapter`",
            id="adapter run with an adapter",
        ),
        pytest.param(
            {"qat__runs": {"a": {"dataset": "data/sft/addition.jsonl", "weight_dtype": "int8"}}},
            "qat.runs.a.weight_dtype: Input should be 'int4'",
            id="qat to int8, which axolotl cannot train",
        ),
        pytest.param(
            {"dpo__runs": {"x": {"model": "data/hub/dense", "dataset": "data/preference/train/addition.jsonl"}}},
            "dpo.runs.x.model is 'data/hub/dense', but data/hub/<name> folders come from `hub` entries",
            id="dpo from a hub folder without its entry",
        ),
    ],
)
def test_check_refuses_settings_the_run_would_fail_on(project, updates, expected):
    """What `make check` passed and the run then failed on: the message names the setting, the
    value and what would be valid."""
    with pytest.raises(ParamsError) as raised:
        check(shipped_with(project, **updates))
    assert expected in str(raised.value)


def test_check_accepts_what_the_run_will_find(project):
    """Files of the user's own, files the data stage writes, and anything inside a hub snapshot."""
    shipped_with(
        project,
        finetune__experts__addition__dataset="data/local/chat.jsonl",
        finetune__replay_text="data/corpus/val.jsonl",
        **ARC,
        eval__task_data={"arc_easy": {"test": "data/local/arc.jsonl"}},
    )
    assert check(project)
    hub = shipped_with(
        project,
        hub={"chat": {"repo_id": "org/chat", "repo_type": "dataset", "revision": "main"}},
        finetune__experts__addition__dataset="data/hub/chat/data/train-00000-of-00001.parquet",
    )
    params = load_params(hub / "params.yaml")
    assert path_problems(params, planned_outputs(load_stages(hub), params), hub) == []


def test_existing_input_files_are_the_users_own_files(project):
    """The content checks' list: files named by settings that exist before the run, not a stage's
    output (the run rewrites it) nor a folder."""
    shipped_with(
        project,
        finetune__experts__addition__dataset="data/local/chat.jsonl",
        finetune__base_model="data/local/folder.jsonl",
        **ARC,
        eval__task_data={"arc_easy": {"test": "data/local/arc.jsonl"}},
    )
    (project / "data/sft").mkdir(exist_ok=True)
    (project / "data/sft/sorting.jsonl").write_text("")  # a stale output of an earlier run
    params = load_params(project / "params.yaml")
    assert existing_input_files(params, project) == {
        "finetune.experts.addition.dataset": project / "data/local/chat.jsonl",
        "eval.task_data.arc_easy.test": project / "data/local/arc.jsonl",
    }


def test_the_data_stage_writes_the_files_check_expects(tmp_path):
    """check() predicts the data stage's files from data_stage_files; the stage must write exactly those."""
    from stages.data import run

    settings = DataSettings(
        world={"corpus_megabytes": 0.01},
        skills={"names": ["sorting", "counting"], "train_examples": 2, "eval_examples": 2, "validation_examples": 2},
        story_eval_examples=2,
    )
    folders = {
        option: tmp_path / option.strip("-")
        for option in ("--corpus", "--sft", "--eval", "--validation", "--preference")
    }
    run(settings, *folders.values())
    for option, files in data_stage_files(settings).items():
        written = [path.relative_to(folders[option]).as_posix() for path in folders[option].rglob("*.*")]
        assert sorted(written) == sorted(files), option


def test_sft_dataset_types_are_the_ones_the_sft_code_reads():
    from pipeline.records import DATASET_FORMATS

    assert set(SFT_DATASET_SUFFIXES) == set(DATASET_FORMATS)


def test_every_skill_the_schema_accepts_has_a_generator():
    from pipeline.settings.base import SKILLS
    from stages.data import SKILL_GENERATORS

    assert list(SKILL_GENERATORS) == list(SKILLS)
    assert load_params().data.skills.names == list(SKILLS)


def test_sft_settings_are_one_shared_block_each_run_overrides(tmp_path):
    """Experts and mixture runs start from the one `sft` section; each layer changes only what it names."""
    from pipeline.settings.sft import resolve_sft

    text = (
        "sft: {learning_rate: 0.01, lora_r: 8}\n"
        "finetune: {defaults: {lora_r: 4, seed: 3}}\n"
        "mixture: {defaults: {max_steps: 50}}\n"
    )
    params = load_params(write_params(tmp_path, text))
    expert = resolve_sft(params.sft, params.finetune.defaults, params.finetune.experts["addition"])
    assert (expert.learning_rate, expert.lora_r, expert.seed, expert.max_steps) == (0.01, 4, 3, 600)
    mixture = resolve_sft(params.sft, params.mixture.defaults)
    assert (mixture.learning_rate, mixture.lora_r, mixture.max_steps) == (0.01, 8, 50)
    # every SFT setting can be overridden, with the same checks as in `sft`
    message = params_error(tmp_path, "finetune: {defaults: {pad_to_multiple_of: 0}}\n")
    assert "finetune.defaults.pad_to_multiple_of: Input should be greater than or equal to 1" in message
