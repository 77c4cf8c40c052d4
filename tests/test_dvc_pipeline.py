"""End to end through DVC, as a user runs it: a clone of the project, `dvc repro`, then changes.

The project is copied the way `git clone` would see it (tracked and untracked-but-not-ignored
files) into a fresh git repository, with the data shrunk so the whole test takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import dvc_lock
from pipeline.stage import stage_name
from tests.project import BIN, TINY_PRETRAINING, commit_all, copy_project, dvc, set_params, sh, stages_run

pytestmark = pytest.mark.slow  # the whole pipeline, several times over: minutes

EXPERTS = ["finetune@addition", "finetune@counting", "eval_expert@addition", "eval_expert@counting"]
MERGES = ["merge@linear", "merge@ties", "eval_merge@linear", "eval_merge@ties", "select"]
MOE = ["moe@merges", "eval_moe@merges", "moe_finetune@router", "eval_moe_trained@router"]
DENSE = ["mixture", "dense@multitask", "eval_dense@multitask"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_project(tmp_path_factory.mktemp("clone") / "project")
    # the committed dvc.lock belongs to the default settings; DVC would keep its entries for the
    # stages these settings do not make, so the shrunk project starts without it
    (root / "dvc.lock").unlink()
    set_params(
        root,
        **TINY_PRETRAINING,
        finetune__defaults__max_steps=5,
        finetune__defaults__micro_batch_size=8,
        finetune__defaults__sequence_len=64,
        finetune__defaults__warmup_steps=1,
        finetune__defaults__replay_rows=16,
        finetune__experts={
            "addition": {"dataset": "data/sft/addition.jsonl"},
            "counting": {"dataset": "data/sft/counting.jsonl"},
        },
        merge__recipes={
            "linear": {"method": "linear", "parameters": {"weight": 1.0}},
            "ties": {"method": "ties", "parameters": {"weight": 0.5, "density": 0.5}},
        },
        select__top_k=2,
        moe__variants={"merges": {"source": "selected_merges"}},
        mixture__defaults__max_steps=5,
        mixture__defaults__micro_batch_size=8,
        mixture__defaults__sequence_len=64,
        mixture__defaults__warmup_steps=1,
        mixture__defaults__replay_rows=16,
        mixture__rows=64,
        mixture__dense_runs={"multitask": {}},
        mixture__moe_runs={"router": {"moe": "merges", "mode": "router"}},
    )
    commit_all(root)
    return root


def test_repro_produces_every_output(project):
    result = dvc(project, "repro")
    expected = {"check", "data", "tokenize", "pretrain", "eval@pretrain", "report", *EXPERTS, *MERGES, *MOE, *DENSE}
    assert stages_run(result) == expected
    for path in (
        "data/corpus/train.jsonl",
        "data/sft/counting.jsonl",
        "data/eval/stories.jsonl",
        "data/roster/experts.json",
        "data/roster/merges.json",
        "data/mixture/train.jsonl",
        "data/tokens/train.bin",
        "models/tokenizer/tokenizer.json",
        "models/pretrain/model.safetensors",
        "metrics/pretrain_samples.md",
        "metrics/pretrain/plots/metrics/train/loss.tsv",
        "metrics/eval/base/pretrain.json",
        "metrics/eval_raw/base/pretrain/results.json",
        "metrics/eval_raw/base/pretrain/items.json",
        "metrics/report/index.html",
        "metrics/report/leaderboard.md",
        "metrics/report/skill_matrix.png",
        "metrics/report/cards/base/pretrain.md",
        "metrics/report/cards/expert/counting.md",
        "models/experts/addition/model.safetensors",
        "models/experts/addition/lineage.json",
        "metrics/finetune/counting.json",
        "models/merged/ties/model.safetensors",
        "models/merged/ties/mergekit.yaml",
        "metrics/eval/merge/linear.json",
        "metrics/report/cards/merge/ties.md",
        "models/moe/merges/mergekit_moe.yaml",
        "models/moe_trained/router/model.safetensors",
        "models/dense/multitask/model.safetensors",
        "metrics/eval/moe/merges.json",
        "metrics/eval/moe_trained/router.json",
        "metrics/eval/dense/multitask.json",
        "metrics/eval_raw/moe_trained/router/lineage.json",
        "metrics/routing/moe_trained/router.json",
        "metrics/report/routing.png",
        "metrics/headline.json",
    ):
        assert (project / path).is_file(), path
    metrics = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    values = json.dumps(metrics)
    assert '"vocab_size"' in values and '"corpus/train_documents"' in values and '"val/perplexity"' in values
    assert '"stories/acc"' in values
    selection = json.loads((project / "metrics/select.json").read_text())
    assert sorted(selection["selected"]) == ["linear", "ties"] and set(selection["scores"]) == {"linear", "ties"}
    assert json.loads((project / "models/moe/merges/moe_experts.json").read_text()) == selection["selected"]
    # kinds and lineage are data written where each model is made, and reach the report
    lineage = json.loads((project / "metrics/eval_raw/moe_trained/router/lineage.json").read_text())
    assert (lineage["kind"], lineage["name"], lineage["parents"]) == ("moe_trained", "router", ["moe/merges"])
    headline = json.loads((project / "metrics/headline.json").read_text())
    assert {"dense/best_em", "moe_trained/best_em", "vs_dense/router/p_adj"} <= set(headline)
    assert "Findings" in (project / "metrics/report/index.html").read_text()
    # dvclive's summary file would sit undeclared in folders the report depends on
    live = ["metrics/pretrain", "metrics/finetune/addition", "metrics/dense/multitask", "metrics/moe_finetune/router"]
    assert not [folder for folder in live if (project / folder / "metrics.json").exists()]
    # Nothing generated may be left for git to commit.
    status = sh(project, "git", "status", "--porcelain").stdout
    assert not [line for line in status.splitlines() if re.search(r"(data|models|metrics)/(?!README)", line)], status


def test_second_repro_does_nothing(project):
    result = dvc(project, "repro")
    assert stages_run(result) == set()
    assert "Data and pipelines are up to date" in result.stdout


def workspace(project: Path) -> dict[str, str]:
    """sha256 of every file the pipeline made or recorded: data/, models/ (checkpoints too),
    metrics/ and dvc.lock; not the check stage's stamp and roster, which DVC removes before
    rerunning it (not cached)."""
    files = [project / "dvc.lock", *(p for top in ("data", "models", "metrics") for p in (project / top).rglob("*"))]
    return {
        str(path.relative_to(project)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in files
        if path.is_file() and path.name != "params_checked.txt" and "roster" not in path.parts
    }


def leftovers(project: Path, *, scratch: bool = True) -> list[str]:
    """Temporaries beside any output; with `scratch`, also those in the scratch folders no stage
    depends on: .tmp/, axolotl's work folders included."""
    found = [p for top in ("data", "models", "metrics") for p in (project / top).rglob("*.tmp-*")]
    if scratch:
        found += [*(project / ".tmp").glob("*")]
    return sorted(str(path.relative_to(project)) for path in found)


