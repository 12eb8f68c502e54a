"""`Example`: one (prompt, response) pair with a stable id, and its JSON Lines form."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from jaxunlearn.data._errors import DataError
from jaxunlearn.data._jsonl import write_jsonl

# The columns every saved example has; metadata keys may not reuse them.
RESERVED_COLUMNS = ("id", "prompt", "response")


@dataclasses.dataclass(frozen=True)
class Example:
    """A training or evaluation example: the model reads `prompt` and is scored on `response`.

    Attributes:
        id: A stable identifier: the source's own id when it has one, else `content_hash`.
            Deletion requests, ledgers and splits refer to examples by this id.
        prompt: Text the model conditions on (not scored; may be empty).
        response: Text the model is trained and evaluated on.
        metadata: Any other columns of the source (e.g. the person an example is about).
    """

    id: str
    prompt: str
    response: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise DataError(f"Example id must be a non-empty string, got {self.id!r}.")
        for name in ("prompt", "response"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataError(
                    f"Example {self.id!r}: {name} must be a string, got {type(value).__name__}."
                )

    @property
    def content_hash(self) -> str:
        """The hash of prompt and response (see `content_hash`), whatever the example's id is."""
        return content_hash(self.prompt, self.response)


def content_hash(prompt: str, response: str) -> str:
    """A stable id derived from an example's text: `"h-"` + 16 hex digits of a SHA-256.

    The hash covers a canonical JSON of the two strings, so ("ab", "c") and ("a", "bc") differ,
    and it does not depend on the platform, the Python version or the process.
    """
    canonical = json.dumps(
        {"prompt": prompt, "response": response},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "h-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def check_unique_ids(ids: Sequence[str], source: str) -> None:
    """Raises `DataError` naming the ids that occur more than once in `source`."""
    counts = collections.Counter(ids)
    duplicates = sorted(example_id for example_id, count in counts.items() if count > 1)
    if duplicates:
        shown = ", ".join(repr(example_id) for example_id in duplicates[:10])
        more = f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        raise DataError(
            f"{source}: duplicate example ids {shown}{more}. Every example needs its own id, so "
            "that a deletion request names exactly one example; remove the duplicate rows or "
            "give them distinct values in the id column."
        )


def save_examples(examples: Iterable[Example], path: str | os.PathLike, /) -> int:
    """Writes examples as JSON Lines that `load_examples` reads back into equal examples.

    Each line holds `id`, `prompt`, `response` and the metadata entries as top-level keys,
    sorted, so the same examples always give the same bytes.

    Args:
        examples: The examples, written in order.
        path: The output file (conventionally `*.jsonl`); replaced atomically.

    Returns:
        The number of examples written.

    Raises:
        DataError: If ids repeat or a metadata key is one of `id`, `prompt`, `response`.
    """
    return write_jsonl(example_rows(examples, os.fspath(path)), path)


def example_rows(examples: Iterable[Example], destination: str) -> list[dict[str, Any]]:
    """The JSON Lines rows of examples (see `save_examples`), checked for `destination`."""
    examples = list(examples)
    check_unique_ids([example.id for example in examples], destination)
    rows = []
    for example in examples:
        clashing = sorted(set(example.metadata) & set(RESERVED_COLUMNS))
        if clashing:
            raise DataError(
                f"Example {example.id!r} has metadata keys {clashing} that would overwrite its "
                "own columns when saved."
            )
        rows.append(
            {
                "id": example.id,
                "prompt": example.prompt,
                "response": example.response,
                **example.metadata,
            }
        )
    return rows
