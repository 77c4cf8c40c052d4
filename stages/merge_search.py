"""`merge_search@<name>` stage: an Optuna search over a mergekit recipe's parameters.

    python -m stages.merge_search --name ties --roster-experts data/roster/experts.json \
        --experts models/experts --base-model models/pretrain --validation data/validation \
        --study models/search_studies/ties.db --out models/searched/ties \
        --metrics metrics/runs/merge_search/ties.json --trials-table metrics/runs/merge_search/ties/trials.csv

Each trial merges the experts with the parameters the sampler proposes (every expert's weight and,
for the methods that take one, density; the method too when several are listed), with mergekit's
Python API as the merge stage does, and scores the merge with lm-eval on the skills' validation
split: the share of validation questions answered exactly, every skill's pooled. The held-out eval
items are never seen here, so the report's comparison with the hand-written recipes stays honest.
Everything runs in this one process: mergekit, lm-eval and the task files are set up once.

The study lives in an SQLite file that DVC keeps between runs (`persist`): every trial is kept, a
stopped search resumes where it stopped (the trial it was in runs again, with the same
parameters), raising `trials` runs only the new ones, and the same settings and seed give the same
trials on the same machine (the sampler is seeded anew for each trial from the seed and the number
of trials before it). A study is named after what decides its trials (the run's settings but
`trials`, the eval settings, the bytes of the experts, the base model and the validation split), so
a changed input starts a new study in the same file instead of mixing in stale scores.

Outputs: the best trial's merge as a model folder (weights, tokenizer, mergekit.yaml, README.md,
lineage.json: kind `search`), the search's summary (a DVC metric) and every trial's parameters
and score (trials.csv, a DVC plot: the search curve).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_dir, dumps_json, write_json, write_text
from pipeline.eval_sets import skill_names
from pipeline.lineage import json_block, model_id, render_card, write_lineage
from pipeline.roster import read_roster_file
from pipeline.settings.base import InputError
from pipeline.settings.merge import MERGE_METHODS, MergeRecipe
from pipeline.settings.merge_search import SearchRun
from pipeline.stage import configure_environment, start
from stages.eval import (
    Tasks,
    evaluate,
    item_outcomes,
    pooled_skill_items,
    question_prompt,
    skill_task_configs,
    write_task_files,
)
from stages.merge import check_model_folders, mergekit_config, validated, write_merge

log = logging.getLogger("stages.merge_search")

OBJECTIVE = "all_skills/exact_match"  # of the validation split: what the search maximises
# The eval settings a trial's score depends on (dvc.yaml declares each for this stage).
EVAL_KEYS = ("batch_size", "num_fewshot", "limit", "apply_chat_template", "max_gen_tokens", "device", "dtype", "seed")


def trial_recipe(trial: Any, run: SearchRun, experts: list[str]) -> MergeRecipe:
    """The recipe `trial` proposes: its method, each expert's weight and (where the method has one) density."""
    method = trial.suggest_categorical("method", run.methods) if len(run.methods) > 1 else run.methods[0]
    parameters: dict[str, Any] = {
        "weight": {e: trial.suggest_float(f"weight/{e}", run.weight.low, run.weight.high) for e in experts}
    }
    if "density" in MERGE_METHODS[method].model_parameters:
        parameters["density"] = {e: trial.suggest_float(f"density/{e}", run.density.low, run.density.high)
                                 for e in experts}  # fmt: skip
    return MergeRecipe(method=method, experts=experts, parameters={**parameters, **fixed_parameters(run, method)})


def fixed_parameters(run: SearchRun, method: str) -> dict[str, Any]:
    """The parameters the run sets without searching them: `normalize`, where the method has it."""
    if run.normalize is None or "normalize" not in MERGE_METHODS[method].shared_parameters:
        return {}
    return {"normalize": run.normalize}


def recipe_from_params(params: dict[str, Any], run: SearchRun, experts: list[str]) -> MergeRecipe:
    """The recipe of a finished trial, from the parameters Optuna stored."""
    method = params.get("method", run.methods[0])
    parameters = {
        kind: {e: params[f"{kind}/{e}"] for e in experts}
        for kind in ("weight", "density")
        if f"{kind}/{experts[0]}" in params
    }
    return MergeRecipe(method=method, experts=experts, parameters={**parameters, **fixed_parameters(run, method)})


