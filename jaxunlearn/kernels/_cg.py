"""Conjugate gradients for (C + λI) x = b on a fixed (deterministic) curvature operator."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxunlearn.kernels._solution import (
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
    tree_vdot,
    tree_zeros_like,
)


class CGState(NamedTuple):
    """State of conjugate gradients."""

    x: PyTree
    residual: PyTree
    direction: PyTree
    residual_sq: jax.Array
    rhs_norm: jax.Array
    relative_residual: jax.Array
    steps: jax.Array
    status: jax.Array


def cg_solver(matvec: Callable[[PyTree], PyTree], /, *, damping) -> IterativeSolver:
    """Conjugate gradients for (C + λI) x = b as a pure `(init, step)` pair.

    Args:
        matvec: v ↦ Cv, a deterministic symmetric operator on trees.
        damping: λ ≥ 0, added to the operator.

    A step that meets a direction p with pᵀ(C + λI)p ≤ 0 stops the solve with status
    `INDEFINITE` and keeps the last iterate, instead of dividing by a non-positive curvature.
    """
    check_damping(damping, "cg")

    def damped_matvec(v):
        return tree_add_scaled(matvec(v), damping, v)

    def init(b: PyTree) -> CGState:
        residual_sq = tree_vdot(b, b)
        rhs_norm = jnp.sqrt(residual_sq)
        return CGState(
            x=tree_zeros_like(b),
            residual=b,
            direction=b,
            residual_sq=residual_sq,
            rhs_norm=rhs_norm,
            relative_residual=initial_relative_residual(rhs_norm),
            steps=jnp.zeros((), jnp.int32),
            status=running(),
        )

    def step(state: CGState) -> CGState:
        curved_direction = damped_matvec(state.direction)
        curvature = tree_vdot(state.direction, curved_direction)
        usable = curvature > 0
        step_size = jnp.where(usable, state.residual_sq / jnp.where(usable, curvature, 1), 0)
        x = tree_add_scaled(state.x, step_size, state.direction)
        residual = tree_add_scaled(state.residual, -step_size, curved_direction)
        residual_sq = tree_vdot(residual, residual)
        direction = tree_add_scaled(residual, residual_sq / state.residual_sq, state.direction)
        status = jnp.where(usable, running(), Status.INDEFINITE)
        status = jnp.where(jnp.isfinite(curvature), status, Status.NONFINITE).astype(jnp.int32)
        advanced = CGState(
            x=x,
            residual=residual,
            direction=direction,
            residual_sq=residual_sq,
            rhs_norm=state.rhs_norm,
            relative_residual=jnp.sqrt(residual_sq) / state.rhs_norm,
            steps=state.steps + 1,
            status=status,
        )
        # On failure keep the last good iterate rather than one built from a bad step size.
        kept = state._replace(steps=state.steps + 1, status=status)
        return jax.tree.map(lambda new, old: jnp.where(usable, new, old), advanced, kept)

    return IterativeSolver(init, step)


def cg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    /,
    *,
    damping,
    tol: float = 1e-6,
    max_steps: int = 100,
) -> Solution:
    """Solve (C + λI) x = b by conjugate gradients.

    Args:
        matvec: v ↦ Cv, a deterministic symmetric operator on trees with b's structure.
        b: the right-hand side (any pytree).
        damping: λ ≥ 0. C + λI must be positive definite; if the solve meets a direction of
            non-positive curvature it stops with status `INDEFINITE`.
        tol: stop when ‖(C + λI)x − b‖ / ‖b‖ (the recursively updated residual) reaches it.
        max_steps: the most products with C.

    Returns:
        A `Solution`; call `.check()` on it outside jit to raise on failure.
    """
    check_damping(damping, "cg")
    check_operator_preserves_tree(matvec, b, name="cg")
    return iterate(cg_solver(matvec, damping=damping), b, tol=tol, max_steps=max_steps)
