"""`eval` stage: one model through EleutherAI's lm-evaluation-harness, in process.

    python -m stages.eval --stage eval_expert@addition --name expert/addition \
        --model models/experts/addition --eval-sets data/eval --corpus data/corpus \
        --raw metrics/eval_raw/expert/addition --metrics metrics/eval/expert/addition.json

dvc.yaml runs it once per model; `--name` is the model's id, `<kind>/<name>` (pipeline/kinds.py).
The embedded tasks are generated as lm-eval task YAMLs over the local eval sets in a scratch
folder (paths as given: relative to the project in dvc.yaml); the raw folder gets lm-eval's full
results (the task configurations included), less what differs between identical runs
(VOLATILE_RESULTS), and its per-item samples. Two more files sit beside them for the report:
- items.json: `task/metric` -> 0/1 per item in doc_id order, for every binary metric
  (exact_match, acc, acc_norm) and the pooled `all_skills/...` items: what confidence intervals
  and paired tests need;
- lineage.json: a copy of the model folder's lineage.json (its kind, name, the stage that made
  it, its parents and settings), or `{"kind", "name", "parents": []}` from --name without one.
The metrics file holds stable `task/metric` numbers only.

Tasks (settings `eval.tasks`):
- skills: per skill, `<skill>` exact answer (generate_until, exact_match after stripping
  whitespace) and `<skill>_choice` multiple choice (acc, acc_norm), the question in the prompt
  that the chat template of the model's tokenizer writes, as in the SFT rows;
  `all_skills/exact_match` and `all_skills/acc` are the shares over every skill's items pooled
  (with equally many items per skill, as the data stage writes them, the mean of the per-skill
  scores);
- stories: story completion, multiple choice (acc, acc_norm);
- perplexity: held-out corpus text, loglikelihood_rolling (word_perplexity, bits_per_byte);
- any other name: that lm-eval task, with its data from `eval.task_data` when given (offline;
  .json/.jsonl or .parquet files, such as a hub dataset's own parquet files).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.atomic import atomic_dir, dumps_json, write_json
from pipeline.eval_sets import (
    SKILL_FIELDS,
    STORY_FIELDS,
    TEXT_FIELDS,
    chat_prompt_around_question,
    check_eval_set,
    skill_names,
)
from pipeline.lineage import LINEAGE_FILE
from pipeline.lineage import model_id as lineage_id
from pipeline.settings.base import InputError
from pipeline.settings.eval import EMBEDDED_TASKS, EvalSettings
from pipeline.stage import configure_environment, resolve_device, start, use_bf16

log = logging.getLogger("stages.eval")

# Metrics kept in metrics/eval/<model>.json, per output type; lm-eval reports each with a filter
# suffix (",none" or ",strip").
KEPT_METRICS = ("exact_match", "acc", "acc_norm", "word_perplexity", "bits_per_byte")
# Scored 0 or 1 per item: items.json keeps each item's outcome for intervals and paired tests.
BINARY_METRICS = ("exact_match", "acc", "acc_norm")
CHOICE_METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]


def question_prompt(settings: EvalSettings, model_dir: Path) -> str:
    """lm-eval's prompt (a Jinja template) for a skill question: with apply_chat_template lm-eval
    wraps the bare question in the model's template itself; otherwise the prompt is written out
    here from the template of the model's tokenizer, as the SFT rows were rendered."""
    if settings.apply_chat_template:
        return "{{question}}"
    from transformers import AutoTokenizer

    prefix, suffix = chat_prompt_around_question(AutoTokenizer.from_pretrained(model_dir))
    return prefix + "{{question}}" + suffix


# lm-eval's results keys that differ between identical runs (the date, the project's git commit,
# the machine's description): dropped, so identical evaluations give identical bytes.
VOLATILE_RESULTS = ("date", "git_hash", "upper_git_hash", "pretty_env_info")


def local_dataset(path: Path) -> dict[str, Any]:
    # The path as given: relative in dvc.yaml, so no output names the folder the project is in.
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
    }


def embedded_task_configs(
    settings: EvalSettings, eval_dir: Path, corpus_dir: Path, prompt: str
) -> list[dict[str, Any]]:
    """lm-eval task configurations for the embedded eval sets named in settings.tasks; `prompt`
    is the skill questions' prompt (question_prompt).

    Fields are named directly ("answer", not "{{answer}}") wherever no template is needed:
    lm-eval compiles a Jinja template anew for each use, a third of a CPU eval's time.
    """
    configs: list[dict[str, Any]] = []
    if "skills" in settings.tasks:
        for skill in skill_names(eval_dir):
            configs += skill_task_configs(settings, skill, eval_dir / f"{skill}.jsonl", prompt)
    if "stories" in settings.tasks:
        configs.append(story_task_config(eval_dir / "stories.jsonl"))
    if "perplexity" in settings.tasks:
        configs.append(perplexity_task_config(corpus_dir / "test.jsonl"))
    return configs


