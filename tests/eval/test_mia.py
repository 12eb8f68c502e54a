"""Membership-inference AUC and TPR at low FPR, against hand counts."""

import itertools

import numpy as np
import pytest

from jaxunlearn.eval import (
    ATTACKS,
    ExampleScores,
    MIAResult,
    attack_scores,
    membership_inference,
    mia_auc,
    tpr_at_fpr,
)


def _mann_whitney(members, nonmembers) -> float:
    wins = sum(
        1.0 if m > n else 0.5 if m == n else 0.0 for m, n in itertools.product(members, nonmembers)
    )
    return wins / (len(members) * len(nonmembers))


def test_auc_is_the_mann_whitney_count_with_ties_as_half():
    members = [0.9, 0.5, 0.5, 0.2]
    nonmembers = [0.5, 0.1, 0.3]
    # Wins: 0.9 beats 3; each 0.5 ties one and beats two (2.5 each); 0.2 beats one: 9/12.
    assert mia_auc(members, nonmembers) == pytest.approx(9 / 12)
    assert mia_auc(members, nonmembers) == pytest.approx(_mann_whitney(members, nonmembers))
    rng = np.random.default_rng(0)
    members, nonmembers = rng.integers(0, 5, 30), rng.integers(0, 5, 20)  # many ties
    assert mia_auc(members, nonmembers) == pytest.approx(_mann_whitney(members, nonmembers))


def test_auc_extremes():
    assert mia_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert mia_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert mia_auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5


def test_tpr_at_fpr_on_a_constructed_example():
    members = np.array([10.0, 9.0, 8.0, 4.0, 3.0])
    nonmembers = np.array([8.5, 5.0, 2.0, 1.0])
    # No false positive: thresholds above 8.5 admit members 10, 9 → TPR 2/5.
    assert tpr_at_fpr(members, nonmembers, 0.0) == pytest.approx(2 / 5)
    assert tpr_at_fpr(members, nonmembers, 0.2) == pytest.approx(2 / 5)
    # One false positive (8.5) allowed: down to 5.0 exclusive → 10, 9, 8 → 3/5.
    assert tpr_at_fpr(members, nonmembers, 0.25) == pytest.approx(3 / 5)
    # Two (8.5, 5.0): down to 2.0 exclusive → all five members.
    assert tpr_at_fpr(members, nonmembers, 0.5) == 1.0
    with pytest.raises(ValueError, match="fpr must be"):
        tpr_at_fpr(members, nonmembers, 1.5)


@pytest.mark.parametrize("function", [mia_auc, lambda m, n: tpr_at_fpr(m, n, 0.01)])
def test_attacks_reject_empty_or_non_finite_scores(function):
    with pytest.raises(ValueError, match="No member"):
        function([], [1.0])
    with pytest.raises(ValueError, match="No non-member"):
        function([1.0], [])
    with pytest.raises(ValueError, match="not finite"):
        function([1.0, np.nan], [0.0])
    with pytest.raises(ValueError, match="non-member scores are not finite"):
        function([1.0], [np.inf])


def _scores(losses, min_k, min_k_plus_plus) -> ExampleScores:
    n = len(losses)
    return ExampleScores(
        [f"x{i}" for i in range(n)],
        np.asarray(losses, float),
        np.full(n, 5),
        np.asarray(min_k, float),
        np.asarray(min_k_plus_plus, float),
    )


def test_membership_inference_runs_every_attack_member_high():
    # Members have lower loss (LOSS attack wins), lower Min-K% (loses) and tied Min-K%++.
    member = _scores([1.0, 1.5], [-4.0, -3.0], [0.0, 0.0])
    nonmember = _scores([2.0, 2.5, 3.0], [-2.0, -1.0, -0.5], [0.0, 0.0, 0.0])
    results = membership_inference(member, nonmember)
    assert tuple(results) == ATTACKS
    assert results["loss"] == MIAResult(auc=1.0, tpr_at_1pct_fpr=1.0, tpr_at_01pct_fpr=1.0)
    assert results["min_k"] == MIAResult(auc=0.0, tpr_at_1pct_fpr=0.0, tpr_at_01pct_fpr=0.0)
    assert results["min_k_plus_plus"].auc == 0.5
    np.testing.assert_array_equal(attack_scores(member)["loss"], [-1.0, -1.5])


def test_membership_inference_names_the_attack_with_bad_scores():
    member = _scores([1.0], [-1.0], [np.nan])
    with pytest.raises(ValueError, match="min_k_plus_plus"):
        membership_inference(member, _scores([2.0], [-2.0], [0.0]))
