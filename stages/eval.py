"""`eval` stage: one model through EleutherAI's lm-evaluation-harness, in process.

    python -m stages.eval --model models/pretrain --eval-sets data/eval --corpus data/corpus \
        --raw metrics/eval_raw/pretrain --metrics metrics/eval/pretrain.json

dvc.yaml runs it once per model (`eval@<model>`). The embedded tasks are generated as lm-eval
task YAMLs over the local eval sets and saved in the raw folder next to lm-eval's full results
and per-item samples (those carry dates, so they are not DVC metrics). The metrics file holds
stable `task/metric` numbers only.

Tasks (settings `eval.tasks`):
- skills: per skill, `<skill>` exact answer (generate_until, exact_match after stripping
  whitespace) and `<skill>_choice` multiple choice (acc, acc_norm);
- stories: story completion, multiple choice (acc, acc_norm);
- perplexity: held-out corpus text, loglikelihood_rolling (word_perplexity, bits_per_byte);
- any other name: that lm-eval task, with its data from `eval.task_data` when given (offline).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.atomic import atomic_dir, dumps_json, write_json
from pipeline.params import EMBEDDED_TASKS, EvalSettings
from pipeline.stage import configure_environment, start

log = logging.getLogger("stages.eval")

# Metrics kept in metrics/eval/<model>.json, per output type; lm-eval reports each with a filter
# suffix (",none" or ",strip").
KEPT_METRICS = ("exact_match", "acc", "acc_norm", "word_perplexity", "bits_per_byte")
CHOICE_METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]


def question_prompt(settings: EvalSettings) -> str:
    # With a chat template the model's own template wraps the question; otherwise write the
    # default template's format (pipeline/params.py DEFAULT_CHAT_TEMPLATE) out here.
    return "{{question}}" if settings.apply_chat_template else "Q: {{question}}\nA:\n"


def local_dataset(path: Path) -> dict[str, Any]:
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
    }


def embedded_task_configs(settings: EvalSettings, eval_dir: Path, corpus_dir: Path) -> list[dict[str, Any]]:
    """lm-eval task configurations for the embedded eval sets named in settings.tasks.

    Fields are named directly ("answer", not "{{answer}}") wherever no template is needed:
    lm-eval compiles a Jinja template anew for each use, a third of a CPU eval's time.
    """
    configs: list[dict[str, Any]] = []
    if "skills" in settings.tasks:
        skills = sorted(p.stem for p in eval_dir.glob("*.jsonl") if p.stem != "stories")
        if not skills:
            raise SystemExit(f"error: eval.tasks has 'skills' but {eval_dir} holds no <skill>.jsonl eval sets")
        for skill in skills:
            data = local_dataset(eval_dir / f"{skill}.jsonl")
            configs.append(
                {
                    "task": skill,
                    **data,
                    "output_type": "generate_until",
                    "doc_to_text": question_prompt(settings),
                    "doc_to_target": "answer",
                    "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": settings.max_gen_tokens},
                    "filter_list": [
                        {"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}
                    ],
                    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
                }
            )
            configs.append(
                {
                    "task": f"{skill}_choice",
                    **data,
                    "output_type": "multiple_choice",
                    "doc_to_text": question_prompt(settings),
                    "doc_to_choice": "choices",
                    "doc_to_target": "label",
                    # the prompt already ends with the template's newline before the answer
                    "target_delimiter": " " if settings.apply_chat_template else "",
                    "metric_list": CHOICE_METRICS,
                }
            )
    if "stories" in settings.tasks:
        configs.append(
            {
                "task": "stories",
                **local_dataset(eval_dir / "stories.jsonl"),
                "output_type": "multiple_choice",
                "doc_to_text": "context",
                "doc_to_choice": "endings",
                "doc_to_target": "label",
                "target_delimiter": "",  # every ending starts with its own space
                "metric_list": CHOICE_METRICS,
            }
        )
    if "perplexity" in settings.tasks:
        configs.append(
            {
                "task": "perplexity",
                **local_dataset(corpus_dir / "test.jsonl"),
                "output_type": "loglikelihood_rolling",
                "doc_to_text": "",
                "doc_to_target": "text",
                "metric_list": [
                    {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                    {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                    {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
                ],
            }
        )
    return configs


def standard_task_override(name: str, data_files: dict[str, str], builtin_yaml: str) -> dict[str, Any]:
    """A task that includes lm-eval's own YAML for `name` but reads local files (works offline)."""
    splits = sorted(data_files)
    override: dict[str, Any] = {
        "include": builtin_yaml,
        "task": f"{name}_local",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(Path(path).resolve()) for split, path in data_files.items()}},
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
    import torch

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
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


