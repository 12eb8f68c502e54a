"""Strict JSON for machine-read output: no NaN or infinity ever reaches a file or stdout."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

__all__ = ["finite", "strict_dumps"]


def finite(value: Any, /) -> Any:
    """`value` with NaN and infinities as None and numpy scalars as Python numbers."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def strict_dumps(value: Any, /, **options: Any) -> str:
    """`json.dumps` of `finite(value)`, refusing anything a strict parser would not read."""
    return json.dumps(finite(value), allow_nan=False, **options)
