"""The Flax Llama computes what transformers' PyTorch LlamaForCausalLM computes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from lora_references import (
    ALPHA,
    RANK,
    TorchLoRA,
    assert_gradients_match,
    lora_loss_and_gradients,
    next_token_loss,
    torch_loss_and_gradients,
)
from model_references import REFERENCE_CONFIGS, make_reference, padded_batch, positions_from_mask

from jaxunlearn.models import load


def reference_logits(reference, ids, mask):
    with torch.no_grad():
        out = reference(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions_from_mask(mask), dtype=torch.long),
        )
    return out.logits.numpy()


def test_logits_match_transformers_with_left_and_right_padding(reference_checkpoint):
    name, directory, reference = reference_checkpoint
    # Every field the reference was made with, metadata included, is in what `load` reads.
    assert set(REFERENCE_CONFIGS[name]) <= set(json.loads((directory / "config.json").read_text()))
    model = load(directory)
    ids, mask = padded_batch()
    logits = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    expected = reference_logits(reference, ids, mask)
    real = mask.astype(bool)
    error = np.max(np.abs(logits[real] - expected[real]))
    print(f"\n[{name}] max abs logit error: {error:.2e}")
    assert error <= 1e-4
    # The comparison is not vacuous: logits vary across tokens by far more than the tolerance.
    assert np.std(expected[real]) > 1e-2


def test_left_padding_does_not_change_logits(reference_checkpoint):
    _, directory, _ = reference_checkpoint
    model = load(directory)
    ids, mask = padded_batch()
    logits = model(jnp.asarray(ids), jnp.asarray(mask))
    unpadded = model(jnp.asarray(ids[1:2, 3:]))
    np.testing.assert_allclose(logits[1, 3:], unpadded[0], atol=1e-5, rtol=0)


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_lora_gradient_matches_hand_wrapped_pytorch_lora(reference_checkpoint):
    name, directory, _ = reference_checkpoint
    model = load(directory)
    ids, mask = padded_batch(seed=3)
    lora, jax_loss, jax_grads = lora_loss_and_gradients(model, TARGETS, ids, mask)

    reference = transformers.LlamaForCausalLM.from_pretrained(
        directory, attn_implementation="eager"
    )
    reference.requires_grad_(False)
    flat_lora = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(lora)}
    for i, layer in enumerate(reference.model.layers):
        for target in TARGETS:
            parent = layer.self_attn if target in TARGETS[:4] else layer.mlp
            prefix = f"model.layers.{i}.{'self_attn' if parent is layer.self_attn else 'mlp'}"
            setattr(
                parent,
                target,
                TorchLoRA(
                    getattr(parent, target),
                    flat_lora[f"{prefix}.{target}.lora_a"],
                    flat_lora[f"{prefix}.{target}.lora_b"],
                    scaling=ALPHA / RANK,
                ),
            )
    torch_loss, torch_grads = torch_loss_and_gradients(reference, ids, mask)

    assert abs(float(jax_loss) - torch_loss) <= 1e-5
    worst = assert_gradients_match(jax_grads, torch_grads)
    print(f"\n[{name}] worst LoRA gradient relative error: {worst:.2e}")


def test_remat_gives_the_same_gradients_and_bfloat16_stays_close(tmp_path):
    directory = tmp_path / "gqa"
    make_reference(directory, "gqa")
    ids, mask = padded_batch()
    plain, rematted = load(directory), load(directory, remat=True)

    def loss(model):
        return next_token_loss(model(ids, mask), ids, jnp.asarray(mask, jnp.float32), jnp)

    plain_grads = nnx.jit(nnx.grad(loss))(plain)
    remat_grads = nnx.jit(nnx.grad(loss))(rematted)
    # Under jit, remat changes XLA's fusions, so float32 sums round differently: compare each
    # gradient as a whole, at float32 precision.
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads), strict=True):
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(a)
    # bfloat16 keeps the dtype and stays within bfloat16 rounding of float32.
    half = load(directory, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(half)))
    half_logits = half(ids, mask)
    assert half_logits.dtype == jnp.bfloat16
    real = mask.astype(bool)
    error = np.max(
        np.abs(np.asarray(half_logits, np.float32)[real] - np.asarray(plain(ids, mask))[real])
    )
    assert error <= 2e-2


def test_attention_in_query_chunks_computes_what_whole_attention_does(tmp_path, monkeypatch):
    """Long sequences attend in chunks of queries; with chunks of 2 on 10 tokens the logits
    still match transformers, and the gradient and both curvature products of a LoRA model
    (reverse, forward-over-reverse and forward-then-reverse differentiation) match the model
    attending whole."""
    from jaxunlearn import kernels
    from jaxunlearn.models import _layers, add_lora, split_lora

    reference = make_reference(tmp_path, "gqa")
    ids, mask = padded_batch(length=10)
    real = mask.astype(bool)
    model = load(tmp_path)
    base_logits = reference_logits(reference, ids, mask)
    model = add_lora(model, rank=RANK, alpha=ALPHA, targets=TARGETS, key=jax.random.key(1))
    graphdef, lora, base = split_lora(model)
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # B non-zero, so LoRA shapes every output
    zero_lora = jax.tree.map(jnp.zeros_like, lora)
    v = kernels.tree_random_normal_like(jax.random.key(2), lora)
    weights = jnp.asarray(mask, jnp.float32)

    def logits(lora):
        return nnx.merge(graphdef, lora, base)(ids, mask)

    def loss(lora):
        return next_token_loss(logits(lora), ids, weights, jnp)

    def loss_of_logits(out):
        return next_token_loss(out, ids, weights, jnp)

    def computed():
        # Fresh jits: the chunk size is read when the model is traced.
        return (
            np.asarray(jax.jit(logits)(lora))[real],
            jax.jit(jax.grad(loss))(lora),
            jax.jit(lambda v: kernels.hvp(loss, lora, v))(v),
            jax.jit(lambda v: kernels.gnvp(logits, loss_of_logits, lora, v))(v),
        )

    whole = computed()
    monkeypatch.setattr(_layers, "QUERY_CHUNK", 2)
    chunked_base = np.asarray(jax.jit(logits)(zero_lora))[real]
    assert np.max(np.abs(chunked_base - base_logits[real])) <= 1e-4
    chunked = computed()
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked), strict=True):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)


def _boolean_shapes(jaxpr) -> set[tuple[int, ...]]:
    """The shapes of every boolean value a jaxpr computes, its sub-jaxprs' included."""
    shapes = set()
    for equation in jaxpr.eqns:
        for var in equation.outvars:
            if getattr(var.aval, "dtype", None) == jnp.bool_:
                shapes.add(tuple(var.aval.shape))
        for value in equation.params.values():
            for inner in value if isinstance(value, list | tuple) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    shapes |= _boolean_shapes(inner)
    return shapes


