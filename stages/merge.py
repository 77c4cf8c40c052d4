"""`merge@<recipe>` stage: experts merged by mergekit into one model.

    python -m stages.merge --recipe ties --experts models/experts --base-model models/pretrain \
        --out models/merged/ties

The recipe (params.yaml merge.recipes.<recipe>) becomes a mergekit configuration, validated by
mergekit's own `MergeConfiguration` and saved as mergekit.yaml beside the weights; the merge
runs through mergekit's Python API (`run_merge`), seeded so that the random-drop methods give
byte-identical weights on a rerun. The output is a Hugging Face model folder with the experts'
tokenizer and a model card naming its parents and method.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline.atomic import atomic_dir
from pipeline.lineage import LINEAGE_FILE, json_block, model_id, render_card, write_lineage
from pipeline.roster import read_roster_file
from pipeline.settings.base import InputError
from pipeline.settings.merge import MERGE_METHODS, MergeRecipe
from pipeline.stage import add_seed_argument, configure_environment, stage_name, start

log = logging.getLogger("stages.merge")


def mergekit_config(recipe: MergeRecipe, experts: dict[str, str], base_model: str | None, dtype: str) -> dict[str, Any]:
    """mergekit's YAML configuration (as a dict) for `recipe` over `experts` (name -> model folder)."""
    spec = MERGE_METHODS[recipe.method]
    shared = {k: v for k, v in recipe.parameters.items() if k in spec.shared_parameters}

    def model_parameters(expert: str) -> dict[str, Any]:
        values = {k: v for k, v in recipe.parameters.items() if k in spec.model_parameters}
        return {k: v[expert] if isinstance(v, dict) else v for k, v in values.items()}

    models = [{"model": path, **({"parameters": p} if (p := model_parameters(name)) else {})}
              for name, path in experts.items()]  # fmt: skip
    config: dict[str, Any] = {"merge_method": recipe.method, "models": models, "dtype": dtype}
    if recipe.base_is_first_expert():
        config["base_model"] = next(iter(experts.values()))
    elif recipe.uses_base_model():
        if base_model is None:
            raise InputError(f"{recipe.method} merges task vectors and needs the experts' base model")
        config["base_model"] = base_model
    if shared:
        config["parameters"] = shared
    return config


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, or None. Reads the 8-byte header length and the
    JSON header only: the tensors' byte ranges it lists must end exactly at the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        header_length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or 8 + header_length > size:
            return f"{size} bytes, shorter than its header"
        try:
            header = json.loads(handle.read(header_length))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is not a safetensors header"
    expected = 8 + header_length + max(ends, default=0)
    return f"{size} bytes where its header needs {expected}" if size != expected else None


def remake_hint(folder: Path) -> str:
    """How to make a model folder again: the stage its lineage.json names."""
    try:
        stage = json.loads((folder / LINEAGE_FILE).read_text())["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        return "make or copy the model again"
    return f"re-run the stage that makes it: `dvc repro -f {stage}`"


def check_model_folders(config: dict[str, Any]) -> None:
    """Raise InputError naming the first model of the mergekit configuration whose weights are
    missing or cut short: mergekit would fail on it with a stack trace that names no model."""
    folders = [model["model"] for model in config["models"]] + [config.get("base_model")]
    for folder in map(Path, dict.fromkeys(filter(None, folders))):
        if not folder.is_dir():
            raise InputError(f"model folder {folder} does not exist")
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise InputError(f"model folder {folder} has no .safetensors weights; {remake_hint(folder)}")
        for shard in shards:
            if problem := safetensors_problem(shard):
                raise InputError(f"{shard} is truncated or corrupt ({problem}); {remake_hint(folder)}")


def validated(config: dict[str, Any], where: str) -> Any:
    """mergekit's MergeConfiguration of `config`; an InputError naming `where` when mergekit rejects it."""
    from mergekit.config import MergeConfiguration

    try:
        return MergeConfiguration.model_validate(config)
    except Exception as error:  # pydantic's ValidationError, or mergekit's own checks
        raise InputError(f"{where}: mergekit rejects the configuration: {error}") from None


def write_merge(merge_config: Any, config: dict[str, Any], seed: int, out_dir: Path) -> None:
    """Merge through mergekit's Python API into out_dir (weights and the experts' tokenizer), seeded
    so that the random-drop methods give the same bytes on a rerun, and save `config` beside them as
    mergekit.yaml. The merge stage and the merge search's trials both merge here."""
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(
        copy_tokenizer=True,
        random_seed=seed,
        # mergekit's card writer takes a relative path such as models/pretrain for a hub id
        # and goes online; the stages write their own cards
        write_model_card=False,
        safe_serialization=True,
        quiet=True,
    )
    run_merge(merge_config, out_path=str(out_dir), options=options)
    with open(out_dir / "mergekit.yaml", "w") as handle:
        YAML().dump(config, handle)


def run(recipe_name: str, recipe: MergeRecipe, experts: dict[str, str], base_model: str | None,
        dtype: str, seed: int, out_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Merge; write the model folder (weights, tokenizer, mergekit.yaml, README.md); return the config."""
    config = mergekit_config(recipe, experts, base_model, dtype)
    merge_config = validated(config, f"merge.recipes.{recipe_name}")
    check_model_folders(config)
    log.info("merging %s with %s", ", ".join(experts), recipe.method)
    with atomic_dir(out_dir) as tmp:
        write_merge(merge_config, config, seed, tmp)
        (tmp / "README.md").write_text(model_card(recipe_name, recipe, config))
        parents = [model_id(path) for path in experts.values()]
        write_lineage(tmp, "merge", recipe_name, f"merge@{recipe_name}", parents,
                      {"recipe": recipe.model_dump(mode="json"), "dtype": dtype, "seed": seed})  # fmt: skip
    return config


def model_card(name: str, recipe: MergeRecipe, config: dict[str, Any]) -> str:
    parents = "\n".join(f"- `{model['model']}`" for model in config["models"])
    base = (
        f"Base model (task vectors are taken against it): `{config['base_model']}`.\n\n"
        if "base_model" in config
        else ""
    )
    intro = (
        f"Made by this project's `merge@{name}` stage with mergekit, method `{recipe.method}`, from:\n\n"
        f"{parents}\n\n{base}The exact mergekit configuration is `mergekit.yaml`."
    )
    return render_card(f"Merge `{name}`", intro, {"Recipe": json_block(recipe.model_dump(mode="json"))})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, help="a key of merge.recipes")
    parser.add_argument("--roster-experts", type=Path, required=True, help="the roster's experts.json (which experts)")
    parser.add_argument("--experts", type=Path, required=True, help="folder of the expert model folders")
    parser.add_argument("--base-model", required=True, help="the experts' base model (for task-vector methods)")
    parser.add_argument("--out", type=Path, required=True, help="output model folder")
    add_seed_argument(parser)
    args = parser.parse_args(argv)
    params = start(stage_name(f"merge@{args.recipe}", args.seed))
    recipe = params.merge.recipes[args.recipe]
    names = recipe.experts if recipe.experts is not None else list(read_roster_file(args.roster_experts))
    experts = {name: str(args.experts / name) for name in names}
    configure_environment()
    seed = params.merge.seed if args.seed is None else args.seed
    run(args.recipe, recipe, experts, args.base_model, params.merge.dtype, seed, args.out)


if __name__ == "__main__":
    main()
