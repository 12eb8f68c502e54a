"""Top eigenpairs by Lanczos, and the low-rank-plus-damping inverse they define.

The eigenbasis depends only on the curvature, not on the request: compute it once, then every
right-hand side costs two passes over the basis instead of a new iterative solve.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxunlearn.kernels._solution import IterativeSolver, check_damping
from jaxunlearn.kernels._tree import (
    PyTree,
    check_operator_preserves_tree,
    stacked_combination,
    stacked_vdot,
    tree_norm,
    tree_random_normal_like,
    tree_scale,
    tree_size,
    tree_sub,
    tree_vdot,
)

# Lanczos vectors whose norm before normalization falls below this many machine epsilons
# (relative to the operator's norm) span no new direction: the Krylov space is exhausted.
_BREAKDOWN_EPS = 100.0


class Eigenpairs(NamedTuple):
    """Eigenpairs sorted by decreasing eigenvalue.

    Attributes:
        eigenvalues: [k] Ritz values.
        eigenvectors: a tree with the structure of the start vector whose leaves have a leading
            axis of size k; eigenvectors[i] is the unit Ritz vector of eigenvalues[i].
        residuals: [k] estimates ‖C u − θ u‖ of each pair's residual (Paige's bound |β_m s_mi|).
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residuals: jax.Array


class LanczosState(NamedTuple):
    """State of Lanczos with full reorthogonalization."""

    basis: PyTree  # leaves [num_steps + 1, ...]: rows 0..steps are the Lanczos vectors so far.
    diagonal: jax.Array  # [num_steps] α_j
    off_diagonal: jax.Array  # [num_steps] β_j (β_j couples vectors j and j + 1)
    operator_norm: jax.Array  # running estimate of ‖C‖, to judge breakdown
    steps: jax.Array


def lanczos_iteration(
    matvec: Callable[[PyTree], PyTree], /, *, num_steps: int, key: jax.Array | None = None
) -> IterativeSolver:
    """Lanczos with full reorthogonalization as a pure `(init, step)` pair.

    `init(v0)` starts from the normalized v0; each `step` adds one Lanczos vector. When the
    Krylov space is exhausted (an invariant subspace was found), the next vector is a random
    one orthogonal to the basis and the coupling β is set to zero, so the tridiagonal matrix
    stays exact.

    Args:
        matvec: a symmetric operator v ↦ Cv on trees.
        num_steps: the number of products with C (the Krylov dimension).
        key: PRNG key for restarts after breakdown (a fixed default if None).
    """
    restart_key = jax.random.key(0) if key is None else key

    def init(v0: PyTree) -> LanczosState:
        q0 = tree_scale(1.0 / tree_norm(v0), v0)
        basis = jax.tree.map(
            lambda leaf: jnp.zeros((num_steps + 1, *leaf.shape), leaf.dtype).at[0].set(leaf), q0
        )
        dtype = tree_norm(v0).dtype
        return LanczosState(
            basis=basis,
            diagonal=jnp.zeros(num_steps, dtype),
            off_diagonal=jnp.zeros(num_steps, dtype),
            operator_norm=jnp.zeros((), dtype),
            steps=jnp.zeros((), jnp.int32),
        )

    def orthogonalize(vector, basis):
        # Twice is enough (Kahan-Parlett): one Gram-Schmidt pass against every stored vector
        # loses orthogonality to rounding, a second restores it. Unfilled rows are zero.
        for _ in range(2):
            vector = tree_sub(vector, stacked_combination(stacked_vdot(basis, vector), basis))
        return vector

    def step(state: LanczosState) -> LanczosState:
        j = state.steps
        current = jax.tree.map(lambda leaf: leaf[j], state.basis)
        product = matvec(current)
        alpha = tree_vdot(current, product)
        candidate = orthogonalize(product, state.basis)
        beta = tree_norm(candidate)
        operator_norm = jnp.maximum(state.operator_norm, jnp.abs(alpha) + beta)
        eps = jnp.finfo(beta.dtype).eps
        exhausted = beta <= _BREAKDOWN_EPS * eps * operator_norm

        def restart(_):
            fresh = tree_random_normal_like(jax.random.fold_in(restart_key, j), current)
            fresh = orthogonalize(fresh, state.basis)
            return tree_scale(1.0 / tree_norm(fresh), fresh)

        def continue_(_):
            return tree_scale(1.0 / beta, candidate)

        following = jax.lax.cond(exhausted, restart, continue_, None)
        basis = jax.tree.map(lambda rows, leaf: rows.at[j + 1].set(leaf), state.basis, following)
        return LanczosState(
            basis=basis,
            diagonal=state.diagonal.at[j].set(alpha),
            off_diagonal=state.off_diagonal.at[j].set(jnp.where(exhausted, 0.0, beta)),
            operator_norm=operator_norm,
            steps=j + 1,
        )

    return IterativeSolver(init, step)


