"""The distinguisher of an ε audit: one member-high number per model, from its forget set.

An audit compares models, not examples: each trained model (one seed) is one trial, and the
statistic that tells an unlearned model from a retrained one is a membership score of the
forget set averaged over its examples (the LOSS attack's −ℓ, or Min-K%). Averaging keeps one
number per model, so trials stay independent across seeds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.data import TokenizedDataset
from jaxunlearn.errors import UserError
from jaxunlearn.eval._epsilon_audit import AuditError
from jaxunlearn.eval._mia import ATTACKS, attack_scores
from jaxunlearn.eval._scores import score_examples

__all__ = ["AUDIT_STATISTICS", "adapter_statistics", "model_statistic", "read_audit_scores"]

AUDIT_STATISTICS = ATTACKS


def model_statistic(
    model: nnx.Module,
    data: TokenizedDataset,
    /,
    *,
    statistic: str = "loss",
    batch_size: int = 32,
    placement: parallel.Placement = parallel.ONE_DEVICE,
) -> float:
    """The mean member-high attack score of `data` under `model`.

    Args:
        model: The model (base plus adapter).
        data: The forget set, tokenized as the adapter was trained.
        statistic: One of `AUDIT_STATISTICS`: "loss" (−ℓ), "min_k" (Min-40%) or
            "min_k_plus_plus" (examples where it is undefined are left out).
        batch_size: Rows per scoring batch.
        placement: Where the model lives.

    Raises:
        UserError: For an unknown statistic, an empty set, or no example where it is defined.
    """
    if statistic not in AUDIT_STATISTICS:
        raise UserError(f"Unknown audit statistic {statistic!r}; choose among {AUDIT_STATISTICS}.")
    if len(data) == 0:
        raise UserError("The audit's examples are empty: it needs the forget set to score.")
    scores = attack_scores(score_examples(model, data, batch_size=batch_size, placement=placement))
    values = scores[statistic]
    values = values[np.isfinite(values)]
    if not values.size:
        raise UserError(f"The {statistic} statistic is undefined on every example.")
    return float(values.mean())


def adapter_statistics(
    adapters: Sequence[str | os.PathLike],
    data: TokenizedDataset,
    /,
    *,
    base_model: str | os.PathLike,
    statistic: str = "loss",
    batch_size: int = 32,
) -> np.ndarray:
    """`model_statistic` of each adapter folder on `base_model`: a jaxunlearn or PEFT adapter,
    or an S3T/SISA ensemble (scored as it serves: the combination of its served shard models).
    """
    # eval does not depend on unlearn at import time.
    from jaxunlearn.unlearn import is_ensemble, open_adapter, open_ensemble

    def served(path):
        if is_ensemble(path):
            return open_ensemble(path, base_model).serving_model()
        return open_adapter(path, base_model).model

    return np.array(
        [
            model_statistic(served(path), data, statistic=statistic, batch_size=batch_size)
            for path in adapters
        ],
        np.float64,
    )


def read_audit_scores(path: str | os.PathLike, /) -> tuple[np.ndarray, np.ndarray]:
    """Scores computed elsewhere, from a JSON file `{"positives": [...], "negatives": [...]}`.

    Raises:
        AuditError: If the file is not such an object of two non-empty lists of finite numbers.
    """
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AuditError(f"{name} is not JSON ({error}).") from None
    if not isinstance(document, dict):
        raise AuditError(f'{name} must hold an object {{"positives": [...], "negatives": [...]}}.')
    sides = []
    for side in ("positives", "negatives"):
        values = document.get(side)
        if (
            not isinstance(values, list)
            or not values
            or not all(_is_finite_number(value) for value in values)
        ):
            raise AuditError(f"{name}: {side!r} must be a non-empty list of finite numbers.")
        sides.append(np.array(values, np.float64))
    return sides[0], sides[1]


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
