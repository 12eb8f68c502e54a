"""Model-level curvature operators against dense float64 Hessians and Gauss-Newton matrices.

The model runs with float64 weights, but RMSNorm and the LoRA path compute in float32 by design
(as transformers does), so products agree with the dense answer to float32 rounding of those
intermediates (about 1e-6 relative), not to 1e-12: the tolerances are set accordingly. A wiring
error (a batch weighted wrongly, a padding row counted, a missing Λ) is an O(1) error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from unlearn_fixtures import CONFIG, DenseObjective, random_examples, tiny_lora_model

from jaxunlearn import curvature, kernels
from jaxunlearn.models import add_lora, from_config

RTOL = 2e-5


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _setup(seed=0, num_examples=7):
    model = tiny_lora_model(seed=seed, dtype=jnp.float64)
    _, data = random_examples(num_examples, seed=seed)
    graphdef, lora, base = curvature.split_for_curvature(model)
    return model, data, graphdef, lora, base


def _batches(data, indices, batch_size):
    """Length-sorted batches padded to `batch_size` rows: several buckets and padding rows."""
    indices = np.asarray(indices)
    ordered = indices[np.argsort(data.lengths[indices], kind="stable")]
    return [
        data.batch(ordered[i : i + batch_size], batch_size=batch_size)
        for i in range(0, len(ordered), batch_size)
    ]


def _operator_matrix(matvec, dense):
    """The operator's matrix, one column per basis vector (all columns in one compiled call)."""
    basis = jax.vmap(dense.to_tree)(jnp.eye(dense.flat.size, dtype=dense.flat.dtype))
    return np.asarray(_flat_columns(matvec, basis), np.float64).T


@jax.jit
def _flat_columns(matvec, basis):
    # Compiled whole (the operator is a pytree argument): a vmap outside jit dispatches the
    # linearized products' operations one at a time, 2-3x slower here.
    return jax.vmap(lambda tree: ravel_pytree(matvec(tree))[0])(basis)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
def test_fixed_curvature_equals_dense_matrix(seed, kind):
    model, data, graphdef, lora, base = _setup(seed)
    dense = DenseObjective(model, data)
    reference = dense.hessian() if kind == "hessian" else dense.gauss_newton()
    # Two batches (each a compiled linearization): two buckets, and padding rows in the second.
    batches = _batches(data, np.arange(len(data)), batch_size=4)
    assert len({b.input_ids.shape[1] for b in batches}) > 1, "the batches should span buckets"
    assert not all(np.asarray(batches[-1].example_mask))
    matvec = curvature.fixed_curvature(graphdef, lora, base, batches, kind=kind)
    matrix = _operator_matrix(matvec, dense)
    scale = np.abs(reference).max()
    assert np.abs(matrix - reference).max() <= RTOL * scale
    if kind == "gauss_newton":
        assert np.linalg.eigvalsh(reference).min() > -1e-10 * scale


# The failure (a merge without a copy inside `nnx.remat`) does not depend on the curvature's
# kind: one of them runs by default.
@pytest.mark.parametrize("kind", [pytest.param("hessian", marks=pytest.mark.slow), "gauss_newton"])
def test_curvature_of_a_rematerialized_model_is_that_of_the_plain_one(kind):
    # Linearizing through `nnx.remat` fails unless the objective merges with a copy.
    _, data, graphdef, lora, base = _setup(0, num_examples=4)
    remat_model = add_lora(
        from_config(CONFIG, key=jax.random.key(0), dtype=jnp.float64, remat=True),
        rank=1,
        alpha=4.0,
        targets=("q_proj", "v_proj"),
        key=jax.random.key(100),
    )
    nnx.update(remat_model, lora)
    remat_graphdef, remat_lora, remat_base = curvature.split_for_curvature(remat_model)
    batches = _batches(data, np.arange(len(data)), batch_size=2)
    v = kernels.tree_random_normal_like(jax.random.key(1), lora)
    plain = curvature.fixed_curvature(graphdef, lora, base, batches, kind=kind)(v)
    remat = curvature.fixed_curvature(remat_graphdef, remat_lora, remat_base, batches, kind=kind)(v)
    fresh = curvature.batch_product(remat_graphdef, kind)(remat_lora, remat_base, batches[0], v)
    plain_fresh = curvature.batch_product(graphdef, kind)(lora, base, batches[0], v)
    for got, want in ((remat, plain), (fresh, plain_fresh)):
        error = kernels.tree_norm(kernels.tree_sub(got, want)) / kernels.tree_norm(want)
        assert float(error) <= RTOL


