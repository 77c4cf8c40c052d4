"""`moe@<variant>` stage: a Mixtral-architecture mixture of experts built by mergekit-moe.

    python -m stages.moe --variant experts --selection metrics/select.json --merged models/merged \
        --experts models/experts --base-model models/pretrain --eval-sets data/eval \
        --out models/moe/experts --routing metrics/routing/moe/experts.json

Each entry of moe.variants names where its experts come from: the merges the select stage chose,
the SFT experts (Branch-Train-MiX), or the base model copied into every expert (sparse
upcycling). Their MLPs become the experts of each layer; attention, embeddings and norms come
from the first of them (the best-ranked merge). The routers start from each expert's prompts
(gate_mode hidden / cheap_embed) or at random. The mergekit-moe configuration is saved beside
the weights (mergekit_moe.yaml), with lineage.json (kind `moe`); the tokenizer is the experts'
own (mergekit-moe would re-save it with pad = BOS and left padding). --routing gets the share
of each skill's tokens routed to each expert in each layer (a plot in the report).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.atomic import atomic_dir, write_json
from pipeline.lineage import json_block, model_id, render_card, write_lineage
from pipeline.records import dataset_format
from pipeline.roster import Roster, read_roster_file
from pipeline.routing import EXPERT_NAMES, routing_metrics
from pipeline.settings.base import InputError
from pipeline.settings.moe import ExpertPrompts, MoESettings, MoEVariant
from pipeline.stage import RunFailed, add_seed_argument, configure_environment, resolve_device, stage_name, start

log = logging.getLogger("stages.moe")


def first_questions(dataset: Path, count: int) -> list[str]:
    """The first `count` user messages of a chat-messages dataset (jsonl, json or parquet)."""
    from datasets import load_dataset

    rows = load_dataset(dataset_format(dataset), data_files=str(dataset), split=f"train[:{count}]")
    return [next(m["content"] for m in messages if m["role"] == "user") for messages in rows["messages"]]


def expert_prompts(
    settings: MoESettings, sources: dict[str, str], parents: dict[str, list[str]], datasets: dict[str, Path]
) -> dict[str, ExpertPrompts]:
    """Each source's routing prompts: from params, else its experts' first SFT questions."""
    prompts = {}
    for name in sources:
        if name in settings.prompts:
            prompts[name] = settings.prompts[name]
        elif parents.get(name):
            questions = [
                q for expert in parents[name] for q in first_questions(datasets[expert], settings.prompt_examples)
            ]
            prompts[name] = ExpertPrompts(positive=questions)
    return prompts


def moe_config(
    settings: MoESettings, sources: dict[str, str], prompts: dict[str, ExpertPrompts], shared_from: str
) -> dict[str, Any]:
    """mergekit-moe's YAML configuration (as a dict); checked before anything is built."""
    routed_by_prompts = settings.gate_mode in ("hidden", "cheap_embed")
    experts = []
    for name, path in sources.items():
        expert: dict[str, Any] = {"source_model": path}
        if routed_by_prompts:
            if name not in prompts:
                raise InputError(
                    f"moe.gate_mode {settings.gate_mode} routes by prompts and expert {name!r} has none: "
                    f"set moe.prompts.{name} (positive: [...]), or use gate_mode random"
                )
            expert["positive_prompts"] = prompts[name].positive
            if prompts[name].negative:
                expert["negative_prompts"] = prompts[name].negative
        experts.append(expert)
    if (
        routed_by_prompts
        and len({str(e.get("positive_prompts")) + str(e.get("negative_prompts")) for e in experts}) == 1
    ):
        raise InputError(
            f"every expert of the MoE ({', '.join(sources)}) has the same prompts, so the "
            f"{settings.gate_mode} gate cannot tell them apart (e.g. merges of the same experts): set distinct "
            "moe.prompts or use gate_mode random"
        )
    if settings.experts_per_token > len(experts):
        raise InputError(
            f"moe.experts_per_token {settings.experts_per_token} is more than the {len(experts)} experts "
            f"({', '.join(sources)})"
        )
    return {
        "base_model": shared_from,
        "architecture": "mixtral",
        "gate_mode": settings.gate_mode,
        "experts_per_token": settings.experts_per_token,
        "dtype": settings.dtype,
        "experts": experts,
    }


