"""LLMEraser's solvers of (C + (μ + λ)I) x = b, one strategy object each.

A strategy says what it needs prepared (a spectrum estimate for its scale, an eigenbasis),
whether a request's solve takes products with the fixed sample's curvature, whether it copes
with an indefinite curvature, what to compile before a timed request, how to solve, and how to
read its result (approximate by construction or only when its budget ran out). `SOLVERS` maps
each `EraserSettings.solver` name to its strategy: the only place that name is dispatched on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxunlearn import curvature, kernels
from jaxunlearn.data import TokenizedDataset
from jaxunlearn.errors import SettingsError
from jaxunlearn.parallel import ONE_DEVICE, Placement

if TYPE_CHECKING:
    from jaxunlearn.unlearn._llmeraser_preparation import EraserPreparation
    from jaxunlearn.unlearn._llmeraser_settings import EraserSettings

__all__ = ["SOLVERS", "SolveInputs", "Solver"]


@dataclasses.dataclass(frozen=True)
class SolveInputs:
    """What a solver may draw on for one request.

    Attributes:
        settings: The request's settings (settled).
        preparation: The request-independent work at this adapter.
        graphdef, lora, base: The model, split by `curvature.split_for_curvature`.
        data: The training set, tokenized.
        left_out: Positions of the examples left out of the curvature (empty unless
            `leave_out_request`).
        operator: v ↦ Cv over the fixed sample less `left_out`; None for a solver that does
            not use it.
        placement: Where the model lives; drawn mini-batches are placed with it.
    """

    settings: EraserSettings
    preparation: EraserPreparation
    graphdef: nnx.GraphDef
    lora: Any
    base: Any
    data: TokenizedDataset
    left_out: np.ndarray
    operator: Any = None
    placement: Placement = ONE_DEVICE


class Solver:
    """A solver of LLMEraser's linear system.

    Attributes:
        name: The `EraserSettings.solver` name.
        uses_fixed_sample: A request's solve takes products with the fixed sample's curvature
            (built once per request).
        needs_spectrum: Its scale or step size comes from the spectrum estimate, so the
            preparation estimates one even when the damping is given.
        detects_indefinite: It stops with status INDEFINITE on a direction of non-positive
            curvature; the others would silently return garbage, so an indefinite estimate is
            refused before they run.
        leaves_out_request: It can take the curvature without the request's examples.
    """

    name: ClassVar[str]
    uses_fixed_sample: ClassVar[bool] = False
    needs_spectrum: ClassVar[bool] = False
    detects_indefinite: ClassVar[bool] = False
    leaves_out_request: ClassVar[bool] = True

    def check(self, settings: EraserSettings, /) -> None:
        """Raises `SettingsError` if the settings ask for what this solver cannot do."""
        if settings.curvature.leave_out_request and not self.leaves_out_request:
            able = ", ".join(repr(name) for name, s in SOLVERS.items() if s.leaves_out_request)
            raise SettingsError(
                f"leave_out_request needs solver {able}: the {self.name} route prepares its "
                "curvature before any request, over the whole sample; set "
                "leave_out_request=False (--no-leave-out-request)."
            )

    def eigenbasis_rank(self, settings: EraserSettings, /) -> int | None:
        """The number of eigenpairs to prepare (None: none)."""
        return None

    def check_curvature(self, preparation: EraserPreparation, /) -> None:
        """Refuses, before any work, an estimate saying C + (μ + λ)I is indefinite.

        Raises:
            kernels.SolverError: If this solver cannot handle it.
        """
        smallest, shift = preparation.spectrum.smallest, preparation.shift
        # A NaN estimate (none was needed) compares False: nothing to refuse.
        if self.detects_indefinite or not smallest + shift <= 0:
            return
        raise kernels.SolverError(
            f"The curvature's smallest eigenvalue estimate {smallest:.3g} is at or below "
            f"−(μ + λ) = {-shift:.3g}: C + (μ + λ)I is indefinite, which solver {self.name!r} "
            f"cannot solve. Set the damping above {-smallest - preparation.l2_regularization:.3g} "
            "(on an adapter trained without a penalty, a damping left unset is chosen to lift "
            "the most negative eigenvalue), or use the Gauss-Newton curvature."
        )

    def warm_up(self, inputs: SolveInputs, /) -> None:
        """Compiles (and runs once) what `solve` runs for this request's tree type."""

    def solve(self, inputs: SolveInputs, rhs, /) -> kernels.Solution:
        """x with (C + (μ + λ)I) x ≈ rhs."""
        raise NotImplementedError

    def approximate(self, solution: kernels.Solution, /) -> bool:
        """Whether the answer is approximate (by construction, or its budget ran out)."""
        return True

    def converged(self, solution: kernels.Solution, /) -> bool | None:
        """Whether it reached a tolerance (None: not an iterative solve)."""
        return False


