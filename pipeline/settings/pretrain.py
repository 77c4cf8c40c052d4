"""The `pretrain` section: the model trained from scratch and how."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from pipeline.settings.base import (
    MAX_EXPERTS,
    MAX_SEQUENCE_TOKENS,
    MicroBatch,
    Section,
    SequenceTokens,
)


class ModelSettings(Section):
    """Architecture of the model trained from scratch (a transformers Llama or Mixtral config)."""

    architecture: Literal["llama", "mixtral"] = Field(
        "llama",
        description="llama: dense LlamaForCausalLM; mixtral: a sparse mixture of experts "
        "(MixtralForCausalLM) with top-k routing and a router load-balancing loss.",
    )
    # the upper bounds are about 4x the largest open models (hidden 16k, 126 layers, 128 heads)
    hidden_size: int = Field(128, ge=8, le=65_536, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, le=1_024, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, le=1_024, description="Attention heads; hidden_size must divide by it.")
    num_kv_heads: int = Field(
        4, ge=1, le=1_024, description="Key/value heads (fewer than num_heads = grouped-query attention)."
    )
    intermediate_size: int = Field(384, ge=1, le=262_144, description="Width of the MLP (of each expert, for mixtral).")
    max_position_embeddings: int = Field(
        256, ge=8, le=MAX_SEQUENCE_TOKENS, description="Longest sequence the model accepts."
    )
    rope_theta: float = Field(10000.0, gt=0, description="Base of the rotary position embedding.")
    tie_embeddings: bool = Field(True, description="Share the input embedding with the output head.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Attention dropout; for short pretraining 0 is good.")
    num_experts: int = Field(4, ge=2, le=MAX_EXPERTS, description="mixtral: experts per MoE layer.")
    experts_per_token: int = Field(2, ge=1, description="mixtral: experts each token is routed to (top-k).")
    router_aux_loss_coef: float = Field(0.01, ge=0, description="mixtral: weight of the load-balancing loss.")

    @model_validator(mode="after")
    def _shapes_fit(self) -> ModelSettings:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be divisible by num_kv_heads {self.num_kv_heads}")
        if self.architecture == "mixtral" and self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token {self.experts_per_token} is more than num_experts {self.num_experts}")
        return self


class PretrainSettings(Section):
    """`pretrain` stage: train the model from scratch on the token files (python -m stages.pretrain)."""

    seed: int = Field(0, description="Seeds weights, batch sampling and dropout.")
    model: ModelSettings = Field(default_factory=ModelSettings)
    seq_len: SequenceTokens = Field(128, description="Tokens per training sequence (<= model.max_position_embeddings).")
    micro_batch_size: MicroBatch = Field(32, description="Sequences per forward/backward on one device.")
    batch_tokens: int = Field(
        4096,
        ge=8,
        le=100_000_000,  # large runs use a few million
        description="Tokens per optimizer step over all devices: micro_batch_size * seq_len * "
        "gradient-accumulation steps * world size. Must divide exactly.",
    )
    max_steps: int = Field(330, ge=1, le=10_000_000, description="Optimizer steps (at most 10 million).")
    sampling: Literal["windows", "documents"] = Field(
        "windows",
        description="windows: random windows of the concatenated corpus (every position trains); "
        "documents: each sequence starts at a document and is padded after its end (padding ignored).",
    )
    optimizer: Literal["adamw", "lion"] = Field(
        "adamw",
        description="adamw: torch's AdamW; lion: Lion (the sign of an interpolated momentum; wants a 3-10x smaller "
        "learning_rate than AdamW).",
    )
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate.")
    schedule: Literal["cosine", "one_cycle", "constant"] = Field(
        "cosine",
        description="cosine: linear warmup from 0, cosine decay to min_lr_ratio; one_cycle: cosine "
        "warmup from learning_rate/25 to the peak, cosine decay to min_lr_ratio; constant: linear warmup, then flat.",
    )
    warmup_steps: int = Field(16, ge=0, le=10_000_000, description="Steps to reach the peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of the peak.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay, applied to matrices only.")
    beta1: float = Field(
        0.9, ge=0, lt=1, description="AdamW: decay of the gradient average; lion: interpolation of the update."
    )
    beta2: float = Field(
        0.95, ge=0, lt=1, description="AdamW: decay of the squared-gradient average; lion: decay of the momentum."
    )
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: no clipping).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it, fp32 otherwise (CPU)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="torch.compile the model (pays on GPU; on a 2-core CPU it does not).")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="How to train under torchrun with several processes: DistributedDataParallel or FSDP."
    )
    log_interval: int = Field(10, ge=1, description="Steps between train-loss log lines.")
    eval_interval: int = Field(50, ge=1, description="Steps between validation evals (also at the last step).")
    eval_max_batches: int = Field(20, ge=1, description="Cap on validation micro-batches per eval.")
    checkpoint_interval: int = Field(100, ge=1, description="Steps between resumable checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["The capital of", "One morning in", "Seven plus two is"],
        description="Prompts generated from at step 0 and at the end (greedy and sampled).",
    )
    sample_max_new_tokens: int = Field(32, ge=1, le=8_192, description="Tokens generated per sample (a peek).")
    sample_temperature: float = Field(0.8, gt=0, description="Temperature of the sampled (not greedy) samples.")
    sample_top_k: int = Field(20, ge=1, description="Sampled samples draw from this many most likely tokens.")
    peak_flops: float | None = Field(
        None, gt=0, description="Device peak FLOP/s for MFU; null: measured once with a matmul micro-benchmark."
    )

    @model_validator(mode="after")
    def _sizes_fit(self) -> PretrainSettings:
        if self.seq_len > self.model.max_position_embeddings:
            raise ValueError(
                f"seq_len {self.seq_len} is longer than model.max_position_embeddings "
                f"{self.model.max_position_embeddings}"
            )
        per_micro_batch = self.micro_batch_size * self.seq_len
        if self.batch_tokens % per_micro_batch:
            raise ValueError(
                f"batch_tokens {self.batch_tokens} must be a multiple of micro_batch_size * seq_len = {per_micro_batch}"
            )
        if self.warmup_steps >= self.max_steps and self.schedule != "constant":
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below max_steps {self.max_steps}")
        return self


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = PretrainSettings
