"""Curvature products against dense float64 matrices (jax.hessian, explicit JᵀHJ)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from kernel_problems import (
    attention_problem,
    flat,
    gauss_newton_split,
    mlp_problem,
    random_like,
    relative_error,
)

from jaxunlearn import kernels

PROBLEMS = {"mlp": mlp_problem, "attention": attention_problem}
CASES = [
    (problem, tree_kind, seed)
    for problem in PROBLEMS
    for tree_kind in ("dict", "tuple")
    for seed in (0, 1, 2)
]
TOLERANCE = 1e-10  # float64 relative error


# The dense references are compiled whole: run eagerly, each of their hundreds of operations
# would be compiled on its own, which took most of this file's time.
def dense_hessian(loss, params, batch) -> np.ndarray:
    flat_params, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda q, b: loss(unravel(q), b)))(flat_params, batch))


def dense_gauss_newton(model, loss_of_logits, params, inputs) -> np.ndarray:
    @jax.jit
    def matrix(params, inputs):
        flat_params, unravel = ravel_pytree(params)
        outputs = model(params, inputs)
        jacobian = jax.jacfwd(lambda q: model(unravel(q), inputs).ravel())(flat_params)
        output_hessian = jax.hessian(lambda o: loss_of_logits(o.reshape(outputs.shape)))(
            outputs.ravel()
        )
        return jacobian.T @ output_hessian @ jacobian

    return np.asarray(matrix(params, inputs))


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
    _, params, batch, model, loss_factory = PROBLEMS[problem](seed, tree_kind)
    model_fn, loss_fn = gauss_newton_split(model, loss_factory)
    direction = random_like(seed, params)
    product = jax.jit(kernels.gnvp, static_argnums=(0, 1))(
        model_fn, loss_fn, params, direction, batch
    )
    gauss_newton = dense_gauss_newton(model, loss_factory(batch[1]), params, batch[0])
    expected = ravel_pytree(params)[1](jnp.asarray(gauss_newton @ flat(direction)))
    assert jax.tree.structure(product) == jax.tree.structure(params)
    assert relative_error(product, expected) <= TOLERANCE


@pytest.mark.parametrize(("problem", "tree_kind", "seed"), CASES)
def test_linearized_gnvp_matches_explicit_gauss_newton_for_many_directions(
    problem, tree_kind, seed
):
    _, params, batch, model, loss_factory = PROBLEMS[problem](seed, tree_kind)
    model_fn, loss_fn = gauss_newton_split(model, loss_factory)
    gauss_newton = dense_gauss_newton(model, loss_factory(batch[1]), params, batch[0])
    unravel = ravel_pytree(params)[1]
    product = kernels.linearize_gnvp(model_fn, loss_fn, params, batch)
    for offset in range(3):
        direction = random_like(seed + 10 * offset, params)
        expected = unravel(jnp.asarray(gauss_newton @ flat(direction)))
        applied = product(direction)
        assert jax.tree.structure(applied) == jax.tree.structure(params)
        assert {leaf.dtype for leaf in jax.tree.leaves(applied)} == {jnp.dtype(jnp.float64)}
        assert relative_error(applied, expected) <= TOLERANCE


@pytest.mark.parametrize("tree_kind", ["dict", "tuple"])
def test_linearized_gnvp_works_inside_jit(tree_kind):
    _, params, batch, model, loss_factory = attention_problem(1, tree_kind)
    model_fn, loss_fn = gauss_newton_split(model, loss_factory)
    direction = random_like(1, params)

    @jax.jit
    def twice_applied(p, v, b):
        product = kernels.linearize_gnvp(model_fn, loss_fn, p, b)
        return product(product(v))

    gauss_newton = dense_gauss_newton(model, loss_factory(batch[1]), params, batch[0])
    expected = ravel_pytree(params)[1](jnp.asarray(gauss_newton @ gauss_newton @ flat(direction)))
    assert relative_error(twice_applied(params, direction, batch), expected) <= TOLERANCE


@pytest.mark.parametrize("linearize", ["hvp", "gnvp"])
def test_a_linearized_map_is_an_argument_of_a_solver_compiled_once(linearize):
    # The map is a pytree whose leaves are the saved residuals: a jitted solver taking it as an
    # argument is traced once for every linearization of the same functions, at any point.
    loss, _, batch, model, loss_factory = mlp_problem(0, "dict")
    model_fn, loss_fn = gauss_newton_split(model, loss_factory)
    traces = []

    @jax.jit
    def solve(operator, b, damping):
        traces.append(1)
        return kernels.cg(operator, b, damping=damping, tol=1e-12, max_steps=100)

    for seed in (0, 1, 2):
        _, params, _, _, _ = mlp_problem(seed, "dict")
        if linearize == "hvp":
            operator = kernels.linearize_hvp(loss, params, batch)
            matrix = dense_hessian(loss, params, batch)
        else:
            operator = kernels.linearize_gnvp(model_fn, loss_fn, params, batch)
            matrix = dense_gauss_newton(model, loss_factory(batch[1]), params, batch[0])
        b = random_like(seed, params)
        # The Hessian may be indefinite here: damp it to positive definite.
        damping = 0.1 + max(0.0, -np.linalg.eigvalsh(matrix).min())
        solution = solve(operator, b, jnp.asarray(damping)).check(require_convergence=True)
        exact = np.linalg.solve(matrix + damping * np.eye(matrix.shape[0]), flat(b))
        assert relative_error(solution.x, ravel_pytree(params)[1](jnp.asarray(exact))) <= 1e-9
    assert len(traces) == 1


@pytest.mark.parametrize("tree_kind", ["dict", "tuple"])
def test_gnvp_of_a_model_linear_in_its_parameters_is_the_hessian(tree_kind):
    # The signature's promise: gnvp(model_fn, loss_fn, ...) is the Gauss-Newton matrix of
    # f(params, *args) = loss_fn(model_fn(params, *args), *args), which equals f's Hessian when
    # the model is linear in its parameters.
    rng = np.random.default_rng(7)
    inputs = jnp.asarray(rng.normal(size=(6, 5)))
    targets = jnp.asarray(rng.integers(0, 3, size=6))
    params = {"w": jnp.asarray(rng.normal(size=(5, 3))), "b": jnp.asarray(rng.normal(size=(3,)))}
    params = params if tree_kind == "dict" else (params["b"], params["w"])

    def model_fn(p, x, y):
        w, b = (p["w"], p["b"]) if isinstance(p, dict) else (p[1], p[0])
        return x @ w + b

    def loss_fn(logits, x, y):
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))

    def f(p, x, y):
        return loss_fn(model_fn(p, x, y), x, y)

    direction = random_like(7, params)
    hessian = kernels.hvp(f, params, direction, inputs, targets)
    products = {
        "gnvp": kernels.gnvp(model_fn, loss_fn, params, direction, inputs, targets),
        "linearize_gnvp": kernels.linearize_gnvp(model_fn, loss_fn, params, inputs, targets)(
            direction
        ),
        "linearize_hvp": kernels.linearize_hvp(f, params, inputs, targets)(direction),
    }
    for name, product in products.items():
        assert relative_error(product, hessian) <= TOLERANCE, name


def test_gauss_newton_is_positive_semidefinite_where_the_hessian_is_not():
    # Away from a minimum the Hessian of a non-linear model is indefinite; the Gauss-Newton
    # matrix of a convex loss never is. Both dense matrices are checked, then the products.
    loss, params, batch, model, loss_factory = attention_problem(3, "dict")
    model_fn, loss_fn = gauss_newton_split(model, loss_factory)
    hessian = dense_hessian(loss, params, batch)
    gauss_newton = dense_gauss_newton(model, loss_factory(batch[1]), params, batch[0])
    assert np.linalg.eigvalsh(hessian).min() < -1e-6
    assert np.linalg.eigvalsh(gauss_newton).min() > -1e-12
    linearized = kernels.linearize_gnvp(model_fn, loss_fn, params, batch)
    for seed in range(5):
        direction = random_like(seed, params)
        product = kernels.gnvp(model_fn, loss_fn, params, direction, batch)
        assert float(kernels.tree_vdot(direction, product)) >= 0
        assert float(kernels.tree_vdot(direction, linearized(direction))) >= 0


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


def test_per_example_grads_and_fisher_vp_take_the_batch_as_several_arguments():
    # Like every product, they pass their further arguments on: here each one is batched.
    loss, params, (inputs, targets), _, _ = attention_problem(4, "tuple")

    def example_loss_of_tuple(p, example):
        x, y = example
        return loss(p, (x[None], y[None]))

    def example_loss_of_two(p, x, y):
        return loss(p, (x[None], y[None]))

    direction = random_like(4, params)
    fisher_one = kernels.fisher_vp(example_loss_of_tuple, params, direction, (inputs, targets))
    fisher_two = kernels.fisher_vp(example_loss_of_two, params, direction, inputs, targets)
    assert relative_error(fisher_two, fisher_one) <= TOLERANCE
    grads_one = kernels.per_example_grads(example_loss_of_tuple, params, (inputs, targets))
    grads_two = kernels.per_example_grads(example_loss_of_two, params, inputs, targets)
    chunked = kernels.per_example_grads(example_loss_of_two, params, inputs, targets, chunk_size=1)
    assert relative_error(grads_two, grads_one) <= TOLERANCE
    assert relative_error(chunked, grads_one) <= TOLERANCE


def test_products_keep_a_bfloat16_tree_in_bfloat16():
    loss, params, batch, model, loss_factory = mlp_problem(0, "dict")
    model_fn, loss_fn = gauss_newton_split(model, loss_factory)
    params16 = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), params)
    batch16 = (batch[0].astype(jnp.bfloat16), batch[1])
    products = {
        "hvp": kernels.hvp(loss, params16, params16, batch16),
        "linearize_hvp": kernels.linearize_hvp(loss, params16, batch16)(params16),
        "gnvp": kernels.gnvp(model_fn, loss_fn, params16, params16, batch16),
        "linearize_gnvp": kernels.linearize_gnvp(model_fn, loss_fn, params16, batch16)(params16),
    }
    for name, product in products.items():
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(product)}
        assert dtypes == {jnp.dtype(jnp.bfloat16)}, name
        assert kernels.tree_vdot(product, product).dtype == jnp.float32, name


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
