"""`gguf@<run>` stage: a model exported to GGUF files for llama.cpp, each verified in llama.cpp.

    python -m stages.gguf --name addition --model models/experts/addition --eval-sets data/eval \
        --out models/gguf/addition --metrics metrics/runs/gguf/addition.json

Needs llama.cpp once (`make llama-cpp`: pipeline/llama_cpp.py builds and caches it outside the
project). The model goes through llama.cpp's own converter (convert_hf_to_gguf.py's classes) to
`model-f16.gguf`; each further type of gguf.runs.<run>.types (q8_0, q4_0) is quantized from it by
llama.cpp (llama_model_quantize). Then every file is loaded in llama.cpp and answers the first
gguf.verify_examples questions of each skill's eval set greedily, in the prompt eval writes (the
tokenizer's chat template), as transformers answers them from the model folder:

- `<type>/answer_agreement`: share of questions whose llama.cpp answer is transformers' answer;
  `f16/agreement_up_to_ties` also counts an answer that differs where transformers' own top two
  tokens nearly tied (NEAR_TIE_LOGITS: f16 rounding may flip those, nothing more). It must reach
  F16_MIN_AGREEMENT, or the stage fails and writes nothing: that is the verification of the export;
- `<type>/exact_match` (+ `_low`, `_high`: Wilson 95%) against the eval sets' answers, beside
  `transformers/exact_match` on the same questions; `<type>/within_interval` says whether the
  file's score lies in transformers' interval and `<type>/mcnemar_p` tests the paired difference
  (a quantized file outside it costs accuracy: reported, not an error);
- `tokenizer_agreement`: share of prompts llama.cpp's tokenizer splits into transformers' ids.
  Every file is fed transformers' ids, so the answers compare the weights alone.

The output folder holds the files and a README.md card with the comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import llama_cpp
from pipeline.atomic import atomic_dir, write_json
from pipeline.eval_sets import SKILL_FIELDS, chat_prompt_around_question, check_eval_set, skill_names
from pipeline.lineage import json_block, model_id, render_card
from pipeline.settings.base import InputError
from pipeline.settings.gguf import GGUFRun
from pipeline.stage import RunFailed, configure_environment, start, thread_count
from pipeline.stats import mcnemar_exact, proportion

log = logging.getLogger("stages.gguf")

F16_MIN_AGREEMENT = 0.98
# A logit gap below which transformers' top token nearly ties with another: the f16 rounding of the
# weights may flip such a tie, which says nothing against the export (on the barely trained test model
# it flipped 8 of 200 greedy answers of 16 tokens, every one at a gap under 0.0005; the f32 file, 2).
# An export error (a wrong rope, norm or tokenizer) moves logits by far more, on most answers.
NEAR_TIE_LOGITS = 0.05
# llama_ftype of each quantized type (llama.h); f16 is the converter's own output.
QUANTIZED_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}

# The pre-tokenizer of the project's tokenizers (stages/tokenize.py: every digit alone, then GPT-2's
# byte-level split) is llama.cpp's `starcoder` type: "\p{N}", then GPT-2's regex. The converter
# recognizes a pre-tokenizer only by the hash of the ids it gives a probe text, which depends on the
# trained vocabulary, so it can never recognize a tokenizer trained here ("BPE pre-tokenizer was not
# recognized"); the stage names the type from tokenizer.json instead, and `tokenizer_agreement`
# checks the claim on every prompt. Any other tokenizer is left to the converter's recognition.
PROJECT_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    ],
}
PRE_TOKENIZER_TYPES = [(PROJECT_PRE_TOKENIZER, "starcoder")]


@dataclass(frozen=True)
class Question:
    skill: str
    question: str
    answer: str


@dataclass(frozen=True)
class Answers:
    """One model's greedy answers to the questions: the text up to the first newline, as eval scores it."""

    texts: list[str]
    exact: list[int]


