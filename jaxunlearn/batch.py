"""The batch every model-level computation consumes, and the loss it defines.

One objective is shared by training, curvature and evaluation, so that the adapter an
unlearning method edits is the minimizer of exactly the function whose curvature it uses:
L(z; Θ) is the mean negative log-likelihood of the response tokens of example z (prompt tokens
masked), and a batch's loss is the mean of L over its real examples.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Batch(NamedTuple):
    """A padded batch of tokenized (prompt, response) examples.

    All arrays share the leading batch axis B; T is one of a few static bucket lengths so that
    jitted functions compile once per bucket.

    Attributes:
        input_ids: int32 [B, T] token ids; padding positions hold the pad id.
        attention_mask: int32 [B, T], 1 for real tokens, 0 for padding.
        loss_mask: float32 [B, T], 1 where token t is a response token (end-of-sequence token
            included) and so is scored as the prediction from positions < t; 0 for prompt
            tokens and padding.
        example_mask: bool [B], False for rows that only pad the batch to a static size.
    """

    input_ids: np.ndarray | jax.Array
    attention_mask: np.ndarray | jax.Array
    loss_mask: np.ndarray | jax.Array
    example_mask: np.ndarray | jax.Array


def token_log_probs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """log p(token t | tokens < t) for t = 1..T−1, [B, T−1] in float32 (float64 logits keep
    float64, so that float64 checks of the objective are not limited by float32 rounding)."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(dtype), axis=-1)
    return jnp.take_along_axis(log_probs, input_ids[:, 1:, None], axis=-1)[..., 0]


def example_losses(logits: jax.Array, batch: Batch) -> jax.Array:
    """L(z) per example: the mean NLL of its response tokens, float32 [B] (0 for pad rows)."""
    return response_losses(token_log_probs(logits, jnp.asarray(batch.input_ids)), batch)


def mean_loss(logits: jax.Array, batch: Batch) -> jax.Array:
    """The mean of L(z) over the batch's real examples (a scalar)."""
    return mean_over_examples(example_losses(logits, batch), batch)


def response_losses(log_probs: jax.Array, batch: Batch) -> jax.Array:
    """L(z) per example from the next-token log-probabilities [B, T−1] of its tokens
    (`token_log_probs`, or a model's `next_token_log_probs`), float32 [B] (0 for pad rows)."""
    weights = jnp.asarray(batch.loss_mask[:, 1:], jnp.float32)
    nll = -log_probs * weights
    counts = jnp.sum(weights, axis=-1)
    losses = jnp.sum(nll, axis=-1) / jnp.maximum(counts, 1.0)
    return jnp.where(jnp.asarray(batch.example_mask), losses, 0.0)


def model_example_losses(model, batch: Batch) -> jax.Array:
    """`example_losses` of a causal LM's logits, computed without holding them whole (the
    model's `next_token_log_probs`, over chunks of the vocabulary); a model without that
    method (any module whose call returns logits) is scored from its logits."""
    if not hasattr(model, "next_token_log_probs"):
        return example_losses(model(batch.input_ids, batch.attention_mask), batch)
    return response_losses(model.next_token_log_probs(batch.input_ids, batch.attention_mask), batch)


def model_mean_loss(model, batch: Batch) -> jax.Array:
    """`mean_loss` of a causal LM's logits, computed as `model_example_losses` is."""
    return mean_over_examples(model_example_losses(model, batch), batch)


def mean_over_examples(losses: jax.Array, batch: Batch) -> jax.Array:
    """The mean of per-example losses [B] over the batch's real examples (a scalar)."""
    real = jnp.asarray(batch.example_mask, jnp.float32)
    return jnp.sum(losses) / jnp.maximum(jnp.sum(real), 1.0)
