"""Curvature of the fine-tuning objective over the LoRA tree, built on `jaxunlearn.kernels`.

The objective is R(Θ) = mean over examples of L(z; Θ), the mean response-token NLL that
training minimizes (`jaxunlearn.batch`), as a function of the LoRA tree Θ alone: the model is
split into `(graphdef, lora, base)` once (`split_for_curvature`) and every operator here is a
plain function of pytrees with the structure of `lora`.

Two curvatures, each in two forms:
- `"hessian"`: ∇²R, forward-over-reverse; indefinite away from a minimum, so it needs damping.
- `"gauss_newton"`: (1/n) Σ Jᵀ Λ J with Λ the softmax cross-entropy Hessian; positive
  semi-definite.
- `fixed_curvature`: the mean over a chosen sample, linearized once per batch of the sample
  (each product then costs about one gradient of the sample) or, where the linearizations
  would not fit (`linearization_bytes`), recomputed batch by batch in every product:
  deterministic, for CG, Lanczos and a deterministic LiSSA.
- `stochastic_curvature`: `(v, key) ↦ C_B v` on a fresh uniformly drawn mini-batch B per
  product, an unbiased estimate of the mean over the whole dataset: for the stochastic
  quadratic solver and a stochastic LiSSA.

Damping is never implicit: the solvers take λ and solve with C + λI. `estimate_spectrum` runs
a few Lanczos steps to bracket the eigenvalues, and `choose_damping` turns them into a λ by a
stated rule, so that every report can say which λ was used and why.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn import kernels, parallel
from jaxunlearn.batch import (
    Batch,
    mean_loss,
    mean_over_examples,
    model_mean_loss,
    response_losses,
)
from jaxunlearn.models import OutputHead, split_lora

__all__ = [
    "CURVATURE_KINDS",
    "CurvatureKind",
    "Spectrum",
    "batch_product",
    "choose_damping",
    "estimate_spectrum",
    "fixed_curvature",
    "jitted_cg",
    "jitted_lanczos",
    "jitted_lissa",
    "linearization_bytes",
    "objective",
    "objective_gradient",
    "real_examples",
    "split_for_curvature",
    "stochastic_curvature",
    "warm_up_gradient",
]

CurvatureKind = Literal["hessian", "gauss_newton"]
CURVATURE_KINDS: tuple[str, ...] = ("hessian", "gauss_newton")

Tree = nnx.State


def split_for_curvature(model: nnx.Module, /) -> tuple[nnx.GraphDef, Tree, Tree]:
    """Splits a LoRA model into `(graphdef, lora, base)` with dropout switched off.

    Curvature and influence are derivatives of the deterministic objective, so the graph is
    taken from an evaluation view of the model; the model's own mode is left unchanged.
    """
    view = nnx.view(model, deterministic=True, raise_if_not_found=False)
    return split_lora(view)


@functools.cache
def objective(graphdef: nnx.GraphDef, /) -> Callable[[Tree, Tree, Batch], jax.Array]:
    """The batch objective `loss(lora, base, batch)`: the mean of L(z) over its real examples.

    One function object per graph, so that the compiled linearizations and products that
    `kernels` caches per function are reused across requests.
    """

    def loss(lora: Tree, base: Tree, batch: Batch) -> jax.Array:
        # copy: the merged model's Variables must belong to this trace. A model built with
        # `remat=True` writes its layers' random streams back after its layer loop, and a merge
        # without a copy would share those Variables with the outer trace, where flax refuses
        # the write (TraceContextError) while linearizing.
        model = nnx.merge(graphdef, lora, base, copy=True)
        return model_mean_loss(model, batch)

    return loss


# Gauss-Newton's outputs are the final hidden states, not the logits. The output head is
# frozen (LoRA never adapts it) and linear, logits = W h, so Jᵀ_logits Λ J_logits =
# Jᵀ_h (Wᵀ Λ W) J_h: the same matrix, with Wᵀ Λ W the Hessian of the loss as a function of h.
# That Hessian is applied through the loss's vocabulary chunks, so neither the [B, T, V] logits
# nor their tangents exist whole. A model without a separate output head (any module whose
# call returns logits) has its logits as the outputs, and `head` None.


@functools.cache
def _outputs_function(graphdef: nnx.GraphDef, /) -> Callable[..., jax.Array]:
    """`outputs(lora, base, head, batch)`: the hidden states the output head reads (the logits
    when `head` is None) in float32 or wider, the outputs of Gauss-Newton."""

    def outputs(lora: Tree, base: Tree, head: OutputHead | None, batch: Batch) -> jax.Array:
        model = nnx.merge(graphdef, lora, base, copy=True)  # copy: as in `objective`
        if head is None:
            values = model(batch.input_ids, batch.attention_mask)
        else:
            values = model.hidden_states(batch.input_ids, batch.attention_mask)
        return values.astype(jnp.promote_types(values.dtype, jnp.float32))

    return outputs


def _loss_of_outputs(
    outputs: jax.Array, base: Tree, head: OutputHead | None, batch: Batch
) -> jax.Array:
    """The objective as a function of Gauss-Newton's outputs: its `loss_fn(outputs, *args)`."""
    del base  # an argument of the model only
    if head is None:
        return mean_loss(outputs, batch)
    log_probs = head.next_token_log_probs(outputs, batch.input_ids)
    return mean_over_examples(response_losses(log_probs, batch), batch)


