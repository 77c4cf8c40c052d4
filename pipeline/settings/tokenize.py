"""The `tokenize` section: the tokenizer and its chat template."""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    Field,
    model_validator,
)

from pipeline.settings.base import (
    LOCAL_INPUTS,
    PathSetting,
    Section,
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
    bos_token: str = Field(
        "<s>", description="Beginning-of-sequence token: starts every encoded document and every chat prompt."
    )
    eos_token: str = Field(
        "</s>", description="End-of-sequence token: ends every encoded document and every answer of the chat template."
    )
    pad_token: str = Field("<pad>", description="Padding token: fills batches of unequal rows (ignored by the loss).")
    unk_token: str = Field(
        "<unk>",
        description="Unknown token, reserved as a special token (byte-level BPE spells any text in bytes, so "
        "encoding does not produce it).",
    )
    chat_template: str = Field(
        DEFAULT_CHAT_TEMPLATE,
        description="Jinja chat template saved with the tokenizer; SFT and eval prompts are rendered with it.",
    )
    batch_size: int = Field(1000, ge=1, le=100_000, description="Documents per encode_batch call (held in memory).")

    def paths(self, root: Path) -> dict[str, PathSetting]:
        base = self.base_model
        from_hub_entry = Path(base or ".").parts[:2] == ("data", "hub")  # fetched by a hub@<name> stage
        if base and ((root / base).exists() or Path(base).is_relative_to(LOCAL_INPUTS) or from_hub_entry):
            return {"base_model": PathSetting(base)}
        return {}  # none, or a hub id

    @model_validator(mode="after")
    def _special_tokens_distinct(self) -> TokenizeSettings:
        specials = [self.bos_token, self.eos_token, self.pad_token, self.unk_token]
        if len(set(specials)) != 4 or not all(specials):
            raise ValueError(f"bos/eos/pad/unk tokens must be four distinct non-empty strings, got {specials}")
        return self


# what pipeline/settings/stage_view.py validates this section with
SCHEMA = TokenizeSettings