# One long stage per code path (SFT through axolotl, lm-eval, mergekit, mergekit-moe; the dense and
# MoE training runs share the experts' pipeline/sft.py), the file whose appearance says the stage is
# mid-work, and how it is stopped: SIGKILL of DVC and the stage (a crash, the OOM killer) or SIGINT
# to both (Ctrl-C). The test after them kills DVC alone during an SFT run.
KILLS = [
    ("finetune@addition", ".tmp/addition/axolotl.yaml", signal.SIGINT),
    ("eval_expert@addition", ".tmp/metrics__eval_raw__expert__addition.tmp-*", signal.SIGKILL),
    ("merge@ties", ".tmp/models__merged__ties.tmp-*", signal.SIGKILL),
    ("moe@merges", ".tmp/models__moe__merges.tmp-*", signal.SIGINT),
]


def start_dvc(project: Path, *args: str) -> subprocess.Popen:
    """`dvc *args` in its own process group (so that a test can signal DVC and its stages)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(
        [str(BIN / "dvc"), *args], cwd=project, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_for(project: Path, pattern: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list(project.glob(pattern)):
        assert process.poll() is None and time.time() < deadline, f"the stage ended before {pattern} appeared"
        time.sleep(0.02)


def group_gone(pgid: int, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(("stage", "working", "signum"), KILLS, ids=[kill[0] for kill in KILLS])
def test_a_killed_stage_leaves_nothing_behind_and_repro_restores_the_same_bytes(project, stage, working, signum):
    before = workspace(project)
    process = start_dvc(project, "repro", "-f", "-s", stage)
    wait_for(project, working, process)
    os.killpg(process.pid, signum)
    process.wait()
    assert group_gone(process.pid), "a process of the stage outlived the kill"
    # nothing inside the folders stages depend on; after Ctrl-C nothing anywhere; after kill -9 the
    # scratch folders may hold the stage's temporary (the next write of any stage removes it) and
    # axolotl's work folder (the stage's next run replaces it)
    assert leftovers(project, scratch=signum != signal.SIGKILL) == []
    assert stages_run(dvc(project, "repro")) <= {stage}  # DVC's run-cache may restore it instead
    assert workspace(project) == before
    if signum == signal.SIGKILL:  # the stage's next run sweeps the scratch folders
        dvc(project, "repro", "-f", "-s", stage)
        assert leftovers(project) == []
        assert workspace(project) == before


def test_a_stage_dies_with_dvc_and_never_replaces_a_restored_output(project):
    """kill -9 of DVC alone: the stage and axolotl stop too (parent-death signal), clean up, and
    nothing overwrites what the next `dvc repro` restores."""
    before = workspace(project)
    process = start_dvc(project, "repro", "-f", "-s", "finetune@counting")
    wait_for(project, ".tmp/counting/axolotl.yaml", process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert group_gone(process.pid, timeout=30), "the stage or axolotl went on without DVC"
    assert leftovers(project) == []
    dvc(project, "repro")
    assert workspace(project) == before


LATIN_1 = '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1")

# One case per kind of bad input that plain `dvc repro` must stop at: a setting the schema refuses,
# a setting that names a file no stage makes, and an input file that cannot be read. Every other
# bad setting and file is tested in-process, where it costs no DVC run (tests/test_params.py,
# test_bad_inputs.py, test_merge.py, test_moe.py).
# name: (settings, files to write under the project, what the message must say)
BAD_INPUTS = {
    "unknown key": ({"pretrain__learning_rat": 0.1}, {}, ["pretrain.learning_rat", "unknown key", "learning_rate"]),
    "dataset typo": (
        {"finetune__experts__addition__dataset": "data/sft/additon.jsonl"},
        {},
        ["finetune.experts.addition.dataset", "additon.jsonl", "does not produce", "{addition,"],
    ),
    "not UTF-8": (
        {"finetune__experts__addition__dataset": "data/local/latin.jsonl"},
        {"data/local/latin.jsonl": LATIN_1},
        ["data/local/latin.jsonl", "line 1", "UTF-8"],
    ),
}


@pytest.mark.parametrize(("settings", "files", "expected"), BAD_INPUTS.values(), ids=list(BAD_INPUTS))
def test_bad_input_stops_dvc_repro_before_anything_is_lost(project, settings, files, expected):
    """Plain `dvc repro` (not only `make check`): the check stage fails naming the culprit, before
    DVC has deleted any stage's outputs; every output and checkpoint keeps its bytes."""
    params = (project / "params.yaml").read_text()
    try:
        for name, content in files.items():
            (project / name).write_bytes(content)
        before = workspace(project)
        set_params(project, **settings)
        result = dvc(project, "repro", check=False)
        assert result.returncode != 0
        assert stages_run(result) == {"check"}
        for fragment in expected:
            assert fragment in result.stderr, (fragment, result.stderr)
        assert "Traceback" not in result.stderr
        assert workspace(project) == before
        assert (project / "data/params_checked.txt").is_file()  # git's file: a failed check keeps it
    finally:
        (project / "params.yaml").write_text(params)
        for name in files:
            (project / name).unlink()


