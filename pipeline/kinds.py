"""The kinds of model the pipeline makes, in report order: one entry each, the one place that says
which dvc.yaml stages make and evaluate a kind, which params.yaml collection names its models and
what the report shows of it. A model's id is `<kind>/<name>`; its scores are in
metrics/eval/<kind>/<name>.json.

Read by the report and the check stage only (a change here reruns those two); tests/test_graph.py
holds dvc.yaml to it. Adding a kind: docs/design/contributing.md.
"""

from __future__ import annotations

from typing import NamedTuple


class Kind(NamedTuple):
    name: str  # the id's prefix: metrics/eval/<name>/, metrics/eval_raw/<name>/
    stage: str | None  # the dvc.yaml entry making one model per entry of `section` (None: base models)
    eval_stage: str  # the dvc.yaml entry evaluating each (`--name <kind>/<entry>`)
    section: str | None  # the params.yaml collection of its models (None: dvc.yaml's vars base_models)
    runs_metrics: str | None = None  # an optional run's own measurements: metrics/runs/<this>/<entry>.json
    title: str = ""  # the report's heading for those measurements
    trains: bool = False  # an optional run with training curves in metrics/runs/<runs_metrics>/<entry>/
    dataset_files: tuple[str, ...] = ()  # an entry's settings naming a data file the check stage reads up front
    # made again per seed of seeds.replicas by `<stage>_seed@<entry>-<seed>`, evaluated by `<eval_stage>_seed@...`
    replicated: bool = False


KINDS = (
    Kind("base", None, "eval", None),
    Kind("expert", "finetune", "eval_expert", "finetune.experts", dataset_files=("dataset",), replicated=True),
    Kind("merge", "merge", "eval_merge", "merge.recipes", replicated=True),
    # optional: merge_search.runs is empty by default
    Kind("search", "merge_search", "eval_search", "merge_search.runs", "merge_search", "Merge search"),
    Kind("moe", "moe", "eval_moe", "moe.variants", replicated=True),
    Kind("dense", "dense", "eval_dense", "mixture.dense_runs", replicated=True),
    Kind("moe_trained", "moe_finetune", "eval_moe_trained", "mixture.moe_runs", replicated=True),
    # the optional runs after SFT come last: the default experiment makes none of them
    Kind(
        "adapter",
        "adapter",
        "eval_adapter",
        "adapters.runs",
        runs_metrics="adapters",
        title="Adapters (LoRA, LoHa, LoKr)",
        trains=True,
        dataset_files=("dataset",),
    ),
    Kind(
        "qat",
        "qat",
        "eval_qat",
        "qat.runs",
        runs_metrics="qat",
        title="Quantization-aware training",
        trains=True,
        dataset_files=("dataset",),
    ),
    Kind(
        "dpo",
        "dpo",
        "eval_dpo",
        "dpo.runs",
        runs_metrics="dpo",
        title="Preference tuning (DPO)",
        trains=True,
        dataset_files=("dataset", "eval_dataset"),
    ),
    Kind("quantized", "quantize", "eval_quantized", "quantize.runs", "quantize", "Post-training quantization"),
)
MODEL_KINDS = tuple(kind.name for kind in KINDS)

# Optional runs that make files other than a model (not evaluated by lm-eval): their measurements
# get a report section too. Run name -> (its params.yaml collection, the report's heading).
EXPORTS = {"gguf": ("gguf.runs", "GGUF export, checked in llama.cpp")}


def run_sections() -> dict[str, str]:
    """metrics/runs/<section>/ -> the report's heading, in report order."""
    sections = {kind.runs_metrics: kind.title for kind in KINDS if kind.runs_metrics}
    return {**sections, **{name: title for name, (_, title) in EXPORTS.items()}}
