"""How many deletions S3T and SISA absorb before no shard has a model left (their deletion rate).

The rules, for m shards of L equal slices each (slices numbered 0..L − 1 within a shard):

- S3T: each shard has B models, each trained on an order π of the shard's slices, and each
  model keeps a prefix, the number of leading stages it still has (L at first). A deletion
  picks one of the m·L slices (uniformly, or from a given prior); in the shard it hits, every
  model whose order has that slice at position p (1-based) falls back to the prefix
  min(prefix, p − 1). A model with prefix 0 is gone; a shard has a model while any of its
  models has prefix ≥ 1.
- SISA: each shard has one model, gone as soon as a deletion hits its shard.

A trial draws deletions until no shard has a model; its count is the number of deletions
drawn, including any that hit an already deleted slice and the one that removed the last
model. `simulate_deletions` and `simulate_sisa_deletions` run many trials at once;
`expected_deletions` and `expected_sisa_deletions` give the exact expectations.

Why those are exact: a model's prefix is ≥ 1 exactly while the first slice of its order has
not been hit, so the last model goes when every (shard, first slice) pair in use has been hit
at least once: a coupon collector over those k targets. With a uniform prior each target is
hit with probability 1/(m·L) per deletion and the expectation is m·L·H_k (H_k the k-th
harmonic number); B orders with different first slices give k = m·B, and SISA's m shards,
each hit with probability 1/m, give m·H_m. For other priors, with target i hit with
probability q_i per deletion, the expectation is ∫_0^∞ (1 − Π_i (1 − e^{−q_i s})) ds (the
deletions as a rate-1 Poisson process, which hits target i at rate q_i independently of the
others), evaluated by quadrature.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import integrate

from jaxunlearn.errors import SettingsError
from jaxunlearn.unlearn._slice_orders import checked_count, normalized_probabilities

__all__ = [
    "DEFAULT_MAX_DELETIONS",
    "DeletionSimulation",
    "expected_deletions",
    "expected_sisa_deletions",
    "shard_orders",
    "simulate_deletions",
    "simulate_sisa_deletions",
    "slice_probabilities",
]

# A trial still running after this many deletions stops the simulation with an error: a prior
# that makes some model's first slice that rare would otherwise run for hours.
DEFAULT_MAX_DELETIONS = 1_000_000


class DeletionSimulation(NamedTuple):
    """The deletions absorbed per trial until no shard had a model left.

    Attributes:
        mean: The mean count over the trials.
        standard_error: The standard error of that mean (sample standard deviation / √trials).
        trials: The number of trials.
        counts: Each trial's count, an int64 array of shape (trials,).
    """

    mean: float
    standard_error: float
    trials: int
    counts: np.ndarray


def shard_orders(orders, /, *, num_shards: int) -> np.ndarray:
    """Every shard's orders as an int64 array of shape (m, B, L), checked.

    Args:
        orders: (B, L), the same B orders in every shard, or (m, B, L), each shard's own.
            Each row is a permutation of the slices 0..L − 1.
        num_shards: m ≥ 1.

    Raises:
        SettingsError: If the shape is not one of these or a row is not a permutation.
    """
    num_shards = checked_count(num_shards, "num_shards")
    array = np.asarray(orders)
    if array.ndim == 2:
        array = np.broadcast_to(array, (num_shards, *array.shape))
    if array.ndim != 3 or array.shape[0] != num_shards or 0 in array.shape:
        raise SettingsError(
            f"orders must have shape (budget, num_slices) or ({num_shards}, budget, "
            f"num_slices), got {np.shape(orders)}."
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise SettingsError(f"orders must hold slice numbers (integers), got {array.dtype}.")
    num_slices = array.shape[2]
    if not np.array_equal(
        np.sort(array, axis=2), np.broadcast_to(np.arange(num_slices), array.shape)
    ):
        raise SettingsError(
            f"Every order must be a permutation of the slices 0..{num_slices - 1}, got "
            f"{np.unique(array.reshape(-1, num_slices), axis=0).tolist()}."
        )
    return array.astype(np.int64)


def slice_probabilities(prior, /, *, num_shards: int, num_slices: int) -> np.ndarray | None:
    """The probability that a deletion hits each of the m·L slices, shape (m, L); None: uniform.

    Args:
        prior: None (every slice equally likely); L weights, one per slice, the same in every
            shard (each shard then gets 1/m of the deletions, split over its slices in
            proportion to the weights); or m × L weights, one per slice of every shard. The
            weights are relative: they are divided by their sum.
        num_shards: m.
        num_slices: L.

    Raises:
        SettingsError: If the weights are invalid (`normalized_probabilities`) or their shape is
            neither (L,) nor (m, L).
    """
    if prior is None:
        return None
    weights = normalized_probabilities(prior)
    if weights.shape == (num_slices,):
        return np.broadcast_to(weights / num_shards, (num_shards, num_slices)).copy()
    if weights.shape == (num_shards, num_slices):
        return weights
    raise SettingsError(
        f"The prior must give {num_slices} weights (one per slice of a shard) or "
        f"{num_shards} × {num_slices} (one per slice of every shard), got shape "
        f"{weights.shape}."
    )


def simulate_deletions(
    orders,
    /,
    *,
    num_shards: int,
    trials: int,
    seed,
    prior=None,
    max_deletions: int = DEFAULT_MAX_DELETIONS,
) -> DeletionSimulation:
    """S3T's deletion count per trial, all trials advanced together, one deletion per step.

    Args:
        orders: The slice orders of each shard's models: (B, L), shared by every shard, or
            (m, B, L) (`shard_orders`), 0-based slice numbers.
        num_shards: m.
        trials: The number of independent trials (≥ 2).
        seed: Seeds `numpy.random.default_rng` (an int, a sequence of ints, or a Generator,
            which is used and advanced as it is).
        prior: Where deletions fall (`slice_probabilities`); None: uniformly over the m·L
            slices.
        max_deletions: The longest trial allowed; one still running then raises.

    Returns:
        The counts and their mean with its standard error.

    Raises:
        SettingsError: If an argument is out of range, some model's first slice can never be
            deleted (its shard would keep a model forever), or a trial ran past
            `max_deletions`.
    """
    orders = shard_orders(orders, num_shards=num_shards)
    num_shards, budget, num_slices = orders.shape
    trials = _trials(trials)
    probabilities = slice_probabilities(prior, num_shards=num_shards, num_slices=num_slices)
    _check_targets_reachable(_first_slice_targets(orders), probabilities, num_slices)
    rng = np.random.default_rng(seed)
    draw = _sampler(probabilities, num_shards * num_slices)

    # positions[s, b, j]: the 1-based position of slice j in order b of shard s.
    positions = np.empty_like(orders)
    np.put_along_axis(positions, orders, np.arange(1, num_slices + 1), axis=2)
    prefix_dtype = np.int16 if num_slices < np.iinfo(np.int16).max else np.int64
    positions = positions.astype(prefix_dtype)

    counts = np.zeros(trials, dtype=np.int64)
    running = np.arange(trials)  # the trials that still have a model, in `prefix`'s row order
    prefix = np.full((trials, num_shards, budget), num_slices, dtype=prefix_dtype)
    deletions = 0
    while running.size:
        deletions += 1
        if deletions > max_deletions:
            raise _too_long(max_deletions, running.size, trials)
        shard, slice_ = np.divmod(draw(rng, running.size), num_slices)
        rows = np.arange(running.size)
        prefix[rows, shard] = np.minimum(prefix[rows, shard], positions[shard, :, slice_] - 1)
        counts[running] += 1
        has_model = (prefix > 0).any(axis=(1, 2))
        if not has_model.all():
            running, prefix = running[has_model], prefix[has_model]
    return _summary(counts)


def simulate_sisa_deletions(
    num_shards: int,
    /,
    *,
    trials: int,
    seed,
    prior=None,
    max_deletions: int = DEFAULT_MAX_DELETIONS,
) -> DeletionSimulation:
    """SISA's deletion count per trial: one model per shard, gone once its shard is hit.

    Args:
        num_shards: m.
        trials: The number of independent trials (≥ 2).
        seed: Seeds `numpy.random.default_rng`, as for `simulate_deletions`.
        prior: Where deletions fall: None (uniformly over the slices, so each shard gets 1/m),
            or per-slice weights of shape (L,) or (m, L) as for `slice_probabilities`; only
            each shard's total matters.
        max_deletions: The longest trial allowed; one still running then raises.

    Raises:
        SettingsError: If an argument is out of range, a shard can never be hit, or a trial
            ran past `max_deletions`.
    """
    return simulate_deletions(
        _SISA_ORDERS,
        num_shards=num_shards,
        trials=trials,
        seed=seed,
        prior=_sisa_prior(prior, num_shards),
        max_deletions=max_deletions,
    )


def expected_deletions(orders, /, *, num_shards: int, prior=None) -> float:
    """The exact expected S3T deletion count (the module docstring says why it is exact).

    With a uniform prior this is the closed form m·L·H_k, k the number of (shard, first slice)
    pairs among the orders: m·L·H_{m·B} for B orders that start with different slices, such as
    `cyclic_orders` and `prior_aware_orders`. With a prior it is the coupon collector's
    integral over those k targets.

    Args:
        orders: (B, L) or (m, B, L) slice orders, as for `simulate_deletions`.
        num_shards: m.
        prior: As for `simulate_deletions`.

    Raises:
        SettingsError: If the orders or prior are invalid, or some model's first slice can
            never be deleted (the expectation is infinite).
    """
    orders = shard_orders(orders, num_shards=num_shards)
    num_shards, _, num_slices = orders.shape
    probabilities = slice_probabilities(prior, num_shards=num_shards, num_slices=num_slices)
    targets = _first_slice_targets(orders)
    _check_targets_reachable(targets, probabilities, num_slices)
    if probabilities is None:
        return num_shards * num_slices * _harmonic(targets.size)
    return _expected_draws_to_hit_all(probabilities.reshape(-1)[targets])


def expected_sisa_deletions(num_shards: int, /, *, prior=None) -> float:
    """The exact expected SISA deletion count: m·H_m when every shard is equally likely.

    Args:
        num_shards: m.
        prior: As for `simulate_sisa_deletions`.

    Raises:
        SettingsError: If the prior is invalid or gives some shard no deletions.
    """
    return expected_deletions(
        _SISA_ORDERS, num_shards=num_shards, prior=_sisa_prior(prior, num_shards)
    )


def _first_slice_targets(orders: np.ndarray) -> np.ndarray:
    """The distinct (shard, first slice) pairs as flat slice indices s·L + j."""
    num_shards, _, num_slices = orders.shape
    flat = np.arange(num_shards)[:, None] * num_slices + orders[:, :, 0]
    return np.unique(flat)


def _check_targets_reachable(targets, probabilities, num_slices: int) -> None:
    if probabilities is None:
        return
    never = [int(t) for t in targets if probabilities.reshape(-1)[t] <= 0]
    if never:
        shard, slice_ = divmod(never[0], num_slices)
        raise SettingsError(
            f"Slice {slice_} of shard {shard} starts an order but has deletion probability 0: "
            "that model is never lost, so the count is unbounded."
        )


# SISA's shard is S3T's shard of one slice and one order: any hit takes its model to 0.
_SISA_ORDERS = np.zeros((1, 1), np.int64)


def _sisa_prior(prior, num_shards: int) -> np.ndarray | None:
    """Each shard's share of the deletions as the (m, 1) prior of `_SISA_ORDERS`; None:
    uniform. Only a shard's total matters to SISA."""
    num_shards = checked_count(num_shards, "num_shards")
    if prior is None:
        return None
    weights = normalized_probabilities(prior)
    if weights.ndim == 1:
        return None  # the same weights in every shard: each shard gets 1/m
    if weights.ndim != 2 or weights.shape[0] != num_shards:
        raise SettingsError(
            f"The prior must give one weight per slice of a shard (L,) or per slice of every "
            f"shard ({num_shards}, L), got shape {weights.shape}."
        )
    shares = weights.sum(axis=1)
    if np.any(shares <= 0):
        raise SettingsError(
            "The prior gives some shard no deletions at all: its model is never lost and the "
            "count is unbounded."
        )
    return shares[:, None]