def test_after_bad_input_is_fixed_only_the_check_reruns(project):
    assert stages_run(dvc(project, "repro")) <= {"check"}
    assert stages_run(dvc(project, "repro")) == set()


def test_removing_a_recipe_removes_its_outputs_from_what_later_stages_read(project):
    """The MoE depends on models/merged and the report on metrics/eval: a merge taken out of
    params.yaml must not stay there. The check stage, which runs first, removes it; DVC's cache
    keeps it, and putting the recipe back restores it instead of merging again."""
    params = (project / "params.yaml").read_text()
    before = workspace(project)
    linear = {"linear": {"method": "linear", "parameters": {"weight": 1.0}}}
    try:
        # the MoE takes the two experts meanwhile: one selected merge cannot route two per token
        set_params(project, merge__recipes=linear, select__top_k=1, moe__variants={"merges": {"source": "experts"}})
        assert stages_run(dvc(project, "repro", "check")) == {"check"}
        gone = ["models/merged/ties", "metrics/eval/merge/ties.json", "metrics/eval_raw/merge/ties"]
        assert not [path for path in gone if (project / path).exists()]
        assert (project / "models/merged/linear/model.safetensors").is_file()
    finally:
        (project / "params.yaml").write_text(params)
    result = dvc(project, "repro")
    assert not stages_run(result) & {"merge@ties", "eval_merge@ties"}  # restored from the cache
    assert workspace(project) == before