def skill_task_configs(settings: EvalSettings, skill: str, path: Path, prompt: str) -> list[dict[str, Any]]:
    """The skill's exact-answer task and its multiple-choice task `<skill>_choice`."""
    data = local_dataset(path)
    exact_answer = {
        "task": skill,
        **data,
        "output_type": "generate_until",
        "doc_to_text": prompt,
        "doc_to_target": "answer",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": settings.max_gen_tokens},
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    choice = {
        "task": f"{skill}_choice",
        **data,
        "output_type": "multiple_choice",
        "doc_to_text": prompt,
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        # the chat template's prompt already ends where the answer starts
        "target_delimiter": " " if settings.apply_chat_template else "",
        "metric_list": CHOICE_METRICS,
    }
    return [exact_answer, choice]


def story_task_config(path: Path) -> dict[str, Any]:
    return {
        "task": "stories",
        **local_dataset(path),
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "endings",
        "doc_to_target": "label",
        "target_delimiter": "",  # every ending starts with its own space
        "metric_list": CHOICE_METRICS,
    }


def perplexity_task_config(path: Path) -> dict[str, Any]:
    return {
        "task": "perplexity",
        **local_dataset(path),
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
    }


def eval_set_files(settings: EvalSettings, eval_dir: Path, corpus_dir: Path) -> dict[Path, tuple[str, ...]]:
    """The local files the tasks in settings.tasks read -> the fields each of their rows needs
    (none for a standard task's own JSON files: lm-eval's task YAML names them)."""
    files: dict[Path, tuple[str, ...]] = {}
    if "skills" in settings.tasks:
        files.update({eval_dir / f"{skill}.jsonl": SKILL_FIELDS for skill in skill_names(eval_dir)})
    if "stories" in settings.tasks:
        files[eval_dir / "stories.jsonl"] = STORY_FIELDS
    if "perplexity" in settings.tasks:
        files[corpus_dir / "test.jsonl"] = TEXT_FIELDS
    for splits in settings.task_data.values():
        files.update({Path(path): () for path in splits.values()})
    return files


def check_eval_sets(settings: EvalSettings, eval_dir: Path, corpus_dir: Path) -> None:
    """Every eval set the tasks in settings.tasks read, checked before lm-eval starts (cheap: one pass each)."""
    for path, fields in eval_set_files(settings, eval_dir, corpus_dir).items():
        check_eval_set(path, fields)


# The `datasets` loader lm-eval reads each kind of eval.task_data file with (pipeline/settings/base.py
# TASK_DATA_SUFFIXES lists the same suffixes: a test checks).
TASK_DATA_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def task_data_loader(data_files: dict[str, str]) -> str:
    """The loader of a task's files (all of one format: the schema checks, as lm-eval reads them with one)."""
    return TASK_DATA_LOADERS[Path(next(iter(data_files.values()))).suffix]


def standard_task_override(name: str, data_files: dict[str, str], builtin_yaml: str) -> dict[str, Any]:
    """A task that includes lm-eval's own YAML for `name` but reads local files (works offline)."""
    splits = sorted(data_files)
    override: dict[str, Any] = {
        "include": builtin_yaml,
        "task": f"{name}_local",
        "dataset_path": task_data_loader(data_files),
        "dataset_name": None,
        "dataset_kwargs": {"data_files": dict(data_files)},  # as given: relative to the project
    }
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        override[key] = None
    override["test_split" if "test" in splits else "validation_split"] = "test" if "test" in splits else splits[0]
    return override


def write_task_files(configs: list[dict[str, Any]], folder: Path) -> None:
    yaml = YAML()
    yaml.default_flow_style = False
    for config in configs:
        with open(folder / f"{config['task']}.yaml", "w") as handle:
            yaml.dump(config, handle)


def resolve_device_and_dtype(settings: EvalSettings) -> tuple[str, str]:
    device = resolve_device(settings.device)
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "bfloat16" if use_bf16(dtype, device) else "float32"
    return device, dtype


def stable_metrics(results: dict[str, Any], task_names: dict[str, str]) -> dict[str, float]:
    """`task/metric` -> value from lm-eval's results, for the metrics that are kept."""
    metrics: dict[str, float] = {}
    for task, values in results.items():
        label = task_names.get(task, task)
        for key, value in values.items():
            metric = key.split(",")[0]
            if metric in KEPT_METRICS and isinstance(value, int | float):
                metrics[f"{label}/{metric}"] = round(float(value), 4)
    return dict(sorted(metrics.items()))


def item_outcomes(samples: dict[str, list[dict[str, Any]]], task_names: dict[str, str]) -> dict[str, list[int]]:
    """`task/metric` -> 0/1 per item in doc_id order, from lm-eval's logged samples.

    A task scored under several filters (gsm8k's strict and flexible answers) logs each item
    once per filter; its items are left out, as one `task/metric` key cannot say which is meant.
    """
    items = {}
    for task, rows in samples.items():
        if len({row["filter"] for row in rows}) > 1:
            continue
        for metric in BINARY_METRICS:
            outcomes = {row["doc_id"]: row[metric] for row in rows if metric in row["metrics"]}
            if outcomes and all(value in (0, 1) for value in outcomes.values()):
                items[f"{task_names.get(task, task)}/{metric}"] = [int(outcomes[i]) for i in sorted(outcomes)]
    return items


def pooled_skill_items(items: dict[str, list[int]], skills: list[str]) -> dict[str, list[int]]:
    """all_skills/<metric>: every skill's items concatenated in skill order, one pool to rank models by."""
    pooled = {}
    for metric, key in (("exact_match", "{}/exact_match"), ("acc", "{}_choice/acc")):
        keys = [key.format(skill) for skill in skills]
        if skills and all(k in items for k in keys):
            pooled[f"all_skills/{metric}"] = [outcome for k in keys for outcome in items[k]]
    return pooled


def items_json(items: dict[str, list[int]]) -> str:
    """Compact and stable: one line per key, sorted, no spaces inside the lists."""
    lines = [f"{json.dumps(key)}: {json.dumps(items[key], separators=(',', ':'))}" for key in sorted(items)]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def copy_lineage(model_dir: Path, model_id: str, path: Path) -> None:
    """Copy the model folder's lineage.json to `path`; without one (a base model from outside),
    write kind and name from the id. A lineage of another id is an error: the wrong folder."""
    source = model_dir / LINEAGE_FILE
    if not source.is_file():
        kind, _, name = model_id.partition("/")
        path.write_text(dumps_json({"kind": kind, "name": name, "parents": []}))
        return
    declared = lineage_id(model_dir)
    if declared != model_id:
        raise InputError(f"--name is {model_id} but {source} names {declared}")
    shutil.copyfile(source, path)


def check_model_id(model_id: str) -> None:
    # which kinds there are is pipeline/kinds.py's, held to dvc.yaml's eval stages by tests/test_graph.py
    kind, _, name = model_id.partition("/")
    if not kind or not name:
        raise InputError(f"--name {model_id!r} must be <kind>/<name>, e.g. expert/addition")


@dataclass
class Tasks:
    """What lm-eval runs: its task names, the names the metrics give them where they differ
    (arc_easy for arc_easy_local), the skills (pooled into all_skills) and the TaskManager that
    finds them."""

    names: list[str]
    labels: dict[str, str]
    skills: list[str]
    manager: Any


def run(
    settings: EvalSettings, model_dir: Path, eval_dir: Path, corpus_dir: Path, raw_dir: Path, *, model_id: str
) -> dict[str, float]:
    """Evaluate the model `model_id` (`<kind>/<name>`); write raw results, samples, items and
    lineage to raw_dir; return the metrics."""
    check_model_id(model_id)
    check_eval_sets(settings, eval_dir, corpus_dir)
    # The task YAMLs are scratch: one of them includes lm-eval's own YAML by its path in this
    # environment, and results.json keeps the configurations lm-eval resolved from them.
    with atomic_dir(raw_dir) as tmp, tempfile.TemporaryDirectory(prefix="lm-eval-tasks-") as tasks_dir:
        copy_lineage(model_dir, model_id, tmp / "lineage.json")
        tasks = write_tasks(settings, model_dir, eval_dir, corpus_dir, Path(tasks_dir))
        output = evaluate(settings, model_dir, tasks)
        pooled = write_raw_outputs(output, tasks, tmp)
    metrics = stable_metrics(output["results"], tasks.labels)
    metrics.update({key: round(sum(outcomes) / len(outcomes), 4) for key, outcomes in pooled.items()})
    log.info("metrics: %s", dumps_json(metrics))
    return metrics


def write_tasks(settings: EvalSettings, model_dir: Path, eval_dir: Path, corpus_dir: Path, folder: Path) -> Tasks:
    """Write the task YAMLs into `folder`: the embedded tasks, and the standard tasks that read
    local data; raise InputError for a task lm-eval does not know."""
    from lm_eval.tasks import TaskManager

    configs = embedded_task_configs(settings, eval_dir, corpus_dir, question_prompt(settings, model_dir))
    write_task_files(configs, folder)
    standard = [name for name in settings.tasks if name not in EMBEDDED_TASKS]
    # Indexing lm-eval's ~14,000 built-in task YAMLs costs ~6 s per process: only when asked for.
    manager = TaskManager(include_path=str(folder), include_defaults=bool(standard))
    if unknown := [name for name in standard if name not in manager.all_tasks]:
        raise InputError(f"eval.tasks: {unknown} are not lm-eval tasks (see `lm-eval ls tasks`)")
    local = [name for name in standard if name in settings.task_data]
    if local:
        overrides = [
            standard_task_override(name, settings.task_data[name], manager.task_index[name]["yaml_path"])
            for name in local
        ]
        write_task_files(overrides, folder)
        # the overrides include lm-eval's YAMLs by path: the built-in index only for tasks read from the hub
        manager = TaskManager(include_path=str(folder), include_defaults=len(local) < len(standard))
    labels = {f"{name}_local": name for name in local}
    names = [c["task"] for c in configs] + [f"{name}_local" if name in local else name for name in standard]
    skills = [c["task"] for c in configs if c["output_type"] == "generate_until"]
    return Tasks(names, labels, skills, manager)


def evaluate(settings: EvalSettings, model_dir: Path, tasks: Tasks) -> dict[str, Any]:
    """lm-eval's output on the model: results, task configurations and per-item samples."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device, dtype = resolve_device_and_dtype(settings)
    log.info("evaluating %s on %s (%s, %s)", model_dir, ", ".join(tasks.names), device, dtype)
    model = HFLM(
        pretrained=str(model_dir),
        device=device,
        dtype=dtype,
        batch_size=settings.batch_size,
        add_bos_token=True,  # every training sequence started with BOS
    )
    return lm_eval.simple_evaluate(
        model=model,
        tasks=tasks.names,
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        log_samples=True,
        apply_chat_template=settings.apply_chat_template,
        task_manager=tasks.manager,
        random_seed=settings.seed,
        numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed,
        fewshot_random_seed=settings.seed,
    )


def write_raw_outputs(output: dict[str, Any], tasks: Tasks, folder: Path) -> dict[str, list[int]]:
    """Write results.json (less the samples and VOLATILE_RESULTS, which leave `output`),
    samples.jsonl and items.json to `folder`; return the pooled all_skills items."""
    samples = output.pop("samples", {})
    for key in VOLATILE_RESULTS:
        output.pop(key, None)
    (folder / "results.json").write_text(json.dumps(output, indent=2, default=str, sort_keys=True))
    with open(folder / "samples.jsonl", "w") as handle:
        for task, rows in sorted(samples.items()):
            for row in rows:
                handle.write(json.dumps({"task": task, **row}, default=str) + "\n")
    items = item_outcomes(samples, tasks.labels)
    pooled = pooled_skill_items(items, tasks.skills)
    (folder / "items.json").write_text(items_json({**items, **pooled}))
    return pooled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, help="this stage's name in dvc.yaml (e.g. eval@pretrain)")
    parser.add_argument("--name", required=True, help="the model's id, <kind>/<name> (e.g. expert/addition)")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model folder to evaluate")
    parser.add_argument("--eval-sets", type=Path, required=True, help="folder of the embedded eval sets")
    parser.add_argument("--corpus", type=Path, required=True, help="corpus folder (test.jsonl: held-out text)")
    parser.add_argument("--raw", type=Path, required=True, help="output folder: raw results, samples, "
                        "items.json, lineage.json")  # fmt: skip
    parser.add_argument("--metrics", type=Path, required=True, help="stable metrics JSON (a DVC metric)")
    args = parser.parse_args(argv)
    params = start(args.stage)
    configure_environment(hub_access=any(t not in EMBEDDED_TASKS and t not in params.eval.task_data
                                         for t in params.eval.tasks))  # fmt: skip
    metrics = run(params.eval, args.model, args.eval_sets, args.corpus, args.raw, model_id=args.name)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