class ConjugateGradients(Solver):
    """Conjugate gradients on the fixed sample's curvature, until `tol` or `max_steps`."""

    name = "cg"
    uses_fixed_sample = True
    detects_indefinite = True

    def warm_up(self, inputs: SolveInputs, /) -> None:
        # One whole solve on a right-hand side of the request's tree type, so that it runs the
        # executable the request will: the first run of a compiled loop costs more than later
        # ones, a one-off like compiling. Waited for, since dispatch is asynchronous and the
        # request's clock must not start while it still runs.
        probe = jax.tree.map(jnp.ones_like, inputs.lora)
        jax.block_until_ready(self.solve(inputs, probe))

    def solve(self, inputs: SolveInputs, rhs, /) -> kernels.Solution:
        settings = inputs.settings
        return curvature.jitted_cg(
            inputs.operator,
            rhs,
            damping=inputs.preparation.shift,
            tol=settings.cg.tol,
            max_steps=settings.max_steps,
        )

    def approximate(self, solution: kernels.Solution, /) -> bool:
        # Stopping at max_steps is a budget the settings asked for: the answer is truncated.
        return kernels.Status(int(solution.status)) == kernels.Status.MAX_STEPS

    def converged(self, solution: kernels.Solution, /) -> bool | None:
        return kernels.Status(int(solution.status)) == kernels.Status.CONVERGED


class Lissa(Solver):
    """LiSSA with a fresh mini-batch per product, its scale from the spectrum estimate."""

    name = "lissa"
    needs_spectrum = True

    def solve(self, inputs: SolveInputs, rhs, /) -> kernels.Solution:
        settings, preparation = inputs.settings, inputs.preparation
        largest = max(preparation.spectrum.largest, 0.0) + preparation.shift
        return curvature.jitted_lissa(
            _stochastic_operator(inputs),
            rhs,
            damping=preparation.shift,
            scale=settings.lissa.scale_margin * largest,
            max_steps=settings.max_steps,
            key=_solver_key(settings),
        )