def make_sampler(run: SearchRun, trials_before: int) -> Any:
    """Optuna's sampler for the next trial, seeded from the run's seed and the trials before it: a
    resumed study proposes what an uninterrupted one would have."""
    import optuna

    seed = int(np.random.SeedSequence([run.seed, trials_before]).generate_state(1)[0])
    if run.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if run.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def fingerprint(settings: dict[str, Any], folders: list[Path]) -> str:
    """A hash of what decides a study's trials: `settings` and the bytes of every file in `folders`."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.relative_to(folder).as_posix().encode())
            with open(path, "rb") as handle:
                while block := handle.read(1 << 24):
                    digest.update(block)
    return digest.hexdigest()[:16]


def open_study(path: Path, name: str) -> Any:
    """The study `name` in the SQLite file `path`, created if new; a file that is not an Optuna
    study is an InputError naming it."""
    import optuna

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        return optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    except Exception as error:  # sqlalchemy's or optuna's: a damaged or foreign file
        cause = str(error).splitlines()[0]  # sqlalchemy adds the SQL and a link on lines of their own
        raise InputError(
            f"{path} is not a readable Optuna study ({cause}); move it away to start the search anew"
        ) from None


@dataclass
class Scorer:
    """Scores a model folder on the validation split with lm-eval, in this process; the task files
    and lm-eval's task index are made once."""

    settings: Any  # the eval settings the stage declares
    tasks: Tasks

    @classmethod
    def make(cls, settings: Any, validation_dir: Path, prompt_model: Path, tasks_dir: Path) -> Scorer:
        from lm_eval.tasks import TaskManager

        prompt = question_prompt(settings, prompt_model)
        skills = skill_names(validation_dir)
        # each skill's exact-answer task only: the objective is exact match, as in select and the report
        configs = [skill_task_configs(settings, s, validation_dir / f"{s}.jsonl", prompt)[0] for s in skills]
        write_task_files(configs, tasks_dir)
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        return cls(settings, Tasks([c["task"] for c in configs], {}, skills, manager))

    def items(self, model_dir: Path) -> list[int]:
        """0/1 per validation question, every skill's pooled."""
        output = evaluate(self.settings, model_dir, self.tasks)
        items = item_outcomes(output["samples"], {})
        return pooled_skill_items(items, self.tasks.skills)[OBJECTIVE]


@dataclass
class Search:
    """One search: how a trial's recipe becomes a merged model and a validation score."""

    run: SearchRun
    experts: dict[str, str]  # name -> model folder
    base_model: str
    dtype: str
    scorer: Scorer

    def merge(self, recipe: MergeRecipe, out_dir: Path) -> dict[str, Any]:
        """Merge as the merge stage does into out_dir (made if missing); return the mergekit configuration."""
        config = mergekit_config(recipe, self.experts, self.base_model, self.dtype)
        write_merge(validated(config, "the merge search's trial"), config, self.run.seed, out_dir)
        return config

    def score(self, trial: Any) -> float:
        recipe = trial_recipe(trial, self.run, list(self.experts))
        with tempfile.TemporaryDirectory(prefix="merge-search-") as scratch:
            self.merge(recipe, Path(scratch) / "model")
            items = self.scorer.items(Path(scratch) / "model")
        trial.set_user_attr("items", len(items))
        return sum(items) / len(items)


def finished_trials(study: Any, limit: int) -> list[Any]:
    """The study's first `limit` completed trials, in order."""
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))[:limit]


def run_trials(study: Any, search: Search, trials: int) -> None:
    """Run trials until the study holds `trials` completed ones. A trial left running by a stopped
    run is run again first, with the parameters it was given; a trial that fails is marked failed
    and the error stops the stage."""
    import optuna

    finished = finished_trials(study, trials)
    done, best = len(finished), max((t.value for t in finished), default=0.0)
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if done:
        log.info("the study holds %d completed trials of %d", done, trials)
    progress = tqdm(total=trials, initial=done, desc="merge search", unit="trial")
    for number in range(done, trials):
        study.sampler = make_sampler(search.run, number)
        if stale:
            trial = optuna.trial.Trial(study, stale.pop(0)._trial_id)
            log.info("trial %d was stopped by an earlier run: running it again", trial.number)
        else:
            trial = study.ask()
        try:
            value = search.score(trial)
        except Exception:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        study.tell(trial, value)
        best = max(best, value)
        log.info("trial %d: %s %.4f (best %.4f)", trial.number, OBJECTIVE, value, best)
        progress.update()
    progress.close()
    for trial in stale:  # left running by runs before the last stopped one: nothing will finish them
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def best_trial(trials: list[Any]) -> Any:
    """The highest score; ties go to the earliest trial."""
    return min(trials, key=lambda trial: (-trial.value, trial.number))


def trials_table(trials: list[Any]) -> str:
    """CSV: each trial's number, score, the best score so far, and its parameters."""
    names = sorted({name for trial in trials for name in trial.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "exact_match", "best", *names])
    best = -1.0
    for trial in trials:
        best = max(best, trial.value)
        values = [trial.params.get(name, "") for name in names]
        writer.writerow([trial.number, f"{trial.value:.4f}", f"{best:.4f}", *(f"{v:.4f}" if isinstance(v, float) else v
                                                                             for v in values)])  # fmt: skip
    return buffer.getvalue()


