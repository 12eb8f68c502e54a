"""LiSSA: the truncated Neumann series for (C + λI)⁻¹ b, deterministic or stochastic."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxunlearn.kernels._solution import (
    DIVERGENCE_FACTOR,
    IterativeSolver,
    Solution,
    Status,
    check_damping,
    initial_relative_residual,
    iterate,
    running,
)
from jaxunlearn.kernels._tree import (
    PyTree,
    check_operator_preserves_tree,
    tree_add_scaled,
    tree_norm,
    tree_sub,
    tree_zeros_like,
)


class LissaState(NamedTuple):
    """State of LiSSA. `x` is the normalized estimate (the series sum divided by the scale)."""

    x: PyTree
    rhs: PyTree
    rhs_norm: jax.Array
    relative_residual: jax.Array
    steps: jax.Array
    status: jax.Array


def lissa_solver(
    matvec: Callable[..., PyTree], /, *, damping, scale, key: jax.Array | None = None
) -> IterativeSolver:
    """LiSSA for (C + λI) x = b as a pure `(init, step)` pair.

    The recursion x_{t+1} = b + (I − (C + λI)/s) x_t with answer x_t / s is run in its
    normalized form y_{t+1} = y_t + (b − (C + λI) y_t) / s (Richardson iteration with step
    1/s), which is the same sequence with y_t = x_t / s. It converges when every eigenvalue of
    C + λI lies in (0, 2s): take s above the largest one.

    Args:
        matvec: v ↦ Cv; if `key` is given, `matvec(v, key)` with a fresh key each step (for a
            mini-batch estimate C_B of C).
        damping: λ ≥ 0.
        scale: s > 0.
        key: PRNG key for stochastic operators, or None for a deterministic one.
    """
    check_damping(damping, "lissa")
    _check_scale(scale)

    def damped_matvec(v, steps):
        curvature = matvec(v) if key is None else matvec(v, jax.random.fold_in(key, steps))
        return tree_add_scaled(curvature, damping, v)

    def init(b: PyTree) -> LissaState:
        rhs_norm = tree_norm(b)
        return LissaState(
            x=tree_zeros_like(b),
            rhs=b,
            rhs_norm=rhs_norm,
            relative_residual=initial_relative_residual(rhs_norm),
            steps=jnp.zeros((), jnp.int32),
            status=running(),
        )

    def step(state: LissaState) -> LissaState:
        residual = tree_sub(state.rhs, damped_matvec(state.x, state.steps))
        # This is the residual of the iterate before the update; when s exceeds the largest
        # eigenvalue the residuals shrink monotonically, so it bounds the new one.
        relative_residual = tree_norm(residual) / state.rhs_norm
        status = jnp.where(relative_residual > DIVERGENCE_FACTOR, Status.DIVERGED, running())
        return state._replace(
            x=tree_add_scaled(state.x, 1.0 / scale, residual),
            relative_residual=relative_residual,
            steps=state.steps + 1,
            status=status.astype(jnp.int32),
        )

    return IterativeSolver(init, step)


def lissa(
    matvec: Callable[..., PyTree],
    b: PyTree,
    /,
    *,
    damping,
    scale,
    max_steps: int = 100,
    tol: float = 0.0,
    key: jax.Array | None = None,
) -> Solution:
    """Solve (C + λI) x = b with LiSSA (see `lissa_solver`).

    Args:
        matvec: v ↦ Cv, or `matvec(v, key)` drawing its own mini-batch when `key` is given.
        b: the right-hand side (any pytree).
        damping: λ ≥ 0.
        scale: s, above the largest eigenvalue of C + λI (convergence needs s > λ_max / 2).
        max_steps: number of terms of the series.
        tol: stop early when the relative residual of the previous iterate reaches it.
        key: PRNG key for a stochastic `matvec`.

    Returns:
        A `Solution`; `residual` is that of the second-to-last iterate (see `lissa_solver`).
    """
    check_damping(damping, "lissa")
    _check_scale(scale)
    extra = () if key is None else (key,)
    check_operator_preserves_tree(matvec, b, *extra, name="lissa")
    solver = lissa_solver(matvec, damping=damping, scale=scale, key=key)
    return iterate(solver, b, tol=tol, max_steps=max_steps)


def _check_scale(scale) -> None:
    try:
        value = float(scale)
    except jax.errors.ConcretizationTypeError:
        return
    if not value > 0:
        raise ValueError(f"lissa: scale must be > 0 (above the largest eigenvalue), got {value}")
