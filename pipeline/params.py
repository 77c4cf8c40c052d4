"""The one schema for params.yaml: every setting is defined and documented here, once.

`load_params()` validates the whole file (unknown keys, wrong types and out-of-range values
fail with the key path and what would be valid). A stage calls `load_stage_params(name)`,
which also restricts reads to the keys that stage declares under `params:` in dvc.yaml, so a
stage cannot depend on a setting DVC does not know about (and would not rerun it for).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SKILLS = ("addition", "sorting", "comparison", "counting")  # stages/data.py generates each (a test checks)
# Where users put their own files that settings name (a local corpus, eval task data, a base
# model's folder): every stage that may read such a file depends on this folder (dvc.yaml).
LOCAL_INPUTS = "data/local"
CORPUS_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SFT_DATASET_SUFFIXES = (".jsonl", ".json", ".parquet")  # pipeline/sft.py DATASET_FORMATS (a test checks they agree)
REPLAY_TEXT_SUFFIXES = (".jsonl", ".parquet")  # what pipeline/sft.py read_texts reads
TASK_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # stages/eval.py TASK_DATA_LOADERS (a test checks they agree)
CORPUS_SPLITS = ("train", "val", "test")  # the data stage's corpus files, <split>.jsonl


def _one_of(suffixes: tuple[str, ...]) -> str:
    return ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]


def _has_suffix(path: str, suffixes: tuple[str, ...]) -> str:
    suffix = Path(path).suffix
    if not suffix:
        raise ValueError(f"{path!r} must be a {_one_of(suffixes)} file, not a folder")
    if suffix not in suffixes:
        raise ValueError(f"{path!r} has suffix {suffix!r}: it must be a {_one_of(suffixes)} file")
    return path


def file_setting(suffixes: tuple[str, ...]) -> Any:
    """The type of a setting that names a file of one of these types (its suffix is checked here,
    the file itself by `check()`)."""
    return Annotated[str, AfterValidator(partial(_has_suffix, suffixes=suffixes))]


SFTDatasetFile = file_setting(SFT_DATASET_SUFFIXES)
ReplayTextFile = file_setting(REPLAY_TEXT_SUFFIXES)
TaskDataFile = file_setting(TASK_DATA_SUFFIXES)


def _plain_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError("use lowercase letters, digits and _ in the name (it names files and DVC stages)")
    return name


# The name of an entry that becomes stages and files: an expert, a recipe, a hub snapshot, a run.
Name = Annotated[str, AfterValidator(_plain_name)]

# Upper bounds on sizes and counts catch a slipped magnitude (max_steps: 10**12 started a run with
# an ETA of forever) and leave room for real GPU-scale runs.
MAX_SEQUENCE_TOKENS = 1_048_576  # a 1M-token context
SequenceTokens = Annotated[int, Field(ge=8, le=MAX_SEQUENCE_TOKENS)]
MicroBatch = Annotated[int, Field(ge=1, le=16_384)]  # sequences per device per forward pass
SFTSteps = Annotated[int, Field(ge=1, le=1_000_000)]  # fine-tuning runs are far shorter than pretraining
SFTWarmupSteps = Annotated[int, Field(ge=0, le=1_000_000)]
AccumulationSteps = Annotated[int, Field(ge=1, le=10_000)]
LoraRank = Annotated[int, Field(ge=1, le=65_536)]  # at most the widest hidden_size
ReplayRows = Annotated[int, Field(ge=0, le=10_000_000)]
MAX_EXPERTS = 1_024  # experts of one MoE layer (the largest MoEs have a few hundred)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusSettings(Section):
    """Where the pretraining corpus comes from."""

    source: Literal["synthetic", "local", "hub"] = Field(
        "synthetic",
        description="synthetic: the invented world generated from data.seed; local: a file at "
        "`path`; hub: a dataset `name` for datasets.load_dataset (needs network access).",
    )
    path: str | None = Field(
        None, description="local: a .txt (one document per paragraph), .jsonl/.json or .parquet file."
    )
    name: str | None = Field(None, description="hub: dataset name, e.g. 'Salesforce/wikitext'.")
    config_name: str | None = Field(None, description="hub: dataset configuration, if it has several.")
    split: str = Field("train", description="hub: which split to read.")
    text_field: str = Field("text", description="local jsonl/parquet and hub: the column holding text.")
    max_documents: int | None = Field(
        None, ge=1, description="Keep only the first N documents (after reading, before splitting)."
    )

    @model_validator(mode="after")
    def _source_needs_its_fields(self) -> CorpusSettings:
        if self.source == "local":
            if not self.path:
                raise ValueError("`path` is required when source is 'local'")
            path = Path(self.path)
            if not path.is_absolute():
                path = PROJECT_ROOT / path
            if path.suffix not in CORPUS_SUFFIXES:
                raise ValueError(
                    f"`path` {self.path!r} has suffix {path.suffix!r}; valid: {', '.join(CORPUS_SUFFIXES)}"
                )
            if path.is_dir():
                raise ValueError(f"`path` {self.path!r} is a folder: it must be a {_one_of(CORPUS_SUFFIXES)} file")
            if not path.is_file():
                raise ValueError(f"`path` {self.path!r} does not exist (looked at {path})")
        if self.source == "hub" and not self.name:
            raise ValueError("`name` (a dataset name for datasets.load_dataset) is required when source is 'hub'")
        return self


class WorldSettings(Section):
    """The invented world the synthetic corpus describes."""

    corpus_megabytes: float = Field(
        3.0, gt=0, le=1000, description="Size of the whole synthetic corpus (all splits) in MB."
    )
    countries: int = Field(
        24,
        ge=2,
        le=200,
        description="Invented countries, each with a capital. Fewer, denser facts are easier to learn.",
    )
    fact_share: float = Field(
        0.25, ge=0, le=1, description="Share of corpus sentences that state a country fact (capital, residents)."
    )


class SkillSettings(Section):
    """The SFT skill datasets (one per expert) and their held-out eval sets."""

    names: list[Literal[SKILLS]] = Field(
        default_factory=lambda: list(SKILLS),
        min_length=1,
        description="Which skills to generate: addition (2-digit + 1-digit), sorting (3-5 digits), "
        "comparison (the larger of two numbers), counting (2-8 words).",
    )
    train_examples: int = Field(3000, ge=1, le=1_000_000, description="SFT training rows per skill.")
    eval_examples: int = Field(
        200, ge=1, le=400, description="Held-out eval questions per skill (never in the SFT rows)."
    )
    choices: int = Field(4, ge=2, le=8, description="Answer options of the multiple-choice items (skills and stories).")

    @model_validator(mode="after")
    def _names_unique(self) -> SkillSettings:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"`names` lists a skill twice: {self.names}")
        return self


class DataSettings(Section):
    """`data` stage: corpus, SFT skill sets and eval sets (python -m stages.data)."""

    seed: int = Field(0, description="Seed of every random choice: same seed -> byte-identical files.")
    corpus: CorpusSettings = Field(default_factory=CorpusSettings)
    val_fraction: float = Field(
        0.02, gt=0, lt=0.5, description="Share of corpus documents held out for validation loss."
    )
    test_fraction: float = Field(
        0.02, gt=0, lt=0.5, description="Share of corpus documents held out for perplexity eval."
    )
    world: WorldSettings = Field(default_factory=WorldSettings)
    skills: SkillSettings = Field(default_factory=SkillSettings)
    story_eval_examples: int = Field(
        200, ge=1, le=10_000, description="Story-completion multiple-choice items (HellaSwag style)."
    )


# Renders `<s>Q: question\nA:\nanswer</s>`. The answer starts after a newline, not a space:
# byte-level BPE glues a space to the next word (" Zorvia"), which would put the first answer token
# across the prompt/answer boundary that SFT masks; a newline is always its own token. Eval writes
# its prompts with the evaluated model's own template (stages/eval.py), so they match SFT's.
DEFAULT_CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}{{ 'Q: ' + message['content'] + '\\n' }}
  {%- elif message['role'] == 'assistant' -%}{{ 'A:\\n' + message['content'] + eos_token }}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'A:\\n' }}{%- endif -%}"""


