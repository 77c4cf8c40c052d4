"""The data stage: deterministic, right-sized, correct answers, real-data sources."""

from __future__ import annotations

import filecmp
import json
import random
import re
from pathlib import Path

import pytest

from pipeline.settings.data import CorpusSettings, DataSettings, SkillSettings, WorldSettings
from stages import data
from tests.conftest import TINY_DATA


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def output_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def run_into(root: Path, settings: DataSettings) -> dict:
    return data.run(settings, root / "corpus", root / "sft", root / "eval", root / "validation")


def test_same_seed_gives_byte_identical_files(tiny_data, tmp_path):
    run_into(tmp_path, TINY_DATA)
    files = output_files(tiny_data)
    assert files == output_files(tmp_path)
    assert len(files) == 3 + 4 + 5 + 4
    match, mismatch, errors = filecmp.cmpfiles(tiny_data, tmp_path, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors


def test_other_seed_gives_other_data(tiny_data, tmp_path):
    run_into(tmp_path, TINY_DATA.model_copy(update={"seed": 1}))
    assert (tmp_path / "corpus/train.jsonl").read_bytes() != (tiny_data / "corpus/train.jsonl").read_bytes()
    assert (tmp_path / "sft/addition.jsonl").read_bytes() != (tiny_data / "sft/addition.jsonl").read_bytes()


def test_sizes_follow_settings(tiny_data):
    sizes = sum((tiny_data / "corpus" / f"{split}.jsonl").stat().st_size for split in ("train", "val", "test"))
    # JSON quoting adds a few percent over the raw text the setting measures.
    assert 0.3e6 <= sizes <= 0.3e6 * 1.1
    docs = {split: read_jsonl(tiny_data / "corpus" / f"{split}.jsonl") for split in ("train", "val", "test")}
    total = sum(len(d) for d in docs.values())
    assert len(docs["val"]) == round(total * 0.02) and len(docs["test"]) == round(total * 0.02)
    for skill in TINY_DATA.skills.names:
        assert len(read_jsonl(tiny_data / "sft" / f"{skill}.jsonl")) == 300
        assert len(read_jsonl(tiny_data / "eval" / f"{skill}.jsonl")) == 60
    assert len(read_jsonl(tiny_data / "eval" / "stories.jsonl")) == 40


def correct_answer(skill: str, question: str) -> str:
    """Recompute the answer from the question text alone."""
    numbers = [int(x) for x in re.findall(r"\d+", question)]
    if skill == "addition":
        assert re.fullmatch(r"What is \d{2} plus \d\?", question)
        return str(numbers[0] + numbers[1])
    if skill == "sorting":
        assert 3 <= len(numbers) <= 5 and all(0 <= n <= 9 for n in numbers)
        return " ".join(map(str, sorted(numbers)))
    if skill == "comparison":
        assert numbers[0] != numbers[1]
        return str(max(numbers))
    words = question.removeprefix("How many words are in: ").removesuffix("?").split()
    assert 2 <= len(words) <= 8
    return str(len(words))


@pytest.mark.parametrize("skill", ["addition", "sorting", "comparison", "counting"])
def test_answers_are_correct_and_eval_and_validation_are_held_out(tiny_data, skill):
    sft = read_jsonl(tiny_data / "sft" / f"{skill}.jsonl")
    for row in sft:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == correct_answer(skill, user["content"])
    evals = read_jsonl(tiny_data / "eval" / f"{skill}.jsonl")
    questions = [row["question"] for row in evals]
    assert len(set(questions)) == len(questions)
    assert not set(questions) & {row["messages"][0]["content"] for row in sft}
    validation = read_jsonl(tiny_data / "validation" / f"{skill}.jsonl")
    validation_questions = [row["question"] for row in validation]
    assert len(set(validation_questions)) == len(validation_questions) == TINY_DATA.skills.validation_examples
    assert not set(validation_questions) & set(questions)  # merge searches never score on an eval item
    for row in evals + validation:
        assert row["answer"] == correct_answer(skill, row["question"])
        assert len(row["choices"]) == len(set(row["choices"])) == TINY_DATA.skills.choices
        assert row["choices"][row["label"]] == row["answer"]


def test_story_endings_fit_the_need(tiny_data):
    rows = read_jsonl(tiny_data / "eval" / "stories.jsonl")
    labels = set()
    for row in rows:
        need = re.search(r" was (\w+)\. So (?:he|she)$", row["context"]).group(1)
        assert row["endings"][row["label"]] == f" {data.STORY_NEEDS[need]}."
        assert len(set(row["endings"])) == TINY_DATA.skills.choices
        labels.add(row["label"])
    assert labels == set(range(TINY_DATA.skills.choices))  # the right ending is not always first


def test_corpus_states_capitals_consistently(tiny_data):
    text = " ".join(row["text"] for row in read_jsonl(tiny_data / "corpus" / "train.jsonl"))
    capitals = {}
    for country, capital in re.findall(r"The capital of (\w+) is (\w+)\.", text):
        assert capitals.setdefault(country, capital) == capital
    assert len(capitals) == TINY_DATA.world.countries


def test_running_out_of_distinct_questions_is_a_clear_error(monkeypatch):
    # Every real skill has hundreds of distinct questions; fake one that has three.
    monkeypatch.setitem(data.SKILL_GENERATORS, "addition", lambda rng, n: (f"Q{rng.randint(1, 3)}", "1", ["2"] * n))
    settings = SkillSettings(names=["addition"], eval_examples=5, train_examples=1, choices=2)
    with pytest.raises(ValueError, match="data.skills.eval_examples=5 is more distinct addition questions"):
        data.skill_datasets("addition", settings, random.Random(0))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_corpus_files(tmp_path, suffix):
    documents = [f"Document number {i} talks about topic {i % 7}." for i in range(60)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(documents) + "\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"body": d}) + "\n" for d in documents))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": documents}), path)
    field = "text" if suffix == ".txt" else "body"
    settings = DataSettings(
        corpus=CorpusSettings(source="local", path=str(path), text_field=field, max_documents=50),
        val_fraction=0.1,
        test_fraction=0.1,
        skills=SkillSettings(names=["sorting"], train_examples=5, eval_examples=5),
        story_eval_examples=5,
    )
    summary = run_into(tmp_path / "out", settings)
    assert summary["corpus/train_documents"] == 40
    assert (summary["corpus/val_documents"], summary["corpus/test_documents"]) == (5, 5)
    written = [
        row["text"].strip()
        for split in ("train", "val", "test")
        for row in read_jsonl(tmp_path / "out" / "corpus" / f"{split}.jsonl")
    ]
    assert sorted(written) == sorted(documents[:50])