def build(
    settings: MoESettings, variant_name: str, config: dict[str, Any], sources: dict[str, str], out_dir: Path
) -> None:
    """Run mergekit-moe into `out_dir` (atomically) with the shared model's own tokenizer."""
    import torch
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig, is_bad_config
    from mergekit.scripts.moe import build as mergekit_moe_build
    from transformers import AutoTokenizer

    variant = settings.variants[variant_name]
    allow_all_same = variant.source == "base"  # copies of one model, made different by training
    moe_config_model = MoEMergeConfig.model_validate(config)
    if is_bad_config(moe_config_model, allow_all_same=allow_all_same):  # logs why
        raise RunFailed("mergekit-moe rejects the MoE configuration (its reason is logged above)")
    torch.manual_seed(settings.seed)  # the random gates
    with atomic_dir(out_dir) as tmp:
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
        mergekit_moe_build(moe_config_model, str(tmp), options, device=resolve_device(), allow_all_same=allow_all_same)
        AutoTokenizer.from_pretrained(config["base_model"]).save_pretrained(tmp)
        (tmp / EXPERT_NAMES).write_text(json.dumps(list(sources)) + "\n")
        with open(tmp / "mergekit_moe.yaml", "w") as handle:
            YAML().dump(config, handle)
        (tmp / "README.md").write_text(model_card(settings, variant_name, variant, config))
        parents = sorted({model_id(path) for path in sources.values()})
        shared = settings.model_dump(mode="json", exclude={"variants"})
        write_lineage(tmp, "moe", variant_name, f"moe@{variant_name}", parents,
                      {"variant": variant.model_dump(mode="json"), **shared})  # fmt: skip


def model_card(settings: MoESettings, variant_name: str, variant: MoEVariant, config: dict[str, Any]) -> str:
    experts = "\n".join(f"- `{e['source_model']}`" for e in config["experts"])
    intro = f"""Made by this project's `moe@{variant_name}` stage with mergekit-moe (Mixtral architecture, gate mode
`{settings.gate_mode}`, {settings.experts_per_token} experts per token) from source `{variant.source}`:

{experts}

Attention, embeddings and norms come from `{config["base_model"]}`. The exact mergekit-moe
configuration is `mergekit_moe.yaml`."""
    return render_card(
        f"Mixture of experts `moe/{variant_name}`", intro, {"Settings": json_block(settings.model_dump(mode="json"))}
    )


def variant_sources(
    variant: MoEVariant, roster: Roster, selection: Path, merged: Path, experts: Path, base_model: str
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(source name -> model folder, source name -> the SFT experts it stems from) of one variant."""
    if variant.source == "selected_merges":
        selected = json.loads(selection.read_text())["selected"]
        return {name: str(merged / name) for name in selected}, {name: roster.merges[name] for name in selected}
    if variant.source == "experts":
        names = variant.experts or list(roster.experts)
        return {name: str(experts / name) for name in names}, {name: [name] for name in names}
    return {f"copy_{i}": base_model for i in range(variant.num_experts)}, {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", required=True, help="a key of moe.variants")
    parser.add_argument("--roster-experts", type=Path, required=True, help="the roster's experts.json")
    parser.add_argument("--roster-merges", type=Path, required=True, help="the roster's merges.json")
    parser.add_argument("--selection", type=Path, required=True, help="the select stage's JSON")
    parser.add_argument("--merged", type=Path, required=True, help="folder of the merged model folders")
    parser.add_argument("--experts", type=Path, required=True, help="folder of the expert model folders")
    parser.add_argument("--base-model", required=True, help="finetune.base_model")
    parser.add_argument("--eval-sets", type=Path, required=True, help="held-out questions, for the routing metrics")
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    parser.add_argument("--routing", type=Path, required=True, help="JSON: skill -> layer -> share per expert")
    add_seed_argument(parser)
    args = parser.parse_args(argv)
    params = start(stage_name(f"moe@{args.variant}", args.seed))
    # this variant and the shared keys: what the stage declares (other variants are not its inputs)
    shared = {name: getattr(params.moe, name) for name in MoESettings.model_fields if name != "variants"}
    if args.seed is not None:
        shared["seed"] = args.seed
    settings = MoESettings(variants={args.variant: params.moe.variants[args.variant]}, **shared)
    variant = settings.variants[args.variant]
    roster = Roster(read_roster_file(args.roster_experts), read_roster_file(args.roster_merges))
    datasets = {name: Path(dataset) for name, dataset in roster.experts.items()}
    sources, parents = variant_sources(variant, roster, args.selection, args.merged, args.experts, args.base_model)
    configure_environment()
    routed_by_prompts = settings.gate_mode in ("hidden", "cheap_embed")
    prompts = expert_prompts(settings, sources, parents, datasets) if routed_by_prompts else {}
    config = moe_config(settings, sources, prompts, next(iter(sources.values())))
    log.info("building a %d-expert MoE from %s (gate %s)", len(sources), ", ".join(sources), settings.gate_mode)
    build(settings, args.variant, config, sources, args.out)
    write_json(args.routing, routing_metrics(args.out, args.eval_sets))


if __name__ == "__main__":
    main()