def llama_cpp_pre_tokenizer(model_dir: Path) -> str | None:
    """llama.cpp's pre-tokenizer type for the model's tokenizer when the project knows it, else None."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = json.loads(path.read_text())

    def relevant(node: Any) -> Any:  # trim_offsets moves offsets only, never splits
        if isinstance(node, dict):
            return {k: relevant(v) for k, v in node.items() if k != "trim_offsets"}
        return [relevant(v) for v in node] if isinstance(node, list) else node

    if tokenizer.get("normalizer") is not None:
        return None
    found = relevant(tokenizer.get("pre_tokenizer"))
    return next((name for known, name in PRE_TOKENIZER_TYPES if found == known), None)


def converter_class(conversion: Any, model_dir: Path) -> Any:
    """The converter's class for the model's architecture, naming the pre-tokenizer type it cannot recognize."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"gguf: {model_dir} is not a model folder (no config.json)")
    architectures = json.loads(config_path.read_text()).get("architectures") or ["(none)"]
    try:
        base = conversion.get_model_class(architectures[0])
    except NotImplementedError:
        raise InputError(
            f"gguf: llama.cpp {llama_cpp.VERSION}'s converter does not support {architectures[0]} ({model_dir})"
        ) from None
    pre_tokenizer = llama_cpp_pre_tokenizer(model_dir)
    if pre_tokenizer is None:
        return base

    class ProjectTokenizerModel(base):
        model_arch = base.model_arch

        def get_vocab_base_pre(self, tokenizer: Any) -> str:
            return pre_tokenizer

    return ProjectTokenizerModel


def convert(model_dir: Path, out_path: Path, name: str) -> None:
    """model_dir -> one f16 GGUF file, by llama.cpp's converter (as convert_hf_to_gguf.py --outtype f16)."""
    import torch

    gguf, conversion = llama_cpp.converter()
    model_class = converter_class(conversion, model_dir)
    with torch.inference_mode():
        try:
            # model_name: the file names the run, not the folder it was converted from
            model = model_class(model_dir, gguf.LlamaFileType.MOSTLY_F16, out_path, model_name=name)
            model.write()
        except NotImplementedError as error:  # the converter's word for a tokenizer it does not know
            raise InputError(f"gguf: llama.cpp's converter cannot convert {model_dir}: {error}") from None


