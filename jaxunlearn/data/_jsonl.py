"""Deterministic JSON output: the same rows always give the same bytes on disk."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO


def json_line(row: Mapping[str, Any]) -> str:
    """One row as canonical JSON: sorted keys, no ASCII escaping, compact separators, no NaN."""
    return json.dumps(
        row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Writes rows as UTF-8 JSON Lines with `\\n` endings, atomically; returns the row count."""
    count = 0
    with _atomic_text_file(path) as file:
        for row in rows:
            file.write(json_line(row))
            file.write("\n")
            count += 1
    return count


def write_json(value: Any, path: str | os.PathLike) -> None:
    """Writes one JSON document, indented with sorted keys, atomically."""
    with _atomic_text_file(path) as file:
        file.write(json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False))
        file.write("\n")


@contextlib.contextmanager
def _atomic_text_file(path: str | os.PathLike) -> Iterator[TextIO]:
    # Written next to the destination and renamed over it, so a crash leaves either the old
    # file or the complete new one, never half of one.
    path = os.fspath(path)
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as file:
            yield file
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
