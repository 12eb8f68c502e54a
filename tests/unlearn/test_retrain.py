"""The retrain reference: same initialization and settings, as many passes over its data."""

import jax
import numpy as np
import pytest
from flax import nnx
from unlearn_fixtures import random_examples, tiny_lora_model

from jaxunlearn.train import TrainConfig
from jaxunlearn.unlearn import retrain, retrain_config


def test_retrain_config_keeps_the_number_of_epochs():
    config = TrainConfig(num_steps=100, warmup_steps=10, batch_size=8)
    scaled = retrain_config(config, num_examples=520, num_examples_after=494)
    assert scaled.num_steps == 95  # ceil(100 · 494 / 520)
    assert scaled.warmup_steps == 10  # round(9.5) with banker's rounding
    assert (scaled.batch_size, scaled.learning_rate) == (config.batch_size, config.learning_rate)
    assert retrain_config(config, num_examples=10, num_examples_after=1).num_steps == 10
    with pytest.raises(ValueError, match="positive"):
        retrain_config(config, num_examples=10, num_examples_after=0)


def test_retrain_starts_from_the_initial_adapter_and_leaves_it_alone():
    initial = tiny_lora_model(seed=0)
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(initial, nnx.LoRAParam))]
    _, data = random_examples(12)
    after = data.subset(np.arange(10))
    config = TrainConfig(num_steps=6, batch_size=4, learning_rate=1e-2)
    first = retrain(initial, after, config=config, num_examples=12, progress=False)
    second = retrain(initial, after, config=config, num_examples=12, progress=False)
    assert len(first.history.steps) == 5  # ceil(6 · 10 / 12)
    unchanged = [np.asarray(x) for x in jax.tree.leaves(nnx.state(initial, nnx.LoRAParam))]
    for a, b in zip(before, unchanged, strict=True):
        np.testing.assert_array_equal(a, b)
    # Deterministic: the same initialization and data give the same adapter.
    for a, b in zip(
        jax.tree.leaves(nnx.state(first.model, nnx.LoRAParam)),
        jax.tree.leaves(nnx.state(second.model, nnx.LoRAParam)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
