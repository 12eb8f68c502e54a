"""Stochastic first-order minimization of the quadratic ½xᵀ(C + λI)x − bᵀx (LLMEraser's solver)."""

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

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


class GradientTransformation(Protocol):
    """Optax's optimizer protocol; kernels only needs its shape, not optax itself."""

    def init(self, params: PyTree) -> Any: ...

    def update(self, updates: PyTree, state: Any, params: PyTree | None = None) -> tuple: ...


class SGDQuadraticState(NamedTuple):
    """State of the stochastic quadratic solver."""

    x: PyTree
    optimizer_state: Any
    rhs: PyTree
    rhs_norm: jax.Array
    relative_residual: jax.Array
    steps: jax.Array
    status: jax.Array


def sgd_quadratic_solver(
    stochastic_matvec: Callable[[PyTree, jax.Array], PyTree],
    /,
    *,
    damping,
    optimizer: GradientTransformation,
    key: jax.Array,
) -> IterativeSolver:
    """Minimize F(x) = ½xᵀ(C + λI)x − bᵀx from x₀ = 0 with a stochastic optimizer.

    F is the finite-sum (1/n) Σᵢ [½xᵀ(Cᵢ + λI)x − bᵀx], so (C_B + λI)x − b, with C_B a
    mini-batch estimate of C, is an unbiased estimate of its gradient. Its minimizer is
    exactly (C + λI)⁻¹b. (LLMEraser's published code leaves its second derivative
    undifferentiated and so converges to 2(C + 2λI)⁻¹b instead; this solver does not.)

    Args:
        stochastic_matvec: `(v, key) ↦ C_B v` drawing its own mini-batch from the key.
        damping: λ ≥ 0.
        optimizer: any object with optax's `init(params)` / `update(grads, state, params)`
            protocol (e.g. `optax.adam(1e-3)`).
        key: PRNG key; step t uses `fold_in(key, t)`.
    """
    check_damping(damping, "sgd_quadratic")

    def init(b: PyTree) -> SGDQuadraticState:
        x = tree_zeros_like(b)
        rhs_norm = tree_norm(b)
        return SGDQuadraticState(
            x=x,
            optimizer_state=optimizer.init(x),
            rhs=b,
            rhs_norm=rhs_norm,
            relative_residual=initial_relative_residual(rhs_norm),
            steps=jnp.zeros((), jnp.int32),
            status=running(),
        )

    def step(state: SGDQuadraticState) -> SGDQuadraticState:
        curvature = stochastic_matvec(state.x, jax.random.fold_in(key, state.steps))
        gradient = tree_sub(tree_add_scaled(curvature, damping, state.x), state.rhs)
        updates, optimizer_state = optimizer.update(gradient, state.optimizer_state, state.x)
        x = jax.tree.map(lambda leaf, update: (leaf + update).astype(leaf.dtype), state.x, updates)
        # The gradient of F is minus the residual: its norm is the residual of the iterate
        # before this update, on this step's mini-batch.
        relative_residual = tree_norm(gradient) / state.rhs_norm
        status = jnp.where(relative_residual > DIVERGENCE_FACTOR, Status.DIVERGED, running())
        return state._replace(
            x=x,
            optimizer_state=optimizer_state,
            relative_residual=relative_residual,
            steps=state.steps + 1,
            status=status.astype(jnp.int32),
        )

    return IterativeSolver(init, step)


def sgd_quadratic(
    stochastic_matvec: Callable[[PyTree, jax.Array], PyTree],
    b: PyTree,
    /,
    *,
    damping,
    optimizer: GradientTransformation,
    max_steps: int,
    key: jax.Array,
    tol: float = 0.0,
) -> Solution:
    """Solve (C + λI) x = b by stochastic optimization of ½xᵀ(C + λI)x − bᵀx.

    See `sgd_quadratic_solver`.

    Args:
        stochastic_matvec: `(v, key) ↦ C_B v` drawing its own mini-batch from the key.
        b: the right-hand side (any pytree).
        damping: λ ≥ 0.
        optimizer: any optax-style gradient transformation.
        max_steps: the number of optimizer steps.
        key: PRNG key for the mini-batches.
        tol: stop early when a mini-batch relative residual reaches it (0: never).

    Returns:
        A `Solution` whose `residual` is the mini-batch estimate from the last step.
    """
    check_damping(damping, "sgd_quadratic")
    check_operator_preserves_tree(stochastic_matvec, b, key, name="sgd_quadratic")
    solver = sgd_quadratic_solver(stochastic_matvec, damping=damping, optimizer=optimizer, key=key)
    return iterate(solver, b, tol=tol, max_steps=max_steps)
