"""Unlearning requests (remove examples, edit prompts, correct responses) and their resolution.

A request names examples by id. `resolve_request` checks it against a dataset and returns what
every unlearning method needs: the affected examples z, their edited versions z_δ, the dataset
after the request, and a fingerprint that identifies the request in the ledger without any text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, TypeAlias

import numpy as np

from jaxunlearn.data import Example, check_unique_ids
from jaxunlearn.errors import UserError

# Bumped if the fingerprint's canonical form ever changes, so that old and new fingerprints of
# the same request can never be mistaken for each other.
_FINGERPRINT_VERSION = 1

# How many offending ids an error message names before it only counts the rest.
_SHOWN_IDS = 5


class RequestError(UserError, ValueError):
    """An unlearning request is malformed or cannot be applied to the dataset."""


class UnknownExampleError(RequestError):
    """A request names example ids that the dataset does not have."""


class WholeDatasetError(RequestError):
    """A removal would delete every example, leaving nothing to train or evaluate on."""


@dataclasses.dataclass(frozen=True)
class Removal:
    """Instance removal: forget the named examples as if they had never been trained on.

    Attributes:
        ids: The example ids, as a tuple in the given order without repeats. Any iterable of
            strings is accepted (a bare string is refused: it would be read as its characters).
    """

    ids: tuple[str, ...]
    kind: ClassVar[str] = "removal"

    def __post_init__(self):
        if isinstance(self.ids, str):
            raise RequestError(
                f"Removal takes a collection of ids, got the single string {self.ids!r}; "
                f"write Removal([{self.ids!r}])."
            )
        ids = _as_tuple(self.ids, "Removal", "a collection of example ids")
        if not ids:
            raise RequestError("Removal of no examples: name at least one example id.")
        for example_id in ids:
            _check_id(example_id, "Removal")
        # Repeats are dropped, first-seen order kept.
        object.__setattr__(self, "ids", tuple(dict.fromkeys(ids)))


@dataclasses.dataclass(frozen=True)
class QueryEdit:
    """Query modification: each named example's prompt x becomes a new prompt x + δx.

    Attributes:
        edits: (example id, new prompt) pairs sorted by id, so that the same edits given in any
            order are equal and hash alike. A mapping or an iterable of pairs is accepted.
    """

    edits: tuple[tuple[str, str], ...]
    kind: ClassVar[str] = "query_edit"

    def __post_init__(self):
        object.__setattr__(self, "edits", _normalize_edits(self.edits, "QueryEdit", "prompt"))

    @property
    def ids(self) -> tuple[str, ...]:
        """The edited example ids, sorted."""
        return tuple(example_id for example_id, _ in self.edits)

    def as_dict(self) -> dict[str, str]:
        """The edits as a new {example id: new prompt} dict."""
        return dict(self.edits)


@dataclasses.dataclass(frozen=True)
class ResponseEdit:
    """Response correction: each named example's response y becomes a new response y + δy.

    Attributes:
        edits: (example id, new response) pairs sorted by id, so that the same edits given in any
            order are equal and hash alike. A mapping or an iterable of pairs is accepted. A new
            response may not be empty: the training objective is computed on response tokens.
    """

    edits: tuple[tuple[str, str], ...]
    kind: ClassVar[str] = "response_edit"

    def __post_init__(self):
        edits = _normalize_edits(self.edits, "ResponseEdit", "response")
        empty = [example_id for example_id, response in edits if not response]
        if empty:
            raise RequestError(
                f"ResponseEdit: the new response of {_name_ids(empty)} is empty; the objective is "
                "computed on response tokens, so an example needs a non-empty response. To forget "
                "an example entirely, use Removal."
            )
        object.__setattr__(self, "edits", edits)

    @property
    def ids(self) -> tuple[str, ...]:
        """The edited example ids, sorted."""
        return tuple(example_id for example_id, _ in self.edits)

    def as_dict(self) -> dict[str, str]:
        """The edits as a new {example id: new response} dict."""
        return dict(self.edits)


Request: TypeAlias = Removal | QueryEdit | ResponseEdit


@dataclasses.dataclass(frozen=True, eq=False)
class ResolvedRequest:
    """A request checked against a dataset: everything a method and the ledger need.

    Attributes:
        request: The request as given.
        indices: Positions in the dataset of the affected examples, ascending (read-only int64).
        affected: The original examples z, in dataset order.
        replacements: The edited examples z_δ (same id and metadata as the original), aligned
            with `affected`; empty for a removal.
        examples_after: The dataset after the request: without the removed examples, or with
            the edits applied, in the original order.
        fingerprint: A SHA-256 hex digest identifying the request on this data: its kind and,
            per affected example, its id and content hashes before and after. Independent of the
            order ids were given in and of the process, platform and Python version.
        example_hashes: Per affected example (aligned with `affected`), the SHA-256 hex digest of
            its id and content hash: what the ledger stores instead of the example.
    """

    request: Request
    indices: np.ndarray
    affected: tuple[Example, ...]
    replacements: tuple[Example, ...]
    examples_after: list[Example]
    fingerprint: str
    example_hashes: tuple[str, ...]

    @property
    def kind(self) -> str:
        """The request's kind: "removal", "query_edit" or "response_edit"."""
        return self.request.kind

    @property
    def id_hashes(self) -> tuple[str, ...]:
        """Per affected example (aligned with `affected`), the SHA-256 hex digest of its id."""
        return tuple(id_hash(example.id) for example in self.affected)