def quantize(f16_path: Path, out_path: Path, gguf_type: str, threads: int) -> None:
    runtime = llama_cpp.runtime()
    params = runtime.llama_model_quantize_default_params()
    params.ftype = getattr(runtime, QUANTIZED_FTYPES[gguf_type])
    params.nthread = threads
    if runtime.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(), params) != 0:
        raise RunFailed(f"gguf: llama.cpp could not quantize {f16_path.name} to {gguf_type}")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds (llama.cpp keeps norms in f32, and falls back to
    f16 for a tensor whose rows do not split into the type's blocks)."""
    gguf, _ = llama_cpp.converter()
    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        counts[tensor.tensor_type.name.lower()] = counts.get(tensor.tensor_type.name.lower(), 0) + 1
    return dict(sorted(counts.items()))


def read_questions(eval_dir: Path, examples: int) -> list[Question]:
    """The first `examples` questions of each skill's eval set (data/eval/<skill>.jsonl)."""
    questions = []
    for skill in skill_names(eval_dir):
        path = eval_dir / f"{skill}.jsonl"
        check_eval_set(path, SKILL_FIELDS)
        with open(path, encoding="utf-8") as handle:
            rows = [json.loads(line) for line, _ in zip(handle, range(examples), strict=False)]
        questions += [Question(skill, row["question"], str(row["answer"])) for row in rows]
    return questions


def prompt_texts(model_dir: Path, questions: list[Question]) -> list[str]:
    """Each question in the prompt the eval stage writes: the chat template around it, without the BOS."""
    from transformers import AutoTokenizer

    prefix, suffix = chat_prompt_around_question(AutoTokenizer.from_pretrained(model_dir))
    return [prefix + question.question + suffix for question in questions]


def score(texts: list[str], questions: list[Question]) -> Answers:
    """Cut each generation at its first newline and compare it with the answer, as eval's exact match does."""
    answers = [text.split("\n")[0].strip() for text in texts]
    exact = [int(answer == question.answer) for answer, question in zip(answers, questions, strict=True)]
    return Answers(answers, exact)


class Reference:
    """The model folder in transformers (float32, CPU): the answers every GGUF file is compared with."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.eos = self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids  # BOS by the tokenizer, as lm-eval's add_bos_token

    def greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy generation up to EOS (left out) or max_new_tokens."""
        generated: list[int] = []
        with self.torch.inference_mode():
            inputs, past = self.torch.tensor([ids]), None
            for _ in range(max_new_tokens):
                output = self.model(input_ids=inputs, past_key_values=past, use_cache=True)
                token = int(output.logits[0, -1].argmax())
                if token == self.eos:
                    break
                generated.append(token)
                inputs, past = self.torch.tensor([[token]]), output.past_key_values
        return generated

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def divergence_gap(self, ids: list[int], mine: list[int], other: list[int]) -> float:
        """Where two generations from `ids` first differ: this model's logit of its own token minus its
        logit of the other's (EOS where one stopped). Near zero: a near tie, which rounding may flip."""
        ended_mine, ended_other = [*mine, self.eos], [*other, self.eos]
        step = next((i for i, (a, b) in enumerate(zip(ended_mine, ended_other, strict=False)) if a != b), None)
        if step is None:  # the same ids, decoded differently: llama.cpp's detokenizer differs, no tie
            return float("inf")
        with self.torch.inference_mode():
            logits = self.model(input_ids=self.torch.tensor([ids + mine[:step]])).logits[0, -1]
        return float(logits[ended_mine[step]] - logits[ended_other[step]])


def llama_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int, eos: int, threads: int) -> Any:
    """(a GGUF file loaded in llama.cpp, its greedy generations from the given ids): the loop of
    Reference.greedy, on llama.cpp's logits."""
    runtime = llama_cpp.runtime()
    context = max(map(len, prompts)) + max_new_tokens
    model = runtime.Llama(
        str(path), n_ctx=context, n_batch=context, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False
    )
    vocabulary = model.n_vocab()
    generations = []
    for ids in prompts:
        model.reset()
        model.eval(ids)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            logits = np.ctypeslib.as_array(runtime.llama_get_logits_ith(model.ctx, -1), shape=(vocabulary,))
            token = int(np.argmax(logits))
            if token == eos:
                break
            generated.append(token)
            model.eval([token])
        generations.append(generated)
    return model, generations


def tokenizer_agreement(model: Any, texts: list[str], prompts: list[list[int]]) -> float:
    """Share of prompt texts llama.cpp's own tokenizer (BOS as the file says) splits into transformers' ids."""
    same = [
        model.tokenize(text.encode("utf-8"), add_bos=True, special=False) == ids
        for text, ids in zip(texts, prompts, strict=True)
    ]
    return sum(same) / len(same)


def compare(answers: Answers, reference: Answers) -> dict[str, float]:
    """A file's metrics against transformers' answers (the reference) on the same questions."""
    share, low, high = proportion(answers.exact)
    same = [a == b for a, b in zip(answers.texts, reference.texts, strict=True)]
    _, reference_low, reference_high = proportion(reference.exact)
    return {
        "answer_agreement": float(np.mean(same)),
        "exact_match": share,
        "exact_match_low": low,
        "exact_match_high": high,
        "within_interval": int(reference_low <= share <= reference_high),
        "mcnemar_p": mcnemar_exact(answers.exact, reference.exact),
    }