def _output_head(graphdef: nnx.GraphDef, lora: Tree, base: Tree) -> OutputHead | None:
    """The frozen output head, the array `base` holds (no copy); None for a model without
    one."""
    model = nnx.merge(graphdef, lora, base)
    return model.output_head() if hasattr(model, "output_head") else None


@functools.partial(jax.jit, static_argnames="graphdef")
def _summed_gradient(lora: Tree, base: Tree, batch: Batch, *, graphdef: nnx.GraphDef) -> Tree:
    # The mean loss times the number of real examples is the sum of L(z) over the batch.
    count = jnp.sum(jnp.asarray(batch.example_mask, jnp.float32))

    def summed(lora):
        return objective(graphdef)(lora, base, batch) * count

    return jax.grad(summed)(lora)


def objective_gradient(
    graphdef: nnx.GraphDef,
    lora: Tree,
    base: Tree,
    batches: Sequence[Batch],
    /,
    *,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tree:
    """Σ ∇L(z) (or the mean) over the real examples of `batches`.

    Args:
        graphdef, lora, base: The model, split by `split_for_curvature`.
        batches: The examples, in padded batches (rows with `example_mask` False are ignored).
        reduction: `"sum"` of per-example gradients, or their `"mean"`.
    """
    batches = list(batches)
    total = None
    count = 0
    for batch in batches:
        gradient = _summed_gradient(lora, base, batch, graphdef=graphdef)
        total = gradient if total is None else kernels.tree_add_scaled(total, 1.0, gradient)
        count += real_examples(batch)
    if total is None or count == 0:
        raise ValueError("objective_gradient needs at least one real example.")
    return kernels.tree_scale(1.0 / count, total) if reduction == "mean" else total


def warm_up_gradient(graphdef: nnx.GraphDef, lora: Tree, base: Tree, batches: Sequence[Batch]):
    """Compiles `objective_gradient` for every batch shape of `batches`, so that timing a later
    call measures running it, not compiling it. Runs each shape once on padding rows only."""
    shapes = {}
    for batch in batches:
        shapes.setdefault(np.shape(batch.input_ids), batch)
    for batch in shapes.values():
        padding = batch._replace(example_mask=_zeros_like(batch.example_mask))
        jax.block_until_ready(_summed_gradient(lora, base, padding, graphdef=graphdef))


def real_examples(batch: Batch, /) -> int:
    """The number of real (not padding) rows of a batch, on the host or on a mesh (a sum on
    the devices: a batch split over several processes cannot be read whole by one)."""
    mask = batch.example_mask
    if isinstance(mask, jax.Array):
        return int(jnp.sum(mask.astype(jnp.int32)))
    return int(np.sum(mask))


def _zeros_like(mask):
    zeros = np.zeros(mask.shape, mask.dtype)
    return parallel.put(zeros, mask.sharding) if isinstance(mask, jax.Array) else zeros


def _check_kind(kind: str) -> None:
    if kind not in CURVATURE_KINDS:
        raise ValueError(f"curvature must be one of {CURVATURE_KINDS}, got {kind!r}.")


def fixed_curvature(
    graphdef: nnx.GraphDef,
    lora: Tree,
    base: Tree,
    batches: Sequence[Batch],
    /,
    *,
    kind: CurvatureKind = "hessian",
    linearize: bool = True,
) -> Callable[[Tree], Tree]:
    """v ↦ C v for the curvature C of the mean objective over the real examples of `batches`.

    Each batch contributes in proportion to its number of real examples, so the result is the
    mean over the whole sample however it was cut into batches.

    Args:
        graphdef, lora, base: The model, split by `split_for_curvature`; the curvature is taken
            at `lora`.
        batches: The curvature sample.
        kind: `"hessian"` or `"gauss_newton"`.
        linearize: True: each batch is linearized here, once (`kernels.linearize_hvp`,
            `kernels.linearize_gnvp`), and every product reuses the linearizations; memory:
            all of them at once (`linearization_bytes`). False: every product recomputes each
            batch's from the model (`batch_product`), one batch after another; memory: one
            batch's product, at the cost of a forward pass per batch and product.

    Returns:
        A deterministic symmetric operator on trees with the structure of `lora`.
    """
    _check_kind(kind)
    batches = list(batches)
    counts = [real_examples(batch) for batch in batches]
    total = sum(counts)
    if total == 0:
        raise ValueError("fixed_curvature needs at least one real example in its sample.")
    kept = [(batch, count / total) for batch, count in zip(batches, counts, strict=True) if count]
    # Pytrees (their leaves: saved linearizations, or the model and the batches): jitted
    # solvers take them as arguments, so their arrays are inputs of the compiled loop rather
    # than constants in it.
    if not linearize:
        products = _recomputed_products(graphdef, kind)
        return jax.tree_util.Partial(products, lora, base, _stacked_by_shape(kept))
    pieces = tuple(_linearization(graphdef, kind, lora, base, batch) for batch, _ in kept)
    weights = tuple(weight for _, weight in kept)
    return jax.tree_util.Partial(_weighted_sum_of_products, pieces, weights)


def linearization_bytes(
    graphdef: nnx.GraphDef,
    lora: Tree,
    base: Tree,
    batches: Sequence[Batch],
    /,
    *,
    kind: CurvatureKind = "hessian",
) -> int:
    """The bytes `fixed_curvature(..., linearize=True)` keeps for `batches`, in all: every
    batch's saved linearization, the copies of the weights it holds included. Computed on
    abstract values (nothing is linearized), once per batch shape."""
    _check_kind(kind)
    by_shape: dict[tuple[int, ...], tuple[Batch, int]] = {}
    for batch in batches:
        if real_examples(batch):
            shape = tuple(np.shape(batch.input_ids))
            first, count = by_shape.get(shape, (batch, 0))
            by_shape[shape] = (first, count + 1)
    total = 0
    for batch, count in by_shape.values():
        saved = jax.eval_shape(functools.partial(_linearization, graphdef, kind), lora, base, batch)
        total += count * sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(saved))
    return total


