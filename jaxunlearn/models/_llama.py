"""A Llama-family causal language model in Flax NNX, computing what transformers' does.

Module and attribute names follow transformers' `LlamaForCausalLM` (`model.layers[i].self_attn.
q_proj`, ...), so that a parameter's path is its checkpoint name. Linear kernels are stored
[in, out] (the transpose of PyTorch's weight) and every parameter carries `logical_axes`
metadata that `jaxunlearn.parallel` maps to mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models._config import ModelConfig
from jaxunlearn.models._layers import (
    AttentionMask,
    CausalLMBase,
    Linear,
    attend,
    embedding,
    run_layers,
    untied_lm_head,
)
from jaxunlearn.models._rope import apply_rotary, rotary_cos_sin

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
# The projections LoRA can adapt, named as PEFT names them.
LORA_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


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
        mask: AttentionMask,
        cache: tuple[jax.Array, jax.Array, jax.Array] | None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        config = self.config
        batch, length, _ = x.shape
        kv_heads, head_dim = config.num_kv_heads, config.head_dim
        query = self.q_proj(x).reshape(batch, length, config.num_heads, head_dim)
        key = self.k_proj(x).reshape(batch, length, kv_heads, head_dim)
        value = self.v_proj(x).reshape(batch, length, kv_heads, head_dim)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        out, new_cache = attend(query, key, value, mask, cache, scale=head_dim**-0.5)
        return self.o_proj(out), new_cache


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

    def __call__(self, x, cos, sin, mask, cache):
        attended, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class LlamaModel(nnx.Module):
    """Token embeddings, decoder layers and the final norm."""

    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, remat: bool, rngs: nnx.Rngs):
        self.embed_tokens = embedding(
            rngs, config.vocab_size, config.hidden_size, axes=("vocab", "embed"), dtype=dtype
        )
        self.layers = nnx.List(
            [DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.remat = remat


class LlamaForCausalLM(CausalLMBase):
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
            remat: Run the decoder layers as one loop, each rematerialised in the backward pass,
                trading compute for activation memory (what a layer all-gathers on a mesh lives
                only within its iteration).
        """
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.model = LlamaModel(config, dtype=self.dtype, remat=remat, rngs=rngs)
        self.lm_head = untied_lm_head(
            config, config.hidden_size, input_axis="embed", dtype=self.dtype, rngs=rngs
        )

    def _token_table(self) -> jax.Array:
        return self.model.embed_tokens[...]

    def _decode(self, hidden, positions, inputs, cache):
        cos, sin = rotary_cos_sin(positions, self.config, self.dtype)
        hidden, new_cache = run_layers(
            self.model.layers,
            hidden,
            (cos, sin, inputs.mask),
            inputs=inputs,
            cache=cache,
            remat=self.model.remat,
        )
        return self.model.norm(hidden), new_cache
