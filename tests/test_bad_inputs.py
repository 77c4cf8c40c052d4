"""Bad input files: each stage stops with one InputError line naming the file and row (or falls
back, for a damaged pretraining checkpoint), and leaves the outputs already there byte for byte."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import sft
from pipeline.lineage import write_lineage
from pipeline.roster import roster_of, write_roster
from pipeline.settings.base import PROJECT_ROOT, InputError
from pipeline.settings.data import CorpusSettings, DataSettings, SkillSettings
from pipeline.settings.eval import EvalSettings
from pipeline.settings.merge import MergeRecipe
from pipeline.settings.params_file import load_params
from pipeline.settings.sft import SFTSettings
from stages import data, merge, pretrain
from stages import eval as evaluation
from tests.conftest import TINY_PRETRAIN, outputs_in

CHAT_ROW = b'{"messages": [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3"}]}\n'


def file_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """relative path -> sha256 of every file under root, but those in (or named) `skip`."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not set(path.relative_to(root).parts) & set(skip)
    }


def previous_outputs(*folders: Path) -> None:
    """Stand-ins for the outputs of an earlier good run, which a failed run must leave as they are."""
    for folder in folders:
        folder.mkdir(parents=True)
        (folder / "earlier.json").write_text(json.dumps({"from": folder.name}))


