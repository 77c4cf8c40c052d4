"""The eval stage: lm-eval on the embedded tasks, cross-checked against direct generation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.settings.base import InputError, ParamsError
from pipeline.settings.eval import EvalSettings
from pipeline.settings.params_file import load_params
from stages import eval as evaluation


@pytest.fixture(scope="module")
def evaluated(tiny_pretrained, tiny_data, tmp_path_factory):
    """(metrics, raw folder) of the eval stage on the tiny pretrained model, 12 items per task."""
    raw = tmp_path_factory.mktemp("eval") / "raw"
    model = tiny_pretrained[1] / "model"
    settings = EvalSettings(limit=12)
    metrics = evaluation.run(settings, model, tiny_data / "eval", tiny_data / "corpus", raw, model_id="base/pretrain")
    return metrics, raw


SKILLS = ["addition", "comparison", "counting", "sorting"]


def test_metrics_cover_every_embedded_task(evaluated):
    metrics, _ = evaluated
    expected = {f"{s}/exact_match" for s in SKILLS}
    expected |= {f"{s}_choice/{m}" for s in SKILLS for m in ("acc", "acc_norm")}
    expected |= {"stories/acc", "stories/acc_norm", "perplexity/word_perplexity", "perplexity/bits_per_byte"}
    expected |= {"all_skills/exact_match", "all_skills/acc"}
    assert set(metrics) == expected
    # pooled over equally many items per skill: the mean of the per-skill scores
    mean = sum(metrics[f"{s}/exact_match"] for s in SKILLS) / len(SKILLS)
    assert metrics["all_skills/exact_match"] == pytest.approx(mean, abs=1e-4)
    assert all(0 <= metrics[k] <= 1 for k in metrics if not k.startswith("perplexity/"))
    assert 1 < metrics["perplexity/word_perplexity"] < 1000 and 0 < metrics["perplexity/bits_per_byte"] < 8


def test_raw_outputs_sit_beside_the_metrics(evaluated):
    _, raw = evaluated
    results = json.loads((raw / "results.json").read_text())
    assert "addition" in results["results"] and "stories" in results["configs"]
    # no date, commit or machine description, no scratch task folder (tests/test_dvc_pipeline.py
    # checks that no output names the folder the project is in)
    assert not (raw / "tasks").exists()
    assert not {"date", "git_hash", "pretty_env_info"} & set(results)
    rows = [json.loads(line) for line in (raw / "samples.jsonl").read_text().splitlines()]
    assert {row["task"] for row in rows} >= {"addition", "stories", "perplexity"}
    # the pretrain stage wrote the model's lineage; the eval copies it next to the scores
    lineage = json.loads((raw / "lineage.json").read_text())
    assert (lineage["kind"], lineage["name"], lineage["stage"]) == ("base", "pretrain", "pretrain")


def test_items_hold_one_outcome_per_item_and_average_to_the_metrics(evaluated):
    metrics, raw = evaluated
    text = (raw / "items.json").read_text()
    items = json.loads(text)
    assert set(items) == {key for key in metrics if not key.startswith("perplexity/")}  # every binary metric
    assert len(text.splitlines()) == len(items) + 2  # one line per key
    for key, outcomes in items.items():
        assert len(outcomes) == (12 * len(SKILLS) if key.startswith("all_skills/") else 12)  # limit: 12 per task
        assert set(outcomes) <= {0, 1}
        assert sum(outcomes) / len(outcomes) == pytest.approx(metrics[key], abs=1e-4), key
    assert items["all_skills/acc"] == [x for skill in SKILLS for x in items[f"{skill}_choice/acc"]]  # pooled


def test_lineage_is_copied_from_the_model_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    lineage = {"kind": "moe_trained", "name": "full", "stage": "mixture_finetune@full", "parents": ["moe/experts"]}
    (model / "lineage.json").write_text(json.dumps(lineage))
    evaluation.copy_lineage(model, "moe_trained/full", tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_text() == (model / "lineage.json").read_text()
    with pytest.raises(InputError, match="--name is moe/full but .* names moe_trained/full"):
        evaluation.copy_lineage(model, "moe/full", tmp_path / "wrong.json")


def test_model_id_needs_a_known_kind(tiny_data, tmp_path):
    with pytest.raises(InputError, match=r"--name 'pretrain' must be <kind>/<name>, e.g. expert/addition"):
        evaluation.run(EvalSettings(), tmp_path, tiny_data / "eval", tiny_data / "corpus", tmp_path / "raw",
                       model_id="pretrain")  # fmt: skip


def test_exact_match_agrees_with_direct_greedy_generation(tiny_pretrained, tiny_data, tmp_path):
    """lm-eval's exact_match equals what plain transformers greedy decoding scores on the same items.

    The gold answers are set to the model's own greedy answer for half the questions and to an
    impossible one for the rest, so the right score is exactly 0.5 whatever the model knows.
    """
    model_dir = tiny_pretrained[1] / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    questions = [json.loads(line) for line in (tiny_data / "eval" / "addition.jsonl").read_text().splitlines()][:10]
    rows = []
    for index, item in enumerate(questions):
        question = [{"role": "user", "content": item["question"]}]
        prompt = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")  # BOS from the template
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        answer = text.split("\n")[0].strip()
        rows.append({**item, "answer": answer if index % 2 == 0 else "no such answer"})
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "addition.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = EvalSettings(tasks=["skills"], max_gen_tokens=16)
    metrics = evaluation.run(
        settings, model_dir, eval_dir, tiny_data / "corpus", tmp_path / "raw", model_id="base/pretrain"
    )
    assert metrics["addition/exact_match"] == 0.5
    items = json.loads((tmp_path / "raw" / "items.json").read_text())
    assert items["addition/exact_match"] == [1, 0] * 5  # each item's outcome, in the eval set's order


def test_standard_task_runs_offline_on_local_data(tiny_pretrained, tiny_data, tmp_path):
    """A built-in lm-eval task (arc_easy) pointed at a local file: its own prompt and metrics."""
    rows = [
        {"id": str(i), "question": f"Which number is larger, {a} or {b}?", "answerKey": "A",
         "choices": {"text": [str(max(a, b)), str(min(a, b))], "label": ["A", "B"]}}
        for i, (a, b) in enumerate([(12, 7), (40, 93), (55, 56), (81, 18)])
    ]  # fmt: skip
    path = tmp_path / "arc_local.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = EvalSettings(tasks=["arc_easy"], task_data={"arc_easy": {"test": str(path)}})
    metrics = evaluation.run(settings, tiny_pretrained[1] / "model", tiny_data / "eval", tiny_data / "corpus",
                             tmp_path / "raw", model_id="base/pretrain")  # fmt: skip
    assert set(metrics) == {"arc_easy/acc", "arc_easy/acc_norm"}
    assert "Question: Which number is larger" in (tmp_path / "raw" / "samples.jsonl").read_text()


def test_unknown_task_is_a_clear_error(tiny_pretrained, tiny_data, tmp_path):
    with pytest.raises(InputError, match=r"eval.tasks: \['hellaswagg'\] are not lm-eval tasks"):
        evaluation.run(EvalSettings(tasks=["hellaswagg"]), tiny_pretrained[1] / "model", tiny_data / "eval",
                       tiny_data / "corpus", tmp_path / "raw", model_id="base/pretrain")  # fmt: skip
    assert not (tmp_path / "raw").exists()


def test_task_data_must_name_a_listed_task(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("eval:\n  tasks: [skills]\n  task_data: {arc_easy: {test: x.jsonl}}\n")
    with pytest.raises(ParamsError, match="eval: task_data names 'arc_easy', which is not in tasks"):
        load_params(path)


# A template unlike the project's: eval must follow the template, not a format of its own.
HEADED_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Question: ' + message['content'] + '\\n' }}"
    "{% else %}{{ '### Answer: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Answer: ' }}{% endif %}"
)


def tokenizer_folder(tiny_tokenized, template, folder):
    """The tiny tokenizer with `template` as its chat template, saved as a model folder holds it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenized[0])
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.mark.parametrize(
    "template", [load_params().tokenize.chat_template, HEADED_TEMPLATE], ids=["configured", "headed"]
)
def test_prompts_lm_eval_sends_are_the_sft_rows(template, tiny_tokenized, tiny_data, tmp_path):
    """The text lm-eval scores for a skill item is the SFT row of its question and answer as the
    model's chat template renders it, less the BOS (lm-eval adds it as a token) and the EOS."""
    import lm_eval.tasks

    tokenizer = tokenizer_folder(tiny_tokenized, template, tmp_path / "model")
    row = json.loads((tiny_data / "eval" / "addition.jsonl").read_text().splitlines()[0])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "addition.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "tasks").mkdir()
    settings = EvalSettings(tasks=["skills"])
    tasks = evaluation.write_tasks(settings, tmp_path / "model", tmp_path / "eval", tmp_path, tmp_path / "tasks")
    built = lm_eval.tasks.get_task_dict(tasks.names, tasks.manager)
    for task in built.values():
        task.build_all_requests(limit=1)

    messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    sft_row = tokenizer.apply_chat_template(messages, tokenize=False)
    assert sft_row.startswith(tokenizer.bos_token) and sft_row.endswith(tokenizer.eos_token)
    trained_text = sft_row.removeprefix(tokenizer.bos_token).removesuffix(tokenizer.eos_token)
    prompt, _ = built["addition"].instances[0].arguments
    assert prompt + row["answer"] == trained_text
    context, continuation = built["addition_choice"].instances[row["label"]].arguments
    assert context + continuation == trained_text


def test_prompts_follow_the_chat_template_setting(tiny_tokenized, tmp_path):
    tokenizer_folder(tiny_tokenized, load_params().tokenize.chat_template, tmp_path / "model")
    tokenizer_folder(tiny_tokenized, None, tmp_path / "base")
    # the project's template: the prompt results.json has always held
    assert evaluation.question_prompt(EvalSettings(), tmp_path / "model") == "Q: {{question}}\nA:\n"
    # a tokenizer without a template gets the project's default one
    assert evaluation.question_prompt(EvalSettings(), tmp_path / "base") == "Q: {{question}}\nA:\n"
    # lm-eval applies the model's template itself
    assert evaluation.question_prompt(EvalSettings(apply_chat_template=True), tmp_path / "model") == "{{question}}"
