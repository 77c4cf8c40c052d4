"""SFT beyond one process (torchrun: DDP, FSDP2, DeepSpeed ZeRO) and QLoRA, in the one SFT code path
(pipeline/sft.py): axolotl's own validation of the GPU configs, the CPU refusals, and a real
2-process DDP run on CPU (gloo) against one process."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline import sft
from pipeline.settings.base import PROJECT_ROOT, InputError
from pipeline.settings.mixture import MoERun
from pipeline.settings.sft import SFTSettings
from stages import mixture_finetune

TINY_SFT = SFTSettings(max_steps=8, learning_rate=5e-3, sequence_len=64, warmup_steps=2, replay_rows=0)
GPU = torch.cuda.is_available()


def target_in(root: Path) -> sft.Target:
    return sft.Target("expert", "addition", "finetune@addition", "finetune.experts.addition", root / "out",
                      root / "work", root / "live")  # fmt: skip


def train_loss(root: Path) -> list[float]:
    rows = (root / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[-1]) for row in rows]


@pytest.mark.skipif(GPU, reason="a CUDA machine runs QLoRA")
def test_qlora_is_refused_on_cpu_before_axolotl_starts(tiny_data, tmp_path):
    settings = TINY_SFT.model_copy(update={"adapter": "qlora"})
    started = time.monotonic()
    with pytest.raises(InputError, match=r"^sft.adapter is qlora, which needs a CUDA GPU .*: use lora on CPU$"):
        sft.run(settings, "models/none", tiny_data / "sft" / "addition.jsonl", target_in(tmp_path))
    assert time.monotonic() - started < 5  # axolotl alone takes ~20 s to start
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_without_deepspeed_is_refused_before_axolotl_starts(tiny_data, tmp_path):
    settings = TINY_SFT.model_copy(update={"processes": 2, "distributed": "deepspeed_zero3"})
    with pytest.raises(InputError, match=r"sft.distributed is deepspeed_zero3, but deepspeed is not installed"):
        sft.run(settings, "models/none", tiny_data / "sft" / "addition.jsonl", target_in(tmp_path))
    assert not (tmp_path / "work").exists()


def test_one_process_keeps_todays_launch_config_and_records():
    """The defaults add nothing: the default experiment's configs, lineage and model cards keep their bytes."""
    settings = SFTSettings()
    assert "processes" not in settings.model_dump() and "distributed" not in settings.model_dump()
    assert SFTSettings(processes=2, distributed="fsdp").model_dump(mode="json")["distributed"] == "fsdp"
    config = sft.axolotl_config(settings, "base", "data.jsonl", Path("/w"), bf16=False)
    assert not {"load_in_4bit", "fsdp_version", "fsdp_config", "deepspeed"} & config.keys()
    assert sft.launcher(settings) == [sys.executable] and sft.process_environment(settings, "cpu") == {}