class StochasticQuadratic(Solver):
    """The paper's solver: Adam on the quadratic with mini-batch products, keeping the iterate
    with the lowest value of the quadratic on the fixed sample (a criterion the mini-batches
    did not draw from alone)."""

    name = "sgd"
    uses_fixed_sample = True
    needs_spectrum = True

    def solve(self, inputs: SolveInputs, rhs, /) -> kernels.Solution:
        settings, preparation = inputs.settings, inputs.preparation
        shift = preparation.shift
        stochastic = _stochastic_operator(inputs)
        largest = max(preparation.spectrum.largest, 0.0) + shift
        key = _solver_key(settings)
        # Adam moves every coordinate by about its learning rate whatever the gradient's scale,
        # so the rate must carry the units of x: a multiple of the RMS size of one
        # gradient-descent step b / λ_max. (A rate in units of 1 / λ_max alone overshoots by
        # orders of magnitude when the adapter has many small coordinates.)
        size = sum(leaf.size for leaf in jax.tree.leaves(rhs))
        step_size = float(kernels.tree_norm(rhs)) / math.sqrt(size) / largest
        learning_rate = settings.sgd.learning_rate * step_size
        solver = kernels.sgd_quadratic_solver(
            stochastic, damping=shift, optimizer=optax.adam(learning_rate), key=key
        )
        operator = inputs.operator

        def quadratic(x):
            curved = kernels.tree_add_scaled(operator(x), shift, x)
            return 0.5 * kernels.tree_vdot(x, curved) - kernels.tree_vdot(rhs, x)

        checkpoints = max(1, min(settings.max_steps, settings.sgd.selection_checks))
        per_segment = math.ceil(settings.max_steps / checkpoints)
        state = solver.init(rhs)
        best_x, best_value = kernels.tree_zeros_like(rhs), 0.0
        for _ in range(checkpoints):
            state = _sgd_segment(
                stochastic, shift, key, state, steps=per_segment, learning_rate=learning_rate
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


class LowRank(Solver):
    """The prepared top eigenpairs of C, inverted in closed form (no iteration per request)."""

    name = "lowrank"
    leaves_out_request = False

    def eigenbasis_rank(self, settings: EraserSettings, /) -> int | None:
        return settings.lowrank.rank

    def warm_up(self, inputs: SolveInputs, /) -> None:
        _lowrank_apply(inputs.preparation, kernels.tree_zeros_like(inputs.lora))

    def solve(self, inputs: SolveInputs, rhs, /) -> kernels.Solution:
        return kernels.Solution(
            _lowrank_apply(inputs.preparation, rhs),
            jnp.asarray(0, jnp.int32),
            jnp.asarray(jnp.nan),
            jnp.asarray(kernels.Status.CONVERGED),
        )

    def converged(self, solution: kernels.Solution, /) -> bool | None:
        return None


SOLVERS: Mapping[str, Solver] = types.MappingProxyType(
    {
        solver.name: solver
        for solver in (ConjugateGradients(), Lissa(), StochasticQuadratic(), LowRank())
    }
)


def _solver_key(settings: EraserSettings) -> jax.Array:
    return jax.random.fold_in(jax.random.key(settings.seed), 3)


def _stochastic_operator(inputs: SolveInputs):
    """(v, key) ↦ C_B v on mini-batches drawn from every example not left out."""
    settings, data, placement = inputs.settings, inputs.data, inputs.placement
    drawn = np.setdiff1d(np.arange(len(data)), inputs.left_out)
    # At most the examples there are, in whole rows per batch device.
    devices = placement.batch_devices
    batch_size = min(settings.curvature.batch_size, len(drawn) // devices * devices)
    if batch_size == 0:
        raise SettingsError(
            f"{len(drawn)} examples are too few to draw mini-batches split over the mesh's "
            f"{devices} batch devices ({placement.describe()})."
        )
    return curvature.stochastic_curvature(
        inputs.graphdef,
        inputs.lora,
        inputs.base,
        data.batch(drawn),
        batch_size=batch_size,
        kind=settings.curvature.kind,
        batch_sharding=placement.row_sharding(batch_size),
    )


def _lowrank_apply(preparation: EraserPreparation, rhs):
    pairs = preparation.eigenpairs
    x = _jitted_lowrank(pairs.eigenvalues, pairs.eigenvectors, preparation.shift, rhs)
    return jax.block_until_ready(x)


@jax.jit
def _jitted_lowrank(eigenvalues, eigenvectors, damping, rhs):
    return kernels.lowrank_inverse(eigenvalues, eigenvectors, damping=damping)(rhs)


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate"))
def _sgd_segment(stochastic, damping, key, state, *, steps, learning_rate):
    # The operator is an argument (its arrays are inputs, not constants of the compiled loop).
    solver = kernels.sgd_quadratic_solver(
        stochastic, damping=damping, optimizer=optax.adam(learning_rate), key=key
    )
    return jax.lax.fori_loop(0, steps, lambda _, current: solver.step(current), state)
