"""Curvature products against dense float64 matrices (jax.hessian, explicit JᵀHJ)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from kernel_problems import attention_problem, flat, mlp_problem, random_like, relative_error

import kernels

PROBLEMS = {"mlp": mlp_problem, "attention": attention_problem}
CASES = [
    (problem, tree_kind, seed)
    for problem in PROBLEMS
    for tree_kind in ("dict", "tuple")
    for seed in (0, 1, 2)
]
TOLERANCE = 1e-10  # float64 relative error


def dense_hessian(loss, params, batch) -> np.ndarray:
    flat_params, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda q: loss(unravel(q), batch))(flat_params))


def dense_gauss_newton(model, loss_of_logits, params, inputs) -> np.ndarray:
    flat_params, unravel = ravel_pytree(params)
    outputs = model(params, inputs)
    jacobian = jax.jacfwd(lambda q: model(unravel(q), inputs).ravel())(flat_params)
    output_hessian = jax.hessian(lambda o: loss_of_logits(o.reshape(outputs.shape)))(
        outputs.ravel()
    )
    return np.asarray(jacobian.T @ output_hessian @ jacobian)


@pytest.mark.parametrize(("problem", "tree_kind", "seed"), CASES)
def test_hvp_matches_dense_hessian(problem, tree_kind, seed):
    loss, params, batch, _, _ = PROBLEMS[problem](seed, tree_kind)
    direction = random_like(seed, params)
    product = jax.jit(kernels.hvp, static_argnums=0)(loss, params, direction, batch)
    expected = dense_hessian(loss, params, batch) @ flat(direction)
    assert jax.tree.structure(product) == jax.tree.structure(params)
    assert relative_error(product, ravel_pytree(params)[1](jnp.asarray(expected))) <= TOLERANCE


@pytest.mark.parametrize(("problem", "tree_kind", "seed"), CASES)
def test_linearized_hvp_matches_dense_hessian_for_many_directions(problem, tree_kind, seed):
    loss, params, batch, _, _ = PROBLEMS[problem](seed, tree_kind)
    hessian = dense_hessian(loss, params, batch)
    unravel = ravel_pytree(params)[1]
    product = kernels.linearize_hvp(loss, params, batch)
    for offset in range(3):
        direction = random_like(seed + 10 * offset, params)
        expected = unravel(jnp.asarray(hessian @ flat(direction)))
        assert relative_error(product(direction), expected) <= TOLERANCE


def test_linearized_hvp_works_inside_jit():
    loss, params, batch, _, _ = mlp_problem(0, "dict")
    direction = random_like(0, params)

    @jax.jit
    def twice_applied(p, v):
        product = kernels.linearize_hvp(loss, p, batch)
        return product(product(v))

    hessian = dense_hessian(loss, params, batch)
    expected = ravel_pytree(params)[1](jnp.asarray(hessian @ hessian @ flat(direction)))
    assert relative_error(twice_applied(params, direction), expected) <= TOLERANCE


@pytest.mark.parametrize(("problem", "tree_kind", "seed"), CASES)
def test_gnvp_matches_explicit_gauss_newton(problem, tree_kind, seed):
    _, params, (inputs, targets), model, loss_factory = PROBLEMS[problem](seed, tree_kind)
    loss_of_logits = loss_factory(targets)
    direction = random_like(seed, params)
    product = jax.jit(kernels.gnvp, static_argnums=(0, 1))(
        model, loss_of_logits, params, direction, inputs
    )
    gauss_newton = dense_gauss_newton(model, loss_of_logits, params, inputs)
    expected = ravel_pytree(params)[1](jnp.asarray(gauss_newton @ flat(direction)))
    assert relative_error(product, expected) <= TOLERANCE


def test_gauss_newton_is_positive_semidefinite_where_the_hessian_is_not():
    # Away from a minimum the Hessian of a non-linear model is indefinite; the Gauss-Newton
    # matrix of a convex loss never is. Both dense matrices are checked, then the products.
    _, params, (inputs, targets), model, loss_factory = attention_problem(3, "dict")
    loss_of_logits = loss_factory(targets)
    hessian = dense_hessian(lambda p, b: loss_of_logits(model(p, b)), params, inputs)
    gauss_newton = dense_gauss_newton(model, loss_of_logits, params, inputs)
    assert np.linalg.eigvalsh(hessian).min() < -1e-6
    assert np.linalg.eigvalsh(gauss_newton).min() > -1e-12
    for seed in range(5):
        direction = random_like(seed, params)
        product = kernels.gnvp(model, loss_of_logits, params, direction, inputs)
        assert float(kernels.tree_vdot(direction, product)) >= 0


@pytest.mark.parametrize(("problem", "tree_kind", "seed"), CASES)
def test_per_example_grads_match_jacobian_of_example_losses(problem, tree_kind, seed):
    loss, params, (inputs, targets), _, _ = PROBLEMS[problem](seed, tree_kind)

    def example_loss(p, example):
        x, y = example
        return loss(p, (x[None], y[None]))

    gradients = kernels.per_example_grads(example_loss, params, (inputs, targets))
    flat_params, unravel = ravel_pytree(params)
    jacobian = jax.jacrev(
        lambda q: jax.vmap(lambda x, y: example_loss(unravel(q), (x, y)))(inputs, targets)
    )(flat_params)
    assert jacobian.shape[0] == inputs.shape[0]
    for row in range(inputs.shape[0]):
        actual = flat(jax.tree.map(lambda g, r=row: g[r], gradients))
        error = np.linalg.norm(actual - jacobian[row]) / np.linalg.norm(jacobian[row])
        assert error <= TOLERANCE


def test_per_example_grads_in_chunks_equal_vectorized():
    loss, params, (inputs, targets), _, _ = mlp_problem(4, "tuple")

    def example_loss(p, example):
        x, y = example
        return loss(p, (x[None], y[None]))

    whole = kernels.per_example_grads(example_loss, params, (inputs, targets))
    chunked = kernels.per_example_grads(example_loss, params, (inputs, targets), chunk_size=4)
    assert relative_error(chunked, whole) <= TOLERANCE


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fisher_vp_matches_explicit_empirical_fisher(seed):
    loss, params, (inputs, targets), _, _ = attention_problem(seed, "dict")

    def example_loss(p, example):
        x, y = example
        return loss(p, (x[None], y[None]))

    direction = random_like(seed, params)
    product = kernels.fisher_vp(example_loss, params, direction, (inputs, targets))
    flat_params, unravel = ravel_pytree(params)
    jacobian = np.asarray(
        jax.jacfwd(
            lambda q: jax.vmap(lambda x, y: example_loss(unravel(q), (x, y)))(inputs, targets)
        )(flat_params)
    )
    fisher = jacobian.T @ jacobian / inputs.shape[0]
    assert relative_error(product, unravel(jnp.asarray(fisher @ flat(direction)))) <= TOLERANCE


def test_products_keep_a_bfloat16_tree_in_bfloat16():
    loss, params, batch, _, _ = mlp_problem(0, "dict")
    params16 = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), params)
    batch16 = (batch[0].astype(jnp.bfloat16), batch[1])
    product = kernels.hvp(loss, params16, params16, batch16)
    assert {leaf.dtype for leaf in jax.tree.leaves(product)} == {jnp.dtype(jnp.bfloat16)}
    assert kernels.tree_vdot(product, product).dtype == jnp.float32


def test_hvp_and_cg_on_a_flax_nnx_state():
    from flax import nnx

    model = nnx.Sequential(
        nnx.Linear(4, 5, rngs=nnx.Rngs(0), param_dtype=jnp.float64),
        jnp.tanh,
        nnx.Linear(5, 2, rngs=nnx.Rngs(1), param_dtype=jnp.float64),
    )
    graphdef, params = nnx.split(model, nnx.Param)
    inputs = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)))

    def loss(state, x):
        return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)

    direction = random_like(0, params)
    product = kernels.hvp(loss, params, direction, inputs)
    assert isinstance(product, nnx.State)
    expected = dense_hessian(loss, params, inputs) @ flat(direction)
    assert relative_error(product, ravel_pytree(params)[1](jnp.asarray(expected))) <= TOLERANCE

    gradient = jax.grad(loss)(params, inputs)
    operator = kernels.linearize_hvp(loss, params, inputs)
    solution = kernels.cg(operator, gradient, damping=0.5, tol=1e-12, max_steps=100).check()
    hessian = dense_hessian(loss, params, inputs)
    exact = np.linalg.solve(hessian + 0.5 * np.eye(hessian.shape[0]), flat(gradient))
    assert isinstance(solution.x, nnx.State)
    assert relative_error(solution.x, ravel_pytree(params)[1](jnp.asarray(exact))) <= 1e-10