def resolve_request(request: Request, examples: Sequence[Example], /) -> ResolvedRequest:
    """Checks a request against a dataset and works out its effect.

    Args:
        request: A `Removal`, `QueryEdit` or `ResponseEdit`.
        examples: The dataset the request applies to (the one the adapter was trained on).

    Returns:
        The `ResolvedRequest`: affected examples, their replacements, the dataset after the
        request, and the fingerprint and hashes for the ledger.

    Raises:
        UnknownExampleError: If the request names ids that are not in `examples`.
        WholeDatasetError: If a removal names every example.
        RequestError: If an edit leaves an example's text as it was, or `request` is not a
            request.
        jaxunlearn.data.DataError: If `examples` has repeated ids (a request would be ambiguous).
    """
    if not isinstance(request, Removal | QueryEdit | ResponseEdit):
        raise RequestError(
            f"Expected a Removal, QueryEdit or ResponseEdit request, got {type(request).__name__}."
        )
    check_unique_ids([example.id for example in examples], "the dataset of the request")
    position = {example.id: index for index, example in enumerate(examples)}
    unknown = [example_id for example_id in request.ids if example_id not in position]
    if unknown:
        raise UnknownExampleError(
            f"{len(unknown)} of the {len(request.ids)} ids in the {request.kind} request are not "
            f"in the dataset of {len(examples)} examples: {_name_ids(unknown)}."
        )
    indices = np.array(sorted(position[example_id] for example_id in request.ids), np.int64)
    indices.setflags(write=False)
    affected = tuple(examples[index] for index in indices.tolist())

    if isinstance(request, Removal):
        if len(indices) == len(examples):
            raise WholeDatasetError(
                f"The removal names all {len(examples)} examples of the dataset; nothing would be "
                "left to train on. Start from the base model instead of unlearning."
            )
        replacements = ()
        removed = set(indices.tolist())
        examples_after = [example for index, example in enumerate(examples) if index not in removed]
    else:
        replacements = _edited(request, affected)
        field = _edited_field(request)
        unchanged = [
            original.id
            for original, edited in zip(affected, replacements, strict=True)
            if getattr(original, field) == getattr(edited, field)
        ]
        if unchanged:
            raise RequestError(
                f"The {request.kind} request changes nothing for {_name_ids(unchanged)}: the new "
                f"{field} equals the current one. Was it already applied to this dataset?"
            )
        examples_after = list(examples)
        for index, edited in zip(indices.tolist(), replacements, strict=True):
            examples_after[index] = edited

    example_hashes = tuple(_example_hash(example) for example in affected)
    return ResolvedRequest(
        request=request,
        indices=indices,
        affected=affected,
        replacements=replacements,
        examples_after=examples_after,
        fingerprint=_fingerprint(request.kind, affected, replacements),
        example_hashes=example_hashes,
    )


