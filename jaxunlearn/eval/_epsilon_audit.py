"""An empirical lower bound on ε from one distinguisher score per trained model.

An unlearning method is (ε, δ)-indistinguishable from retraining when, for every set S of
models, Pr[unlearned ∈ S] ≤ e^ε Pr[retrained ∈ S] + δ and the same with the two swapped (the
definition is symmetric, as differential privacy is over neighbouring datasets). Any test that
calls a model "unlearned" when its score passes a threshold then obeys

    1 − δ − FPR ≤ e^ε FNR    and    1 − δ − FNR ≤ e^ε FPR,

so rates measured on K unlearned models (the positives) and K' retrained ones (the negatives),
one independent training run each, bound ε from below. The rates are replaced by one-sided
Clopper-Pearson upper bounds that hold jointly, so the bound is valid at confidence 1 − α
(the recipe of Jagielski et al., arXiv:2006.07709). It says how unlearned the method is *not*:
a small bound proves nothing about privacy, and `largest_attainable` tells whether K was too
small for the audit to show more.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from matplotlib.figure import Figure
from scipy import special

from jaxunlearn.errors import UserError
from jaxunlearn.eval._plots import save_figure
from jaxunlearn.eval._tables import markdown_table

__all__ = [
    "AUDIT_DIRECTIONS",
    "AuditError",
    "EpsilonAudit",
    "choose_threshold",
    "clopper_pearson_upper",
    "epsilon_lower_bound",
    "write_audit_report",
]

# "high": a model is called unlearned (positive) when its score is ≥ the threshold; "low": ≤.
AUDIT_DIRECTIONS = ("high", "low")


class AuditError(UserError, ValueError):
    """Scores or settings an ε audit cannot use (empty, not finite, out of range, ...)."""


def clopper_pearson_upper(failures: int, trials: int, *, alpha: float) -> float:
    """The one-sided Clopper-Pearson upper confidence bound of a binomial proportion.

    With probability at least 1 − `alpha` over the trials, the true proportion is at most this.

    Args:
        failures: The number of trials that came out as the counted outcome, in [0, trials].
        trials: The number of independent trials, at least 1.
        alpha: The probability the bound may fail, in (0, 1).

    Returns:
        The `1 − alpha` quantile of Beta(failures + 1, trials − failures); exactly 1.0 when
        every trial failed (the Beta is then degenerate).

    Raises:
        AuditError: If a count is not an integer or out of range, or `alpha` is not in (0, 1).
    """
    for name, value in (("failures", failures), ("trials", trials)):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise AuditError(f"{name} must be an integer, got {value!r}.")
    if trials < 1:
        raise AuditError(f"trials must be at least 1, got {trials}.")
    if not 0 <= failures <= trials:
        raise AuditError(f"failures must be in [0, trials={trials}], got {failures}.")
    _check_alpha(alpha)
    return float(_upper_bounds(np.array([int(failures)]), int(trials), alpha)[0])


@dataclass(frozen=True)
class EpsilonAudit:
    """The result of an ε audit.

    Attributes:
        epsilon: The lower bound on ε, ≥ 0, valid at confidence 1 − `alpha`.
        alpha: The probability the bound may overstate ε.
        delta: The δ the bound is for.
        positives: The number of positive scores (unlearned models).
        negatives: The number of negative scores (retrained models).
        threshold: The threshold of the test that gave the bound; None when no test gave a
            bound above 0.
        direction: That test's direction, one of `AUDIT_DIRECTIONS`, or None with `threshold`.
        false_positive_rate: The share of negatives that test called positive (None with it).
        false_negative_rate: The share of positives that test called negative (None with it).
        fpr_upper: The Clopper-Pearson upper bound of the false-positive rate used.
        fnr_upper: The same for the false-negative rate.
        thresholds_examined: The number of (threshold, direction) tests the confidence was
            split over.
        largest_attainable: The bound these counts would give had the test separated the two
            sides perfectly, with the same split of the confidence: if `epsilon` is close to
            it, K rather than the method limits what the audit can show.
        method: "bonferroni" (every threshold of the data examined) or "fixed-threshold".
    """

    epsilon: float
    alpha: float
    delta: float
    positives: int
    negatives: int
    threshold: float | None
    direction: str | None
    false_positive_rate: float | None
    false_negative_rate: float | None
    fpr_upper: float | None
    fnr_upper: float | None
    thresholds_examined: int
    largest_attainable: float
    method: str

    def to_json(self) -> dict:
        """The fields as a dict of finite floats, ints, strings and None, for `json.dumps`."""
        return {
            "epsilon": _finite_or_none(self.epsilon),
            "alpha": _finite_or_none(self.alpha),
            "delta": _finite_or_none(self.delta),
            "positives": int(self.positives),
            "negatives": int(self.negatives),
            "threshold": _finite_or_none(self.threshold),
            "direction": self.direction,
            "false_positive_rate": _finite_or_none(self.false_positive_rate),
            "false_negative_rate": _finite_or_none(self.false_negative_rate),
            "fpr_upper": _finite_or_none(self.fpr_upper),
            "fnr_upper": _finite_or_none(self.fnr_upper),
            "thresholds_examined": int(self.thresholds_examined),
            "largest_attainable": _finite_or_none(self.largest_attainable),
            "method": self.method,
        }

    def summary(self) -> str:
        """One line, e.g. "ε ≥ 0.81 at 95% confidence (K=10 vs 10, δ=0; these K can show
        at most 0.81)"."""
        return (
            f"ε ≥ {self.epsilon:.3g} at {100 * (1 - self.alpha):.4g}% confidence "
            f"(K={self.positives} vs {self.negatives}, δ={self.delta:g}; these K can show at "
            f"most {self.largest_attainable:.3g})"
        )


