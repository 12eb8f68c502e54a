"""Unlearning requests: validation, resolution against a dataset, and stable fingerprints."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxunlearn.data import DataError
from jaxunlearn.unlearn import (
    QueryEdit,
    Removal,
    RequestError,
    ResponseEdit,
    UnknownExampleError,
    WholeDatasetError,
    id_hash,
    resolve_request,
)

EDIT_FIELDS = ("request_type", "field")
EDIT_CASES = [(QueryEdit, "prompt"), (ResponseEdit, "response")]


def test_removal_keeps_order_and_drops_repeats():
    removal = Removal(iter(["b", "a", "b", "c", "a"]))
    assert removal.ids == ("b", "a", "c")
    assert removal.kind == "removal"
    assert removal == Removal(("b", "a", "c"))
    assert hash(removal) == hash(Removal(["b", "a", "c"]))


def test_edits_are_sorted_hashable_and_equal_in_any_order():
    edit = QueryEdit({"b": "new b", "a": "new a"})
    assert edit.edits == (("a", "new a"), ("b", "new b"))
    assert edit.ids == ("a", "b")
    assert edit.as_dict() == {"a": "new a", "b": "new b"}
    assert edit.kind == "query_edit"
    assert edit == QueryEdit([("a", "new a"), ("b", "new b")])
    assert hash(edit) == hash(QueryEdit({"a": "new a", "b": "new b"}))
    assert ResponseEdit({"a": "y"}).kind == "response_edit"
    assert ResponseEdit({"a": "y"}) != QueryEdit({"a": "y"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        edit.edits = ()


@pytest.mark.parametrize(
    ("make_request", "message"),
    [
        (lambda: Removal([]), "no examples"),
        (lambda: Removal("secret-id-1"), "single string"),
        (lambda: Removal(7), "collection of example ids"),
        (lambda: Removal(["a", 3]), "must be strings"),
        (lambda: Removal([""]), "non-empty"),
        (lambda: QueryEdit({}), "no examples"),
        (lambda: QueryEdit("a"), "got a string"),
        (lambda: QueryEdit({1: "x"}), "must be strings"),
        (lambda: QueryEdit({"a": None}), "must be a string"),
        (lambda: QueryEdit([("a", "x", "y")]), "pairs"),
        (lambda: QueryEdit([("a", "x"), ("a", "y")]), "two different"),
        (lambda: ResponseEdit({"a": b"bytes"}), "must be a string"),
        (lambda: ResponseEdit({"a": "fine", "b": ""}), "'b' is empty"),
    ],
)
def test_malformed_requests_are_refused(make_request, message):
    with pytest.raises(RequestError, match=message):
        make_request()


def test_request_errors_are_value_errors():
    assert issubclass(RequestError, ValueError)
    assert issubclass(UnknownExampleError, RequestError)
    assert issubclass(WholeDatasetError, RequestError)


def test_an_empty_new_prompt_is_allowed():
    assert QueryEdit({"a": ""}).edits == (("a", ""),)


def test_resolve_removal(examples):
    original = list(examples)
    resolved = resolve_request(Removal(["secret-id-4", "secret-id-1"]), examples)
    assert resolved.kind == "removal"
    np.testing.assert_array_equal(resolved.indices, [1, 4])
    assert resolved.indices.dtype == np.int64
    assert not resolved.indices.flags.writeable
    assert resolved.affected == (examples[1], examples[4])
    assert resolved.replacements == ()
    assert resolved.examples_after == [examples[i] for i in (0, 2, 3, 5)]
    assert len(resolved.example_hashes) == 2
    assert resolved.id_hashes == (id_hash("secret-id-1"), id_hash("secret-id-4"))
    assert examples == original


@pytest.mark.parametrize(
    ("request_type", "field"), [(QueryEdit, "prompt"), (ResponseEdit, "response")]
)
def test_resolve_edit(examples, request_type, field):
    request = request_type({"secret-id-3": "edited text 3", "secret-id-0": "edited text 0"})
    resolved = resolve_request(request, examples)
    assert resolved.kind == request.kind
    np.testing.assert_array_equal(resolved.indices, [0, 3])
    assert resolved.affected == (examples[0], examples[3])
    for original, edited, text in zip(
        resolved.affected, resolved.replacements, ["edited text 0", "edited text 3"], strict=True
    ):
        assert edited.id == original.id
        assert edited.metadata == original.metadata
        assert edited.metadata is not original.metadata
        assert getattr(edited, field) == text
        other = "response" if field == "prompt" else "prompt"
        assert getattr(edited, other) == getattr(original, other)
    expected_after = list(examples)
    expected_after[0], expected_after[3] = resolved.replacements
    assert resolved.examples_after == expected_after
    assert examples[0].prompt.startswith("What is")
    assert examples[0].response.startswith("zelda")


def test_unknown_ids_are_named_and_counted(examples):
    unknown = [f"missing-{index}" for index in range(7)]
    with pytest.raises(UnknownExampleError) as caught:
        resolve_request(Removal(["secret-id-0", *unknown]), examples)
    message = str(caught.value)
    assert "7 of the 8 ids" in message
    assert "'missing-0'" in message
    assert "'missing-4'" in message
    assert "'missing-5'" not in message
    assert "and 2 more" in message
    with pytest.raises(UnknownExampleError, match="'nobody'"):
        resolve_request(ResponseEdit({"nobody": "text"}), examples)


def test_removing_every_example_is_refused(examples):
    with pytest.raises(WholeDatasetError, match="all 6 examples"):
        resolve_request(Removal(example.id for example in examples), examples)


@pytest.mark.parametrize(
    ("request_type", "field"), [(QueryEdit, "prompt"), (ResponseEdit, "response")]
)
def test_an_edit_that_changes_nothing_is_refused(examples, request_type, field):
    unchanged = getattr(examples[2], field)
    request = request_type({"secret-id-2": unchanged, "secret-id-3": "something new"})
    with pytest.raises(RequestError, match="changes nothing for 'secret-id-2'"):
        resolve_request(request, examples)


def test_a_dataset_with_repeated_ids_is_refused(examples):
    with pytest.raises(DataError, match="duplicate example ids 'secret-id-0'"):
        resolve_request(Removal(["secret-id-1"]), [*examples, examples[0]])


def test_only_requests_are_resolved(examples):
    with pytest.raises(RequestError, match="got list"):
        resolve_request(["secret-id-1"], examples)


def test_fingerprint_ignores_the_order_of_ids(examples):
    forward = resolve_request(Removal(["secret-id-1", "secret-id-4"]), examples)
    backward = resolve_request(Removal(["secret-id-4", "secret-id-1"]), examples)
    assert forward.fingerprint == backward.fingerprint
    assert forward.example_hashes == backward.example_hashes
    assert len(forward.fingerprint) == 64
    int(forward.fingerprint, 16)


def test_fingerprint_tells_requests_apart(examples):
    fingerprints = {
        resolve_request(request, examples).fingerprint
        for request in [
            Removal(["secret-id-1"]),
            Removal(["secret-id-2"]),
            Removal(["secret-id-1", "secret-id-2"]),
            QueryEdit({"secret-id-1": "new text"}),
            QueryEdit({"secret-id-1": "other new text"}),
            ResponseEdit({"secret-id-1": "new text"}),
        ]
    }
    assert len(fingerprints) == 6
    # The same id with different content is a different request.
    changed = [dataclasses.replace(examples[0], response="changed"), *examples[1:]]
    assert (
        resolve_request(Removal(["secret-id-0"]), changed).fingerprint
        != resolve_request(Removal(["secret-id-0"]), examples).fingerprint
    )


# Run in this process and in a fresh interpreter with another hash seed.
_FINGERPRINT_SCRIPT = """
from jaxunlearn.data import Example
from jaxunlearn.unlearn import ResponseEdit, resolve_request

examples = [Example(f"id-{i}", f"prompt {i} é", f"response {i} 名前", {"i": i}) for i in range(4)]
request = ResponseEdit({"id-2": "corrected ü", "id-0": "corrected 0"})
fingerprint = resolve_request(request, examples).fingerprint
"""

# Pins the canonical form: a change makes existing ledgers blind to repeated requests, so it
# must be deliberate (and bump the fingerprint version).
_EXPECTED_FINGERPRINT = "d980fe5cd75b2059092ca043a4c678302afa523e41ff952f564fdcb7b841b86a"


def test_fingerprint_is_the_same_in_another_process():
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    completed = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT_SCRIPT + "print(fingerprint)"],
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        check=True,
    )
    namespace = {}
    exec(_FINGERPRINT_SCRIPT, namespace)
    assert completed.stdout.strip() == namespace["fingerprint"] == _EXPECTED_FINGERPRINT
