"""Requests read from files: ids to remove (one a line) and JSONL edits."""

from __future__ import annotations

import json
import os

from jaxunlearn.data import DataError
from jaxunlearn.unlearn._requests import QueryEdit, Removal, ResponseEdit

__all__ = ["read_edits", "read_removal"]


def read_removal(path: str | os.PathLike, /) -> Removal:
    """A `Removal` of the ids in a text file, one a line (blank lines ignored)."""
    try:
        with open(path, encoding="utf-8") as file:
            ids = [line.strip() for line in file if line.strip()]
    except UnicodeDecodeError as error:
        raise DataError(f"{os.fspath(path)} is not UTF-8 text ({error.reason}).") from None
    if not ids:
        raise DataError(f"{os.fspath(path)} names no example ids.")
    return Removal(ids)


def read_edits(path: str | os.PathLike, /, *, field: str) -> QueryEdit | ResponseEdit:
    """A `QueryEdit` (`field="prompt"`) or `ResponseEdit` (`"response"`) from a JSONL file of
    `{"id": ..., field: ...}` objects."""
    if field not in ("prompt", "response"):
        raise ValueError(f"field must be 'prompt' or 'response', got {field!r}.")
    edits: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as file:
            lines = list(file)
    except UnicodeDecodeError as error:
        raise DataError(f"{os.fspath(path)} is not UTF-8 text ({error.reason}).") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{os.fspath(path)}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or set(row) != {"id", field}:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: expected an object with keys 'id' and {field!r}, got {keys}")
        example_id, text = row["id"], row[field]
        # As load_examples reads an integer id column.
        if isinstance(example_id, int) and not isinstance(example_id, bool):
            example_id = str(example_id)
        if not isinstance(example_id, str) or not isinstance(text, str):
            raise DataError(f"{where}: 'id' and {field!r} must be strings")
        if example_id in edits:
            raise DataError(f"{where}: example {example_id!r} is edited twice")
        edits[example_id] = text
    if not edits:
        raise DataError(f"{os.fspath(path)} holds no edits")
    return QueryEdit(edits) if field == "prompt" else ResponseEdit(edits)