def write_input(path: Path, content: bytes | None) -> Path:
    """The bad input: these bytes, or a folder when content is None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.rmtree(path)
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


def assert_names(raised: pytest.ExceptionInfo, path: Path, expected: str) -> None:
    message = str(raised.value)
    assert type(raised.value) is InputError, message
    assert str(path) in message and expected in message, message
    assert "\n" not in message  # one line


# Stage processes: the message alone, one line on stderr, exit status 1 (pipeline/stage.py's hook)


def test_stage_processes_print_bad_input_as_one_error_line(tmp_path):
    evals, recipe = tmp_path / "eval", next(iter(load_params().merge.recipes))
    evals.mkdir()
    roster = tmp_path / "roster"
    write_roster(roster, roster_of(load_params()))
    select = [
        "stages.select",
        "--roster-merges",
        str(roster / "merges.json"),
        "--eval-metrics",
        str(evals),
        "--out",
        str(tmp_path / "select.json"),
    ]
    report = ["stages.report", "--eval-metrics", str(evals), "--eval-raw", str(tmp_path / "raw"),
              "--out", str(tmp_path / "report"), "--headline", str(tmp_path / "headline.json")]  # fmt: skip
    for command, expected in (
        (select, f"error: {evals / recipe}.json is missing: run eval_merge@{recipe} first"),
        (report, f"error: no eval metrics in {evals}: run the eval stages first"),
    ):
        result = subprocess.run([sys.executable, "-m", *command], cwd=PROJECT_ROOT, capture_output=True, text=True)
        assert (result.returncode, result.stderr.splitlines()[-1]) == (1, expected), result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval", "roster"]  # neither stage wrote an output


# SFT datasets (pipeline/sft.py, behind finetune, dense and the MoE runs)

SFT_CASES = {
    "empty": (b"", "has no rows"),
    "not_utf8": (CHAT_ROW + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n', "line 2: byte 0xe9"),
    "bad_json_row": (CHAT_ROW * 2 + b'{"messages": [\n', "line 3 is not valid JSON"),
    "no_messages_field": (CHAT_ROW + b"\n" + b'{"text": "no chat here"}\n', "line 3 has no `messages` list"),
    "message_without_content": (b'{"messages": [{"role": "user"}]}\n', "line 1: a message lacks a `role` or `content`"),
    "folder": (None, "is a folder"),
}


@pytest.mark.parametrize("case", SFT_CASES)
def test_bad_sft_dataset_stops_finetune_before_training(case, tiny_pretrained, tmp_path):
    content, expected = SFT_CASES[case]
    dataset = write_input(tmp_path / "chat.jsonl", content)
    previous_outputs(tmp_path / "out", tmp_path / "live")
    before = file_hashes(tmp_path)
    target = sft.Target("expert", "addition", "finetune@addition", "finetune.experts.addition", tmp_path / "out",
                        tmp_path / "work", tmp_path / "live")  # fmt: skip
    with pytest.raises(InputError) as raised:
        sft.run(SFTSettings(max_steps=1), str(tiny_pretrained[1] / "model"), dataset, target)
    assert_names(raised, dataset, expected)
    assert file_hashes(tmp_path) == before and not (tmp_path / "work").exists()


def test_the_sft_check_passes_the_data_stages_own_datasets(tiny_data):
    for path in sorted((tiny_data / "sft").glob("*.jsonl")):
        sft.check_sft_dataset(path)


# Eval sets (stages/eval.py)

EVAL_CASES = {
    "empty_skill": ("addition.jsonl", b"", "has no rows"),
    "missing_stories": ("stories.jsonl", "missing", "is missing"),
    "not_utf8": (
        "counting.jsonl",
        b'{"question": "x", "answer": "1", "choices": ["1"], "label": 0}\n\xff\n',
        "line 2: byte 0xff",
    ),  # fmt: skip
    "bad_json_row": ("sorting.jsonl", b'{"question": "Sort 2 1.", "answer": "1 2",\n', "line 1 is not valid JSON"),
    "missing_field": (
        "comparison.jsonl",
        b'{"question": "Which is larger, 1 or 2?", "choices": ["2"], "label": 0}\n',
        "line 1 lacks ['answer']",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", EVAL_CASES)
def test_bad_eval_set_stops_the_eval_before_lm_eval(case, tiny_pretrained, tiny_data, tmp_path):
    name, content, expected = EVAL_CASES[case]
    eval_dir = tmp_path / "eval"
    shutil.copytree(tiny_data / "eval", eval_dir)
    if content == "missing":
        (eval_dir / name).unlink()
    else:
        write_input(eval_dir / name, content)
    previous_outputs(tmp_path / "raw")
    before = file_hashes(tmp_path / "raw")
    with pytest.raises(InputError) as raised:
        evaluation.run(EvalSettings(limit=2), tiny_pretrained[1] / "model", eval_dir, tiny_data / "corpus",
                       tmp_path / "raw", model_id="base/pretrain")  # fmt: skip
    assert_names(raised, eval_dir / name, expected)
    assert file_hashes(tmp_path / "raw") == before


# Merge inputs (stages/merge.py)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble_header_length(path: Path) -> None:
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])


MERGE_CASES = {
    "truncated_expert": ("addition", truncate, "dvc repro -f finetune@addition"),
    "corrupt_expert_header": ("sorting", scramble_header_length, "dvc repro -f finetune@sorting"),
    "truncated_base_model": ("base", truncate, "dvc repro -f pretrain"),
}


@pytest.mark.parametrize("case", MERGE_CASES)
def test_damaged_model_file_stops_the_merge_naming_it(case, tiny_pretrained, tmp_path):
    damaged, damage, expected = MERGE_CASES[case]
    folders = {"base": tmp_path / "base"}
    shutil.copytree(tiny_pretrained[1] / "model", folders["base"])
    for name in ("addition", "sorting"):
        folders[name] = tmp_path / "experts" / name
        shutil.copytree(folders["base"], folders[name])
        write_lineage(folders[name], "expert", name, f"finetune@{name}", ["base/pretrain"], {})
    damage(folders[damaged] / "model.safetensors")
    previous_outputs(tmp_path / "merged")
    before = file_hashes(tmp_path)
    recipe = MergeRecipe(method="task_arithmetic", parameters={"weight": 0.5})
    experts = {name: str(folders[name]) for name in ("addition", "sorting")}
    with pytest.raises(InputError) as raised:
        merge.run("test", recipe, experts, str(folders["base"]), "float32", 0, tmp_path / "merged")
    assert_names(raised, folders[damaged] / "model.safetensors", "is truncated or corrupt")
    assert expected in str(raised.value)
    assert file_hashes(tmp_path) == before


def test_whole_safetensors_files_pass_the_merge_check(tiny_pretrained):
    assert merge.safetensors_problem(tiny_pretrained[1] / "model" / "model.safetensors") is None


# A local corpus (stages/data.py)

CORPUS_CASES = {
    "empty_jsonl": ("corpus.jsonl", b"", "has no rows"),
    "blank_txt": ("corpus.txt", b"\n\n  \n", "has no rows"),
    "not_utf8_txt": ("corpus.txt", b"A good paragraph.\n\nA bad \xc3( one.\n", "line 3: byte 0xc3"),
    "bad_json_row": ("corpus.jsonl", b'{"text": "fine"}\n{"text": "cut\n', "line 2 is not valid JSON"),
    "missing_text_field": (
        "corpus.jsonl",
        b'{"text": "fine"}\n{"body": "elsewhere"}\n',
        "line 2 has no data.corpus.text_field='text' field; columns: body",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", CORPUS_CASES)
def test_bad_local_corpus_stops_the_data_stage(case, tmp_path):
    name, content, expected = CORPUS_CASES[case]
    path = write_input(tmp_path / "local" / name, content)
    settings = DataSettings(
        corpus=CorpusSettings(source="local", path=str(path)),
        skills=SkillSettings(names=["sorting"], train_examples=5, eval_examples=5),
        story_eval_examples=5,
    )
    out = tmp_path / "out"
    previous_outputs(out / "corpus", out / "sft", out / "eval")
    before = file_hashes(out)
    with pytest.raises(InputError) as raised:
        data.run(settings, out / "corpus", out / "sft", out / "eval", out / "validation")
    assert_names(raised, path, expected)
    assert file_hashes(out) == before


# Pretraining checkpoints (stages/pretrain.py)

SHORT = TINY_PRETRAIN.model_copy(
    update={"max_steps": 20, "checkpoint_interval": 10, "eval_interval": 10, "keep_checkpoints": 2}
)
TIMING = ("timing.json",)  # throughput: differs on every run, by design
# The curves are written as training goes, as dvclive does (DVC removes them before it reruns the
# stage anyway): a stopped run leaves its own.
CURVES = ("live",)
# A resumed run pickles the same trainer state into other bytes (its loaded strings are no longer
# shared objects, which pickle would write once): compared by content instead.
STATES = ("trainer_state.pt",)


@pytest.fixture(scope="module")
def short_run(tiny_tokenized, tmp_path_factory) -> Path:
    """Outputs of a finished 20-step run: checkpoints at steps 10 and 20."""
    root = tmp_path_factory.mktemp("short_run")
    pretrain.run(SHORT, tiny_tokenized[1], tiny_tokenized[0], outputs_in(root))
    return root


def same_content(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_content(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_content, a, b))
    return a == b


def assert_same_states(root: Path, reference: Path) -> None:
    for state in sorted(reference.glob("checkpoints/*/trainer_state.pt")):
        ours = root / state.relative_to(reference)
        assert same_content(torch.load(ours, weights_only=True), torch.load(state, weights_only=True)), ours


def rerun(root: Path, tiny_tokenized, settings=SHORT) -> dict:
    return pretrain.run(settings, tiny_tokenized[1], tiny_tokenized[0], outputs_in(root))


NEWEST = "checkpoints/step-000020"
OLDER = "checkpoints/step-000010"


class RunsCode:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def tamper(root: Path) -> None:
    """Replace the newest trainer state by a pickle that creates root/../code_ran (kept as tampered.pt)."""
    path = root / NEWEST / "trainer_state.pt"
    torch.save({"step": 20, "history": RunsCode(root.parent / "code_ran")}, path)
    shutil.copy(path, root.parent / "tampered.pt")


CHECKPOINT_CASES = {  # damage done -> the checkpoints warned about, the one resumed (None: afresh)
    "truncated_newest_weights": (lambda root: truncate(root / NEWEST / "model.safetensors"), [NEWEST], OLDER),
    "truncated_newest_state": (lambda root: truncate(root / NEWEST / "trainer_state.pt"), [NEWEST], OLDER),
    "tampered_newest_state": (tamper, [NEWEST], OLDER),
    "all_truncated": (
        lambda root: [truncate(root / step / "model.safetensors") for step in (NEWEST, OLDER)],
        [NEWEST, OLDER],
        None,
    ),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_damaged_checkpoint_falls_back_to_the_one_before(case, short_run, tiny_tokenized, tmp_path, caplog):
    damage, warned, resumed = CHECKPOINT_CASES[case]
    root = tmp_path / "run"
    shutil.copytree(short_run, root)
    before = file_hashes(root, skip=TIMING + STATES)
    damage(root)
    caplog.set_level(logging.INFO, logger="stages.pretrain")
    rerun(root, tiny_tokenized)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for step in warned:
        assert any(str(root / step) in message and "unreadable" in message for message in warnings), warnings
    resumes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming from")]
    assert resumes == ([f"resuming from {root / resumed}"] if resumed else [])
    if not resumed:
        assert any("starting afresh" in message for message in warnings), warnings
    # the same settings give the same outputs, the damaged checkpoint included (written anew)
    assert file_hashes(root, skip=TIMING + STATES) == before
    assert_same_states(root, short_run)
    if case == "tampered_newest_state":
        assert not (tmp_path / "code_ran").exists()  # the tampered pickle was never run...
        torch.load(tmp_path / "tampered.pt", weights_only=False)
        assert (tmp_path / "code_ran").exists()  # ...and it would have, loaded the old way


class Stopped(Exception):
    """Stands for Ctrl-C or a kill: the run ends before its first checkpoint."""


def test_changed_settings_keep_old_checkpoints_until_the_first_new_one(
    short_run, tiny_tokenized, tmp_path, monkeypatch
):
    root = tmp_path / "run"
    shutil.copytree(short_run, root)
    before = file_hashes(root, skip=TIMING + CURVES)
    assert {"checkpoints/step-000010/model.safetensors", "model/model.safetensors", "samples.md"} <= set(before)
    real_forward, calls = pretrain.forward_loss, []

    def stopped_at_step_three(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Stopped
        return real_forward(*args)

    monkeypatch.setattr(pretrain, "forward_loss", stopped_at_step_three)
    mistaken = SHORT.model_copy(update={"max_steps": 10**12})
    with pytest.raises(Stopped):
        rerun(root, tiny_tokenized, mistaken)
    assert file_hashes(root, skip=TIMING + CURVES) == before  # the good run's checkpoints and model are all there
    monkeypatch.undo()

    changed = SHORT.model_copy(update={"learning_rate": 5e-3})
    rerun(root, tiny_tokenized, changed)
    meta = json.loads((tiny_tokenized[1] / "meta.json").read_text())
    fingerprint = pretrain.settings_fingerprint(changed, meta, 1)
    kept = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert kept == ["step-000010", "step-000020"]  # the changed run's own, the old ones gone once they existed
    assert all(pretrain.checkpoint_fingerprint(root / "checkpoints" / name) == fingerprint for name in kept)
