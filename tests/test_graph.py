"""dvc.yaml tells the truth: what each stage runs, imports, reads and writes is declared there.

DVC reruns a stage only when something it declares changes. Everything a stage's code depends on
that dvc.yaml does not name would make the cache lie: an edited module, a file passed on the
command line, a setting. These checks derive those from the code and the commands themselves.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

from pipeline.kinds import EXPORTS, KINDS
from pipeline.settings.base import PROJECT_ROOT
from pipeline.settings.params_file import Params, load_params
from pipeline.settings.stage_view import stage_files, stage_params

# Command-line values that are neither inputs nor outputs: scratch folders a stage empties
# itself, pretrain's resumable checkpoints (see dvc.yaml), the logs of volatile facts (timings)
# that nothing may hash, and model ids (expert/addition), which look like paths.
NOT_FILES = {"--work", "--checkpoints", "--timing", "--name"}
SEARCH_STAGES = ("merge_search", "eval_search")  # the merge-search profile's own


@pytest.fixture(scope="module")
def stages() -> Iterator[list[Any]]:
    """Every stage of the default experiment and one of each optional run (dpo, adapters, qat, quantize,
    gguf: none by default), as the post-sft profile makes them, the replicated runs' stages
    (`<stage>_seed@...`: none by default), as the seeds profile makes them, and a merge search's, as the
    merge-search profile makes them, each read in a mirror of the project whose paths resolve to the
    project's own files."""
    from dvc.repo import Repo

    from stages.check import profile_project

    with (
        profile_project("post-sft", PROJECT_ROOT) as mirror,
        Repo(str(mirror)) as repo,
        profile_project("seeds", PROJECT_ROOT) as seeds_mirror,
        Repo(str(seeds_mirror)) as seeds_repo,
        profile_project("merge-search", PROJECT_ROOT) as search_mirror,
        Repo(str(search_mirror)) as search_repo,
    ):
        replicated = [stage for stage in seeds_repo.index.stages if "_seed@" in stage.name]
        searches = [stage for stage in search_repo.index.stages if stage.name.split("@")[0] in SEARCH_STAGES]
        assert replicated and searches, "the seeds profile makes no replicated stage, or merge-search no search"
        yield list(repo.index.stages) + replicated + searches


def files(stage: Any) -> list[Path]:
    """The stage's file dependencies, as paths in the project."""
    return [path.resolve() for path in stage_files(stage)]


def module_file(name: str) -> Path | None:
    """The project's file for module `name` (e.g. pipeline.sft), or None outside the project."""
    path = PROJECT_ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file() and candidate.relative_to(PROJECT_ROOT).parts[0] in ("stages", "pipeline"):
            return candidate
    return None


@functools.cache
def project_imports(module: str) -> frozenset[Path]:
    """The project files that running `python -m module` executes: its own, and every module of
    stages/ or pipeline/ it imports, at the top or inside functions, directly or not. A string
    naming one (axolotl loads `pipeline.axolotl_dvclive.DVCLivePlugin` by name) counts too.
    Package __init__ files holding only a docstring are left out: they cannot change a result."""
    found: set[Path] = set()
    pending = [module]
    while pending:
        path = module_file(pending.pop())
        if path is None or path in found:
            continue
        found.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                pending.append(node.module)
                pending += [f"{node.module}.{alias.name}" for alias in node.names]  # from pipeline import sft
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                named = re.fullmatch(r"((?:stages|pipeline)(?:\.settings)?\.\w+)(\.\w+)*", node.value)
                pending += [named.group(1)] if named else []
    return frozenset(path for path in found if path.name != "__init__.py" or not docstring_only(path))


def docstring_only(path: Path) -> bool:
    return all(isinstance(node, ast.Expr) for node in ast.parse(path.read_text()).body)


def command_module(stage: Any) -> str:
    (module,) = re.findall(r"python -m (\S+)", stage.cmd)
    return module


def stage_code(stage: Any) -> set[Path]:
    """The project files a stage executes: its module's imports, and the schema of every params
    section it declares (pipeline/settings/stage_view.py imports pipeline/settings/<section>.py by
    name), with theirs."""
    sections = {key.split(".")[0] for key in stage_params(stage)}
    modules = [command_module(stage), *(f"pipeline.settings.{section}" for section in sections)]
    return set().union(*(project_imports(module) for module in modules))


def test_every_module_a_stage_runs_is_a_dependency(stages):
    problems = []
    for stage in stages:
        declared = {path for path in files(stage) if path.suffix == ".py"}
        needed = stage_code(stage)
        for path in sorted(needed - declared):
            problems.append(f"{stage.addressing}: imports {path.relative_to(PROJECT_ROOT)}, not in its deps")
        for path in sorted(declared - needed):
            problems.append(f"{stage.addressing}: depends on {path.relative_to(PROJECT_ROOT)}, which it never imports")
    assert not problems, "\n".join(problems)