def lock_outputs(project: Path) -> dict[str, str]:
    """Every output in the project's dvc.lock: path -> md5."""
    return dvc_lock.lock_outputs((project / "dvc.lock").read_text())


def machine_kind() -> str:
    """The CPU's vendor and widest vector unit, e.g. 'GenuineIntel AVX-512' (what picks kernels)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    vendor = re.search(r"vendor_id\s*:\s*(\S+)", info)
    return f"{vendor.group(1) if vendor else 'unknown'} {'AVX-512' if ' avx512f' in info else 'AVX2'}"


def test_outputs_match_the_reference_hashes(project):
    """The committed hashes of this tiny pipeline's outputs, with compute.portable_kernels (the
    default): the same bytes on every machine kind. On a kind not yet verified a mismatch is
    reported as an expected failure (xfail) with the outputs that differ; on a verified kind it
    fails. UPDATE_REFERENCE_HASHES=1 rewrites the file from this machine's run."""
    reference_path = Path(__file__).with_name("reference_hashes.json")
    dvc(project, "repro")  # a no-op after the tests above; the whole pipeline when run alone (-k reference)
    outputs = lock_outputs(project)
    if os.environ.get("UPDATE_REFERENCE_HASHES"):
        reference = {"verified_on": [machine_kind()], "outputs": outputs}
        reference_path.write_text(json.dumps(reference, indent=2, sort_keys=True) + "\n")
    reference = json.loads(reference_path.read_text())
    differ = sorted(path for path in reference["outputs"] if outputs.get(path) != reference["outputs"][path])
    assert set(outputs) == set(reference["outputs"])
    if differ and machine_kind() not in reference["verified_on"]:
        pytest.xfail(f"{machine_kind()} computes other bytes than {reference['verified_on']} for {differ}")
    assert not differ, f"outputs with other bytes than the reference on {machine_kind()}: {differ}"


def test_another_clone_path_computes_the_same_bytes(project, tmp_path_factory):
    """No output holds the checkout's path, a date or a timing, and no byte depends on the run: a
    clone elsewhere that computes every stage anew reproduces the first clone's dvc.lock. (The
    kill tests above also rerun single stages in place, with `-f`, to the same bytes.)"""
    first = lock_outputs(project)
    other = tmp_path_factory.mktemp("elsewhere") / "a" / "longer" / "path"
    sh(project, "git", "clone", "-q", str(project), str(other))
    assert stages_run(dvc(other, "repro")) >= {"pretrain", "finetune@addition", "moe_finetune@router", "report"}
    assert lock_outputs(other) == first
    # the volatile facts went to logs/, which nothing hashes
    assert json.loads((other / "logs/pretrain.json").read_text())["log"]


def seed_stages(seed: int) -> set[str]:
    """The replicated run of `seed`: every stage after pretraining that makes a model, and its eval."""
    return {stage_name(name, seed) for name in EXPERTS + MERGES + MOE + DENSE if name != "mixture"}


