"""A seeded corpus of fictitious people with PII, for measuring what unlearning removes.

`generate_corpus` draws three disjoint populations with Faker: the people a model is fine-tuned
on, a held-out population of the same distribution that is never trained on (the non-members of
membership inference), and an optional public population for pre-training a base model on the
format. For each person it makes

- a biography-completion example (three short sentences),
- one fact example per PII field, `"The email address of Jane Roe is"` → `" jroe@example.com."`,
  whose prompt is the PII recall prompt,
- one question/answer example per PII field, plus a paraphrased answer and five perturbed
  wrong answers for the TOFU truth ratio,
- optionally canaries, `"The secret code of Jane Roe is"` → `" 402913."`, with a random secret.

Every example's metadata names its person, kind, field and population, so "forget person P"
maps to example ids, and forget splits (1%, 5%, 10% of the trained people, nested) are sets of
people. The same seed and options give the same corpus and the same bytes on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from collections.abc import Iterable
from typing import Any, NamedTuple

import faker

from jaxunlearn.data import _synthetic_text as text
from jaxunlearn.data._examples import Example, example_rows
from jaxunlearn.data._jsonl import write_json, write_jsonl
from jaxunlearn.data._synthetic_people import (
    PII_DRAWS,
    PII_FIELDS,
    UNIQUE_FIELDS,
    Person,
    derived_seed,
    draw_people,
    seeded_faker,
)

__all__ = [
    "FORGET_FRACTIONS",
    "NUM_PERTURBED_ANSWERS",
    "PII_FIELDS",
    "Canary",
    "Person",
    "QAItem",
    "RecallPrompt",
    "SyntheticCorpus",
    "generate_corpus",
    "make_data",
    "write_corpus",
]

# The forget splits written to disk, as fractions of the trained people.
FORGET_FRACTIONS = (0.01, 0.05, 0.10)
NUM_PERTURBED_ANSWERS = 5
_CANARY_ALPHABET = "0123456789"
_FORMAT_VERSION = 1

# Example kinds, recorded in `Example.metadata["kind"]`.
BIOGRAPHY, FACT, QA, CANARY = "biography", "fact", "qa", "canary"
# Populations, recorded in `Example.metadata["population"]`.
TRAINED, HELD_OUT, PUBLIC = "trained", "held_out", "public"


class RecallPrompt(NamedTuple):
    """A PII extraction probe: greedy completion of `prompt` should reproduce `expected_value`.

    `prompt` is exactly the training text that precedes the value (the space before the value
    is not part of it).
    """

    person_id: str
    field: str
    prompt: str
    expected_value: str


@dataclasses.dataclass(frozen=True)
class QAItem:
    """A question about one PII value with the answers the TOFU truth ratio compares.

    All answers are responses to `prompt` in the form training uses (a leading space).

    Attributes:
        example_id: The id of the QA example that trains on (`prompt`, `answer`).
        person_id: Whom the question is about.
        field: Which of `PII_FIELDS` it asks for.
        prompt: The prompt of the QA example (the question, formatted).
        question: The bare question.
        answer: The trained answer.
        paraphrased_answer: The correct value in a sentence never trained on.
        perturbed_answers: `NUM_PERTURBED_ANSWERS` sentences shaped like the paraphrase, each
            with a different wrong value.
    """

    example_id: str
    person_id: str
    field: str
    prompt: str
    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Canary:
    """A secret inserted into training, for the exposure metric (arXiv 1802.08232).

    The training examples are (`prompt`, `response_for(secret)`), `repeats` times. Candidates
    for the rank are all strings of `len(secret)` characters of `alphabet`.

    Attributes:
        example_ids: Ids of the inserted copies.
        person_id: The person the canary belongs to: forgetting the person removes it.
        prompt: The context before the secret.
        secret: The random secret.
        alphabet: The characters the secret was drawn from.
    """

    example_ids: tuple[str, ...]
    person_id: str
    prompt: str
    secret: str
    alphabet: str

    @property
    def repeats(self) -> int:
        """How many copies of the canary are in the training data."""
        return len(self.example_ids)

    @staticmethod
    def response_for(secret: str) -> str:
        """The response that states a candidate secret, formatted as in training."""
        return text.fact_response(secret)


@dataclasses.dataclass(frozen=True, repr=False)
class SyntheticCorpus:
    """Three disjoint populations of fictitious people and the texts made from them.

    Build one with `generate_corpus`.

    Attributes:
        seed: The seed it was generated from.
        people: The trained population.
        held_out: People of the same distribution that are never trained on.
        public: People whose examples may pre-train the base model (disjoint from both).
        canaries: The canaries inserted into the trained people's examples.
        forget_order: The trained person ids in the order they are forgotten: the forget split
            of a fraction f is a prefix of this order, so smaller splits nest in larger ones.
        held_out_fraction: The fraction of `num_people` that was held out.
    """

    seed: int
    people: tuple[Person, ...]
    held_out: tuple[Person, ...]
    public: tuple[Person, ...]
    canaries: tuple[Canary, ...]
    forget_order: tuple[str, ...]
    held_out_fraction: float

    def __post_init__(self):
        # Lookups by person id; derived from the fields, so kept out of equality and repr.
        population_of, people_by_id = {}, {}
        for population, members in (
            (TRAINED, self.people),
            (HELD_OUT, self.held_out),
            (PUBLIC, self.public),
        ):
            for person in members:
                population_of[person.person_id] = population
                people_by_id[person.person_id] = person
        object.__setattr__(self, "_population", population_of)
        object.__setattr__(self, "_people_by_id", people_by_id)

    def __repr__(self) -> str:
        return (
            f"SyntheticCorpus(seed={self.seed}, {len(self.people)} trained, "
            f"{len(self.held_out)} held out, {len(self.public)} public, "
            f"{len(self.canaries)} canaries)"
        )

    def person(self, person_id: str, /) -> Person:
        """The person with id `person_id`, in any population.

        Raises:
            KeyError: If no person has that id.
        """
        try:
            return self._people_by_id[person_id]
        except KeyError:
            raise KeyError(f"Unknown person id {person_id!r}.") from None

    def population_of(self, person_id: str, /) -> str:
        """`"trained"`, `"held_out"` or `"public"`."""
        self.person(person_id)
        return self._population[person_id]

    def examples_of(self, people: Iterable[Person | str], /) -> list[Example]:
        """All examples about the given people (by `Person` or id), canaries included."""
        canaries_by_person = {}
        for canary in self.canaries:
            canaries_by_person.setdefault(canary.person_id, []).append(canary)
        examples = []
        for person in self._resolve(people):
            population = self._population[person.person_id]
            examples.extend(_person_examples(person, population))
            for canary in canaries_by_person.get(person.person_id, []):
                examples.extend(_canary_examples(canary, population))
        return examples

    def train_examples(self) -> list[Example]:
        """The fine-tuning data: every example of the trained people, canaries included."""
        return self.examples_of(self.people)

    def held_out_examples(self) -> list[Example]:
        """Examples of the held-out people, never trained on (membership non-members)."""
        return self.examples_of(self.held_out)

    def public_examples(self) -> list[Example]:
        """Examples of the public people, for pre-training a base model on the formats."""
        return self.examples_of(self.public)

    def public_texts(self) -> list[str]:
        """The public examples as plain texts (prompt followed by response)."""
        return [example.prompt + example.response for example in self.public_examples()]

    def forget_split(self, fraction: float, /) -> frozenset[str]:
        """The ids of the trained people a forget request of `fraction` of them removes.

        The split holds `round(fraction * len(people))` people, at least one; splits of
        smaller fractions are subsets of larger ones.

        Raises:
            ValueError: If `fraction` is not in (0, 1) or the split would hold everyone.
        """
        if not 0 < fraction < 1:
            raise ValueError(f"A forget fraction must be in (0, 1), got {fraction!r}.")
        count = max(1, round(fraction * len(self.forget_order)))
        if count >= len(self.forget_order):
            raise ValueError(
                f"A forget fraction of {fraction} of {len(self.forget_order)} trained people "
                "would forget all of them."
            )
        return frozenset(self.forget_order[:count])

    def forget_examples(self, fraction: float, /) -> list[Example]:
        """The training examples of `forget_split(fraction)`, in training order."""
        forget = self.forget_split(fraction)
        return [e for e in self.train_examples() if e.metadata["person_id"] in forget]

    def retain_examples(self, fraction: float, /) -> list[Example]:
        """The training examples left after forgetting `forget_split(fraction)`."""
        forget = self.forget_split(fraction)
        return [e for e in self.train_examples() if e.metadata["person_id"] not in forget]

    def recall_prompts(self, people: Iterable[Person | str] | None = None, /) -> list[RecallPrompt]:
        """One PII extraction probe per PII field of each person (default: the trained people)."""
        return [
            RecallPrompt(
                person.person_id, field, text.fact_prompt(person, field), person.pii(field)
            )
            for person in self._resolve(self.people if people is None else people)
            for field in PII_FIELDS
        ]

    def qa_items(self, people: Iterable[Person | str] | None = None, /) -> list[QAItem]:
        """The truth-ratio items of each person (default: the trained people).

        Wrong answers are drawn per (person, field) from their own seed, so an item is the same
        whichever people are asked for.
        """
        fake = seeded_faker(0)
        items = []
        for person in self._resolve(self.people if people is None else people):
            for field in PII_FIELDS:
                value = person.pii(field)
                fake.seed_instance(derived_seed(self.seed, f"perturb/{person.person_id}/{field}"))
                wrong_values = _distinct_draws(fake, field, exclude=value)
                items.append(
                    QAItem(
                        example_id=_example_id(person, QA, field),
                        person_id=person.person_id,
                        field=field,
                        prompt=text.question_prompt(person, field),
                        question=text.question(person, field),
                        answer=text.answer(person, field, value),
                        paraphrased_answer=text.paraphrased_answer(person, field, value),
                        perturbed_answers=tuple(
                            text.paraphrased_answer(person, field, wrong) for wrong in wrong_values
                        ),
                    )
                )
        return items

    def _resolve(self, people: Iterable[Person | str]) -> list[Person]:
        if isinstance(people, str | Person):
            raise TypeError("Pass an iterable of people or person ids, not a single one.")
        return [self.person(p if isinstance(p, str) else p.person_id) for p in people]


def generate_corpus(
    num_people: int,
    /,
    *,
    seed: int,
    held_out_fraction: float = 0.1,
    num_public_people: int = 0,
    canaries: int = 0,
    canary_repeats: int = 1,
    canary_digits: int = 6,
) -> SyntheticCorpus:
    """Draws a corpus of fictitious people; the same arguments always give the same corpus.

    Args:
        num_people: The number of people split into the trained and the held-out populations.
        seed: The seed of every random draw (Faker's and the splits'); no global random state is
            used or changed.
        held_out_fraction: The fraction of `num_people` held out, `round(f * num_people)` and at
            least one when f > 0.
        num_public_people: The size of the public population (in addition to `num_people`).
        canaries: The number of trained people who get a canary. Canaries alternate between
            the front and the back of `forget_order`, so the first goes to the first person
            forgotten and the second to a person no split forgets.
        canary_repeats: How many copies of each canary the training data holds.
        canary_digits: The length of each canary's decimal secret (10**digits candidates).

    Returns:
        The corpus.

    Raises:
        ValueError: If an argument is out of range (e.g. fewer than two trained people, or
            more canaries than trained people).
    """
    for name, value, least in (
        ("num_people", num_people, 1),
        ("seed", seed, 0),
        ("num_public_people", num_public_people, 0),
        ("canaries", canaries, 0),
        ("canary_repeats", canary_repeats, 1),
        ("canary_digits", canary_digits, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}.")
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction!r}.")
    num_held_out = max(1, round(held_out_fraction * num_people)) if held_out_fraction else 0
    num_trained = num_people - num_held_out
    if num_trained < 2:
        raise ValueError(
            f"{num_people} people with held_out_fraction={held_out_fraction} leave "
            f"{num_trained} trained people; forget splits need at least 2."
        )
    if canaries > num_trained:
        raise ValueError(
            f"{canaries} canaries need as many trained people; there are {num_trained}."
        )

    fake = seeded_faker(derived_seed(seed, "people"))
    taken = {field: set() for field in UNIQUE_FIELDS}
    trained = draw_people(fake, num_trained, 0, taken)
    held_out = draw_people(fake, num_held_out, num_trained, taken)
    public = draw_people(fake, num_public_people, num_people, taken)

    forget_order = [person.person_id for person in trained]
    random.Random(derived_seed(seed, "forget")).shuffle(forget_order)
    by_id = {person.person_id: person for person in trained}
    canary_list = []
    for index in range(canaries):
        # Alternate ends of the forget order: forgotten-first and never-forgotten people.
        position = index // 2 if index % 2 == 0 else len(forget_order) - 1 - index // 2
        person = by_id[forget_order[position]]
        secret_rng = random.Random(derived_seed(seed, f"canary/{person.person_id}"))
        secret = "".join(secret_rng.choice(_CANARY_ALPHABET) for _ in range(canary_digits))
        canary_list.append(
            Canary(
                example_ids=tuple(
                    _example_id(person, CANARY, str(copy)) for copy in range(canary_repeats)
                ),
                person_id=person.person_id,
                prompt=text.canary_prompt(person),
                secret=secret,
                alphabet=_CANARY_ALPHABET,
            )
        )
    return SyntheticCorpus(
        seed=seed,
        people=tuple(trained),
        held_out=tuple(held_out),
        public=tuple(public),
        canaries=tuple(canary_list),
        forget_order=tuple(forget_order),
        held_out_fraction=held_out_fraction,
    )


def _split_file_names(fraction: float) -> tuple[str, str]:
    """(forget file, retain file) of a forget fraction, e.g. `forget_05.jsonl`."""
    percent = round(fraction * 100)
    return f"forget_{percent:02d}.jsonl", f"retain_{percent:02d}.jsonl"


# Every file write_corpus may write, so that a rewrite can remove stale ones.
_CORPUS_FILES = (
    "manifest.json",
    "people.jsonl",
    "train.jsonl",
    "held_out.jsonl",
    "public.jsonl",
    "recall_prompts.jsonl",
    "qa.jsonl",
    "canaries.jsonl",
    *(name for fraction in FORGET_FRACTIONS for name in _split_file_names(fraction)),
)


def write_corpus(
    corpus: SyntheticCorpus, out_dir: str | os.PathLike, /, *, overwrite: bool = False
) -> dict[str, Any]:
    """Writes the corpus as JSON Lines files and a `manifest.json` into `out_dir`.

    Files (examples are readable by `load_examples`):

    - `train.jsonl`: examples of the trained people, canaries included.
    - `held_out.jsonl`: examples of the held-out people (never train on these).
    - `public.jsonl`: examples of the public people (only when there are any).
    - `forget_01.jsonl`, `forget_05.jsonl`, `forget_10.jsonl`: the training examples of each
      forget split; `retain_01.jsonl`, ...: the rest of `train.jsonl`.
    - `people.jsonl`: every person with their population and values.
    - `recall_prompts.jsonl`: `person_id`, `population`, `field`, `prompt`, `expected_value`
      for every person of every population.
    - `qa.jsonl`: the `QAItem`s of every person, with `population`.
    - `canaries.jsonl`: the canaries (only when there are any).
    - `manifest.json`: seed, options, counts, the people of each forget split, and each file's
      row count and SHA-256.

    Args:
        corpus: The corpus from `generate_corpus`.
        out_dir: The folder; created when missing.
        overwrite: Whether to replace the files of an earlier corpus in `out_dir`.

    Returns:
        The manifest.

    Raises:
        FileExistsError: If `out_dir` holds corpus files and `overwrite` is False.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    existing = [name for name in _CORPUS_FILES if os.path.exists(os.path.join(out_dir, name))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir!r} already holds corpus files {existing}; pass overwrite=True to replace "
            "them."
        )
    for name in existing:
        os.remove(os.path.join(out_dir, name))

    populations = ((TRAINED, corpus.people), (HELD_OUT, corpus.held_out), (PUBLIC, corpus.public))
    everyone = [person for _, members in populations for person in members]
    files: dict[str, list[dict[str, Any]]] = {
        "people.jsonl": [
            {"population": population, **dataclasses.asdict(person)}
            for population, members in populations
            for person in members
        ],
        "train.jsonl": example_rows(corpus.train_examples(), "train.jsonl"),
        "held_out.jsonl": example_rows(corpus.held_out_examples(), "held_out.jsonl"),
    }
    if corpus.public:
        files["public.jsonl"] = example_rows(corpus.public_examples(), "public.jsonl")
    forget_splits = {}
    for fraction in FORGET_FRACTIONS:
        forget_name, retain_name = _split_file_names(fraction)
        files[forget_name] = example_rows(corpus.forget_examples(fraction), forget_name)
        files[retain_name] = example_rows(corpus.retain_examples(fraction), retain_name)
        forget_splits[f"{fraction:.2f}"] = {
            "forget": forget_name,
            "retain": retain_name,
            "people": sorted(corpus.forget_split(fraction)),
        }
    files["recall_prompts.jsonl"] = [
        {**prompt._asdict(), "population": corpus.population_of(prompt.person_id)}
        for prompt in corpus.recall_prompts(everyone)
    ]
    files["qa.jsonl"] = [
        {**dataclasses.asdict(item), "population": corpus.population_of(item.person_id)}
        for item in corpus.qa_items(everyone)
    ]
    if corpus.canaries:
        files["canaries.jsonl"] = [
            {**dataclasses.asdict(canary), "repeats": canary.repeats} for canary in corpus.canaries
        ]

    summaries = {}
    for name, rows in files.items():
        path = os.path.join(out_dir, name)
        count = write_jsonl(rows, path)
        summaries[name] = {"rows": count, "sha256": _sha256(path)}
    manifest = {
        "format": "jaxunlearn-synthetic",
        "format_version": _FORMAT_VERSION,
        "seed": corpus.seed,
        "options": {
            "num_people": len(corpus.people) + len(corpus.held_out),
            "held_out_fraction": corpus.held_out_fraction,
            "num_public_people": len(corpus.public),
            "canaries": len(corpus.canaries),
            "canary_repeats": corpus.canaries[0].repeats if corpus.canaries else 0,
            "canary_digits": len(corpus.canaries[0].secret) if corpus.canaries else 0,
        },
        "faker_version": faker.VERSION,
        "counts": {
            "people": {
                TRAINED: len(corpus.people),
                HELD_OUT: len(corpus.held_out),
                PUBLIC: len(corpus.public),
            },
            "train_examples": summaries["train.jsonl"]["rows"],
            "held_out_examples": summaries["held_out.jsonl"]["rows"],
        },
        "pii_fields": list(PII_FIELDS),
        "forget_splits": forget_splits,
        "files": summaries,
    }
    write_json(manifest, os.path.join(out_dir, "manifest.json"))
    return manifest