def test_import_derivation_follows_function_level_imports_and_plugin_names():
    """The derivation itself: merge imports mergekit inside a function (not ours), the SFT stages
    reach the axolotl plugin only through its name in the generated config."""
    finetune = {path.name for path in project_imports("stages.finetune")}
    assert {"finetune.py", "sft.py", "axolotl_dvclive.py", "curves.py", "stage.py", "stage_view.py"} <= finetune
    assert "eval.py" not in finetune and "__init__.py" not in finetune


def test_every_path_on_a_command_line_is_a_dependency_or_an_output(stages):
    problems = []
    for stage in stages:
        declared = files(stage) + [Path(out.fs_path).resolve() for out in stage.outs]
        words = stage.cmd.split()
        for flag, value in zip(words, words[1:], strict=False):
            if not flag.startswith("--") or flag in NOT_FILES:
                continue
            for word in [value, *words[words.index(value) + 1 :]]:  # --curves a=x b=y takes several
                if word.startswith("--"):
                    break
                path = PROJECT_ROOT / word.partition("=")[2 if "=" in word else 0]
                if "/" not in word:
                    continue
                # a declared file or folder, one inside such a folder, or a folder holding outputs (--live)
                if not any(path == p or path.is_relative_to(p) or p.is_relative_to(path) for p in declared):
                    problems.append(f"{stage.addressing}: {flag} {word} is neither a dependency nor an output")
    assert not problems, "\n".join(problems)


def leaf_keys(model: Any, prefix: str = "") -> list[str]:
    values = model.model_dump(mode="json") if prefix == "" else model
    keys: list[str] = []
    for name, value in values.items():
        if isinstance(value, dict):  # an empty one ({} hub entries) has no setting to change
            keys += leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_setting_reruns_some_stage(stages):
    """DVC reruns a stage when a params key it declares changes: every leaf of the settings (the
    defaults params.yaml leaves out included) must be under some stage's declared keys, or changing
    it would change nothing. (A stage reading a key it does not declare fails: DeclaredView.)"""
    declared = {key for stage in stages for key in stage_params(stage)}
    every = leaf_keys(Params()) + leaf_keys(load_params())
    orphans = sorted({key for key in every if not any(key == d or key.startswith(d + ".") for d in declared)})
    assert not orphans, f"settings no stage declares: {orphans}"


def test_torch_stages_declare_the_compute_settings(stages):
    """compute.* decides the bytes of every result torch computes (pipeline/stage.py): every stage but NOT_TORCH's."""
    for stage in stages:
        computes = not any(fnmatch(stage.name, name) for name in NOT_TORCH)
        assert ("compute" in stage_params(stage)) == computes, stage.addressing


# What each setting may make stale besides the check stage (which reads all of params.yaml): a
# stage per entry of a named collection for that entry's settings (each kind's, from
# pipeline/kinds.py), the stages of one kind for a section's shared settings. Keys are matched by
# their first parts; `{}` is the entry's name, a leading `!` leaves stages out.
NOT_TORCH = ("check", "hub@*", "data", "tokenize", "select", "select_seed@*", "mixture", "report")  # the rest compute
SFT_STAGES = ("finetune", "dense", "moe_finetune", "dpo", "adapter", "qat")
EVAL_STAGES = tuple(kind.eval_stage for kind in KINDS)
SEARCH_EVAL_KEYS = ("apply_chat_template", "batch_size", "device", "dtype", "limit", "num_fewshot", "seed")
READERS = {
    "hub.{}": ["hub@{}"],
    "compute": ["*", *(f"!{name}" for name in NOT_TORCH)],
    "data": ["data"],
    "tokenize": ["tokenize"],
    "pretrain": ["pretrain"],
    "eval": [f"{kind}@*" for kind in EVAL_STAGES],
    # a merge search scores its trials as the eval stages score models, on the validation split
    **{f"eval.{key}": [f"{kind}@*" for kind in EVAL_STAGES] + ["merge_search@*"] for key in SEARCH_EVAL_KEYS},
    "eval.max_gen_tokens": [f"{kind}@*" for kind in EVAL_STAGES] + ["gguf@*", "merge_search@*"],
    "sft": [f"{kind}@*" for kind in SFT_STAGES],
    "finetune.base_model": ["finetune@*", "adapter@*", "qat@*"],
    "finetune.replay_text": ["finetune@*", "adapter@*", "qat@*", "dense@*", "moe_finetune@*"],
    "finetune.defaults": ["finetune@*", "adapter@*", "qat@*"],
    "merge.dtype": ["merge@*", "merge_search@*"],
    "merge.seed": ["merge@*"],
    "select": ["select"],
    "moe": ["moe@*"],
    "mixture.weights": ["mixture"],
    "mixture.rows": ["mixture"],
    "mixture.seed": ["mixture"],
    "mixture.defaults": ["dense@*", "moe_finetune@*"],
    "mixture.router_aux_loss_coef": ["moe_finetune@*"],
    "dpo": ["dpo@*"],
    "gguf": ["gguf@*"],
    "seeds": ["report"],  # and, through dvc.yaml's matrices, which replicated stages exist
    **{f"{kind.section}.{{}}": [f"{kind.stage}@{{}}"] for kind in KINDS if kind.section},
    **{f"{section}.{{}}": [f"{name}@{{}}"] for name, (section, _) in EXPORTS.items()},
}


