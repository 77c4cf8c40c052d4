"""`pretrain` stage: a small Llama (or Mixtral MoE) trained from scratch in plain PyTorch.

    python -m stages.pretrain --tokens data/tokens --tokenizer models/tokenizer \
        --model models/pretrain --checkpoints models/pretrain_checkpoints \
        --live metrics/pretrain --samples metrics/pretrain_samples.md --metrics metrics/pretrain.json

    torchrun --nproc_per_node=2 -m stages.pretrain ...     (same arguments; DDP or FSDP)

Inputs: the token files and tokenizer of the tokenize stage.
Outputs (rank 0 writes them):
- model/: a Hugging Face model folder (safetensors, config, generation config, tokenizer, model card).
- checkpoints/: resumable state (weights, optimizer, schedule, batch sampler, torch's RNG, the
  logged history and samples) every `checkpoint_interval` steps and at the last one. A rerun with
  the same settings, token data, number of processes and code (this file) continues from the
  newest readable checkpoint (one cut short is skipped with a warning) and ends with the same
  weights, curves and samples as an uninterrupted run (bitwise on CPU with fixed threads). Other
  checkpoints are never resumed, and stay until this run has written its first one; from then on
  only the newest `keep_checkpoints` of this run are kept. The folder is deliberately not a DVC
  output (dvc.yaml): DVC never deletes it before a rerun, so a killed run continues, and never
  tracks it, so it neither makes the stage look changed after an experiment nor keeps the stage
  out of the run-cache (a `persist` output would do both).
- live/: dvclive curves (train loss, lr, grad norm; val loss, perplexity, accuracy), written as
  training goes into a temporary folder (pipeline/atomic.py, under .tmp/) that replaces live/ once
  the model is written: a killed run never leaves half-written curves under the final name.
- samples: greedy and sampled generations at step 0 and at the end, as markdown.
- metrics: final summary JSON.
- timing (--timing, optional): tokens/s and MFU per log interval. Timings differ on every run, so
  they stay out of the outputs DVC hashes (dvc.yaml writes them to logs/, which nothing tracks).

`run` is the stage in order: `set_up` (data, the model wrapped for DDP/FSDP, optimizer and
schedule; torch's RNG seeded, then drawn for the weights and the peak-FLOPs benchmark) ->
`resume` (the newest matching checkpoint, RNG state included) -> `open_curves` -> `fit` (the
step-0 samples and evaluation, then `train_step` per optimizer step and `after_step` to log,
evaluate, sample and checkpoint on schedule) -> `summarize` -> `write_outputs`, the last four
inside `curves_folder` (the curves' temporary, moved to live/ at the end). One `Trainer`
holds the run's state. A loss or gradient norm that stops being finite ends the run with
TrainingDiverged (printed as one `error:` line), naming the last good checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.atomic import atomic_dir, dumps_json, write_json, write_text
from pipeline.lineage import json_block, render_card, write_lineage
from pipeline.settings.base import InputError
from pipeline.settings.pretrain import ModelSettings, PretrainSettings
from pipeline.stage import RunFailed, configure_environment, resolve_device, start, use_bf16

log = logging.getLogger("stages.pretrain")

# The one label value the loss ignores; the batch builder writes it wherever a position must
# not train (padding). Both use this constant, so they cannot disagree.
IGNORE_INDEX = -100
VOCAB_MULTIPLE = 64  # embedding rows are padded to this multiple: faster matmuls, same tokens


class TrainingDiverged(RunFailed):
    """The loss or the gradient norm stopped being finite."""


# Model


def padded_vocab_size(n_tokens: int) -> int:
    return math.ceil(n_tokens / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def model_config(settings: ModelSettings, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, MixtralConfig

    common = dict(
        vocab_size=padded_vocab_size(len(tokenizer)),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        max_position_embeddings=settings.max_position_embeddings,
        rope_theta=settings.rope_theta,
        tie_word_embeddings=settings.tie_embeddings,
        attention_dropout=settings.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if settings.architecture == "mixtral":
        config = MixtralConfig(
            **common,
            num_local_experts=settings.num_experts,
            num_experts_per_tok=settings.experts_per_token,
            router_aux_loss_coef=settings.router_aux_loss_coef,
            output_router_logits=True,
        )
    else:
        config = LlamaConfig(**common)
    config._attn_implementation = "sdpa"
    return config


def build_model(settings: ModelSettings, tokenizer: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model_config(settings, tokenizer), attn_implementation="sdpa")


def flops_per_token(settings: ModelSettings, model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (active ones for MoE) + attention.

    The standard estimate (Kaplan et al.; PaLM appendix B): 6N for forward and backward through
    the weight matrices, plus 12 * layers * hidden * seq_len for attention scores and values.
    The input embedding is a lookup, not a matmul, so it counts only when tied to the head.
    """
    n = 0
    for name, parameter in model.named_parameters():
        if "embed_tokens" in name and not settings.tie_embeddings:
            continue
        count = parameter.numel()
        if ".experts." in name:  # only experts_per_token of num_experts run for each token
            count = count * settings.experts_per_token // settings.num_experts
        n += count
    return 6 * n + 12 * settings.num_layers * settings.hidden_size * seq_len


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achievable matmul FLOP/s of this device: the ceiling MFU is measured against."""
    size = 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    repeats, started = 5, time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


# Data


class BatchSampler:
    """Training sequences drawn at random from the flat token file.

    All ranks draw every optimizer step's sequences from one generator with the same seed and
    keep their own slice, so N processes see exactly the sequences one process would.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, mode: str, special_ids: dict[str, int], seed: int):
        self.tokens, self.seq_len, self.mode = tokens, seq_len, mode
        self.bos, self.eos, self.pad = special_ids["bos"], special_ids["eos"], special_ids["pad"]
        if len(tokens) <= seq_len + 1:
            raise InputError(f"the training split has {len(tokens)} tokens: too few for pretrain.seq_len {seq_len}")
        self.starts = np.flatnonzero(tokens == self.bos) if mode == "documents" else None
        if mode == "documents" and not len(self.starts):
            raise InputError("pretrain.sampling 'documents' needs BOS tokens in the token file; none found")
        self.generator = torch.Generator().manual_seed(seed)

    def sequence(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        window = self.tokens[start : start + self.seq_len + 1].astype(np.int64)
        if len(window) < self.seq_len + 1:  # a document near the end of the file
            window = np.concatenate([window, np.full(self.seq_len + 1 - len(window), self.pad)])
        inputs, targets = window[:-1].copy(), window[1:].copy()
        if self.mode == "documents":
            ends = np.flatnonzero(inputs == self.eos)
            if len(ends):  # the document ends inside the window: pad after it, train on none of it
                end = ends[0]
                inputs[end + 1 :] = self.pad
                targets[end:] = IGNORE_INDEX
        return inputs, targets

    def next_batch(self, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "documents":
            picks = torch.randint(0, len(self.starts), (n_sequences,), generator=self.generator)
            starts = self.starts[picks.numpy()]
        else:
            starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (n_sequences,), generator=self.generator)
        pairs = [self.sequence(int(s)) for s in starts]
        return (
            torch.from_numpy(np.stack([p[0] for p in pairs])),
            torch.from_numpy(np.stack([p[1] for p in pairs])),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def validation_batches(
    tokens: np.ndarray, seq_len: int, micro_batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start of the val split: the same every eval."""
    n_windows = min((len(tokens) - 1) // seq_len, micro_batch_size * max_batches)
    if n_windows < 1:
        raise InputError(
            f"the val split has {len(tokens)} tokens: too few for one window of pretrain.seq_len {seq_len}"
        )
    batches = []
    for first in range(0, n_windows, micro_batch_size):
        rows = range(first, min(first + micro_batch_size, n_windows))
        windows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int64) for i in rows])
        batches.append((torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])))
    return batches


# Optimization


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an
    interpolated momentum, decoupled weight decay. Use ~3-10x smaller learning rates than AdamW."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                momentum = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = momentum.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                momentum.mul_(beta2).add_(p.grad, alpha=1 - beta2)


def build_optimizer(model: torch.nn.Module, settings: PretrainSettings) -> torch.optim.Optimizer:
    """Weight decay on matrices only: decaying norms' gains and biases only hurts."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]
    betas = (settings.beta1, settings.beta2)
    if settings.optimizer == "lion":
        return Lion(groups, lr=settings.learning_rate, betas=betas)
    # fused needs every parameter on one device type that supports it; DTensors (FSDP) use foreach
    fused = all(p.device.type in ("cuda", "cpu") and type(p) is torch.nn.Parameter for p in parameters)
    return torch.optim.AdamW(groups, lr=settings.learning_rate, betas=betas, fused=fused)


def lr_factor(settings: PretrainSettings) -> Callable[[int], float]:
    """Learning rate at each step, as a share of the peak (for LambdaLR)."""
    warmup, total, floor = settings.warmup_steps, settings.max_steps, settings.min_lr_ratio

    def cosine(progress: float, high: float, low: float) -> float:
        return low + (high - low) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    def factor(step: int) -> float:
        if settings.schedule == "constant":
            return min(1.0, (step + 1) / warmup) if warmup else 1.0
        if settings.schedule == "one_cycle":
            if step < warmup:  # cosine rise from peak/25 (as torch's OneCycleLR) to the peak
                return cosine(step / warmup, 1 / 25, 1.0)
            return cosine((step - warmup) / max(1, total - warmup), 1.0, floor)
        if step < warmup:
            return (step + 1) / warmup
        return cosine((step - warmup) / max(1, total - warmup), 1.0, floor)

    return factor


# Loss and evaluation


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not IGNORE_INDEX (targets are pre-shifted)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def forward_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(loss to backpropagate, router load-balancing loss or nan for dense models)."""
    output = model(input_ids=inputs)
    loss = causal_lm_loss(output.logits, targets)
    aux = getattr(output, "aux_loss", None)
    if aux is not None:
        config = model.config if hasattr(model, "config") else model.module.config
        loss = loss + config.router_aux_loss_coef * aux
        return loss, aux.item()
    return loss, float("nan")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, autocast: Any
) -> dict[str, float]:
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast():
            logits = model(input_ids=inputs).logits
        mask = targets != IGNORE_INDEX
        n = int(mask.sum())
        total_loss += float(causal_lm_loss(logits, targets)) * n
        correct += int((logits.argmax(-1) == targets)[mask].sum())
        count += n
    model.train()
    loss = total_loss / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / count}


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module, tokenizer: Any, settings: PretrainSettings, device: torch.device
) -> list[dict[str, str]]:
    """Greedy and sampled continuations of the fixed prompts, without touching training RNG."""
    model.eval()
    samples = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        for prompt in settings.sample_prompts:
            inputs = tokenizer(prompt, return_tensors="pt").to(device)
            common = dict(max_new_tokens=settings.sample_max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            greedy = model.generate(**inputs, do_sample=False, **common)
            sampled = model.generate(
                **inputs, do_sample=True, temperature=settings.sample_temperature, top_k=settings.sample_top_k, **common
            )
            prompt_length = inputs["input_ids"].shape[1]
            samples.append(
                {
                    "prompt": prompt,
                    "greedy": tokenizer.decode(greedy[0, prompt_length:], skip_special_tokens=True),
                    "sampled": tokenizer.decode(sampled[0, prompt_length:], skip_special_tokens=True),
                }
            )
    model.train()
    return samples


def samples_markdown(by_step: dict[int, list[dict[str, str]]]) -> str:
    lines = ["# Pretraining samples", "", "Continuations of the fixed prompts in `params.yaml` (prompt in bold).", ""]
    for step, samples in sorted(by_step.items()):
        lines += [f"## Step {step}", ""]
        for sample in samples:
            lines.append(f"- greedy: **{sample['prompt']}**{sample['greedy']}")
            lines.append(f"- sampled: **{sample['prompt']}**{sample['sampled']}")
        lines.append("")
    return "\n".join(lines)


# Distributed


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Distributed:
    """Join the process group when launched by torchrun (it sets WORLD_SIZE/RANK/LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    dist = Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group(backend=backend)
    return dist


def full_model_state(model: torch.nn.Module, dist: Distributed) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (gathered from all ranks under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: Distributed) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not dist.enabled:
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a full state dict; a tied output head may be absent (it is stored once), nothing else."""
    result = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(
            f"weights do not fit the model: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )


def load_full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optimizer_state: dict, dist: Distributed
) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not dist.enabled:
        load_weights(model, weights)
        optimizer.load_state_dict(optimizer_state)
        return
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


# Checkpoints


def settings_fingerprint(settings: PretrainSettings, tokens_meta: dict, world_size: int) -> str:
    """What a checkpoint must match to be resumed: settings, data, world size, this code (DVC reruns
    the stage when the code changes; resuming the old run would undo that) and the CPU kernels and
    threads in use (`compute`: they change the sums, so a run with other ones must start over)."""
    payload = {
        "settings": settings.model_dump(mode="json"),
        "tokens": tokens_meta,
        "world_size": world_size,
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(dumps_json(payload).encode()).hexdigest()[:16]


# Whose settings made a checkpoint: plain JSON, read before anything else of it is loaded.
CHECKPOINT_INFO = "checkpoint.json"


def checkpoint_steps(directory: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in directory.glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name)))


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:06d}"


def checkpoint_fingerprint(path: Path) -> str | None:
    """The settings fingerprint a checkpoint folder declares; None when it declares none readable."""
    try:
        return json.loads((path / CHECKPOINT_INFO).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_checkpoint(directory: Path, step: int, fingerprint: str, weights: dict, state: dict, keep: int) -> None:
    """Write step's checkpoint, then remove all others but the newest `keep` of these settings.

    Checkpoints of other settings go only now, once one of this run exists: a run stopped
    before its first checkpoint (a mistaken setting) has destroyed nothing.
    """
    from safetensors.torch import save_file

    with atomic_dir(checkpoint_path(directory, step)) as tmp:
        unique: dict[int, tuple[str, torch.Tensor]] = {}
        for name, tensor in weights.items():  # tied weights (embedding = head) are stored once
            unique.setdefault(tensor.data_ptr(), (name, tensor.contiguous()))
        save_file(dict(unique.values()), tmp / "model.safetensors")
        torch.save(state, tmp / "trainer_state.pt")
        (tmp / CHECKPOINT_INFO).write_text(dumps_json({"fingerprint": fingerprint, "step": step}))
    steps = checkpoint_steps(directory)
    ours = [s for s in steps if checkpoint_fingerprint(checkpoint_path(directory, s)) == fingerprint]
    for old in steps:
        if old not in ours[-keep:]:
            shutil.rmtree(checkpoint_path(directory, old))


def load_latest_checkpoint(directory: Path, fingerprint: str) -> tuple[dict, dict] | None:
    """(weights, trainer state) of the newest readable checkpoint made with these settings, or None.

    Only tensors and plain data are unpickled (weights_only), and only after the checkpoint's
    JSON fingerprint matched: a tampered trainer_state.pt cannot run code. A checkpoint that
    cannot be read (a copy cut short) is skipped with a warning for the one before it.
    """
    from safetensors.torch import load_file

    steps = checkpoint_steps(directory) if directory.is_dir() else []
    unreadable = []
    for step in reversed(steps):
        path = checkpoint_path(directory, step)
        if checkpoint_fingerprint(path) != fingerprint:
            log.info("checkpoint %s: other settings or data (or no readable %s): not resumed", path, CHECKPOINT_INFO)
            continue
        try:
            weights = load_file(path / "model.safetensors")
            state = torch.load(path / "trainer_state.pt", weights_only=True)
        except Exception as error:  # cut short, corrupt, or holding more than tensors and plain data
            log.warning("checkpoint %s is unreadable, trying the one before it: %s", path, error)
            unreadable.append(path)
            continue
        log.info("resuming from %s", path)
        return weights, state
    if unreadable:
        log.warning("no readable checkpoint of these settings in %s: starting afresh", directory)
    return None


# Training state


@dataclass
class Outputs:
    model_dir: Path
    checkpoint_dir: Path
    live_dir: Path
    samples_path: Path
    timing_path: Path | None = None


@dataclass
class Throughput:
    """This process's tokens/s and MFU over each log interval: never resumed and never hashed
    (the timing file; see the module docstring). Evaluation and checkpoint time is left out."""

    flops_per_token: float
    peak_flops: float
    started: float = 0.0  # time.perf_counter() when the window started
    tokens: int = 0  # tokens trained in this window
    log: list[dict[str, float]] = field(default_factory=list)

    def restart(self) -> None:
        self.started, self.tokens = time.perf_counter(), 0

    def measure(self, step: int) -> float:
        """Append the window's tokens/s and MFU to the log and return the tokens/s."""
        tokens_per_second = self.tokens / (time.perf_counter() - self.started)
        mfu = tokens_per_second * self.flops_per_token / self.peak_flops
        self.log.append({"step": step, "tokens_per_second": tokens_per_second, "mfu": mfu})
        return tokens_per_second


@dataclass
class Trainer:
    """One training run: what set_up builds, resume restores and fit advances step by step.

    `model` runs forward and backward (DDP's or torch.compile's wrapper, or the model itself);
    `raw_model` is the transformers model under it, whose parameters the optimizer, clipping,
    checkpoints and samples use. Everything a checkpoint restores lives here: `step` (optimizer
    steps done), the optimizer, scheduler and sampler, `history` (every logged record, for the
    curves) and `samples` (by step).
    """

    settings: PretrainSettings
    tokens_dir: Path  # the model's parent in its lineage
    outputs: Outputs
    dist: Distributed
    device: torch.device
    tokenizer: Any
    sampler: BatchSampler
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]
    accumulation: int  # micro-batches per optimizer step on each rank
    model: torch.nn.Module
    raw_model: torch.nn.Module
    n_params: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    autocast: Callable[[], Any]
    throughput: Throughput
    fingerprint: str  # what a checkpoint must match to be resumed
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[int, list[dict[str, str]]] = field(default_factory=dict)
    live: Any = None  # the dvclive curves (rank 0 only)


@dataclass
class StepResult:
    """What one optimizer step measured (averaged over ranks): its loss, the router
    load-balancing loss (nan for dense models), the gradient norm before clipping, and the
    learning rate the step used."""

    loss: float
    aux_loss: float
    grad_norm: float
    lr: float


# Set-up


def training_device(dist: Distributed) -> torch.device:
    """This process's device: under torchrun each rank its own GPU (cuda:LOCAL_RANK), else the CPU."""
    device = resolve_device()
    return torch.device(f"cuda:{dist.local_rank}" if device == "cuda" else device)


def accumulation_steps(settings: PretrainSettings, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank; bad input when batch_tokens does not divide."""
    per_step = settings.micro_batch_size * settings.seq_len * world_size
    if settings.batch_tokens % per_step:
        raise InputError(
            f"pretrain.batch_tokens {settings.batch_tokens} is not a multiple of micro_batch_size * seq_len "
            f"* world size = {per_step}; change batch_tokens or micro_batch_size"
        )
    return settings.batch_tokens // per_step


def autocast_context(bf16: bool, device: torch.device) -> Callable[[], Any]:
    """A factory of the context each forward runs in: bf16 autocast, or nothing (fp32)."""
    if bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def wrap_model(
    raw_model: torch.nn.Module, settings: PretrainSettings, dist: Distributed, device: torch.device
) -> torch.nn.Module:
    """What runs forward under torchrun: the model sharded in place (FSDP) or wrapped in DDP."""
    if settings.gradient_checkpointing:
        raw_model.gradient_checkpointing_enable()
    if dist.enabled and settings.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in raw_model.model.layers:
            fully_shard(layer)
        fully_shard(raw_model)
    elif dist.enabled:
        return torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[dist.local_rank] if device.type == "cuda" else None
        )
    return raw_model


def set_up(
    settings: PretrainSettings, tokens_dir: Path, tokenizer_dir: Path, outputs: Outputs, dist: Distributed
) -> Trainer:
    """Data, model (wrapped for DDP/FSDP), optimizer and schedule of a fresh run at step 0.

    torch's global RNG is seeded here and draws, in this order, the initial weights and the
    peak-FLOPs benchmark's matrices; training (dropout) goes on from there, or from a checkpoint's
    RNG state when one is resumed.
    """
    from transformers import AutoTokenizer

    device = training_device(dist)
    meta = json.loads((tokens_dir / "meta.json").read_text())
    accumulation = accumulation_steps(settings, dist.world_size)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_tokens = np.memmap(tokens_dir / "train.bin", dtype=meta["dtype"], mode="r")
    val_tokens = np.memmap(tokens_dir / "val.bin", dtype=meta["dtype"], mode="r")
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    sampler = BatchSampler(train_tokens, settings.seq_len, settings.sampling, special, settings.seed)
    val_batches = validation_batches(val_tokens, settings.seq_len, settings.micro_batch_size, settings.eval_max_batches)

    torch.manual_seed(settings.seed)
    raw_model = build_model(settings.model, tokenizer).to(device)
    n_params = sum(p.numel() for p in raw_model.parameters())
    flops = flops_per_token(settings.model, raw_model, settings.seq_len)
    model = wrap_model(raw_model, settings, dist, device)
    optimizer = build_optimizer(raw_model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(settings))
    if settings.compile:
        model = torch.compile(model)
    bf16 = use_bf16(settings.precision, device.type)
    peak_flops = settings.peak_flops or measure_peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    return Trainer(
        settings=settings,
        tokens_dir=tokens_dir,
        outputs=outputs,
        dist=dist,
        device=device,
        tokenizer=tokenizer,
        sampler=sampler,
        val_batches=val_batches,
        accumulation=accumulation,
        model=model,
        raw_model=raw_model,
        n_params=n_params,
        optimizer=optimizer,
        scheduler=scheduler,
        autocast=autocast_context(bf16, device),
        throughput=Throughput(flops, peak_flops),
        fingerprint=settings_fingerprint(settings, meta, dist.world_size),
    )


# Resume and checkpoints


def resume(trainer: Trainer) -> None:
    """Continue from the newest readable checkpoint of these settings, if there is one."""
    resumed = load_latest_checkpoint(trainer.outputs.checkpoint_dir, trainer.fingerprint)
    if not resumed:
        return
    weights, state = resumed
    load_full_state(trainer.raw_model, trainer.optimizer, weights, state["optimizer"], trainer.dist)
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["torch_rng"])
    trainer.step, trainer.history = state["step"], state["history"]
    trainer.samples = {int(k): v for k, v in state["samples"].items()}


def write_checkpoint(trainer: Trainer) -> None:
    """Checkpoint the step just done: every rank hands over its shards, rank 0 writes."""
    weights = full_model_state(trainer.raw_model, trainer.dist)
    optimizer_state = full_optimizer_state(trainer.raw_model, trainer.optimizer, trainer.dist)
    if trainer.dist.is_main:
        state = {
            "step": trainer.step,
            "optimizer": optimizer_state,
            "scheduler": trainer.scheduler.state_dict(),
            "sampler": trainer.sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": trainer.history,
            "samples": trainer.samples,
        }
        directory, keep = trainer.outputs.checkpoint_dir, trainer.settings.keep_checkpoints
        save_checkpoint(directory, trainer.step, trainer.fingerprint, weights, state, keep)
    if trainer.dist.enabled:
        torch.distributed.barrier()


# Curves


def replay_history(live: Any, history: list[dict[str, Any]]) -> None:
    """Write logged records to dvclive, e.g. after a resume, so the curves have no gap."""
    for record in history:
        live.step = record["step"]
        for name, value in record["metrics"].items():
            live.log_metric(name, value)


def curves_folder(trainer: Trainer) -> contextlib.AbstractContextManager[Path | None]:
    """Rank 0's temporary curves folder, which replaces live_dir when the run ends well (a resumed
    run writes its curves afresh from the checkpoint's history); None on the other ranks."""
    return atomic_dir(trainer.outputs.live_dir) if trainer.dist.is_main else contextlib.nullcontext(None)


def open_curves(trainer: Trainer, folder: Path | None) -> None:
    """Start the dvclive curves in `folder` (rank 0's) with every record logged so far (a resumed run's)."""
    from pipeline.curves import curve_logger

    if folder is not None:
        trainer.live = curve_logger(folder)
        replay_history(trainer.live, trainer.history)


def record(trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
    """Add a step's metrics to the history (checkpointed) and the curves."""
    trainer.history.append({"step": step, "metrics": metrics})
    if trainer.live:
        replay_history(trainer.live, trainer.history[-1:])


# The training loop


def train_step(trainer: Trainer) -> StepResult:
    """One optimizer step: this rank's share of the next batch in micro-batches (DDP syncs the
    gradients on the last), clipping, the losses averaged over ranks, a check that they are
    finite, then the optimizer and schedule steps. Raises TrainingDiverged before the update."""
    settings, dist = trainer.settings, trainer.dist
    inputs, targets = trainer.sampler.next_batch(settings.batch_tokens // settings.seq_len)
    # this rank's share, as accumulation x micro-batch
    inputs = inputs.view(dist.world_size, trainer.accumulation, settings.micro_batch_size, -1)[dist.rank]
    targets = targets.view(dist.world_size, trainer.accumulation, settings.micro_batch_size, -1)[dist.rank]
    loss_sum, aux_sum = 0.0, 0.0
    for micro in range(trainer.accumulation):
        last = micro == trainer.accumulation - 1
        model = trainer.model
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, trainer.autocast():
            loss, aux = forward_loss(model, inputs[micro].to(trainer.device), targets[micro].to(trainer.device))
            (loss / trainer.accumulation).backward()
        loss_sum += loss.item() / trainer.accumulation
        aux_sum += aux / trainer.accumulation
    clip = settings.grad_clip if settings.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainer.raw_model.parameters(), clip))
    if dist.enabled:
        reduced = torch.tensor([loss_sum, aux_sum], device=trainer.device)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.AVG)
        loss_sum, aux_sum = reduced.tolist()
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        raise diverged(trainer, loss_sum, grad_norm)
    lr = trainer.scheduler.get_last_lr()[0]
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    trainer.step += 1
    return StepResult(loss_sum, aux_sum, grad_norm, lr)


def diverged(trainer: Trainer, loss: float, grad_norm: float) -> TrainingDiverged:
    """The error of a step whose loss or gradient norm is not finite, naming the last good checkpoint."""
    directory = trainer.outputs.checkpoint_dir
    kept = checkpoint_steps(directory) if directory.is_dir() else []
    return TrainingDiverged(
        f"pretrain diverged at step {trainer.step + 1}: loss {loss}, gradient norm {grad_norm}. "
        + (f"The last good checkpoint (step {kept[-1]}) is kept in {directory}. " if kept else "")
        + "Lower pretrain.learning_rate or raise pretrain.warmup_steps."
    )


def validation_metrics(trainer: Trainer) -> dict[str, float]:
    """Validation loss, perplexity and accuracy. Every rank evaluates: under FSDP each one takes
    part in the forward."""
    result = evaluate(trainer.model, trainer.val_batches, trainer.device, trainer.autocast)
    return {f"val/{k}": v for k, v in result.items()}


def train_metrics(trainer: Trainer, result: StepResult, progress: tqdm) -> dict[str, float]:
    """The curves' train metrics of a log step; the window's throughput goes to the timing log."""
    tokens_per_second = trainer.throughput.measure(trainer.step)
    metrics = {"train/loss": result.loss, "train/lr": result.lr, "train/grad_norm": result.grad_norm}
    if not math.isnan(result.aux_loss):
        metrics["train/router_aux_loss"] = result.aux_loss
    progress.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tokens_per_second:.0f}")
    return metrics


def after_step(trainer: Trainer, result: StepResult, progress: tqdm) -> None:
    """Log, evaluate, sample and checkpoint where the schedule says, after the step just done."""
    settings, done = trainer.settings, trainer.step
    last = done == settings.max_steps
    metrics: dict[str, float] = {}
    if done % settings.log_interval == 0 or last:
        metrics = train_metrics(trainer, result, progress)
    if done % settings.eval_interval == 0 or last:
        metrics.update(validation_metrics(trainer))
        log.info("step %d: train loss %.4f, val loss %.4f, val accuracy %.3f", done, result.loss,
                 metrics["val/loss"], metrics["val/accuracy"])  # fmt: skip
    if metrics:
        record(trainer, done, metrics)
        trainer.throughput.restart()
    if last:
        trainer.samples[done] = generate_samples(trainer.raw_model, trainer.tokenizer, settings, trainer.device)
    if done % settings.checkpoint_interval == 0 or last:
        write_checkpoint(trainer)
        trainer.throughput.started = time.perf_counter()  # checkpoint time is not training throughput


def fit(trainer: Trainer) -> None:
    """Train from trainer.step to max_steps, after the step-0 samples and evaluation (a resumed
    run has them already)."""
    settings, dist = trainer.settings, trainer.dist
    log.info(
        "%s: %.2fM parameters, %d steps of %d tokens (%d x %d x %d accumulation x %d processes), %.0f GFLOP/s peak",
        settings.model.architecture, trainer.n_params / 1e6, settings.max_steps, settings.batch_tokens,
        settings.micro_batch_size, settings.seq_len, trainer.accumulation, dist.world_size,
        trainer.throughput.peak_flops / 1e9,
    )  # fmt: skip
    if 0 not in trainer.samples:
        trainer.samples[0] = generate_samples(trainer.raw_model, trainer.tokenizer, settings, trainer.device)
    if trainer.step == 0:
        record(trainer, 0, validation_metrics(trainer))
    trainer.model.train()
    progress = tqdm(
        total=settings.max_steps, initial=trainer.step, desc="pretrain", unit="step", disable=not dist.is_main
    )
    trainer.throughput.restart()
    while trainer.step < settings.max_steps:
        result = train_step(trainer)
        trainer.throughput.tokens += settings.batch_tokens
        progress.update()
        after_step(trainer, result, progress)
    progress.close()


# Outputs


def summarize(trainer: Trainer) -> dict[str, Any]:
    """The final metrics (metrics/pretrain.json and the model card)."""
    settings, history = trainer.settings, trainer.history
    final = history[-1]["metrics"]
    return {
        "train/loss": round(final["train/loss"], 4),
        "val/loss": round(final["val/loss"], 4),
        "val/perplexity": round(final["val/perplexity"], 3),
        "val/accuracy": round(final["val/accuracy"], 4),
        "val/loss_at_start": round(history[0]["metrics"]["val/loss"], 4),
        "steps": settings.max_steps,
        "tokens": settings.max_steps * settings.batch_tokens,
        "parameters": trainer.n_params,
    }


def pretrain_model_card(settings: PretrainSettings, summary: dict[str, Any], n_params: int) -> str:
    rows = "\n".join(f"| `{key}` | {value} |" for key, value in sorted(summary.items()))
    return render_card(
        f"Pretrained {settings.model.architecture} ({n_params / 1e6:.2f}M parameters)",
        "Trained from scratch by this project's `pretrain` stage (`python -m stages.pretrain`) on the\n"
        "token files of the `tokenize` stage. Load it with\n"
        "`AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`.",
        {
            "Final metrics": f"| metric | value |\n| --- | --- |\n{rows}\n",
            "Settings (`pretrain` in params.yaml)": json_block(settings.model_dump(mode="json")),
        },
    )


def export_model(trainer: Trainer, weights: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
    """Write the Hugging Face model folder: weights, config, generation config, tokenizer, card, lineage."""
    from transformers import GenerationConfig

    settings, tokenizer = trainer.settings, trainer.tokenizer
    with atomic_dir(trainer.outputs.model_dir) as tmp:
        export = build_model(settings.model, tokenizer)
        load_weights(export, weights)
        export.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        export.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(pretrain_model_card(settings, summary, trainer.n_params))
        parents, lineage_settings = [str(trainer.tokens_dir)], settings.model_dump(mode="json")
        write_lineage(tmp, "base", "pretrain", "pretrain", parents, lineage_settings)


def write_outputs(trainer: Trainer, summary: dict[str, Any]) -> None:
    """The model folder, samples and timing, written by rank 0 once every rank gave its weights."""
    weights = full_model_state(trainer.raw_model, trainer.dist)
    if trainer.dist.is_main:
        export_model(trainer, weights, summary)
        write_text(trainer.outputs.samples_path, samples_markdown(trainer.samples))
        if trainer.outputs.timing_path:
            timing = {"peak_flops": trainer.throughput.peak_flops, "threads": torch.get_num_threads()}
            write_json(trainer.outputs.timing_path, timing | {"log": trainer.throughput.log})
    if trainer.dist.enabled:
        torch.distributed.barrier()


def run(
    settings: PretrainSettings,
    tokens_dir: Path,
    tokenizer_dir: Path,
    outputs: Outputs,
    dist: Distributed | None = None,
) -> dict[str, Any]:
    """Train (or resume), write every output on rank 0, and return the summary metrics."""
    trainer = set_up(settings, tokens_dir, tokenizer_dir, outputs, dist or init_distributed())
    resume(trainer)
    with curves_folder(trainer) as curves:
        open_curves(trainer, curves)
        fit(trainer)
        summary = summarize(trainer)
        write_outputs(trainer, summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=Path, required=True, help="folder with train.bin, val.bin, meta.json")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder")
    parser.add_argument("--model", type=Path, required=True, help="output model folder")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resumable checkpoints (kept between runs)")
    parser.add_argument("--live", type=Path, required=True, help="dvclive folder (curves)")
    parser.add_argument("--samples", type=Path, required=True, help="generated samples (markdown)")
    parser.add_argument("--metrics", type=Path, required=True, help="summary JSON (a DVC metric)")
    parser.add_argument("--timing", type=Path, help="tokens/s and MFU (JSON; not an output: differs every run)")
    args = parser.parse_args(argv)
    params = start("pretrain")
    configure_environment()
    dist = init_distributed()
    outputs = Outputs(args.model, args.checkpoints, args.live, args.samples, args.timing)
    summary = run(params.pretrain, args.tokens, args.tokenizer, outputs, dist)  # TrainingDiverged: one error line
    if dist.is_main:
        write_json(args.metrics, summary)
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
