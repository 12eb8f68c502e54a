"""Curvature-vector products over pytrees of parameters.

The whole family has one signature: the function(s) first, then the point `params`, then the
direction `v`, then the further arguments `*args` of the function(s) (a batch, frozen
weights), which are never differentiated:

    hvp(f, params, v, *args)                   ∇²f(params, *args) · v
    gnvp(model_fn, loss_fn, params, v, *args)  Jᵀ (∇²loss) J · v
    fisher_vp(loss_fn, params, v, *args)       (1/B) Σᵢ ∇ℓᵢ ∇ℓᵢᵀ · v

The `linearize_*` forms take the same arguments without `v` and return the map v ↦ product,
with everything that does not depend on v done once:

    linearize_hvp(f, params, *args)
    linearize_gnvp(model_fn, loss_fn, params, *args)

Both functions of the Gauss-Newton product receive `*args`: `model_fn(params, *args)` gives
the outputs and `loss_fn(outputs, *args)` the scalar loss, so `gnvp` is the Gauss-Newton
matrix of `f(params, *args) = loss_fn(model_fn(params, *args), *args)`, the `f` that `hvp`
would take. `per_example_grads(loss_fn, params, *args)` follows the same order.

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

from jaxunlearn.kernels._tree import PyTree

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

    Args:
        f: scalar function `f(params, *args)`.
        params: the point at which the Hessian is taken (any pytree).
        *args: further arguments of `f`; not differentiated.
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
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    v: PyTree,
    *args: Any,
) -> PyTree:
    """Generalized Gauss-Newton product Jᵀ (∇²loss) J · v.

    J is the Jacobian of the outputs `model_fn(params, *args)` with respect to `params`, and
    ∇²loss the Hessian of `loss_fn(outputs, *args)` with respect to the outputs. Neither is
    materialized: the model is linearized (J·v by its JVP, Jᵀ· by transposing that linear map)
    and the output-space Hessian is applied forward-over-reverse. For softmax cross-entropy on
    logits this applies diag(p) − ppᵀ token by token without ever forming a [vocab, vocab]
    matrix. The product is positive semi-definite whenever `loss_fn` is convex in the outputs.

    Args:
        model_fn: `model_fn(params, *args)` returning the outputs (any pytree, e.g. logits).
        loss_fn: scalar `loss_fn(outputs, *args)` (it may ignore the arguments it does not
            need, such as the inputs).
        params: the point of linearization.
        v: the direction, a tree with the structure of `params`.
        *args: further arguments of both functions; not differentiated.

    Returns:
        A tree with the structure of `params`.
    """
    outputs, model_jvp = jax.linearize(partial(_outputs_at, model_fn, args=args), params)
    loss_gradient = jax.grad(partial(_loss_at, loss_fn, args=args))

    def output_hessian(output_direction):
        return jax.jvp(loss_gradient, (outputs,), (output_direction,))[1]

    return _gauss_newton_product(model_jvp, output_hessian, v)


def linearize_gnvp(
    model_fn: Callable[..., Any],
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    *args: Any,
) -> Matvec:
    """The map v ↦ Jᵀ (∇²loss) J · v of `gnvp`, reusing one linearization of the model.

    The model is linearized once (one compiled forward pass, whose intermediate values are
    kept in memory, with the outputs and the parts of `args` that the loss reads). Each product
    after that is J·v through the saved linearization, the output-space Hessian at the saved
    outputs, and Jᵀ· by transposing the saved linearization: about the cost of one gradient,
    with no forward pass through the model. Use it inside iterative solvers that apply the same
    Gauss-Newton matrix many times.

    As for `linearize_hvp`: it works inside and outside `jax.jit`, the linearization is
    compiled once per pair of functions (static arguments: pass the same function objects each
    time, not fresh lambdas), and the map is a `jax.tree_util.Partial` whose leaves are the
    saved residuals: pass it as an argument of a jitted solver rather than closing over it.

    Args:
        model_fn: `model_fn(params, *args)` returning the outputs (any pytree, e.g. logits).
        loss_fn: scalar `loss_fn(outputs, *args)`.
        params: the point of linearization.
        *args: further arguments of both functions; not differentiated.
    """
    model_jvp, output_hessian = _linearize_gauss_newton(model_fn, loss_fn, params, *args)
    return jax.tree_util.Partial(_apply_gauss_newton, model_jvp, output_hessian)


def _outputs_at(model_fn, params, *, args):
    return model_fn(params, *args)


def _loss_at(loss_fn, outputs, *, args):
    return loss_fn(outputs, *args)


@partial(jax.jit, static_argnums=(0, 1))
def _linearize_gauss_newton(model_fn, loss_fn, params, *args):
    outputs, model_jvp = jax.linearize(partial(_outputs_at, model_fn, args=args), params)
    loss_gradient = jax.grad(partial(_loss_at, loss_fn, args=args))
    # Under `jax.checkpoint` the loss's linearization saves only its inputs (the outputs and
    # the parts of `args` it reads, such as the targets) and each product recomputes the
    # rest, cheap work on the outputs alone: the map then holds one array of the outputs' size
    # instead of every such intermediate (three for softmax cross-entropy), and none of the
    # `args` the loss does not read (frozen weights, say).
    output_hessian = jax.linearize(jax.checkpoint(loss_gradient), outputs)[1]
    return model_jvp, output_hessian


@jax.jit
def _apply_gauss_newton(model_jvp, output_hessian, v: PyTree) -> PyTree:
    return _gauss_newton_product(model_jvp, output_hessian, v)


def _gauss_newton_product(model_jvp, output_hessian, v: PyTree) -> PyTree:
    (product,) = jax.linear_transpose(model_jvp, v)(output_hessian(model_jvp(v)))
    return product


def per_example_grads(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    *args: Any,
    chunk_size: int | None = None,
) -> PyTree:
    """Gradients of `loss_fn(params, *example)` for every example of a batch.

    Args:
        loss_fn: scalar loss of one example, `loss_fn(params, *example)`; the example has no
            batch axis (add one inside `loss_fn` if the model needs it).
        params: parameters (any pytree).
        *args: the batch: pytrees whose leaves share a leading batch axis.
        chunk_size: if given, compute this many examples at a time (vectorized within a
            chunk, sequential across chunks) to bound memory.

    Returns:
        A tree with the structure of `params` whose leaves have a leading batch axis.
    """
    gradient = jax.grad(loss_fn)

    def one_example(example):
        return gradient(params, *example)

    if chunk_size is None:
        return jax.vmap(one_example)(args)
    return jax.lax.map(one_example, args, batch_size=chunk_size)


def fisher_vp(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    v: PyTree,
    *args: Any,
) -> PyTree:
    """Empirical Fisher product F·v with F = (1/B) Σᵢ ∇ℓᵢ ∇ℓᵢᵀ over the B examples of a batch.

    Computed as (1/B) Jᵀ(J v), J the Jacobian of the vector of per-example losses: one JVP and
    one VJP, without materializing per-example gradients.

    Args:
        loss_fn: scalar loss of one example, `loss_fn(params, *example)`.
        params: parameters (any pytree).
        v: the direction, a tree with the structure of `params`.
        *args: the batch: pytrees whose leaves share a leading batch axis of size B.

    Returns:
        A tree with the structure of `params`.
    """

    def example_losses(p):
        return jax.vmap(lambda example: loss_fn(p, *example))(args)

    losses, losses_jvp = jax.linearize(example_losses, params)
    directional = losses_jvp(v)
    (product,) = jax.linear_transpose(losses_jvp, params)(directional / losses.shape[0])
    return product
