"""Linear algebra on pytrees, leaf by leaf.

Nothing here ravels a tree into one vector: under sharding, raveling gathers every leaf onto
one device, and even raveling one leaf (as `jnp.vdot` does) reshapes a sharded array. Inner
products multiply leaf by leaf and sum over every axis in at least float32, so a bfloat16
adapter still gets float32 (or float64) reductions.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

# On TPUs (and GPUs with TF32) the default precision of a float32 contraction is lower than
# float32; the combinations of Lanczos vectors must not be.
_FULL_PRECISION = jax.lax.Precision.HIGHEST


def accumulation_dtype(dtype) -> jnp.dtype:
    """The dtype that reductions over leaves of `dtype` accumulate in: float32 or wider."""
    return jnp.promote_types(dtype, jnp.float32)


# Jitted, so that a call outside jit is one program rather than one reduction per leaf: on the
# CPU devices of several processes, reductions dispatched one after another without waiting
# can run their cross-process collectives in different orders and deadlock (measured with
# two processes of 4 devices; inside a jitted caller this changes nothing).
@jax.jit
def tree_vdot(left: PyTree, right: PyTree) -> jax.Array:
    """Inner product ⟨left, right⟩ summed over all leaves, accumulated in float32 or better."""
    products = jax.tree.map(_leaf_vdot, left, right)
    leaves = jax.tree.leaves(products)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    dtype = jnp.result_type(*leaves)
    return sum((leaf.astype(dtype) for leaf in leaves[1:]), leaves[0].astype(dtype))


def _leaf_vdot(left: jax.Array, right: jax.Array) -> jax.Array:
    # An elementwise product reduced over all axes, rather than a dot of raveled leaves: it
    # keeps each leaf's sharding and involves no reduced-precision matmul passes. Under jit,
    # XLA fuses the product into the reduction, so no temporary of the leaf's size is made.
    dtype = accumulation_dtype(jnp.result_type(left, right))
    return jnp.sum(jnp.conj(left.astype(dtype)) * right.astype(dtype))


@jax.jit
def tree_norm(tree: PyTree) -> jax.Array:
    """Euclidean norm of the whole tree, accumulated in float32 or better."""
    return jnp.sqrt(tree_vdot(tree, tree))


def tree_scale(scalar, tree: PyTree) -> PyTree:
    """scalar · tree, each leaf keeping its dtype."""
    return jax.tree.map(lambda leaf: (scalar * leaf).astype(leaf.dtype), tree)


def tree_add_scaled(x: PyTree, scalar, y: PyTree) -> PyTree:
    """x + scalar · y, each leaf keeping the dtype of x."""
    return jax.tree.map(lambda a, b: (a + scalar * b).astype(a.dtype), x, y)


def tree_sub(x: PyTree, y: PyTree) -> PyTree:
    """x − y, each leaf keeping the dtype of x."""
    return jax.tree.map(lambda a, b: (a - b).astype(a.dtype), x, y)


def tree_zeros_like(tree: PyTree) -> PyTree:
    """A tree of zeros with the structure, shapes and dtypes of `tree`."""
    return jax.tree.map(jnp.zeros_like, tree)


def tree_random_normal_like(key: jax.Array, tree: PyTree) -> PyTree:
    """Independent standard normal draws with the structure, shapes and dtypes of `tree`."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    draws = [
        jax.random.normal(leaf_key, jnp.shape(leaf), jnp.result_type(leaf))
        for leaf_key, leaf in zip(keys, leaves, strict=False)
    ]
    return jax.tree.unflatten(treedef, draws)


def tree_all_finite(tree: PyTree) -> jax.Array:
    """True when no leaf holds a NaN or an infinity."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def tree_size(tree: PyTree) -> int:
    """Number of scalars in the tree (a static Python int)."""
    return sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(tree))


def check_operator_preserves_tree(
    operator: Callable[..., PyTree], vector: PyTree, *extra_args, name: str
) -> None:
    """Raise a ValueError, before any work, unless `operator(vector)` has `vector`'s layout.

    Only traces the operator abstractly (`jax.eval_shape`): no FLOPs are spent.
    """
    expected = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf), leaf.dtype), vector)
    produced = jax.eval_shape(operator, vector, *extra_args)
    expected_def = jax.tree.structure(expected)
    produced_def = jax.tree.structure(produced)
    if expected_def != produced_def:
        raise ValueError(
            f"{name}: the operator returns a tree of structure {produced_def}, but the vector "
            f"it was applied to has structure {expected_def}; a curvature operator must map a "
            "tree to a tree of the same structure."
        )
    for path, want, got in zip(
        _paths(expected), jax.tree.leaves(expected), jax.tree.leaves(produced), strict=True
    ):
        if want.shape != got.shape or want.dtype != got.dtype:
            raise ValueError(
                f"{name}: at leaf {path} the operator returns {got.dtype}{list(got.shape)} for "
                f"a vector leaf of {want.dtype}{list(want.shape)}."
            )


def _paths(tree: PyTree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def stacked_vdot(stack: PyTree, tree: PyTree) -> jax.Array:
    """Inner products ⟨stack[i], tree⟩ for a stack of trees (leaves with a leading axis k).

    Returns a [k] vector accumulated in float32 or better.
    """
    return jax.vmap(tree_vdot, in_axes=(0, None))(stack, tree)


def stacked_combination(coefficients: jax.Array, stack: PyTree) -> PyTree:
    """Σᵢ coefficients[i] · stack[i], each leaf keeping the dtype of the stack."""

    def combine(leaf):
        dtype = accumulation_dtype(jnp.result_type(leaf, coefficients))
        combined = jnp.tensordot(
            coefficients.astype(dtype), leaf.astype(dtype), axes=1, precision=_FULL_PRECISION
        )
        return combined.astype(leaf.dtype)

    return jax.tree.map(combine, stack)
