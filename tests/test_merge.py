"""Merge and select: mergekit's merges of tiny models, checked against what each method must give."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.lineage import write_lineage
from pipeline.settings.base import InputError
from pipeline.settings.merge import MERGE_METHODS, MergeRecipe
from pipeline.settings.params_file import load_params
from pipeline.settings.select import SelectSettings
from stages import merge
from stages.select import select
from tests.project import params_error


def weights(folder) -> dict[str, torch.Tensor]:
    (shard,) = sorted(folder.glob("*.safetensors"))
    return load_file(shard)


@pytest.fixture(scope="module")
def models(tiny_pretrained, tmp_path_factory):
    """The tiny base and three 'experts': the base with different seeded perturbations (lineage: expert)."""
    root = tmp_path_factory.mktemp("merge_inputs")
    base_dir = tiny_pretrained[1] / "model"
    folders = {"base": base_dir}
    for seed, name in enumerate(("addition", "sorting", "counting")):
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(root / name)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(root / name)
        write_lineage(root / name, "expert", name, f"finetune@{name}", ["base/pretrain"], {})
        folders[name] = root / name
    return folders


def run_merge(tmp_path, recipe: MergeRecipe, folders: dict, names: list[str], seed: int = 0):
    out = tmp_path / "out"
    experts = {name: str(folders[name]) for name in names}
    merge.run("test", recipe, experts, str(folders["base"]), "float32", seed, out)
    return out


def test_method_table_agrees_with_mergekit():
    from mergekit.merge_methods import registry

    for method in registry.registered_methods():
        spec, contract = method.spec, method.spec.contract
        assert MERGE_METHODS[spec.name] == (
            contract.base.value,
            contract.min_inputs,
            contract.max_inputs,
            tuple(p.name for p in spec.parameters if p.scope.value == "shared"),
            tuple(p.name for p in spec.parameters if p.scope.value != "shared"),
            tuple(p.name for p in spec.parameters if p.required),
        ), spec.name
    assert set(MERGE_METHODS) == {m.spec.name for m in registry.registered_methods()}


def test_linear_merge_with_equal_weights_is_the_average(models, tmp_path):
    out = run_merge(tmp_path, MergeRecipe(method="linear", parameters={"weight": 1.0}), models, ["addition", "sorting"])
    merged, a, b = weights(out), weights(models["addition"]), weights(models["sorting"])
    assert merged.keys() == a.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=0, atol=1e-6)
    lineage = json.loads((out / "lineage.json").read_text())
    assert (lineage["kind"], lineage["name"], lineage["stage"]) == ("merge", "test", "merge@test")
    assert lineage["parents"] == ["expert/addition", "expert/sorting"]
    assert lineage["settings"]["recipe"]["method"] == "linear"


@pytest.mark.parametrize(
    "recipe",
    [
        MergeRecipe(method="linear", parameters={"weight": 0.3}),
        MergeRecipe(method="ties", parameters={"weight": 0.5, "density": 1.0}),
        MergeRecipe(method="task_arithmetic", parameters={"weight": 0.5}),
        MergeRecipe(method="karcher"),
    ],
    ids=lambda recipe: recipe.method,
)
def test_merging_identical_models_gives_that_model(models, tmp_path, recipe):
    twin = tmp_path / "twin"
    AutoModelForCausalLM.from_pretrained(models["addition"]).save_pretrained(twin)
    out = run_merge(tmp_path, recipe, {**models, "twin": twin}, ["addition", "twin"])
    merged, original = weights(out), weights(models["addition"])
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=1e-5)


def test_every_default_recipe_gives_a_loadable_model_with_the_tokenizer(models, tmp_path):
    params = load_params()
    assert {"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "model_stock"} <= set(params.merge.recipes)
    for name, recipe in params.merge.recipes.items():
        names = recipe.experts if recipe.experts is not None else ["addition", "sorting", "counting"]
        out = run_merge(tmp_path / name, recipe, models, names)
        assert {"config.json", "tokenizer.json", "mergekit.yaml", "README.md"} <= {p.name for p in out.iterdir()}
        assert f"method `{recipe.method}`" in (out / "README.md").read_text()
        model = AutoModelForCausalLM.from_pretrained(out)
        tokenizer = AutoTokenizer.from_pretrained(out)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2 plus 3"}], tokenize=False,
                                               add_generation_prompt=True)  # fmt: skip
        assert prompt.endswith("A:\n")  # the experts' chat template came along
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]


def test_random_drop_merges_are_byte_identical_on_rerun(models, tmp_path):
    recipe = MergeRecipe(method="dare_ties", parameters={"weight": 0.5, "density": 0.5})
    first = run_merge(tmp_path / "a", recipe, models, ["addition", "sorting"], seed=3)
    second = run_merge(tmp_path / "b", recipe, models, ["addition", "sorting"], seed=3)
    other_seed = run_merge(tmp_path / "c", recipe, models, ["addition", "sorting"], seed=4)
    (a,), (b,), (c,) = (sorted(p.glob("*.safetensors")) for p in (first, second, other_seed))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()  # the seed really drives the drop


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("{method: lineer}", "merge.recipes.bad.method"),
        ("{method: lineer}", "not a mergekit method; valid: "),
        ("{method: ties, parameters: {weight: 1, densty: 0.5}}", "ties has no parameter 'densty'; valid:"),
        ("{method: linear}", "linear needs parameters ['weight']"),
        ("{method: slerp, parameters: {t: 0.5}}", "slerp merges 2 models, got 4"),
        (
            "{method: model_stock, experts: [addition]}",
            "merges at least 3 models (the base model counts as one), got 2",
        ),
        ("{method: linear, experts: [adition], parameters: {weight: 1}}", "['adition'] are not in finetune.experts"),
        ("{method: linear, parameters: {weight: {addition: 1}}}", "give a value for each of"),
    ],
)
def test_invalid_recipes_fail_naming_the_field(tmp_path, recipe, expected):
    message = params_error(tmp_path, f"merge:\n  recipes:\n    bad: {recipe}\n")
    assert "merge.recipes" in message and expected in message


def test_selection_takes_the_top_k_and_breaks_ties_by_name():
    chosen = select(SelectSettings(top_k=2), {"ties": 0.5, "linear": 0.5, "slerp": 0.7, "dare_ties": 0.1})
    assert chosen["selected"] == ["slerp", "linear"] and chosen["missing"] == 0
    assert chosen["scores"]["dare_ties"] == 0.1


def test_selection_with_too_few_qualifying_merges():
    scores = {"ties": 0.5, "linear": 0.2, "slerp": None}  # slerp's eval lacks the metric
    kept = select(SelectSettings(top_k=3, min_score=0.3), scores)
    assert kept["selected"] == ["ties"] and kept["missing"] == 2
    with pytest.raises(InputError, match="^only 1 of select.top_k=3 merges qualify"):
        select(SelectSettings(top_k=3, min_score=0.3, on_too_few="fail"), scores)
    with pytest.raises(InputError, match="^no merge qualifies"):
        select(SelectSettings(top_k=1, min_score=0.9), scores)


# --- merge_search: Optuna over recipes, each trial a real mergekit merge scored by lm-eval ---


class Stop(BaseException):
    """Stands for a stage killed in the middle of a trial (as SIGTERM's exit does, it is no Exception)."""


def search_for(models, tiny_data, tasks_dir, stop_at: int | None = None):
    from pipeline.settings.eval import EvalSettings
    from pipeline.settings.merge_search import SearchRun
    from stages import merge_search

    experts = {name: str(models[name]) for name in ("addition", "sorting")}
    tasks_dir.mkdir()
    settings = EvalSettings(limit=8)  # 8 validation questions per skill: the test is about trials, not scores
    scorer = merge_search.Scorer.make(settings, tiny_data / "validation", models["addition"], tasks_dir)
    run = SearchRun(methods=["ties", "task_arithmetic"], normalize=False)
    search = merge_search.Search(run, experts, str(models["base"]), "float32", scorer)
    if stop_at is not None:
        score = search.score

        def stopping(trial):
            if trial.number == stop_at:
                raise Stop
            return score(trial)

        search.score = stopping
    return search


def trials_of(study) -> list[tuple[int, str, dict, float]]:
    return [(t.number, t.state.name, t.params, t.value) for t in study.trials]


def test_a_stopped_merge_search_resumes_with_the_trials_of_an_unstopped_one(models, tiny_data, tmp_path):
    """A run stopped in trial 1 leaves it running; the next run runs it again with the same parameters
    and goes on; the study then holds what an uninterrupted run's does. Raising the number of trials
    runs only the new ones; the best trial's merge is a model folder with its recipe and lineage."""
    from stages import merge_search

    whole = merge_search.open_study(tmp_path / "whole.db", "s")
    merge_search.run_trials(whole, search_for(models, tiny_data, tmp_path / "a"), 3)

    stopped = merge_search.open_study(tmp_path / "stopped.db", "s")
    with pytest.raises(Stop):
        merge_search.run_trials(stopped, search_for(models, tiny_data, tmp_path / "b", stop_at=1), 3)
    assert [t.state.name for t in stopped.trials] == ["COMPLETE", "RUNNING"]
    search = search_for(models, tiny_data, tmp_path / "c")
    merge_search.run_trials(stopped, search, 3)
    assert trials_of(stopped) == trials_of(whole)
    assert len({json.dumps(t.params, sort_keys=True) for t in whole.trials}) == 3  # the sampler did propose
    assert {t.params["method"] for t in whole.trials} <= {"ties", "task_arithmetic"}

    calls = []
    score = search.score
    search.score = lambda trial: calls.append(trial.number) or score(trial)
    merge_search.run_trials(stopped, search, 4)
    assert calls == [3]

    trials = merge_search.finished_trials(stopped, 4)
    best = merge_search.best_trial(trials)
    recipe = merge_search.recipe_from_params(best.params, search.run, list(search.experts))
    facts = merge_search.summary(search.run, trials, best, recipe)
    assert recipe.parameters["normalize"] is False and facts["validation_items"] == 4 * 8  # four skills, limit 8
    merge_search.write_best(search, "tiny", recipe, facts, tmp_path / "best")
    lineage = json.loads((tmp_path / "best/lineage.json").read_text())
    assert (lineage["kind"], lineage["stage"]) == ("search", "merge_search@tiny")
    assert lineage["settings"]["recipe"]["parameters"]["weight"] == recipe.parameters["weight"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "best").num_parameters() > 0
    table = merge_search.trials_table(trials).splitlines()
    assert table[0].startswith("trial,exact_match,best,") and len(table) == 5


def test_an_unreadable_study_file_is_named_in_one_line(tmp_path):
    from stages import merge_search

    (tmp_path / "study.db").write_text("not an SQLite file\n")
    with pytest.raises(InputError, match=r"study.db is not a readable Optuna study \(.*\); move it away") as raised:
        merge_search.open_study(tmp_path / "study.db", "s")
    assert "\n" not in str(raised.value)
