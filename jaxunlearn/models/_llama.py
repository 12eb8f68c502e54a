"""A Llama-family causal language model in Flax NNX, computing what transformers' does.

Module and attribute names follow transformers' `LlamaForCausalLM` (`model.layers[i].self_attn.
q_proj`, ...), so that a parameter's path is its checkpoint name. Linear kernels are stored
[in, out] (the transpose of PyTorch's weight) and every parameter carries `logical_axes`
metadata that `jaxunlearn.parallel` maps to mesh axes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models._config import ModelConfig
from jaxunlearn.models._rope import apply_rotary, rotary_cos_sin

# transformers initialises every weight matrix with N(0, initializer_range = 0.02).
_INIT_STDDEV = 0.02


class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far, in a fixed number of slots.

    Attributes:
        keys: One [batch, capacity, kv_heads, head_dim] array per layer.
        values: One [batch, capacity, kv_heads, head_dim] array per layer.
        mask: [batch, capacity] booleans: which slots hold a real (non-padding) token.
        index: Scalar int32: the slot the next token is written to.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(
        cls, config: ModelConfig, /, *, batch_size: int, capacity: int, dtype: jnp.dtype
    ) -> KVCache:
        """Returns an empty cache with room for `capacity` tokens per sequence."""
        shape = (batch_size, capacity, config.num_kv_heads, config.head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            mask=jnp.zeros((batch_size, capacity), bool),
            index=jnp.zeros((), jnp.int32),
        )


class Linear(nnx.Module):
    """`x @ kernel + bias` with a [in, out] kernel annotated with logical axis names."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        logical_axes: tuple[str, str],
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kernel = _INIT_STDDEV * jax.random.normal(rngs.params(), (in_features, out_features))
        self.kernel = nnx.Param(kernel.astype(dtype), logical_axes=logical_axes)
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=logical_axes[1:])
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """Root-mean-square normalisation computed in float32, as transformers does."""

    def __init__(self, size: int, *, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # The weight multiplies after the cast back, which matters in bfloat16.
        return self.weight[...] * normed.astype(x.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary embeddings."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.config = config
        hidden, head_dim, bias = config.hidden_size, config.head_dim, config.attention_bias
        q_size, kv_size = config.num_heads * head_dim, config.num_kv_heads * head_dim
        common = dict(use_bias=bias, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(hidden, q_size, logical_axes=("embed", "heads"), **common)
        self.k_proj = Linear(hidden, kv_size, logical_axes=("embed", "kv_heads"), **common)
        self.v_proj = Linear(hidden, kv_size, logical_axes=("embed", "kv_heads"), **common)
        self.o_proj = Linear(q_size, hidden, logical_axes=("heads", "embed"), **common)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        allowed: jax.Array,
        cache: tuple[jax.Array, jax.Array, jax.Array] | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        config = self.config
        batch, length, _ = x.shape
        kv_heads, groups = config.num_kv_heads, config.num_heads // config.num_kv_heads
        query = self.q_proj(x).reshape(batch, length, config.num_heads, config.head_dim)
        key = self.k_proj(x).reshape(batch, length, kv_heads, config.head_dim)
        value = self.v_proj(x).reshape(batch, length, kv_heads, config.head_dim)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        new_cache = None
        if cache is not None:
            cached_keys, cached_values, index = cache
            start = (0, index, 0, 0)
            key = jax.lax.dynamic_update_slice(cached_keys, key.astype(cached_keys.dtype), start)
            value = jax.lax.dynamic_update_slice(
                cached_values, value.astype(cached_values.dtype), start
            )
            new_cache = (key, value)
        # Query heads are grouped by the key/value head they share: no copies of keys/values.
        query = query.reshape(batch, length, kv_heads, groups, config.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", query, key.astype(query.dtype))
        scores = scores * (config.head_dim**-0.5)
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(query.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, value.astype(query.dtype))
        return self.o_proj(out.reshape(batch, length, -1)), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        common = dict(use_bias=config.mlp_bias, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(hidden, inner, logical_axes=("embed", "mlp"), **common)
        self.up_proj = Linear(hidden, inner, logical_axes=("embed", "mlp"), **common)
        self.down_proj = Linear(inner, hidden, logical_axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)

    def __call__(self, x, cos, sin, allowed, cache):
        attended, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class LlamaModel(nnx.Module):
    """Token embeddings, decoder layers and the final norm."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, remat: bool, rngs: nnx.Rngs):
        embedding = _INIT_STDDEV * jax.random.normal(
            rngs.params(), (config.vocab_size, config.hidden_size)
        )
        self.embed_tokens = nnx.Param(embedding.astype(dtype), logical_axes=("vocab", "embed"))
        self.layers = nnx.List(
            [DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.remat = remat


class LlamaForCausalLM(nnx.Module):
    """A Llama-family causal LM (Llama 2/3, Mistral-style grouped-query attention).

    Call it as `model(input_ids, attention_mask)` for logits of shape [batch, length, vocab].
    Positions count only real tokens (`cumsum(attention_mask) - 1`), so a left-padded sequence
    gets the same logits as the unpadded one, as in transformers' `generate`. Pass `positions`
    to override. Logits at padding positions are meaningless.

    Attributes:
        config: The architecture.
        model: Embeddings, layers and final norm (`model.layers[i].self_attn.q_proj`, ...).
        lm_head: The output projection, or `None` when tied to the embeddings.
    """

    def __init__(
        self,
        config: ModelConfig,
        /,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        remat: bool = False,
    ):
        """Builds a randomly initialised model.

        Args:
            config: The architecture.
            rngs: Random streams; `rngs.params` initialises the weights.
            dtype: Parameter and computation dtype (float32 or bfloat16).
            remat: Rematerialise each decoder layer in the backward pass (`nnx.remat`), trading
                compute for activation memory.
        """
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.model = LlamaModel(config, dtype=self.dtype, remat=remat, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                logical_axes=("embed", "vocab"),
                dtype=self.dtype,
                rngs=rngs,
            )
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Computes next-token logits.

        Args:
            input_ids: [batch, length] integer token ids.
            attention_mask: [batch, length], 1 for real tokens and 0 for padding (left or right).
                `None` means no padding.
            positions: [batch, length] rotary positions; by default the count of real tokens
                before each token (including those already in `cache`).
            cache: Keys and values of earlier tokens. The new tokens are written from slot
                `cache.index` on and attend to every real earlier token.

        Returns:
            Logits [batch, length, vocab] in the model dtype; with `cache`, also the updated cache.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}.")
        batch, length = input_ids.shape
        if attention_mask is None:
            mask = jnp.ones((batch, length), bool)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {attention_mask.shape} differs from input_ids shape "
                    f"{input_ids.shape}."
                )
            mask = attention_mask.astype(bool)
        query_slots = jnp.arange(length)
        if cache is None:
            key_mask, key_slots, seen = mask, query_slots, 0
        else:
            if cache.mask.shape[0] != batch:
                raise ValueError(f"cache batch {cache.mask.shape[0]} differs from input {batch}.")
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
            key_slots = jnp.arange(cache.mask.shape[1])
            query_slots = cache.index + query_slots
            seen = jnp.sum(cache.mask, axis=-1, keepdims=True)
        if positions is None:
            positions = jnp.maximum(seen + jnp.cumsum(mask, axis=-1) - 1, 0)
        # [batch, query, key]: causal in slot order, and never towards padding.
        allowed = (key_slots[None, None, :] <= query_slots[None, :, None]) & key_mask[:, None, :]

        embedding = self.model.embed_tokens[...]
        hidden = jnp.take(embedding, input_ids, axis=0)
        cos, sin = rotary_cos_sin(positions, self.config, self.dtype)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.model.layers):
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.index)
            if self.model.remat:
                hidden, layer_kv = nnx.remat(DecoderLayer.__call__)(
                    layer, hidden, cos, sin, allowed, layer_cache
                )
            else:
                hidden, layer_kv = layer(hidden, cos, sin, allowed, layer_cache)
            if layer_kv is not None:
                new_keys.append(layer_kv[0])
                new_values.append(layer_kv[1])
        hidden = self.model.norm(hidden)
        logits = hidden @ embedding.T if self.lm_head is None else self.lm_head(hidden)
        if cache is None:
            return logits
        new_cache = KVCache(tuple(new_keys), tuple(new_values), key_mask, cache.index + length)
        return logits, new_cache


def from_config(
    config: ModelConfig, /, *, key: jax.Array, dtype: jnp.dtype = jnp.float32, remat: bool = False
) -> LlamaForCausalLM:
    """Returns a randomly initialised model (weights N(0, 0.02²), norms 1, biases 0).

    Args:
        config: The architecture.
        key: PRNG key for the weights.
        dtype: Parameter and computation dtype.
        remat: Rematerialise each decoder layer in the backward pass.
    """
    return LlamaForCausalLM(config, rngs=nnx.Rngs(params=key), dtype=dtype, remat=remat)
