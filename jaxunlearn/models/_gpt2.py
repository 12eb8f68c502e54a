"""The GPT-2 family in Flax NNX, computing what transformers' `GPT2LMHeadModel` does.

Module names follow transformers (`transformer.h[i].attn.c_attn`, ...), so a parameter's path is
its checkpoint name. GPT-2 checkpoints store the projections as `Conv1D` weights, already in
the [in, out] layout of our kernels: they are read without a transpose (only an untied
`lm_head`, an `nn.Linear`, is transposed).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from jaxunlearn.models._config import LearnedPositionsConfig
from jaxunlearn.models._layers import (
    ACTIVATIONS,
    CausalLMBase,
    LayerNorm,
    Linear,
    attend,
    embedding,
    run_layers,
    untied_lm_head,
)

# The projections LoRA can adapt, named as PEFT names them. `c_proj` is both the attention
# output and the MLP output projection, and PEFT's suffix matching adapts both.
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")

# GPT-2 config fields that configure other heads (`GPT2DoubleHeadsModel`'s summary) or repeat
# another field (`n_ctx` is `n_positions`): not the LM.
_IGNORED_FIELDS = {
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "n_ctx",
}

# transformers' name of each `GPT2Config` attribute.
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "n_embd": "hidden_size",
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_inner": "intermediate_size",
    "n_positions": "max_position_embeddings",
    "activation_function": "activation",
    "layer_norm_epsilon": "layer_norm_eps",
    "scale_attn_weights": "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn": "reorder_and_upcast_attn",
    "tie_word_embeddings": "tie_word_embeddings",
    "resid_pdrop": "resid_pdrop",
    "embd_pdrop": "embd_pdrop",
    "attn_pdrop": "attn_pdrop",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}


@dataclasses.dataclass(frozen=True)
class GPT2Config(LearnedPositionsConfig):
    """The architecture of a GPT-2 causal language model.

    Build one with `GPT2Config.from_pretrained(directory)` or `GPT2Config.from_hf(hf_config)`;
    it is frozen and hashable, so it can be a static argument of `jax.jit`.

    Attributes:
        vocab_size: Number of token ids.
        hidden_size: Width of the residual stream (`n_embd`).
        num_layers: Number of blocks (`n_layer`).
        num_heads: Number of attention heads (`n_head`).
        intermediate_size: Width of the MLP (`n_inner`); `None` means 4 × `hidden_size`.
        max_position_embeddings: Rows of the learned position table (`n_positions`): the longest
            sequence the model can encode.
        activation: The MLP activation, a transformers `ACT2FN` name (GPT-2 uses `gelu_new`).
        layer_norm_eps: Epsilon of every LayerNorm.
        scale_attn_weights: Whether attention scores are divided by √head_dim.
        scale_attn_by_inverse_layer_idx: Whether the scores of layer i are also divided by i+1.
        reorder_and_upcast_attn: Whether `q · k` is computed in float32 (Mistral-GPT-2 style).
        tie_word_embeddings: Whether the LM head reuses the token embedding matrix.
        resid_pdrop: Residual dropout rate, kept to write the config back; the model computes
            transformers' evaluation-mode function, without dropout (as do `embd_pdrop` and
            `attn_pdrop`).
        embd_pdrop: Embedding dropout rate, not applied.
        attn_pdrop: Attention dropout rate, not applied.
        bos_token_id: Beginning-of-sequence token id, if any.
        eos_token_id: End-of-sequence token ids.
        pad_token_id: Padding token id, if any.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    activation: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    model_type: ClassVar[str] = "gpt2"
    _hf_names: ClassVar = _HF_NAMES
    _hf_ignored: ClassVar = _IGNORED_FIELDS

    def __post_init__(self):
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        self._validate(
            (
                "vocab_size",
                "hidden_size",
                "num_layers",
                "num_heads",
                "intermediate_size",
                "max_position_embeddings",
            )
        )

    @classmethod
    def from_hf(cls, hf_config: transformers.PretrainedConfig, /) -> GPT2Config:
        """Converts a transformers `GPT2Config`.

        Every field is either used, known not to matter for the language model's evaluation-mode
        forward computation, or rejected.

        Raises:
            UnsupportedConfigError: Naming the first field whose value this model cannot honour.
        """
        values = cls._values_from_hf(
            hf_config, family="GPT-2", required={"add_cross_attention": False}
        )
        values["layer_norm_eps"] = float(values.get("layer_norm_eps", 1e-5))
        return cls(**values)


