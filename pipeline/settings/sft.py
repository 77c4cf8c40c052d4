"""The `sft` section: the settings every axolotl SFT run shares, and the overrides a run may give."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    create_model,
)

from pipeline.settings.base import (
    MicroBatch,
    Section,
    SequenceTokens,
)

SFTSteps = Annotated[int, Field(ge=1, le=1_000_000)]  # fine-tuning runs are far shorter than pretraining


SFTWarmupSteps = Annotated[int, Field(ge=0, le=1_000_000)]


AccumulationSteps = Annotated[int, Field(ge=1, le=10_000)]


LoraRank = Annotated[int, Field(ge=1, le=65_536)]  # at most the widest hidden_size


ReplayRows = Annotated[int, Field(ge=0, le=10_000_000)]


class SFTSettings(Section):
    """`sft`: supervised fine-tuning through axolotl, the settings every run shares (the experts, the
    dense baseline, the MoE runs); `finetune.defaults`, `mixture.defaults` and each run may override any."""

    max_steps: SFTSteps = Field(600, description="Optimizer steps (at most a million).")
    learning_rate: float = Field(0.002, gt=0, description="Peak learning rate.")
    micro_batch_size: MicroBatch = Field(32, description="Rows per forward pass on one device.")
    gradient_accumulation_steps: AccumulationSteps = Field(
        1, description="Micro-batches per optimizer step on each process."
    )
    sequence_len: SequenceTokens = Field(128, description="Longest row in tokens; axolotl drops longer rows.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine",
        description="transformers' learning-rate schedule: cosine or linear decay to 0 after warmup; "
        "constant_with_warmup: flat after warmup; constant: flat from the first step (warmup_steps unused).",
    )
    warmup_steps: SFTWarmupSteps = Field(20, description="Steps of linear warmup from 0 to learning_rate.")
    optimizer: str = Field("adamw_torch", description="Any optimizer axolotl knows (adamw_bnb_8bit needs a GPU).")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay of the optimizer.")
    adapter: Literal["none", "lora", "qlora"] = Field(
        "none",
        description="none: full fine-tune; lora: train a LoRA adapter, merged into the model at the end; qlora: "
        "the same on the model loaded in 4 bits (bitsandbytes, CUDA only).",
    )
    lora_r: LoraRank = Field(16, description="Rank of the LoRA adapter (of an `adapters` run's LoRA, LoHa or LoKr).")
    lora_alpha: int = Field(
        32, ge=1, description="LoRA scaling: the adapter's update is multiplied by lora_alpha / lora_r."
    )
    lora_dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the LoRA adapter's input (for LoHa and LoKr: their rank dropout)."
    )
    lora_target_linear: bool = Field(True, description="Adapt every linear layer (else q/v only).")
    val_set_size: float = Field(0.05, ge=0, lt=0.5, description="Share of rows held out for the eval loss.")
    max_dropped_share: float = Field(
        0.01, ge=0, lt=1, description="Fail if more rows than this are longer than sequence_len (axolotl drops them)."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on a GPU with bf16, else fp32.")
    flash_attention: bool = Field(False, description="flash-attn kernels (GPU only); otherwise SDPA.")
    sample_packing: bool = Field(False, description="Pack several rows into one sequence.")
    pad_to_multiple_of: int = Field(
        8, ge=1, le=4_096, description="Pad each batch to its longest row rounded up to this. axolotl's own default, "
        "64, suits A100 tensor cores but more than doubles the step time on short rows (~25 tokens here)."
    )  # fmt: skip
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    replay_rows: ReplayRows = Field(
        1000, description="Documents of finetune.replay_text mixed into the SFT rows, trained with the "
        "language-model loss on every token: keeps the model's general text ability while it learns the skill."
    )  # fmt: skip
    replay_max_tokens: SequenceTokens = Field(
        48, description="Longest replay passage (whole sentences): short, like the SFT rows, so batches "
        "padded to their longest row stay short."
    )  # fmt: skip
    seed: int = Field(
        0, description="Seed of axolotl (shuffling, the held-out split, adapter weights) and of the replay draw."
    )
    # The two launch settings stay out of dumps (lineage, model card) at their defaults, so that a
    # model trained by one process has the same bytes as before they existed.
    processes: int = Field(
        1, ge=1, le=1_024, exclude_if=lambda value: value == 1,
        description="Training processes per machine (one per GPU); more than 1 (or several machines) launches "
        "axolotl through torchrun. micro_batch_size is per process: a step's batch is micro_batch_size x "
        "gradient_accumulation_steps x processes (x machines).",
    )  # fmt: skip
    eot_tokens: list[str] | None = Field(
        None, exclude_if=lambda value: value is None,
        description="Tokens that end a chat turn, trained like the end-of-text token (axolotl's eot_tokens): for "
        "templates whose turns end in a token of their own, e.g. Phi-3's ['<|end|>']. null: the tokenizer's eos.",
    )  # fmt: skip
    distributed: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "ddp", exclude_if=lambda value: value == "ddp",
        description="How several processes train: DistributedDataParallel, FSDP2 (sharded weights, gradients and "
        "optimizer state) or DeepSpeed ZeRO stage 2 or 3 (`pip install deepspeed` first). Unused by one process.",
    )  # fmt: skip


class _Overrides(Section):
    def resolve(self, shared: SFTSettings) -> SFTSettings:
        """`shared` with the settings given here."""
        given = {name: getattr(self, name) for name in SFTSettings.model_fields if getattr(self, name) is not None}
        return shared.model_copy(update=given)


def _optional(field: Any) -> Any:
    """A field's type, constraints included, that may also be None (= not overridden)."""
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return kind | None


# Every SFT setting, optional: what a layer of overrides may change (generated, so the two cannot drift).
SFTOverrides = create_model(
    "SFTOverrides",
    __base__=_Overrides,
    __doc__="SFT settings that differ from the ones they override (any may be left out).",
    **{
        name: (_optional(field), Field(None, description=field.description))
        for name, field in SFTSettings.model_fields.items()
    },
)


def resolve_sft(shared: SFTSettings, *overrides: SFTOverrides) -> SFTSettings:
    """The SFT settings of one run: the shared `sft` section, then each layer of overrides in turn."""
    for layer in overrides:
        shared = layer.resolve(shared)
    return shared


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = SFTSettings