def test_a_replicated_seed_is_pooled_and_adding_one_stales_only_its_stages(project):
    """seeds.replicas [1] trains the stages after pretraining again with seed 1, and the report pools
    the two runs; adding seed 2 then makes only seed 2's stages (and the report) out of date. (Here,
    before the tests that leave settings changed: it needs every other stage up to date.)"""
    params = (project / "params.yaml").read_text()
    try:
        set_params(project, seeds__replicas=[1])
        assert stages_run(dvc(project, "repro")) == {"check", "report", *seed_stages(1)}
        lineage = json.loads((project / "models/replicas/1/experts/addition/lineage.json").read_text())
        assert lineage["stage"] == "finetune_seed@addition-1" and lineage["settings"]["sft"]["seed"] == 1
        weights = "experts/addition/model.safetensors"
        assert (project / "models/replicas/1" / weights).read_bytes() != (project / "models" / weights).read_bytes()
        assert "## Across seeds" in (project / "metrics/report/leaderboard.md").read_text()
        headline = json.loads((project / "metrics/headline.json").read_text())
        assert headline["seeds/runs"] == 2 and "seeds/vs_dense/router/holds" in headline

        assert stale_after(project, seeds__replicas=[1, 2]) == {"check", "report", *seed_stages(2)}
    finally:
        (project / "params.yaml").write_text(params)
    # without the seed, the check removes its outputs from the workspace (DVC's cache keeps them), and
    # the report's inputs are again those of the first run: DVC's run-cache restores its outputs
    result = dvc(project, "repro")
    assert stages_run(result) == {"check"} and "Stage 'report' is cached" in result.stdout
    assert not (project / "models/replicas/1").exists() and "seeds/runs" not in json.loads(
        (project / "metrics/headline.json").read_text()
    )


def test_a_merge_search_keeps_its_study_between_runs_and_is_compared_in_the_report(project):
    """A search of 2 trials, then 3: DVC keeps the study (persist), so the second run computes only
    the third trial and keeps the first two; the report compares the searched merge with the recipes.
    (Before the tests that leave settings changed, like the seeds test.)"""
    params = (project / "params.yaml").read_text()
    table = project / "metrics/runs/merge_search/tiny/trials.csv"
    search_stages = {"check", "merge_search@tiny", "eval_search@tiny", "report"}
    try:
        set_params(project, merge_search__runs={"tiny": {"trials": 2, "normalize": False}})
        assert stages_run(dvc(project, "repro")) == search_stages
        first = table.read_text().splitlines()
        assert len(first) == 1 + 2
        assert "## Merge search" in (project / "metrics/report/leaderboard.md").read_text()
        assert "search_vs_best_merge/tiny/diff" in json.loads((project / "metrics/headline.json").read_text())

        set_params(project, merge_search__runs__tiny__trials=3)
        result = dvc(project, "repro")
        assert {"check", "merge_search@tiny"} <= stages_run(result)
        assert "the study holds 2 completed trials of 3" in result.stdout + result.stderr
        assert table.read_text().splitlines()[:3] == first and len(table.read_text().splitlines()) == 1 + 3
    finally:
        (project / "params.yaml").write_text(params)
    result = dvc(project, "repro")  # without the search, the check removes its outputs, the study too
    assert stages_run(result) == {"check"} and "Stage 'report' is cached" in result.stdout
    assert not (project / "models/searched/tiny").exists() and not (project / "models/search_studies/tiny.db").exists()


def stale_after(project: Path, **settings: object) -> set[str]:
    """The stages `dvc status` finds out of date once `settings` are set in params.yaml (then set
    back): those whose own params or dependencies changed. What depends on their outputs reruns
    after them only where those outputs' bytes change, which DVC decides by hash on `dvc repro`."""
    params = (project / "params.yaml").read_text()
    try:
        set_params(project, **settings)
        return set(json.loads(dvc(project, "status", "--json").stdout))
    finally:
        (project / "params.yaml").write_text(params)


