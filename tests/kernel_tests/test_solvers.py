"""One battery for every solver of (C + λI) x = b, against numpy.linalg.solve in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from kernel_problems import flat, relative_error, spd_matrix, tree_operator, vector_tree

from jaxunlearn import kernels

DAMPING = 0.1
# Eigenvalues of C: condition number of C + λI about 20, small enough for the stationary
# solvers (LiSSA, gradient descent) to reach 1e-10 in a few hundred steps.
SPECTRUM = np.linspace(1.0, 20.0, 17)
LARGEST = SPECTRUM.max() + DAMPING


def cg_solve(matvec, b):
    return kernels.cg(matvec, b, damping=DAMPING, tol=1e-13, max_steps=60)


def lissa_solve(matvec, b):
    return kernels.lissa(matvec, b, damping=DAMPING, scale=LARGEST, max_steps=800, tol=1e-13)


def gradient_descent_solve(matvec, b):
    # With an exact operator and plain SGD at step 1/L, sgd_quadratic is gradient descent on
    # the quadratic, whose fixed point is exactly (C + λI)⁻¹b. A solver carrying the factor-2
    # bug of LLMEraser's published code would converge to 2(C + 2λI)⁻¹b and fail this battery.
    return kernels.sgd_quadratic(
        lambda v, key: matvec(v),
        b,
        damping=DAMPING,
        optimizer=optax.sgd(1.0 / LARGEST),
        max_steps=800,
        key=jax.random.key(0),
        tol=1e-13,
    )


def lowrank_solve(matvec, b):
    # With as many Lanczos steps as dimensions the low-rank inverse is the exact inverse.
    pairs = kernels.lanczos(matvec, b, num_steps=SPECTRUM.size)
    x = kernels.lowrank_inverse(pairs.eigenvalues, pairs.eigenvectors, damping=DAMPING)(b)
    return kernels.Solution(x, jnp.asarray(SPECTRUM.size), jnp.asarray(0.0), jnp.asarray(0))


SOLVERS = {
    "cg": cg_solve,
    "lissa": lissa_solve,
    "sgd_quadratic": gradient_descent_solve,
    "lowrank": lowrank_solve,
}
ITERATIVE = ["cg", "lissa", "sgd_quadratic"]


def dense_solution(matrix, b):
    exact = np.linalg.solve(matrix + DAMPING * np.eye(matrix.shape[0]), flat(b))
    return ravel_pytree(b)[1](jnp.asarray(exact))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("tree_kind", ["dict", "tuple"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solution_matches_dense_solve_under_jit(solver, tree_kind, seed):
    b = vector_tree(tree_kind, seed)
    matrix = spd_matrix(seed, SPECTRUM)
    matvec = tree_operator(matrix, b)
    solution = jax.jit(functools.partial(SOLVERS[solver], matvec))(b)
    assert jax.tree.structure(solution.x) == jax.tree.structure(b)
    assert relative_error(solution.x, dense_solution(matrix, b)) <= 1e-10
    assert int(solution.status) in (kernels.Status.CONVERGED, kernels.Status.MAX_STEPS)
    solution.check()


def test_cg_reaches_relative_residual_1e_10_on_a_well_conditioned_problem():
    b = vector_tree("dict", 7)
    matrix = spd_matrix(7, SPECTRUM)
    solution = kernels.cg(tree_operator(matrix, b), b, damping=DAMPING, tol=1e-10, max_steps=60)
    assert int(solution.status) == kernels.Status.CONVERGED
    assert float(solution.residual) <= 1e-10
    true_residual = (matrix + DAMPING * np.eye(17)) @ flat(solution.x) - flat(b)
    assert np.linalg.norm(true_residual) / np.linalg.norm(flat(b)) <= 1e-10
    assert int(solution.steps) <= 17  # CG is exact in at most n steps


@pytest.mark.parametrize("solver", ITERATIVE)
def test_solution_reports_converged_and_stops_at_tolerance(solver):
    b = vector_tree("dict", 3)
    solution = SOLVERS[solver](tree_operator(spd_matrix(3, SPECTRUM), b), b)
    assert int(solution.status) == kernels.Status.CONVERGED
    assert float(solution.residual) <= 1e-13


@pytest.mark.parametrize("solver", SOLVERS)
def test_float32_right_hand_side_gives_float32_solution(solver):
    b = vector_tree("tuple", 4, dtype=jnp.float32)
    matrix = spd_matrix(4, SPECTRUM)
    solution = SOLVERS[solver](tree_operator(matrix, b), b)
    assert {leaf.dtype for leaf in jax.tree.leaves(solution.x)} == {jnp.dtype(jnp.float32)}
    expected = dense_solution(matrix, b)
    tolerance = 1e-5
    if solver == "lowrank":
        # The low-rank route divides the part of b outside the eigenbasis by λ: float32
        # eigenvectors are orthonormal to about n·eps, so that part is n·eps·‖b‖ of rounding,
        # magnified by 1/λ, relative to ‖x‖.
        eps = float(jnp.finfo(jnp.float32).eps)
        rounding = SPECTRUM.size * eps * np.linalg.norm(flat(b)) / DAMPING
        tolerance = 2 * rounding / np.linalg.norm(flat(expected))
    assert relative_error(solution.x, expected) <= tolerance


@pytest.mark.parametrize("solver", SOLVERS)
def test_vmapped_over_right_hand_sides(solver):
    matrix = spd_matrix(5, SPECTRUM)
    right_hand_sides = [vector_tree("dict", seed) for seed in range(3)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *right_hand_sides)
    matvec = tree_operator(matrix, right_hand_sides[0])
    solutions = jax.jit(jax.vmap(functools.partial(SOLVERS[solver], matvec)))(stacked)
    for index, b in enumerate(right_hand_sides):
        x = jax.tree.map(lambda leaf, i=index: leaf[i], solutions.x)
        assert relative_error(x, dense_solution(matrix, b)) <= 1e-10


def test_zero_right_hand_side_gives_zero_without_steps():
    b = jax.tree.map(jnp.zeros_like, vector_tree("dict", 0))
    solution = kernels.cg(tree_operator(spd_matrix(0, SPECTRUM), b), b, damping=DAMPING)
    assert int(solution.steps) == 0
    assert int(solution.status) == kernels.Status.CONVERGED
    assert float(kernels.tree_norm(solution.x)) == 0.0


# Errors raised before any work.


def counting(matvec):
    calls = []

    def counted(v, *rest):
        calls.append(1)
        return matvec(v)

    return counted, calls


def run_solver(name, matvec, b, *, damping=DAMPING):
    if name == "cg":
        return kernels.cg(matvec, b, damping=damping)
    if name == "lissa":
        return kernels.lissa(matvec, b, damping=damping, scale=LARGEST)
    return kernels.sgd_quadratic(
        matvec, b, damping=damping, optimizer=optax.sgd(0.01), max_steps=5, key=jax.random.key(0)
    )


@pytest.mark.parametrize("solver", ITERATIVE)
def test_negative_damping_is_rejected_before_any_product(solver):
    b = vector_tree("dict", 0)
    matvec, calls = counting(tree_operator(spd_matrix(0, SPECTRUM), b))
    with pytest.raises(ValueError, match="damping must be >= 0"):
        run_solver(solver, matvec, b, damping=-1e-3)
    assert calls == []


@pytest.mark.parametrize("solver", ITERATIVE)
def test_operator_returning_another_structure_is_rejected(solver):
    b = vector_tree("dict", 0)

    def wrong_structure(v, *rest):
        return tuple(v.values())

    with pytest.raises(ValueError, match="same structure"):
        run_solver(solver, wrong_structure, b)


@pytest.mark.parametrize("solver", ITERATIVE)
def test_operator_returning_another_shape_is_rejected(solver):
    b = vector_tree("dict", 0)

    def wrong_shape(v, *rest):
        return {**v, "a": v["a"].T}

    with pytest.raises(ValueError, match=r"at leaf \['a'\]"):
        run_solver(solver, wrong_shape, b)


# Failures reported in the status, never a NaN handed back as success.


def test_cg_detects_indefinite_curvature_and_keeps_a_finite_iterate():
    b = vector_tree("dict", 2)
    spectrum = np.concatenate([[-3.0], np.linspace(1.0, 5.0, 16)])
    matvec = tree_operator(spd_matrix(2, spectrum), b)
    solution = jax.jit(lambda rhs: kernels.cg(matvec, rhs, damping=DAMPING, max_steps=50))(b)
    assert int(solution.status) == kernels.Status.INDEFINITE
    assert all(np.isfinite(flat(solution.x)))
    with pytest.raises(kernels.SolverError, match="INDEFINITE"):
        solution.check()


def test_damping_that_makes_an_indefinite_curvature_definite_lets_cg_converge():
    b = vector_tree("dict", 2)
    matrix = spd_matrix(2, np.concatenate([[-3.0], np.linspace(1.0, 5.0, 16)]))
    solution = kernels.cg(tree_operator(matrix, b), b, damping=4.0, tol=1e-12, max_steps=50)
    solution.check(require_convergence=True)
    exact = np.linalg.solve(matrix + 4.0 * np.eye(17), flat(b))
    assert relative_error(solution.x, ravel_pytree(b)[1](jnp.asarray(exact))) <= 1e-10


@pytest.mark.parametrize("solver", ITERATIVE)
def test_nan_from_the_operator_is_reported_not_returned_as_success(solver):
    b = vector_tree("dict", 0)

    def poisoned(v, *rest):
        return jax.tree.map(lambda leaf: leaf * jnp.nan, v)

    solution = run_solver(solver, poisoned, b)
    assert int(solution.status) == kernels.Status.NONFINITE
    with pytest.raises(kernels.SolverError, match="NONFINITE"):
        solution.check()


def test_lissa_with_too_small_a_scale_reports_divergence():
    b = vector_tree("dict", 0)
    matvec = tree_operator(spd_matrix(0, SPECTRUM), b)
    solution = kernels.lissa(matvec, b, damping=DAMPING, scale=LARGEST / 4, max_steps=1000)
    assert int(solution.status) == kernels.Status.DIVERGED
    assert int(solution.steps) < 1000
    with pytest.raises(kernels.SolverError, match="DIVERGED"):
        solution.check()


def test_exhausted_budget_fails_only_when_convergence_is_required():
    b = vector_tree("dict", 0)
    matvec = tree_operator(spd_matrix(0, SPECTRUM), b)
    solution = kernels.cg(matvec, b, damping=DAMPING, tol=1e-12, max_steps=3)
    assert int(solution.status) == kernels.Status.MAX_STEPS
    assert solution.check() is solution
    with pytest.raises(kernels.SolverError, match="MAX_STEPS"):
        solution.check(require_convergence=True)


# The stochastic solvers on a finite sum whose answer is known.


def finite_sum_problem(seed: int, *, count: int = 40, batch_size: int = 8):
    """C = (1/n) Σ Cᵢ with random PSD Cᵢ; the stochastic operator averages a random batch."""
    rng = np.random.default_rng(seed)
    b = vector_tree("dict", seed)
    dimension = flat(b).size
    factors = rng.normal(size=(count, dimension, 4)) / np.sqrt(dimension)
    terms = jnp.asarray(np.einsum("nik,njk->nij", factors, factors) * 3.0)
    mean_term = np.asarray(terms.mean(axis=0))
    _, unravel = ravel_pytree(b)

    def stochastic_matvec(v, key):
        chosen = jax.random.choice(key, count, (batch_size,), replace=False)
        return unravel(jnp.mean(terms[chosen], axis=0) @ ravel_pytree(v)[0])

    return b, mean_term, stochastic_matvec


def test_sgd_quadratic_with_adam_converges_on_a_stochastic_finite_sum():
    b, mean_term, stochastic_matvec = finite_sum_problem(0)
    damping = 0.5
    expected = ravel_pytree(b)[1](
        jnp.asarray(np.linalg.solve(mean_term + damping * np.eye(17), flat(b)))
    )
    schedule = optax.cosine_decay_schedule(0.05, decay_steps=1500, alpha=0.01)
    solution = jax.jit(
        lambda rhs: kernels.sgd_quadratic(
            stochastic_matvec,
            rhs,
            damping=damping,
            optimizer=optax.adam(schedule),
            max_steps=1500,
            key=jax.random.key(1),
        )
    )(b)
    solution.check()
    assert int(solution.steps) == 1500
    assert relative_error(solution.x, expected) <= 0.02


def test_stochastic_lissa_error_floor_shrinks_with_the_scale():
    # With a fresh mini-batch per step, LiSSA is a constant-step stochastic iteration: it
    # settles at a noise floor whose size falls like the square root of the step 1/s.
    b, mean_term, stochastic_matvec = finite_sum_problem(1)
    damping = 0.5
    expected = ravel_pytree(b)[1](
        jnp.asarray(np.linalg.solve(mean_term + damping * np.eye(17), flat(b)))
    )
    largest = np.linalg.eigvalsh(mean_term).max() + damping
    errors = []
    for multiple in (1, 16):
        solution = kernels.lissa(
            stochastic_matvec,
            b,
            damping=damping,
            scale=multiple * largest,
            max_steps=2000,
            key=jax.random.key(2),
        )
        solution.check()
        errors.append(relative_error(solution.x, expected))
    assert errors[1] <= 0.08
    assert errors[1] < errors[0] / 2
