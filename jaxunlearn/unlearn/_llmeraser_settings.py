"""LLMEraser's settings: the curvature, one small config per solver, the mode and the budget.

The defaults are the best recipe measured on the embedded default: a Newton step on the
objective after the request, with the Gauss-Newton curvature of a 96-example sample less the
request's examples, solved by conjugate gradients truncated at 7 steps, and no damping beyond
the fine-tune's own L2 penalty. Each leaf field becomes one command-line flag named after the
field (or after its `flag` metadata), so leaf names are unique across the whole tree.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

from jaxunlearn.curvature import CURVATURE_KINDS, CurvatureKind
from jaxunlearn.errors import SettingsError
from jaxunlearn.unlearn._llmeraser_solvers import SOLVERS, Solver

__all__ = [
    "MODES",
    "CGConfig",
    "CurvatureSettings",
    "EraserSettings",
    "LissaConfig",
    "LowRankConfig",
    "SGDConfig",
]

SolverName = Literal["cg", "lissa", "sgd", "lowrank"]
Mode = Literal["influence", "newton"]
MODES: tuple[str, ...] = typing.get_args(Mode)


@dataclasses.dataclass(frozen=True)
class CurvatureSettings:
    """The curvature C the update inverts, the examples it is taken over, and its damping.

    Attributes:
        kind: `"gauss_newton"` (positive semi-definite) or `"hessian"` (the paper's choice;
            indefinite away from a minimum, so its damping must also lift the most negative
            eigenvalue, which shrinks the update: on the embedded default the Hessian needed
            λ ≈ 0.27 against λ ≈ 0.01 for Gauss-Newton). Flag `--curvature`.
        damping: λ; the solves use C + (μ + λ)I. None: 0 when the adapter was trained with an
            L2 penalty μ > 0 (the penalty's μI keeps the solve well-posed), else
            `relative_damping · λ_max + max(0, −λ_min)` from a Lanczos estimate of the
            spectrum of the fixed sample's curvature. 0 needs μ > 0.
        relative_damping: The fraction of λ_max in the damping chosen from the spectrum.
        l2_regularization: μ of the fine-tune's L2 penalty (μ/2)‖Θ‖², part of the objective
            the update differentiates: μI joins C and μΘ the Newton step's gradient. None:
            the adapter's own μ (from its fine-tune's train_config), else 0.
        sample_size: Examples in the fixed curvature sample (of cg, lowrank, the spectrum
            estimate and sgd's selection criterion); the whole dataset when it is smaller.
        batch_size: Rows per batch of gradients and of curvature products.
        spectrum_steps: Lanczos steps of the spectrum estimate (the low-rank route takes its
            estimate from its own `rank` steps instead).
        leave_out_request: Take C over the examples the request leaves untouched (the fixed
            sample of cg and of sgd's selection, the mini-batch pool of lissa and sgd): the
            curvature of the objective after the request, at which the influence of a removed
            group is better estimated (Koh et al. 2019, Basu et al. 2020). Not available with
            `lowrank`, whose eigenbasis is prepared before any request.
        linearization_budget_gib: The memory per device the fixed sample's linearizations may
            take: within it each batch is linearized once and every product reuses it; beyond
            it every product recomputes each batch's, one batch at a time, so that memory is
            bounded by one batch (the same operator, at a forward pass more per batch and
            product). 0 always recomputes.
    """

    kind: CurvatureKind = dataclasses.field(default="gauss_newton", metadata={"flag": "curvature"})
    damping: float | None = None
    relative_damping: float = 1e-2
    l2_regularization: float | None = None
    sample_size: int = 96
    batch_size: int = 8
    spectrum_steps: int = 20
    leave_out_request: bool = True
    linearization_budget_gib: float = 4.0

    def __post_init__(self):
        if self.kind not in CURVATURE_KINDS:
            raise SettingsError(f"curvature must be one of {CURVATURE_KINDS}, got {self.kind!r}.")
        _check_non_negative_or_none("damping", self.damping)
        _check_non_negative_or_none("l2_regularization", self.l2_regularization)
        if self.damping == 0 and self.l2_regularization == 0:
            raise SettingsError(
                "damping 0 needs l2_regularization > 0: without a penalty nothing keeps the "
                "solve well-posed (leave the damping unset to choose it from the spectrum)."
            )
        _check_positive_float("relative_damping", self.relative_damping)
        for name in ("sample_size", "batch_size", "spectrum_steps"):
            _check_positive_int(name, getattr(self, name))
        _check_bool("leave_out_request", self.leave_out_request)
        budget = self.linearization_budget_gib
        if not (_is_real(budget) and math.isfinite(budget) and budget >= 0):
            raise SettingsError(
                f"linearization_budget_gib must be a finite number of GiB >= 0, got {budget!r}."
            )


@dataclasses.dataclass(frozen=True)
class CGConfig:
    """Conjugate gradients on the fixed curvature sample (deterministic; needs C + (μ + λ)I
    positive definite, and stops with INDEFINITE when it meets a direction that is not).

    Attributes:
        tol: The relative residual at which cg stops; stopping at `max_steps` first makes the
            update approximate.
    """

    tol: float = 1e-3

    def __post_init__(self):
        _check_positive_float("tol", self.tol)


@dataclasses.dataclass(frozen=True)
class LissaConfig:
    """LiSSA with mini-batch curvature products, x_{t+1} = b + (I − (C_B + (μ + λ)I)/s) x_t.

    Attributes:
        scale_margin: LiSSA's scale s as a multiple of the damped largest eigenvalue estimate
            max(0, λ_max) + μ + λ. Mini-batch eigenvalues exceed the mean's, hence a margin;
            the series diverges unless s exceeds half of every damped mini-batch eigenvalue.
    """

    scale_margin: float = 2.0

    def __post_init__(self):
        _check_positive_float("scale_margin", self.scale_margin)
        if not self.scale_margin > 0.5:
            raise SettingsError(
                f"scale_margin must exceed 0.5 (below it LiSSA diverges even on the mean "
                f"curvature), got {self.scale_margin!r}."
            )


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    """The paper's stochastic solver: Adam on ½xᵀ(C_B + (μ + λ)I)x − bᵀx with mini-batch
    products, keeping the iterate with the lowest value of the quadratic on the fixed sample.

    Attributes:
        learning_rate: Adam's learning rate in units of the RMS coordinate of b / λ_max (one
            gradient-descent step on the quadratic), so that it does not depend on the scale of
            the gradients or the number of adapter parameters.
        selection_checks: How many times, evenly over `max_steps`, the iterate is scored by the
            quadratic on the fixed sample (the best one scored is the answer).
    """

    learning_rate: float = 1.0
    selection_checks: int = 5

    def __post_init__(self):
        _check_positive_float("learning_rate", self.learning_rate)
        _check_positive_int("selection_checks", self.selection_checks)


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    """The top eigenpairs (U, Λ) of C, prepared once by Lanczos; then the inverse is applied in
    closed form, U diag(1/(Λ + μ + λ)) Uᵀb + (b − UUᵀb)/(μ + λ).

    Attributes:
        rank: Lanczos steps, and eigenpairs kept.
    """

    rank: int = 32

    def __post_init__(self):
        _check_positive_int("rank", self.rank)


@dataclasses.dataclass(frozen=True)
class EraserSettings:
    """How LLMEraser computes its update.

    Attributes:
        solver: `"cg"` (conjugate gradients on the fixed curvature sample), `"lissa"` (LiSSA
            with mini-batch products), `"sgd"` (Adam on the quadratic with mini-batch
            products) or `"lowrank"` (a prepared eigenbasis, applied in closed form).
        mode: `"newton"`, one Newton step on the objective after the request,
            Θ_new = Θ̂ − (C + (μ + λ)I)⁻¹ ∇R_after(Θ̂), which also corrects for the fine-tune not
            being exactly at a minimum; or `"influence"`, the paper's update
            Θ_new = Θ̂ + (1/n)(C + (μ + λ)I)⁻¹ Σ_S [G(z) − G(z_δ)].
        max_steps: The work budget: iterations of cg, lissa and sgd (unused by lowrank).
        seed: Seeds the curvature sample, the Lanczos start vectors and the mini-batches.
        curvature: The curvature and its damping.
        cg: The settings of `"cg"`.
        lissa: The settings of `"lissa"`.
        sgd: The settings of `"sgd"`.
        lowrank: The settings of `"lowrank"`.
    """

    solver: SolverName = "cg"
    mode: Mode = "newton"
    max_steps: int = 7
    seed: int = 0
    curvature: CurvatureSettings = dataclasses.field(default_factory=CurvatureSettings)
    cg: CGConfig = dataclasses.field(default_factory=CGConfig)
    lissa: LissaConfig = dataclasses.field(default_factory=LissaConfig)
    sgd: SGDConfig = dataclasses.field(default_factory=SGDConfig)
    lowrank: LowRankConfig = dataclasses.field(default_factory=LowRankConfig)

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise SettingsError(f"solver must be one of {tuple(SOLVERS)}, got {self.solver!r}.")
        if self.mode not in MODES:
            raise SettingsError(f"mode must be one of {MODES}, got {self.mode!r}.")
        _check_positive_int("max_steps", self.max_steps)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SettingsError(f"seed must be an integer >= 0, got {self.seed!r}.")
        for name, expected in _NESTED.items():
            value = getattr(self, name)
            if not isinstance(value, expected):
                raise SettingsError(
                    f"{name} must be a {expected.__name__}, got {type(value).__name__}."
                )
        self.strategy.check(self)

    @property
    def strategy(self) -> Solver:
        """The solver's strategy object (the one place the `solver` name is looked up)."""
        return SOLVERS[self.solver]


_NESTED = {
    "curvature": CurvatureSettings,
    "cg": CGConfig,
    "lissa": LissaConfig,
    "sgd": SGDConfig,
    "lowrank": LowRankConfig,
}


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SettingsError(f"{name} must be a positive integer, got {value!r}.")


def _check_positive_float(name: str, value) -> None:
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise SettingsError(f"{name} must be a positive finite number, got {value!r}.")


def _check_non_negative_or_none(name: str, value) -> None:
    if value is not None and not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise SettingsError(f"{name} must be a finite number >= 0 (or unset), got {value!r}.")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise SettingsError(f"{name} must be True or False, got {value!r}.")


def _is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
