"""The tiny LoRA model, batch and derivatives that the vocabulary-chunk tests compare, shared by
`test_output_head.py` and its subprocess script `vocab_shards.py`."""

import dataclasses

import jax
import numpy as np
from flax import nnx
from tiny_assets import TINY_CONFIG

from jaxunlearn import curvature, kernels
from jaxunlearn.batch import Batch
from jaxunlearn.models import add_lora, from_config

# The tiny vocabulary of 512 is 5 chunks of 100 and a sixth slid back over 88 columns already
# counted; on a mesh splitting it in two, each device's 256 are 2 chunks and a slid-back third.
CHUNK = 100


def tiny_lora_model(tied: bool, chunk: int | None):
    """The tiny Llama with LoRA on q and v, B non-zero, cut into vocabulary chunks of `chunk`."""
    config = dataclasses.replace(TINY_CONFIG, tie_word_embeddings=tied)
    model = from_config(config, key=jax.random.key(0))
    add_lora(model, rank=2, alpha=4.0, targets=("q_proj", "v_proj"), key=jax.random.key(1))
    _, lora, _ = curvature.split_for_curvature(model)
    # B is zero at initialization, which would leave most of the curvature zero.
    nnx.update(model, kernels.tree_random_normal_like(jax.random.key(2), lora))
    model.vocab_chunk = chunk
    return model


def tiny_batch(vocab: int, *, rows: int = 3) -> Batch:
    """`rows` rows of 12 tokens: one padded on the right, prompts of 4, the last row padding."""
    rng = np.random.default_rng(3)
    input_ids = rng.integers(0, vocab, size=(rows, 12)).astype(np.int32)
    attention_mask = np.ones((rows, 12), np.int32)
    attention_mask[1, 9:] = 0
    loss_mask = attention_mask.astype(np.float32)
    loss_mask[:, :4] = 0
    example_mask = np.arange(rows) < rows - 1
    return Batch(input_ids, attention_mask, loss_mask, example_mask)


def derivatives(model, batch: Batch) -> dict:
    """The objective, its gradient and its three curvature products along one direction."""
    graphdef, lora, base = curvature.split_for_curvature(model)
    direction = kernels.tree_random_normal_like(jax.random.key(4), lora)
    return {
        "objective": curvature.objective(graphdef)(lora, base, batch),
        "gradient": curvature.objective_gradient(graphdef, lora, base, [batch]),
        "hessian": curvature.batch_product(graphdef, "hessian")(lora, base, batch, direction),
        "gauss_newton": curvature.batch_product(graphdef, "gauss_newton")(
            lora, base, batch, direction
        ),
        "fixed_gauss_newton": curvature.fixed_curvature(
            graphdef, lora, base, [batch], kind="gauss_newton"
        )(direction),
    }