def near_ties(reference: Reference, prompts: list[list[int]], mine: list[list[int]], other: list[list[int]],
              same: list[bool]) -> list[float]:  # fmt: skip
    """Transformers' logit gap where each differing answer first diverged (see Reference.divergence_gap)."""
    return [
        reference.divergence_gap(ids, a, b)
        for ids, a, b, agree in zip(prompts, mine, other, same, strict=True)
        if not agree
    ]


def run(
    name: str,
    settings: GGUFRun,
    model_dir: Path,
    eval_dir: Path,
    verify_examples: int,
    max_gen_tokens: int,
    out_dir: Path,
    threads: int,
) -> dict[str, Any]:
    """Convert, quantize, verify; write the files and their card to out_dir; return the metrics."""
    llama_cpp.require()  # before anything slow: the message says how to get it
    _, conversion = llama_cpp.converter()
    converter_class(conversion, model_dir)  # an unsupported architecture fails here, not after loading
    questions = read_questions(eval_dir, verify_examples)
    texts = prompt_texts(model_dir, questions)
    reference = Reference(model_dir)
    prompts = [reference.encode(text) for text in texts]
    log.info("transformers: %d questions from %d skills", len(questions), len({q.skill for q in questions}))
    reference_ids = [reference.greedy(ids, max_gen_tokens) for ids in prompts]
    reference_answers = score([reference.decode(ids) for ids in reference_ids], questions)
    share, low, high = proportion(reference_answers.exact)
    metrics: dict[str, Any] = {"questions": len(questions), "transformers/exact_match": share,
                               "transformers/exact_match_low": low, "transformers/exact_match_high": high}  # fmt: skip
    files: dict[str, dict[str, Any]] = {}
    with atomic_dir(out_dir) as tmp:
        for gguf_type in settings.types:
            path = tmp / f"model-{gguf_type}.gguf"
            started = time.monotonic()
            if gguf_type == "f16":
                convert(model_dir, path, name)
            else:
                quantize(tmp / "model-f16.gguf", path, gguf_type, threads)
            log.info(
                "%s: wrote %s (%d bytes) in %.1f s",
                gguf_type,
                path.name,
                path.stat().st_size,
                time.monotonic() - started,
            )
            model, generations = llama_greedy(path, prompts, max_gen_tokens, reference.eos, threads)
            answers = score([model.detokenize(ids).decode("utf-8", errors="replace") for ids in generations], questions)
            if gguf_type == "f16":
                metrics["tokenizer_agreement"] = tokenizer_agreement(model, texts, prompts)
            del model  # frees llama.cpp's copy before the next file loads
            result = {"size_bytes": path.stat().st_size, **compare(answers, reference_answers)}
            if gguf_type == "f16":
                same = [a == b for a, b in zip(answers.texts, reference_answers.texts, strict=True)]
                gaps = near_ties(reference, prompts, reference_ids, generations, same)
                ties = sum(gap < NEAR_TIE_LOGITS for gap in gaps)
                result["agreement_up_to_ties"] = result["answer_agreement"] + ties / len(questions)
                log.info("f16: %d answers differ, where transformers' logit gaps were %s", len(gaps),
                         ", ".join(f"{gap:.4f}" for gap in sorted(gaps)) or "-")  # fmt: skip
            files[gguf_type] = {**result, "tensor_types": tensor_types(path)}
            metrics.update({f"{gguf_type}/{key}": value for key, value in result.items()})
            log.info(
                "%s: agreement with transformers %.3f, exact match %.3f [%.3f, %.3f]",
                gguf_type,
                *(result[key] for key in ("answer_agreement", "exact_match", "exact_match_low", "exact_match_high")),
            )
        check_f16(metrics)
        if metrics["tokenizer_agreement"] < 1:
            log.warning("llama.cpp's tokenizer splits %.1f%% of the prompts differently from transformers'",
                        100 * (1 - metrics["tokenizer_agreement"]))  # fmt: skip
        (tmp / "README.md").write_text(card(name, settings, model_dir, metrics, files, verify_examples, max_gen_tokens))
    return metrics


