"""With `remat`, the decoder layers run as one rematerialised loop (a switch over the layers).

It computes what the unrolled layers compute (dropout included), it is what runs, and it is
why it exists: what one layer converts or gathers does not stay alive for the whole program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxunlearn.models import ModelConfig, add_lora, from_config, split_lora


def config(num_layers: int, *, hidden: int = 16, intermediate: int = 32) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=2,
        num_kv_heads=1,
        head_dim=hidden // 2,
    )


def lora_model(model_config: ModelConfig, *, remat: bool, dtype=jnp.float32, dropout=0.0):
    model = from_config(model_config, key=jax.random.key(0), dtype=dtype, remat=remat)
    add_lora(
        model,
        rank=2,
        alpha=4.0,
        targets=("q_proj", "v_proj"),
        key=jax.random.key(1),
        dropout=dropout,
    )
    # B starts at zero; random B gives every adapter a gradient that depends on dropout.
    _, lora, _ = split_lora(model)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [
        0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def batch(length: int = 12, rows: int = 2):
    ids = jax.random.randint(jax.random.key(3), (rows, length), 0, 64)
    mask = jnp.ones((rows, length), jnp.int32).at[0, :3].set(0)  # one left-padded row
    return ids, mask


def lora_gradient_fn(graphdef):
    """The LoRA gradient of the next-token loss, with dropout keys reseeded per call as the
    training step does."""

    def loss(lora, base, ids, mask, key):
        model = nnx.merge(graphdef, lora, base, copy=True)
        nnx.reseed(model, dropout=key)
        logits = model(ids, mask).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
        weights = mask[:, 1:].astype(jnp.float32)
        return -jnp.sum(picked * weights) / jnp.sum(weights)

    return jax.jit(jax.grad(loss))


def relative_error(got, want) -> float:
    flat_got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(got)])
    flat_want = np.concatenate([np.ravel(x) for x in jax.tree.leaves(want)])
    return float(np.linalg.norm(flat_got - flat_want) / np.linalg.norm(flat_want))


def test_the_loop_with_dropout_gives_the_unrolled_gradient_and_advances_the_streams():
    ids, mask = batch()
    gradients = {}
    for remat in (False, True):
        model = lora_model(config(3), remat=remat, dropout=0.5)
        graphdef, lora, base = split_lora(model)
        grad = lora_gradient_fn(graphdef)
        gradients[remat] = [grad(lora, base, ids, mask, jax.random.key(k)) for k in (7, 8)]
    for key_index in range(2):
        assert relative_error(gradients[True][key_index], gradients[False][key_index]) <= 1e-6
    # Dropout is live: another key gives another gradient.
    assert relative_error(gradients[True][0], gradients[True][1]) > 1e-2

    # Outside a trace the layers' random streams advance as the unrolled call advances them.
    counts = {}
    for remat in (False, True):
        model = lora_model(config(3), remat=remat, dropout=0.5)
        model(ids, mask)
        model(ids, mask)
        counts[remat] = jax.tree.leaves(nnx.state(model, nnx.RngCount))
    assert len(counts[True]) == 6  # q and v of 3 layers
    assert [int(c) for c in counts[True]] == [int(c) for c in counts[False]]
    assert all(int(c) == 2 for c in counts[True])


def _equations(jaxpr):
    """Every equation of a jaxpr, its sub-jaxprs' (loop bodies, branches) included."""
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            for inner in value if isinstance(value, list | tuple) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("remat", [False, True])
def test_remat_runs_the_layers_as_one_loop_over_a_switch(remat):
    model = lora_model(config(3), remat=remat)
    graphdef, lora, base = split_lora(model)
    ids, mask = batch()
    grad = lora_gradient_fn(graphdef)
    jaxpr = jax.make_jaxpr(grad)(lora, base, ids, mask, jax.random.key(0)).jaxpr
    equations = list(_equations(jaxpr))
    switches = [len(e.params["branches"]) for e in equations if e.primitive.name == "cond"]
    loops = [e for e in equations if e.primitive.name in ("while", "scan")]
    if remat:
        assert 3 in switches
        assert loops
    else:
        assert 3 not in switches


def _gradient_temporaries(num_layers: int) -> int:
    model = lora_model(
        config(num_layers, hidden=256, intermediate=1024), remat=True, dtype=jnp.bfloat16
    )
    graphdef, lora, base = split_lora(model)
    ids, mask = batch(length=16)
    compiled = lora_gradient_fn(graphdef).lower(lora, base, ids, mask, jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_a_layer_keeps_nothing_of_its_weights_alive_past_its_iteration():
    # bfloat16 weights: XLA:CPU computes in float32 copies of them. Unrolled, those copies of
    # every layer lived from the forward to the backward pass (one layer's float32 weights per
    # layer); in the loop what grows per layer is the saved hidden states, a few KiB here.
    per_layer = (_gradient_temporaries(6) - _gradient_temporaries(2)) / 4
    layer_weights = sum(
        x.size
        for x in jax.tree.leaves(
            nnx.state(
                from_config(
                    config(1, hidden=256, intermediate=1024), key=jax.random.key(0)
                ).model.layers[0]
            )
        )
    )
    float32_copy = 4 * layer_weights
    assert per_layer < 0.1 * float32_copy, (per_layer, float32_copy)


def test_layers_that_differ_run_in_the_loop_as_they_run_unrolled():
    """Adapters on some layers only (as a PEFT `layers_to_transform` gives): each switch
    branch has its own structure, and the gradient is the unrolled one."""
    from jaxunlearn.models import _lora

    ids, mask = batch()
    gradients = {}
    for remat in (False, True):
        model = from_config(config(3), key=jax.random.key(0), remat=remat)
        sites = [
            (site, 2, 4.0)
            for site in _lora.lora_sites(model)
            if site.name.split(".")[2] == "1" and site.name.endswith(("q_proj", "v_proj"))
        ]
        assert len(sites) == 2
        _lora.attach_adapters(model, sites, use_rslora=False, dropout=0.0, key=jax.random.key(1))
        _, lora, _ = split_lora(model)
        nnx.update(model, jax.tree.map(lambda x: x + 0.1, lora))
        graphdef, lora, base = split_lora(model)
        gradients[remat] = lora_gradient_fn(graphdef)(lora, base, ids, mask, jax.random.key(0))
    assert len(jax.tree.leaves(gradients[True])) == 4
    assert relative_error(gradients[True], gradients[False]) <= 1e-6