def _linearization(graphdef, kind: CurvatureKind, lora: Tree, base: Tree, batch: Batch):
    if kind == "hessian":
        return kernels.linearize_hvp(objective(graphdef), lora, base, batch)
    head = _output_head(graphdef, lora, base)
    return kernels.linearize_gnvp(
        _outputs_function(graphdef), _loss_of_outputs, lora, base, head, batch
    )


def _weighted_sum_of_products(pieces, weights, v: Tree) -> Tree:
    result = kernels.tree_scale(weights[0], pieces[0](v))
    for piece, weight in zip(pieces[1:], weights[1:], strict=True):
        result = kernels.tree_add_scaled(result, weight, piece(v))
    return result


@functools.cache
def _recomputed_products(graphdef: nnx.GraphDef, kind: CurvatureKind) -> Callable[..., Tree]:
    """`(lora, base, groups, v) ↦ Σ weight · C_batch v`, each batch's product computed afresh
    in a loop over the batches of each shape; one function per model and kind, so solvers
    compiled for it are reused."""
    product = batch_product(graphdef, kind)

    def weighted(lora: Tree, base: Tree, groups, v: Tree) -> Tree:
        def add_one(total, batch_and_weight):
            batch, weight = batch_and_weight
            return kernels.tree_add_scaled(total, weight, product(lora, base, batch, v)), None

        # A loop rather than one product per batch written out: its body's buffers are
        # reused from one batch to the next, so memory is one batch's product whatever the
        # sample's size (written out, the compiler kept part of every batch's alive).
        total = kernels.tree_zeros_like(v)
        for stacked, weights in groups:
            total, _ = jax.lax.scan(add_one, total, (stacked, weights))
        return total

    return weighted


