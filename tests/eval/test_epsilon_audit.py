"""The empirical ε audit: Clopper-Pearson bounds, hand counts, and mechanisms of known ε."""

import json
import math

import numpy as np
import pytest
from scipy import optimize, stats

from jaxunlearn.eval import (
    AUDIT_DIRECTIONS,
    AuditError,
    EpsilonAudit,
    choose_threshold,
    clopper_pearson_upper,
    epsilon_lower_bound,
    write_audit_report,
)

ALPHA = 0.05


def _allowed_share(seeds: int, alpha: float) -> float:
    """The share of seeds a bound valid at 1 − alpha may exceed the true ε in.

    A valid bound exceeds ε on each seed with probability at most alpha, independently, so the
    count of seeds above ε is at most Binomial(seeds, alpha); a correct audit exceeds this
    99.9% quantile only once in a thousand draws of seeds. The seeds are fixed, so the test is
    deterministic; the slack only keeps it from demanding luck of a correct audit.
    """
    return float(stats.binom.ppf(0.999, seeds, alpha)) / seeds


def _laplace(seed: int, size: int, epsilon: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    # Sensitivity 1 and scale 1/ε: pure ε-DP, so δ = 0 and the true ε is `epsilon`.
    rng = np.random.default_rng(seed)
    return rng.laplace(1.0, 1.0 / epsilon, size), rng.laplace(0.0, 1.0 / epsilon, size)


def _perfect_bound(positives: int, negatives: int, tests: int, delta: float = 0.0) -> float:
    """The bound from no false positive and no false negative, each CP bound at α/(2·tests)."""
    per_bound = ALPHA / (2 * tests)
    fpr_upper = 1 - per_bound ** (1 / negatives)
    fnr_upper = 1 - per_bound ** (1 / positives)
    return max(
        math.log((1 - delta - fpr_upper) / fnr_upper),
        math.log((1 - delta - fnr_upper) / fpr_upper),
        0.0,
    )


@pytest.mark.parametrize(
    ("failures", "trials", "alpha"),
    [(1, 10, 0.05), (3, 10, 0.05), (7, 20, 0.01), (19, 20, 0.1), (50, 200, 1e-3), (2, 1000, 1e-6)],
)
def test_clopper_pearson_is_the_binomial_tail_root(failures, trials, alpha):
    # The upper bound is the p at which seeing ≤ `failures` has probability exactly alpha.
    root = optimize.brentq(
        lambda p: stats.binom.cdf(failures, trials, p) - alpha, 1e-12, 1 - 1e-12, xtol=1e-14
    )
    assert clopper_pearson_upper(failures, trials, alpha=alpha) == pytest.approx(root, rel=1e-9)


def test_clopper_pearson_edges():
    for trials in (1, 5, 200):
        for alpha in (0.05, 0.001):
            assert clopper_pearson_upper(0, trials, alpha=alpha) == pytest.approx(
                1 - alpha ** (1 / trials), rel=1e-12
            )
            assert clopper_pearson_upper(trials, trials, alpha=alpha) == 1.0
    assert clopper_pearson_upper(np.int64(2), np.int64(10), alpha=0.05) == pytest.approx(
        clopper_pearson_upper(2, 10, alpha=0.05)
    )


@pytest.mark.parametrize(
    ("failures", "trials", "alpha"),
    [(6, 5, 0.05), (-1, 5, 0.05), (0, 0, 0.05), (1, 5, 0.0), (1, 5, 1.0), (1.5, 5, 0.05)],
)
def test_clopper_pearson_rejects_bad_input(failures, trials, alpha):
    with pytest.raises(AuditError):
        clopper_pearson_upper(failures, trials, alpha=alpha)


@pytest.mark.parametrize("delta", [0.0, 0.1])
def test_a_fixed_threshold_separating_five_from_five(delta):
    positives = [2.0, 3.0, 4.0, 5.0, 6.0]
    negatives = [-1.0, 0.0, 0.5, 1.0, 1.5]
    alpha = 0.2  # at 0.05, five models a side cannot show any ε (checked below)
    audit = epsilon_lower_bound(
        positives, negatives, threshold=1.75, direction="high", delta=delta, alpha=alpha
    )
    # One test, its two bounds at α/2 each; with no error either is 1 − (α/2)^(1/5).
    upper = 1 - (alpha / 2) ** (1 / 5)
    expected = math.log((1 - delta - upper) / upper)
    assert expected > 0.3
    assert audit.epsilon == pytest.approx(expected, rel=1e-12)
    assert audit.method == "fixed-threshold"
    assert audit.thresholds_examined == 1
    assert (audit.threshold, audit.direction) == (1.75, "high")
    assert (audit.false_positive_rate, audit.false_negative_rate) == (0.0, 0.0)
    assert audit.fpr_upper == pytest.approx(upper)
    assert audit.fnr_upper == pytest.approx(upper)
    assert audit.epsilon == pytest.approx(audit.largest_attainable)

    # At α = 0.05 the upper bound 1 − 0.025^(1/5) ≈ 0.52 leaves 1 − FPR below FNR: no bound.
    # The single test is still reported, since nothing was chosen among tests.
    weak = epsilon_lower_bound(positives, negatives, threshold=1.75, direction="high", delta=delta)
    assert weak.epsilon == 0.0
    assert weak.largest_attainable == 0.0
    assert weak.threshold == 1.75


def test_a_fixed_threshold_in_both_directions_splits_the_confidence_in_two():
    positives = np.linspace(2.0, 7.0, 20)
    negatives = np.append(np.linspace(-1.0, 1.5, 19), 3.5)  # one negative above the threshold
    audit = epsilon_lower_bound(positives, negatives, threshold=1.75)
    assert audit.thresholds_examined == 2
    assert audit.direction == "high"
    per_bound = ALPHA / 4
    fpr_upper = clopper_pearson_upper(1, 20, alpha=per_bound)
    fnr_upper = 1 - per_bound ** (1 / 20)
    assert audit.false_positive_rate == pytest.approx(1 / 20)
    assert audit.false_negative_rate == 0.0
    expected = max(math.log((1 - fpr_upper) / fnr_upper), math.log((1 - fnr_upper) / fpr_upper))
    assert expected > 0.5
    assert audit.epsilon == pytest.approx(expected, rel=1e-12)


def test_bonferroni_splits_the_confidence_over_every_distinct_pooled_score():
    positives = np.repeat(np.arange(10.0, 20.0), 2)  # 20 models, 10 distinct scores
    negatives = np.arange(20.0) / 2  # 20 distinct scores below every positive
    distinct = len(set(positives.tolist()) | set(negatives.tolist()))
    assert distinct == 30
    for direction, tests in ((None, 2 * distinct), ("high", distinct)):
        audit = epsilon_lower_bound(positives, negatives, direction=direction)
        assert audit.method == "bonferroni"
        assert audit.thresholds_examined == tests
        per_bound = ALPHA / (2 * tests)
        upper = 1 - per_bound ** (1 / 20)
        # The best test calls exactly the positives positive: score ≥ 10, no error either way.
        assert audit.epsilon == pytest.approx(math.log((1 - upper) / upper), rel=1e-12)
        assert (audit.threshold, audit.direction) == (10.0, "high")
        assert audit.largest_attainable == pytest.approx(_perfect_bound(20, 20, tests))
    # Reversed roles: only "low" separates, and with it the same bound.
    flipped = epsilon_lower_bound(negatives, positives)
    assert flipped.direction == "low"
    assert flipped.threshold == 9.5
    assert flipped.epsilon == pytest.approx(epsilon_lower_bound(positives, negatives).epsilon)


def test_laplace_bound_is_valid_and_tightens_with_more_models():
    true_epsilon = 1.0
    mean_bounds = {}
    for size, seeds in ((50, 200), (200, 200), (1000, 100)):
        bounds = np.array(
            [
                epsilon_lower_bound(*_laplace(seed, size), alpha=ALPHA).epsilon
                for seed in range(seeds)
            ]
        )
        assert np.mean(bounds > true_epsilon) <= _allowed_share(seeds, ALPHA), size
        mean_bounds[size] = float(np.mean(bounds))
    # Measured: 0.014, 0.32, 0.65.
    assert mean_bounds[50] < mean_bounds[200] < mean_bounds[1000]
    assert mean_bounds[1000] > 0.5 * true_epsilon


def test_laplace_bound_at_the_saturating_fixed_threshold_is_valid():
    # For Laplace at any t ≥ 1, TPR = e^ε FPR exactly: the test the ε-DP inequality is tight
    # for, so a bound that used rates without their confidence margin would exceed ε on about
    # half the seeds.
    true_epsilon, seeds = 1.0, 2000
    mean_bounds = {}
    for size in (50, 200, 1000):
        bounds = np.array(
            [
                epsilon_lower_bound(*_laplace(seed, size), threshold=1.0, direction="high").epsilon
                for seed in range(seeds)
            ]
        )
        assert np.mean(bounds > true_epsilon) <= _allowed_share(seeds, ALPHA), size
        mean_bounds[size] = float(np.mean(bounds))
    # Measured: 0.19, 0.56, 0.81; a fixed threshold pays for one test, not thousands.
    assert mean_bounds[50] < mean_bounds[200] < mean_bounds[1000]
    assert mean_bounds[1000] > 0.7 * true_epsilon


def _gaussian_delta(epsilon: float, sigma: float) -> float:
    """The exact δ(ε) of the Gaussian mechanism N(1, σ²) against N(0, σ²)."""
    return stats.norm.cdf(-epsilon * sigma + 1 / (2 * sigma)) - math.exp(epsilon) * stats.norm.cdf(
        -epsilon * sigma - 1 / (2 * sigma)
    )


def test_gaussian_bound_is_valid_at_its_delta():
    sigma, delta, size = 1.0, 0.1, 1000
    true_epsilon = optimize.brentq(lambda e: _gaussian_delta(e, sigma) - delta, 0.0, 20.0)
    assert 1.1 < true_epsilon < 1.2  # 1.16
    # The δ(ε) curve is attained by the likelihood-ratio set {x ≥ εσ² + 1/2}: a fixed test the
    # (ε, δ) inequality is tight for.
    saturating = true_epsilon * sigma**2 + 0.5

    def scores(seed):
        rng = np.random.default_rng(1000 + seed)
        return rng.normal(1.0, sigma, size), rng.normal(0.0, sigma, size)

    for seeds, settings in ((100, {}), (1000, {"threshold": saturating, "direction": "high"})):
        bounds = np.array(
            [
                epsilon_lower_bound(*scores(seed), delta=delta, **settings).epsilon
                for seed in range(seeds)
            ]
        )
        assert np.mean(bounds > true_epsilon) <= _allowed_share(seeds, ALPHA), settings
        # Measured means: 0.53 (every threshold) and 0.71 (the saturating one).
        assert np.mean(bounds) > 0.3 * true_epsilon, settings


def test_identical_distributions_give_no_bound():
    bonferroni, fixed = [], []
    for seed in range(50):
        rng = np.random.default_rng(seed)
        positives, negatives = rng.normal(0.0, 1.0, 200), rng.normal(0.0, 1.0, 200)
        bonferroni.append(epsilon_lower_bound(positives, negatives))
        fixed.append(epsilon_lower_bound(positives, negatives, threshold=0.0))
    # Measured: exactly 0 on every seed, both ways; empirical rates without their confidence
    # margins would show ε > 0 at the extreme thresholds.
    assert max(audit.epsilon for audit in bonferroni) < 0.05
    assert max(audit.epsilon for audit in fixed) < 0.05
    zero = next(audit for audit in bonferroni if audit.epsilon == 0.0)
    assert zero.threshold is None
    assert zero.direction is None
    assert zero.fpr_upper is None
    assert zero.largest_attainable > 2.0  # K = 200 could have shown a large ε


def test_largest_attainable_is_the_perfect_separation_bound_and_grows_with_k():
    previous = {"bonferroni": 0.0, "fixed-threshold": 0.0}
    for size in (20, 50, 200, 1000):
        positives = np.linspace(10.0, 20.0, size)
        negatives = np.linspace(0.0, 5.0, size)
        for audit in (
            epsilon_lower_bound(positives, negatives),
            epsilon_lower_bound(positives, negatives, threshold=7.5, direction="high"),
        ):
            assert audit.epsilon == pytest.approx(audit.largest_attainable, rel=1e-12)
            assert audit.largest_attainable == pytest.approx(
                _perfect_bound(size, size, audit.thresholds_examined)
            )
            assert audit.largest_attainable > previous[audit.method]
            previous[audit.method] = audit.largest_attainable
    # Overlapping sides report the same ceiling as separated ones with as many tests.
    overlap = epsilon_lower_bound(*_laplace(0, 200), threshold=1.0, direction="high")
    assert overlap.largest_attainable == pytest.approx(_perfect_bound(200, 200, 1))
    assert overlap.epsilon < overlap.largest_attainable


def test_choose_threshold_picks_the_separating_midpoint():
    assert choose_threshold([3.0, 4.0, 5.0], [0.0, 1.0, 2.0]) == (2.5, "high")
    assert choose_threshold([0.0, 1.0], [5.0, 6.0, 7.0]) == (3.0, "low")
    # Gaps 0|2, 2|5 and 5|10 give J = ½, 0 and ½: the tie goes to the wider gap.
    assert choose_threshold([2.0, 10.0], [0.0, 5.0]) == (7.5, "high")
    # Calibrated on some runs, then audited on others at a fixed threshold.
    threshold, direction = choose_threshold(*_laplace(1, 200, epsilon=3.0))
    assert direction == "high"
    assert 0.0 < threshold < 1.0
    audit = epsilon_lower_bound(*_laplace(2, 200, epsilon=3.0), threshold=threshold)
    assert audit.direction == "high"
    assert audit.epsilon > 0.5


def test_choose_threshold_needs_two_distinct_scores():
    with pytest.raises(AuditError, match="equal"):
        choose_threshold([1.0, 1.0], [1.0])


def test_to_json_is_strict_json_even_without_a_threshold():
    rng = np.random.default_rng(0)
    for audit in (
        epsilon_lower_bound(rng.normal(size=20), rng.normal(size=20)),  # ε = 0, no threshold
        epsilon_lower_bound([2.0, 3.0, 4.0], [0.0, 1.0], threshold=1.5, direction="high"),
    ):
        record = audit.to_json()
        assert set(record) == set(EpsilonAudit.__dataclass_fields__)
        assert json.loads(json.dumps(record, allow_nan=False)) == record
        assert all(
            value is None or isinstance(value, int | float | str) for value in record.values()
        )
    assert record["threshold"] == 1.5


def test_summary_is_one_line():
    audit = epsilon_lower_bound(np.arange(10.0, 20.0), np.arange(10.0))
    assert audit.summary() == (
        f"ε ≥ {audit.epsilon:.3g} at 95% confidence (K=10 vs 10, δ=0; these K can show at most "
        f"{audit.largest_attainable:.3g})"
    )


def test_write_audit_report(tmp_path):
    scores = {"gradient_ascent": _laplace(0, 50, epsilon=3.0), "retrain_check": _laplace(1, 50)}
    audits = {name: epsilon_lower_bound(*pair) for name, pair in scores.items()}
    paths = write_audit_report(audits, tmp_path / "with_scores", scores=scores)
    assert set(paths) == {"json", "markdown", "plot"}
    assert all(path.is_file() for path in paths.values())
    document = json.loads(paths["json"].read_text())
    for name, audit in audits.items():
        assert document["audits"][name]["epsilon"] == audit.epsilon
        assert document["scores"][name]["positives"] == scores[name][0].tolist()
    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# Empirical ε audit")
    assert all(f"| {name} |" in markdown for name in audits)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bare = write_audit_report(audits, tmp_path / "bare", title="Bare")
    assert "scores" not in json.loads(bare["json"].read_text())
    assert bare["markdown"].read_text().startswith("# Bare")
    assert bare["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_audit_report_rejects_mismatched_scores(tmp_path):
    audit = epsilon_lower_bound([1.0, 2.0], [0.0])
    with pytest.raises(AuditError, match="same audits"):
        write_audit_report({"a": audit}, tmp_path, scores={"b": ([1.0], [0.0])})
    with pytest.raises(AuditError, match="No audit"):
        write_audit_report({}, tmp_path)


@pytest.mark.parametrize(
    ("positives", "negatives", "settings"),
    [
        ([], [0.0], {}),
        ([1.0], [], {}),
        ([1.0, math.nan], [0.0], {}),
        ([1.0, math.inf], [0.0], {}),
        ([[1.0], [2.0]], [0.0], {}),
        ([1.0], [0.0], {"alpha": 0.0}),
        ([1.0], [0.0], {"alpha": 1.0}),
        ([1.0], [0.0], {"delta": 1.0}),
        ([1.0], [0.0], {"delta": -0.1}),
        ([1.0], [0.0], {"direction": "up"}),
        ([1.0], [0.0], {"threshold": math.nan}),
    ],
)
def test_epsilon_lower_bound_rejects_bad_input(positives, negatives, settings):
    with pytest.raises(AuditError) as error:
        epsilon_lower_bound(positives, negatives, **settings)
    assert "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)


def test_directions():
    assert AUDIT_DIRECTIONS == ("high", "low")