def test_the_hessian_and_gauss_newton_differ_here():
    """Guards the test above: with a random adapter the two curvatures are far apart."""
    model, data, *_ = _setup(0)
    dense = DenseObjective(model, data)
    hessian, gauss_newton = dense.hessian(), dense.gauss_newton()
    assert np.abs(hessian - gauss_newton).max() > 0.1 * np.abs(hessian).max()
    assert np.linalg.eigvalsh(hessian).min() < 0


def test_objective_gradient_sum_and_mean():
    model, data, graphdef, lora, base = _setup(0)
    dense = DenseObjective(model, data)
    batches = _batches(data, np.arange(len(data)), batch_size=4)
    total = dense.to_flat(curvature.objective_gradient(graphdef, lora, base, batches))
    mean = dense.to_flat(
        curvature.objective_gradient(graphdef, lora, base, batches, reduction="mean")
    )
    reference = dense.gradient()
    np.testing.assert_allclose(mean, reference, rtol=0, atol=RTOL * np.abs(reference).max())
    np.testing.assert_allclose(total, len(data) * mean, rtol=1e-12)


def _with_key_3(stochastic, v):
    return stochastic(v, jax.random.key(3))


def test_stochastic_curvature_with_the_whole_pool_is_the_mean():
    model, data, graphdef, lora, base = _setup(0)
    pool = data.batch(np.arange(len(data)), batch_size=len(data) + 2)  # two padding rows
    dense = DenseObjective(model, data)
    reference = dense.hessian()
    stochastic = curvature.stochastic_curvature(
        graphdef, lora, base, pool, batch_size=len(data), kind="hessian"
    )
    matrix = _operator_matrix(jax.tree_util.Partial(_with_key_3, stochastic), dense)
    assert np.abs(matrix - reference).max() <= RTOL * np.abs(reference).max()


@pytest.mark.slow  # the sampling is covered by the whole-pool test above; this one costs 30 s
def test_stochastic_curvature_of_one_example_is_that_examples_curvature():
    model, data, graphdef, lora, base = _setup(0)
    pool = data.batch(np.arange(len(data)))
    stochastic = curvature.stochastic_curvature(
        graphdef, lora, base, pool, batch_size=1, kind="gauss_newton"
    )
    dense_all = DenseObjective(model, data)
    v = dense_all.to_tree(np.random.default_rng(0).normal(size=dense_all.flat.size))
    product = dense_all.to_flat(stochastic(v, jax.random.key(5)))
    singles = [
        DenseObjective(model, data, [i]).gauss_newton() @ dense_all.to_flat(v)
        for i in range(len(data))
    ]
    errors = [np.abs(product - single).max() / np.abs(single).max() for single in singles]
    assert min(errors) <= RTOL
    assert sorted(errors)[1] > 1e-2, "distinct examples must give distinct products"


def test_spectrum_estimate_and_damping_rule():
    model, data, graphdef, lora, base = _setup(1)
    dense = DenseObjective(model, data)
    eigenvalues = np.linalg.eigvalsh(dense.hessian())
    batches = _batches(data, np.arange(len(data)), batch_size=4)
    matvec = curvature.fixed_curvature(graphdef, lora, base, batches, kind="hessian")
    spectrum = curvature.estimate_spectrum(matvec, lora, num_steps=30, key=jax.random.key(0))
    assert spectrum.num_steps == 30
    assert spectrum.largest == pytest.approx(eigenvalues.max(), rel=1e-4)
    # Ritz values lie inside the spectrum (up to the float32 rounding of the products).
    scale = np.abs(eigenvalues).max()
    assert eigenvalues.min() - RTOL * scale <= spectrum.smallest < 0
    damping = curvature.choose_damping(spectrum, relative=0.01)
    assert damping == pytest.approx(0.01 * spectrum.largest - spectrum.smallest)


def test_choose_damping_rejects_a_flat_spectrum():
    flat = curvature.Spectrum(0.0, 0.0, (0.0,), 1)
    with pytest.raises(ValueError, match="largest eigenvalue"):
        curvature.choose_damping(flat)
    with pytest.raises(ValueError, match="relative"):
        curvature.choose_damping(curvature.Spectrum(1.0, 0.1, (1.0,), 1), relative=0)


def test_unknown_curvature_kind_is_refused():
    _, data, graphdef, lora, base = _setup(0)
    with pytest.raises(ValueError, match="curvature must be one of"):
        curvature.fixed_curvature(graphdef, lora, base, [data.batch([0])], kind="fisher")