def test_several_processes_launch_through_torchrun_with_a_share_of_the_threads(monkeypatch):
    monkeypatch.delenv("PET_NNODES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    settings = SFTSettings(processes=4)
    assert sft.launcher(settings) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      "--nproc-per-node=4"]  # fmt: skip
    assert sft.process_environment(settings, "cpu") == {
        "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "ACCELERATE_USE_CPU": "true"
    }  # fmt: skip
    assert sft.process_environment(settings, "cuda")["OMP_NUM_THREADS"] == "2"
    assert "ACCELERATE_USE_CPU" not in sft.process_environment(settings, "cuda")  # GPUs: nccl
    assert sft.process_environment(SFTSettings(processes=16), "cpu")["OMP_NUM_THREADS"] == "1"
    # several machines: torchrun reads the rendezvous from its PET_* variables, not --standalone
    monkeypatch.setenv("PET_NNODES", "2")
    assert sft.launcher(SFTSettings(processes=1)) == [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc-per-node=1"]  # fmt: skip


def test_a_moe_run_maps_qlora_to_its_lora_mode():
    qlora = SFTSettings(adapter="qlora")
    assert mixture_finetune.run_mode(MoERun(moe="experts"), qlora) == "lora"
    assert mixture_finetune.mode_settings(MoERun(moe="experts"), qlora).adapter == "qlora"  # 4-bit kept
    assert mixture_finetune.mode_settings(MoERun(moe="experts", mode="lora"), qlora).adapter == "qlora"
    assert mixture_finetune.mode_settings(MoERun(moe="experts", mode="lora"), SFTSettings()).adapter == "lora"
    assert mixture_finetune.mode_settings(MoERun(moe="experts", mode="router"), qlora).adapter == "none"


@pytest.mark.parametrize(
    "settings",
    [
        {"adapter": "qlora", "lora_r": 32, "lora_alpha": 64},  # the seed experiment's QLoRA
        {"processes": 8, "distributed": "fsdp"},
        {"processes": 8, "distributed": "deepspeed_zero2"},
        {"processes": 8, "distributed": "deepspeed_zero3", "adapter": "qlora"},
    ],
    ids=["qlora", "fsdp", "deepspeed_zero2", "deepspeed_zero3_qlora"],
)
def test_gpu_configs_pass_axolotls_own_validation(settings, tmp_path):
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    settings = SFTSettings(precision="bf16", gradient_checkpointing=True, micro_batch_size=2, **settings)
    deepspeed = None
    if settings.distributed.startswith("deepspeed"):
        deepspeed = tmp_path / f"{settings.distributed}.json"
        deepspeed.write_text(json.dumps(sft.deepspeed_zero(int(settings.distributed[-1]))))
    config = sft.axolotl_config(settings, str(base), "data.jsonl", tmp_path, bf16=True, deepspeed_config=deepspeed)
    gpus = {"bf16": True, "fp8": False, "n_gpu": settings.processes, "n_node": 1, "compute_capability": "sm_90"}
    validated = validate_config(DictDefault(config), capabilities=gpus,
                                env_capabilities={"torch_version": torch.__version__.split("+")[0]})  # fmt: skip
    if settings.adapter == "qlora":
        assert (validated.adapter, validated.load_in_4bit) == ("qlora", True)
        assert (validated.lora_r, validated.lora_alpha) == (settings.lora_r, settings.lora_alpha)
        assert validated.lora_target_linear is True
    if settings.distributed == "fsdp":
        assert validated.fsdp_version == 2
        assert validated.fsdp_config.transformer_layer_cls_to_wrap == "LlamaDecoderLayer"  # from the model's class
        assert validated.fsdp_config.state_dict_type == "FULL_STATE_DICT"
    if deepspeed:
        assert validated.deepspeed == str(deepspeed)
        zero = json.loads(deepspeed.read_text())["zero_optimization"]
        assert zero["stage"] == int(settings.distributed[-1])
        assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (zero["stage"] == 3)


# machine 1 of a two-machine run, in its own process: what `python -m stages.finetune` would run there
MACHINE = """
import json, sys
from pathlib import Path
from pipeline import sft
from pipeline.settings.sft import SFTSettings
from tests.test_sft_distributed import target_in
settings, base, dataset, root = SFTSettings.model_validate_json(sys.argv[1]), *sys.argv[2:]
print(json.dumps(sft.run(settings, base, Path(dataset), target_in(Path(root)))))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.scale
def test_two_processes_and_two_machines_follow_the_one_process_loss_curve(
    tiny_pretrained, tiny_data, tmp_path, capfd, monkeypatch
):
    """DDP over gloo, 2 processes x 8 rows against 1 process x 16 rows: the same batch per step.
    Then the same 2 processes as two "machines" (two stage runs of 1 process each, joined by
    torchrun's static rendezvous from PET_* variables, as on a cluster).

    Measured (2-core Xeon, 8 steps): the curves agree within 2e-4 relative at every step. They are
    not bitwise equal: DDP averages the two processes' mean losses (and gradients), one process
    takes one mean over all answer tokens, and the halves hold different numbers of them. 1e-3
    leaves room for that; a process training alone on its half, or on other rows, is off by percents.
    """
    base = tiny_pretrained[1] / "model"
    dataset = tiny_data / "sft" / "addition.jsonl"
    one, two, machines = tmp_path / "one", tmp_path / "two", tmp_path / "machines"
    sft.run(TINY_SFT.model_copy(update={"micro_batch_size": 16}), str(base), dataset, target_in(one))
    assert '"world_size": 1' in "".join(capfd.readouterr())
    settings = TINY_SFT.model_copy(update={"micro_batch_size": 8, "processes": 2})
    summary = sft.run(settings, str(base), dataset, target_in(two))
    log = "".join(capfd.readouterr())
    (tmp_path / "two.log").write_text(log)
    assert '"world_size": 2' in log  # the config axolotl's rank 0 logs
    assert summary["steps"] == 8 and summary["data/rows_trained_on"] == 300
    single, double = train_loss(one), train_loss(two)
    assert len(single) == len(double) == 8 and double[-1] < 0.5 * double[0]
    assert double == pytest.approx(single, rel=1e-3)
    model = AutoModelForCausalLM.from_pretrained(two / "out")  # one plain model, written once
    assert model.num_parameters() == AutoModelForCausalLM.from_pretrained(base).num_parameters()
    before, after = load_file(base / "model.safetensors"), load_file(two / "out" / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    lineage = json.loads((two / "out" / "lineage.json").read_text())
    assert lineage["settings"]["sft"]["processes"] == 2  # recorded once it is not the default

    rendezvous = {"PET_NNODES": "2", "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port()),
                  "OMP_NUM_THREADS": "1"}  # fmt: skip
    for name, value in rendezvous.items():
        monkeypatch.setenv(name, value)
    per_machine = TINY_SFT.model_copy(update={"micro_batch_size": 8})
    second = subprocess.Popen(
        [sys.executable, "-c", MACHINE, per_machine.model_dump_json(), str(base), str(dataset), str(machines / "1")],
        env={**os.environ, "PET_NODE_RANK": "1"}, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    monkeypatch.setenv("PET_NODE_RANK", "0")
    first = sft.run(per_machine, str(base), dataset, target_in(machines / "0"))
    assert second.communicate(timeout=600)[0].splitlines()[-1] == "{}" and second.returncode == 0
    assert not (machines / "1" / "out").exists()  # only the first machine writes the model
    assert first["steps"] == 8 and train_loss(machines / "0") == pytest.approx(single, rel=1e-3)
    assert AutoModelForCausalLM.from_pretrained(machines / "0" / "out").num_parameters() == model.num_parameters()
