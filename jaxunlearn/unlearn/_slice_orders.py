"""S3T slice orders: which of a shard's slices each of its B models sees first, second, ...

S3T trains B models per shard, each on its own order π of the shard's L slices: stage i trains
the i-th group of LoRA layers on the slices π(1..i). A deletion in the slice at position p of a
model's order takes that model back to its stage p − 1, so the orders decide how many
deletions a shard absorbs. Slices are numbered 0..L − 1 here, and an order is an array of L
slice numbers, `order[p - 1]` being the slice at (1-based) position p.

Two selections:

- `cyclic_orders`: the first B right-rotations of (0, 1, ..., L − 1). Every slice appears at
  most once at each position, which is what a uniform deletion prior calls for.
- `prior_aware_orders`: for known per-slice deletion probabilities, a Latin square built one
  position at a time by maximum-weight bipartite matching, of which the B orders with the
  highest score are kept (the rule is spelled out in its docstring).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

from jaxunlearn.errors import SettingsError

__all__ = [
    "DEFAULT_SHARPNESS",
    "checked_count",
    "cyclic_orders",
    "normalized_probabilities",
    "order_score",
    "prior_aware_orders",
]

# t of the score Σ_n n·(1 − c_n)^t: large, so an order is scored almost only by the prefixes
# that are unlikely to have been hit at all.
DEFAULT_SHARPNESS = 100.0


def cyclic_orders(num_slices: int, budget: int) -> np.ndarray:
    """The first `budget` right-rotations of (0, 1, ..., L − 1), L = `num_slices`.

    Order k (k = 0, ..., B − 1) is the identity rotated right by k places:
    `order[i] = (i − k) mod L`, so order 0 is (0, 1, ..., L − 1), order 1 is
    (L − 1, 0, ..., L − 2), and so on. The B orders start with B different slices and no slice
    appears twice at any position (they are B rows of a Latin square).

    Args:
        num_slices: L, the slices of one shard (≥ 1).
        budget: B, the orders to train (1 ≤ B ≤ L: there are only L rotations).

    Returns:
        An int64 array of shape (B, L): one order per row, 0-based slice numbers.

    Raises:
        SettingsError: If L < 1, B < 1 or B > L.
    """
    num_slices = checked_count(num_slices, "num_slices")
    budget = _budget(budget, num_slices)
    positions = np.arange(num_slices)
    return np.stack([np.roll(positions, shift) for shift in range(budget)])


def normalized_probabilities(probabilities, /) -> np.ndarray:
    """Per-slice deletion weights as probabilities: non-negative, finite, divided by their sum.

    The weights are relative: (2, 1, 1) and (0.5, 0.25, 0.25) are the same prior. Any shape is
    kept; the sum is taken over every entry.

    Raises:
        SettingsError: If the weights are empty, negative, not finite, or all zero.
    """
    weights = np.asarray(probabilities, dtype=np.float64)
    if weights.size == 0:
        raise SettingsError("Deletion probabilities: none given.")
    if not np.all(np.isfinite(weights)):
        raise SettingsError(f"Deletion probabilities must be finite, got {weights.tolist()}.")
    if np.any(weights < 0):
        raise SettingsError(f"Deletion probabilities must be ≥ 0, got {weights.tolist()}.")
    total = weights.sum()
    if not total > 0:
        raise SettingsError("Deletion probabilities are all 0: no slice can be deleted from.")
    return weights / total


def order_score(order, probabilities, /, *, sharpness: float = DEFAULT_SHARPNESS) -> float:
    """Σ_n n·(1 − c_n)^t over the positions n = 1..len(order) of a (partial) order.

    c_n is the summed deletion probability of the order's first n slices, t = `sharpness`.
    The term of position n is large only while the first n slices are unlikely to have been
    hit, weighted by the n layer groups such a prefix keeps; so the score rewards orders that
    put rarely deleted slices first.

    Args:
        order: Slice numbers, a whole order or its first positions.
        probabilities: Every slice's deletion probability (used as given, not normalized).
        sharpness: t > 0.
    """
    cumulative = np.cumsum(np.asarray(probabilities, np.float64)[np.asarray(order, np.intp)])
    remaining = np.clip(1.0 - cumulative, 0.0, None)
    positions = np.arange(1, cumulative.size + 1)
    return float(np.sum(positions * remaining**sharpness))


def prior_aware_orders(
    deletion_probabilities, budget: int, *, sharpness: float = DEFAULT_SHARPNESS
) -> np.ndarray:
    """B slice orders for known per-slice deletion probabilities (bipartite-matching selection).

    The rule, S3T's selection for a non-uniform prior, extended to a budget below L:

    1. Start L partial orders, order j holding slice j alone.
    2. For positions 2, ..., L in turn, match the L partial orders to the L slices by a
       maximum-weight perfect bipartite matching (`scipy.optimize.linear_sum_assignment`): the
       weight of (order i, slice j) is the score `order_score` of order i extended by slice
       j, and a slice already in order i cannot be matched to it. Each order is extended by
       its matched slice.
    3. Keep the B complete orders with the highest score (ties: the one started first).

    Since every step is a perfect matching, each slice is at each position in exactly one of
    the L orders (a Latin square, so the matching always exists), and the B orders kept
    differ at every position: no two share a slice anywhere. For B = L all L orders are kept.
    With equal probabilities every weight ties and the result is some Latin square.

    Args:
        deletion_probabilities: The L slices' deletion weights, any non-negative
            finite numbers not all 0; they are divided by their sum (`normalized_probabilities`),
            so they are relative: how the deletions that reach this shard split over its slices.
        budget: B, the orders to keep (1 ≤ B ≤ L).
        sharpness: t of the score Σ_n n·(1 − c_n)^t (> 0; 100 by default).

    Returns:
        An int64 array of shape (B, L), highest score first, 0-based slice numbers.

    Raises:
        SettingsError: If the probabilities are not one non-empty list of valid weights, B is
            out of range, or t is not a positive finite number.
    """
    probabilities = normalized_probabilities(deletion_probabilities)
    if probabilities.ndim != 1:
        raise SettingsError(
            f"prior_aware_orders takes one shard's per-slice probabilities, a flat list; got "
            f"shape {probabilities.shape}."
        )
    num_slices = probabilities.size
    budget = _budget(budget, num_slices)
    sharpness = float(sharpness)
    if not (math.isfinite(sharpness) and sharpness > 0):
        raise SettingsError(f"sharpness must be a finite number > 0, got {sharpness}.")

    orders = np.zeros((num_slices, num_slices), dtype=np.int64)
    orders[:, 0] = np.arange(num_slices)
    used = np.eye(num_slices, dtype=bool)  # used[i, j]: slice j is already in order i
    for position in range(1, num_slices):
        weights = np.full((num_slices, num_slices), -np.inf)
        for row in range(num_slices):
            for slice_ in np.flatnonzero(~used[row]):
                extended = np.append(orders[row, :position], slice_)
                weights[row, slice_] = order_score(extended, probabilities, sharpness=sharpness)
        rows, slices = linear_sum_assignment(weights, maximize=True)
        orders[rows, position] = slices
        used[rows, slices] = True

    scores = np.array([order_score(o, probabilities, sharpness=sharpness) for o in orders])
    kept = np.argsort(-scores, kind="stable")[:budget]
    return orders[kept]


def checked_count(value, name: str, /) -> int:
    """`value` as an int, refusing anything that is not an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise SettingsError(f"{name} must be an integer, got {value!r}.")
    if value < 1:
        raise SettingsError(f"{name} must be ≥ 1, got {value}.")
    return int(value)


def _budget(budget, num_slices: int) -> int:
    budget = checked_count(budget, "budget")
    if budget > num_slices:
        raise SettingsError(
            f"budget {budget} exceeds the {num_slices} slices of a shard: at most "
            f"{num_slices} orders can start with different slices (budget ≤ num_slices)."
        )
    return budget