def test_split_for_curvature_switches_dropout_off_without_touching_the_model():
    model = add_lora(
        from_config(CONFIG, key=jax.random.key(0)),
        rank=2,
        alpha=4.0,
        targets=("q_proj",),
        key=jax.random.key(1),
        dropout=0.5,
    )
    _, data = random_examples(3)
    batch = data.batch(np.arange(3))
    graphdef, lora, base = curvature.split_for_curvature(model)
    loss = curvature.objective(graphdef)
    lora = jax.tree.map(lambda leaf: leaf + 0.5, lora)  # non-zero B, so dropout would matter
    assert float(loss(lora, base, batch)) == float(loss(lora, base, batch))
    nnx.update(model, lora)
    first = model(batch.input_ids, batch.attention_mask)
    second = model(batch.input_ids, batch.attention_mask)
    assert not np.allclose(first, second), "the model itself keeps its dropout on"


def test_lanczos_of_the_operator_is_a_kernels_call():
    """The operator is a plain pytree function that `kernels` solvers accept under jit."""
    model, data, graphdef, lora, base = _setup(0)
    dense = DenseObjective(model, data)
    batches = _batches(data, np.arange(len(data)), batch_size=7)
    matvec = curvature.fixed_curvature(graphdef, lora, base, batches, kind="gauss_newton")
    rhs = dense.to_tree(np.random.default_rng(1).normal(size=dense.flat.size))
    solution = jax.jit(lambda b: kernels.cg(matvec, b, damping=0.1, tol=1e-10, max_steps=200))(rhs)
    reference = np.linalg.solve(
        dense.gauss_newton() + 0.1 * np.eye(dense.flat.size), dense.to_flat(rhs)
    )
    np.testing.assert_allclose(
        dense.to_flat(solution.x), reference, rtol=0, atol=RTOL * np.abs(reference).max()
    )


def _nbytes(tree) -> int:
    """The bytes of a tree's arrays (its Python numbers, the operators' weights, aside)."""
    arrays = [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")]
    return sum(leaf.size * leaf.dtype.itemsize for leaf in arrays)


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
def test_the_operator_recomputed_per_product_is_the_linearized_one(kind):
    model, data, graphdef, lora, base = _setup(0)
    dense = DenseObjective(model, data)
    batches = _batches(data, np.arange(len(data)), batch_size=4)
    linearized = curvature.fixed_curvature(graphdef, lora, base, batches, kind=kind)
    recomputed = curvature.fixed_curvature(
        graphdef, lora, base, batches, kind=kind, linearize=False
    )
    want = _operator_matrix(linearized, dense)
    got = _operator_matrix(recomputed, dense)
    # Both are the dense matrix to the accuracy the model computes in (its attention softmax
    # is float32 whatever the dtype), and so each other: the same products in other orders.
    reference = dense.hessian() if kind == "hessian" else dense.gauss_newton()
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() <= RTOL * scale
    assert np.abs(got - want).max() <= 1e-6 * scale
    # What each keeps: every batch's linearization (linearization_bytes says how much), or
    # the model, the batches and their weights only.
    saved = curvature.linearization_bytes(graphdef, lora, base, batches, kind=kind)
    assert _nbytes(linearized) == saved
    assert _nbytes(recomputed) == _nbytes((lora, base, batches, np.ones(len(batches))))
    assert saved > 2 * _nbytes((lora, base, batches))


def test_memory_of_the_recomputed_operator_is_bounded_by_one_batch():
    """Compiled products over 1 and 6 batches: the linearizations' memory grows with the
    sample, the recomputed operator's does not (read from the compiled memory analysis)."""
    _, data, graphdef, lora, base = _setup(0)
    # One shape for every batch (the same rows, as separate arrays): only their number differs.
    batches = [data.batch([0, 1]) for _ in range(6)]

    def memory(count: int, linearize: bool) -> int:
        operator = curvature.fixed_curvature(
            graphdef, lora, base, batches[:count], kind="gauss_newton", linearize=linearize
        )
        analysis = jax.jit(lambda op, v: op(v)).lower(operator, lora).compile().memory_analysis()
        return analysis.argument_size_in_bytes + analysis.temp_size_in_bytes

    # Recomputed: five more batches as arguments, and the temporaries of one batch's product
    # (a loop body whose buffers every batch reuses).
    one, six = memory(1, linearize=False), memory(6, linearize=False)
    assert six <= 1.05 * one + 5 * _nbytes(batches[0])
    # Linearized: every batch's residuals are arguments.
    assert memory(6, linearize=True) >= 4 * memory(1, linearize=True)
