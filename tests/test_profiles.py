"""Profiles (pipeline/profiles.py, profiles/*.yaml): the merge rule, `apply`, and for every profile
its offline check and the configurations it makes for axolotl, mergekit and lm-eval, each
validated by the tool's own schema (on this CPU machine, nothing downloaded)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from pipeline import sft
from pipeline.planner import check
from pipeline.profiles import apply, describe, merge_overlay, profile_names, profile_text, read_overlay, validate
from pipeline.roster import roster_of
from pipeline.settings.base import PROJECT_ROOT, TASK_DATA_SUFFIXES, InputError, ParamsError
from pipeline.settings.eval import EMBEDDED_TASKS, EvalSettings
from pipeline.settings.params_file import Params, load_params
from pipeline.settings.sft import resolve_sft
from stages import eval as eval_stage
from stages import merge, mixture_finetune, moe
from stages.check import check_input_files, profile_project
from tests.project import commit_all, copy_project

PROFILES = profile_names()


@pytest.fixture(scope="module")
def settings() -> dict[str, Params]:
    """Each profile's validated settings, as `apply` would write them."""
    from ruamel.yaml import YAML

    return {name: validate(YAML(typ="safe").load(profile_text(name)), name) for name in PROFILES}


def test_the_three_profiles_exist_and_tiny_is_the_shipped_params():
    assert {"tiny", "gpu-small", "phi3-moe"} <= set(PROFILES)
    assert not read_overlay("tiny")
    with pytest.raises(InputError, match=r"no profile 'nope': profiles/ has .*gpu-small.*tiny"):
        read_overlay("nope")


def test_sections_merge_key_by_key_and_named_collections_are_replaced_whole():
    base = {
        "hub": {"a": {"repo_id": "x/a", "revision": "1"}},
        "data": {"seed": 0, "corpus": {"source": "synthetic", "split": "train"}},
        "eval": {"tasks": ["skills", "stories"], "num_fewshot": 0},
        "finetune": {
            "base_model": "models/pretrain",
            "defaults": {"max_steps": 5},
            "experts": {"addition": {"dataset": "a.jsonl"}, "sorting": {"dataset": "s.jsonl", "max_steps": 9}},
        },
    }
    overlay = {
        "hub": {"b": {"repo_id": "x/b", "revision": "2"}},
        "data": {"corpus": {"source": "hub", "name": "data/hub/b"}},  # a section inside a section
        "eval": {"tasks": ["hellaswag"]},
        "finetune": {"defaults": {"lora_r": 8}, "experts": {"sorting": {"dataset": "chat.parquet"}}},
    }
    merged = merge_overlay(base, overlay)
    assert merged["hub"] == {"b": {"repo_id": "x/b", "revision": "2"}}  # a named collection: replaced
    assert merged["data"] == {"seed": 0, "corpus": {"source": "hub", "split": "train", "name": "data/hub/b"}}
    assert merged["eval"] == {"tasks": ["hellaswag"], "num_fewshot": 0}  # a list: replaced
    assert merged["finetune"]["defaults"] == {"max_steps": 5, "lora_r": 8}  # SFTOverrides is a section
    assert merged["finetune"]["experts"] == {"sorting": {"dataset": "chat.parquet"}}  # no max_steps: 9 left over
    assert merged["finetune"]["base_model"] == "models/pretrain"
    assert base["eval"]["tasks"] == ["skills", "stories"]  # the base is not changed


