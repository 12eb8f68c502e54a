"""What every linear solver shares: its result record, its status codes and its driver loop.

A solver for (C + λI) x = b is a pure pair `IterativeSolver(init, step)`: `init(b)` builds a
NamedTuple state, `step(state)` advances it by one iteration. Every state carries the fields
`x`, `relative_residual`, `steps` and `status`, which is all `iterate` needs to run any solver
under `jax.lax.while_loop` and return a `Solution`.
"""

import enum
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxunlearn.kernels._tree import PyTree, tree_all_finite

# A relative residual this large means a stationary iteration is diverging (LiSSA's scale below
# half the largest eigenvalue, a learning rate too large): stopping beats overflowing to inf.
DIVERGENCE_FACTOR = 1e6


class Status(enum.IntEnum):
    """How a solve ended. Stored as an int32 array so that it survives `jax.jit`."""

    RUNNING = -1
    """Internal: the loop has not stopped yet."""
    CONVERGED = 0
    """The relative residual reached the tolerance."""
    MAX_STEPS = 1
    """The step budget ran out first (the normal end of a fixed-budget stochastic solve)."""
    INDEFINITE = 2
    """A direction of non-positive curvature was met: C + λI is not positive definite."""
    NONFINITE = 3
    """A NaN or an infinity appeared in the iterate or the residual."""
    DIVERGED = 4
    """The residual grew without bound (for LiSSA: the scale is below λ_max / 2)."""


_FAILURE_EXPLANATIONS = {
    Status.INDEFINITE: (
        "the curvature operator plus damping is not positive definite along a search "
        "direction; raise the damping, or use a positive semi-definite curvature "
        "(Gauss-Newton) instead of the Hessian"
    ),
    Status.NONFINITE: (
        "a NaN or an infinity appeared; check the operator and the right-hand side for "
        "non-finite values, or lower the step size"
    ),
    Status.DIVERGED: (
        "the iterates diverged; for LiSSA the scale must exceed the largest eigenvalue of the "
        "damped curvature, for a stochastic solver lower the learning rate"
    ),
    Status.MAX_STEPS: "the step budget ran out before the tolerance was reached",
}


class SolverError(RuntimeError):
    """A solve failed: its status says why."""


class Solution(NamedTuple):
    """The result of a linear solve.

    Attributes:
        x: the solution estimate, a tree with the structure of the right-hand side.
        steps: the number of iterations taken (int32 array).
        residual: the final relative residual ‖(C + λI)x − b‖ / ‖b‖ as the solver tracks it
            (for stochastic solvers, an estimate on the last mini-batch).
        status: a `Status` code as an int32 array.
    """

    x: PyTree
    steps: jax.Array
    residual: jax.Array
    status: jax.Array

    def check(self, *, require_convergence: bool = False) -> "Solution":
        """Raise `SolverError` if the solve failed; return the solution otherwise.

        Call it outside `jax.jit` (it reads the status). Under `jax.vmap` the status is an
        array and any failed entry raises.

        Args:
            require_convergence: also treat an exhausted step budget as a failure.
        """
        failures = {Status.INDEFINITE, Status.NONFINITE, Status.DIVERGED}
        if require_convergence:
            failures.add(Status.MAX_STEPS)
        codes = {int(code) for code in jnp.ravel(jnp.asarray(self.status))}
        for code in sorted(codes):
            status = Status(code)
            if status in failures:
                residual = jnp.max(jnp.asarray(self.residual))
                raise SolverError(
                    f"solve failed with status {status.name} after "
                    f"{int(jnp.max(self.steps))} steps (relative residual {float(residual):.3e}): "
                    f"{_FAILURE_EXPLANATIONS[status]}."
                )
        return self


class IterativeSolver(NamedTuple):
    """A pure solver: `init(b) -> state` and `step(state) -> state`.

    States are NamedTuples with at least the fields `x`, `relative_residual`, `steps` and
    `status`. Anything that depends only on the operator belongs in the closure that built the
    pair, so it is computed once and reused for every right-hand side.
    """

    init: Callable[[PyTree], Any]
    step: Callable[[Any], Any]


def iterate(solver: IterativeSolver, b: PyTree, /, *, tol: float, max_steps: int) -> Solution:
    """Run `solver` on the right-hand side `b` until it converges, fails or runs out of steps.

    Loops under `jax.lax.while_loop`, so it works under `jax.jit` and `jax.vmap`.
    """
    if max_steps < 0:
        raise ValueError(f"max_steps must be non-negative, got {max_steps}")

    def keep_going(state):
        return (
            (state.status == Status.RUNNING)
            & (state.steps < max_steps)
            & (state.relative_residual > tol)
        )

    state = jax.lax.while_loop(keep_going, solver.step, solver.init(b))
    finite = tree_all_finite(state.x) & jnp.isfinite(state.relative_residual)
    status = jnp.where(
        state.status != Status.RUNNING,
        state.status,
        jnp.where(state.relative_residual <= tol, Status.CONVERGED, Status.MAX_STEPS),
    )
    status = jnp.where(finite, status, Status.NONFINITE).astype(jnp.int32)
    return Solution(state.x, state.steps, state.relative_residual, status)


def check_damping(damping, name: str, *, strictly_positive: bool = False) -> None:
    """Raise before any work if a concrete damping is negative (or zero when it must not be)."""
    try:
        value = float(damping)
    except jax.errors.ConcretizationTypeError:
        return  # A traced damping cannot be inspected; the solve's status reports its effect.
    if strictly_positive and not value > 0:
        raise ValueError(f"{name}: damping must be > 0, got {value}")
    if not value >= 0:
        raise ValueError(f"{name}: damping must be >= 0, got {value}")


def initial_relative_residual(rhs_norm: jax.Array) -> jax.Array:
    """The relative residual of x₀ = 0: 1, or 0 for a zero right-hand side (already solved)."""
    return jnp.where(rhs_norm > 0, 1.0, 0.0).astype(rhs_norm.dtype)


def running() -> jax.Array:
    """The status of a state that has not stopped."""
    return jnp.asarray(Status.RUNNING, jnp.int32)
