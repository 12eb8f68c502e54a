"""Lanczos eigenpairs and the low-rank inverse against numpy.linalg.eigh in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from kernel_problems import flat, spd_matrix, tree_operator, vector_tree

from jaxunlearn import kernels


def gapped_spectrum(dimension: int = 17) -> np.ndarray:
    # Five well separated top eigenvalues (one of them negative elsewhere in the test below)
    # above a cluster in [0, 1]: the case the low-rank route is for.
    rng = np.random.default_rng(11)
    return np.concatenate([[40.0, 30.0, 22.0, 15.0, 10.0], rng.uniform(0.0, 1.0, dimension - 5)])


def rows(tree):
    """The [k, n] matrix whose rows are the raveled stacked trees."""
    count = jax.tree.leaves(tree)[0].shape[0]
    return np.stack([flat(jax.tree.map(lambda leaf, i=i: leaf[i], tree)) for i in range(count)])


@pytest.mark.parametrize("tree_kind", ["dict", "tuple"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_five_eigenpairs_match_eigh_on_a_gapped_spectrum(tree_kind, seed):
    start = vector_tree(tree_kind, seed + 100)
    matrix = spd_matrix(seed, gapped_spectrum())
    pairs = jax.jit(
        lambda v: kernels.lanczos(tree_operator(matrix, v), v, num_steps=12, num_eigenpairs=5)
    )(start)
    values, vectors = np.linalg.eigh(matrix)
    np.testing.assert_allclose(np.asarray(pairs.eigenvalues), values[::-1][:5], rtol=0, atol=1e-8)
    overlaps = np.abs(rows(pairs.eigenvectors) @ vectors[:, ::-1][:, :5])
    np.testing.assert_allclose(np.diag(overlaps), 1.0, atol=1e-8)
    assert jax.tree.structure(jax.tree.map(lambda leaf: leaf[0], pairs.eigenvectors)) == (
        jax.tree.structure(start)
    )
    assert np.all(np.asarray(pairs.residuals) <= 1e-6)


@pytest.mark.parametrize("tree_kind", ["dict", "tuple"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lanczos_iteration_steps_a_state_of_its_own_type_to_the_tridiagonal_projection(
    tree_kind, seed
):
    start = vector_tree(tree_kind, seed + 200)
    matrix = spd_matrix(seed, gapped_spectrum())
    num_steps = 8
    iteration = kernels.lanczos_iteration(tree_operator(matrix, start), num_steps=num_steps)
    state = jax.jit(iteration.init)(start)
    assert isinstance(state, kernels.LanczosState)
    solver_states = (kernels.CGState, kernels.LissaState, kernels.SGDQuadraticState)
    assert not isinstance(state, solver_states)
    step = jax.jit(iteration.step)
    for _ in range(num_steps):
        state = step(state)
    assert isinstance(state, kernels.LanczosState)
    assert int(state.steps) == num_steps
    first = jax.tree.map(lambda leaf: leaf[0], state.basis)
    assert jax.tree.structure(first) == jax.tree.structure(start)
    assert {leaf.dtype for leaf in jax.tree.leaves(first)} == {jnp.dtype(jnp.float64)}

    vectors = rows(state.basis)  # [num_steps + 1, n]: the Lanczos vectors and the next one
    basis = vectors[:num_steps]
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(num_steps + 1), atol=1e-12)
    np.testing.assert_allclose(basis[0], flat(start) / np.linalg.norm(flat(start)), atol=1e-14)
    alpha, beta = np.asarray(state.diagonal), np.asarray(state.off_diagonal)
    tridiagonal = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    np.testing.assert_allclose(basis @ matrix @ basis.T, tridiagonal, atol=1e-10)
    # The three-term recurrence: C Qᵀ = Qᵀ T + β_k q_k e_kᵀ.
    remainder = matrix @ basis.T - basis.T @ tridiagonal
    np.testing.assert_allclose(remainder[:, :-1], 0.0, atol=1e-10)
    np.testing.assert_allclose(remainder[:, -1], beta[-1] * vectors[num_steps], atol=1e-10)


def test_residual_estimates_bound_the_true_residuals():
    start = vector_tree("dict", 5)
    matrix = spd_matrix(5, np.linspace(0.0, 1.0, 17) ** 3 * 10)
    pairs = kernels.lanczos(tree_operator(matrix, start), start, num_steps=6, num_eigenpairs=3)
    vectors = rows(pairs.eigenvectors)
    eigenvalues = np.asarray(pairs.eigenvalues)[:, None]
    true = np.linalg.norm(vectors @ matrix - eigenvalues * vectors, axis=1)
    # Paige: with full reorthogonalization the estimate equals the residual up to rounding.
    np.testing.assert_allclose(np.asarray(pairs.residuals), true, rtol=1e-6, atol=1e-12)
    assert true.max() > 1e-4  # six steps are not enough: the test would notice a zero estimate


def test_exhausted_krylov_space_restarts_and_recovers_the_whole_spectrum():
    # Three distinct eigenvalues: the Krylov space of any start vector has dimension 3, so
    # Lanczos breaks down at step 3 and must restart with fresh orthogonal directions.
    spectrum = np.repeat([5.0, 2.0, -1.0], [6, 6, 5])
    matrix = spd_matrix(3, spectrum)
    start = vector_tree("tuple", 3)
    pairs = kernels.lanczos(tree_operator(matrix, start), start, num_steps=17)
    np.testing.assert_allclose(np.asarray(pairs.eigenvalues), np.sort(spectrum)[::-1], atol=1e-10)
    vectors = rows(pairs.eigenvectors)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(17), atol=1e-10)


def test_lowrank_inverse_equals_its_dense_formula():
    matrix = spd_matrix(6, gapped_spectrum())
    b = vector_tree("dict", 6)
    values, vectors = np.linalg.eigh(matrix)
    top_values, top_vectors = values[::-1][:5], vectors[:, ::-1][:, :5]
    _, unravel = ravel_pytree(b)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[unravel(u) for u in top_vectors.T])
    damping = 0.3
    inverse = kernels.lowrank_inverse(jnp.asarray(top_values), stacked, damping=damping)
    projection = top_vectors.T @ flat(b)
    expected = top_vectors @ (projection / (top_values + damping))
    expected += (flat(b) - top_vectors @ projection) / damping
    np.testing.assert_allclose(flat(jax.jit(inverse)(b)), expected, rtol=1e-12, atol=1e-12)


def test_lowrank_inverse_from_lanczos_approximates_the_damped_inverse():
    # The rest of the spectrum lies in [0, 1]; treating an eigenvalue μ there as zero costs a
    # relative error μ/λ ≤ 0.2 on its component at λ = 5. The top components must be exact,
    # and the whole must beat the plain guess b/λ.
    matrix = spd_matrix(7, gapped_spectrum())
    b = vector_tree("dict", 7)
    damping = 5.0
    pairs = kernels.lanczos(tree_operator(matrix, b), b, num_steps=12, num_eigenpairs=5)
    inverse = kernels.lowrank_inverse(pairs.eigenvalues, pairs.eigenvectors, damping=damping)
    exact = np.linalg.solve(matrix + damping * np.eye(17), flat(b))
    approximate = flat(inverse(b))
    _, vectors = np.linalg.eigh(matrix)
    top = vectors[:, ::-1][:, :5]
    np.testing.assert_allclose(top.T @ approximate, top.T @ exact, atol=1e-8)
    error = np.linalg.norm(approximate - exact) / np.linalg.norm(exact)
    naive = np.linalg.norm(flat(b) / damping - exact) / np.linalg.norm(exact)
    assert error < 0.2
    assert error < naive / 3


def test_lanczos_rejects_bad_settings_before_any_product():
    start = vector_tree("dict", 0)
    calls = []

    def matvec(v):
        calls.append(1)
        return v

    with pytest.raises(ValueError, match="num_steps must be between 1 and the dimension 17"):
        kernels.lanczos(matvec, start, num_steps=18)
    with pytest.raises(ValueError, match="num_eigenpairs must be between 1 and num_steps"):
        kernels.lanczos(matvec, start, num_steps=5, num_eigenpairs=6)
    with pytest.raises(ValueError, match="start vector v0 is zero"):
        kernels.lanczos(matvec, jax.tree.map(jnp.zeros_like, start), num_steps=5)
    with pytest.raises(ValueError, match="same structure"):
        kernels.lanczos(lambda v: tuple(v.values()), start, num_steps=5)
    assert calls == []


def test_lowrank_inverse_rejects_damping_that_does_not_make_the_operator_definite():
    values = jnp.asarray([3.0, -0.5])
    vectors = {"w": jnp.eye(2)}
    with pytest.raises(ValueError, match="damping must be > 0"):
        kernels.lowrank_inverse(values, vectors, damping=0.0)
    with pytest.raises(ValueError, match=r"eigenvalue -0.5 plus damping 0.2 is not positive"):
        kernels.lowrank_inverse(values, vectors, damping=0.2)
    with pytest.raises(ValueError, match="2 eigenvalues but eigenvector leaves"):
        kernels.lowrank_inverse(values, {"w": jnp.eye(3)}, damping=1.0)