def check_f16(metrics: dict[str, Any]) -> None:
    agreement = metrics["f16/agreement_up_to_ties"]
    if agreement < F16_MIN_AGREEMENT:
        raise RunFailed(
            f"gguf: the f16 file gives transformers' answer (or one transformers nearly ties with it) to "
            f"{agreement:.1%} of {metrics['questions']} questions, where at least {F16_MIN_AGREEMENT:.0%} is "
            "expected: the export is not faithful; nothing was written"
        )


def card(name: str, settings: GGUFRun, model_dir: Path, metrics: dict[str, Any], files: dict[str, dict[str, Any]],
         verify_examples: int, max_gen_tokens: int) -> str:  # fmt: skip
    def interval(prefix: str) -> str:
        return f"{metrics[prefix + '/exact_match']:.3f} [{metrics[prefix + '/exact_match_low']:.3f}, " \
               f"{metrics[prefix + '/exact_match_high']:.3f}]"  # fmt: skip

    rows = [f"| transformers (float32) | `{model_dir}` | | 1.000 | {interval('transformers')} | |"]
    for gguf_type, file in files.items():
        types = ", ".join(f"{kind} {count}" for kind, count in file["tensor_types"].items())
        rows.append(f"| `model-{gguf_type}.gguf` | {file['size_bytes']:,} bytes | {types} | "
                    f"{file['answer_agreement']:.3f} | {interval(gguf_type)} | {file['mcnemar_p']:.3f} |")  # fmt: skip
    table = "\n".join(["| file | size | tensors | same answer as transformers | exact match [95%] | McNemar p |",
                       "| --- | --- | --- | --- | --- | --- |", *rows])  # fmt: skip
    intro = (
        f"GGUF files of `{model_id(model_dir)}` for llama.cpp, made by this project's `gguf@{name}` stage with "
        f"llama.cpp {llama_cpp.VERSION}'s converter (f16) and its quantizer (from the f16 file).\n\n"
        f"Run one with llama.cpp: `llama-cli -m model-{settings.types[-1]}.gguf`, or from Python "
        f"`llama_cpp.Llama(model_path='model-{settings.types[-1]}.gguf')`."
    )
    verification = (
        f"Each file answered the first {verify_examples} questions of every skill's eval set "
        f"({metrics['questions']} in all) greedily, at most {max_gen_tokens} tokens, in llama.cpp, from the "
        "token ids transformers' tokenizer gives the prompt; llama.cpp's own tokenizer gives the same ids for "
        f"{metrics['tokenizer_agreement']:.1%} of the prompts. The f16 file must give transformers' answer, or "
        f"one that transformers' own logits nearly tie with (a gap under {NEAR_TIE_LOGITS}), to at least "
        f"{F16_MIN_AGREEMENT:.0%} of them; it does to {metrics['f16/agreement_up_to_ties']:.1%}.\n\n{table}\n"
    )
    used = {
        "run": settings.model_dump(mode="json"),
        "verify_examples": verify_examples,
        "max_gen_tokens": max_gen_tokens,
    }
    return render_card(f"GGUF `{name}`", intro, {"Verification": verification, "Settings": json_block(used)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="run name (a key of gguf.runs)")
    parser.add_argument("--model", type=Path, required=True, help="model folder to export")
    parser.add_argument("--eval-sets", type=Path, required=True, help="folder of the eval sets (<skill>.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="output folder of the GGUF files")
    parser.add_argument("--metrics", type=Path, required=True, help="summary JSON (a DVC metric)")
    args = parser.parse_args(argv)
    params = start(f"gguf@{args.name}")
    settings = params.gguf.runs[args.name]
    configure_environment()
    metrics = run(args.name, settings, args.model, args.eval_sets, params.gguf.verify_examples,
                  params.eval.max_gen_tokens, args.out, thread_count(params.compute.threads))  # fmt: skip
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
