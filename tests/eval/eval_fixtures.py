"""Tiny random models and a tokenized dataset of random tokens for the evaluation tests."""

import functools

import jax
import numpy as np
from flax import nnx

from jaxunlearn.data import TokenizedDataset
from jaxunlearn.models import ModelConfig, add_lora, from_config

VOCAB_SIZE = 64
BUCKETS = (8, 16, 24)
MAX_LENGTH = 24

CONFIG = ModelConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)


def tiny_model(*, seed: int = 0):
    """A randomly initialised base model."""
    return from_config(CONFIG, key=jax.random.key(seed))


def tiny_lora_model(*, seed: int = 0, dropout: float = 0.0):
    """A base model with adapters whose B is random, so that the adapters change the logits."""
    model = add_lora(
        tiny_model(seed=seed),
        rank=4,
        alpha=8.0,
        targets=("q_proj", "v_proj", "down_proj"),
        key=jax.random.key(seed + 1000),
        dropout=dropout,
    )
    lora = nnx.state(model, nnx.LoRAParam)
    keys = jax.random.split(jax.random.key(seed + 2000), len(jax.tree.leaves(lora)))
    leaves, structure = jax.tree.flatten(lora)
    randomized = [
        0.3 * jax.random.normal(key, leaf.shape, leaf.dtype)
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(structure, randomized))
    return model


def random_dataset(num_examples: int, *, seed: int = 0) -> TokenizedDataset:
    """Random token sequences of 4 to 24 tokens, 1 to 5 of them prompt, in shuffled length order.

    Lengths cross the 8- and 16-token buckets, and the dataset order is not the length order,
    so that length-sorted batching has to scatter results back.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, MAX_LENGTH + 1, size=num_examples)
    tokens = [rng.integers(3, VOCAB_SIZE, size=int(n)).astype(np.int32) for n in lengths]
    prompt_lengths = [int(rng.integers(1, min(6, n - 1))) for n in lengths]
    return TokenizedDataset(
        [f"example-{i}" for i in range(num_examples)],
        tokens,
        prompt_lengths,
        pad_id=0,
        buckets=BUCKETS,
        max_length=MAX_LENGTH,
    )


def float64_log_softmax(logits) -> np.ndarray:
    """log softmax over the last axis in float64, from the model's float32 logits."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def example_logits(model, data: TokenizedDataset, index: int):
    """(float32 logits [T, V], batch) of example `index` alone, padded to its bucket length.

    Jitted so that the references cost one compilation per bucket, not one per eager op.
    """
    batch = data.batch([index])
    graphdef, state = nnx.split(model)
    logits = _logits(state, batch.input_ids, batch.attention_mask, graphdef=graphdef)
    return np.asarray(logits)[0], batch


def response_predictions(model, data: TokenizedDataset, index: int):
    """(float64 log-softmax [n, V], token ids [n]) predicting example `index`'s n response tokens.

    The log-softmax is taken in float64 of the model's float32 logits.
    """
    logits, _ = example_logits(model, data, index)
    tokens = data.tokens(index)
    log_probs = float64_log_softmax(logits)
    start = int(data.prompt_lengths[index])
    # Token t is predicted at position t − 1.
    return log_probs[start - 1 : len(tokens) - 1], tokens[start:]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(state, input_ids, attention_mask, *, graphdef):
    return nnx.merge(graphdef, state)(input_ids, attention_mask)
