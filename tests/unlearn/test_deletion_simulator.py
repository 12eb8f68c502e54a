"""The deletion-rate simulator against a literal one-trial-at-a-time Monte Carlo and exact values.

Every comparison of two estimates allows ±5% and, more tightly, four combined standard errors.
The seeds are fixed, so each comparison either always passes or always fails.
"""

import functools
import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from jaxunlearn.errors import SettingsError
from jaxunlearn.unlearn import (
    DeletionSimulation,
    cyclic_orders,
    expected_deletions,
    expected_sisa_deletions,
    prior_aware_orders,
    simulate_deletions,
    simulate_sisa_deletions,
)

SHARDS, SLICES = 5, 6
SIMULATED_TRIALS = 20_000
NAIVE_TRIALS = 3_000


def naive_s3t_count(orders, num_shards, num_slices, rng, cumulative_weights=None):
    """One trial by the rules, one deletion at a time.

    Every shard holds a copy of `orders`, each model with its prefix (L at first). A deletion
    picks one of the m·L slices; in its shard every model falls back to min(prefix, p − 1),
    p the 1-based position of the slice in the model's order. The trial ends when no shard has
    a model with prefix ≥ 1, and counts every deletion drawn.
    """
    orders = [list(order) for order in orders]
    prefixes = [[num_slices] * len(orders) for _ in range(num_shards)]
    shards_with_a_model = set(range(num_shards))
    deletions = 0
    while shards_with_a_model:
        if cumulative_weights is None:
            deleted = rng.randrange(num_shards * num_slices)
        else:
            deleted = rng.choices(range(num_shards * num_slices), cum_weights=cumulative_weights)[0]
        deletions += 1
        shard, slice_ = divmod(deleted, num_slices)
        for model, order in enumerate(orders):
            position = order.index(slice_) + 1
            prefixes[shard][model] = min(prefixes[shard][model], position - 1)
        if all(prefix < 1 for prefix in prefixes[shard]):
            shards_with_a_model.discard(shard)
    return deletions