def epsilon_lower_bound(
    positives,
    negatives,
    /,
    *,
    alpha: float = 0.05,
    delta: float = 0.0,
    threshold: float | None = None,
    direction: str | None = None,
) -> EpsilonAudit:
    """A lower bound on ε, valid at confidence 1 − `alpha`, from scores of the two sides.

    Each of the m tests examined bounds its false-positive and false-negative rates by
    Clopper-Pearson at `alpha / (2m)` each, so all 2m bounds hold together with probability at
    least 1 − `alpha` (union bound) and the largest ε over the tests is a valid bound.

    Without `threshold`, every threshold that changes the decisions is examined: the sorted
    distinct pooled scores, in both directions (or in `direction` only). This set is read off
    the scores, which the union bound does not strictly allow for; it is the common practice
    of audits and is conservative in the calibration tests. With `threshold`, fixed before
    these scores were seen (for instance by `choose_threshold` on held-out runs), only that
    threshold is tested, in `direction` or in both (m = 1 or 2), and the bound is much tighter.

    Args:
        positives: One score per unlearned model (higher is more member-like), 1-D.
        negatives: One score per retrained model, 1-D.
        alpha: The probability the bound may overstate ε, in (0, 1).
        delta: The δ of (ε, δ)-indistinguishability, in [0, 1).
        threshold: A threshold fixed in advance; None examines every threshold.
        direction: "high" or "low" (see `AUDIT_DIRECTIONS`) to test that direction only; None tests
            both.

    Returns:
        An `EpsilonAudit`. A test is reported (threshold, direction, rates) when it gave a
        bound above 0, or when it was the only test.

    Raises:
        AuditError: If a side is empty, not 1-D or not finite, or a setting is out of range.
    """
    positive_scores = _checked_scores(positives, "positive")
    negative_scores = _checked_scores(negatives, "negative")
    _check_alpha(alpha)
    if isinstance(delta, bool) or not isinstance(delta, Real) or not 0.0 <= delta < 1.0:
        raise AuditError(f"delta must be in [0, 1), got {delta!r}.")
    if direction is not None and direction not in AUDIT_DIRECTIONS:
        raise AuditError(f"direction must be one of {AUDIT_DIRECTIONS} or None, got {direction!r}.")
    directions = AUDIT_DIRECTIONS if direction is None else (direction,)
    if threshold is None:
        method = "bonferroni"
        candidates = np.unique(np.concatenate([positive_scores, negative_scores]))
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, Real):
            raise AuditError(f"threshold must be a real number or None, got {threshold!r}.")
        if not math.isfinite(threshold):
            raise AuditError(f"threshold must be finite, got {threshold!r}.")
        method = "fixed-threshold"
        candidates = np.array([float(threshold)])
    tests = len(directions) * candidates.size
    per_bound_alpha = alpha / (2 * tests)

    positive_sorted, negative_sorted = np.sort(positive_scores), np.sort(negative_scores)
    best = None
    for candidate_direction in directions:
        false_positives, false_negatives = _errors(
            positive_sorted, negative_sorted, candidates, candidate_direction
        )
        fpr_upper = _upper_bounds(false_positives, negative_sorted.size, per_bound_alpha)
        fnr_upper = _upper_bounds(false_negatives, positive_sorted.size, per_bound_alpha)
        epsilons = _epsilon(fpr_upper, fnr_upper, delta)
        where = int(np.argmax(epsilons))  # the first of equal bounds: the lowest threshold
        if best is None or epsilons[where] > best["epsilon"]:
            best = {
                "epsilon": float(epsilons[where]),
                "threshold": float(candidates[where]),
                "direction": candidate_direction,
                "false_positive_rate": int(false_positives[where]) / negative_sorted.size,
                "false_negative_rate": int(false_negatives[where]) / positive_sorted.size,
                "fpr_upper": float(fpr_upper[where]),
                "fnr_upper": float(fnr_upper[where]),
            }
    nothing = np.zeros(1, np.int64)
    largest = _epsilon(
        _upper_bounds(nothing, negative_sorted.size, per_bound_alpha),
        _upper_bounds(nothing, positive_sorted.size, per_bound_alpha),
        delta,
    )
    if best["epsilon"] <= 0.0 and tests > 1:
        # No test showed anything, so none is singled out as the one the bound came from.
        best = dict.fromkeys(best, None) | {"epsilon": 0.0}
    return EpsilonAudit(
        alpha=float(alpha),
        delta=float(delta),
        positives=positive_sorted.size,
        negatives=negative_sorted.size,
        thresholds_examined=tests,
        largest_attainable=float(largest[0]),
        method=method,
        **best,
    )


