"""Forgetting and fidelity to retraining: perplexity, forget-gap closed, distance to retrain.

Definitions follow metrics.md. The losses are mean per-example ℓ values (`ExampleScores.losses`
averaged over a set); the parameters are any pytrees, usually the LoRA adapter state.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def perplexity(losses: np.ndarray, /) -> float:
    """exp(mean ℓ): the perplexity of a set from its per-example mean NLLs.

    Raises:
        ValueError: If `losses` is empty.
    """
    losses = np.asarray(losses, np.float64).reshape(-1)
    if losses.size == 0:
        raise ValueError("No losses: the perplexity of an empty set is undefined.")
    return float(np.exp(np.mean(losses)))


def forget_gap_closed(
    method_forget_loss: float, original_forget_loss: float, retrain_forget_loss: float
) -> float:
    """The share of the retrain effect on the forget loss that a method reproduces.

    (ℓ_forget(method) − ℓ_forget(original)) / (ℓ_forget(retrain) − ℓ_forget(original)):
    0 = no change from the original, 1 = exactly the retrain effect, above 1 = over-unlearning,
    below 0 = the forget loss moved the wrong way.

    Args:
        method_forget_loss: The mean ℓ over the forget set of the unlearned model.
        original_forget_loss: The same for the model before unlearning.
        retrain_forget_loss: The same for the model retrained without the forget set.

    Raises:
        ValueError: If a loss is not finite, or the retrained and original losses are equal
            (there is no gap to close).
    """
    losses = {
        "method": method_forget_loss,
        "original": original_forget_loss,
        "retrain": retrain_forget_loss,
    }
    for name, loss in losses.items():
        if not math.isfinite(loss):
            raise ValueError(f"The {name} forget loss is not finite: {loss}.")
    gap = float(retrain_forget_loss) - float(original_forget_loss)
    if gap == 0.0:
        raise ValueError(
            f"The retrained and original forget losses are equal ({retrain_forget_loss}): there "
            "is no gap to close, so the share closed is undefined."
        )
    return (float(method_forget_loss) - float(original_forget_loss)) / gap


def distance_to_retrain(method: Any, original: Any, retrain: Any) -> float:
    """‖Θ_method − Θ_retrain‖ / ‖Θ̂ − Θ_retrain‖ over whole parameter pytrees.

    0 = the method reached the retrained parameters, 1 = as far as the original Θ̂. Leaf
    differences are taken in float32 on the device; their squared sums are accumulated in
    float64 on the host.

    Args:
        method: The unlearned model's parameters.
        original: The parameters before unlearning, Θ̂.
        retrain: The retrained model's parameters; all three trees share one structure.

    Raises:
        ValueError: If the trees differ in structure or leaf shape, or original equals retrain
            (the ratio is undefined).
    """
    method_leaves = _matching_leaves(method, retrain, "method")
    original_leaves = _matching_leaves(original, retrain, "original")
    retrain_leaves = jax.tree.leaves(retrain)
    denominator = _squared_distance(original_leaves, retrain_leaves)
    if denominator == 0.0:
        raise ValueError(
            "The original and retrained parameters are equal: the distance ratio is undefined."
        )
    return math.sqrt(_squared_distance(method_leaves, retrain_leaves) / denominator)


def _matching_leaves(tree: Any, retrain: Any, name: str) -> list:
    """The leaves of `tree`, after checking that it matches `retrain` in structure and shapes."""
    structure, retrain_structure = jax.tree.structure(tree), jax.tree.structure(retrain)
    if structure != retrain_structure:
        raise ValueError(
            f"The {name} and retrain trees differ in structure:\n{structure}\nvs\n"
            f"{retrain_structure}"
        )
    with_paths = jax.tree_util.tree_leaves_with_path(tree)
    for (path, leaf), retrain_leaf in zip(with_paths, jax.tree.leaves(retrain), strict=True):
        if jnp.shape(leaf) != jnp.shape(retrain_leaf):
            raise ValueError(
                f"The {name} leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}, "
                f"the retrain leaf {jnp.shape(retrain_leaf)}."
            )
    return [leaf for _, leaf in with_paths]


def _squared_distance(leaves: list, other_leaves: list) -> float:
    total = 0.0
    for leaf, other in zip(leaves, other_leaves, strict=True):
        difference = jnp.asarray(leaf, jnp.float32) - jnp.asarray(other, jnp.float32)
        total += float(jnp.vdot(difference, difference))
    return total
