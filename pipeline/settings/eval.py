"""The `eval` section: lm-evaluation-harness on every model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from pipeline.settings.base import (
    TASK_DATA_SUFFIXES,
    PathSetting,
    Section,
    TaskDataFile,
)

EMBEDDED_TASKS = ("skills", "stories", "perplexity")


class EvalSettings(Section):
    """`eval` stage: lm-evaluation-harness on every model (python -m stages.eval)."""

    tasks: list[str] = Field(
        default_factory=lambda: list(EMBEDDED_TASKS),
        min_length=1,
        description="Embedded tasks: skills (exact answer + multiple choice per skill in data/eval), "
        "stories (story completion), perplexity (held-out corpus text). Any other name is an "
        "lm-eval task (hellaswag, arc_easy, gsm8k, ...): it needs its data from the hub, or "
        "from `task_data`.",
    )
    task_data: dict[str, dict[str, TaskDataFile]] = Field(
        default_factory=dict,
        description="Local data for standard lm-eval tasks, offline: task name -> {split: file}, "
        "e.g. {arc_easy: {test: data/local/arc_easy.jsonl}} (.jsonl, .json or .parquet with the task's columns: "
        "a hub dataset's own parquet files, fetched by a `hub` entry, fit).",
    )
    num_fewshot: int = Field(0, ge=0, le=128, description="Examples shown before each question.")
    batch_size: int = Field(64, ge=1, le=8_192, description="Requests per forward pass.")
    limit: int | None = Field(
        None, ge=1, le=1_000_000, description="Evaluate only the first N items of each task (quick runs)."
    )
    max_gen_tokens: int = Field(16, ge=1, le=32_768, description="Longest answer generated for exact-answer tasks.")
    apply_chat_template: bool = Field(
        False,
        description="true: lm-eval renders every prompt with the model's chat template (instruct models such as "
        "Phi-3). false: the embedded tasks write the question the way the model's own template wraps a user "
        "message (the default template: `Q: ...\\nA:\\n`), exactly what SFT trained on.",
    )
    device: str = Field("auto", description="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, float32 on CPU."
    )
    seed: int = Field(0, description="Seed of lm-eval's sampling and few-shot selection.")

    def paths(self, root: Path) -> dict[str, PathSetting]:
        return {
            f"task_data.{task}.{split}": PathSetting(path, TASK_DATA_SUFFIXES)
            for task, splits in self.task_data.items()
            for split, path in splits.items()
        }

    @model_validator(mode="after")
    def _task_data_names_a_task(self) -> EvalSettings:
        for name in self.task_data:
            if name not in self.tasks:
                raise ValueError(f"task_data names {name!r}, which is not in tasks {self.tasks}")
            if name in EMBEDDED_TASKS:
                raise ValueError(f"task_data cannot override the embedded task {name!r}")
            if len({Path(path).suffix == ".parquet" for path in self.task_data[name].values()}) > 1:
                raise ValueError(f"task_data.{name}: give every split in one format (json/jsonl or parquet)")
        return self


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = EvalSettings