def choose_threshold(positives, negatives, /) -> tuple[float, str]:
    """The threshold and direction that best separate the sides, for calibration runs.

    Maximises Youden's J, TPR − FPR, over both directions, with the threshold at the midpoint of
    the gap between the two adjacent pooled scores it separates, so it never sits on a data
    point; equal J is broken toward the larger gap, then the lower threshold. Pass the result
    as `epsilon_lower_bound(..., threshold=, direction=)` on *other* runs: choosing it on the
    scores that are then audited makes the fixed-threshold confidence void.

    Args:
        positives: One score per unlearned model of the calibration runs, 1-D.
        negatives: One score per retrained model of the calibration runs, 1-D.

    Returns:
        (threshold, direction), the direction one of `AUDIT_DIRECTIONS`.

    Raises:
        AuditError: If a side is empty, not 1-D or not finite, or all scores are equal.
    """
    positive_scores = np.sort(_checked_scores(positives, "positive"))
    negative_scores = np.sort(_checked_scores(negatives, "negative"))
    pooled = np.unique(np.concatenate([positive_scores, negative_scores]))
    if pooled.size < 2:
        raise AuditError("All scores are equal: no threshold separates anything.")
    lower, upper = pooled[:-1], pooled[1:]
    # Calling "high" at the gap above `lower` counts the scores ≥ `upper`; in integers scaled by
    # K·K' so that equal J compare equal. "low" at the same gap has J of the opposite sign.
    true_positives = positive_scores.size - np.searchsorted(positive_scores, upper, "left")
    false_positives = negative_scores.size - np.searchsorted(negative_scores, upper, "left")
    scaled_j = true_positives * negative_scores.size - false_positives * positive_scores.size
    gaps = upper - lower
    order = np.lexsort((-gaps, -np.abs(scaled_j)))  # by |J|, then gap, both descending
    where = int(order[0])
    chosen_direction = "high" if scaled_j[where] >= 0 else "low"
    threshold = lower[where] + gaps[where] / 2
    # Between adjacent floats the midpoint rounds onto an end; keep the decisions it stands for.
    if chosen_direction == "high" and threshold <= lower[where]:
        threshold = upper[where]
    if chosen_direction == "low" and threshold >= upper[where]:
        threshold = lower[where]
    return float(threshold), chosen_direction


