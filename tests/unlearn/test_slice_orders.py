"""S3T's slice orders: cyclic rotations and the prior-aware bipartite-matching selection."""

import itertools
import math

import numpy as np
import pytest

from jaxunlearn.errors import SettingsError
from jaxunlearn.unlearn import cyclic_orders, prior_aware_orders


def score(order, probabilities, sharpness=100.0):
    """Σ_n n·(1 − c_n)^t, written out term by term."""
    total, cumulative = 0.0, 0.0
    for n, slice_ in enumerate(order, start=1):
        cumulative += probabilities[slice_]
        total += n * max(0.0, 1.0 - cumulative) ** sharpness
    return total


def assert_latin_rows(orders, num_slices):
    """Every row is a permutation of 0..L−1, and no slice appears twice at one position."""
    orders = np.asarray(orders)
    for order in orders:
        assert sorted(order.tolist()) == list(range(num_slices))
    for position in range(num_slices):
        column = orders[:, position].tolist()
        assert len(set(column)) == len(column), f"position {position + 1} repeats: {column}"


@pytest.mark.parametrize("num_slices", [1, 2, 5, 6])
def test_cyclic_orders_are_the_first_right_rotations(num_slices):
    for budget in range(1, num_slices + 1):
        orders = cyclic_orders(num_slices, budget)
        assert orders.shape == (budget, num_slices)
        assert_latin_rows(orders, num_slices)
        for shift, order in enumerate(orders):
            # Rotating right by one moves the last slice to the front.
            expected = list(range(num_slices))
            for _ in range(shift):
                expected = expected[-1:] + expected[:-1]
            assert order.tolist() == expected


def test_cyclic_orders_spelled_out():
    assert cyclic_orders(4, 4).tolist() == [[0, 1, 2, 3], [3, 0, 1, 2], [2, 3, 0, 1], [1, 2, 3, 0]]


@pytest.mark.parametrize(
    ("num_slices", "budget", "words"),
    [(6, 7, "exceeds the 6 slices"), (6, 0, "≥ 1"), (0, 1, "≥ 1"), (6, 2.0, "integer")],
)
def test_cyclic_orders_refuse_bad_settings(num_slices, budget, words):
    with pytest.raises(SettingsError, match=words):
        cyclic_orders(num_slices, budget)


GEOMETRIC = 0.5 ** np.arange(6)  # slice j is deleted from with probability ∝ 2^−j


@pytest.mark.parametrize("budget", [1, 2, 3, 6])
def test_prior_aware_orders_start_with_the_least_deleted_slices(budget):
    orders = prior_aware_orders(GEOMETRIC, budget)
    assert orders.shape == (budget, 6)
    assert_latin_rows(orders, 6)
    # The slices least likely to be deleted are the last ones.
    assert sorted(orders[:, 0].tolist()) == list(range(6 - budget, 6))


def test_prior_aware_orders_are_a_latin_square_kept_by_score():
    rng = np.random.default_rng(3)
    probabilities = rng.dirichlet(np.ones(5))
    square = prior_aware_orders(probabilities, 5)
    assert_latin_rows(square, 5)
    scores = [score(order, probabilities) for order in square]
    assert scores == sorted(scores, reverse=True)
    for budget in range(1, 5):
        np.testing.assert_array_equal(prior_aware_orders(probabilities, budget), square[:budget])


@pytest.mark.parametrize("sharpness", [100.0, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_position_is_a_maximum_weight_matching(seed, sharpness):
    """Checked by brute force over every assignment of unused slices to the partial orders."""
    num_slices = 5
    probabilities = np.random.default_rng(seed).dirichlet(np.ones(num_slices))
    square = prior_aware_orders(probabilities, num_slices, sharpness=sharpness)
    for position in range(1, num_slices):
        prefixes = [order[:position].tolist() for order in square]
        chosen = sum(
            score([*prefix, order[position]], probabilities, sharpness)
            for prefix, order in zip(prefixes, square, strict=True)
        )
        best = -math.inf
        for assignment in itertools.permutations(range(num_slices)):
            if any(slice_ in prefix for slice_, prefix in zip(assignment, prefixes, strict=True)):
                continue
            total = sum(
                score([*prefix, slice_], probabilities, sharpness)
                for slice_, prefix in zip(assignment, prefixes, strict=True)
            )
            best = max(best, total)
        assert chosen == pytest.approx(best, rel=1e-12, abs=1e-300)


def test_prior_aware_orders_take_relative_weights_and_are_deterministic():
    weights = np.array([8.0, 4.0, 2.0, 1.0, 1.0, 3.0])
    orders = prior_aware_orders(weights, 4)
    np.testing.assert_array_equal(orders, prior_aware_orders(weights / weights.sum(), 4))
    np.testing.assert_array_equal(orders, prior_aware_orders(weights * 7, 4))
    np.testing.assert_array_equal(orders, prior_aware_orders(list(weights), 4))


def test_prior_aware_orders_with_equal_weights_are_a_latin_square():
    assert_latin_rows(prior_aware_orders(np.ones(6), 6), 6)


@pytest.mark.parametrize(
    ("weights", "budget", "options", "words"),
    [
        ([0.5, -0.1, 0.6], 1, {}, "≥ 0"),
        ([0.5, np.nan, 0.5], 1, {}, "finite"),
        ([0.5, np.inf, 0.5], 1, {}, "finite"),
        ([0.0, 0.0], 1, {}, "all 0"),
        ([], 1, {}, "none given"),
        ([[0.5, 0.5], [0.5, 0.5]], 1, {}, "flat list"),
        ([0.5, 0.3, 0.2], 4, {}, "exceeds the 3 slices"),
        ([0.5, 0.3, 0.2], 0, {}, "≥ 1"),
        ([0.5, 0.3, 0.2], 1, {"sharpness": 0.0}, "sharpness"),
        ([0.5, 0.3, 0.2], 1, {"sharpness": np.nan}, "sharpness"),
    ],
)
def test_prior_aware_orders_refuse_bad_input(weights, budget, options, words):
    with pytest.raises(SettingsError, match=words):
        prior_aware_orders(weights, budget, **options)
