"""Certified removal from a convex head over frozen features: an objective-perturbed logistic
regression whose examples are removed by one Newton step each, with an (ε, δ) certificate.

This follows Guo, Goldstein, Hannun & van der Maaten, "Certified Data Removal from Machine
Learning Models", ICML 2020 (arXiv 1911.03030). The head is binary logistic regression on fixed
features x_i (‖x_i‖₂ ≤ 1) with labels y_i ∈ {−1, +1}, trained on the perturbed objective

    L_b(w; D) = Σ_i ℓ(wᵀx_i, y_i) + (λn/2)‖w‖² + bᵀw,    ℓ(z, y) = log(1 + e^{−yz}),

with n = |D| and b ~ N(0, σ² I_d) drawn once at training time. Training minimizes L_b exactly
(Newton's method, to a gradient norm of 1e-12 per example).

Removing an example r from the data D the head was fitted to (D′ = D ∖ r, n − 1 examples) is
the Newton update of their Section 3:

    Δ = λw + ∇_w ℓ(wᵀx_r, y_r),    H = ∇²_w L(w; D′) = Σ_{i∈D′} ℓ''_i x_i x_iᵀ + λ(n − 1) I,
    w⁻ = w + H⁻¹Δ.

The sign: the regularizer follows the current data size, so ∇L_b(w; D′) = ∇L_b(w; D) − Δ, which
is exactly −Δ when w minimizes L_b(·; D); the step w + H⁻¹Δ is Newton's step on L_b(·; D′).
After earlier removals w is itself an approximate minimizer, and its leftover gradient g stays
in ∇L_b(w⁻; D′) = g + (H̄ − H)H⁻¹Δ (H̄ the Hessian averaged over the step), which is why the
bounds of successive removals add up (the triangle inequality), as in their repeated-removal
algorithm.

The gradient residual ‖∇L_b(w⁻; D′)‖ is what the noise has to mask. Its bounds, for logistic
loss (C = 1 bounds ‖∇_w ℓ‖ since |∂ℓ/∂z| < 1 and ‖x‖ ≤ 1; ℓ'' is γ-Lipschitz with γ = 1/4 as in
the paper — the tight constant is max|ℓ'''| = 1/(6√3) ≈ 0.096, so these bounds are conservative):

- Theorem 1, first inequality: ≤ γ(n − 1)‖H⁻¹Δ‖² ("Newton-step bound").
- Theorem 1, second inequality: ≤ 4γC²/(λ²(n − 1)) ("worst case"). It needs ‖Δ‖ ≤ 2C, i.e.
  λ‖w‖ ≤ C, which holds at an unperturbed optimum; at the perturbed one only λ‖w‖ ≤ C + ‖b‖/n
  is guaranteed, so here the worst case is informative rather than a proof. The certificate
  never spends it.
- Corollary 1 (linear models): ≤ γ‖X‖₂‖H⁻¹Δ‖₂‖XH⁻¹Δ‖₂, X the remaining features (n − 1 rows),
  ‖X‖₂ its spectral norm ("data-dependent bound"). It holds for any starting point w, so it is
  the one spent: β, the accumulated residual bound, grows by it at every Newton removal.

Theorem 3 (Gaussian noise): if every removal leaves a residual of at most ε′ and b is drawn from
N(0, σ² I) with σ = c·ε′/ε, c = sqrt(2 log(1.5/δ)), the removal is (ε, δ)-certified. With σ given,
the residual budget is therefore ε′ = σε/c: a removal keeps the certificate while β ≤ σε/c. A
removal that would take β past the budget retrains instead, from scratch on the remaining data
with a fresh b (β resets to 0), and its certificate says so.

State: a `CertifiedHead` keeps the full training data it was given plus a boolean mask of the
rows still present, so examples are named by their original index throughout; everything is
numpy float64 (the residuals being certified are far below float32 resolution).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import scipy.linalg
import scipy.special

from jaxunlearn.errors import UserError

__all__ = [
    "GRADIENT_BOUND",
    "HESSIAN_LIPSCHITZ",
    "CertificationError",
    "CertifiedHead",
    "RemovalCertificate",
    "data_dependent_residual_bound",
    "newton_step_residual_bound",
    "noise_multiplier",
    "noise_scale",
    "removal_budget",
    "remove_certified",
    "retrain_certified_head",
    "train_certified_head",
    "worst_case_residual_bound",
]

HESSIAN_LIPSCHITZ = 0.25
"""γ: a Lipschitz constant of ℓ''(z) for logistic loss (the paper's 1/4; the tight one ≈ 0.096)."""
GRADIENT_BOUND = 1.0
"""C: the bound on ‖∇_w ℓ(wᵀx, y)‖ for logistic loss with ‖x‖ ≤ 1."""

# Rows may exceed norm 1 by rounding after a user normalizes them; anything more breaks C and γ.
_NORM_SLACK = 1e-9
# Training stops at ‖∇L_b‖ ≤ this times n: a sum of n terms of size ≤ 1 in float64 cannot be
# resolved much below n·1e-16, and 1e-12 per example is far below any useful budget.
_TRAINING_TOLERANCE = 1e-12
_MAX_NEWTON_STEPS = 100


class CertificationError(UserError, ValueError):
    """Data, settings or a removal request that certified removal cannot accept."""


def noise_multiplier(delta: float, /) -> float:
    """c = sqrt(2 log(1.5/δ)): Theorem 3 certifies (ε, δ) with δ = 1.5·exp(−c²/2).

    Args:
        delta: δ in (0, 1).

    Returns:
        c.

    Raises:
        CertificationError: if δ is not in (0, 1).
    """
    _check_delta(delta)
    return math.sqrt(2.0 * math.log(1.5 / delta))


def removal_budget(*, sigma: float, epsilon: float, delta: float) -> float:
    """ε′ = σε/c: the accumulated residual bound that noise of scale σ masks (Theorem 3).

    Args:
        sigma: σ > 0, the standard deviation of each coordinate of b.
        epsilon: ε > 0.
        delta: δ in (0, 1).

    Returns:
        The residual budget σε/c.

    Raises:
        CertificationError: if a setting is out of range.
    """
    _check_positive(sigma=sigma, epsilon=epsilon)
    return sigma * epsilon / noise_multiplier(delta)


def noise_scale(residual_budget: float, /, *, epsilon: float, delta: float) -> float:
    """σ = c·ε′/ε: the noise scale whose budget is `residual_budget` (Theorem 3).

    Args:
        residual_budget: ε′ > 0, the accumulated residual bound to allow before a retrain.
        epsilon: ε > 0.
        delta: δ in (0, 1).

    Returns:
        σ, to pass to `train_certified_head`.

    Raises:
        CertificationError: if a setting is out of range.
    """
    _check_positive(residual_budget=residual_budget, epsilon=epsilon)
    return noise_multiplier(delta) * residual_budget / epsilon


def data_dependent_residual_bound(features: np.ndarray, newton_step: np.ndarray, /) -> float:
    """γ‖X‖₂‖v‖₂‖Xv‖₂, Corollary 1's bound on the residual that the Newton step v leaves.

    Args:
        features: X, the features remaining after the removal (rows of norm ≤ 1).
        newton_step: v = H⁻¹Δ.

    Returns:
        The bound.
    """
    spectral_norm = float(np.linalg.norm(features, 2)) if features.shape[0] else 0.0
    return (
        HESSIAN_LIPSCHITZ
        * spectral_norm
        * float(np.linalg.norm(newton_step))
        * float(np.linalg.norm(features @ newton_step))
    )


def newton_step_residual_bound(num_remaining: int, newton_step: np.ndarray, /) -> float:
    """γ(n − 1)‖v‖², Theorem 1's first bound (n − 1 = `num_remaining`, v = H⁻¹Δ)."""
    return HESSIAN_LIPSCHITZ * num_remaining * float(np.dot(newton_step, newton_step))


def worst_case_residual_bound(num_remaining: int, /, *, lam: float) -> float:
    """4γC²/(λ²(n − 1)), Theorem 1's data-independent bound (n − 1 = `num_remaining`).

    It assumes ‖Δ‖ ≤ 2C, i.e. λ‖w‖ ≤ C (see the module docstring).
    """
    _check_positive(lam=lam)
    return 4.0 * HESSIAN_LIPSCHITZ * GRADIENT_BOUND**2 / (lam**2 * num_remaining)


@dataclasses.dataclass(frozen=True, eq=False)
class CertifiedHead:
    """A logistic-regression head trained with objective perturbation, and its removal state.

    Build one with `train_certified_head`; `remove_certified` returns a new one. Arrays are
    read-only.

    Attributes:
        weights: w, shape (d,).
        noise: b, shape (d,), the perturbation the current weights were trained with.
        features: all n₀ training rows as given, shape (n₀, d), including removed ones.
        labels: all n₀ labels in {−1, +1}.
        present: boolean mask over the n₀ rows: True for those not yet removed.
        lam: λ > 0 (the regularizer is (λn/2)‖w‖² with n the current data size).
        sigma: σ > 0, the standard deviation of each coordinate of b.
        epsilon: ε > 0 of the (ε, δ) certificate.
        delta: δ in (0, 1).
        noise_seed: the seed b is drawn from; retrain k draws from (noise_seed, k).
        spent: β, the accumulated data-dependent residual bound since the last (re)training.
        removals: Newton removals since the last (re)training.
        retrains: retrains forced by the budget so far.
    """

    weights: np.ndarray
    noise: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    present: np.ndarray
    lam: float
    sigma: float
    epsilon: float
    delta: float
    noise_seed: int = 0
    spent: float = 0.0
    removals: int = 0
    retrains: int = 0

    def __post_init__(self):
        if np.ndim(self.features) != 2:
            raise CertificationError(
                f"features must have shape (n, d), got {np.shape(self.features)}."
            )
        num_rows, dim = np.shape(self.features)
        expected = {
            "weights": (dim,),
            "noise": (dim,),
            "labels": (num_rows,),
            "present": (num_rows,),
        }
        for name, shape in expected.items():
            if np.shape(getattr(self, name)) != shape:
                raise CertificationError(
                    f"{name} has shape {np.shape(getattr(self, name))}, expected {shape}."
                )
        for name in ("weights", "noise", "features", "labels", "present"):
            array = np.array(getattr(self, name), dtype=bool if name == "present" else np.float64)
            array.setflags(write=False)
            object.__setattr__(self, name, array)

    @property
    def n(self) -> int:
        """The number of examples still present."""
        return int(self.present.sum())

    @property
    def budget(self) -> float:
        """ε′ = σε/c, the residual budget of the certificate."""
        return removal_budget(sigma=self.sigma, epsilon=self.epsilon, delta=self.delta)

    @property
    def certified(self) -> bool:
        """Whether β is within the budget, so the current weights carry the (ε, δ) certificate."""
        return self.spent <= self.budget

    @property
    def remaining_indices(self) -> np.ndarray:
        """The original indices of the examples still present."""
        return np.flatnonzero(self.present)

    def objective(self, weights: np.ndarray | None = None) -> float:
        """L_b(w; D) on the remaining data (w: the head's weights unless given)."""
        weights = self.weights if weights is None else np.asarray(weights, np.float64)
        return _objective(weights, *self._remaining(), self.lam, self.noise)

    def gradient(self, weights: np.ndarray | None = None) -> np.ndarray:
        """∇L_b(w; D) on the remaining data, noise included (w: the head's weights unless given)."""
        weights = self.weights if weights is None else np.asarray(weights, np.float64)
        return _gradient(weights, *self._remaining(), self.lam, self.noise)

    def hessian(self, weights: np.ndarray | None = None) -> np.ndarray:
        """∇²L_b(w; D) on the remaining data (w: the head's weights unless given)."""
        weights = self.weights if weights is None else np.asarray(weights, np.float64)
        return _hessian(weights, self._remaining()[0], self.lam)

    def predict_proba(self, features: np.ndarray, /) -> np.ndarray:
        """P(y = +1 | x) = sigmoid(wᵀx) for one row (d,) or a batch (m, d)."""
        return scipy.special.expit(np.asarray(features, np.float64) @ self.weights)

    def _remaining(self) -> tuple[np.ndarray, np.ndarray]:
        return self.features[self.present], self.labels[self.present]


@dataclasses.dataclass(frozen=True)
class RemovalCertificate:
    """What one removal did and what it guarantees.

    Attributes:
        removed: the removed example's original index.
        retrained: True when the Newton step would have exceeded the budget, so the head was
            retrained from scratch on the remaining data with fresh noise.
        residual_norm: ‖∇L_b(w⁻; D′)‖ of the weights returned, measured (noise included).
        data_dependent_bound: Corollary 1's bound for the Newton step of this removal (on a
            retrain: the bound that did not fit, and was not spent).
        newton_step_bound: Theorem 1's γ(n − 1)‖H⁻¹Δ‖² for the same step.
        worst_case_bound: Theorem 1's 4γC²/(λ²(n − 1)).
        spent: β after the removal (0 after a retrain).
        budget: ε′ = σε/c.
        epsilon: ε of the certificate.
        delta: δ of the certificate.
    """

    removed: int
    retrained: bool
    residual_norm: float
    data_dependent_bound: float
    newton_step_bound: float
    worst_case_bound: float
    spent: float
    budget: float
    epsilon: float
    delta: float

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise CertificationError(f"The removal's {field.name} is not finite ({value}).")

    @property
    def certified(self) -> bool:
        """Whether β ≤ ε′, so the weights after the removal are (ε, δ)-certified."""
        return self.spent <= self.budget

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of Python scalars (every float finite)."""
        return {
            "removed": int(self.removed),
            "retrained": bool(self.retrained),
            "certified": self.certified,
            "residual_norm": float(self.residual_norm),
            "data_dependent_bound": float(self.data_dependent_bound),
            "newton_step_bound": float(self.newton_step_bound),
            "worst_case_bound": float(self.worst_case_bound),
            "spent": float(self.spent),
            "budget": float(self.budget),
            "epsilon": float(self.epsilon),
            "delta": float(self.delta),
        }


def train_certified_head(
    features: np.ndarray,
    labels: np.ndarray,
    /,
    *,
    lam: float,
    epsilon: float,
    delta: float,
    sigma: float = 1.0,
    noise_seed: int = 0,
) -> CertifiedHead:
    """Draws b ~ N(0, σ² I) and minimizes L_b(w; D) exactly (their training algorithm).

    Larger σ allows more removals before a retrain (the budget σε/c grows) at the cost of a
    noisier head; `noise_scale` gives the σ for a chosen budget.

    Args:
        features: X, shape (n, d), every row of Euclidean norm at most 1.
        labels: y, shape (n,), each −1 or +1.
        lam: λ > 0.
        epsilon: ε > 0 of the (ε, δ) certificate.
        delta: δ in (0, 1).
        sigma: σ > 0, the standard deviation of each coordinate of b.
        noise_seed: seeds b (numpy's default generator).

    Returns:
        The trained head, with β = 0.

    Raises:
        CertificationError: on out-of-range data or settings, or if Newton's method fails.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    _check_data(features, labels)
    _check_positive(lam=lam, sigma=sigma, epsilon=epsilon)
    _check_delta(delta)
    labels = labels.astype(np.float64)
    noise = _draw_noise(noise_seed, 0, sigma, features.shape[1])
    return CertifiedHead(
        weights=_minimize(features, labels, lam, noise),
        noise=noise,
        features=features,
        labels=labels,
        present=np.ones(features.shape[0], dtype=bool),
        lam=float(lam),
        sigma=float(sigma),
        epsilon=float(epsilon),
        delta=float(delta),
        noise_seed=int(noise_seed),
    )


def retrain_certified_head(head: CertifiedHead, /) -> CertifiedHead:
    """The head retrained from scratch on its remaining data with fresh noise (β reset to 0).

    Retrain k (counting from 1) draws b from the seed sequence (noise_seed, k), independent of
    the noise of training and of every other retrain.

    Args:
        head: the head to retrain.

    Returns:
        A new head: exact minimizer of L_b′ on the remaining data, `retrains` incremented.
    """
    retrains = head.retrains + 1
    noise = _draw_noise(head.noise_seed, retrains, head.sigma, head.features.shape[1])
    features, labels = head._remaining()
    return dataclasses.replace(
        head,
        weights=_minimize(features, labels, head.lam, noise),
        noise=noise,
        spent=0.0,
        removals=0,
        retrains=retrains,
    )


def remove_certified(
    head: CertifiedHead, index: int, /, *, retrain_when_exhausted: bool = True
) -> tuple[CertifiedHead, RemovalCertificate]:
    """Removes one example by a Newton step, or retrains when the budget would run out.

    Args:
        head: the head to remove from (not modified).
        index: the example's index in the original training data.
        retrain_when_exhausted: when the Newton step's data-dependent bound would take β past
            the budget, retrain (the default). With False the step is applied anyway and the
            certificate (and every later one until `retrain_certified_head`) reports
            `certified=False`.

    Returns:
        The new head and the removal's certificate.

    Raises:
        CertificationError: if `index` is out of range or already removed, or it is the last
            example left.
    """
    index = _check_index(head, index)
    present = head.present.copy()
    present[index] = False
    features = head.features[present]
    num_remaining = features.shape[0]

    weights = head.weights
    removed_x, removed_y = head.features[index], head.labels[index]
    removed_loss_gradient = -removed_y * scipy.special.expit(-removed_y * (removed_x @ weights))
    delta_gradient = head.lam * weights + removed_loss_gradient * removed_x
    hessian = _hessian(weights, features, head.lam)
    newton_step = scipy.linalg.cho_solve(scipy.linalg.cho_factor(hessian), delta_gradient)

    data_bound = data_dependent_residual_bound(features, newton_step)
    step_bound = newton_step_residual_bound(num_remaining, newton_step)
    worst_bound = worst_case_residual_bound(num_remaining, lam=head.lam)

    after = dataclasses.replace(head, present=present)
    retrained = retrain_when_exhausted and head.spent + data_bound > head.budget
    if retrained:
        after = retrain_certified_head(after)
    else:
        after = dataclasses.replace(
            after,
            weights=weights + newton_step,
            spent=head.spent + data_bound,
            removals=head.removals + 1,
        )
    residual_norm = float(np.linalg.norm(after.gradient()))
    certificate = RemovalCertificate(
        removed=index,
        retrained=bool(retrained),
        residual_norm=residual_norm,
        data_dependent_bound=data_bound,
        newton_step_bound=step_bound,
        worst_case_bound=worst_bound,
        spent=after.spent,
        budget=after.budget,
        epsilon=after.epsilon,
        delta=after.delta,
    )
    return after, certificate


def _objective(weights, features, labels, lam, noise) -> float:
    margins = labels * (features @ weights)
    # logaddexp(0, −m) = log(1 + e^{−m}) without overflow for large negative margins.
    losses = np.logaddexp(0.0, -margins)
    num_examples = features.shape[0]
    return float(losses.sum() + 0.5 * lam * num_examples * weights @ weights + noise @ weights)


def _gradient(weights, features, labels, lam, noise) -> np.ndarray:
    margins = labels * (features @ weights)
    loss_slopes = -labels * scipy.special.expit(-margins)
    return features.T @ loss_slopes + lam * features.shape[0] * weights + noise


def _hessian(weights, features, lam) -> np.ndarray:
    # ℓ''(z) = s(z)s(−z) does not depend on the label's sign.
    scores = features @ weights
    curvatures = scipy.special.expit(scores) * scipy.special.expit(-scores)
    hessian = (features * curvatures[:, None]).T @ features
    hessian[np.diag_indices_from(hessian)] += lam * features.shape[0]
    return hessian


def _minimize(features, labels, lam, noise) -> np.ndarray:
    """Newton's method with Armijo backtracking on the strongly convex L_b."""
    weights = np.zeros(features.shape[1])
    tolerance = _TRAINING_TOLERANCE * max(1, features.shape[0])
    for _ in range(_MAX_NEWTON_STEPS):
        gradient = _gradient(weights, features, labels, lam, noise)
        if not np.all(np.isfinite(gradient)):
            raise CertificationError("Training met a non-finite gradient; check the features.")
        if np.linalg.norm(gradient) <= tolerance:
            return weights
        hessian = _hessian(weights, features, lam)
        direction = -scipy.linalg.cho_solve(scipy.linalg.cho_factor(hessian), gradient)
        slope = float(gradient @ direction)
        value = _objective(weights, features, labels, lam, noise)
        step = 1.0
        # Near the optimum the objective's decrease drowns in rounding while the full Newton
        # step is still right, so after 30 halvings the full step is taken anyway.
        for _ in range(30):
            trial = _objective(weights + step * direction, features, labels, lam, noise)
            if trial <= value + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            step = 1.0
        weights = weights + step * direction
    raise CertificationError(
        f"Newton's method did not reach ‖∇L_b‖ ≤ {tolerance:.1e} in {_MAX_NEWTON_STEPS} steps; "
        "raise lam."
    )


def _draw_noise(seed: int, retrain_count: int, sigma: float, dim: int) -> np.ndarray:
    return sigma * np.random.default_rng([seed, retrain_count]).standard_normal(dim)


def _check_data(features: np.ndarray, labels: np.ndarray) -> None:
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise CertificationError(
            f"features must have shape (n, d) with n, d ≥ 1, got {features.shape}."
        )
    if labels.shape != (features.shape[0],):
        raise CertificationError(
            f"labels must have shape ({features.shape[0]},), got {labels.shape}."
        )
    if not np.all(np.isfinite(features)):
        raise CertificationError("features contain NaN or infinity.")
    largest_norm = float(np.linalg.norm(features, axis=1).max())
    if largest_norm > 1.0 + _NORM_SLACK:
        raise CertificationError(
            f"Every feature row needs ‖x‖₂ ≤ 1 for the bounds; the largest is {largest_norm:.6g}."
        )
    if not np.all(np.isin(labels, (-1, 1))):
        raise CertificationError(f"labels must be −1 or +1, got values {np.unique(labels)[:5]}.")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        is_number = isinstance(value, int | float | np.floating | np.integer)
        if isinstance(value, bool) or not (is_number and value > 0):
            raise CertificationError(f"{name} must be a positive number, got {value!r}.")
        if not math.isfinite(value):
            raise CertificationError(f"{name} must be finite, got {value!r}.")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float | np.floating) and 0.0 < delta < 1.0):
        raise CertificationError(f"delta must lie in (0, 1), got {delta!r}.")


def _check_index(head: CertifiedHead, index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int | np.integer):
        raise CertificationError(f"The index to remove must be an integer, got {index!r}.")
    index = int(index)
    if not 0 <= index < head.present.shape[0]:
        raise CertificationError(
            f"Index {index} is not in the training data of {head.present.shape[0]} examples."
        )
    if not head.present[index]:
        raise CertificationError(f"Example {index} was already removed.")
    if head.n == 1:
        raise CertificationError(
            "Cannot remove the last example: the objective needs at least one."
        )
    return index