def write_audit_report(
    audits: Mapping[str, EpsilonAudit],
    out_dir: str | os.PathLike,
    /,
    *,
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    title: str = "Empirical ε audit",
) -> dict[str, pathlib.Path]:
    """Writes audits as JSON, a Markdown table and a PNG plot.

    Args:
        audits: {name: audit}, e.g. one per unlearning method or distinguisher statistic.
        out_dir: The folder to write into; created with its parents if missing.
        scores: {name: (positives, negatives)} of the same names, the scores each audit saw.
            When given they are stored in the JSON and plotted per name; when None the plot
            compares each bound with its largest attainable one.
        title: The Markdown heading and the plot's title.

    Returns:
        {"json": path, "markdown": path, "plot": path} of `audit.json`, `audit.md`, `audit.png`.

    Raises:
        AuditError: If there is no audit, `scores` names other audits, or a score is not finite.
    """
    if not audits:
        raise AuditError("No audit to report.")
    checked_scores = None
    if scores is not None:
        if set(scores) != set(audits):
            raise AuditError(
                f"scores must name the same audits: {sorted(scores)} vs {sorted(audits)}."
            )
        checked_scores = {
            name: (
                _checked_scores(scores[name][0], f"{name!r} positive"),
                _checked_scores(scores[name][1], f"{name!r} negative"),
            )
            for name in audits
        }
    directory = pathlib.Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": directory / "audit.json",
        "markdown": directory / "audit.md",
        "plot": directory / "audit.png",
    }

    document: dict = {"audits": {name: audit.to_json() for name, audit in audits.items()}}
    if checked_scores is not None:
        document["scores"] = {
            name: {"positives": positive.tolist(), "negatives": negative.tolist()}
            for name, (positive, negative) in checked_scores.items()
        }
    paths["json"].write_text(json.dumps(document, allow_nan=False, indent=2) + "\n")

    columns = (
        "name",
        "epsilon",
        "largest_attainable",
        "positives",
        "negatives",
        "alpha",
        "delta",
        "threshold",
        "direction",
        "fpr_upper",
        "fnr_upper",
        "method",
    )
    rows = [{"name": name, **audit.to_json()} for name, audit in audits.items()]
    paths["markdown"].write_text(
        f"# {title}\n\n"
        "Each epsilon is a lower bound, holding with probability at least 1 − alpha, on the ε "
        "for which Pr[unlearned ∈ S] ≤ e^ε Pr[retrained ∈ S] + delta (and the same swapped) "
        "for every set S of models; largest_attainable is what perfect separation of the same "
        "numbers of models would have shown.\n\n" + markdown_table(rows, columns)
    )

    _plot(paths["plot"], audits, checked_scores, title)
    return paths


