"""LoRA adapters: PEFT's initialisation and scaling, the (graphdef, lora, base) split, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.models import (
    LORA_TARGETS,
    LoRALinear,
    ModelConfig,
    add_lora,
    from_config,
    join_lora,
    split_lora,
)

CONFIG = ModelConfig(
    vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
    num_kv_heads=1, head_dim=8,
)  # fmt: skip
IDS = jnp.arange(10).reshape(2, 5) % CONFIG.vocab_size


def make(**lora_kwargs):
    model = from_config(CONFIG, key=jax.random.key(0))
    settings = dict(rank=4, alpha=8.0, targets=LORA_TARGETS, key=jax.random.key(1))
    return add_lora(model, **{**settings, **lora_kwargs})


def test_fresh_adapters_leave_the_model_unchanged_and_follow_peft_init():
    plain = from_config(CONFIG, key=jax.random.key(0))
    adapted = make()
    np.testing.assert_array_equal(np.asarray(adapted(IDS)), np.asarray(plain(IDS)))
    q_proj = adapted.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear)
    assert q_proj.scaling == 2.0
    assert q_proj.lora_a.shape == (16, 4)
    assert q_proj.lora_b.shape == (4, 16)
    assert np.all(np.asarray(q_proj.lora_b[...]) == 0)
    bound = 1 / np.sqrt(16)
    a = np.asarray(q_proj.lora_a[...])
    assert np.all(np.abs(a) <= bound)
    assert np.std(a) > bound / 4


def test_split_puts_only_adapters_in_lora_and_round_trips():
    model = make(targets=["q_proj", "down_proj"])
    graphdef, lora, base = split_lora(model)
    lora_paths = [path for path, _ in nnx.to_flat_state(lora)]
    assert len(lora_paths) == 2 * 2 * CONFIG.num_layers
    assert all(path[-1] in ("lora_a", "lora_b") for path in lora_paths)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(lora))
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(base))
    # The adapters change the output exactly as x A B · alpha/rank says.
    lora = jax.tree.map(lambda x: x + 0.1, lora)
    rebuilt = join_lora(graphdef, lora, base)
    q_proj = rebuilt.model.layers[1].self_attn.q_proj
    x = jax.random.normal(jax.random.key(2), (3, 16))
    expected = q_proj.base(x) + 2.0 * (x @ q_proj.lora_a[...] @ q_proj.lora_b[...])
    np.testing.assert_allclose(q_proj(x), expected, rtol=1e-6)
    assert not np.allclose(np.asarray(rebuilt(IDS)), np.asarray(model(IDS)))


def test_loss_is_a_pure_function_of_the_lora_tree():
    graphdef, lora, base = split_lora(make(targets=["v_proj"]))
    lora = jax.tree.map(lambda x: x + 0.05, lora)

    def loss(lora):
        return jnp.mean(join_lora(graphdef, lora, base)(IDS) ** 2)

    grads = jax.jit(jax.grad(loss))(lora)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_bfloat16_base_keeps_float32_adapters():
    model = add_lora(
        from_config(CONFIG, key=jax.random.key(0), dtype=jnp.bfloat16),
        rank=2, alpha=2.0, targets=["q_proj"], key=jax.random.key(1),
    )  # fmt: skip
    _, lora, _ = split_lora(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lora))
    assert model(IDS).dtype == jnp.bfloat16


def test_dropout_acts_in_train_mode_only():
    model = make(dropout=0.5, targets=["q_proj"])
    graphdef, lora, base = split_lora(model)
    model = join_lora(graphdef, jax.tree.map(lambda x: x + 0.1, lora), base)
    assert not np.allclose(np.asarray(model(IDS)), np.asarray(model(IDS)))
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(IDS)), np.asarray(model(IDS)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(targets=["qkv_proj"]), "LoRA targets"),
        (dict(targets=[]), "LoRA targets"),
        (dict(targets=["q_proj", "q_proj"]), "repeat"),
        (dict(rank=0), "rank"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_lora_arguments(kwargs, message):
    with pytest.raises(SettingsError, match=message) as caught:
        make(**kwargs)
    assert isinstance(caught.value, UserError)


def test_adding_twice_and_splitting_without_adapters_are_errors():
    model = make(targets=["q_proj"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(model, rank=2, alpha=2.0, targets=["q_proj"], key=jax.random.key(3))
    with pytest.raises(ValueError, match="no LoRA parameters"):
        split_lora(from_config(CONFIG, key=jax.random.key(0)))
