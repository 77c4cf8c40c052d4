"""`dpo@<run>` stage: direct preference optimisation (DPO) of a model with axolotl's own `rl: dpo`.

    python -m stages.dpo --run dense_addition --out models/dpo/dense_addition \
        --work .tmp/dpo_dense_addition --live metrics/runs/dpo/dense_addition \
        --metrics metrics/runs/dpo/dense_addition.json

A run (dpo.runs.<run>) names the model it starts from (an expert, the dense baseline, any model
folder) and a file of preference pairs, one per row:

    {"messages": [{"role": "user", "content": "What is 52 plus 1?"}], "chosen": "53", "rejected": "51"}

(the data stage writes them for every skill: data/preference/{train,eval}/<skill>.jsonl). A hub
dataset fetched by a `hub` entry works as it is when it has this shape, or trl's explicit-prompt
one (a `prompt` column instead of `messages`; chosen and rejected as strings or as message lists
that end in the answer). Its settings are the shared `sft` ones with dpo.defaults' and the run's
overrides; beta is the run's or dpo.beta. The axolotl config is pipeline/sft.py's with what DPO
changes (saved with the model as axolotl.yaml); the start model, frozen, is DPO's reference.

With an eval_dataset, the stage measures on its held-out pairs how often the start model and the
trained model give the chosen answer a higher log-probability than the rejected one (after the
prompt, as the model's chat template writes it), each with its Wilson 95% interval, the mean
margin, and an exact McNemar test of the difference.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from pipeline import sft, stage
from pipeline.atomic import atomic_dir, atomic_path, write_json
from pipeline.curves import last_value
from pipeline.lineage import json_block, model_id, render_card, write_lineage
from pipeline.preference import Pair, read_pairs
from pipeline.records import dataset_format
from pipeline.settings.base import InputError
from pipeline.settings.sft import SFTSettings, resolve_sft
from pipeline.stage import configure_environment, start
from pipeline.stats import mcnemar_exact, proportion

log = logging.getLogger("stages.dpo")

# Keys of the generated SFT config that a preference run leaves out: SFT's end-of-turn tokens, and
# pad_to_multiple_of, with which axolotl 0.19 swaps in its own DPO collator, written for older trl
# batches (trl 1.9's DPO trainer then fails: "You must specify exactly one of input_ids or inputs_embeds").
# (SFT's loss masking is in its dataset entry, which the preference pairs' entry replaces.)
SFT_ONLY_KEYS = ("eot_tokens", "pad_to_multiple_of")
# The curves TRL's DPO trainer logs beside the loss (pipeline/axolotl_dvclive.py CURVES keeps them).
REWARD_CURVES = ("rewards/accuracies", "rewards/margins")
EVAL_BATCH = 32  # pairs per forward pass when measuring preference accuracy


def render_pair(tokenizer: Any, pair: Pair) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as the training sees them: the prompt with the chat template's
    generation prompt, each answer as the template writes an assistant turn (with its end-of-turn
    text), as axolotl's `chat_template.default` renders them and trl ends them (with eos)."""
    messages, chosen, rejected = pair
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def completion(answer: str) -> str:
        turn = tokenizer.apply_chat_template(
            [{"role": "user", "content": "[[dummy_message]]"}, {"role": "assistant", "content": answer}],
            tokenize=False,
        )
        text = turn[turn.find(answer) :].rstrip()
        return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token

    return prompt, completion(chosen), completion(rejected)