def _stacked_by_shape(kept: Sequence[tuple[Batch, float]]) -> tuple:
    """((batches of one shape stacked on a new leading axis, their weights), ...)."""
    groups: dict[tuple[int, ...], list[tuple[Batch, float]]] = {}
    for batch, weight in kept:
        groups.setdefault(tuple(np.shape(batch.input_ids)), []).append((batch, weight))
    return tuple(
        (
            jax.tree.map(lambda *leaves: jnp.stack(leaves), *[batch for batch, _ in members]),
            np.asarray([weight for _, weight in members]),
        )
        for members in groups.values()
    )


def stochastic_curvature(
    graphdef: nnx.GraphDef,
    lora: Tree,
    base: Tree,
    pool: Batch,
    /,
    *,
    batch_size: int,
    kind: CurvatureKind = "hessian",
    batch_sharding: Batch | None = None,
) -> Callable[[Tree, jax.Array], Tree]:
    """`(v, key) ↦ C_B v` with B a fresh mini-batch drawn without replacement from `pool`.

    C_B is the curvature of the mean objective over B, an unbiased estimate of the curvature
    of the mean over the pool. The pool lives on the device (every example padded to one
    length), so products can be drawn inside `jax.lax.while_loop`.

    Args:
        graphdef, lora, base: The model, split by `split_for_curvature`.
        pool: Every example to draw from as one padded `Batch` (rows with `example_mask` False
            are never drawn).
        batch_size: |B|.
        kind: `"hessian"` or `"gauss_newton"`.
        batch_sharding: On a mesh, the shardings of a drawn mini-batch (a `Batch` of them,
            `parallel.Placement.row_sharding`): its rows are split over the batch axes as
            soon as they are drawn from the pool, which every device then holds whole.
    """
    _check_kind(kind)
    real = np.flatnonzero(np.asarray(pool.example_mask))
    if not 1 <= batch_size <= len(real):
        raise ValueError(
            f"batch_size must be between 1 and the {len(real)} examples of the pool, "
            f"got {batch_size}."
        )
    pool = Batch(*(np.asarray(field)[real] for field in pool))
    if batch_sharding is None:
        pool = Batch(*(jnp.asarray(field) for field in pool))
    else:
        pool = parallel.put(pool, parallel.replicated(batch_sharding.input_ids.mesh))
    product = _stochastic_product(graphdef, batch_size, kind, batch_sharding)
    # A pytree of (lora, base, pool), for the same reason as `fixed_curvature`'s operator.
    return jax.tree_util.Partial(product, lora, base, pool)


@functools.cache
def batch_product(graphdef: nnx.GraphDef, kind: CurvatureKind) -> Callable[..., Tree]:
    """`(lora, base, batch, v) ↦ C_batch v` (`kernels.hvp` or `kernels.gnvp`), linearizing
    afresh on every call.

    What one product of a stochastic solver computes; also what a fixed-sample product costs
    at most (that one reuses its saved linearization), for cost accounting.
    """
    _check_kind(kind)
    loss = objective(graphdef)
    outputs = _outputs_function(graphdef)

    def product(lora: Tree, base: Tree, batch: Batch, v: Tree) -> Tree:
        if kind == "hessian":
            return kernels.hvp(loss, lora, v, base, batch)
        head = _output_head(graphdef, lora, base)
        return kernels.gnvp(outputs, _loss_of_outputs, lora, v, base, head, batch)

    # Compiled when called on its own; inside a jitted solver it is traced into the loop.
    return jax.jit(product)