def summary(run: SearchRun, trials: list[Any], best: Any, recipe: MergeRecipe) -> dict[str, Any]:
    """The search at a glance (a DVC metric; the report's table of the run)."""
    return {
        "trials": len(trials),
        "best_trial": best.number,
        "validation_items": best.user_attrs["items"],
        "validation/best_exact_match": round(best.value, 4),
        "validation/first_exact_match": round(trials[0].value, 4),
        "sampler": run.sampler,
        "recipe": {"method": recipe.method, **recipe.parameters},
    }


def model_card(name: str, recipe: MergeRecipe, config: dict[str, Any], facts: dict[str, Any]) -> str:
    parents = "\n".join(f"- `{model['model']}`" for model in config["models"])
    intro = (
        f"Made by this project's `merge_search@{name}` stage: the best of {facts['trials']} trials of an Optuna "
        f"search ({facts['sampler']}) over mergekit recipes, scored on the skills' validation split "
        f"({facts['validation/best_exact_match']} exact match, trial {facts['best_trial']}). Merged with "
        f"`{recipe.method}` from:\n\n{parents}\n\nThe exact mergekit configuration is `mergekit.yaml`."
    )
    return render_card(f"Merge search `{name}`", intro, {"Recipe": json_block(recipe.model_dump(mode="json"))})


def write_best(search: Search, name: str, recipe: MergeRecipe, facts: dict[str, Any], out_dir: Path) -> None:
    """Merge the best recipe again into the output model folder, with its card and lineage."""
    with atomic_dir(out_dir) as tmp:
        config = search.merge(recipe, tmp)
        (tmp / "README.md").write_text(model_card(name, recipe, config, facts))
        parents = [model_id(path) for path in search.experts.values()]
        found = {key: facts[key] for key in ("trials", "best_trial", "validation/best_exact_match")}
        settings = {
            "recipe": recipe.model_dump(mode="json"),
            "dtype": search.dtype,
            "seed": search.run.seed,
            "search": found,
        }
        write_lineage(tmp, "search", name, f"merge_search@{name}", parents, settings)


def quiet_tools() -> None:
    """One log line per trial: mergekit's and lm-eval's own (a dozen lines and progress bars each
    time) only when they warn."""
    import datasets

    for name in ("lm_eval", "mergekit"):
        logging.getLogger(name).setLevel(logging.WARNING)
    datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="a key of merge_search.runs")
    parser.add_argument("--roster-experts", type=Path, required=True, help="the roster's experts.json (which experts)")
    parser.add_argument("--experts", type=Path, required=True, help="folder of the expert model folders")
    parser.add_argument("--base-model", required=True, help="the experts' base model (for task-vector methods)")
    parser.add_argument("--validation", type=Path, required=True, help="folder of the skills' validation sets")
    parser.add_argument("--study", type=Path, required=True, help="the study's SQLite file (kept between runs)")
    parser.add_argument("--out", type=Path, required=True, help="output model folder: the best trial's merge")
    parser.add_argument("--metrics", type=Path, required=True, help="the search's summary JSON (a DVC metric)")
    parser.add_argument("--trials-table", type=Path, required=True, help="every trial's CSV row (a DVC plot)")
    args = parser.parse_args(argv)
    params = start(f"merge_search@{args.name}")
    run: SearchRun = params.merge_search.runs[args.name]
    names = run.experts if run.experts is not None else list(read_roster_file(args.roster_experts))
    experts = {name: str(args.experts / name) for name in names}
    configure_environment()
    quiet_tools()
    # every input checked before the first trial: the folders a merge reads, the validation sets
    check_model_folders({"models": [{"model": path} for path in experts.values()], "base_model": args.base_model})
    skill_names(args.validation)
    eval_settings = {key: getattr(params.eval, key) for key in EVAL_KEYS}
    settings = {"run": run.model_dump(mode="json", exclude={"trials"}), "experts": names,
                "dtype": params.merge.dtype, "eval": eval_settings}  # fmt: skip
    folders = [Path(path) for path in experts.values()] + [Path(args.base_model), args.validation]
    study = open_study(args.study, f"{args.name}-{fingerprint(settings, folders)}")
    log.info("study %s in %s", study.study_name, args.study)
    with tempfile.TemporaryDirectory(prefix="merge-search-tasks-") as tasks_dir:
        scorer = Scorer.make(params.eval, args.validation, Path(next(iter(experts.values()))), Path(tasks_dir))
        search = Search(run, experts, args.base_model, params.merge.dtype, scorer)
        run_trials(study, search, run.trials)
        trials = finished_trials(study, run.trials)
        best = best_trial(trials)
        recipe = recipe_from_params(best.params, run, names)
        facts = summary(run, trials, best, recipe)
        log.info("best: trial %d, %s %.4f: %s", best.number, OBJECTIVE, best.value, dumps_json(facts["recipe"]))
        write_best(search, args.name, recipe, facts, args.out)
    write_text(args.trials_table, trials_table(trials))
    write_json(args.metrics, facts)


if __name__ == "__main__":
    main()