def test_changing_a_param_reruns_only_its_stages(project):
    # after every change to params.yaml the check stage runs first (stages/check.py), in seconds
    evals = {"eval@pretrain", "eval_expert@addition", "eval_expert@counting", "eval_merge@linear", "eval_merge@ties"}
    evals |= {"eval_moe@merges", "eval_moe_trained@router", "eval_dense@multitask"}
    assert stale_after(project, eval__limit=3) == {"check", *evals}

    # one expert's setting: that expert alone (the merges and the MoE read the experts' names from
    # the check stage's roster, the mixture runs their rows from the mixture stage: by hash)
    assert stale_after(project, finetune__experts__addition__learning_rate=0.001) == {"check", "finetune@addition"}

    # one recipe's parameter: that merge alone; the mixture's size: the mixture stage alone
    assert stale_after(project, merge__recipes__ties__parameters__density=0.7) == {"check", "merge@ties"}
    assert stale_after(project, mixture__rows=32) == {"check", "mixture"}

    # the dense baseline's setting: that run only
    assert stale_after(project, mixture__dense_runs__multitask__learning_rate=0.001) == {"check", "dense@multitask"}

    # what reruns then follows the bytes: the MoE run's setting retrains that run, and its new
    # weights rerun its eval and the report, nothing else
    set_params(project, mixture__moe_runs__router__learning_rate=0.001)
    assert stages_run(dvc(project, "repro")) == {"check", "moe_finetune@router", "eval_moe_trained@router", "report"}

    # upstream settings: the stage itself reruns, and everything reading its output is then out
    # of date (single targets are rerun here, as a full cascade takes minutes)
    set_params(project, pretrain__learning_rate=0.002)
    assert stages_run(dvc(project, "repro", "pretrain")) == {"check", "pretrain"}
    status = dvc(project, "status").stdout
    assert "finetune@addition:" in status and "eval@pretrain:" in status and "merge@ties:" in status

    set_params(project, tokenize__vocab_size=500)
    status = dvc(project, "status").stdout
    assert "tokenize:" in status and "data:" not in status
    assert stages_run(dvc(project, "repro", "tokenize")) == {"check", "tokenize"}
    assert json.loads((project / "metrics/tokenize.json").read_text())["vocab_size"] == 500
    assert "pretrain:" in dvc(project, "status").stdout  # what reads the tokens is now out of date


def test_killed_pretrain_resumes_under_dvc_repro(project):
    """kill -9 in the middle of training; the next `dvc repro` continues from the checkpoint."""
    set_params(project, pretrain__max_steps=400, pretrain__checkpoint_interval=10)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "pretrain"],
        cwd=project,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    # earlier runs in this module stopped at step 20; wait for a checkpoint of this run
    while not (project / "models/pretrain_checkpoints/step-000030").is_dir():
        assert process.poll() is None and time.time() < deadline, "dvc repro ended before the first checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # dvc and the stage it runs
    process.wait()
    result = dvc(project, "repro", "pretrain")
    assert stages_run(result) - {"check"} == {"pretrain"}
    assert "resuming from" in result.stderr and "step-0000" in result.stderr
    assert json.loads((project / "metrics/pretrain.json").read_text())["steps"] == 400


def test_experiment_with_set_param(project):
    """`dvc exp run -S` works (it breaks if antlr4 4.13 sneaks back in) and shows the new value."""
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "baseline")
    dvc(project, "exp", "run", "-S", "eval.max_gen_tokens=8", "eval@pretrain")
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert '"max_gen_tokens": 8' in text and '"max_gen_tokens": 16' in text
    assert '"val/loss"' in text and '"all_skills/exact_match"' in text

    # `make compare`: one row per run, the headline metrics and only the setting that differs
    headline = json.loads((project / "metrics/headline.json").read_text())
    table = sh(project, sys.executable, "-m", "tools.compare").stdout.splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == ["run", *sorted(k for k in headline if k.endswith(("/best_em", "/diff", "/p_adj"))),
                      "eval.max_gen_tokens"]  # fmt: skip
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:5])}
    assert len(rows) == 3 and rows["workspace"][-1] == "8"  # the workspace, the baseline commit, the experiment
    assert rows["workspace"][header.index("moe_trained/best_em")] == str(headline["moe_trained/best_em"])
    # `make diff REV=HEAD`: against the commit, the setting that moved
    assert (
        "| eval.max_gen_tokens | 16 | 8 |" in sh(project, sys.executable, "-m", "tools.compare", "--rev", "HEAD").stdout
    )


# A team's shared cache: one default remote, committed in .dvc/config, so every clone pushes to and
# pulls from the same storage (here a local folder; in a team an S3 bucket, SSH host or NFS path).


def git_commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message)


def clone(source: Path, target: Path) -> Path:
    sh(source, "git", "clone", "-q", str(source), str(target))
    return target


