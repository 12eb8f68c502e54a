"""LLMEraser: influence-function unlearning of a LoRA adapter (arXiv 2412.00383).

The update that estimates retraining without (or with corrected) examples S is

    ΔΘ = (1/n) (C + λI)⁻¹ Σ_{z∈S} [G(z) − G(z_δ)],        Θ_new = Θ̂ + ΔΘ,

with G the gradient of the per-example loss at the fine-tuned adapter Θ̂, C the curvature of the
mean training objective (Hessian or Gauss-Newton), λ an explicit damping, and G(z_δ) = 0 for a
removal. `mode="newton"` instead takes one Newton step on the objective after the request,
Θ_new = Θ̂ − (C + λI)⁻¹ ∇R_after(Θ̂), which also corrects for the fine-tune not being exactly at
a minimum; ∇R_after comes from the full-data gradient (prepared once) minus the request's own
gradients, so a request still costs only its own examples.

When the fine-tune minimized a penalized objective, mean loss + (μ/2)‖Θ‖²
(`TrainConfig.l2_regularization`), the penalty is part of the objective: its curvature μI joins
C and its gradient μΘ joins the Newton step's.

`leave_out_request=True` takes C over the examples the request leaves untouched instead of the
whole training set: the curvature of the objective after the request, at which the influence of
a removed group is better estimated (the group-influence correction of Koh et al. 2019 and Basu
et al. 2020). Otherwise the removed examples' own curvature holds the update back.

Everything that does not depend on the request is computed once by `prepare_llmeraser` and
reused: the curvature sample, the damping (from a Lanczos estimate of the spectrum), the
low-rank eigenbasis, the full-data gradient. `save_preparation` / `load_preparation` keep it
on disk with orbax, keyed to the adapter it was computed at.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import kernels
from jaxunlearn import curvature
from jaxunlearn.batch import Batch
from jaxunlearn.checkpoint import load_adapter, read_adapter_metadata, save_adapter
from jaxunlearn.data import Example, TokenizedDataset, tokenize_examples
from jaxunlearn.errors import UserError
from jaxunlearn.unlearn._ledger import Ledger, LedgerEntry
from jaxunlearn.unlearn._requests import Request, ResolvedRequest, resolve_request

__all__ = [
    "MODES",
    "SOLVERS",
    "EraserResult",
    "EraserSettings",
    "Preparation",
    "PreparationMismatchError",
    "llmeraser",
    "load_preparation",
    "prepare_llmeraser",
    "save_preparation",
]

logger = logging.getLogger(__name__)

SOLVERS = ("cg", "lissa", "sgd", "lowrank")
MODES = ("influence", "newton")

_PREPARATION_FORMAT = "jaxunlearn.llmeraser-preparation/1"


class PreparationMismatchError(UserError, ValueError):
    """A saved preparation belongs to another adapter, dataset or settings."""


# Settings that a preparation fixes: a request made with a preparation uses the preparation's.
_PREPARED_FIELDS = (
    "curvature",
    "damping",
    "l2_regularization",
    "relative_damping",
    "sample_size",
    "spectrum_steps",
)


@dataclasses.dataclass(frozen=True)
class EraserSettings:
    """How LLMEraser computes its update.

    Attributes:
        solver: `"cg"` (conjugate gradients on a fixed curvature sample), `"lissa"` (LiSSA with
            mini-batch products, scale from the spectrum estimate), `"sgd"` (the paper's
            stochastic solver: Adam on ½xᵀ(C_B + λI)x − bᵀx with mini-batch products, the
            iterate chosen by the quadratic's value on the fixed sample) or `"lowrank"` (the
            top-`rank` eigenpairs of C, prepared once; then the inverse is applied in closed
            form).
        mode: `"influence"` (the paper's update) or `"newton"` (a Newton step on the objective
            after the request).
        curvature: `"gauss_newton"` (positive semi-definite; the default) or `"hessian"` (the
            paper's choice; indefinite away from a minimum, so its damping must also lift the
            most negative eigenvalue, which shrinks the update: on the embedded default the
            Hessian needed λ ≈ 0.27 against λ ≈ 0.01 for Gauss-Newton).
        damping: λ; `None` chooses it as `relative_damping · λ_max + max(0, −λ_min)` from a
            Lanczos estimate of the spectrum of the fixed sample's curvature. May be 0 when
            `l2_regularization` is positive (the penalty's curvature μI then keeps the solve
            well-posed).
        l2_regularization: μ of the fine-tune's L2 penalty (`TrainConfig.l2_regularization`);
            0 for a fine-tune without one. The solves use C + (μ + λ)I.
        relative_damping: The fraction of λ_max used when `damping` is None.
        sample_size: Examples in the fixed curvature sample (cg, lowrank, the spectrum, the
            sgd selection criterion); the whole dataset when it is smaller.
        batch_size: Rows per batch for gradients and for mini-batch products.
        max_steps: Iterations of cg, lissa and sgd.
        tol: Relative residual at which cg stops.
        rank: Lanczos steps (and eigenpairs kept) of the low-rank route.
        spectrum_steps: Lanczos steps of the spectrum estimate (the low-rank route takes its
            estimate from its own `rank` Lanczos steps instead).
        learning_rate: Adam's learning rate for `"sgd"`, in units of the RMS coordinate of
            b / λ_max (one gradient-descent step on the quadratic), so the setting does not
            depend on the scale of the gradients or the number of adapter parameters.
        leave_out_request: Leave the examples the request touches out of the curvature (the
            fixed sample of cg and of sgd's selection, the mini-batch pool of lissa and sgd):
            the curvature after the request. Not available with `"lowrank"`, whose eigenbasis
            is prepared before any request.
        seed: Seeds the curvature sample, the Lanczos start vectors and the mini-batches.
    """

    solver: Literal["cg", "lissa", "sgd", "lowrank"] = "cg"
    mode: Literal["influence", "newton"] = "influence"
    curvature: curvature.CurvatureKind = "gauss_newton"
    damping: float | None = None
    l2_regularization: float = 0.0
    relative_damping: float = 1e-2
    sample_size: int = 128
    batch_size: int = 32
    max_steps: int = 30
    tol: float = 1e-3
    rank: int = 32
    spectrum_steps: int = 20
    learning_rate: float = 1.0
    leave_out_request: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}.")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
        if self.curvature not in curvature.CURVATURE_KINDS:
            raise ValueError(
                f"curvature must be one of {curvature.CURVATURE_KINDS}, got {self.curvature!r}."
            )
        if not (math.isfinite(self.l2_regularization) and self.l2_regularization >= 0):
            raise ValueError(
                f"l2_regularization must be a finite number >= 0, got {self.l2_regularization!r}."
            )
        if self.damping is not None:
            if not (math.isfinite(self.damping) and self.damping >= 0):
                raise ValueError(f"damping must be a finite number >= 0, got {self.damping!r}.")
            if self.damping == 0 and self.l2_regularization == 0:
                raise ValueError(
                    "damping 0 needs l2_regularization > 0: without a penalty nothing keeps "
                    "the solve well-posed."
                )
        for name in ("relative_damping", "tol", "learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
        if self.leave_out_request and self.solver == "lowrank":
            raise ValueError(
                "leave_out_request needs solver 'cg', 'lissa' or 'sgd': the lowrank eigenbasis "
                "is prepared before any request, over the whole curvature sample."
            )
        for name in ("sample_size", "batch_size", "max_steps", "rank", "spectrum_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

    def preparation_key(self) -> dict[str, Any]:
        """The settings a preparation depends on (the rest may change between requests)."""
        prepared = {name: getattr(self, name) for name in (*_PREPARED_FIELDS, "seed")}
        prepared["rank"] = self.rank if self.solver == "lowrank" else None
        return prepared


@dataclasses.dataclass
class Preparation:
    """The request-independent work of LLMEraser at one adapter, reusable across requests.

    Attributes:
        settings: The settings it was prepared with.
        adapter_digest: SHA-256 of the LoRA arrays it was computed at.
        data_digest: SHA-256 of the training set's ids (in order).
        num_examples: n, the number of training examples.
        sample_indices: Positions of the fixed curvature sample in the training set.
        spectrum: Extreme eigenvalue estimates of the sample's curvature (NaN when nothing
            needed them: CG with an explicit damping).
        damping: The λ every solve of this preparation uses.
        eigenpairs: The top eigenpairs of the curvature (`"lowrank"` only).
        full_gradient: Σ G(z) over the whole training set (`"newton"` only).
        seconds: Wall-clock of the preparation.
    """

    settings: EraserSettings
    adapter_digest: str
    data_digest: str
    num_examples: int
    sample_indices: np.ndarray
    spectrum: curvature.Spectrum
    damping: float
    eigenpairs: kernels.Eigenpairs | None
    full_gradient: Any | None
    seconds: float
    # The linearized curvature of the sample, rebuilt on demand and never saved.
    _operator: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def shift(self) -> float:
        """What the solves add to the curvature: μ + λ (the penalty's and the damping's)."""
        return self.settings.l2_regularization + self.damping

    def operator(self, graphdef, lora, base, data: TokenizedDataset):
        """The fixed-sample curvature operator v ↦ Cv (linearized on first use)."""
        if self._operator is None:
            batches = _length_sorted_batches(data, self.sample_indices, self.settings.batch_size)
            self._operator = curvature.fixed_curvature(
                graphdef, lora, base, batches, kind=self.settings.curvature
            )
        return self._operator


@dataclasses.dataclass
class EraserResult:
    """What one LLMEraser request did.

    Attributes:
        model: The model, holding the updated adapter (unchanged when `applied` is False).
        applied: False when the ledger shows the request was already applied.
        message: A one-line account for people.
        resolved: The request checked against the training set.
        update: ΔΘ (a tree like the LoRA tree), None when not applied.
        solution: The solver's `Solution` (steps, residual, status), None when not applied.
        damping: λ.
        update_norm: ‖ΔΘ‖.
        seconds: Wall-clock of the request itself (gradients, solve, update), preparation
            and compilation excluded.
        compile_seconds: Wall-clock of compiling the request's computations (and running
            each once on padding).
        prepare_seconds: Wall-clock of the preparation this request ran (0 when reused).
        previous: The earlier ledger entry of a repeated request.
    """

    model: nnx.Module
    applied: bool
    message: str
    resolved: ResolvedRequest
    update: Any | None = None
    solution: kernels.Solution | None = None
    damping: float = math.nan
    update_norm: float = math.nan
    seconds: float = 0.0
    compile_seconds: float = 0.0
    prepare_seconds: float = 0.0
    previous: LedgerEntry | None = None

    def figures(self) -> dict[str, Any]:
        """The numbers worth recording (JSON-serializable)."""
        if self.solution is None:
            return {"applied": self.applied}
        return {
            "applied": self.applied,
            "damping": self.damping,
            "update_norm": self.update_norm,
            "solver_steps": int(self.solution.steps),
            # The closed-form low-rank route has no residual: None, not NaN, in JSON.
            "solver_residual": _finite_or_none(float(self.solution.residual)),
            "solver_status": kernels.Status(int(self.solution.status)).name,
            "seconds": self.seconds,
            "compile_seconds": self.compile_seconds,
            "prepare_seconds": self.prepare_seconds,
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def prepare_llmeraser(
    model: nnx.Module, data: TokenizedDataset, /, *, settings: EraserSettings = EraserSettings()
) -> Preparation:
    """Does the request-independent work of LLMEraser at the model's current adapter.

    Args:
        model: A LoRA model (its adapter is the fine-tuned Θ̂).
        data: The training set the adapter was fine-tuned on.
        settings: How updates will be computed.

    Returns:
        A `Preparation` to pass to every later `llmeraser` call on this adapter.
    """
    started = time.perf_counter()
    graphdef, lora, base = curvature.split_for_curvature(model)
    n = len(data)
    if n == 0:
        raise ValueError("The training set is empty.")
    rng = np.random.default_rng(settings.seed)
    sample = np.sort(rng.choice(n, min(settings.sample_size, n), replace=False))
    preparation = Preparation(
        settings=settings,
        adapter_digest=_tree_digest(lora),
        data_digest=_data_digest(data),
        num_examples=n,
        sample_indices=sample,
        spectrum=curvature.Spectrum(math.nan, math.nan, (), 0),
        damping=math.nan,
        eigenpairs=None,
        full_gradient=None,
        seconds=0.0,
    )
    operator = preparation.operator(graphdef, lora, base, data)
    key = jax.random.key(settings.seed)
    if settings.solver == "lowrank":
        # One Lanczos run gives both the eigenbasis and the spectrum estimate for the damping.
        start = kernels.tree_random_normal_like(key, lora)
        pairs = curvature.jitted_lanczos(
            operator, start, num_steps=settings.rank, key=jax.random.fold_in(key, 1)
        )
        spectrum = curvature.Spectrum.of(pairs, settings.rank)
        preparation.eigenpairs = pairs
    elif settings.damping is None or settings.solver in ("lissa", "sgd"):
        # Needed for the damping rule, LiSSA's scale and the SGD step size.
        spectrum = curvature.estimate_spectrum(
            operator, lora, num_steps=settings.spectrum_steps, key=key
        )
    else:
        spectrum = curvature.Spectrum(math.nan, math.nan, (), 0)
    damping = (
        settings.damping
        if settings.damping is not None
        else curvature.choose_damping(spectrum, relative=settings.relative_damping)
    )
    preparation.spectrum, preparation.damping = spectrum, damping
    if preparation.eigenpairs is not None and spectrum.smallest + preparation.shift <= 0:
        raise kernels.SolverError(
            f"The low-rank eigenbasis has an eigenvalue {spectrum.smallest:.3g} below "
            f"−(μ + λ) = {-preparation.shift:.3g}; raise the damping or use the Gauss-Newton "
            "curvature."
        )
    if settings.mode == "newton":
        preparation.full_gradient = curvature.objective_gradient(
            graphdef, lora, base, _length_sorted_batches(data, np.arange(n), settings.batch_size)
        )
    jax.block_until_ready(jax.tree.leaves(preparation.__dict__))
    preparation.seconds = time.perf_counter() - started
    return preparation


def llmeraser(
    model: nnx.Module,
    request: Request,
    /,
    *,
    examples: Sequence[Example],
    data: TokenizedDataset,
    tokenizer=None,
    settings: EraserSettings = EraserSettings(),
    preparation: Preparation | None = None,
    ledger: Ledger | None = None,
) -> EraserResult:
    """Applies an unlearning request to the model's LoRA adapter with LLMEraser, in place.

    Args:
        model: The fine-tuned LoRA model; its adapter is replaced by Θ̂ + ΔΘ.
        request: A `Removal`, `QueryEdit` or `ResponseEdit`.
        examples: The training set the adapter was fine-tuned on.
        data: `examples` tokenized (same order), as for training.
        tokenizer: The tokenizer of `data`; needed for edits (to tokenize z_δ).
        settings: How to compute the update (ignored in favour of the preparation's own
            settings for what the preparation fixed).
        preparation: From `prepare_llmeraser` on this adapter and data; prepared here when None
            (and its cost reported in `prepare_seconds`).
        ledger: When given, a request already recorded there is not applied again (the result
            says so), and one touching an example an earlier request removed is an error. The
            caller records the request after saving the adapter (`Ledger.record`).

    Returns:
        An `EraserResult`.

    Raises:
        RequestError: For unknown ids, a removal of everything, a conflicting request.
        PreparationMismatchError: If `preparation` was computed for another adapter or data.
        kernels.SolverError: If the solve failed (diverged, NaN, indefinite); the model is
            left unchanged.
    """
    if list(data.ids) != [example.id for example in examples]:
        raise ValueError("data must be `examples` tokenized, in the same order.")
    resolved = resolve_request(request, examples)
    if ledger is not None:
        previous = ledger.check(resolved)
        if previous is not None:
            message = (
                f"Request {resolved.fingerprint[:12]} was already applied on {previous.created} "
                f"(adapter {previous.adapter}); nothing to do."
            )
            logger.info(message)
            return EraserResult(model, False, message, resolved, previous=previous)
    if resolved.replacements and tokenizer is None:
        raise ValueError("An edit request needs the tokenizer, to tokenize the edited examples.")

    graphdef, lora, base = curvature.split_for_curvature(model)
    prepare_seconds = 0.0
    if preparation is None:
        preparation = prepare_llmeraser(model, data, settings=settings)
        prepare_seconds = preparation.seconds
    else:
        _check_preparation(preparation, lora, data)
        settings = dataclasses.replace(
            settings, **{k: getattr(preparation.settings, k) for k in _PREPARED_FIELDS}
        )
        if settings.mode == "newton" and preparation.full_gradient is None:
            raise PreparationMismatchError(
                "mode='newton' needs a preparation made with mode='newton' (the full gradient)."
            )
        if settings.solver == "lowrank" and preparation.eigenpairs is None:
            raise PreparationMismatchError(
                "solver='lowrank' needs a preparation made with solver='lowrank'."
            )

    batch_size = settings.batch_size
    affected = _length_sorted_batches(data, resolved.indices, batch_size)
    edited = []
    if resolved.replacements:
        edited_data = tokenize_examples(
            resolved.replacements, tokenizer, max_length=data.max_length, buckets=data.buckets
        )
        edited = _length_sorted_batches(edited_data, np.arange(len(edited_data)), batch_size)
    # Compilation is reported apart from the request's cost (metrics.md, "Cost"): the first
    # request on a new batch shape compiles, later ones reuse the executable.
    left_out = resolved.indices if settings.leave_out_request else np.zeros((0,), np.int64)
    compiling = time.perf_counter()
    curvature.warm_up_gradient(graphdef, lora, base, affected + edited)
    if settings.solver == "lowrank":
        _lowrank_apply(preparation, kernels.tree_zeros_like(lora))
    elif settings.solver == "cg":
        # One whole solve, on a right-hand side of the request's tree type (so that it runs the
        # executable the request will): the first run of a compiled loop costs more than later
        # ones, a one-off like compiling. Waited for, since dispatch is asynchronous and the
        # request's clock must not start while it still runs. The operator is built again
        # inside the timed request: its linearization is part of the request's cost.
        operator = _curvature_operator(settings, preparation, left_out, graphdef, lora, base, data)
        probe = jax.tree.map(jnp.ones_like, lora)
        jax.block_until_ready(
            _solve(settings, preparation, probe, operator, left_out, graphdef, lora, base, data)
        )
    zeros = kernels.tree_zeros_like(lora)
    jax.block_until_ready(
        (
            _right_hand_side(zeros, preparation.full_gradient, lora, 1.0, 1.0, 0.0, settings.mode),
            _apply_update(lora, zeros, 1.0),
        )
    )
    compile_seconds = time.perf_counter() - compiling

    started = time.perf_counter()
    operator = _curvature_operator(settings, preparation, left_out, graphdef, lora, base, data)
    change = curvature.objective_gradient(graphdef, lora, base, affected)
    if edited:
        change = kernels.tree_sub(
            change, curvature.objective_gradient(graphdef, lora, base, edited)
        )
    rhs = _right_hand_side(
        change,
        preparation.full_gradient,
        lora,
        float(len(examples)),
        float(len(resolved.examples_after)),
        settings.l2_regularization,
        settings.mode,
    )
    solution = _solve(settings, preparation, rhs, operator, left_out, graphdef, lora, base, data)
    solution.check()
    sign = 1.0 if settings.mode == "influence" else -1.0
    update, new_lora, update_norm = _apply_update(lora, solution.x, sign)
    update_norm = float(update_norm)
    if not math.isfinite(update_norm):
        raise kernels.SolverError("The update is not finite; nothing was changed.")
    jax.block_until_ready(new_lora)
    seconds = time.perf_counter() - started
    nnx.update(model, new_lora)
    penalty = f", μ={settings.l2_regularization:.3g}" if settings.l2_regularization else ""
    message = (
        f"LLMEraser ({settings.mode}, {settings.solver}, {settings.curvature}, "
        f"λ={preparation.damping:.3g}{penalty}) applied a {resolved.kind} of "
        f"{len(resolved.affected)} examples in {seconds:.2f} s: ‖ΔΘ‖ = {update_norm:.4g}, solver "
        f"{kernels.Status(int(solution.status)).name.lower()} after {int(solution.steps)} steps."
    )
    return EraserResult(
        model,
        True,
        message,
        resolved,
        update=update,
        solution=solution,
        damping=preparation.damping,
        update_norm=update_norm,
        seconds=seconds,
        compile_seconds=compile_seconds,
        prepare_seconds=prepare_seconds,
    )


@functools.partial(jax.jit, static_argnames="mode")
def _right_hand_side(change, full_gradient, lora, n, n_after, l2_regularization, mode):
    """b of the solve (C + (μ + λ)I) x = b, in one compiled call (no per-leaf dispatch).

    influence: b = (1/n) Σ_S [G(z) − G(z_δ)], and ΔΘ = x.
    newton: b = ∇R_after = (Σ_all G − Σ_S [G(z) − G(z_δ)]) / n_after + μΘ̂, and ΔΘ = −x.
    """
    if mode == "influence":
        return kernels.tree_scale(1.0 / n, change)
    gradient = kernels.tree_scale(1.0 / n_after, kernels.tree_sub(full_gradient, change))
    return kernels.tree_add_scaled(gradient, l2_regularization, lora)


@jax.jit
def _apply_update(lora, x, sign):
    """(ΔΘ = sign·x, Θ̂ + ΔΘ in Θ̂'s dtypes, ‖ΔΘ‖)."""
    update = kernels.tree_scale(sign, x)
    new_lora = jax.tree.map(lambda p, d: (p + d).astype(p.dtype), lora, update)
    return update, new_lora, kernels.tree_norm(update)


def _curvature_operator(settings, preparation, left_out, graphdef, lora, base, data):
    """The fixed-sample operator of cg and sgd, over the sample less `left_out` (None for the
    solvers that do not use it)."""
    if settings.solver in ("lowrank", "lissa"):
        return None
    if not len(left_out):
        return preparation.operator(graphdef, lora, base, data)
    kept = np.setdiff1d(preparation.sample_indices, left_out)
    if not kept.size:
        raise ValueError(
            "The request touches every example of the curvature sample; nothing is left to "
            "take the curvature over (raise sample_size or set leave_out_request=False)."
        )
    batches = _length_sorted_batches(data, kept, settings.batch_size)
    return curvature.fixed_curvature(graphdef, lora, base, batches, kind=settings.curvature)


def _solve(
    settings, preparation, rhs, operator, left_out, graphdef, lora, base, data
) -> kernels.Solution:
    damping = preparation.shift
    key = jax.random.fold_in(jax.random.key(settings.seed), 3)
    if settings.solver == "lowrank":
        x = _lowrank_apply(preparation, rhs)
        return kernels.Solution(
            x,
            jnp.asarray(0, jnp.int32),
            jnp.asarray(jnp.nan),
            jnp.asarray(kernels.Status.CONVERGED),
        )
    if settings.solver == "cg":
        return curvature.jitted_cg(
            operator, rhs, damping=damping, tol=settings.tol, max_steps=settings.max_steps
        )
    drawn = np.setdiff1d(np.arange(len(data)), left_out)
    pool = data.batch(drawn)
    batch_size = min(settings.batch_size, len(drawn))
    stochastic = curvature.stochastic_curvature(
        graphdef, lora, base, pool, batch_size=batch_size, kind=settings.curvature
    )
    largest = max(preparation.spectrum.largest, 0.0) + damping
    if settings.solver == "lissa":
        # Mini-batch eigenvalues exceed the mean's; a margin keeps the scale above them.
        return curvature.jitted_lissa(
            stochastic,
            rhs,
            damping=damping,
            scale=2.0 * largest,
            max_steps=settings.max_steps,
            key=key,
        )
    return _sgd_with_selection(settings, preparation, rhs, stochastic, largest, key, operator)


def _lowrank_apply(preparation: Preparation, rhs):
    pairs = preparation.eigenpairs
    x = _jitted_lowrank(pairs.eigenvalues, pairs.eigenvectors, preparation.shift, rhs)
    return jax.block_until_ready(x)


@jax.jit
def _jitted_lowrank(eigenvalues, eigenvectors, damping, rhs):
    return kernels.lowrank_inverse(eigenvalues, eigenvectors, damping=damping)(rhs)


def _sgd_with_selection(
    settings, preparation, rhs, stochastic, largest, key, operator
) -> kernels.Solution:
    """The paper's solver: Adam on the quadratic, keeping the iterate with the lowest value of
    the quadratic on the fixed sample (a criterion the mini-batches did not draw from alone)."""
    # Adam moves every coordinate by about its learning rate whatever the gradient's scale, so
    # the rate must carry the units of x: a multiple of the RMS size of one gradient-descent
    # step b / λ_max. (A rate in units of 1 / λ_max alone overshoots by orders of magnitude
    # when the adapter has many small coordinates.)
    size = sum(leaf.size for leaf in jax.tree.leaves(rhs))
    step_size = float(kernels.tree_norm(rhs)) / math.sqrt(size) / largest
    learning_rate = settings.learning_rate * step_size
    solver = kernels.sgd_quadratic_solver(
        stochastic, damping=preparation.shift, optimizer=optax.adam(learning_rate), key=key
    )

    def quadratic(x):
        curved = kernels.tree_add_scaled(operator(x), preparation.shift, x)
        return 0.5 * kernels.tree_vdot(x, curved) - kernels.tree_vdot(rhs, x)

    checkpoints = max(1, min(settings.max_steps, 5))
    per_segment = math.ceil(settings.max_steps / checkpoints)
    state = solver.init(rhs)
    best_x, best_value = kernels.tree_zeros_like(rhs), 0.0
    for _ in range(checkpoints):
        state = _sgd_segment(
            stochastic,
            preparation.shift,
            key,
            state,
            steps=per_segment,
            learning_rate=learning_rate,
        )
        if int(state.status) not in (kernels.Status.RUNNING,):
            break
        value = float(quadratic(state.x))
        if value < best_value:
            best_x, best_value = state.x, value
    status = state.status
    if int(status) == kernels.Status.RUNNING:
        status = jnp.asarray(kernels.Status.MAX_STEPS, jnp.int32)
    finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(best_x))
    if not finite:
        status = jnp.asarray(kernels.Status.NONFINITE, jnp.int32)
    return kernels.Solution(best_x, state.steps, state.relative_residual, status)


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate"))
def _sgd_segment(stochastic, damping, key, state, *, steps, learning_rate):
    # The operator is an argument (its arrays are inputs, not constants of the compiled loop).
    solver = kernels.sgd_quadratic_solver(
        stochastic, damping=damping, optimizer=optax.adam(learning_rate), key=key
    )
    return jax.lax.fori_loop(0, steps, lambda _, current: solver.step(current), state)