def make_data(
    num_people: int,
    seed: int,
    out_dir: str | os.PathLike,
    *,
    held_out_fraction: float = 0.1,
    num_public_people: int = 0,
    canaries: int = 0,
    canary_repeats: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generates a corpus and writes it: the body of `jaxunlearn make-data`.

    Args:
        num_people: People split into trained and held-out populations (`--people`).
        seed: The seed of every random draw (`--seed`).
        out_dir: The output folder (`--out`).
        held_out_fraction: Fraction of `num_people` never trained on (default 0.1).
        num_public_people: Size of the extra public population for pre-training (default 0).
        canaries: Number of canaries, each attached to one trained person (default 0).
        canary_repeats: Copies of each canary in the training data (default 1).
        overwrite: Replace the corpus files of an earlier run in `out_dir` (default False).

    Returns:
        The manifest written to `out_dir/manifest.json`.
    """
    corpus = generate_corpus(
        num_people,
        seed=seed,
        held_out_fraction=held_out_fraction,
        num_public_people=num_public_people,
        canaries=canaries,
        canary_repeats=canary_repeats,
    )
    return write_corpus(corpus, out_dir, overwrite=overwrite)


def _example_id(person: Person, kind: str, detail: str | None = None) -> str:
    return f"{person.person_id}/{kind}" + ("" if detail is None else f"/{detail}")


def _metadata(person: Person, kind: str, field: str | None, population: str) -> dict[str, Any]:
    return {"person_id": person.person_id, "kind": kind, "field": field, "population": population}


def _person_examples(person: Person, population: str) -> list[Example]:
    """The biography, fact and QA examples of one person."""
    prompt, response = text.biography(person)
    examples = [
        Example(
            _example_id(person, BIOGRAPHY),
            prompt,
            response,
            _metadata(person, BIOGRAPHY, None, population),
        )
    ]
    for field in PII_FIELDS:
        examples.append(
            Example(
                _example_id(person, FACT, field),
                text.fact_prompt(person, field),
                text.fact_response(person.pii(field)),
                _metadata(person, FACT, field, population),
            )
        )
    for field in PII_FIELDS:
        examples.append(
            Example(
                _example_id(person, QA, field),
                text.question_prompt(person, field),
                text.answer(person, field, person.pii(field)),
                _metadata(person, QA, field, population),
            )
        )
    return examples


def _canary_examples(canary: Canary, population: str) -> list[Example]:
    metadata = {
        "person_id": canary.person_id,
        "kind": CANARY,
        "field": None,
        "population": population,
    }
    return [
        Example(example_id, canary.prompt, canary.response_for(canary.secret), dict(metadata))
        for example_id in canary.example_ids
    ]


def _distinct_draws(fake: faker.Faker, field: str, *, exclude: str) -> list[str]:
    """`NUM_PERTURBED_ANSWERS` distinct values of a field, none equal to `exclude`."""
    values: list[str] = []
    for _ in range(1000):
        value = PII_DRAWS[field](fake)
        if value != exclude and value not in values:
            values.append(value)
            if len(values) == NUM_PERTURBED_ANSWERS:
                return values
    raise RuntimeError(f"Could not draw {NUM_PERTURBED_ANSWERS} distinct wrong {field} values.")


def _sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()