class TokenizeSettings(Section):
    """`tokenize` stage: train a byte-level BPE tokenizer, encode the corpus (python -m stages.tokenize)."""

    base_model: str | None = Field(
        None,
        description="A Hugging Face model folder or hub id: use its tokenizer instead of training one "
        "(the special-token and vocab settings below are then ignored).",
    )
    vocab_size: int = Field(
        2048,
        ge=300,
        le=1_000_000,
        description="Upper bound on the trained vocabulary (256 bytes + merges + special tokens); BPE "
        "stops earlier when no pair reaches min_frequency.",
    )
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to become a merge.")
    split_digits: bool = Field(
        True,
        description="Give every digit its own token so arithmetic is learnable (otherwise BPE learns "
        "multi-digit tokens and sums become lookups).",
    )
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    pad_token: str = "<pad>"
    unk_token: str = "<unk>"
    chat_template: str = Field(
        DEFAULT_CHAT_TEMPLATE,
        description="Jinja chat template saved with the tokenizer; SFT and eval prompts are rendered with it.",
    )
    batch_size: int = Field(1000, ge=1, le=100_000, description="Documents per encode_batch call (held in memory).")

    @model_validator(mode="after")
    def _special_tokens_distinct(self) -> TokenizeSettings:
        specials = [self.bos_token, self.eos_token, self.pad_token, self.unk_token]
        if len(set(specials)) != 4 or not all(specials):
            raise ValueError(f"bos/eos/pad/unk tokens must be four distinct non-empty strings, got {specials}")
        return self


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


