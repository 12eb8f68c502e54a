"""Report tables in GitHub Markdown."""

from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    /,
    *,
    float_format: str = "{:.4g}",
) -> str:
    """Renders rows as a GitHub Markdown table with the given columns, in order.

    Args:
        rows: One mapping per table row, from column name to value. A missing key or None
            gives an empty cell.
        columns: The column names, which are also the header.
        float_format: The `str.format` pattern of real, non-integer numbers (numpy floats
            included); integers and booleans print as they are.

    Returns:
        The table, one line per row after the header and separator, ending in a newline.

    Raises:
        ValueError: If there is no column.
    """
    if not columns:
        raise ValueError("A table needs at least one column.")
    lines = [
        _line(_escape(str(column)) for column in columns),
        _line("---" for _ in columns),
    ]
    for row in rows:
        lines.append(_line(_cell(row.get(column), float_format) for column in columns))
    return "\n".join(lines) + "\n"


def _cell(value: Any, float_format: str) -> str:
    if value is None:
        return ""
    if isinstance(value, np.generic) or (hasattr(value, "shape") and np.ndim(value) == 0):
        value = value.item()  # numpy and jax scalars format as the Python number they hold
    if isinstance(value, Real) and not isinstance(value, Integral):
        return float_format.format(value)
    return _escape(str(value))


def _escape(text: str) -> str:
    # A bare "|" would end the cell and a newline the row.
    return text.replace("|", "\\|").replace("\n", " ")


def _line(cells) -> str:
    return "| " + " | ".join(cells) + " |"