def pair_lengths(tokenizer: Any, pairs: list[Pair]) -> list[int]:
    """Tokens of each pair's longer side, prompt included."""
    lengths = []
    for pair in pairs:
        prompt, chosen, rejected = render_pair(tokenizer, pair)
        lengths.append(max(len(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
                           for answer in (chosen, rejected)))  # fmt: skip
    return lengths


def answer_logprobs(model: Any, tokenizer: Any, pairs: list[Pair], device: str) -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) of each pair, summed over the answer's tokens."""
    import torch

    sequences = []  # (token ids, where the answer starts)
    for pair in pairs:
        prompt, chosen, rejected = render_pair(tokenizer, pair)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for answer in (chosen, rejected):
            ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
            sequences.append((ids, len(prompt_ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = []
    with torch.no_grad():
        for first in range(0, len(sequences), 2 * EVAL_BATCH):
            batch = sequences[first : first + 2 * EVAL_BATCH]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            answer = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (ids, start) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                answer[row, start : len(ids)] = True
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
            # the token at position t is predicted by the logits at t - 1
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logprobs.gather(-1, input_ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
            scores.extend((picked * answer[:, 1:].to(device)).sum(dim=1).tolist())
    return list(zip(scores[0::2], scores[1::2], strict=True))


def preference_scores(model_dir: str | Path, pairs: list[Pair], device: str) -> list[tuple[float, float]]:
    """answer_logprobs of the model folder, loaded in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return answer_logprobs(model, tokenizer, pairs, device)


def preference_metrics(name: str, scores: list[tuple[float, float]]) -> dict[str, Any]:
    """`preference/<name>_accuracy` (share of pairs whose chosen answer is the likelier one), its
    Wilson 95% interval, and the mean log-probability margin chosen - rejected."""
    share, low, high = proportion([int(chosen > rejected) for chosen, rejected in scores])
    margin = sum(chosen - rejected for chosen, rejected in scores) / len(scores)
    return {
        f"preference/{name}_accuracy": round(share, 4),
        f"preference/{name}_accuracy_low": round(low, 4),
        f"preference/{name}_accuracy_high": round(high, 4),
        f"preference/{name}_mean_margin": round(margin, 4),
    }


def dpo_config(
    settings: SFTSettings, beta: float, model: str, dataset: str, prompt_field: str, work_dir: Path, bf16: bool
) -> dict[str, Any]:
    """pipeline/sft.py's axolotl config with what DPO changes: `rl: dpo`, beta, and the preference
    pairs as axolotl's `chat_template.default` type reads them."""
    config = sft.axolotl_config(settings, model, dataset, work_dir, bf16)
    for key in SFT_ONLY_KEYS:
        config.pop(key, None)
    config.update(
        rl="dpo",
        rl_beta=beta,
        datasets=[
            {
                "path": dataset,
                "ds_type": dataset_format(dataset),
                "type": "chat_template.default",
                "field_messages": prompt_field,
                "field_chosen": "chosen",
                "field_rejected": "rejected",
            }
        ],
        # DPO has no sample packing (axolotl refuses it): a speed setting only, dropped
        sample_packing=False,
    )
    return config


def run(
    settings: SFTSettings,
    beta: float,
    model: str,
    dataset: Path,
    eval_dataset: Path | None,
    target: sft.Target,
) -> dict[str, Any]:
    """Preference-tune `model` on `dataset`; write the model folder and its curves; return the summary
    (with the held-out preference accuracies when eval_dataset is given)."""
    # bad input costs seconds, not axolotl's start-up
    pairs, prompt_field = read_pairs(dataset)
    eval_pairs = read_pairs(eval_dataset)[0] if eval_dataset else None
    if not (Path(model) / "config.json").is_file():
        raise InputError(f"{target.where}.model: {model} is not a model folder (it has no config.json)")
    sft.check_machine(settings, stage.resolve_device())
    if target.work_dir.exists():
        shutil.rmtree(target.work_dir)
    target.work_dir.mkdir(parents=True)
    try:
        return train(settings, beta, model, dataset, pairs, prompt_field, eval_pairs, target)
    finally:  # whichever way the run ends: the scratch folder goes
        shutil.rmtree(target.work_dir, ignore_errors=True)


def train(
    settings: SFTSettings,
    beta: float,
    model: str,
    dataset: Path,
    pairs: list[Pair],
    prompt_field: str,
    eval_pairs: list[Pair] | None,
    target: sft.Target,
) -> dict[str, Any]:
    work_dir, device = target.work_dir, stage.resolve_device()
    if settings.sample_packing:
        log.info("sample_packing is on in the settings: DPO trains without it")
    config = dpo_config(settings, beta, model, str(dataset), prompt_field, work_dir, sft.use_bf16(settings))
    if sft.torchrun_launch(settings) and device == "cpu":
        config["plugins"] = [*config["plugins"], "pipeline.axolotl_cpu_processes.CPUProcessesPlugin"]
    config_path = work_dir / "axolotl.yaml"
    with open(config_path, "w") as handle:
        YAML().dump(config, handle)
    work_live = work_dir / "live"
    launch = sft.launcher(settings), sft.process_environment(settings, device)
    training = sft.start_axolotl("axolotl.cli.train", config_path, work_live, launch=launch)
    # while axolotl imports (~10 s on one core): the length check, and the start model's scores
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        too_long = sum(length > settings.sequence_len for length in pair_lengths(tokenizer, pairs))
        sft.check_dropped(settings, dataset, target.where, len(pairs), too_long, "are")
        start_scores = preference_scores(model, eval_pairs, device) if eval_pairs else None
    except BaseException:
        training.kill()
        training.wait()
        raise
    log.info("%d pairs, %d longer than %d tokens", len(pairs), too_long, settings.sequence_len)
    sft.wait_for_axolotl(training)
    if os.environ.get("PET_NODE_RANK", "0") != "0":  # another machine of a torchrun run: the first writes
        return {}
    trained = work_dir / "output"
    if settings.adapter in sft.LORA_ADAPTERS:
        merging = sft.start_axolotl("axolotl.cli.merge_lora", config_path, work_live, f"--lora-model-dir={trained}")
        sft.wait_for_axolotl(merging)
        trained = trained / "merged"

    summary: dict[str, Any] = {**summarize(work_live), "data/pairs": len(pairs), "data/pairs_too_long": too_long,
                               "dpo/beta": beta}  # fmt: skip
    with atomic_dir(target.out_dir) as tmp:
        sft.copy_model_files(trained, tmp)
        sft.write_saved_config(config, work_dir, tmp / "axolotl.yaml")
        if eval_pairs:
            trained_scores = preference_scores(tmp, eval_pairs, device)
            summary.update(compare(start_scores, trained_scores))
            log.info("held-out pairs: the start model prefers the chosen answer in %.3f, the DPO model in %.3f",
                     summary["preference/start_accuracy"], summary["preference/trained_accuracy"])  # fmt: skip
        (tmp / "README.md").write_text(model_card(target, model, str(dataset), settings, beta, summary))
        lineage_settings = {"sft": settings.model_dump(mode="json"), "dataset": str(dataset), "beta": beta}
        write_lineage(tmp, target.kind, target.name, target.stage, [model_id(model)], lineage_settings)
    with atomic_path(target.live_dir) as tmp:
        shutil.move(work_live, tmp)
    return summary


def compare(start: list[tuple[float, float]], trained: list[tuple[float, float]]) -> dict[str, Any]:
    """The start and the trained model's preference metrics on the same pairs, and McNemar's p-value."""
    start_right = [int(chosen > rejected) for chosen, rejected in start]
    trained_right = [int(chosen > rejected) for chosen, rejected in trained]
    return {"preference/pairs": len(start), **preference_metrics("start", start),
            **preference_metrics("trained", trained),
            "preference/mcnemar_p": round(mcnemar_exact(trained_right, start_right), 6)}  # fmt: skip


def summarize(live_dir: Path) -> dict[str, Any]:
    """sft.summarize's losses and steps, and the last reward accuracy and margin of the training."""
    summary = sft.summarize(live_dir)
    for name in REWARD_CURVES:
        if last := last_value(live_dir, f"train/{name}"):
            summary[f"train/{name}"] = round(last[1], 4)
    return summary


def model_card(
    target: sft.Target, model: str, dataset: str, settings: SFTSettings, beta: float, summary: dict[str, Any]
) -> str:
    intro = f"""Preference-tuned (DPO, beta {beta}) by this project's `{target.stage}` stage with axolotl
(`rl: dpo`) from `{model}`, its frozen copy the reference, on the pairs of `{dataset}`. The
generated axolotl config is `axolotl.yaml`."""
    sections = {"Final metrics": json_block(summary), "SFT settings": json_block(settings.model_dump(mode="json"))}
    return render_card(f"`{target.kind}/{target.name}`", intro, sections)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run name (a key of dpo.runs)")
    sft.add_output_arguments(parser)
    args = parser.parse_args(argv)
    stage_name = f"dpo@{args.run}"
    params = start(stage_name)
    settings_of_run = params.dpo.runs[args.run]
    configure_environment()
    settings = resolve_sft(params.sft, params.dpo.defaults, settings_of_run)
    beta = settings_of_run.beta or params.dpo.beta
    target = sft.Target("dpo", args.run, stage_name, f"dpo.runs.{args.run}", args.out, args.work, args.live)
    eval_dataset = Path(settings_of_run.eval_dataset) if settings_of_run.eval_dataset else None
    summary = run(settings, beta, settings_of_run.model, Path(settings_of_run.dataset), eval_dataset, target)
    write_json(args.metrics, summary)


if __name__ == "__main__":
    main()