class ComputeSettings(Section):
    """How every stage that computes with torch does it on a CPU (read by pipeline/stage.py).

    Both settings decide the bytes of the results, so every such stage declares this section.
    """

    portable_kernels: bool = Field(
        True,
        description="Run the AVX2 code paths of torch, MKL and oneDNN on every x86 CPU, so Intel (AVX-512) and "
        "AMD machines can compute the same bytes (slower where wider units exist: README, Reproducibility). "
        "false: each CPU's fastest kernels, bitwise repeatable on that machine only.",
    )
    threads: int | None = Field(
        2,
        ge=1,
        description="CPU threads per process (torch, OpenMP, MKL, tokenizers). Reductions split work by thread, so "
        "results depend on it. null: OMP_NUM_THREADS from the environment, else every core (divided among the "
        "processes under torchrun). Stages side by side (`dvc queue start -j 2`): README, Performance.",
    )


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
    optimizer: Literal["adamw", "lion"] = "adamw"
    learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate.")
    schedule: Literal["cosine", "one_cycle", "constant"] = Field(
        "cosine",
        description="cosine: linear warmup from 0, cosine decay to min_lr_ratio; one_cycle: cosine "
        "warmup from learning_rate/25 to the peak, cosine decay to min_lr_ratio; constant: linear warmup, then flat.",
    )
    warmup_steps: int = Field(16, ge=0, le=10_000_000, description="Steps to reach the peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of the peak.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay, applied to matrices only.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
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
    sample_temperature: float = Field(0.8, gt=0)
    sample_top_k: int = Field(20, ge=1)
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


EMBEDDED_TASKS = ("skills", "stories", "perplexity")


class EvalSettings(Section):
    """`eval` stage: lm-evaluation-harness on every model (python -m stages.eval)."""

    tasks: list[str] = Field(
        default_factory=lambda: list(EMBEDDED_TASKS),
        min_length=1,
        description="Embedded tasks: skills (exact answer + multiple choice per skill in data/eval), "
        "stories (story completion), perplexity (held-out corpus text). Any other name is an "
        "lm-eval task (hellaswag, arc_easy, gsm8k, ...): it needs its data from the hub, or "
        "from `task_data`.",
    )
    task_data: dict[str, dict[str, TaskDataFile]] = Field(
        default_factory=dict,
        description="Local data for standard lm-eval tasks, offline: task name -> {split: file}, "
        "e.g. {arc_easy: {test: data/local/arc_easy.jsonl}} (.jsonl, .json or .parquet with the task's columns: "
        "a hub dataset's own parquet files, fetched by a `hub` entry, fit).",
    )
    num_fewshot: int = Field(0, ge=0, le=128, description="Examples shown before each question.")
    batch_size: int = Field(64, ge=1, le=8_192, description="Requests per forward pass.")
    limit: int | None = Field(
        None, ge=1, le=1_000_000, description="Evaluate only the first N items of each task (quick runs)."
    )
    max_gen_tokens: int = Field(16, ge=1, le=32_768, description="Longest answer generated for exact-answer tasks.")
    apply_chat_template: bool = Field(
        False,
        description="true: lm-eval renders every prompt with the model's chat template (instruct models such as "
        "Phi-3). false: the embedded tasks write the question the way the model's own template wraps a user "
        "message (the default template: `Q: ...\\nA:\\n`), exactly what SFT trained on.",
    )
    device: str = Field("auto", description="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, float32 on CPU."
    )
    seed: int = Field(0, description="Seed of lm-eval's sampling and few-shot selection.")

    @model_validator(mode="after")
    def _task_data_names_a_task(self) -> EvalSettings:
        for name in self.task_data:
            if name not in self.tasks:
                raise ValueError(f"task_data names {name!r}, which is not in tasks {self.tasks}")
            if name in EMBEDDED_TASKS:
                raise ValueError(f"task_data cannot override the embedded task {name!r}")
            if len({Path(path).suffix == ".parquet" for path in self.task_data[name].values()}) > 1:
                raise ValueError(f"task_data.{name}: give every split in one format (json/jsonl or parquet)")
        return self


class SFTSettings(Section):
    """`sft`: supervised fine-tuning through axolotl, the settings every run shares (the experts, the
    dense baseline, the MoE runs); `finetune.defaults`, `mixture.defaults` and each run may override any."""

    max_steps: SFTSteps = Field(600, description="Optimizer steps (at most a million).")
    learning_rate: float = Field(0.002, gt=0, description="Peak learning rate.")
    micro_batch_size: MicroBatch = Field(32, description="Rows per forward pass on one device.")
    gradient_accumulation_steps: AccumulationSteps = 1
    sequence_len: SequenceTokens = Field(128, description="Longest row in tokens; axolotl drops longer rows.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: SFTWarmupSteps = 20
    optimizer: str = Field("adamw_torch", description="Any optimizer axolotl knows (adamw_bnb_8bit needs a GPU).")
    weight_decay: float = Field(0.0, ge=0)
    adapter: Literal["none", "lora", "qlora"] = Field(
        "none",
        description="none: full fine-tune; lora: train a LoRA adapter, merged into the model at the end; qlora: "
        "the same on the model loaded in 4 bits (bitsandbytes, CUDA only).",
    )
    lora_r: LoraRank = 16
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
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
    gradient_checkpointing: bool = False
    replay_rows: ReplayRows = Field(
        1000, description="Documents of finetune.replay_text mixed into the SFT rows, trained with the "
        "language-model loss on every token: keeps the model's general text ability while it learns the skill."
    )  # fmt: skip
    replay_max_tokens: SequenceTokens = Field(
        48, description="Longest replay passage (whole sentences): short, like the SFT rows, so batches "
        "padded to their longest row stay short."
    )  # fmt: skip
    seed: int = 0
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


class ExpertSettings(SFTOverrides):
    """One expert: its dataset, and any SFT setting that differs from `sft` and finetune.defaults."""

    dataset: SFTDatasetFile = Field(
        description="A .jsonl/.json/.parquet file of chat messages (`messages` column): generated, local, "
        "or a file of a hub dataset fetched by a `hub` entry (data/hub/<name>/...)."
    )


class FinetuneSettings(Section):
    """`finetune@<expert>` stages: SFT experts with axolotl (python -m stages.finetune)."""

    base_model: str = Field(
        "models/pretrain",
        description="Model folder to fine-tune: the pretrain output (default), any local Hugging Face model "
        "folder, or a hub model fetched by a `hub` entry (data/hub/<name>).",
    )
    replay_text: ReplayTextFile = Field(
        "data/corpus/train.jsonl",
        description="Pretraining-style text (.jsonl/.parquet with a `text` column) that replay_rows draws from.",
    )
    defaults: SFTOverrides = Field(
        default_factory=SFTOverrides, description="What the experts change of the shared `sft` settings."
    )
    experts: dict[Name, ExpertSettings] = Field(
        default_factory=lambda: {skill: ExpertSettings(dataset=f"data/sft/{skill}.jsonl") for skill in SKILLS},
        min_length=1,
        description="Expert name -> its dataset and overrides. Each becomes a finetune@<name> stage.",
    )


class MergeMethod(NamedTuple):
    """What mergekit 0.1.5 asks of a merge method's inputs (its registry's contracts, copied here so
    that validating params.yaml does not import mergekit; tests/test_merge.py checks they agree)."""

    base: str  # required | optional | ignored
    min_inputs: int  # inputs count the base model too
    max_inputs: int | None
    shared_parameters: tuple[str, ...]  # one value for the whole merge (normalize, lambda, t, ...)
    model_parameters: tuple[str, ...]  # one value per input model (weight, density, ...)
    required: tuple[str, ...]


MERGE_METHODS = {
    "multislerp": MergeMethod("optional", 1, None, ("normalize_weights", "eps"), ("weight",), ("weight",)),
    "nearswap": MergeMethod("required", 2, 2, ("t",), (), ("t",)),
    "ram": MergeMethod("required", 1, None, ("epsilon",), (), ()),
    "ramplus_tl": MergeMethod("required", 1, None, ("r", "alpha", "epsilon"), (), ()),
    "sce": MergeMethod("required", 1, None, ("int8_mask", "select_topk"), (), ()),
    "linear": MergeMethod("ignored", 1, None, ("normalize",), ("weight",), ("weight",)),
    "slerp": MergeMethod("required", 2, 2, ("t",), (), ("t",)),
    "nuslerp": MergeMethod("optional", 1, None, ("nuslerp_row_wise", "nuslerp_flatten"), ("weight",), ("weight",)),
    "passthrough": MergeMethod("ignored", 1, 1, (), ("scale",), ()),
    "model_stock": MergeMethod("required", 3, None, ("filter_wise",), (), ()),
    "arcee_fusion": MergeMethod("required", 2, 2, (), (), ()),
    "karcher": MergeMethod("ignored", 1, None, ("max_iter", "tol"), (), ()),
    "task_arithmetic": MergeMethod(
        "required", 1, None, ("int8_mask", "normalize", "rescale", "lambda"), ("weight", "density"), ("weight",)
    ),
    "ties": MergeMethod(
        "required", 1, None, ("int8_mask", "normalize", "rescale", "lambda"), ("weight", "density"), ("weight",)
    ),
    "dare_ties": MergeMethod(
        "required", 1, None, ("int8_mask", "normalize", "rescale", "lambda"), ("weight", "density"), ("weight",)
    ),
    "dare_linear": MergeMethod(
        "required", 1, None, ("int8_mask", "normalize", "rescale", "lambda"), ("weight", "density"), ("weight",)
    ),
    "breadcrumbs": MergeMethod(
        "required",
        1,
        None,
        ("int8_mask", "normalize", "rescale", "lambda"),
        ("weight", "density", "gamma"),
        ("weight",),
    ),
    "breadcrumbs_ties": MergeMethod(
        "required",
        1,
        None,
        ("int8_mask", "normalize", "rescale", "lambda"),
        ("weight", "density", "gamma"),
        ("weight",),
    ),
    "della": MergeMethod(
        "required",
        1,
        None,
        ("int8_mask", "normalize", "rescale", "lambda"),
        ("weight", "density", "epsilon"),
        ("weight",),
    ),
    "della_linear": MergeMethod(
        "required",
        1,
        None,
        ("int8_mask", "normalize", "rescale", "lambda"),
        ("weight", "density", "epsilon"),
        ("weight",),
    ),
}


class MergeRecipe(Section):
    """One merge of experts with mergekit: a merge@<recipe> stage."""

    method: str = Field(description="A mergekit method: " + ", ".join(sorted(MERGE_METHODS)) + ".")
    experts: list[str] | None = Field(
        None, description="Expert names to merge (default: every expert in finetune.experts)."
    )
    parameters: dict[str, float | bool | dict[str, float]] = Field(
        default_factory=dict,
        description="The method's parameters. Per-model ones (weight, density, ...) take one number for every "
        "expert or {expert: number}; shared ones (normalize, lambda, t, ...) one value.",
    )

    @field_validator("method")
    @classmethod
    def _method_is_mergekits(cls, method: str) -> str:
        if method not in MERGE_METHODS:
            raise ValueError(f"{method!r} is not a mergekit method; valid: {', '.join(sorted(MERGE_METHODS))}")
        return method

    @model_validator(mode="after")
    def _parameters_fit_the_method(self) -> MergeRecipe:
        spec = MERGE_METHODS[self.method]
        valid = spec.shared_parameters + spec.model_parameters
        for name, value in self.parameters.items():
            if name not in valid:
                raise ValueError(f"{self.method} has no parameter {name!r}; valid: {', '.join(valid) or 'none'}")
            if isinstance(value, dict) and name not in spec.model_parameters:
                raise ValueError(f"parameter {name!r} of {self.method} takes one value, not one per expert")
        missing = [name for name in spec.required if name not in self.parameters]
        if missing:
            raise ValueError(f"{self.method} needs parameters {missing}")
        return self

    def base_is_first_expert(self) -> bool:
        """Two-model methods (slerp, nearswap, arcee_fusion) interpolate from one expert towards the other."""
        spec = MERGE_METHODS[self.method]
        return spec.base == "required" and spec.max_inputs == 2

    def uses_base_model(self) -> bool:
        """Methods on task vectors (task_arithmetic, ties, dare, model_stock, ...) need the common base."""
        return MERGE_METHODS[self.method].base == "required" and not self.base_is_first_expert()


class MergeSettings(Section):
    """`merge@<recipe>` stages: mergekit merges of the experts (python -m stages.merge)."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the merge and its output."
    )
    seed: int = Field(0, description="Seed of the methods that drop parameters at random (dare_*, della*).")
    recipes: dict[Name, MergeRecipe] = Field(
        default_factory=lambda: {
            "linear": MergeRecipe(method="linear", parameters={"weight": 1.0}),
            "slerp": MergeRecipe(method="slerp", experts=["addition", "sorting"], parameters={"t": 0.5}),
            "task_arithmetic": MergeRecipe(method="task_arithmetic", parameters={"weight": 0.5}),
            "ties": MergeRecipe(method="ties", parameters={"weight": 0.25, "density": 0.5}),
            "dare_ties": MergeRecipe(method="dare_ties", parameters={"weight": 0.25, "density": 0.5}),
            "model_stock": MergeRecipe(method="model_stock"),
        },
        description="Recipe name -> merge recipe; each is a merge@<recipe> stage.",
    )


class SelectSettings(Section):
    """`select` stage: the merges that go on into the MoE, by measured quality."""

    metric: str = Field(
        "all_skills/exact_match", description="An eval metric (a key of metrics/eval/<model>.json); higher is better."
    )
    top_k: int = Field(4, ge=1, description="How many merges to select (the MoE's experts, by default).")
    min_score: float | None = Field(None, description="Only merges scoring at least this qualify.")
    on_too_few: Literal["keep", "fail"] = Field(
        "keep",
        description="Fewer than top_k merges qualify: keep those that do (the selection says how many are "
        "missing), or fail. No qualifying merge at all always fails.",
    )


class ExpertPrompts(Section):
    """Prompts that should (positive) or should not (negative) be routed to one MoE expert."""

    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(default_factory=list)


class MoEVariant(Section):
    """One mixture of experts to build: where its experts come from."""

    source: Literal["selected_merges", "experts", "base"] = Field(
        description="The merges the select stage chose, the SFT experts, or finetune.base_model copied into "
        "every expert (sparse upcycling: it only becomes more than the base through training, so a "
        "mixture.moe_runs entry must train it)."
    )
    experts: list[str] | None = Field(None, description="source experts: which SFT experts (default: all).")
    num_experts: int = Field(4, ge=2, le=MAX_EXPERTS, description="source base: how many copies of the base model.")


def _default_variants() -> dict[str, MoEVariant]:
    return {
        "merges": MoEVariant(source="selected_merges"),
        "experts": MoEVariant(source="experts"),
        "upcycled": MoEVariant(source="base"),
    }


class MoESettings(Section):
    """`moe@<variant>` stages: Mixtral-architecture mixtures of experts built by mergekit-moe (python -m stages.moe)."""

    variants: dict[Name, MoEVariant] = Field(
        default_factory=_default_variants,
        description="Variant name -> its source; each is a moe@<name> stage, evaluated as moe/<name>.",
    )
    gate_mode: Literal["hidden", "cheap_embed", "random", "uniform_random"] = Field(
        "random",
        description="How mergekit-moe initialises the routers: from the hidden states (hidden) or embeddings "
        "(cheap_embed) of each expert's prompts, or at random (advised when the MoE is trained afterwards).",
    )
    experts_per_token: int = Field(2, ge=1, description="Experts each token is routed to.")
    prompts: dict[str, ExpertPrompts] = Field(
        default_factory=dict,
        description="Source name (expert, recipe, or copy_<i> for source base) -> its prompts, for the hidden and "
        "cheap_embed gates. Default for an expert: the first prompt_examples questions of its SFT data; for a "
        "merge: those of the experts it merges.",
    )
    prompt_examples: int = Field(4, ge=1, le=10_000, description="Questions per expert in the default prompts.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = Field(0, description="Seed of the random gates.")


class MoERun(SFTOverrides):
    """One MoE trained on the mixture: which variant, its mode, and SFT settings that differ from mixture.defaults."""

    moe: str = Field(description="The moe.variants entry to train.")
    mode: Literal["full", "router", "lora"] | None = Field(
        None,
        description="full: every weight; router: only the routers' gate weights; lora: LoRA on the attention "
        "projections (merged into the model at the end). Default: lora when the run's SFT settings say "
        "`adapter: lora`, else full.",
    )

    @model_validator(mode="after")
    def _mode_sets_the_adapter(self) -> MoERun:
        if self.adapter is not None:
            raise ValueError("set `mode` (full, router or lora), not `adapter`, for a MoE run")
        return self


def _default_moe_runs() -> dict[str, MoERun]:
    runs = {name: MoERun(moe=name) for name in _default_variants()}
    runs["experts_router"] = MoERun(moe="experts", mode="router", learning_rate=0.01)
    return runs


class MixtureSettings(Section):
    """`dense@<run>` and `moe_finetune@<run>` stages: models trained with axolotl on one mixture of the
    experts' SFT data, with the same settings, rows and steps unless a run overrides them: the dense
    baseline and the MoE variants (python -m stages.mixture_finetune)."""

    defaults: SFTOverrides = Field(
        default_factory=lambda: SFTOverrides(max_steps=400),
        description="What the mixture runs change of the shared `sft` settings.",
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Expert name -> weight of its SFT data in the mixture (default: every expert, weight 1). "
        "Rows are drawn in these proportions.",
    )
    rows: int = Field(4000, ge=1, le=10_000_000, description="SFT rows in the mixture (replay passages come on top).")
    router_aux_loss_coef: float = Field(0.02, ge=0, description="Weight of the router load-balancing loss (0: off).")
    dense_runs: dict[Name, SFTOverrides] = Field(
        default_factory=lambda: {"multitask": SFTOverrides()},
        description="Run name -> overrides; each is a dense@<name> stage: finetune.base_model trained on the "
        "mixture (the step-matched dense baseline), evaluated as dense/<name>.",
    )
    moe_runs: dict[Name, MoERun] = Field(
        default_factory=_default_moe_runs,
        description="Run name -> MoE variant, mode and overrides; each is a moe_finetune@<name> stage, evaluated "
        "as moe_trained/<name>.",
    )


PREFERENCE_ROW = '{"messages": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "..."}'


class DPORun(SFTOverrides):
    """One preference-tuning run: the model it starts from, its preference pairs, and SFT settings that differ
    from dpo.defaults."""

    model: str = Field(
        description="Model folder to start from: an expert (models/experts/<name>), the dense baseline "
        "(models/dense/<name>), or any local or hub model folder."
    )
    dataset: SFTDatasetFile = Field(
        description=f"Preference pairs (.jsonl/.json/.parquet), one per row: {PREFERENCE_ROW}. Generated ones are "
        "data/preference/train/<skill>.jsonl; a hub dataset's file in this shape works too (data/hub/<name>/...)."
    )
    eval_dataset: SFTDatasetFile | None = Field(
        None,
        description="Held-out pairs in the same shape (data/preference/eval/<skill>.jsonl): the stage measures how "
        "often the start and the trained model prefer the chosen answer. null: not measured.",
    )
    beta: float | None = Field(None, gt=0, description="DPO's beta for this run (default: dpo.beta).")

    @model_validator(mode="after")
    def _full_or_lora_only(self) -> DPORun:
        if self.adapter == "qlora":
            raise ValueError("adapter qlora is not supported for a DPO run: use none or lora")
        return self


class DPOSettings(Section):
    """`dpo@<run>` stages: direct preference optimisation with axolotl's `rl: dpo` (python -m stages.dpo).
    Off by default: no runs."""

    defaults: SFTOverrides = Field(
        default_factory=lambda: SFTOverrides(max_steps=200, learning_rate=1.0e-4, warmup_steps=10, replay_rows=0),
        description="What the DPO runs change of the shared `sft` settings.",
    )
    beta: float = Field(0.1, gt=0, description="Strength of DPO's pull towards the start model (axolotl rl_beta).")
    runs: dict[Name, DPORun] = Field(
        default_factory=dict,
        description="Run name -> start model, preference data and overrides; each is a dpo@<name> stage, evaluated "
        "as dpo/<name>.",
    )


class AdapterRun(ExpertSettings):
    """One expert trained with a peft adapter (LoRA, LoHa or LoKr) and merged into a plain model."""

    method: Literal["lora", "loha", "lokr"] = Field(
        description="peft's LoRA (low-rank B·A), LoHa (Hadamard product of two low-rank pairs) or LoKr (Kronecker "
        "product); rank lora_r, alpha lora_alpha, on every linear layer of the decoder."
    )

    @model_validator(mode="after")
    def _method_sets_the_adapter(self) -> AdapterRun:
        if self.adapter is not None:
            raise ValueError("set `method` (lora, loha or lokr), not `adapter`, for an adapters run")
        return self


class AdapterSettings(Section):
    """`adapter@<run>` stages: experts trained with other low-rank adapters than axolotl's LoRA, on the experts'
    data, masking and settings (python -m stages.adapters). Off by default: no runs."""

    runs: dict[Name, AdapterRun] = Field(
        default_factory=dict,
        description="Run name -> dataset, method and overrides (resolved like an expert's: sft, then "
        "finetune.defaults, then these); each is an adapter@<name> stage, evaluated as adapter/<name>.",
    )


QuantBits = Literal["int4", "int8"]
QuantGroup = Annotated[int, Field(ge=1, le=65_536)]


class QATRun(ExpertSettings):
    """One expert trained with quantization-aware training: axolotl fake-quantizes its linear weights."""

    # axolotl 0.19 fake-quantizes int4 weights only ("Int8WeightOnlyConfig is not supported by torchao QAT")
    weight_dtype: Literal["int4"] = Field("int4", description="The integer type the weights are fake-quantized to.")
    group_size: QuantGroup = Field(32, description="Weights per quantization scale, along each row.")


class QATSettings(Section):
    """`qat@<run>` stages: experts trained with axolotl's quantization-aware training (torchao), to be quantized
    afterwards by a `quantize` run (python -m stages.qat). Off by default: no runs."""

    runs: dict[Name, QATRun] = Field(
        default_factory=dict,
        description="Run name -> dataset, quantization and overrides (resolved like an expert's); each is a "
        "qat@<name> stage, evaluated as qat/<name>.",
    )


class QuantizeRun(Section):
    """One model's weights quantized after training (round to nearest, symmetric, per group)."""

    model: str = Field(description="Model folder to quantize: any model of the pipeline (models/experts/<name>, "
                       "models/qat/<name>, ...) or a local one.")  # fmt: skip
    weight_dtype: QuantBits = Field("int4", description="The integer type of the weights.")
    group_size: QuantGroup = Field(32, description="Weights per scale along each row; must divide every input size.")


class QuantizeSettings(Section):
    """`quantize@<run>` stages: post-training quantization with torchao (python -m stages.quantize). Off by
    default: no runs."""

    runs: dict[Name, QuantizeRun] = Field(
        default_factory=dict, description="Run name -> model and scheme; each is a quantize@<name> stage, "
        "evaluated as quantized/<name>."
    )  # fmt: skip


GGUFType = Literal["f16", "q8_0", "q4_0"]


class GGUFRun(Section):
    """One model exported to GGUF files for llama.cpp."""

    model: str = Field(description="Model folder to export: a Llama-architecture model of the pipeline or a local one.")
    types: list[GGUFType] = Field(
        default_factory=lambda: ["f16", "q8_0", "q4_0"],
        min_length=1,
        description="GGUF weight types to write: f16, then quantized ones made from it (q8_0: 8-bit, q4_0: 4-bit).",
    )

    @field_validator("types")
    @classmethod
    def _f16_first(cls, types: list[str]) -> list[str]:
        if types[0] != "f16" or len(set(types)) != len(types):
            raise ValueError(f"list f16 first (the others are quantized from it), each type once: got {types}")
        return types


class GGUFSettings(Section):
    """`gguf@<run>` stages: GGUF export with llama.cpp's converter, verified by generating with llama.cpp
    (python -m stages.gguf; needs `make llama-cpp` once). Off by default: no runs."""

    runs: dict[Name, GGUFRun] = Field(
        default_factory=dict, description="Run name -> model and types; each is a gguf@<name> stage."
    )
    verify_examples: int = Field(
        50, ge=1, le=100_000, description="Skill questions per skill (from the eval sets) each file answers with "
        "greedy decoding, compared with transformers' answers."
    )  # fmt: skip


class HubSource(Section):
    """One snapshot of a Hugging Face hub repository: the hub@<name> stage fetches it into data/hub/<name>."""

    repo_id: str = Field(description="Repository id, e.g. 'vonjack/Phi-3-mini-4k-instruct-LLaMAfied'.")
    repo_type: Literal["model", "dataset"] = "model"
    revision: str = Field(
        description="A commit sha (reproducible), or a branch or tag: resolved once when the stage runs; "
        "DVC reruns the download when this setting changes, not when the branch moves."
    )
    allow_patterns: list[str] | None = Field(
        None, description="Fetch only matching files, e.g. ['*.json', '*.safetensors'] or ['data/train-*.parquet']."
    )


class Params(Section):
    """params.yaml: one section per stage."""

    hub: dict[Name, HubSource] = Field(
        default_factory=dict, description="Name -> hub repository snapshot; each is a hub@<name> stage."
    )
    compute: ComputeSettings = Field(default_factory=ComputeSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    tokenize: TokenizeSettings = Field(default_factory=TokenizeSettings)
    pretrain: PretrainSettings = Field(default_factory=PretrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    sft: SFTSettings = Field(default_factory=SFTSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    select: SelectSettings = Field(default_factory=SelectSettings)
    moe: MoESettings = Field(default_factory=MoESettings)
    mixture: MixtureSettings = Field(default_factory=MixtureSettings)
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)
    qat: QATSettings = Field(default_factory=QATSettings)
    quantize: QuantizeSettings = Field(default_factory=QuantizeSettings)
    gguf: GGUFSettings = Field(default_factory=GGUFSettings)

    def run_paths(self) -> dict[str, PathSetting]:
        """The files and folders the optional runs (dpo, adapters, qat, quantize, gguf) name, by dotted key."""
        named = {}
        for name, run in self.dpo.runs.items():
            named[f"dpo.runs.{name}.model"] = PathSetting(run.model)
            named[f"dpo.runs.{name}.dataset"] = PathSetting(run.dataset, SFT_DATASET_SUFFIXES)
            if run.eval_dataset:
                named[f"dpo.runs.{name}.eval_dataset"] = PathSetting(run.eval_dataset, SFT_DATASET_SUFFIXES)
        for section in ("adapters", "qat"):
            for name, run in getattr(self, section).runs.items():
                named[f"{section}.runs.{name}.dataset"] = PathSetting(run.dataset, SFT_DATASET_SUFFIXES)
        for section in ("quantize", "gguf"):
            for name, run in getattr(self, section).runs.items():
                named[f"{section}.runs.{name}.model"] = PathSetting(run.model)
        return named

    @model_validator(mode="after")
    def _hub_folders_named_exist(self) -> Params:
        used = {"finetune.base_model": self.finetune.base_model}
        used.update({f"finetune.experts.{name}.dataset": e.dataset for name, e in self.finetune.experts.items()})
        used.update({key: setting.path for key, setting in self.run_paths().items()})
        for key, path in used.items():
            parts = Path(path).parts
            if parts[:2] == ("data", "hub") and (len(parts) < 3 or parts[2] not in self.hub):
                raise ValueError(
                    f"{key} is {path!r}, but data/hub/<name> folders come from `hub` entries and there is none "
                    f"named {parts[2] if len(parts) > 2 else '(missing)'!r} (hub entries: {sorted(self.hub) or 'none'})"
                )
        return self

    @model_validator(mode="after")
    def _merges_name_known_experts_in_valid_numbers(self) -> Params:
        experts = list(self.finetune.experts)
        for name, recipe in self.merge.recipes.items():
            where = f"merge.recipes.{name}"
            chosen = recipe.experts if recipe.experts is not None else experts
            unknown = [e for e in chosen if e not in experts]
            if unknown:
                raise ValueError(f"{where}.experts: {unknown} are not in finetune.experts ({', '.join(experts)})")
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"{where}.experts lists an expert twice: {chosen}")
            spec = MERGE_METHODS[recipe.method]
            inputs = len(chosen) + int(recipe.uses_base_model())
            if inputs < spec.min_inputs or (spec.max_inputs is not None and inputs > spec.max_inputs):
                wanted = spec.min_inputs if spec.max_inputs == spec.min_inputs else f"at least {spec.min_inputs}"
                base = " (the base model counts as one)" if recipe.uses_base_model() else ""
                raise ValueError(
                    f"{where}: {recipe.method} merges {wanted} models{base}, got {inputs}: {chosen}"
                    + (f"; name {spec.max_inputs} experts in `experts`" if spec.max_inputs else "")
                )
            for parameter, value in recipe.parameters.items():
                if isinstance(value, dict) and set(value) != set(chosen):
                    raise ValueError(f"{where}.parameters.{parameter}: give a value for each of {chosen}")
        return self

    @model_validator(mode="after")
    def _moes_are_buildable_and_trained_on_known_data(self) -> Params:
        moe, mixture, experts = self.moe, self.mixture, list(self.finetune.experts)
        for name, run in mixture.moe_runs.items():
            if run.moe not in moe.variants:
                raise ValueError(f"mixture.moe_runs.{name}.moe is {run.moe!r}, not one of moe.variants "
                                 f"({', '.join(moe.variants) or 'none'})")  # fmt: skip
        trained = {run.moe for run in mixture.moe_runs.values()}
        for name, variant in moe.variants.items():
            where = f"moe.variants.{name}"
            count = {
                "selected_merges": min(self.select.top_k, len(self.merge.recipes)),
                "experts": len(variant.experts or experts),
                "base": variant.num_experts,
            }[variant.source]
            if variant.source == "selected_merges" and not self.merge.recipes:
                raise ValueError(f"{where}.source is selected_merges but merge.recipes is empty")
            if variant.experts is not None:
                unknown = [e for e in variant.experts if e not in experts]
                if unknown or len(set(variant.experts)) != len(variant.experts):
                    raise ValueError(f"{where}.experts {variant.experts}: name distinct experts of finetune.experts "
                                     f"({experts})")  # fmt: skip
            if moe.experts_per_token > count:
                raise ValueError(
                    f"moe.experts_per_token {moe.experts_per_token} is more than the {count} experts that {where} "
                    f"gives" + (" (select.top_k, at most the number of merge.recipes)"
                                if variant.source == "selected_merges" else "")
                )  # fmt: skip
            if variant.source == "base":
                if name not in trained:
                    raise ValueError(
                        f"{where} copies one model into every expert: the MoE only differs from that model after "
                        "training, and no mixture.moe_runs entry trains it"
                    )
                missing = [f"copy_{i}" for i in range(variant.num_experts) if f"copy_{i}" not in moe.prompts]
                if moe.gate_mode in ("hidden", "cheap_embed") and missing:
                    raise ValueError(
                        f"moe.gate_mode {moe.gate_mode} routes by each expert's prompts, and the copies of the base "
                        f"in {where} have none: set moe.prompts for {missing}, or use gate_mode random"
                    )
        for name in mixture.weights:
            if name not in experts:
                raise ValueError(f"mixture.weights names {name!r}, which is not in finetune.experts ({experts})")
        if mixture.weights and not any(w > 0 for w in mixture.weights.values()):
            raise ValueError("mixture.weights: at least one weight must be positive")
        return self


class InputError(ValueError):
    """Bad input a user can fix: the message names the file, row or setting and what would be valid.

    Helpers raise it; a stage's process prints the message alone, without a traceback (see
    pipeline/stage.py), and exits with status 1.
    """


class ParamsError(InputError):
    """params.yaml is invalid, or a stage read a key its dvc.yaml entry does not declare."""


def _read_yaml(path: Path) -> Any:
    try:
        return YAML(typ="safe").load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except Exception as error:  # ruamel raises several unrelated error types for bad YAML
        raise ParamsError(f"{path}: not valid YAML: {error}") from None


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model at `loc`, for 'unknown key' messages."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return sorted(model.model_fields)


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid setting(s):"]
    for item in error.errors():
        loc = tuple(part for part in item["loc"] if part != "[key]")  # a bad name: the entry it names
        key = ".".join(str(part) for part in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(Params, loc[:-1])
            lines.append(f"  {key}: unknown key; valid keys here: {', '.join(valid)}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = "" if item["type"].startswith("value_error") else f" (got {item['input']!r})"
            lines.append(f"  {key}: {message}{got}")
    return "\n".join(lines)


def load_params(path: Path | str = PROJECT_ROOT / "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError naming every bad key."""
    path = Path(path)
    raw = _read_yaml(path) or {}
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(format_validation_error(error, str(path))) from None


def declared_params(stage: str, root: Path = PROJECT_ROOT) -> list[str]:
    """The params.yaml keys that `stage` (e.g. 'tokenize', 'finetune@addition') declares in dvc.yaml."""
    return declared(stage, root)[0]


def declared(stage: str, root: Path = PROJECT_ROOT) -> tuple[list[str], list[Path]]:
    """(params keys, file and folder dependencies) that `stage` declares in dvc.yaml."""
    from dvc.repo import Repo  # imported here: DVC takes a second to import

    with Repo(str(root)) as repo:
        try:
            (resolved,) = repo.stage.collect(stage)
        except Exception as error:
            raise ParamsError(f"dvc.yaml: no stage named {stage!r}: {error}") from None
        return stage_params(resolved), stage_files(resolved)


def stage_params(stage: Any) -> list[str]:
    return [key for dep in stage.deps for key in (getattr(dep, "params", None) or [])]


def stage_files(stage: Any) -> list[Path]:
    return [Path(dep.fs_path) for dep in stage.deps if getattr(dep, "params", None) is None]


class PathSetting(NamedTuple):
    """A setting's value that names a file or folder, and what it must be there."""

    path: str  # as written in params.yaml
    suffixes: tuple[str, ...] = ()  # a file of one of these types; none: a folder


def path_settings(params: Params, root: Path = PROJECT_ROOT) -> dict[str, PathSetting]:
    """The settings that name a file or folder some stage reads, by dotted key."""
    named = {
        "finetune.base_model": PathSetting(params.finetune.base_model),
        "finetune.replay_text": PathSetting(params.finetune.replay_text, REPLAY_TEXT_SUFFIXES),
    }
    corpus = params.data.corpus
    if corpus.source == "local" and corpus.path:
        named["data.corpus.path"] = PathSetting(corpus.path, CORPUS_SUFFIXES)
    base = params.tokenize.base_model
    from_hub_entry = Path(base or ".").parts[:2] == ("data", "hub")  # fetched by a hub@<name> stage
    if base and ((root / base).exists() or Path(base).is_relative_to(LOCAL_INPUTS) or from_hub_entry):  # else a hub id
        named["tokenize.base_model"] = PathSetting(base)
    for name, expert in params.finetune.experts.items():
        named[f"finetune.experts.{name}.dataset"] = PathSetting(expert.dataset, SFT_DATASET_SUFFIXES)
    for task, splits in params.eval.task_data.items():
        for split, path in splits.items():
            named[f"eval.task_data.{task}.{split}"] = PathSetting(path, TASK_DATA_SUFFIXES)
    named.update(params.run_paths())
    return named


def input_paths(params: Params, root: Path = PROJECT_ROOT) -> dict[str, Path]:
    """The settings that name a file or folder some stage reads: dotted key -> absolute path."""
    return {key: root / setting.path for key, setting in path_settings(params, root).items()}


def existing_input_files(
    params: Params, root: Path = PROJECT_ROOT, outputs: Collection[Path] | None = None
) -> dict[str, Path]:
    """Dotted key -> file, for the settings that name a file there before the run: the user's own
    (data/local, an absolute path), not one inside a stage's output, which the run rewrites. What
    content checks can read up front. `outputs`: every stage's outputs (default: from dvc.yaml)."""
    if outputs is None:
        outputs = [Path(out.fs_path) for stage in load_stages(root) for out in stage.outs]
    return {
        key: path
        for key, path in input_paths(params, root).items()
        if path.is_file() and not any(path.is_relative_to(out) for out in outputs)
    }


class PlannedOutput(NamedTuple):
    """An output of a stage, and the names of the files it will hold when they are known in advance."""

    stage: str
    files: tuple[str, ...] | None  # None: anything may appear inside (a model folder, a hub snapshot)


def data_stage_files(settings: DataSettings) -> dict[str, tuple[str, ...]]:
    """The files the data stage writes into each output folder, keyed by the option naming the folder."""
    skills = tuple(f"{skill}.jsonl" for skill in settings.skills.names)
    return {
        "--corpus": tuple(f"{split}.jsonl" for split in CORPUS_SPLITS),
        "--sft": skills,
        "--eval": (*skills, "stories.jsonl"),
        "--preference": tuple(f"{split}/{skill}" for split in ("train", "eval") for skill in skills),
    }


def planned_outputs(stages: list[Any], params: Params) -> dict[Path, PlannedOutput]:
    """Every stage output -> what the run will write there. The data stage's folders are found by
    the options of its command, which is where dvc.yaml hands it their paths."""
    planned = {Path(out.fs_path): PlannedOutput(stage.name, None) for stage in stages for out in stage.outs}
    for stage in stages:
        if stage.name != "data":
            continue
        words = stage.cmd.split()
        for option, files in data_stage_files(params.data).items():
            if option in words[:-1]:
                planned[Path(stage.wdir) / words[words.index(option) + 1]] = PlannedOutput(stage.name, files)
    return planned


def _holding_output(path: Path, planned: dict[Path, PlannedOutput]) -> Path | None:
    return next((out for out in planned if path.is_relative_to(out)), None)  # outputs never overlap


def will_exist(path: Path, planned: dict[Path, PlannedOutput]) -> bool:
    """Whether `path` is there when its readers run: on disk now, or written by a stage."""
    output = _holding_output(path, planned)
    if output is None:
        return path.exists()
    files = planned[output].files
    return files is None or path == output or path.relative_to(output).as_posix() in files


def _listing(folder: Path, files: tuple[str, ...], root: Path) -> str:
    """`data/sft/{addition,sorting}.jsonl` for files of one type, else a comma-separated list."""
    shown = folder.relative_to(root) if folder.is_relative_to(root) else folder
    suffixes = {Path(name).suffix for name in files}
    if len(files) > 1 and len(suffixes) == 1:
        return f"{shown}/{{{','.join(Path(name).stem for name in files)}}}{suffixes.pop()}"
    return ", ".join(f"{shown}/{name}" for name in files)


def _path_problem(setting: PathSetting, planned: dict[Path, PlannedOutput], root: Path) -> str | None:
    """What is wrong with the file or folder a setting names, as the end of a sentence, or None."""
    path = root / setting.path
    output = _holding_output(path, planned)
    if output is not None:
        if will_exist(path, planned):
            return None
        stage, files = planned[output]
        return f"which the {stage} stage does not produce; it makes {_listing(output, files or (), root)}"
    if not path.exists():
        return (
            f"which does not exist, and no stage produces it. Put your own files under {LOCAL_INPUTS}/; models "
            "and datasets from the Hugging Face hub come in through a params.yaml `hub` entry (into data/hub/<name>)"
        )
    if setting.suffixes and path.is_dir():
        return f"a folder: it must be a {_one_of(setting.suffixes)} file"
    if not setting.suffixes and not path.is_dir():
        return "a file: it must be a folder (a Hugging Face model folder)"
    return None


def path_problems(params: Params, planned: dict[Path, PlannedOutput], root: Path = PROJECT_ROOT) -> list[str]:
    """Settings naming a file or folder that will not be there, or not of its kind, when its readers
    run: one line each, naming the setting and what would be valid."""
    problems = []
    for key, setting in path_settings(params, root).items():
        problem = _path_problem(setting, planned, root)
        if problem:
            problems.append(f"{key} is {setting.path!r}, {problem}")
    return problems


def undeclared_inputs(stage: str, keys: list[str], files: list[Path], params: Params, root: Path) -> list[str]:
    """Files that `stage` reads through its settings but does not depend on: DVC would not rerun it
    when they change. Each is named with its setting and the ways to fix it."""
    problems = []
    for key, path in input_paths(params, root).items():
        if not any(key == k or key.startswith(k + ".") for k in keys):
            continue  # a setting this stage does not read
        if any(path == dep or path.is_relative_to(dep) for dep in files):
            continue
        shown = path.relative_to(root) if path.is_relative_to(root) else path
        problems.append(
            f"{key} is {str(shown)!r}, which stage {stage!r} reads but does not depend on in dvc.yaml, so DVC "
            f"would not rerun it when that changes. Put the file under {LOCAL_INPUTS}/ (a dependency of every "
            "stage that reads files named in params.yaml) or add it to the stage's deps."
        )
    return problems


class DeclaredView:
    """Read-only view of validated params that lets a stage read only its declared keys.

    Reading a key that no declared key covers raises ParamsError; a node whose every key is
    declared is returned as the real pydantic object.
    """

    def __init__(self, value: Any, path: str, declared: frozenset[str], stage: str):
        self._value, self._path, self._declared, self._stage = value, path, declared, stage

    def _child(self, name: str, value: Any) -> Any:
        path = f"{self._path}.{name}" if self._path else name
        if any(path == key or path.startswith(key + ".") for key in self._declared):
            return value
        if any(key.startswith(path + ".") for key in self._declared):
            return DeclaredView(value, path, self._declared, self._stage)
        raise ParamsError(
            f"stage {self._stage!r} reads params key '{path}' but its dvc.yaml entry does not declare it "
            f"(declared: {', '.join(sorted(self._declared))}); add it under `params:` so DVC reruns the "
            "stage when it changes"
        )

    def declares(self, key: str) -> bool:
        """Whether the stage declares `key` (a dotted params.yaml key) itself."""
        return key in self._declared

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._child(name, getattr(self._value, name))

    def __getitem__(self, name: str) -> Any:
        return self._child(name, self._value[name])


def load_stage_params(stage: str, params_path: Path | None = None, root: Path = PROJECT_ROOT) -> Any:
    """Validate params.yaml, check that every file its settings name for `stage` is a dependency,
    then return a view limited to the settings `stage` declares in dvc.yaml."""
    params = load_params(params_path or root / "params.yaml")
    keys, files = declared(stage, root)
    problems = undeclared_inputs(stage, keys, files, params, root)
    if problems:
        raise ParamsError("\n".join(problems))
    return DeclaredView(params, "", frozenset(keys), stage)


def _lookup(node: Any, key: str) -> Any:
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def load_stages(root: Path = PROJECT_ROOT) -> list[Any]:
    """The stages of dvc.yaml, resolved against params.yaml (messages name them by `stage.name`,
    which, unlike `addressing`, does not depend on the current directory)."""
    from dvc.repo import Repo  # imported here: DVC takes a second to import

    with Repo(str(root)) as repo:
        try:
            return list(repo.index.stages)
        except Exception as error:  # DVC's parse errors for dvc.yaml come in several types
            raise ParamsError(f"dvc.yaml cannot be resolved against params.yaml: {error}") from None


def check(root: Path = PROJECT_ROOT) -> list[str]:
    """Validate params.yaml, the files and folders its settings name, and every stage's declarations
    in dvc.yaml; return a report."""
    params = load_params(root / "params.yaml")
    stages = load_stages(root)
    planned = planned_outputs(stages, params)
    report, problems = [], path_problems(params, planned, root)
    for stage in stages:
        keys = stage_params(stage)
        problems.extend(undeclared_inputs(stage.name, keys, stage_files(stage), params, root))
        for key in keys:
            try:
                _lookup(params, key)
            except (AttributeError, KeyError):
                problems.append(
                    f"dvc.yaml: stage {stage.name!r} declares params key {key!r}, "
                    "which params.yaml's schema does not have"
                )
        report.append(f"  {stage.name}: {', '.join(keys) or '(no params)'}")
    named = set(input_paths(params, root).values())  # path_problems reports these with their setting
    problems.extend(missing_dependencies(stages, planned, named, root))
    if problems:
        raise ParamsError("\n".join(problems))
    return report


def missing_dependencies(
    stages: list[Any], planned: dict[Path, PlannedOutput], named: Collection[Path], root: Path
) -> list[str]:
    """Deps that will not be there when their stage runs: DVC would stop there mid-run; say so up front."""
    problems = []
    for stage in stages:
        for dep in stage.deps:
            if getattr(dep, "params", None) is not None or dep.protocol != "local":
                continue
            path = Path(dep.fs_path)
            # there, written by a stage, or a folder that outputs go into
            if path in named or will_exist(path, planned) or any(out.is_relative_to(path) for out in planned):
                continue
            shown = path.relative_to(root) if path.is_relative_to(root) else path
            problems.append(
                f"dvc.yaml: stage {stage.name!r} depends on {shown}, "
                "which does not exist and no stage produces. A model or dataset from the Hugging Face hub "
                "comes in through a params.yaml `hub` entry (fetched into data/hub/<name>; see README)."
            )
    return problems
