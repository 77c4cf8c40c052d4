"""params.yaml as a whole: every section's schema, and the rules that span sections.

A stage validates only the sections it declares (pipeline/settings/stage_view.py); the check stage
validates the whole file with `load_params()` before any stage runs, so these rules hold for all.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from pipeline.settings.adapters import AdapterSettings
from pipeline.settings.base import (
    PROJECT_ROOT,
    Name,
    ParamsError,
    PathSetting,
    Section,
    format_validation_error,
    read_yaml,
)
from pipeline.settings.compute import ComputeSettings
from pipeline.settings.data import DataSettings
from pipeline.settings.dpo import DPOSettings
from pipeline.settings.eval import EvalSettings
from pipeline.settings.finetune import FinetuneSettings
from pipeline.settings.gguf import GGUFSettings
from pipeline.settings.hub import HubSource
from pipeline.settings.merge import MERGE_METHODS, MergeSettings
from pipeline.settings.merge_search import MergeSearchSettings
from pipeline.settings.mixture import MixtureSettings
from pipeline.settings.moe import MoESettings
from pipeline.settings.pretrain import PretrainSettings
from pipeline.settings.qat import QATSettings
from pipeline.settings.quantize import QuantizeSettings
from pipeline.settings.seeds import SeedsSettings
from pipeline.settings.select import SelectSettings
from pipeline.settings.sft import SFTSettings
from pipeline.settings.stage_view import section_path_settings
from pipeline.settings.tokenize import TokenizeSettings


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
    merge_search: MergeSearchSettings = Field(default_factory=MergeSearchSettings)
    select: SelectSettings = Field(default_factory=SelectSettings)
    moe: MoESettings = Field(default_factory=MoESettings)
    mixture: MixtureSettings = Field(default_factory=MixtureSettings)
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)
    qat: QATSettings = Field(default_factory=QATSettings)
    quantize: QuantizeSettings = Field(default_factory=QuantizeSettings)
    gguf: GGUFSettings = Field(default_factory=GGUFSettings)
    seeds: SeedsSettings = Field(default_factory=SeedsSettings)

    @model_validator(mode="after")
    def _hub_folders_named_exist(self) -> Params:
        for key, setting in path_settings(self).items():
            path, parts = setting.path, Path(setting.path).parts
            if parts[:2] == ("data", "hub") and (len(parts) < 3 or parts[2] not in self.hub):
                raise ValueError(
                    f"{key} is {path!r}, but data/hub/<name> folders come from `hub` entries and there is none "
                    f"named {parts[2] if len(parts) > 2 else '(missing)'!r} (hub entries: {sorted(self.hub) or 'none'})"
                )
        return self

    @model_validator(mode="after")
    def _replicas_differ_from_the_main_run(self) -> Params:
        if self.sft.seed in self.seeds.replicas:
            raise ValueError(
                f"seeds.replicas has {self.sft.seed}, the main run's seed (sft.seed): it would train the same "
                "models again; list other seeds"
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
    def _searches_name_known_experts(self) -> Params:
        experts = list(self.finetune.experts)
        for name, run in self.merge_search.runs.items():
            chosen = run.experts if run.experts is not None else experts
            if unknown := [e for e in chosen if e not in experts]:
                raise ValueError(f"merge_search.runs.{name}.experts: {unknown} are not in finetune.experts "
                                 f"({', '.join(experts)})")  # fmt: skip
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"merge_search.runs.{name}.experts lists an expert twice: {chosen}")
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


def load_params(path: Path | str = PROJECT_ROOT / "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError naming every bad key."""
    path = Path(path)
    raw = read_yaml(path) or {}
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(format_validation_error(error, str(path), Params)) from None


def path_settings(params: Params, root: Path = PROJECT_ROOT) -> dict[str, PathSetting]:
    """The settings that name a file or folder some stage reads, by dotted key."""
    return section_path_settings({section: getattr(params, section) for section in Params.model_fields}, root)


def input_paths(params: Params, root: Path = PROJECT_ROOT) -> dict[str, Path]:
    """The settings that name a file or folder some stage reads: dotted key -> absolute path."""
    return {key: root / setting.path for key, setting in path_settings(params, root).items()}
