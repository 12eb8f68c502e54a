"""The synthetic corpus: deterministic bytes, disjoint populations and splits, exact contexts."""

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from jaxunlearn.data import (
    FORGET_FRACTIONS,
    NUM_PERTURBED_ANSWERS,
    PII_FIELDS,
    generate_corpus,
    load_examples,
    make_data,
    write_corpus,
)

OPTIONS = dict(seed=7, held_out_fraction=0.2, num_public_people=10, canaries=3, canary_repeats=2)
NUM_PEOPLE = 60


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(NUM_PEOPLE, **OPTIONS)


@pytest.fixture(scope="module")
def corpus_dir(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("corpus")
    write_corpus(corpus, out_dir)
    return out_dir


def _file_bytes(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_same_seed_gives_the_same_bytes(corpus_dir, tmp_path):
    random_state = random.getstate()
    make_data(
        NUM_PEOPLE,
        OPTIONS["seed"],
        tmp_path / "again",
        **{name: value for name, value in OPTIONS.items() if name != "seed"},
    )
    assert random.getstate() == random_state, "the generator must not touch global random state"
    first, second = _file_bytes(corpus_dir), _file_bytes(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert first == second


def test_same_seed_gives_the_same_bytes_in_another_process(corpus_dir, tmp_path):
    # A fresh interpreter with another hash seed: nothing may depend on set or hash order.
    script = textwrap.dedent(
        f"""
        from jaxunlearn.data import make_data
        make_data({NUM_PEOPLE}, {OPTIONS["seed"]}, {str(tmp_path / "other")!r},
                  held_out_fraction={OPTIONS["held_out_fraction"]},
                  num_public_people={OPTIONS["num_public_people"]},
                  canaries={OPTIONS["canaries"]}, canary_repeats={OPTIONS["canary_repeats"]})
        """
    )
    environment = {**os.environ, "PYTHONHASHSEED": "12345", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], check=True, env=environment, timeout=120)
    assert _file_bytes(tmp_path / "other") == _file_bytes(corpus_dir)


def test_another_seed_gives_other_people(corpus):
    other = generate_corpus(NUM_PEOPLE, **{**OPTIONS, "seed": 8})
    assert [p.name for p in other.people] != [p.name for p in corpus.people]
    assert [p.email for p in other.people] != [p.email for p in corpus.people]


def test_population_sizes(corpus):
    assert len(corpus.held_out) == round(OPTIONS["held_out_fraction"] * NUM_PEOPLE)
    assert len(corpus.people) + len(corpus.held_out) == NUM_PEOPLE
    assert len(corpus.public) == OPTIONS["num_public_people"]


def test_populations_are_disjoint_and_identifying_values_unique(corpus):
    everyone = [*corpus.people, *corpus.held_out, *corpus.public]
    for field in ("person_id", "name", "email", "phone", "address", "id_number"):
        values = [getattr(person, field) for person in everyone]
        assert len(set(values)) == len(values), f"{field} repeats"
    train = {e.metadata["person_id"] for e in corpus.train_examples()}
    held_out = {e.metadata["person_id"] for e in corpus.held_out_examples()}
    public = {e.metadata["person_id"] for e in corpus.public_examples()}
    assert train == {p.person_id for p in corpus.people}
    assert held_out == {p.person_id for p in corpus.held_out}
    assert public == {p.person_id for p in corpus.public}
    # No text of a held-out or public person appears in the training data.
    train_text = "\n".join(e.prompt + e.response for e in corpus.train_examples())
    for person in (*corpus.held_out, *corpus.public):
        assert person.name not in train_text
        assert person.email not in train_text


def test_every_example_records_its_person_and_kind(corpus):
    examples = corpus.train_examples()
    assert len({e.id for e in examples}) == len(examples)
    kinds = {}
    for example in examples:
        assert set(example.metadata) == {"person_id", "kind", "field", "population"}
        assert example.metadata["population"] == "trained"
        kinds.setdefault(example.metadata["person_id"], []).append(example.metadata["kind"])
    plain = 1 + 2 * len(PII_FIELDS)
    for person in corpus.people:
        person_kinds = kinds[person.person_id]
        assert person_kinds.count("biography") == 1
        assert person_kinds.count("fact") == person_kinds.count("qa") == len(PII_FIELDS)
        assert len(person_kinds) in (plain, plain + OPTIONS["canary_repeats"])


def test_forget_splits_nest_and_stay_inside_the_trained_people(corpus):
    trained = {p.person_id for p in corpus.people}
    splits = [corpus.forget_split(fraction) for fraction in FORGET_FRACTIONS]
    for fraction, split in zip(FORGET_FRACTIONS, splits, strict=True):
        assert len(split) == max(1, round(fraction * len(corpus.people)))
        assert split < trained
    assert splits[0] <= splits[1] <= splits[2]
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        corpus.forget_split(1.0)


def test_forget_and_retain_files_partition_the_training_file(corpus, corpus_dir):
    train = load_examples(corpus_dir / "train.jsonl")
    assert train == corpus.train_examples()
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    for fraction in FORGET_FRACTIONS:
        entry = manifest["forget_splits"][f"{fraction:.2f}"]
        forget = load_examples(corpus_dir / entry["forget"])
        retain = load_examples(corpus_dir / entry["retain"])
        forget_ids, retain_ids = {e.id for e in forget}, {e.id for e in retain}
        assert forget_ids.isdisjoint(retain_ids)
        assert forget_ids | retain_ids == {e.id for e in train}
        people = {e.metadata["person_id"] for e in forget}
        assert people == set(entry["people"]) == corpus.forget_split(fraction)
        assert not people & {e.metadata["person_id"] for e in retain}


def test_held_out_and_public_files_load_as_examples(corpus, corpus_dir):
    assert load_examples(corpus_dir / "held_out.jsonl") == corpus.held_out_examples()
    assert load_examples(corpus_dir / "public.jsonl") == corpus.public_examples()
    texts = corpus.public_texts()
    assert len(texts) == len(corpus.public_examples())
    assert texts[0].startswith("Biography of ")


def test_recall_prompt_is_exactly_the_training_context_of_the_value(corpus):
    texts = [e.prompt + e.response for e in corpus.train_examples()]
    prompts = corpus.recall_prompts()
    assert len(prompts) == len(corpus.people) * len(PII_FIELDS)
    for person_id, field, prompt, value in prompts:
        assert value == corpus.person(person_id).pii(field)
        # The prompt ends where the value begins (after one space) in a training text.
        matches = [t for t in texts if t.startswith(prompt + " " + value)]
        assert len(matches) == 1, (person_id, field)
        assert not prompt.endswith(" ")


def test_qa_items_hold_a_paraphrase_and_five_wrong_answers(corpus):
    train = {e.id: e for e in corpus.train_examples()}
    items = corpus.qa_items()
    assert len(items) == len(corpus.people) * len(PII_FIELDS)
    for item in items:
        value = corpus.person(item.person_id).pii(item.field)
        trained = train[item.example_id]
        assert (trained.prompt, trained.response) == (item.prompt, item.answer)
        assert item.question in item.prompt
        assert value in item.answer
        assert value in item.paraphrased_answer
        assert item.paraphrased_answer != item.answer
        assert len(item.perturbed_answers) == NUM_PERTURBED_ANSWERS
        assert len(set(item.perturbed_answers)) == NUM_PERTURBED_ANSWERS
        assert all(value not in wrong for wrong in item.perturbed_answers)
        assert item.paraphrased_answer not in train  # never trained on
    # An item does not depend on which other people were asked about.
    last = corpus.people[-1]
    assert corpus.qa_items([last.person_id]) == [i for i in items if i.person_id == last.person_id]


def test_canaries_belong_to_first_and_never_forgotten_people(corpus):
    first, second, third = corpus.canaries
    assert first.person_id == corpus.forget_order[0]
    assert second.person_id == corpus.forget_order[-1]
    assert third.person_id == corpus.forget_order[1]
    assert first.person_id in corpus.forget_split(0.01)
    assert all(second.person_id not in corpus.forget_split(f) for f in FORGET_FRACTIONS)
    train = {e.id: e for e in corpus.train_examples()}
    for canary in corpus.canaries:
        assert canary.repeats == OPTIONS["canary_repeats"]
        assert len(canary.secret) == 6
        assert set(canary.secret) <= set(canary.alphabet)
        for example_id in canary.example_ids:
            assert train[example_id].prompt + train[example_id].response == (
                f"{canary.prompt} {canary.secret}."
            )
    forgotten = {e.id for e in corpus.forget_examples(0.01)}
    assert set(first.example_ids) <= forgotten


def test_manifest_records_seed_counts_and_file_hashes(corpus_dir):
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert manifest["seed"] == OPTIONS["seed"]
    assert manifest["counts"]["people"] == {"trained": 48, "held_out": 12, "public": 10}
    on_disk = set(os.listdir(corpus_dir)) - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (corpus_dir / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert data.count(b"\n") == entry["rows"]


def test_existing_corpus_is_kept_unless_overwrite(corpus_dir, tmp_path):
    out_dir = tmp_path / "out"
    make_data(20, 1, out_dir, canaries=1)
    assert (out_dir / "canaries.jsonl").exists()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_data(20, 1, out_dir)
    make_data(20, 1, out_dir, overwrite=True)
    assert not (out_dir / "canaries.jsonl").exists(), "a stale file of the earlier corpus remains"
    assert not (out_dir / "public.jsonl").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(num_people=2, seed=0), "leave 1 trained people"),
        (dict(num_people=10, seed=0, canaries=10), "10 canaries need as many trained people"),
        (dict(num_people=10, seed=-1), "seed must be an integer"),
        (dict(num_people=10, seed=0, held_out_fraction=1.0), "held_out_fraction"),
    ],
)
def test_bad_arguments_are_rejected(arguments, message):
    options = {name: value for name, value in arguments.items() if name != "num_people"}
    with pytest.raises(ValueError, match=message):
        generate_corpus(arguments["num_people"], **options)