def test_apply_switches_profiles_keeps_comments_and_never_overwrites_own_edits(tmp_path):
    project = copy_project(tmp_path)
    commit_all(project)
    params = project / "params.yaml"
    committed = params.read_text()

    apply("gpu-small", project)
    text = params.read_text()
    assert text == profile_text("gpu-small", project)
    assert "  portable_kernels: true     # AVX2 kernels on every x86 CPU" in text  # an untouched key's comment
    assert re.search(r"\n  threads: null +# every core: the work is on the GPU\n", text)  # the profile's own
    assert load_params(params).pretrain.model.hidden_size == 768

    apply("phi3-moe", project)  # A -> B: over the committed file, nothing of gpu-small left
    switched = load_params(params)
    assert (switched.sft.adapter, switched.sft.lora_r, switched.merge.dtype) == ("qlora", 32, "bfloat16")
    assert switched.pretrain.model.hidden_size == 128 and switched.data.corpus.source == "synthetic"

    assert (
        describe(project) == "params.yaml holds profile 'phi3-moe' (`make run PROFILE=tiny` goes back to the default)"
    )
    edited = params.read_text().replace("lora_r: 32", "lora_r: 16")
    params.write_text(edited)
    assert describe(project).endswith("profile 'phi3-moe' with edits of your own: sft.lora_r = 16 (was 32)")
    with pytest.raises(InputError, match="edits of your own") as refused:
        apply("tiny", project)
    assert "sft.lora_r = 16 (was 32)" in str(refused.value)  # what would be lost, and how to drop it
    assert "`git checkout params.yaml && make run PROFILE=tiny`" in str(refused.value)
    assert params.read_text() == edited

    # `dvc exp run -S` rewrites the whole file's layout: the same settings are no edit of one's own
    params.write_text(profile_text("phi3-moe", project))
    apply_overrides(params, ["sft.lora_r=32"])
    assert params.read_text() != profile_text("phi3-moe", project)
    apply("gpu-small", project)

    params.write_text(profile_text("phi3-moe", project))
    apply("tiny", project)
    assert params.read_text() == committed  # byte for byte

    (project / "profiles" / "broken.yaml").write_text("sft:\n  adapter: qlora4\n")
    with pytest.raises(ParamsError, match=r"profiles/broken.yaml over params.yaml.*\n  sft.adapter"):
        apply("broken", project)
    assert params.read_text() == committed
    assert describe(project) == "params.yaml holds profile 'tiny'"  # a profile being written blocks nothing


@pytest.mark.parametrize("name", PROFILES)
def test_profile_passes_the_offline_check(name):
    """What `make check PROFILE=<name>` checks, with the hub snapshots still to be fetched."""
    with profile_project(name, PROJECT_ROOT) as project:
        report = check(project)
        params = load_params(project / "params.yaml")
        check_input_files(params, project, [])
    hub = [line for line in report if line.strip().startswith("hub@")]
    assert len(hub) == len(params.hub)
    assert bool(params.hub) == (name in ("gpu-small", "phi3-moe"))  # the real-scale ones; tiny and post-sft are local


