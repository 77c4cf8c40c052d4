"""launch/skypilot.yaml, the recipe for rented GPUs: it cannot run here (no cloud), so SkyPilot's own
loader and schema check it, offline."""

from __future__ import annotations

import copy
import socket
import subprocess

import pytest

from pipeline.settings.base import PROJECT_ROOT

TASK = PROJECT_ROOT / "launch" / "skypilot.yaml"


@pytest.fixture(scope="module")
def sky(tmp_path_factory: pytest.TempPathFactory):
    """SkyPilot, imported with HOME in a temporary folder (its import creates ~/.sky and state
    databases there), from the project root (the task's `workdir: .` is resolved against it), with
    Python's name lookups and connections refused and every attempt counted: an accelerator name
    missing from SkyPilot's built-in list makes it fetch cloud catalogs, and it swallows the failure."""
    attempts: list[object] = []

    def refuse(address: object) -> None:
        attempts.append(address)
        raise OSError(f"tests/test_launch.py refuses network access ({address})")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        patch.chdir(PROJECT_ROOT)
        patch.setattr(socket, "getaddrinfo", lambda host, port, *args, **kwargs: refuse((host, port)))
        patch.setattr(socket.socket, "connect", lambda _socket, address: refuse(address))
        patch.setattr(socket.socket, "connect_ex", lambda _socket, address: refuse(address))
        import sky
        import sky.utils.dag_utils

        yield sky
    assert not attempts, f"SkyPilot tried to reach the network: {attempts}"


def load(sky, profile: str = "gpu-small"):
    """The task as `sky launch launch/skypilot.yaml --env PROFILE=<profile>` loads it."""
    dag = sky.utils.dag_utils.load_chain_dag_from_yaml(str(TASK), env_overrides=[("PROFILE", profile)])
    assert len(dag.tasks) == 1
    return dag.tasks[0]


def test_task_validates_and_runs_the_pipeline_on_a_gpu(sky) -> None:
    task = load(sky)
    assert task.envs["PROFILE"] == "gpu-small"
    assert "make install" in task.setup
    assert "python -m pipeline.profiles apply" in task.run
    assert "dvc exp run --pull" in task.run
    assert "dvc push --run-cache" in task.run
    assert [resources.accelerators for resources in task.resources] == [{"H100": 1}]
    assert task.workdir == "."


def test_profile_is_required(sky) -> None:
    with pytest.raises(ValueError, match="'PROFILE' is None"):
        sky.Task.from_yaml(str(TASK))


@pytest.mark.parametrize(
    ("section", "typo", "message"),
    [
        (None, "resource", "Invalid task YAML: Instead of 'resource', did you mean 'resources'"),
        ("resources", "accelerator", "Invalid resources YAML: Instead of 'accelerator', did you mean 'accelerators'"),
    ],
)
def test_schema_rejects_a_misspelt_key(sky, section: str | None, typo: str, message: str) -> None:
    config = sky.utils.common_utils.read_yaml(str(TASK))
    broken = copy.deepcopy(config)
    mapping = broken[section] if section else broken
    mapping[typo] = mapping.pop(typo + "s")
    with pytest.raises(ValueError, match=message):
        sky.Task.from_yaml_config(broken, env_overrides=[("PROFILE", "gpu-small")])
    sky.Task.from_yaml_config(config, env_overrides=[("PROFILE", "gpu-small")])  # the intact copy passes


def test_scripts_are_valid_bash(sky) -> None:
    task = load(sky)
    for name, script in (("setup", task.setup), ("run", task.run)):
        result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"
