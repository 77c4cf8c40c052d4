"""Atomic outputs and stopping stages: temporaries never sit where a stage depends, and go away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.atomic import SCRATCH, atomic_dir, atomic_path, write_text
from pipeline.settings.base import PROJECT_ROOT


@pytest.fixture()
def project(tmp_path, monkeypatch) -> Path:
    """An empty project folder as the working directory, as DVC runs stages."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_live_in_the_scratch_folder_not_beside_the_output(project):
    final = project / "models/merged/ties"
    (project / "models/merged/linear").mkdir(parents=True)
    with atomic_dir(final) as tmp:
        (tmp / "model.safetensors").write_text("weights")
        assert tmp.parent == project / SCRATCH
        assert sorted(p.name for p in final.parent.iterdir()) == ["linear"]  # what the MoE would hash
    assert (final / "model.safetensors").read_text() == "weights"
    assert list((project / SCRATCH).iterdir()) == []


def test_a_failed_write_keeps_the_old_output_and_leaves_no_temporary(project):
    write_text(project / "metrics/select.json", "old\n")
    with pytest.raises(RuntimeError), atomic_path(project / "metrics/select.json") as tmp:
        tmp.write_text("new, half")
        raise RuntimeError("stage failed")
    with pytest.raises(RuntimeError), atomic_dir(project / "metrics/report") as tmp:
        (tmp / "index.html").write_text("half")
        raise RuntimeError("stage failed")
    assert (project / "metrics/select.json").read_text() == "old\n"
    assert not (project / "metrics/report").exists()
    assert list((project / SCRATCH).iterdir()) == []


def test_temporaries_of_killed_writers_go_with_the_next_write(project):
    scratch = project / SCRATCH
    scratch.mkdir()
    killed = scratch / f"models__merged__ties.tmp-{dead_pid()}"
    killed.mkdir()
    running = scratch / f"models__moe__merges.tmp-{os.getppid()}"  # a live process: still writing
    running.mkdir()
    write_text(project / "metrics/data.json", "{}\n")
    assert not killed.exists() and running.exists()


def test_outputs_outside_the_working_directory_keep_their_temporaries_beside_them(project, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with atomic_dir(elsewhere / "model") as tmp:
        assert tmp.parent == elsewhere and tmp.name.startswith(".model.tmp-")
    assert (elsewhere / "model").is_dir()


STAGE = """
import sys, time
from pathlib import Path
from pipeline.atomic import atomic_dir
from pipeline.stage import die_with_parent, exit_on_termination
exit_on_termination()
die_with_parent()
with atomic_dir(Path("models/experts/addition")) as tmp:
    (tmp / "model.safetensors").write_text("half")
    print("writing", flush=True)
    time.sleep(60)
"""


def run_stage(project: Path, *prefix: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", STAGE], cwd=project, env=env, stdout=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=default_sigint,
    )  # fmt: skip


def default_sigint() -> None:
    """Ctrl-C as a terminal delivers it: a test run started in the background (`make test &`) hands
    its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stopped_stage_removes_its_temporary(project, signum):
    stage = run_stage(project)
    assert stage.stdout.readline() == "writing\n"
    stage.send_signal(signum)
    assert stage.wait(timeout=30) != 0
    assert list((project / SCRATCH).iterdir()) == []
    assert not (project / "models/experts/addition").exists()


def test_a_stage_stops_when_its_parent_dies(project):
    """The parent (DVC, or the stage for axolotl) killed with -9: the child gets SIGTERM from the
    kernel and cleans up, instead of finishing later over an output restored meanwhile."""
    parent = run_stage(project, "sh", "-c", 'exec "$@" & wait', "parent")
    assert parent.stdout.readline() == "writing\n"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while group_alive(parent.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not group_alive(parent.pid), "the stage went on without its parent"
    assert list((project / SCRATCH).iterdir()) == []


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_only_outputs_of_removed_stages_are_stale(tmp_path):
    """What the check stage removes: a removed recipe's outputs, never a folder today's outputs are
    in (an old stage's models/moe holds today's models/moe/<variant>) nor one of today's outputs."""
    from types import SimpleNamespace

    from stages.check import remove_stale_outputs, stale_outputs

    def stage(name: str, *outs: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, outs=[SimpleNamespace(fs_path=str(tmp_path / o)) for o in outs])

    for folder in ("models/merged/ties", "models/merged/dare_ties", "models/moe/merges", "metrics/eval/merge"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "metrics/eval/merge/dare_ties.json").write_text("{}")
    lock = {
        "merge@ties": ["models/merged/ties"],
        "merge@dare_ties": ["models/merged/dare_ties", "metrics/eval/merge/dare_ties.json", "gone/already"],
        "moe": ["models/moe"],
    }
    lines = ["schema: '2.0'", "stages:"]
    for name, outs in lock.items():
        lines += [f"  {name}:", "    outs:", *(f"    - path: {out}\n      md5: 0" for out in outs)]
    (tmp_path / "dvc.lock").write_text("\n".join(lines) + "\n")
    current = [stage("merge@ties", "models/merged/ties"), stage("moe@merges", "models/moe/merges")]
    stale = stale_outputs(current, tmp_path)
    assert stale == [tmp_path / "metrics/eval/merge/dare_ties.json", tmp_path / "models/merged/dare_ties"]

    # removing them also removes the folders they leave empty (a removed seed's), up to models/
    (tmp_path / "models/replicas/1/experts/addition").mkdir(parents=True)
    with (tmp_path / "dvc.lock").open("a") as lock_file:
        lock_file.write("  finetune_seed@addition-1:\n    outs:\n    - path: models/replicas/1/experts/addition\n")
    removed = remove_stale_outputs(current, tmp_path)
    assert tmp_path / "models/replicas/1/experts/addition" in removed
    assert not (tmp_path / "models/replicas").exists() and (tmp_path / "models/merged/ties").is_dir()