def _length_sorted_batches(
    data: TokenizedDataset, indices: Sequence[int] | np.ndarray, batch_size: int
) -> list[Batch]:
    """Batches of the examples at `indices`, grouped by length to pad little."""
    indices = np.asarray(indices, np.int64)
    ordered = indices[np.argsort(data.lengths[indices], kind="stable")]
    return [
        data.batch(ordered[start : start + batch_size], batch_size=batch_size)
        for start in range(0, len(ordered), batch_size)
    ]


def _tree_digest(tree) -> str:
    """SHA-256 of a tree's arrays (shapes, dtypes and bytes, in leaf order)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        array = np.asarray(leaf)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _data_digest(data: TokenizedDataset) -> str:
    return hashlib.sha256(json.dumps(list(data.ids)).encode()).hexdigest()


def _check_preparation(preparation: Preparation, lora, data: TokenizedDataset) -> None:
    if preparation.data_digest != _data_digest(data):
        raise PreparationMismatchError(
            "The preparation was computed on another training set (its example ids differ)."
        )
    if preparation.adapter_digest != _tree_digest(lora):
        # Reusing curvature after an earlier update is what LLMEraser does for a stream of
        # requests; the difference is second order in the earlier update.
        logger.info("Reusing a preparation computed at an earlier version of this adapter.")


def save_preparation(preparation: Preparation, path: str | os.PathLike, /) -> None:
    """Saves a preparation (arrays with orbax, the rest as JSON) to a new directory."""
    tree = {
        "sample_indices": np.asarray(preparation.sample_indices),
        "eigenvalues": None
        if preparation.eigenpairs is None
        else np.asarray(preparation.eigenpairs.eigenvalues),
        "eigenvectors": None
        if preparation.eigenpairs is None
        else preparation.eigenpairs.eigenvectors,
        "eigen_residuals": None
        if preparation.eigenpairs is None
        else np.asarray(preparation.eigenpairs.residuals),
        "full_gradient": preparation.full_gradient,
    }
    tree = {name: value for name, value in tree.items() if value is not None}
    metadata = {
        "format": _PREPARATION_FORMAT,
        "settings": dataclasses.asdict(preparation.settings),
        "adapter_digest": preparation.adapter_digest,
        "data_digest": preparation.data_digest,
        "num_examples": preparation.num_examples,
        "spectrum": preparation.spectrum._asdict(),
        "damping": preparation.damping,
        "seconds": preparation.seconds,
        "num_samples": len(preparation.sample_indices),
        "eigenvalue_dtype": None
        if preparation.eigenpairs is None
        else str(np.asarray(preparation.eigenpairs.eigenvalues).dtype),
    }
    save_adapter(path, tree, metadata=metadata)


def load_preparation(path: str | os.PathLike, model: nnx.Module, /) -> Preparation:
    """Loads a preparation saved by `save_preparation` for `model`'s adapter structure."""
    metadata = read_adapter_metadata(path)
    if metadata.get("format") != _PREPARATION_FORMAT:
        raise PreparationMismatchError(f"{os.fspath(path)} is not an LLMEraser preparation.")
    settings = EraserSettings(**metadata["settings"])
    _, lora, _ = curvature.split_for_curvature(model)
    target: dict[str, Any] = {
        "sample_indices": np.zeros((metadata["num_samples"],), np.int64),
    }
    if settings.solver == "lowrank":
        rank = settings.rank
        dtype = np.dtype(metadata["eigenvalue_dtype"])
        target["eigenvalues"] = np.zeros((rank,), dtype)
        target["eigen_residuals"] = np.zeros((rank,), dtype)
        target["eigenvectors"] = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct((rank, *leaf.shape), leaf.dtype), lora
        )
    if settings.mode == "newton":
        target["full_gradient"] = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), lora
        )
    tree, _ = load_adapter(path, target=target)
    spectrum = metadata["spectrum"]
    eigenpairs = None
    if "eigenvalues" in tree:
        eigenpairs = kernels.Eigenpairs(
            jnp.asarray(tree["eigenvalues"]),
            tree["eigenvectors"],
            jnp.asarray(tree["eigen_residuals"]),
        )
    return Preparation(
        settings=settings,
        adapter_digest=metadata["adapter_digest"],
        data_digest=metadata["data_digest"],
        num_examples=metadata["num_examples"],
        sample_indices=np.asarray(tree["sample_indices"]),
        spectrum=curvature.Spectrum(
            spectrum["largest"],
            spectrum["smallest"],
            tuple(spectrum["ritz_values"]),
            spectrum["num_steps"],
        ),
        damping=metadata["damping"],
        eigenpairs=eigenpairs,
        full_gradient=tree.get("full_gradient"),
        seconds=metadata["seconds"],
    )