def with_replicas(patterns: list[str]) -> list[str]:
    """Each pattern and its replicated runs' (`finetune@{}` -> `finetune_seed@{}-*`, `select` ->
    `select_seed@*`): a replicated stage declares the settings of the stage it replicates."""
    replicas = []
    for pattern in patterns:
        entry, at, key = pattern.partition("@")
        replicas.append(f"{entry}_seed@{key}-*" if at and key != "*" else f"{entry}_seed@*")
    return patterns + [replica for replica in replicas if replica not in ("*_seed@*", "!*_seed@*")]


def readers(key: str, names: set[str]) -> set[str]:
    """The stages among `names` that READERS says may read `key` (its most specific pattern), and check."""
    parts = key.split(".")
    for length in range(len(parts), 0, -1):
        for pattern, stages in READERS.items():
            pattern_parts = pattern.split(".")
            if len(pattern_parts) != length:
                continue
            entry = next((part for part, want in zip(parts, pattern_parts, strict=False) if want == "{}"), None)
            if all(want in ("{}", part) for part, want in zip(parts, pattern_parts, strict=False)):
                wanted = with_replicas([stage.replace("{}", entry or "") for stage in stages])
                left_out = [want[1:] for want in wanted if want.startswith("!")]
                return {"check"} | {
                    name
                    for name in names
                    if any(fnmatch(name, want) for want in wanted) and not any(fnmatch(name, out) for out in left_out)
                }
    raise AssertionError(f"READERS has no pattern for {key}")