def naive_sisa_count(num_shards, num_slices, rng):
    """One SISA trial: a shard's one model is gone once any deletion hits the shard."""
    shards_with_a_model = set(range(num_shards))
    deletions = 0
    while shards_with_a_model:
        deletions += 1
        shards_with_a_model.discard(rng.randrange(num_shards * num_slices) // num_slices)
    return deletions


def mean_and_error(counts):
    counts = np.asarray(counts, np.float64)
    return counts.mean(), counts.std(ddof=1) / math.sqrt(counts.size)


def harmonic(k):
    return float(sum(Fraction(1, i) for i in range(1, k + 1)))


def assert_agree(mean, error, reference, reference_error=0.0):
    assert abs(mean - reference) <= 0.05 * reference
    assert abs(mean - reference) <= 4 * math.hypot(error, reference_error)


@pytest.mark.parametrize("budget", [1, 2, 3, 6])
def test_cyclic_s3t_agrees_with_naive_monte_carlo_and_the_coupon_collector(budget):
    orders = cyclic_orders(SLICES, budget)
    simulated = simulate_deletions(orders, num_shards=SHARDS, trials=SIMULATED_TRIALS, seed=11)
    rng = random.Random(1000 + budget)
    naive = [naive_s3t_count(orders.tolist(), SHARDS, SLICES, rng) for _ in range(NAIVE_TRIALS)]
    naive_mean, naive_error = mean_and_error(naive)
    # The shard dies when its B first slices have all been hit: m·B targets among m·L slices.
    closed_form = SHARDS * SLICES * harmonic(SHARDS * budget)

    assert_agree(simulated.mean, simulated.standard_error, naive_mean, naive_error)
    assert_agree(simulated.mean, simulated.standard_error, closed_form)
    assert_agree(naive_mean, naive_error, closed_form)
    assert expected_deletions(orders, num_shards=SHARDS) == pytest.approx(closed_form, rel=1e-12)
    # Every one of the m·B first slices had to be hit at least once.
    assert simulated.counts.min() >= SHARDS * budget


def test_sisa_agrees_with_naive_monte_carlo_and_m_h_m():
    simulated = simulate_sisa_deletions(SHARDS, trials=SIMULATED_TRIALS, seed=12)
    rng = random.Random(7)
    naive_mean, naive_error = mean_and_error(
        [naive_sisa_count(SHARDS, SLICES, rng) for _ in range(NAIVE_TRIALS)]
    )
    closed_form = SHARDS * harmonic(SHARDS)  # ≈ 11.42 for five shards

    assert_agree(simulated.mean, simulated.standard_error, naive_mean, naive_error)
    assert_agree(simulated.mean, simulated.standard_error, closed_form)
    assert expected_sisa_deletions(SHARDS) == pytest.approx(closed_form, rel=1e-12)
    assert simulated.counts.min() >= SHARDS


def test_the_result_record_describes_its_counts():
    result = simulate_deletions(cyclic_orders(4, 2), num_shards=3, trials=500, seed=0)
    assert isinstance(result, DeletionSimulation)
    assert result.trials == 500
    assert result.counts.shape == (500,)
    assert result.counts.dtype == np.int64
    mean, error = mean_and_error(result.counts)
    assert result.mean == pytest.approx(mean)
    assert result.standard_error == pytest.approx(error)


def test_a_seed_fixes_the_counts_and_another_changes_them():
    orders = cyclic_orders(SLICES, 2)
    first = simulate_deletions(orders, num_shards=SHARDS, trials=300, seed=5)
    again = simulate_deletions(orders, num_shards=SHARDS, trials=300, seed=5)
    other = simulate_deletions(orders, num_shards=SHARDS, trials=300, seed=6)
    np.testing.assert_array_equal(first.counts, again.counts)
    assert not np.array_equal(first.counts, other.counts)
    from_generator = simulate_deletions(
        orders, num_shards=SHARDS, trials=300, seed=np.random.default_rng(5)
    )
    np.testing.assert_array_equal(first.counts, from_generator.counts)
    np.testing.assert_array_equal(
        simulate_sisa_deletions(SHARDS, trials=300, seed=5).counts,
        simulate_sisa_deletions(SHARDS, trials=300, seed=5).counts,
    )


# The skewed prior of the comparison: within every shard, slice j takes a share ∝ 2^−j of the
# deletions (slice 0 about half of them, slice 5 one in 63), the shards equally often.
GEOMETRIC = 0.5 ** np.arange(SLICES)


def exact_by_subsets(target_probabilities):
    """E[draws until every target is hit], from the absorbing chain over the unhit targets."""

    @functools.cache
    def remaining(unhit):
        if not unhit:
            return 0.0
        rate = sum(target_probabilities[i] for i in unhit)
        after = sum(target_probabilities[i] * remaining(unhit - {i}) for i in unhit)
        return (1.0 + after) / rate

    return remaining(frozenset(range(len(target_probabilities))))


def first_slice_probabilities(orders):
    firsts = sorted({int(order[0]) for order in orders})
    shares = GEOMETRIC / GEOMETRIC.sum() / SHARDS
    return [shares[slice_] for _ in range(SHARDS) for slice_ in firsts]


@pytest.mark.parametrize("budget", [1, 2])
def test_prior_aware_orders_absorb_more_deletions_than_cyclic_under_a_skewed_prior(budget):
    results = {}
    for name, orders in (
        ("cyclic", cyclic_orders(SLICES, budget)),
        ("prior-aware", prior_aware_orders(GEOMETRIC, budget)),
    ):
        simulated = simulate_deletions(
            orders, num_shards=SHARDS, trials=5_000, seed=21, prior=GEOMETRIC
        )
        exact = expected_deletions(orders, num_shards=SHARDS, prior=GEOMETRIC)
        assert exact == pytest.approx(exact_by_subsets(first_slice_probabilities(orders)))
        assert_agree(simulated.mean, simulated.standard_error, exact)
        results[name] = simulated
    cyclic, prior_aware = results["cyclic"], results["prior-aware"]
    gap = prior_aware.mean - cyclic.mean
    assert gap > 3 * math.hypot(cyclic.standard_error, prior_aware.standard_error)


def test_the_simulator_follows_a_prior_as_the_naive_monte_carlo_does():
    orders = prior_aware_orders(GEOMETRIC, 2)
    simulated = simulate_deletions(
        orders, num_shards=SHARDS, trials=5_000, seed=22, prior=GEOMETRIC
    )
    weights = np.tile(GEOMETRIC, SHARDS).tolist()
    rng = random.Random(23)
    naive_mean, naive_error = mean_and_error(
        [
            naive_s3t_count(
                orders.tolist(), SHARDS, SLICES, rng, list(itertools.accumulate(weights))
            )
            for _ in range(1_000)
        ]
    )
    assert_agree(simulated.mean, simulated.standard_error, naive_mean, naive_error)


def test_with_every_slice_first_the_selection_does_not_matter():
    cyclic = expected_deletions(cyclic_orders(SLICES, SLICES), num_shards=SHARDS, prior=GEOMETRIC)
    aware = expected_deletions(
        prior_aware_orders(GEOMETRIC, SLICES), num_shards=SHARDS, prior=GEOMETRIC
    )
    assert cyclic == pytest.approx(aware, rel=1e-12)


def test_exact_values_match_small_chains():
    # One shard, targets 0 and 1 (the first slices), hit with probabilities a and b per draw.
    a, b = 0.5, 0.3
    two_orders = np.array([[0, 1, 2], [1, 2, 0]])
    chain = 1 / (a + b) + (a / (a + b)) / b + (b / (a + b)) / a
    assert expected_deletions(two_orders, num_shards=1, prior=[a, b, 0.2]) == pytest.approx(chain)
    # A per-shard prior: shard 0 gets 3/4 of SISA's deletions, shard 1 a quarter.
    per_shard = [[0.5, 0.25], [0.125, 0.125]]
    assert expected_sisa_deletions(2, prior=per_shard) == pytest.approx(
        exact_by_subsets([0.75, 0.25])
    )
    simulated = simulate_sisa_deletions(2, trials=20_000, seed=3, prior=per_shard)
    assert_agree(simulated.mean, simulated.standard_error, exact_by_subsets([0.75, 0.25]))


def test_per_shard_orders_and_priors():
    orders = np.stack([cyclic_orders(3, 2), cyclic_orders(3, 2)[:, ::-1]])  # (2, 2, 3)
    prior = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]
    simulated = simulate_deletions(orders, num_shards=2, trials=20_000, seed=4, prior=prior)
    total = 12.0
    # Shard 0 starts with slices 0 and 2, shard 1 (reversed orders) with 2 and 1.
    targets = [1 / total, 3 / total, 1 / total, 2 / total]
    exact = exact_by_subsets(targets)
    assert expected_deletions(orders, num_shards=2, prior=prior) == pytest.approx(exact)
    assert_agree(simulated.mean, simulated.standard_error, exact)


