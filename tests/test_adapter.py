"""Adapters saved with their settings load back onto a base model exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_assets import TINY_CONFIG

from jaxunlearn.adapter import LoraSettings, attach_lora, load_lora, read_lora_settings, save_lora
from jaxunlearn.models import from_config, split_lora


def perturbed_model(settings):
    model = attach_lora(
        from_config(TINY_CONFIG, key=jax.random.key(0)), settings, key=jax.random.key(1)
    )
    _, lora, _ = split_lora(model)
    noise = jax.tree.map(lambda leaf: 0.1 * jnp.ones_like(leaf), lora)
    nnx.update(model, jax.tree.map(jnp.add, lora, noise))  # B is zero at init: make it count
    return model


def test_saved_adapter_reloads_onto_a_fresh_base_with_identical_logits(tmp_path):
    settings = LoraSettings(rank=3, alpha=6.0, targets=("q_proj", "down_proj"))
    model = perturbed_model(settings)
    save_lora(model, tmp_path / "adapter", settings=settings, description={"note": "test"})
    restored, metadata = load_lora(
        from_config(TINY_CONFIG, key=jax.random.key(0)), tmp_path / "adapter"
    )
    ids = jnp.asarray([[1, 5, 9, 200, 17]])
    np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(model(ids)))
    base = from_config(TINY_CONFIG, key=jax.random.key(0))
    assert not np.allclose(np.asarray(base(ids)), np.asarray(model(ids)))
    assert metadata["note"] == "test"
    assert read_lora_settings(tmp_path / "adapter")[0] == settings


def test_adapter_for_another_architecture_is_rejected(tmp_path):
    import dataclasses

    settings = LoraSettings(rank=2, alpha=2.0, targets=("v_proj",))
    save_lora(perturbed_model(settings), tmp_path / "adapter", settings=settings)
    wider = dataclasses.replace(TINY_CONFIG, hidden_size=48, head_dim=24)
    with pytest.raises(ValueError, match="adapter"):
        load_lora(from_config(wider, key=jax.random.key(0)), tmp_path / "adapter")


def test_bad_settings_and_foreign_folders_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="non-empty subset"):
        LoraSettings(targets=("c_attn",))
    with pytest.raises(FileNotFoundError, match="not an adapter"):
        read_lora_settings(tmp_path)