def _plot(
    path: pathlib.Path,
    audits: Mapping[str, EpsilonAudit],
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]] | None,
    title: str,
) -> None:
    if scores is None:
        names = list(audits)
        figure = Figure(figsize=(max(4.0, 1.2 * len(names) + 2.0), 3.5), layout="constrained")
        axes = figure.add_subplot()
        position = np.arange(len(names))
        axes.bar(position - 0.2, [audits[name].epsilon for name in names], 0.4, label="ε bound")
        axes.bar(
            position + 0.2,
            [audits[name].largest_attainable for name in names],
            0.4,
            label="largest attainable",
        )
        axes.set_xticks(position, names, rotation=30, ha="right")
        axes.set_ylabel("ε lower bound")
        axes.set_title(title)
        axes.legend()
    else:
        # At most four panels a row, so that many audits stay readable.
        columns = min(len(audits), 4)
        rows = math.ceil(len(audits) / columns)
        figure = Figure(figsize=(4.5 * columns, 2.6 * rows + 0.6), layout="constrained")
        subplots = figure.subplots(rows, columns, squeeze=False).ravel()
        for unused in subplots[len(audits) :]:
            unused.set_axis_off()
        for axes, (name, audit) in zip(subplots, audits.items(), strict=False):
            for row, values in enumerate(scores[name][::-1]):  # retrained below, unlearned above
                # Spread points vertically so equal scores stay apart: a golden-ratio sequence,
                # the same on every run and unrelated to any seed the scores were drawn with.
                spread = (np.arange(values.size) * 0.618034) % 1.0 - 0.5
                axes.scatter(values, row + 0.3 * spread, s=14, alpha=0.7)
            if audit.threshold is not None:
                axes.axvline(audit.threshold, color="black", linestyle="--", linewidth=1)
            axes.set_yticks([0, 1], ["retrained", "unlearned"])
            axes.set_ylim(-0.6, 1.6)
            axes.set_xlabel("distinguisher score")
            axes.set_title(
                f"{name}\nε ≥ {audit.epsilon:.3g} (at most {audit.largest_attainable:.3g})",
                fontsize=9,
            )
        figure.suptitle(title)
    save_figure(figure, path)


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 < alpha < 1.0:
        raise AuditError(f"alpha must be in (0, 1), got {alpha!r}.")


def _checked_scores(scores, side: str) -> np.ndarray:
    try:
        values = np.asarray(scores, np.float64)
    except (TypeError, ValueError):
        raise AuditError(f"The {side} scores are not numbers.") from None
    if values.ndim != 1:
        raise AuditError(f"The {side} scores must be 1-D, one per model; got shape {values.shape}.")
    if values.size == 0:
        raise AuditError(f"No {side} scores: an audit needs models on both sides.")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise AuditError(
            f"{bad.size} {side} scores are not finite (first at position {bad[0]}: "
            f"{values[bad[0]]})."
        )
    return values


def _upper_bounds(failures: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """`clopper_pearson_upper` of each count in `failures`, all out of `trials`."""
    bounds = np.ones(failures.shape)
    some = failures < trials
    # The 1 − alpha quantile of Beta(k + 1, n − k), as `scipy.stats.beta.ppf` gives it, but
    # inverted from the upper tail: 1 − alpha would round away a Bonferroni-split alpha's digits,
    # and the ufunc skips the per-call checks of `stats` that dominate at one test.
    bounds[some] = special.betainccinv(failures[some] + 1, trials - failures[some], alpha)
    return bounds


def _errors(
    positive_sorted: np.ndarray, negative_sorted: np.ndarray, thresholds: np.ndarray, direction
) -> tuple[np.ndarray, np.ndarray]:
    """(false positives, false negatives) at each threshold, from sorted scores."""
    if direction == "high":  # positive when score ≥ threshold
        false_positives = negative_sorted.size - np.searchsorted(
            negative_sorted, thresholds, "left"
        )
        false_negatives = np.searchsorted(positive_sorted, thresholds, "left")
    else:  # positive when score ≤ threshold
        false_positives = np.searchsorted(negative_sorted, thresholds, "right")
        false_negatives = positive_sorted.size - np.searchsorted(
            positive_sorted, thresholds, "right"
        )
    return false_positives, false_negatives


def _epsilon(fpr_upper: np.ndarray, fnr_upper: np.ndarray, delta: float) -> np.ndarray:
    """max(ln((1 − δ − FPR)/FNR), ln((1 − δ − FNR)/FPR), 0), from the upper bounds."""
    # Clopper-Pearson upper bounds are > 0, so only a numerator ≤ 0 needs guarding.
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(1 - delta - fpr_upper > 0, np.log((1 - delta - fpr_upper) / fnr_upper), 0)
        second = np.where(1 - delta - fnr_upper > 0, np.log((1 - delta - fnr_upper) / fpr_upper), 0)
    return np.maximum(np.maximum(first, second), 0.0)


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
