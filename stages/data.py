"""`data` stage: the pretraining corpus, the SFT skill datasets and the held-out eval sets.

    python -m stages.data --corpus data/corpus --sft data/sft --eval data/eval \
        --preference data/preference --metrics metrics/data.json

Outputs (all JSONL, one object per line):
- corpus/{train,val,test}.jsonl  `{"text": ...}` documents; test is held-out text for perplexity.
- sft/<skill>.jsonl              `{"messages": [user question, assistant answer]}` for axolotl's
                                 `type: chat_template`.
- eval/<skill>.jsonl             `{"question", "answer", "choices", "label"}`: exact-answer and
                                 multiple-choice variants of the same held-out questions.
- validation/<skill>.jsonl       the eval rows' fields, other questions (never an eval one): what a
                                 merge search scores its trials on.
- eval/stories.jsonl             `{"context", "endings", "label"}`: story completion, HellaSwag style.
- preference/{train,eval}/<skill>.jsonl
                                 `{"messages": [user question], "chosen": answer, "rejected": wrong answer}`
                                 for DPO (axolotl's `type: chat_template.default`); eval pairs are the
                                 eval questions with one of their own multiple-choice distractors.

By default the corpus describes a small invented world generated from `data.seed` (same seed ->
byte-identical files). `data.corpus.source` switches it to a local file or a hub dataset; the
skill and eval sets are always generated, as nothing else supplies them. The preference pairs
draw from a random stream of their own, so the other outputs are the same with or without them.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir, write_json, write_jsonl
from pipeline.corpus import check_corpus_file
from pipeline.settings.base import InputError
from pipeline.settings.data import CorpusSettings, DataSettings, SkillSettings, WorldSettings
from pipeline.stage import configure_environment, start

log = logging.getLogger("stages.data")

FIRST_NAMES = (
    "Ada Bela Cato Dara Emil Fina Goran Hana Ivo Jana Kian Lena Milo Nora Otto Pia Quin Rosa "
    "Sami Tara Ugo Vera Wim Xena Yuri Zara Alma Bruno Cleo Dino Ella Felix Gina Hugo Iris Jonas "
    "Kira Leo Maya Nico"
).split()
SHE = set(
    "Ada Bela Dara Fina Hana Jana Lena Nora Pia Rosa Tara Vera Xena Zara Alma Cleo Ella Gina Iris Kira Maya".split()
)
PROFESSIONS = "baker teacher farmer doctor painter sailor miller weaver builder singer".split()
ANIMALS = "cat dog horse goat bird fish sheep duck fox owl".split()
COLORS = "red blue green yellow white black brown gray".split()
OBJECTS = "cup book lamp chair table box hat ball key coat".split()
COUNT_WORDS = (
    "red blue green cat dog sun moon tree house river stone bird fish apple bread milk "
    "road hill boat star cloud rain snow door"
).split()
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
SYLLABLES = "ka lo mi ra ven tor sel bru fen dal qua zin mor tev pal gri nor sha vel ost".split()

# A story's first sentence states a need; its ending is the action that meets it. The
# story eval asks which of several endings fits, so the pairing is what a model must learn.
STORY_NEEDS = {
    "hungry": "ate a big bowl of soup",
    "thirsty": "drank a glass of cold water",
    "tired": "went to bed early",
    "cold": "put on a warm coat",
    "dirty": "took a long bath",
    "bored": "read a good book",
    "sad": "called an old friend",
    "lost": "asked a stranger for directions",
    "sick": "went to see the doctor",
    "late": "ran all the way to the station",
}
STORY_OPENINGS = ("One morning", "One evening", "Last week", "On a rainy day", "After work", "Yesterday")


def number_in_words(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def make_world(rng: random.Random, countries: int) -> dict[str, str]:
    """Invented countries -> capitals, with distinct pronounceable names."""
    names: set[str] = set()
    while len(names) < 2 * countries:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize())
    ordered = sorted(names)
    rng.shuffle(ordered)
    return dict(zip(ordered[:countries], ordered[countries:], strict=True))


def pronoun(name: str) -> str:
    return "she" if name in SHE else "he"


def fact_sentence(rng: random.Random, capitals: dict[str, str]) -> str:
    country = rng.choice(list(capitals))
    capital = capitals[country]
    person = rng.choice(FIRST_NAMES)
    return rng.choice(
        (
            f"The capital of {country} is {capital}.",
            f"{capital} is the capital of {country}.",
            f"{person} lives in {capital}, the capital of {country}.",
            f"The biggest city of {country} is its capital, {capital}.",
        )
    )


def number_sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        return f"{number_in_words(a).capitalize()} plus {number_in_words(b)} is {number_in_words(a + b)}."
    if kind == 1:
        a, b = rng.randint(10, 99), rng.randint(0, 9)
        return rng.choice((f"{a} plus {b} is {a + b}.", f"If you add {b} to {a}, you get {a + b}."))
    if kind == 2:
        a, b = rng.sample(range(1, 100), 2)
        big, small = max(a, b), min(a, b)
        return rng.choice(
            (
                f"{big} is larger than {small}.",
                f"{small} is smaller than {big}.",
                f"Of {a} and {b}, the larger number is {big}.",
            )
        )
    if kind == 3:
        digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
        listed, ordered = " ".join(map(str, digits)), " ".join(map(str, sorted(digits)))
        return f"The digits {listed} in order are {ordered}."
    words = rng.sample(COUNT_WORDS, rng.randint(2, 8))
    n = len(words)
    return rng.choice(
        (
            f'The phrase "{" ".join(words)}" has {n} words.',
            f'There are {number_in_words(n)} words in "{" ".join(words)}".',
        )
    )


def life_sentence(rng: random.Random, capitals: dict[str, str]) -> str:
    name = rng.choice(FIRST_NAMES)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{name} is a {rng.choice(PROFESSIONS)} in {rng.choice(list(capitals.values()))}."
    if kind == 1:
        return f"{name} has a {rng.choice(COLORS)} {rng.choice(ANIMALS)}."
    if kind == 2:
        return f"{name} put the {rng.choice(COLORS)} {rng.choice(OBJECTS)} on the {rng.choice(OBJECTS)}."
    return f"{name} is {rng.randint(6, 90)} years old."


def story(rng: random.Random, capitals: dict[str, str], need: str | None = None) -> tuple[str, str]:
    """A short story as (context, fitting ending)."""
    name = rng.choice(FIRST_NAMES)
    need = need or rng.choice(list(STORY_NEEDS))
    city = rng.choice(list(capitals.values()))
    context = f"{rng.choice(STORY_OPENINGS)} in {city}, {name} was {need}. So {pronoun(name)}"
    return context, f" {STORY_NEEDS[need]}."


def synthetic_documents(world: WorldSettings, rng: random.Random) -> tuple[list[str], dict[str, str]]:
    """Documents of 4-12 sentences about the invented world, about `corpus_megabytes` in all."""
    capitals = make_world(rng, world.countries)
    target_bytes = int(world.corpus_megabytes * 1_000_000)
    documents: list[str] = []
    total = 0
    while total < target_bytes:
        sentences = []
        for _ in range(rng.randint(4, 12)):
            draw = rng.random()
            if draw < world.fact_share:
                sentences.append(fact_sentence(rng, capitals))
            elif draw < world.fact_share + (1 - world.fact_share) * 0.45:
                sentences.append(number_sentence(rng))
            elif draw < world.fact_share + (1 - world.fact_share) * 0.75:
                sentences.append(life_sentence(rng, capitals))
            else:
                context, ending = story(rng, capitals)
                sentences.append(context + ending)
        document = " ".join(sentences)
        documents.append(document)
        total += len(document.encode()) + 1
    return documents, capitals


# Each skill draws one (question, answer, distractors) item from an rng.
SkillItem = tuple[str, str, list[str]]


def _number_distractors(rng: random.Random, answer: int, low: int, high: int, n: int) -> list[str]:
    options: set[int] = set()
    while len(options) < n:
        candidate = answer + rng.choice((-10, -2, -1, 1, 2, 10, rng.randint(-20, 20)))
        if low <= candidate <= high and candidate != answer:
            options.add(candidate)
    return [str(x) for x in sorted(options)]


def addition_item(rng: random.Random, n_distractors: int) -> SkillItem:
    a, b = rng.randint(10, 99), rng.randint(0, 9)
    return f"What is {a} plus {b}?", str(a + b), _number_distractors(rng, a + b, 0, 120, n_distractors)


def sorting_item(rng: random.Random, n_distractors: int) -> SkillItem:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    answer = " ".join(map(str, sorted(digits)))
    options: set[str] = set()
    for _ in range(200):  # a few digit lists (e.g. 1 1 1) have fewer orders than distractors asked
        if len(options) == n_distractors:
            break
        shuffled = digits[:]
        rng.shuffle(shuffled)
        candidate = " ".join(map(str, shuffled))
        if candidate != answer:
            options.add(candidate)
    while len(options) < n_distractors:
        options.add(" ".join(str((d + len(options) + 1) % 10) for d in sorted(digits)))
    return f"Sort the digits {' '.join(map(str, digits))}.", answer, sorted(options)


def comparison_item(rng: random.Random, n_distractors: int) -> SkillItem:
    a, b = rng.sample(range(10, 100), 2)
    others: set[int] = {min(a, b)}
    while len(others) < n_distractors:
        candidate = rng.randint(10, 99)
        if candidate not in (a, b):
            others.add(candidate)
    return f"Which is larger, {a} or {b}?", str(max(a, b)), [str(x) for x in sorted(others)]


def counting_item(rng: random.Random, n_distractors: int) -> SkillItem:
    words = rng.sample(COUNT_WORDS, rng.randint(2, 8))
    return (
        f"How many words are in: {' '.join(words)}?",
        str(len(words)),
        _number_distractors(rng, len(words), 1, 12, n_distractors),
    )


SKILL_GENERATORS: dict[str, Callable[[random.Random, int], SkillItem]] = {
    "addition": addition_item,
    "sorting": sorting_item,
    "comparison": comparison_item,
    "counting": counting_item,
}


def question_rows(
    skill: str, n: int, choices: int, excluded: set[str], rng: random.Random, setting: str
) -> list[dict[str, Any]]:
    """`n` distinct questions of `skill`, none of them in `excluded`, each as an eval row (question,
    answer, choices, label); `setting` names the count in the error when they cannot be drawn."""
    generate = SKILL_GENERATORS[skill]
    rows: list[dict[str, Any]] = []
    seen = set(excluded)
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n:
            raise InputError(f"{setting}={n} is more distinct {skill} questions than can be drawn; lower it")
        question, answer, distractors = generate(rng, choices - 1)
        if question in seen:
            continue
        seen.add(question)
        options = [answer, *distractors]
        rng.shuffle(options)
        rows.append({"question": question, "answer": answer, "choices": options, "label": options.index(answer)})
    return rows


def skill_datasets(
    skill: str, settings: SkillSettings, rng: random.Random
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """SFT rows and held-out eval rows for one skill; no eval question appears in the SFT rows."""
    generate = SKILL_GENERATORS[skill]
    eval_rows = question_rows(skill, settings.eval_examples, settings.choices, set(), rng, "data.skills.eval_examples")
    held_out = {row["question"] for row in eval_rows}
    sft_rows: list[dict[str, Any]] = []
    while len(sft_rows) < settings.train_examples:
        question, answer, _ = generate(rng, 0)
        if question not in held_out:
            sft_rows.append(
                {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            )
    return sft_rows, eval_rows


def preference_datasets(
    skill: str, settings: SkillSettings, eval_rows: list[dict[str, Any]], rng: random.Random
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Preference pairs (a question, its answer chosen over a wrong one) for training and for eval.

    The rejected answer is one of the multiple-choice distractors, picked at random: a near
    number, a shuffled list, the smaller of the two. Eval pairs are the held-out eval questions
    with one of their own distractors; training pairs are freshly drawn questions, never an eval
    question, made the same way.
    """
    generate = SKILL_GENERATORS[skill]

    def pair(question: str, answer: str, distractors: list[str]) -> dict[str, Any]:
        rejected = rng.choice(distractors)
        return {"messages": [{"role": "user", "content": question}], "chosen": answer, "rejected": rejected}

    eval_pairs = [
        pair(row["question"], row["answer"], [choice for choice in row["choices"] if choice != row["answer"]])
        for row in eval_rows
    ]
    held_out = {row["question"] for row in eval_rows}
    train_pairs: list[dict[str, Any]] = []
    while len(train_pairs) < settings.train_examples:
        question, answer, distractors = generate(rng, settings.choices - 1)
        if question not in held_out:
            train_pairs.append(pair(question, answer, distractors))
    return train_pairs, eval_pairs