def id_hash(example_id: str) -> str:
    """The SHA-256 hex digest of an example id: how the ledger refers to an example."""
    return _sha256_json(["id", example_id])


def _example_hash(example: Example) -> str:
    return _sha256_json(["example", example.id, example.content_hash])


def _fingerprint(
    kind: str, affected: tuple[Example, ...], replacements: tuple[Example, ...]
) -> str:
    # Each example enters only through a digest of (id, content hashes), so the fingerprint can
    # be published or logged without revealing any text; sorting by id makes it independent of
    # the order the request listed its ids in.
    edited_hashes = (
        [edited.content_hash for edited in replacements] if replacements else [None] * len(affected)
    )
    digests = sorted(
        (original.id, _sha256_json([original.id, original.content_hash, edited_hash]))
        for original, edited_hash in zip(affected, edited_hashes, strict=True)
    )
    return _sha256_json(
        {"version": _FINGERPRINT_VERSION, "kind": kind, "examples": [d for _, d in digests]}
    )


def _sha256_json(value) -> str:
    # Canonical JSON is an unambiguous encoding: ("ab", "c") and ("a", "bc") hash differently.
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _edited_field(request: QueryEdit | ResponseEdit) -> str:
    return "prompt" if isinstance(request, QueryEdit) else "response"


def _edited(
    request: QueryEdit | ResponseEdit, affected: tuple[Example, ...]
) -> tuple[Example, ...]:
    field = _edited_field(request)
    new_texts = request.as_dict()
    # The metadata dict is copied so that changing one version's metadata cannot change the
    # other's.
    return tuple(
        dataclasses.replace(
            original, **{field: new_texts[original.id]}, metadata=dict(original.metadata)
        )
        for original in affected
    )


def _normalize_edits(
    edits: Mapping[str, str] | Iterable[tuple[str, str]], request_name: str, field: str
) -> tuple[tuple[str, str], ...]:
    if isinstance(edits, str):
        raise RequestError(f"{request_name} takes {{example id: new {field}}}, got a string.")
    pairs = _as_tuple(
        edits.items() if isinstance(edits, Mapping) else edits,
        request_name,
        f"{{example id: new {field}}}",
    )
    if not pairs:
        raise RequestError(f"{request_name} of no examples: give at least one {{id: new {field}}}.")
    texts: dict[str, str] = {}
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise RequestError(
                f"{request_name} takes {{example id: new {field}}} or (id, {field}) pairs, got "
                f"the item {pair!r}."
            )
        example_id, text = pair
        _check_id(example_id, request_name)
        if not isinstance(text, str):
            raise RequestError(
                f"{request_name}: the new {field} of {example_id!r} must be a string, got "
                f"{type(text).__name__}."
            )
        if example_id in texts and texts[example_id] != text:
            raise RequestError(
                f"{request_name} gives two different new {field}s for {example_id!r}."
            )
        texts[example_id] = text
    return tuple(sorted(texts.items()))


def _as_tuple(values, request_name: str, expected: str) -> tuple:
    try:
        return tuple(values)
    except TypeError:
        raise RequestError(
            f"{request_name} takes {expected}, got {type(values).__name__}."
        ) from None


def _check_id(example_id, request_name: str) -> None:
    if not isinstance(example_id, str):
        raise RequestError(
            f"{request_name}: example ids must be strings, got {example_id!r} "
            f"({type(example_id).__name__})."
        )
    if not example_id:
        raise RequestError(f"{request_name}: example ids must be non-empty strings, got ''.")


def _name_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(example_id) for example_id in ids[:_SHOWN_IDS])
    more = f" and {len(ids) - _SHOWN_IDS} more" if len(ids) > _SHOWN_IDS else ""
    return shown + more
