"""Tree algebra: leafwise results, dtypes kept, reductions in float32 or better."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_problems import flat, vector_tree

from jaxunlearn import kernels


@pytest.mark.parametrize("tree_kind", ["dict", "tuple"])
def test_operations_agree_with_flat_numpy(tree_kind):
    x, y = vector_tree(tree_kind, 0), vector_tree(tree_kind, 1)
    assert float(kernels.tree_vdot(x, y)) == pytest.approx(flat(x) @ flat(y), rel=1e-14)
    assert float(kernels.tree_norm(x)) == pytest.approx(np.linalg.norm(flat(x)), rel=1e-14)
    np.testing.assert_allclose(flat(kernels.tree_scale(2.5, x)), 2.5 * flat(x), rtol=1e-15)
    np.testing.assert_allclose(
        flat(kernels.tree_add_scaled(x, -0.5, y)), flat(x) - 0.5 * flat(y), rtol=1e-15
    )
    np.testing.assert_allclose(flat(kernels.tree_sub(x, y)), flat(x) - flat(y), rtol=1e-15)
    zeros = kernels.tree_zeros_like(x)
    assert jax.tree.structure(zeros) == jax.tree.structure(x)
    assert not np.any(flat(zeros))


def test_bfloat16_leaves_keep_their_dtype_and_reduce_in_float32():
    x = {"a": jnp.full((4096,), 1.0 + 2**-7, jnp.bfloat16), "b": jnp.ones((3,), jnp.float32)}
    assert kernels.tree_add_scaled(x, 0.5, x)["a"].dtype == jnp.bfloat16
    assert kernels.tree_scale(3.0, x)["a"].dtype == jnp.bfloat16
    total = kernels.tree_vdot(x, x)
    assert total.dtype == jnp.float32
    # 4096 products of (1 + 2⁻⁷)² summed in bfloat16 would stall far below the true value.
    assert float(total) == pytest.approx(4096 * (1 + 2**-7) ** 2 + 3, rel=1e-6)


def test_random_normal_like_draws_independent_leaves_of_the_same_layout():
    template = {"w": jnp.zeros((200, 50), jnp.float32), "b": jnp.zeros((1000,), jnp.bfloat16)}
    draw = kernels.tree_random_normal_like(jax.random.key(0), template)
    assert jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), draw) == jax.tree.map(
        lambda leaf: (leaf.shape, leaf.dtype), template
    )
    values = np.asarray(draw["w"], np.float64).ravel()
    assert abs(values.mean()) < 0.02
    assert abs(values.std() - 1) < 0.02
    again = kernels.tree_random_normal_like(jax.random.key(0), template)
    other = kernels.tree_random_normal_like(jax.random.key(1), template)
    np.testing.assert_array_equal(np.asarray(again["w"]), np.asarray(draw["w"]))
    assert not np.allclose(np.asarray(other["w"]), np.asarray(draw["w"]))


def test_works_on_flax_nnx_state():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    doubled = kernels.tree_scale(2.0, state)
    assert isinstance(doubled, type(state))
    expected = 2 * np.sum(np.asarray(model.kernel[...]) ** 2) + 2 * np.sum(
        np.asarray(model.bias[...]) ** 2
    )
    assert float(kernels.tree_vdot(state, doubled)) == pytest.approx(expected, rel=1e-6)
