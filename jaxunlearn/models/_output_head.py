"""The output head and next-token log-probabilities computed over chunks of the vocabulary.

log p(y | h) = h·w_y − logsumexp_v(h·w_v). The log-sum-exp is the only part that reads every
vocabulary row, and it composes: the log-sum-exp of the chunks' log-sum-exps. Computed chunk by
chunk in a loop whose body is rematerialized, the [batch, length, vocab] logits never exist
whole: the forward pass keeps one [batch, length] log-sum-exp per chunk, the reverse pass
recomputes each chunk's logits to form its softmax, and forward mode (the products of
Gauss-Newton and Hessian curvature) carries their tangents chunk by chunk. At Llama 3's 128,256
tokens, 4 × 2048 float32 logits are 3.9 GiB, and each of their tangents and cotangents as much
again.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jaxunlearn import parallel

# The default width of a vocabulary chunk; vocabularies no wider are computed whole.
VOCAB_CHUNK = 8192


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["weight"], meta_fields=["vocab_axis", "chunk"]
)
@dataclasses.dataclass(frozen=True)
class OutputHead:
    """The output projection of a causal LM, as it is stored, and how its log-softmax is cut.

    A pytree whose one leaf is `weight`, so it can be an argument of jitted functions.

    Attributes:
        weight: Either the token embedding table [vocab, width] (tied) or an output kernel
            [width, vocab]; no copy of it is made to bring it to one layout.
        vocab_axis: Which axis of `weight` runs over the vocabulary (0 or 1).
        chunk: The width of the vocabulary chunks of `next_token_log_probs`; `None`, or a
            vocabulary no wider, computes the logits whole.
    """

    weight: jax.Array
    vocab_axis: int
    chunk: int | None = VOCAB_CHUNK

    def __post_init__(self):
        if self.vocab_axis not in (0, 1):
            raise ValueError(f"vocab_axis must be 0 or 1, got {self.vocab_axis}.")
        if self.chunk is not None and not (isinstance(self.chunk, int) and self.chunk >= 1):
            raise ValueError(f"chunk must be a positive width or None, got {self.chunk!r}.")

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[self.vocab_axis]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Logits [..., vocab] of hidden states [..., width], in the head's dtype."""
        return _project(hidden.astype(self.weight.dtype), self.weight, self.vocab_axis)

    def next_token_log_probs(self, hidden: jax.Array, input_ids: jax.Array) -> jax.Array:
        """log p(token t | tokens < t) for t = 1..T−1, [B, T−1] in float32 (float64 keeps
        float64), from the hidden states [B, T, width] that the head reads.

        The same values as the log-softmax of `logits(hidden)` at the next tokens (the logits
        are rounded to the head's dtype in both), summed in another order.

        Args:
            hidden: The final hidden states.
            input_ids: [B, T] token ids; token t + 1 is scored from position t.
        """
        hidden = hidden[:, :-1].astype(self.weight.dtype)
        targets = jnp.asarray(input_ids)[:, 1:]
        dtype = jnp.promote_types(self.weight.dtype, jnp.float32)
        if self.chunk is None or self.vocab_size <= self.chunk:
            log_probs = jax.nn.log_softmax(self.logits(hidden).astype(dtype), axis=-1)
            return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        # The target's logit reads one row: h·w_y, rounded to the head's dtype like the logits.
        rows = jnp.take(self.weight, targets, axis=self.vocab_axis)
        rows = rows if self.vocab_axis == 0 else jnp.moveaxis(rows, 0, -1)  # [B, T, width]
        target_logits = jnp.einsum("btd,btd->bt", hidden, rows).astype(dtype)
        return target_logits - self._chunked_logsumexp(hidden, dtype)

    def _chunked_logsumexp(self, hidden: jax.Array, dtype) -> jax.Array:
        """logsumexp over the vocabulary of `logits(hidden)` [B, T] in a loop over chunks.

        On a mesh that splits the vocabulary over S devices, each holds one contiguous block
        of V/S rows. The vocabulary is viewed as [S, V/S], and every step of the loop takes
        the same chunk of every block, so that each device reads only its own rows (a chunk
        of the split axis itself lies on one device, and slicing it would gather the whole
        head onto every device).
        Chunks need not divide the block: the last one is slid back to end at the block's end
        and its columns that the previous chunk already counted are masked out.
        """
        vocab = self.vocab_size
        shards = parallel.vocab_splits(vocab)
        block = vocab // shards
        chunk = min(self.chunk, block)
        steps = math.ceil(block / chunk)
        # The vocabulary axis viewed as [S, block]: a reshape of the split axis into (devices,
        # local rows), in the layout the weight is stored in (a transpose would copy it). With
        # one block, no reshape: XLA:CPU lays a unit axis out apart and copies the whole head.
        width = self.weight.shape[1 - self.vocab_axis]
        split = shards > 1
        if self.vocab_axis == 0:
            shape = (shards, block, width) if split else (block, width)
            rows_axis, einsum = len(shape) - 2, "btd,scd->btsc" if split else "btd,cd->btc"
        else:
            shape = (width, shards, block) if split else (width, block)
            rows_axis, einsum = len(shape) - 1, "btd,dsc->btsc" if split else "btd,dc->btc"
        weight = self.weight.reshape(shape)

        @jax.checkpoint
        def one_chunk(step):
            nominal = step * chunk
            start = jnp.minimum(nominal, block - chunk)
            rows = jax.lax.dynamic_slice_in_dim(weight, start, chunk, axis=rows_axis)
            logits = jnp.einsum(einsum, hidden, rows).astype(dtype)
            fresh = start + jnp.arange(chunk) >= nominal
            logits = jnp.where(fresh, logits, -jnp.inf)
            return jax.nn.logsumexp(logits, axis=(-2, -1) if split else -1)

        per_chunk = jax.lax.map(one_chunk, jnp.arange(steps))
        return jax.nn.logsumexp(per_chunk, axis=0)


def _project(hidden: jax.Array, weight: jax.Array, vocab_axis: int) -> jax.Array:
    return hidden @ (weight.T if vocab_axis == 0 else weight)