def test_no_whole_attention_mask_is_built_when_queries_attend_in_chunks(monkeypatch):
    """The [batch, queries, keys] mask is never an array of its own on long sequences: each
    chunk of queries builds its [batch, chunk, keys] part, in the forward pass and the
    gradient alike."""
    from jaxunlearn.models import ModelConfig, _layers, add_lora, from_config, split_lora

    config = ModelConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=8,
    )  # fmt: skip
    model = add_lora(
        from_config(config, key=jax.random.key(0)),
        rank=2, alpha=4.0, targets=("q_proj",), key=jax.random.key(1),
    )  # fmt: skip
    graphdef, lora, base = split_lora(model)
    ids = jnp.ones((3, 8), jnp.int32)
    mask = jnp.ones((3, 8), jnp.int32).at[0, 6:].set(0)

    def loss(lora):
        return jnp.mean(nnx.merge(graphdef, lora, base).next_token_log_probs(ids, mask))

    monkeypatch.setattr(_layers, "QUERY_CHUNK", 2)
    for function in (loss, jax.grad(loss)):
        shapes = _boolean_shapes(jax.make_jaxpr(function)(lora).jaxpr)
        assert (3, 2, 8) in shapes  # a chunk's part of the mask
        assert (3, 8, 8) not in shapes