@pytest.fixture(scope="module")
def team(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The team's repository: the project's first commit (the shrunk settings) reproduced, with its
    dvc.lock and a default remote committed, and every output pushed there. It reproduces with the
    project's cache, whose run-cache (after the first test above) restores the stages instead of
    computing them."""
    root = tmp_path_factory.mktemp("team")
    origin = clone(project, root / "origin")
    sh(origin, "git", "reset", "-q", "--hard", sh(origin, "git", "rev-list", "--max-parents=0", "HEAD").stdout.strip())
    dvc(origin, "cache", "dir", "--local", str(project / ".dvc" / "cache"))
    dvc(origin, "repro")
    dvc(origin, "remote", "add", "--default", "shared", str(root / "remote"))
    git_commit(origin, "the shrunk run's lock and the team's remote")
    dvc(origin, "push")
    return origin


def changed_paths(repo: Path) -> set[str]:
    """Every path that `dvc status` reports as changed, in any stage."""
    status = json.loads(dvc(repo, "status", "--json").stdout)
    return {path for entries in status.values() for entry in entries for change in entry.values() for path in change}


def test_shared_remote_a_clone_pulls_every_output_and_computes_nothing(team, tmp_path):
    teammate = clone(team, tmp_path / "teammate")
    dvc(teammate, "pull")
    # the check's stamp comes with git (constant bytes): every stage is up to date
    assert "Data and pipelines are up to date" in dvc(teammate, "status").stdout
    assert stages_run(dvc(teammate, "repro")) == set()
    assert (teammate / "dvc.lock").read_text() == (team / "dvc.lock").read_text()


def test_shared_remote_repro_pull_in_a_fresh_clone_computes_nothing(team, tmp_path):
    teammate = clone(team, tmp_path / "teammate")
    assert stages_run(dvc(teammate, "repro", "--pull")) == set()
    assert changed_paths(teammate) == set()  # every output fetched with the bytes dvc.lock names


def run_queue(repo: Path, timeout: float = 600) -> str:
    """`dvc queue start -j 1` (parallel workers race: treeverse/dvc 10673) and wait until every
    queued experiment has ended; returns `dvc queue status`."""
    dvc(repo, "queue", "start", "--jobs", "1")
    deadline = time.time() + timeout
    try:
        while re.search(r"\b(Queued|Running)\b", status := dvc(repo, "queue", "status").stdout):
            assert time.time() < deadline, f"the queue did not finish in {timeout} s:\n{status}"
            time.sleep(1)
    finally:
        dvc(repo, "queue", "stop", "--kill")  # no worker outlives the test (an idle one waits 10 s)
    return status


def experiments(repo: Path) -> dict[str, tuple[dict, dict]]:
    """`dvc exp show --json`: experiment name -> (params.yaml, metrics by file)."""
    shown = {}
    for baseline in json.loads(dvc(repo, "exp", "show", "--json").stdout):
        for experiment in baseline["experiments"] or []:
            data = experiment["revs"][0]["data"]
            metrics = {name: value["data"] for name, value in data["metrics"].items()}
            shown[experiment["name"]] = (data["params"]["params.yaml"]["data"], metrics)
    return shown


@pytest.mark.scale  # ~80 s on the 2-core machine (35 s CPU): the queue's worker and temporary workspaces
def test_queue_a_sweep_runs_each_value_and_exp_show_compares_them(team, tmp_path):
    """`dvc exp run --queue -S key=a,b` queues one experiment per value. A teammate pulls the
    experiments (`dvc exp push/pull`: git refs, outputs and run records) and gets either setting
    from the run-cache instead of computing it."""
    sweeper = clone(team, tmp_path / "sweeper")
    dvc(sweeper, "pull")
    dvc(sweeper, "exp", "run", "--queue", "-S", "tokenize.vocab_size=300,400", "tokenize")
    status = run_queue(sweeper)
    assert status.count("Success") == 2, status
    swept = experiments(sweeper)
    tokens = {}
    for params, metrics in swept.values():
        tokens[params["tokenize"]["vocab_size"]] = metrics["metrics/tokenize.json"]["train/tokens"]
    assert set(tokens) == {300, 400}
    assert tokens[300] > tokens[400]  # fewer merges, more tokens
    # `dvc push --run-cache` alone sends the run records but not the experiments' outputs
    dvc(sweeper, "exp", "push", "--run-cache", "origin", *swept)

    teammate = clone(team, tmp_path / "teammate")
    dvc(teammate, "exp", "pull", "--run-cache", "origin", *swept)
    assert experiments(teammate) == swept
    dvc(teammate, "pull")
    result = dvc(teammate, "exp", "run", "-S", "tokenize.vocab_size=300", "tokenize")
    assert stages_run(result) == {"check"} and "Stage 'tokenize' is cached" in result.stdout
    assert json.loads((teammate / "metrics/tokenize.json").read_text())["train/tokens"] == tokens[300]
