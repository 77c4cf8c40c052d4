"""The pretrain stage: it learns, ignores padding, resumes exactly, stops on NaN, runs distributed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.settings.base import PROJECT_ROOT, InputError
from pipeline.settings.pretrain import PretrainSettings
from pipeline.stage import RunFailed
from stages import pretrain
from tests.conftest import TINY_MODEL, outputs_in
from tests.conftest import TINY_PRETRAIN as TINY

RUNNER = Path(__file__).with_name("pretrain_runner.py")


@pytest.fixture(scope="module")
def trained(tiny_pretrained):
    """(summary, output folder) of one tiny pretraining run."""
    return tiny_pretrained


def unigram_entropy(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_it_learns(trained, tiny_tokenized):
    summary, _ = trained
    meta = json.loads((tiny_tokenized[1] / "meta.json").read_text())
    baseline = unigram_entropy(np.memmap(tiny_tokenized[1] / "train.bin", dtype=meta["dtype"], mode="r"))
    assert summary["val/loss_at_start"] > math.log(meta["vocab_size"]) - 0.5  # random init: ~uniform
    assert summary["val/loss"] < 0.8 * baseline  # well below what token frequencies alone give
    assert summary["val/perplexity"] == pytest.approx(math.exp(summary["val/loss"]), rel=1e-3)
    assert 0.2 < summary["val/accuracy"] < 1


def test_output_is_a_loadable_model_folder(trained):
    _, root = trained
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (root / "model" / "model.safetensors").is_file()
    assert not list((root / "model").glob("*.bin"))
    ids = model.generate(**tokenizer("The capital of", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > 4
    assert "Final metrics" in (root / "model" / "README.md").read_text()


def test_curves_and_samples(trained):
    _, root = trained
    plots = root / "live" / "plots" / "metrics"
    for name in ("train/loss", "train/lr", "train/grad_norm", "val/loss"):
        rows = (plots / f"{name}.tsv").read_text().splitlines()
        assert rows[0].split("\t")[:2] == ["step", name.split("/")[1]]
        assert len(rows) > 2
    # timings differ on every run: they go to the timing file, never into the hashed curves, and
    # the curves' folder holds the curves alone (no dvclive summary beside them)
    assert not list(plots.rglob("tokens_per_second*")) and not (root / "live" / "metrics.json").exists()
    timing = json.loads((root / "timing.json").read_text())["log"]
    assert [row["step"] for row in timing] == list(range(10, 201, 10))
    assert all(row["tokens_per_second"] > 0 and row["mfu"] > 0 for row in timing)
    val_steps = [int(r.split("\t")[0]) for r in (plots / "val/loss.tsv").read_text().splitlines()[1:]]
    assert val_steps == [0, 50, 100, 150, 200]
    samples = (root / "samples.md").read_text()
    assert "## Step 0" in samples and "## Step 200" in samples
    assert samples.count("greedy: **The capital of**") == 2


def test_loss_ignores_padding_with_the_label_index():
    """Sequences padded after a document train exactly as the document alone would."""
    bos, eos, pad = 1, 2, 0
    tokens = np.array([bos, 5, 6, 7, eos, bos, 8, 9, 10, 11, 12, 13, eos] * 4, dtype=np.uint16)
    sampler = pretrain.BatchSampler(tokens, 8, "documents", {"bos": bos, "eos": eos, "pad": pad}, seed=0)
    inputs, targets = sampler.sequence(0)
    assert inputs.tolist() == [bos, 5, 6, 7, eos, pad, pad, pad]
    assert targets.tolist() == [5, 6, 7, eos] + [pretrain.IGNORE_INDEX] * 4

    torch.manual_seed(0)
    logits = torch.randn(1, 8, 16)
    padded = pretrain.causal_lm_loss(logits, torch.from_numpy(targets)[None])
    alone = torch.nn.functional.cross_entropy(logits[0, :4], torch.tensor([5, 6, 7, eos]))
    assert padded.item() == pytest.approx(alone.item(), abs=1e-6)


def test_windows_cover_the_whole_sequence():
    tokens = np.arange(100, dtype=np.uint16)
    sampler = pretrain.BatchSampler(tokens, 10, "windows", {"bos": 1, "eos": 2, "pad": 0}, seed=0)
    inputs, targets = sampler.next_batch(4)
    assert inputs.shape == targets.shape == (4, 10)
    assert torch.equal(targets[:, :-1], inputs[:, 1:]) and not (targets == pretrain.IGNORE_INDEX).any()


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("cosine", {0: 0.1, 9: 1.0, 10: 1.0, 100: 0.1}),
        ("one_cycle", {0: 0.04, 10: 1.0, 100: 0.1}),
        ("constant", {0: 0.1, 9: 1.0, 50: 1.0, 99: 1.0}),
    ],
)
def test_learning_rate_schedules(schedule, expected):
    factor = pretrain.lr_factor(TINY.model_copy(update={"schedule": schedule, "warmup_steps": 10, "max_steps": 100}))
    for step, value in expected.items():
        assert factor(step) == pytest.approx(value, abs=1e-3), (schedule, step)
    values = [factor(s) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:], strict=False))  # never rises after warmup


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for name in ("adamw", "lion"):
        optimizer = pretrain.build_optimizer(model, TINY.model_copy(update={"optimizer": name}))
        decayed, plain = optimizer.param_groups
        assert [p.ndim for p in decayed["params"]] == [2] and decayed["weight_decay"] == TINY.weight_decay
        assert [p.ndim for p in plain["params"]] == [1, 1, 1] and plain["weight_decay"] == 0.0


def test_lion_moves_each_weight_by_lr_against_the_gradient_sign():
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = pretrain.Lion([weight], lr=0.1, betas=(0.9, 0.99))
    weight.grad = torch.tensor([2.0, -0.5, 0.0])
    optimizer.step()
    assert weight.detach().tolist() == pytest.approx([-0.1, 0.1, 0.0])


def test_flops_per_token_counts_matmuls_and_attention(tiny_tokenized):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenized[0])
    model = pretrain.build_model(TINY_MODEL, tokenizer)
    vocab = pretrain.padded_vocab_size(len(tokenizer))
    per_layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32  # q,k,v,o + gate,up,down + two norms
    n = vocab * 32 + 2 * per_layer + 32  # tied embedding/head, layers, final norm
    assert pretrain.flops_per_token(TINY_MODEL, model, 32) == 6 * n + 12 * 2 * 32 * 32


def run_in_subprocess(settings: PretrainSettings, tiny_tokenized, out: Path, *, nproc: int = 1, wait: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(settings.model_dump_json())
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command = [
        *launcher,
        str(RUNNER),
        str(out / "settings.json"),
        str(tiny_tokenized[1]),
        str(tiny_tokenized[0]),
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output
    return process


def history_of(root: Path, name: str = "train/loss") -> list[float]:
    rows = (root / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[-1]) for row in rows]


def test_resume_after_kill_9_gives_identical_weights(tiny_tokenized, tmp_path):
    settings = TINY.model_copy(update={"max_steps": 30, "checkpoint_interval": 10, "eval_interval": 10})
    run_in_subprocess(settings, tiny_tokenized, tmp_path / "straight")

    killed = tmp_path / "killed"
    process = run_in_subprocess(settings, tiny_tokenized, killed, wait=False)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000010").is_dir():
        assert process.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # nothing final was written by the killed run: no model, and no half-written curves
    assert not (killed / "model").exists() and not (killed / "live").exists()

    run_in_subprocess(settings, tiny_tokenized, killed)
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(killed / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert history_of(killed) == history_of(tmp_path / "straight")  # the curve has no gap or repeat


def test_changed_settings_never_resume_old_checkpoints(trained, tiny_tokenized, tmp_path):
    _, root = trained
    assert (root / "checkpoints" / "step-000200").is_dir()
    fingerprint = pretrain.settings_fingerprint(TINY, json.loads((tiny_tokenized[1] / "meta.json").read_text()), 1)
    assert pretrain.load_latest_checkpoint(root / "checkpoints", fingerprint) is not None
    assert pretrain.load_latest_checkpoint(root / "checkpoints", "another-fingerprint") is None
    # other threads (compute.threads) change the sums: their run starts over, not from these checkpoints
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        other = pretrain.settings_fingerprint(TINY, json.loads((tiny_tokenized[1] / "meta.json").read_text()), 1)
    finally:
        torch.set_num_threads(threads)
    assert pretrain.load_latest_checkpoint(root / "checkpoints", other) is None


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tiny_tokenized, tmp_path, monkeypatch):
    real_loss, calls = pretrain.causal_lm_loss, {"n": 0}

    def loss_that_breaks(logits, targets):  # training steps 1-7 are fine, step 8 is NaN
        loss = real_loss(logits, targets)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 8:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(pretrain, "causal_lm_loss", loss_that_breaks)
    settings = TINY.model_copy(update={"max_steps": 20, "checkpoint_interval": 3, "eval_interval": 10})
    with pytest.raises(
        pretrain.TrainingDiverged, match=r"diverged at step 8: loss nan.*last good checkpoint \(step 6\)"
    ):
        pretrain.run(settings, tiny_tokenized[1], tiny_tokenized[0], outputs_in(tmp_path))
    weights = load_file(tmp_path / "checkpoints" / "step-000006" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "model").exists() and not (tmp_path / "live").exists()
    assert issubclass(pretrain.TrainingDiverged, RunFailed)  # the stage prints it as one `error:` line


def test_trainer_steps_checkpoints_and_resumes_one_step_at_a_time(tiny_tokenized, tmp_path):
    """The pieces of `run` on their own: a resumed Trainer takes the very step the first one takes."""
    settings = TINY.model_copy(update={"max_steps": 10})

    def trainer():
        return pretrain.set_up(
            settings, tiny_tokenized[1], tiny_tokenized[0], outputs_in(tmp_path), pretrain.Distributed()
        )

    first = trainer()
    results = [pretrain.train_step(first) for _ in range(3)]
    assert first.step == 3 and all(math.isfinite(r.loss) and r.grad_norm > 0 for r in results)
    assert [r.lr for r in results] == pytest.approx(
        [settings.learning_rate * pretrain.lr_factor(settings)(s) for s in range(3)]
    )
    pretrain.record(first, 3, {"train/loss": results[-1].loss})
    pretrain.write_checkpoint(first)

    second = trainer()
    pretrain.resume(second)
    assert second.step == 3 and second.history == first.history
    resumed, straight = pretrain.train_step(second), pretrain.train_step(first)
    assert (resumed.loss, resumed.grad_norm, resumed.lr) == (straight.loss, straight.grad_norm, straight.lr)
    assert math.isnan(resumed.aux_loss) and math.isnan(straight.aux_loss)  # a dense model: no router
    for a, b in zip(first.raw_model.parameters(), second.raw_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tiny_tokenized, tmp_path, strategy):
    """torchrun with 2 CPU processes (gloo) and the same global batch follows the 1-process curve."""
    settings = TINY.model_copy(
        update={
            "max_steps": 12,
            "micro_batch_size": 4,  # 2 processes x 4 sequences = 1 process x 4 sequences x 2 accumulation
            "log_interval": 1,
            "eval_interval": 6,
            "checkpoint_interval": 6,
            "distributed": strategy,
        }
    )
    run_in_subprocess(settings, tiny_tokenized, tmp_path / "one")
    run_in_subprocess(settings, tiny_tokenized, tmp_path / "two", nproc=2)
    one, two = history_of(tmp_path / "one"), history_of(tmp_path / "two")
    assert len(one) == len(two) == 12
    assert one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-4)
    # Rank 0 alone wrote: one model, one set of curves, checkpoints of the whole model.
    assert len(list((tmp_path / "two").rglob("model.safetensors"))) == 3  # model + 2 checkpoints
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").parameters()
    )


def test_mixture_of_experts_from_scratch(tiny_tokenized, tmp_path):
    model = TINY_MODEL.model_copy(update={"architecture": "mixtral", "num_experts": 4, "experts_per_token": 2})
    settings = TINY.model_copy(update={"model": model, "max_steps": 10, "eval_interval": 10, "log_interval": 5})
    summary = pretrain.run(settings, tiny_tokenized[1], tiny_tokenized[0], outputs_in(tmp_path))
    assert summary["val/loss"] < summary["val/loss_at_start"]
    aux = (tmp_path / "live" / "plots" / "metrics" / "train" / "router_aux_loss.tsv").read_text().splitlines()[1:]
    assert len(aux) == 2 and all(float(row.split("\t")[-1]) > 0 for row in aux)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(loaded).__name__ == "MixtralForCausalLM" and loaded.config.num_local_experts == 4


@pytest.mark.parametrize(
    "update",
    [
        {"gradient_checkpointing": True},
        {"precision": "bf16"},
        {"optimizer": "lion", "learning_rate": 3e-3, "schedule": "one_cycle"},
        {"sampling": "documents", "schedule": "constant"},
    ],
    ids=["gradient_checkpointing", "bf16", "lion_one_cycle", "documents"],
)
def test_training_variants(tiny_tokenized, tmp_path, update):
    base = TINY.model_copy(update={"max_steps": 40, "eval_interval": 40, "checkpoint_interval": 40})
    pretrain.run(base.model_copy(update=update), tiny_tokenized[1], tiny_tokenized[0], outputs_in(tmp_path / "variant"))
    losses = history_of(tmp_path / "variant")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 1.0
    if "gradient_checkpointing" in update:  # recomputing activations changes nothing numerically
        pretrain.run(base, tiny_tokenized[1], tiny_tokenized[0], outputs_in(tmp_path / "base"))
        assert losses == pytest.approx(history_of(tmp_path / "base"), rel=1e-5)


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tiny_tokenized, tmp_path):
    """torch.compile (inductor on CPU: about a minute of compiling) gives the eager loss curve."""
    settings = TINY.model_copy(
        update={"max_steps": 10, "log_interval": 5, "eval_interval": 10, "checkpoint_interval": 10}
    )
    pretrain.run(
        settings.model_copy(update={"compile": True}), tiny_tokenized[1], tiny_tokenized[0], outputs_in(tmp_path / "c")
    )
    pretrain.run(settings, tiny_tokenized[1], tiny_tokenized[0], outputs_in(tmp_path / "e"))
    assert history_of(tmp_path / "c") == pytest.approx(history_of(tmp_path / "e"), rel=1e-3)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "c" / "model").config.architectures == ["LlamaForCausalLM"]


def test_too_little_data_for_the_sequence_length_is_bad_input():
    tokens, special = np.arange(10, dtype=np.uint16), {"bos": 0, "eos": 1, "pad": 2}
    with pytest.raises(InputError, match="10 tokens: too few for pretrain.seq_len 64"):
        pretrain.BatchSampler(tokens, 64, "windows", special, seed=0)
    with pytest.raises(InputError, match="pretrain.sampling 'documents' needs BOS tokens"):
        pretrain.BatchSampler(tokens + 3, 4, "documents", special, seed=0)
    with pytest.raises(InputError, match="10 tokens: too few for one window of pretrain.seq_len 64"):
        pretrain.validation_batches(tokens, 64, micro_batch_size=4, max_batches=2)