def test_missing_text_field_names_setting_and_columns(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"body": "a"}\n{"body": "b"}\n')
    corpus = CorpusSettings(source="local", path=str(path), text_field="text")
    with pytest.raises(ValueError, match=r"data.corpus.text_field='text'.*columns: body"):
        data.load_documents(corpus)


def test_failed_run_keeps_previous_output(tiny_data, tmp_path, monkeypatch):
    """A stage that dies midway leaves the earlier outputs as they were, and no half-written folder."""
    run_into(tmp_path, TINY_DATA)
    before = (tmp_path / "sft" / "addition.jsonl").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(data, "story_eval", broken)
    with pytest.raises(RuntimeError):
        run_into(tmp_path, TINY_DATA.model_copy(update={"seed": 5}))
    assert (tmp_path / "sft" / "addition.jsonl").read_bytes() != before  # sft was finished and replaced
    assert output_files(tmp_path / "eval") == output_files(tiny_data / "eval")  # eval kept its old files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_world_size_setting(tmp_path):
    settings = TINY_DATA.model_copy(update={"world": WorldSettings(corpus_megabytes=0.05, countries=5)})
    run_into(tmp_path, settings)
    text = (tmp_path / "corpus" / "train.jsonl").read_text()
    assert len(set(re.findall(r"The capital of (\w+) is", text))) == 5