def story_eval(n: int, n_endings: int, capitals: dict[str, str], rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        need = rng.choice(list(STORY_NEEDS))
        context, ending = story(rng, capitals, need)
        wrong = rng.sample([STORY_NEEDS[other] for other in STORY_NEEDS if other != need], n_endings - 1)
        endings = [ending, *(f" {text}." for text in wrong)]
        rng.shuffle(endings)
        rows.append({"context": context, "endings": endings, "label": endings.index(ending)})
    return rows


def load_documents(corpus: CorpusSettings) -> list[str]:
    """Documents from a local file or a hub dataset, through datasets.load_dataset."""
    import datasets  # imported here: slow, and it reads the offline flags at import

    if corpus.source == "local":
        path = Path(corpus.path)  # the schema checked it exists and has a known suffix
        builder, options = {
            ".txt": ("text", {"sample_by": "paragraph"}),
            ".jsonl": ("json", {}),
            ".json": ("json", {}),
            ".parquet": ("parquet", {}),
        }[path.suffix]
        check_corpus_file(path, corpus.text_field)
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    else:
        dataset = datasets.load_dataset(corpus.name, corpus.config_name, split=corpus.split)
    if corpus.text_field not in dataset.column_names:
        raise InputError(
            f"data.corpus.text_field={corpus.text_field!r} is not a column of the corpus; "
            f"columns: {', '.join(dataset.column_names)}"
        )
    documents = [text for text in dataset[corpus.text_field] if text and text.strip()]
    if not documents:
        raise InputError(f"the corpus ({corpus.path or corpus.name}) has no non-empty documents")
    return documents


def split_documents(
    documents: list[str], val_fraction: float, test_fraction: float, rng: random.Random
) -> dict[str, list[str]]:
    order = list(range(len(documents)))
    rng.shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    n_test = max(1, round(len(order) * test_fraction))
    if n_val + n_test >= len(order):
        raise InputError(
            f"the corpus has {len(order)} documents: too few to hold out {n_val} for val and {n_test} for test"
        )
    pick = lambda indices: [documents[i] for i in sorted(indices)]  # noqa: E731 - keeps file order
    return {
        "val": pick(order[:n_val]),
        "test": pick(order[n_val : n_val + n_test]),
        "train": pick(order[n_val + n_test :]),
    }


def run(
    settings: DataSettings,
    corpus_dir: Path,
    sft_dir: Path,
    eval_dir: Path,
    validation_dir: Path,
    preference_dir: Path | None = None,
) -> dict[str, Any]:
    """Write the output folders (the preference pairs only with preference_dir); return summary counts."""
    rng = random.Random(settings.seed)
    if settings.corpus.source == "synthetic":
        documents, capitals = synthetic_documents(settings.world, rng)
    else:
        documents = load_documents(settings.corpus)
        capitals = make_world(rng, settings.world.countries)  # the story eval still needs city names
    if settings.corpus.max_documents:
        documents = documents[: settings.corpus.max_documents]
    splits = split_documents(documents, settings.val_fraction, settings.test_fraction, rng)
    summary: dict[str, Any] = {}

    with atomic_dir(corpus_dir) as tmp:
        for name, docs in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", [{"text": doc} for doc in docs])
            summary[f"corpus/{name}_documents"] = len(docs)
            summary[f"corpus/{name}_megabytes"] = round(sum(len(d.encode()) + 1 for d in docs) / 1e6, 3)
    log.info("corpus (%s): %s", settings.corpus.source, summary)

    sft, evals = {}, {}
    for skill in settings.skills.names:
        sft[skill], evals[skill] = skill_datasets(skill, settings.skills, rng)
    with atomic_dir(sft_dir) as tmp:
        for skill, rows in sft.items():
            write_jsonl(tmp / f"{skill}.jsonl", rows)
            summary[f"sft/{skill}_examples"] = len(rows)
    with atomic_dir(eval_dir) as tmp:
        for skill, rows in evals.items():
            write_jsonl(tmp / f"{skill}.jsonl", rows)
            summary[f"eval/{skill}_examples"] = len(rows)
        stories = story_eval(settings.story_eval_examples, settings.skills.choices, capitals, rng)
        write_jsonl(tmp / "stories.jsonl", stories)
        summary["eval/stories_examples"] = len(stories)
    with atomic_dir(validation_dir) as tmp:
        # A stream of its own, like the preference pairs'. Never an eval question; a question may
        # also be in the SFT rows where the skill has few (addition: 900 in all).
        validation_rng = random.Random(f"{settings.seed}-validation")
        for skill in settings.skills.names:
            held_out = {row["question"] for row in evals[skill]}
            rows = question_rows(skill, settings.skills.validation_examples, settings.skills.choices, held_out,
                                 validation_rng, "data.skills.validation_examples")  # fmt: skip
            write_jsonl(tmp / f"{skill}.jsonl", rows)
    if preference_dir is not None:
        # a stream of its own: drawing from `rng` would change every output written after this
        # one (and adding it must not change the ones before); its counts follow from skills
        # settings, so the summary (metrics/data.json) stays as it was
        preference_rng = random.Random(f"{settings.seed}-preference")
        with atomic_dir(preference_dir) as tmp:
            for skill in settings.skills.names:
                pairs = preference_datasets(skill, settings.skills, evals[skill], preference_rng)
                for split, rows in zip(("train", "eval"), pairs, strict=True):
                    (tmp / split).mkdir(exist_ok=True)
                    write_jsonl(tmp / split / f"{skill}.jsonl", rows)
        log.info("preference pairs: %d train and %d eval per skill", settings.skills.train_examples,
                 settings.skills.eval_examples)  # fmt: skip
    log.info(
        "skills %s: %d SFT and %d eval rows each",
        ", ".join(settings.skills.names),
        settings.skills.train_examples,
        settings.skills.eval_examples,
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="output folder of the corpus splits")
    parser.add_argument("--sft", type=Path, required=True, help="output folder of the SFT skill sets")
    parser.add_argument("--eval", type=Path, required=True, help="output folder of the eval sets")
    parser.add_argument("--validation", type=Path, required=True, help="output folder of the skills' validation "
                        "sets (what merge searches score on)")  # fmt: skip
    parser.add_argument("--preference", type=Path, help="output folder of the preference pairs (DPO)")
    parser.add_argument("--metrics", type=Path, required=True, help="summary JSON (a DVC metric)")
    args = parser.parse_args(argv)
    params = start("data")
    configure_environment(hub_access=params.data.corpus.source == "hub")
    summary = run(params.data, args.corpus, args.sft, args.eval, args.validation, args.preference)
    write_json(args.metrics, summary)


if __name__ == "__main__":
    main()
