"""The embedded eval sets (data/eval, data/corpus/test.jsonl): their fields, their skills, the check
of each file, and the prompt a skill question is asked in (the chat template around it).

The eval stage (stages/eval.py) scores them with lm-eval; the gguf stage (stages/gguf.py) asks the
same questions in the same prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.records import json_records, open_parquet
from pipeline.settings.base import InputError
from pipeline.settings.tokenize import DEFAULT_CHAT_TEMPLATE

# The fields each embedded task reads from every row of its eval set (the data stage writes them).
SKILL_FIELDS = ("question", "answer", "choices", "label")
STORY_FIELDS = ("context", "endings", "label")
TEXT_FIELDS = ("text",)

# Stands for the question while the chat template renders a prompt, which is then split around it.
QUESTION_MARKER = "QUESTION_MARKER"


def chat_prompt_around_question(tokenizer: Any) -> tuple[str, str]:
    """The text the tokenizer's chat template writes before and after a user's question, up to
    where the answer starts; a tokenizer without a template (a hub base model) gets the project's
    default. The leading BOS is left out: lm-eval adds it as a token (add_bos_token)."""
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    question = [{"role": "user", "content": QUESTION_MARKER}]
    text = tokenizer.apply_chat_template(question, chat_template=template, tokenize=False, add_generation_prompt=True)
    if tokenizer.bos_token:
        text = text.removeprefix(tokenizer.bos_token)
    prefix, marker, suffix = text.partition(QUESTION_MARKER)
    if not marker:
        raise InputError(
            f"the chat template of {tokenizer.name_or_path} does not write the user's message; "
            "set eval.apply_chat_template or give the tokenizer a template that does"
        )
    return prefix, suffix


def skill_names(eval_dir: Path) -> list[str]:
    skills = sorted(p.stem for p in eval_dir.glob("*.jsonl") if p.stem != "stories")
    if not skills:
        raise InputError(f"eval.tasks has 'skills' but {eval_dir} holds no <skill>.jsonl eval sets")
    return skills


def check_eval_set(path: Path, fields: tuple[str, ...]) -> None:
    """Raise InputError unless `path` is a UTF-8 JSON Lines file of at least one object, each with `fields`
    (or a parquet file of task data with at least one row).

    lm-eval fails on an empty set with an UnboundLocalError, on a bad one with a byte offset."""
    if not path.is_file():
        state = "a folder" if path.is_dir() else "missing"
        raise InputError(f"eval set {path} is {state}; it must be a {path.suffix or '.jsonl'} file "
                         "(rerun the stage that makes it)")  # fmt: skip
    if path.suffix == ".parquet":  # task data: its columns are the task's business; the rows, from the footer
        if not open_parquet(path).metadata.num_rows:
            raise InputError(f"eval set {path} has no rows")
        return
    valid = "one JSON object per line" + (f", each with {', '.join(fields)}" if fields else "")
    rows = 0
    for where, row in json_records(path):
        if not isinstance(row, dict):
            raise InputError(f"eval set {path} {where} is not a JSON object; write {valid}")
        if missing := [field for field in fields if field not in row]:
            raise InputError(f"eval set {path} {where} lacks {missing}; write {valid}")
        rows += 1
    if not rows:
        raise InputError(f"eval set {path} has no rows; write {valid}")