class GPT2Attention(nnx.Module):
    """Causal multi-head self-attention with a fused query/key/value projection."""

    def __init__(self, config: GPT2Config, layer_index: int, *, dtype, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.config = config
        common = dict(use_bias=True, dtype=dtype, rngs=rngs)
        # The fused [query | key | value] output is split by heads like a plain query projection.
        self.c_attn = Linear(hidden, 3 * hidden, logical_axes=("embed", "heads"), **common)
        self.c_proj = Linear(hidden, hidden, logical_axes=("heads", "embed"), **common)
        scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_index + 1)
        self.scale = scale

    def __call__(self, x, mask, cache):
        config = self.config
        batch, length, _ = x.shape
        heads = (batch, length, config.num_heads, config.head_dim)
        query, key, value = jnp.split(self.c_attn(x), 3, axis=-1)
        out, new_cache = attend(
            query.reshape(heads),
            key.reshape(heads),
            value.reshape(heads),
            mask,
            cache,
            scale=self.scale,
            float32_scores=config.reorder_and_upcast_attn,
        )
        return self.c_proj(out), new_cache


class GPT2MLP(nnx.Module):
    """`c_proj(activation(c_fc(x)))`."""

    def __init__(self, config: GPT2Config, *, dtype, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        common = dict(use_bias=True, dtype=dtype, rngs=rngs)
        self.c_fc = Linear(hidden, inner, logical_axes=("embed", "mlp"), **common)
        self.c_proj = Linear(inner, hidden, logical_axes=("mlp", "embed"), **common)
        self.activation = config.activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))


class GPT2Block(nnx.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, config: GPT2Config, layer_index: int, *, dtype, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.ln_1 = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.attn = GPT2Attention(config, layer_index, dtype=dtype, rngs=rngs)
        self.ln_2 = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = GPT2MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask, cache):
        attended, new_cache = self.attn(self.ln_1(x), mask, cache)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), new_cache


class GPT2Model(nnx.Module):
    """Token and position embeddings, blocks and the final LayerNorm."""

    def __init__(self, config: GPT2Config, *, dtype, remat: bool, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.wte = embedding(rngs, config.vocab_size, hidden, axes=("vocab", "embed"), dtype=dtype)
        self.wpe = embedding(
            rngs, config.max_position_embeddings, hidden, axes=("positions", "embed"), dtype=dtype
        )
        self.h = nnx.List(
            [GPT2Block(config, i, dtype=dtype, rngs=rngs) for i in range(config.num_layers)]
        )
        self.ln_f = LayerNorm(hidden, eps=config.layer_norm_eps, dtype=dtype)
        self.remat = remat


class GPT2LMHeadModel(CausalLMBase):
    """A GPT-2 causal LM.

    Called like `LlamaForCausalLM`: `model(input_ids, attention_mask)` gives logits [batch,
    length, vocab]. Positions count only real tokens (`cumsum(attention_mask) - 1`), as in
    transformers' `generate`, so left padding does not change the logits of real tokens.

    Attributes:
        config: The architecture.
        transformer: Embeddings, blocks and final norm (`transformer.h[i].attn.c_attn`, ...).
        lm_head: The output projection, or `None` when tied to the token embeddings.
    """

    def __init__(
        self,
        config: GPT2Config,
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
            remat: Run the blocks as one loop, each rematerialised in the backward pass.
        """
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.transformer = GPT2Model(config, dtype=self.dtype, remat=remat, rngs=rngs)
        self.lm_head = untied_lm_head(
            config, config.hidden_size, input_axis="embed", dtype=self.dtype, rngs=rngs
        )

    def _token_table(self) -> jax.Array:
        return self.transformer.wte[...]

    def _decode(self, hidden, positions, inputs, cache):
        transformer = self.transformer
        hidden = hidden + jnp.take(transformer.wpe[...], positions, axis=0)
        hidden, new_cache = run_layers(
            transformer.h,
            hidden,
            (inputs.mask,),
            inputs=inputs,
            cache=cache,
            remat=transformer.remat,
        )
        return transformer.ln_f(hidden), new_cache