def skill_means(metrics: dict[str, float], skills: list[str]) -> dict[str, float]:
    """all_skills/<metric>: the mean over the embedded skills, one number to rank models by."""
    means = {}
    for metric, key in (("exact_match", "{}/exact_match"), ("acc", "{}_choice/acc")):
        values = [metrics[key.format(skill)] for skill in skills if key.format(skill) in metrics]
        if values and len(values) == len(skills):
            means[f"all_skills/{metric}"] = round(sum(values) / len(values), 4)
    return means


def run(settings: EvalSettings, model_dir: Path, eval_dir: Path, corpus_dir: Path, raw_dir: Path) -> dict[str, float]:
    """Evaluate the model; write task YAMLs, raw results and samples to raw_dir; return metrics."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with atomic_dir(raw_dir) as tmp:
        tasks_dir = tmp / "tasks"
        tasks_dir.mkdir()
        configs = embedded_task_configs(settings, eval_dir, corpus_dir)
        write_task_files(configs, tasks_dir)
        task_names = [c["task"] for c in configs]
        labels: dict[str, str] = {}
        standard = [name for name in settings.tasks if name not in EMBEDDED_TASKS]
        # Indexing lm-eval's ~14,000 built-in task YAMLs costs ~6 s per process: only when asked for.
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=bool(standard))
        unknown = [name for name in standard if name not in manager.all_tasks]
        if unknown:
            raise SystemExit(f"error: eval.tasks: {unknown} are not lm-eval tasks (see `lm-eval ls tasks`)")
        overrides = []
        for name in standard:
            if name in settings.task_data:
                builtin = manager.task_index[name]["yaml_path"]
                overrides.append(standard_task_override(name, settings.task_data[name], builtin))
                labels[f"{name}_local"] = name
                task_names.append(f"{name}_local")
            else:
                task_names.append(name)
        if overrides:
            write_task_files(overrides, tasks_dir)
            manager = TaskManager(include_path=str(tasks_dir))

        device, dtype = resolve_device_and_dtype(settings)
        log.info("evaluating %s on %s (%s, %s)", model_dir, ", ".join(task_names), device, dtype)
        model = HFLM(
            pretrained=str(model_dir),
            device=device,
            dtype=dtype,
            batch_size=settings.batch_size,
            add_bos_token=True,  # every training sequence started with BOS
        )
        output = lm_eval.simple_evaluate(
            model=model,
            tasks=task_names,
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            log_samples=True,
            apply_chat_template=settings.apply_chat_template,
            task_manager=manager,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
        samples = output.pop("samples", {})
        (tmp / "results.json").write_text(json.dumps(output, indent=2, default=str, sort_keys=True))
        with open(tmp / "samples.jsonl", "w") as handle:
            for task, rows in sorted(samples.items()):
                for row in rows:
                    handle.write(json.dumps({"task": task, **row}, default=str) + "\n")
    metrics = stable_metrics(output["results"], labels)
    skills = [c["task"] for c in configs if c["output_type"] == "generate_until"]
    metrics.update(skill_means(metrics, skills))
    log.info("metrics: %s", dumps_json(metrics))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, help="this stage's name in dvc.yaml (e.g. eval@pretrain)")
    parser.add_argument("--name", required=True, help="the model's name in the metrics and the report")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model folder to evaluate")
    parser.add_argument("--eval-sets", type=Path, required=True, help="folder of the embedded eval sets")
    parser.add_argument("--corpus", type=Path, required=True, help="corpus folder (test.jsonl: held-out text)")
    parser.add_argument("--raw", type=Path, required=True, help="output folder: task YAMLs, raw results, samples")
    parser.add_argument("--metrics", type=Path, required=True, help="stable metrics JSON (a DVC metric)")
    args = parser.parse_args(argv)
    params = start(args.stage)
    configure_environment(hub_access=any(t not in EMBEDDED_TASKS and t not in params.eval.task_data
                                         for t in params.eval.tasks))  # fmt: skip
    write_json(args.metrics, run(params.eval, args.model, args.eval_sets, args.corpus, args.raw))


if __name__ == "__main__":
    main()
