"""Adapters saved with their settings load back onto a base model exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_assets import TINY_CONFIG

from jaxunlearn.adapter import (
    ADAPTER_FORMAT,
    LoraSettings,
    attach_lora,
    load_lora,
    lora_settings_of,
    read_lora_settings,
    save_lora,
)
from jaxunlearn.checkpoint import save_adapter
from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.models import (
    CheckpointError,
    GPT2Config,
    OPTConfig,
    add_lora,
    from_config,
    load_peft_adapter,
    lora_targets,
    save_peft_adapter,
    split_lora,
)

TINY_GPT2 = GPT2Config(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2)
TINY_OPT = OPTConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)


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
    with pytest.raises(CheckpointError, match="adapter") as caught:
        load_lora(from_config(wider, key=jax.random.key(0)), tmp_path / "adapter")
    assert isinstance(caught.value, UserError)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"targets": ()}, "non-empty"),
        ({"targets": ("q_proj", "q_proj")}, "repeat"),
        ({"targets": "q_proj"}, "string"),
        ({"targets": ("q_proj", 3)}, "non-empty"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": 2.0}, "rank must be a positive integer"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_settings_are_settings_errors(fields, message):
    with pytest.raises(SettingsError, match=message) as caught:
        LoraSettings(**fields)
    assert isinstance(caught.value, UserError)
    assert isinstance(caught.value, ValueError)  # what callers caught before


def test_foreign_folders_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an adapter"):
        read_lora_settings(tmp_path)
    # Arrays saved with another description: not an adapter save_lora wrote.
    tree = {"w": jnp.zeros(2)}
    save_adapter(tmp_path / "other", tree, metadata={"format": "someone-else/3"})
    with pytest.raises(CheckpointError, match="not a jaxunlearn LoRA adapter") as caught:
        read_lora_settings(tmp_path / "other")
    assert isinstance(caught.value, UserError)
    save_adapter(tmp_path / "partial", tree, metadata={"format": ADAPTER_FORMAT, "lora": {}})
    with pytest.raises(CheckpointError, match=r"incompletely or wrongly.*rank"):
        read_lora_settings(tmp_path / "partial")
    lora = {"rank": 0, "alpha": 1.0, "targets": ["q_proj"], "dropout": 0.0}
    save_adapter(tmp_path / "broken", tree, metadata={"format": ADAPTER_FORMAT, "lora": lora})
    with pytest.raises(CheckpointError, match="rank must be a positive integer"):
        read_lora_settings(tmp_path / "broken")


def test_targets_are_checked_against_the_family_when_attaching():
    settings = LoraSettings(targets=("c_attn",))  # GPT-2's: fine to construct, not for Llama
    llama = from_config(TINY_CONFIG, key=jax.random.key(0))
    with pytest.raises(SettingsError, match=r"\['c_attn'\].*LlamaForCausalLM.*q_proj") as caught:
        attach_lora(llama, settings, key=jax.random.key(1))
    assert isinstance(caught.value, UserError)
    assert not jax.tree.leaves(nnx.state(llama, nnx.LoRAParam))  # nothing was attached


@pytest.mark.parametrize(
    ("config", "targets"),
    [(TINY_GPT2, ("c_attn", "c_proj")), (TINY_OPT, ("q_proj", "out_proj", "fc2"))],
    ids=["gpt2", "opt"],
)
def test_gpt2_and_opt_adapters_save_and_reload(tmp_path, config, targets):
    settings = LoraSettings(rank=2, alpha=4.0, targets=targets)
    model = attach_lora(from_config(config, key=jax.random.key(0)), settings, key=jax.random.key(1))
    _, lora, _ = split_lora(model)
    nnx.update(model, jax.tree.map(lambda leaf: leaf + 0.1, lora))
    save_lora(model, tmp_path / "adapter", settings=settings)
    restored, metadata = load_lora(from_config(config, key=jax.random.key(0)), tmp_path / "adapter")
    ids = jnp.asarray([[1, 5, 9, 20, 17]])
    np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(model(ids)))
    # The stored description keeps the format other versions read.
    assert metadata["lora"] == {"rank": 2, "alpha": 4.0, "targets": list(targets), "dropout": 0.0}
    # Neither family's adapter fits a Llama model: their last target is no Llama projection.
    llama = from_config(TINY_CONFIG, key=jax.random.key(0))
    with pytest.raises(SettingsError, match=f"{targets[-1]}.*not projections of LlamaForCausalLM"):
        load_lora(llama, tmp_path / "adapter")


def test_settings_of_a_peft_adapter_rebuild_the_same_adapters(tmp_path):
    targets = lora_targets(TINY_GPT2)
    source = add_lora(
        from_config(TINY_GPT2, key=jax.random.key(0)),
        rank=3,
        alpha=5,
        targets=targets,
        key=jax.random.key(2),
        dropout=0.1,
    )
    save_peft_adapter(source, tmp_path / "peft")
    loaded = load_peft_adapter(from_config(TINY_GPT2, key=jax.random.key(0)), tmp_path / "peft")
    settings = lora_settings_of(loaded)
    assert settings == LoraSettings(rank=3, alpha=5.0, targets=targets, dropout=0.1)
    save_lora(loaded, tmp_path / "ours", settings=settings)
    restored, _ = load_lora(from_config(TINY_GPT2, key=jax.random.key(0)), tmp_path / "ours")
    for original, copy in zip(
        jax.tree.leaves(split_lora(loaded)[1]),
        jax.tree.leaves(split_lora(restored)[1]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(original), np.asarray(copy))


def test_settings_of_adapters_no_single_setting_describes_are_refused():
    model = from_config(TINY_CONFIG, key=jax.random.key(0))
    with pytest.raises(SettingsError, match="no LoRA adapters") as caught:
        lora_settings_of(model)
    assert isinstance(caught.value, UserError)
    add_lora(model, rank=2, alpha=2.0, targets=("q_proj",), key=jax.random.key(1))
    # Only the first layer's v_proj adapted (what PEFT's layers_to_transform can give).
    layer = model.model.layers[0]
    layer.self_attn.v_proj = type(layer.self_attn.q_proj)(
        layer.self_attn.v_proj, rank=4, alpha=2.0, dropout=0.0, key=jax.random.key(2)
    )
    with pytest.raises(SettingsError, match=r"ranks \[2, 4\].*unadapted projections.*v_proj"):
        lora_settings_of(model)
