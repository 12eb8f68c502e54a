"""Perplexity, forget-gap closed and distance to retrain on constructed inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_fixtures import tiny_lora_model
from flax import nnx

from jaxunlearn.eval import distance_to_retrain, forget_gap_closed, perplexity


def test_perplexity_is_exp_of_the_mean_loss():
    assert perplexity(np.array([1.0, 2.0, 3.0])) == pytest.approx(math.exp(2.0))
    assert perplexity([0.0]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        perplexity(np.array([]))


def test_forget_gap_closed():
    assert forget_gap_closed(1.0, 1.0, 3.0) == 0.0  # no change
    assert forget_gap_closed(3.0, 1.0, 3.0) == 1.0  # the retrain effect exactly
    assert forget_gap_closed(2.0, 1.0, 3.0) == 0.5
    assert forget_gap_closed(4.0, 1.0, 3.0) == 1.5  # over-unlearning
    assert forget_gap_closed(0.0, 1.0, 3.0) == -0.5  # moved the wrong way
    with pytest.raises(ValueError, match="no gap"):
        forget_gap_closed(2.0, 1.5, 1.5)
    with pytest.raises(ValueError, match="method forget loss is not finite"):
        forget_gap_closed(math.nan, 1.0, 3.0)


def _tree(values):
    return {"a": jnp.asarray(values[:2], jnp.float32), "b": (jnp.asarray(values[2:]),)}


def test_distance_to_retrain_on_constructed_trees():
    original = _tree([1.0, 1.0, 1.0, 1.0])
    retrain = _tree([1.0, 1.0, 4.0, 5.0])  # ‖original − retrain‖ = 5
    assert distance_to_retrain(retrain, original, retrain) == 0.0
    assert distance_to_retrain(original, original, retrain) == 1.0
    # ‖method − retrain‖ = ‖(0, 1.5, 0, 2)‖ = 2.5, half the original distance.
    assert distance_to_retrain(_tree([1.0, 2.5, 4.0, 3.0]), original, retrain) == 0.5


def test_distance_to_retrain_on_adapter_states():
    original = nnx.state(tiny_lora_model(seed=0), nnx.LoRAParam)
    retrain = nnx.state(tiny_lora_model(seed=1), nnx.LoRAParam)
    halfway = jax.tree.map(lambda o, r: (o + r) / 2, original, retrain)
    assert distance_to_retrain(halfway, original, retrain) == pytest.approx(0.5, rel=1e-6)
    assert distance_to_retrain(original, original, retrain) == 1.0


def test_distance_to_retrain_rejects_mismatched_trees():
    original, retrain = _tree([0.0] * 4), _tree([1.0] * 4)
    with pytest.raises(ValueError, match="method and retrain trees differ in structure"):
        distance_to_retrain({"a": original["a"]}, original, retrain)
    with pytest.raises(ValueError, match="original and retrain trees differ in structure"):
        distance_to_retrain(retrain, [original["a"], original["b"]], retrain)
    wrong_shape = {"a": jnp.zeros(3), "b": original["b"]}
    with pytest.raises(ValueError, match=r"method leaf \['a'\] has shape \(3,\)"):
        distance_to_retrain(wrong_shape, original, retrain)
    with pytest.raises(ValueError, match="undefined"):
        distance_to_retrain(retrain, original, original)