def lanczos(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    /,
    *,
    num_steps: int,
    num_eigenpairs: int | None = None,
    key: jax.Array | None = None,
) -> Eigenpairs:
    """The top eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Memory: the basis holds num_steps + 1 trees the size of v0.

    Args:
        matvec: a symmetric operator v ↦ Cv on trees with v0's structure.
        v0: the start vector (any non-zero pytree); a random one is the usual choice.
        num_steps: the number of products with C, at most the dimension of the tree.
        num_eigenpairs: how many of the largest pairs to return (default: num_steps). The
            extreme pairs converge first; ask for well fewer than num_steps for accurate ones.
        key: PRNG key for restarts after breakdown.

    Returns:
        `Eigenpairs` sorted by decreasing eigenvalue.
    """
    dimension = tree_size(v0)
    if not 1 <= num_steps <= dimension:
        raise ValueError(
            f"lanczos: num_steps must be between 1 and the dimension {dimension}, got {num_steps}"
        )
    num_eigenpairs = num_steps if num_eigenpairs is None else num_eigenpairs
    if not 1 <= num_eigenpairs <= num_steps:
        raise ValueError(
            f"lanczos: num_eigenpairs must be between 1 and num_steps={num_steps}, "
            f"got {num_eigenpairs}"
        )
    _check_nonzero(v0)
    check_operator_preserves_tree(matvec, v0, name="lanczos")

    iteration = lanczos_iteration(matvec, num_steps=num_steps, key=key)
    state = jax.lax.fori_loop(0, num_steps, lambda _, s: iteration.step(s), iteration.init(v0))

    couplings = state.off_diagonal[:-1]
    tridiagonal = jnp.diag(state.diagonal) + jnp.diag(couplings, k=1) + jnp.diag(couplings, k=-1)
    ritz_values, ritz_coordinates = jnp.linalg.eigh(tridiagonal)
    top = jnp.argsort(ritz_values)[::-1][:num_eigenpairs]
    coordinates = ritz_coordinates[:, top]  # [num_steps, k]
    basis = jax.tree.map(lambda rows: rows[:num_steps], state.basis)
    eigenvectors = jax.vmap(stacked_combination, in_axes=(1, None))(coordinates, basis)
    residuals = jnp.abs(state.off_diagonal[-1] * coordinates[-1])
    return Eigenpairs(ritz_values[top], eigenvectors, residuals)


def lowrank_inverse(
    eigenvalues: jax.Array, eigenvectors: PyTree, /, *, damping
) -> Callable[[PyTree], PyTree]:
    """The map b ↦ U diag(1/(Λ + λ)) Uᵀb + (b − UUᵀb)/λ.

    It inverts C + λI exactly on the span of the eigenvectors U and treats C as zero on the
    rest, which is accurate when the spectrum outside U is well below λ.

    Args:
        eigenvalues: [k] eigenvalues Λ.
        eigenvectors: a tree whose leaves have a leading axis k, orthonormal rows (as
            `lanczos` returns).
        damping: λ > 0; every Λ + λ must be positive.

    Returns:
        A function from trees (with the eigenvectors' per-row structure) to trees.
    """
    check_damping(damping, "lowrank_inverse", strictly_positive=True)
    leading = {leaf.shape[0] for leaf in jax.tree.leaves(eigenvectors)}
    if leading != {eigenvalues.shape[0]}:
        raise ValueError(
            f"lowrank_inverse: {eigenvalues.shape[0]} eigenvalues but eigenvector leaves with "
            f"leading axes {sorted(leading)}"
        )
    try:
        smallest = float(jnp.min(eigenvalues))
    except jax.errors.ConcretizationTypeError:
        smallest = None
    if smallest is not None and not smallest + float(damping) > 0:
        raise ValueError(
            f"lowrank_inverse: eigenvalue {smallest:.4g} plus damping {float(damping):.4g} is "
            "not positive, so C + λI is not invertible as positive definite; raise the damping"
        )
    # U diag(1/(Λ+λ)) Uᵀb + (b − UUᵀb)/λ = b/λ + U diag(1/(Λ+λ) − 1/λ) Uᵀb: one pass each way.
    correction = 1.0 / (eigenvalues + damping) - 1.0 / damping

    def apply(b: PyTree) -> PyTree:
        coefficients = stacked_vdot(eigenvectors, b)
        low_rank = stacked_combination(correction * coefficients, eigenvectors)
        return jax.tree.map(
            lambda leaf, part: (leaf / damping + part).astype(leaf.dtype), b, low_rank
        )

    return apply


def _check_nonzero(v0: PyTree) -> None:
    try:
        norm = float(tree_norm(v0))
    except jax.errors.ConcretizationTypeError:
        return
    if not norm > 0:
        raise ValueError("lanczos: the start vector v0 is zero (or not finite)")
