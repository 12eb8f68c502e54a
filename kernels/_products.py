"""Curvature-vector products over pytrees of parameters.

Every product is forward-over-reverse: a `jax.jvp` through a gradient (or through the model
and its transpose), which costs about two gradients instead of the three of double backward.
None materializes a matrix. Each product is exactly the derivative of the function it is
given, so it averages over a batch exactly as that function does: pass a mean loss to get
the mean curvature.
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import jax

from kernels._tree import PyTree

Matvec = Callable[[PyTree], PyTree]


def hvp(f: Callable[..., jax.Array], params: PyTree, v: PyTree, *args: Any) -> PyTree:
    """Hessian-vector product ∇²f(params, *args) · v, forward-over-reverse.

    Args:
        f: scalar function `f(params, *args)`.
        params: the point at which the Hessian is taken (any pytree).
        v: the direction, a tree with the structure of `params`.
        *args: further arguments of `f` (a batch, say); not differentiated.

    Returns:
        A tree with the structure of `params`.
    """
    gradient = partial(_gradient_at, f, args=args)
    return jax.jvp(gradient, (params,), (v,))[1]


def _gradient_at(f, params, *, args):
    return jax.grad(f)(params, *args)


def linearize_hvp(f: Callable[..., jax.Array], params: PyTree, *args: Any) -> Matvec:
    """The map v ↦ ∇²f(params, *args) · v, reusing one linearization of the gradient.

    The gradient is linearized once (one compiled forward and backward pass, whose
    intermediate values are kept in memory); each product after that is a pass through the
    linearized gradient, about the cost of one gradient. Use it inside iterative solvers that
    apply the same Hessian many times.

    Works inside `jax.jit` and outside it; outside, both the linearization and every product
    run compiled. The linearization is compiled once per `f` (a static argument): pass the same
    function object each time, not a fresh lambda, or every call compiles anew.

    The map is a `jax.tree_util.Partial`, a pytree whose leaves are the saved residuals: pass
    it as an argument of a jitted solver (rather than closing over it) so that the residuals
    are inputs of the compiled loop, not constants baked into it, and the compiled solver is
    reused for every linearization of the same function.
    """
    linear_gradient = _linearize_gradient(f, params, *args)
    return jax.tree_util.Partial(_apply_linear_map, linear_gradient)


@partial(jax.jit, static_argnums=0)
def _linearize_gradient(f, params, *args) -> jax.tree_util.Partial:
    return jax.linearize(partial(_gradient_at, f, args=args), params)[1]


@jax.jit
def _apply_linear_map(linear_map: jax.tree_util.Partial, v: PyTree) -> PyTree:
    # `jax.linearize` returns a Partial whose leaves are the saved residuals and whose static
    # part is the linear jaxpr: passing it as a jit argument runs each product compiled, and a
    # new linearization of the same function reuses the compiled product.
    return linear_map(v)


def gnvp(
    model_fn: Callable[..., Any],
    loss_fn: Callable[[Any], jax.Array],
    params: PyTree,
    v: PyTree,
    *args: Any,
) -> PyTree:
    """Generalized Gauss-Newton product Jᵀ (∇²loss) J · v for `loss_fn(model_fn(params, *args))`.

    J is the Jacobian of the model's outputs with respect to `params`, and ∇²loss the Hessian
    of `loss_fn` with respect to those outputs. Neither is materialized: the model is
    linearized once (J·v by its JVP, Jᵀ· by transposing that linear map) and the output-space
    Hessian is applied forward-over-reverse. For softmax cross-entropy on logits this applies
    diag(p) − ppᵀ token by token without ever forming a [vocab, vocab] matrix. The product is
    positive semi-definite whenever `loss_fn` is convex in the outputs.

    Args:
        model_fn: `model_fn(params, *args)` returning the outputs (any pytree, e.g. logits).
        loss_fn: scalar function of the outputs alone (close over the targets).
        params: the point of linearization.
        v: the direction, a tree with the structure of `params`.
        *args: further arguments of `model_fn`; not differentiated.
    """
    outputs, model_jvp = jax.linearize(lambda p: model_fn(p, *args), params)
    output_direction = model_jvp(v)
    loss_gradient = jax.grad(loss_fn)
    output_curvature = jax.jvp(loss_gradient, (outputs,), (output_direction,))[1]
    (product,) = jax.linear_transpose(model_jvp, params)(output_curvature)
    return product


def per_example_grads(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    *,
    chunk_size: int | None = None,
) -> PyTree:
    """Gradients of `loss_fn(params, example)` for every example of a batch.

    Args:
        loss_fn: scalar loss of one example, `loss_fn(params, example)`; the example has no
            batch axis (add one inside `loss_fn` if the model needs it).
        params: parameters (any pytree).
        batch: a pytree whose leaves share a leading batch axis.
        chunk_size: if given, compute this many examples at a time (vectorized within a
            chunk, sequential across chunks) to bound memory.

    Returns:
        A tree with the structure of `params` whose leaves have a leading batch axis.
    """
    gradient = jax.grad(loss_fn)

    def one_example(example):
        return gradient(params, example)

    if chunk_size is None:
        return jax.vmap(one_example)(batch)
    return jax.lax.map(one_example, batch, batch_size=chunk_size)


def fisher_vp(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    v: PyTree,
    batch: Any,
) -> PyTree:
    """Empirical Fisher product F·v with F = (1/B) Σᵢ ∇ℓᵢ ∇ℓᵢᵀ over the B examples of `batch`.

    Computed as (1/B) Jᵀ(J v), J the Jacobian of the vector of per-example losses: one JVP and
    one VJP, without materializing per-example gradients.

    Args:
        loss_fn: scalar loss of one example, `loss_fn(params, example)`.
        params: parameters (any pytree).
        v: the direction, a tree with the structure of `params`.
        batch: a pytree whose leaves share a leading batch axis.
    """

    def example_losses(p):
        return jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)

    losses, losses_jvp = jax.linearize(example_losses, params)
    directional = losses_jvp(v)
    (product,) = jax.linear_transpose(losses_jvp, params)(directional / losses.shape[0])
    return product