def set_leaf(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[last] = value


@pytest.mark.parametrize("profile", sorted(path.stem for path in (PROJECT_ROOT / "profiles").glob("*.yaml")))
def test_a_setting_makes_stale_exactly_the_stages_that_read_it(profile, monkeypatch):
    """For every leaf of each profile's settings (the defaults params.yaml leaves out included),
    DVC's own params comparison (dvc.dependency.param, on params.yaml's content as it would be read)
    finds stale exactly the stages READERS names. One process: the file's content is swapped in memory."""
    import copy

    import dvc.dependency.param as dvc_params
    from dvc.repo import Repo

    from pipeline.settings.base import read_yaml
    from stages.check import profile_project

    with profile_project(profile, PROJECT_ROOT) as mirror, Repo(str(mirror)) as repo:
        stages = list(repo.index.stages)
        original = read_yaml(mirror / "params.yaml")
        content = {"config": original}
        monkeypatch.setattr(dvc_params, "load_path", lambda *args, **kwargs: content["config"])
        deps = [
            (stage.name, dep) for stage in stages for dep in stage.deps if isinstance(dep, dvc_params.ParamsDependency)
        ]
        for _, dep in deps:
            dep.fill_values(dep.read_params())  # as dvc.lock would record them
        names = {stage.name for stage in stages}
        problems = []
        for key in sorted(set(leaf_keys(Params()) + leaf_keys(load_params(mirror / "params.yaml")))):
            content["config"] = copy.deepcopy(original)
            set_leaf(content["config"], key, "a changed value")
            # a dep reads only the sections it declares (the whole file when it declares none): the others
            # cannot have changed, and DVC's key lookup is slow (milliseconds each)
            section = key.split(".")[0]
            maybe = [
                (name, dep) for name, dep in deps if not dep.params or section in {p.split(".")[0] for p in dep.params}
            ]
            stale = {name for name, dep in maybe if dep.workspace_status()}
            expected = readers(key, names)
            if stale != expected:
                problems.append(f"{key}: stales {sorted(stale - expected)} too, not {sorted(expected - stale)}")
    assert not problems, "\n".join(problems)


def test_a_settings_module_is_code_of_the_stages_that_read_its_section_only(stages):
    """A comment in one section's schema reruns the stages that read that section (and check),
    not every stage: each pipeline/settings/<section>.py is a dependency of those alone."""
    names = {stage.name for stage in stages}
    problems = []
    for module in sorted((PROJECT_ROOT / "pipeline/settings").glob("*.py")):
        section = module.stem
        if section not in Params.model_fields:
            continue  # base.py, stage_view.py (every stage's), params_file.py (check's)
        dependents = {stage.name for stage in stages if module in files(stage)}
        readers_of_section = {
            stage.name for stage in stages if any(k.split(".")[0] == section for k in stage_params(stage))
        }
        importers = {stage.name for stage in stages if module in project_imports(command_module(stage))}
        if dependents != {"check"} | readers_of_section | importers or dependents == names:
            problems.append(f"{module.name}: a dependency of {sorted(dependents)}")
    assert not problems, "\n".join(problems)


def test_every_kind_of_model_is_made_and_evaluated_as_its_registry_entry_says(stages):
    """pipeline/kinds.py against dvc.yaml: per entry of the kind's params collection, its stage makes a
    model folder, its eval stage evaluates that folder as `<kind>/<entry>`, an optional run's own
    metrics go to metrics/runs/<runs_metrics>/; and every eval stage is some kind's."""
    from pipeline.kinds import KINDS
    from pipeline.planner import lookup

    params = load_params(Path(stages[0].repo.root_dir) / "params.yaml")
    by_name = {stage.name: stage for stage in stages}
    problems = []
    for kind in KINDS:
        names = list(lookup(params, kind.section)) if kind.section else ["pretrain"]  # dvc.yaml's vars base_models
        for entry in names:
            evaluation = by_name.get(f"{kind.eval_stage}@{entry}")
            if evaluation is None:
                problems.append(f"{kind.name}/{entry}: no stage {kind.eval_stage}@{entry}")
                continue
            words = evaluation.cmd.split()
            model = Path(evaluation.repo.root_dir) / words[words.index("--model") + 1]
            if words[words.index("--name") + 1] != f"{kind.name}/{entry}":
                problems.append(f"{evaluation.name} does not evaluate it as {kind.name}/{entry}")
            if kind.stage is None:
                continue
            maker = by_name.get(f"{kind.stage}@{entry}")
            outs = [Path(out.fs_path) for out in maker.outs] if maker else []
            if not outs or outs[0] != model:
                problems.append(f"{kind.name}/{entry}: {kind.stage}@{entry} does not make {model}, which it evaluates")
            if kind.runs_metrics and not any(f"/metrics/runs/{kind.runs_metrics}/" in str(out) for out in outs):
                problems.append(f"{kind.stage}@{entry} writes no metrics under metrics/runs/{kind.runs_metrics}/")
    problems += replicated_problems(stages)
    evaluated = {kind.eval_stage for kind in KINDS} | {f"{kind.eval_stage}_seed" for kind in KINDS if kind.replicated}
    problems += [f"{name}: an eval stage of no kind" for name in by_name if "stages.eval " in by_name[name].cmd + " "
                 and name.split("@")[0] not in evaluated]  # fmt: skip
    assert not problems, "\n".join(problems)


def replicated_problems(stages: list[Any]) -> list[str]:
    """The replicated kinds per seed of the seeds profile: `<stage>_seed@<entry>-<seed>` makes the model
    folder under models/replicas/<seed>/ that `<eval_stage>_seed@<entry>-<seed>` evaluates as
    `<kind>/<entry>` into metrics/replicas/<seed>/eval/<kind>/<entry>.json, where the report reads it."""
    from pipeline.planner import lookup

    replicated = [stage for stage in stages if "_seed@" in stage.name]
    root = Path(replicated[0].repo.root_dir)
    params = load_params(root / "params.yaml")
    by_name = {stage.name: stage for stage in replicated}
    problems = []
    for kind in (kind for kind in KINDS if kind.replicated):
        for entry in lookup(params, kind.section):
            for seed in params.seeds.replicas:
                maker, evaluation = (
                    by_name.get(f"{name}_seed@{entry}-{seed}") for name in (kind.stage, kind.eval_stage)
                )
                if maker is None or evaluation is None:
                    problems.append(f"{kind.name}/{entry}, seed {seed}: no {kind.stage}_seed or {kind.eval_stage}_seed")
                    continue
                words = evaluation.cmd.split()
                model = root / words[words.index("--model") + 1]
                metrics = root / words[words.index("--metrics") + 1]
                if Path(maker.outs[0].fs_path) != model or not model.is_relative_to(
                    root / "models/replicas" / str(seed)
                ):
                    problems.append(f"{evaluation.name} evaluates {model}, not what {maker.name} makes for its seed")
                if words[words.index("--name") + 1] != f"{kind.name}/{entry}":
                    problems.append(f"{evaluation.name} does not evaluate it as {kind.name}/{entry}")
                if metrics != root / f"metrics/replicas/{seed}/eval/{kind.name}/{entry}.json":
                    problems.append(f"{evaluation.name} writes {metrics}, not where the report reads seed {seed}")
    return problems
