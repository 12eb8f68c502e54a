"""Membership inference: how well per-example scores separate training members from the rest.

Scores are member-high (a member should score higher) and AUCs use label 1 for members
(metrics.md). For unlearning, members are the forget set and non-members held-out examples of
the same distribution; the target is the retrained model's AUC, not 0.5.
"""

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from jaxunlearn.eval._scores import ExampleScores

# The attacks `membership_inference` runs, each a member-high score of an example.
ATTACKS = ("loss", "min_k", "min_k_plus_plus")


class MIAResult(NamedTuple):
    """One attack's success.

    Attributes:
        auc: The ROC AUC (Mann-Whitney: ties count ½).
        tpr_at_1pct_fpr: The largest true-positive rate at a false-positive rate ≤ 1%.
        tpr_at_01pct_fpr: The same at a false-positive rate ≤ 0.1%.
    """

    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float


def attack_scores(scores: ExampleScores, /) -> dict[str, np.ndarray]:
    """The member-high score of every attack in `ATTACKS`, per example.

    LOSS is −ℓ; Min-K% and Min-K%++ are mean log-probability scores, already member-high.
    """
    return {
        "loss": -np.asarray(scores.losses, np.float64),
        "min_k": np.asarray(scores.min_k, np.float64),
        "min_k_plus_plus": np.asarray(scores.min_k_plus_plus, np.float64),
    }


def mia_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """The ROC AUC of member-high scores, members labelled 1 (`sklearn.metrics.roc_auc_score`).

    It is the probability that a random member outscores a random non-member, ties counting ½.

    Raises:
        ValueError: If either side is empty or a score is not finite.
    """
    labels, scores = _labelled(member_scores, nonmember_scores)
    from sklearn import metrics  # here: importing scikit-learn takes seconds

    return float(metrics.roc_auc_score(labels, scores))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float:
    """The largest true-positive rate among thresholds whose false-positive rate is ≤ `fpr`.

    Uses `sklearn.metrics.roc_curve` over every threshold. With n non-members the attainable
    false-positive rates are multiples of 1/n, so a `fpr` below 1/n asks for no false positive.

    Raises:
        ValueError: If `fpr` is outside [0, 1], either side is empty or a score is not finite.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr!r}.")
    from sklearn import metrics

    labels, scores = _labelled(member_scores, nonmember_scores)
    false_positive_rates, true_positive_rates, _ = metrics.roc_curve(
        labels, scores, drop_intermediate=False
    )
    # The curve starts at (0, 0), so some threshold always qualifies.
    return float(np.max(true_positive_rates[false_positive_rates <= fpr]))


def membership_inference(
    member: ExampleScores, nonmember: ExampleScores, /
) -> dict[str, MIAResult]:
    """Runs every attack in `ATTACKS` on members against non-members.

    Args:
        member: Scores of the members (for unlearning: the forget set).
        nonmember: Scores of the non-members, from the same model.

    Returns:
        A `MIAResult` per attack name, in the order of `ATTACKS`.

    Raises:
        ValueError: If either side is empty or an attack's scores are not finite (naming it).
    """
    member_by_attack = attack_scores(member)
    nonmember_by_attack = attack_scores(nonmember)
    results = {}
    for attack in ATTACKS:
        try:
            results[attack] = _attack_result(member_by_attack[attack], nonmember_by_attack[attack])
        except ValueError as error:
            raise ValueError(f"Attack {attack!r}: {error}") from None
    return results


def _attack_result(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> MIAResult:
    return MIAResult(
        auc=mia_auc(member_scores, nonmember_scores),
        tpr_at_1pct_fpr=tpr_at_fpr(member_scores, nonmember_scores, 0.01),
        tpr_at_01pct_fpr=tpr_at_fpr(member_scores, nonmember_scores, 0.001),
    )


def _labelled(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) with members labelled 1, after checking both sides."""
    sides: Mapping[str, np.ndarray] = {
        "member": np.asarray(member_scores, np.float64).reshape(-1),
        "non-member": np.asarray(nonmember_scores, np.float64).reshape(-1),
    }
    for name, side in sides.items():
        if side.size == 0:
            raise ValueError(f"No {name} scores: an AUC needs both members and non-members.")
        bad = np.flatnonzero(~np.isfinite(side))
        if bad.size:
            raise ValueError(
                f"{bad.size} {name} scores are not finite (first at position {bad[0]}: "
                f"{side[bad[0]]})."
            )
    members, nonmembers = sides["member"], sides["non-member"]
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return labels, np.concatenate([members, nonmembers])