def _sampler(probabilities, size: int):
    """draw(rng, n): n indices in [0, size), uniform when `probabilities` is None."""
    if probabilities is None:
        return lambda rng, n: rng.integers(size, size=n)
    flat = np.asarray(probabilities, np.float64).reshape(-1)
    cdf = np.cumsum(flat)
    # Rounding must not leave a gap above the last cdf value for a uniform draw to fall into
    # (which would pick a slice of probability 0).
    cdf[np.flatnonzero(flat > 0)[-1] :] = 1.0
    return lambda rng, n: np.searchsorted(cdf, rng.random(n), side="right")


def _expected_draws_to_hit_all(probabilities: np.ndarray) -> float:
    """E[draws until each of k targets was hit], target i hit with probability q_i per draw."""
    q = np.asarray(probabilities, np.float64)
    if np.all(q == q[0]):
        return _harmonic(q.size) / q[0]

    def none_missing_complement(s: float) -> float:
        # 1 − Π_i (1 − e^{−q_i s}), in logs so that neither end loses its digits.
        x = q * s
        logs = np.where(x > math.log(2), np.log1p(-np.exp(-x)), np.log(-np.expm1(-x)))
        return float(-np.expm1(logs.sum()))

    # Past H_k / q_min nearly every target has been hit; split there so quadrature sees both
    # the plateau at 1 and the exponential tail.
    knee = _harmonic(q.size) / q.min()
    head, _ = integrate.quad(none_missing_complement, 0.0, knee, epsabs=0, epsrel=1e-11, limit=400)
    tail, _ = integrate.quad(
        none_missing_complement, knee, np.inf, epsabs=0, epsrel=1e-11, limit=400
    )
    return head + tail


def _harmonic(k: int) -> float:
    return math.fsum(1.0 / i for i in range(1, k + 1))


def _summary(counts: np.ndarray) -> DeletionSimulation:
    return DeletionSimulation(
        mean=float(counts.mean()),
        standard_error=float(counts.std(ddof=1) / math.sqrt(counts.size)),
        trials=int(counts.size),
        counts=counts,
    )


def _too_long(max_deletions: int, running: int, trials: int) -> SettingsError:
    return SettingsError(
        f"{running} of {trials} trials still had a model after {max_deletions} deletions: the "
        "prior makes some model's first slice too rare to simulate (raise max_deletions, or "
        "use the exact expectation)."
    )


def _trials(trials) -> int:
    trials = checked_count(trials, "trials")
    if trials < 2:
        raise SettingsError(f"trials must be ≥ 2 (a standard error needs two), got {trials}.")
    return trials