def test_make_check_with_a_profile_leaves_params_yaml_alone():
    before = (PROJECT_ROOT / "params.yaml").read_text()
    command = [sys.executable, "-m", "stages.check", "--profile", "phi3-moe"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "profile 'phi3-moe'" in result.stdout and "finetune@chat:" in result.stdout
    assert (PROJECT_ROOT / "params.yaml").read_text() == before


def sft_runs(params: Params) -> dict[str, tuple]:
    """Every SFT run of the settings: where -> (its SFT settings, start model, dataset, extra axolotl keys),
    resolved by the stages' own functions."""
    runs = {}
    for name, expert in params.finetune.experts.items():
        settings = resolve_sft(params.sft, params.finetune.defaults, expert)
        runs[f"finetune.experts.{name}"] = (settings, params.finetune.base_model, expert.dataset, {})
    mixture = params.mixture
    defaults = resolve_sft(params.sft, mixture.defaults)
    for name, overrides in mixture.dense_runs.items():
        runs[f"mixture.dense_runs.{name}"] = (overrides.resolve(defaults), params.finetune.base_model, "mix.jsonl", {})
    for name, run in mixture.moe_runs.items():
        settings, extra = mixture_finetune.mode_settings(run, defaults), mixture_finetune.mode_config(run, mixture)
        runs[f"mixture.moe_runs.{name}"] = (settings, f"models/moe/{run.moe}", "mix.jsonl", extra)
    return runs


@pytest.mark.parametrize("name", PROFILES)
def test_axolotl_accepts_every_sft_run_of_the_profile(name, settings):
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    for where, (run, start, dataset, extra) in sft_runs(settings[name]).items():
        replay = "work/replay.jsonl" if run.replay_rows else None
        config = {**sft.axolotl_config(run, start, dataset, Path("work"), bf16=True, replay=replay), **extra}
        validated = validate_config(DictDefault(config))  # as on a GPU: bf16
        assert (validated.sequence_len, validated.learning_rate) == (run.sequence_len, run.learning_rate), where
        assert bool(validated.load_in_4bit) == (run.adapter == "qlora"), where
        assert validated.attn_implementation == ("flash_attention_2" if run.flash_attention else "sdpa"), where


@pytest.mark.parametrize("name", PROFILES)
def test_mergekit_accepts_every_merge_and_moe_of_the_profile(name, settings, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.moe.config import MoEMergeConfig, is_bad_config

    params = settings[name]
    experts = Path("models/experts")
    for recipe_name, recipe in params.merge.recipes.items():
        names = roster_of(params).merges[recipe_name]
        config = merge.mergekit_config(recipe, {n: str(experts / n) for n in names}, params.finetune.base_model,
                                       params.merge.dtype)  # fmt: skip
        validated = MergeConfiguration.model_validate(config)
        assert validated.merge_method == recipe.method and len(validated.models) == len(names), recipe_name
    selection = tmp_path / "select.json"  # what the select stage writes: the first top_k recipes, say
    selection.write_text(json.dumps({"selected": list(params.merge.recipes)[: params.select.top_k]}))
    for variant_name, variant in params.moe.variants.items():
        sources, _ = moe.variant_sources(variant, roster_of(params), selection, Path("models/merged"), experts,
                                         params.finetune.base_model)  # fmt: skip
        config = moe.moe_config(params.moe, sources, {}, next(iter(sources.values())))
        validated = MoEMergeConfig.model_validate(config)
        assert not is_bad_config(validated, allow_all_same=variant.source == "base"), variant_name
        assert (validated.gate_mode, validated.dtype) == (params.moe.gate_mode, params.moe.dtype)


def test_task_data_suffixes_are_the_ones_eval_reads():
    assert set(TASK_DATA_SUFFIXES) == set(eval_stage.TASK_DATA_LOADERS)


@pytest.mark.parametrize("name", PROFILES)
def test_lm_eval_accepts_every_task_of_the_profile(name, settings, tiny_data, tiny_tokenized, tmp_path):
    """The task YAMLs the eval stage writes, resolved (includes, !function) and checked by lm-eval's own
    loader and TaskConfig; the data files are not opened (the hub snapshots are not fetched here)."""
    from lm_eval.config.task import TaskConfig
    from lm_eval.utils import load_yaml_config

    params = settings[name].eval
    tasks = eval_stage.write_tasks(params, tiny_tokenized[0], tiny_data / "eval", tiny_data / "corpus", tmp_path)
    for task in tasks.names:
        config = TaskConfig(**load_yaml_config(tasks.manager.task_index[task]["yaml_path"], mode="full"))
        label = tasks.labels.get(task, task)
        if label in params.task_data:
            files = params.task_data[label]
            assert config.dataset_path == eval_stage.task_data_loader(files), task
            assert config.dataset_kwargs == {"data_files": files}, task
            assert {config.test_split, config.validation_split} - {None} == set(files), task
            assert label != "hellaswag" or callable(config.process_docs), task  # its `!function`, resolved
    standard = {task for task in params.tasks if task not in EMBEDDED_TASKS}
    assert standard <= {tasks.labels.get(task, task) for task in tasks.names}


def test_parquet_task_data_runs_offline_in_lm_eval(tiny_pretrained, tiny_data, tmp_path):
    """hellaswag and arc_easy read from parquet files with the columns of the hub datasets' own files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arc = [{"id": str(i), "question": f"Which number is larger, {a} or {b}?", "answerKey": "A",
            "choices": {"text": [str(max(a, b)), str(min(a, b))], "label": ["A", "B"]}}
           for i, (a, b) in enumerate([(12, 7), (40, 93), (55, 56)])]  # fmt: skip
    hellaswag = [{"ind": i, "activity_label": "Counting", "ctx_a": "She counts one, two,", "ctx_b": "then",
                  "ctx": "She counts one, two, then", "endings": ["three.", "blue.", "seven.", "tea."],
                  "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"}
                 for i in range(3)]  # fmt: skip
    files = {"arc_easy": tmp_path / "arc.parquet", "hellaswag": tmp_path / "hellaswag.parquet"}
    pq.write_table(pa.Table.from_pylist(arc), files["arc_easy"])
    pq.write_table(pa.Table.from_pylist(hellaswag), files["hellaswag"])
    task_data = {"arc_easy": {"test": str(files["arc_easy"])}, "hellaswag": {"validation": str(files["hellaswag"])}}
    settings = EvalSettings(tasks=["arc_easy", "hellaswag"], task_data=task_data)
    metrics = eval_stage.run(settings, tiny_pretrained[1] / "model", tiny_data / "eval", tiny_data / "corpus",
                             tmp_path / "raw", model_id="base/pretrain")  # fmt: skip
    assert set(metrics) == {f"{task}/{metric}" for task in files for metric in ("acc", "acc_norm")}
    samples = (tmp_path / "raw" / "samples.jsonl").read_text()
    assert "Question: Which number is larger" in samples  # arc_easy's own prompt
    assert "Counting: She counts one, two, Then" in samples  # hellaswag's own process_docs ran