@functools.cache
def _stochastic_product(
    graphdef: nnx.GraphDef, batch_size: int, kind: str, batch_sharding: Batch | None
):
    # One function object per static setting, so jitted solvers taking the operator as an
    # argument compile once per setting.
    on_batch = batch_product(graphdef, kind)

    def product(lora: Tree, base: Tree, pool: Batch, v: Tree, key: jax.Array) -> Tree:
        rows = jax.random.choice(key, pool.input_ids.shape[0], (batch_size,), replace=False)
        batch = Batch(*(field[rows] for field in pool))
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return on_batch(lora, base, batch, v)

    return product


# The solvers compiled with the operator as an argument (see `fixed_curvature`): one compiled
# loop per operator structure and setting, reused across requests and adapters.
jitted_lanczos = jax.jit(kernels.lanczos, static_argnames=("num_steps", "num_eigenpairs"))
jitted_cg = jax.jit(kernels.cg, static_argnames=("tol", "max_steps"))
jitted_lissa = jax.jit(kernels.lissa, static_argnames=("max_steps", "tol"))


class Spectrum(NamedTuple):
    """Estimates of the extreme eigenvalues of a curvature operator.

    Attributes:
        largest: The largest Ritz value: a lower bound on λ_max that Lanczos approaches fast.
        smallest: The smallest Ritz value: an upper bound on λ_min (rougher; negative means
            the operator is certainly indefinite).
        ritz_values: Every Ritz value, decreasing.
        num_steps: The number of products it took.
    """

    largest: float
    smallest: float
    ritz_values: tuple[float, ...]
    num_steps: int

    @classmethod
    def of(cls, pairs: kernels.Eigenpairs, num_steps: int, /) -> Spectrum:
        """The estimate given by a Lanczos run of `num_steps` steps.

        Raises:
            FloatingPointError: If a Ritz value is not finite.
        """
        values = tuple(float(value) for value in np.asarray(pairs.eigenvalues))
        if not all(math.isfinite(value) for value in values):
            raise FloatingPointError(f"The curvature's Ritz values are not finite: {values}.")
        return cls(max(values), min(values), values, num_steps)


def estimate_spectrum(
    matvec: Callable[[Tree], Tree], like: Tree, /, *, num_steps: int = 20, key: jax.Array
) -> Spectrum:
    """Brackets the eigenvalues of a deterministic symmetric operator with Lanczos.

    Args:
        matvec: v ↦ C v (e.g. from `fixed_curvature`).
        like: A tree with the operator's structure (e.g. the LoRA tree).
        num_steps: Lanczos steps (products with C).
        key: PRNG key for the random start vector.
    """
    num_steps = min(num_steps, sum(leaf.size for leaf in jax.tree.leaves(like)))
    start = kernels.tree_random_normal_like(key, like)
    pairs = jitted_lanczos(matvec, start, num_steps=num_steps, key=key)
    return Spectrum.of(pairs, num_steps)


def choose_damping(spectrum: Spectrum, /, *, relative: float = 1e-3) -> float:
    """λ = relative · λ_max + max(0, −λ_min): a fixed fraction of the curvature scale, plus
    what it takes to lift the most negative eigenvalue seen to zero.

    Args:
        spectrum: From `estimate_spectrum`.
        relative: The fraction of the largest eigenvalue (> 0).
    """
    if not relative > 0:
        raise ValueError(f"relative must be > 0, got {relative}.")
    if not spectrum.largest > 0:
        raise ValueError(
            f"The curvature's largest eigenvalue estimate is {spectrum.largest:.3g}; a damping "
            "cannot be scaled to it. Is the model trained (is LoRA B non-zero)?"
        )
    return relative * spectrum.largest + max(0.0, -spectrum.smallest)