@pytest.mark.parametrize(
    ("orders", "options", "words"),
    [
        ([[0, 1, 1]], {}, "permutation"),
        ([[0, 1, 3]], {}, "permutation"),
        ([[0.0, 1.0, 2.0]], {}, "integers"),
        ([0, 1, 2], {}, "shape"),
        (np.zeros((3, 1, 3), int), {}, "shape"),
        ([[0, 1, 2]], {"trials": 1}, "trials"),
        ([[0, 1, 2]], {"num_shards": 0}, "num_shards"),
        ([[0, 1, 2]], {"prior": [1.0, 1.0]}, "prior"),
        ([[0, 1, 2]], {"prior": [-1.0, 1.0, 1.0]}, "≥ 0"),
        ([[0, 1, 2]], {"prior": [0.0, 1.0, 1.0]}, "never lost"),
    ],
)
def test_the_simulator_refuses_bad_input(orders, options, words):
    settings = {"num_shards": 2, "trials": 10, "seed": 0, **options}
    with pytest.raises(SettingsError, match=words):
        simulate_deletions(orders, **settings)


def test_a_trial_past_max_deletions_stops_with_an_error():
    with pytest.raises(SettingsError, match="after 5 deletions"):
        simulate_deletions(
            cyclic_orders(SLICES, SLICES), num_shards=SHARDS, trials=10, seed=0, max_deletions=5
        )
    with pytest.raises(SettingsError, match="no deletions"):
        simulate_sisa_deletions(2, trials=10, seed=0, prior=[[1.0, 1.0], [0.0, 0.0]])
