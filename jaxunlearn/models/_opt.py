"""The OPT family in Flax NNX, computing what transformers' `OPTForCausalLM` does.

Module names follow transformers (`model.decoder.layers[i].self_attn.q_proj`, ...), so a
parameter's path is its checkpoint name; linear kernels are the transpose of PyTorch's weights.
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

# The projections LoRA can adapt, named as PEFT names them.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# OPT looks positions up `offset` rows into its table (a leftover of fairseq's padding index).
POSITION_OFFSET = 2

# transformers' OPT LayerNorms use PyTorch's default epsilon; the config has no field for it.
LAYER_NORM_EPS = 1e-5

# transformers' name of each `OPTConfig` attribute.
_HF_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "ffn_dim": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "word_embed_proj_dim": "word_embed_proj_dim",
    "do_layer_norm_before": "do_layer_norm_before",
    "_remove_final_layer_norm": "remove_final_layer_norm",
    "activation_function": "activation",
    "enable_bias": "enable_bias",
    "tie_word_embeddings": "tie_word_embeddings",
    "dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "layerdrop": "layerdrop",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}

# Fields of published OPT configs that only training reads (initialization, dropout).
_IGNORED_FIELDS = {"init_std", "activation_dropout"}


@dataclasses.dataclass(frozen=True)
class OPTConfig(LearnedPositionsConfig):
    """The architecture of an OPT causal language model.

    Build one with `OPTConfig.from_pretrained(directory)` or `OPTConfig.from_hf(hf_config)`; it
    is frozen and hashable, so it can be a static argument of `jax.jit`.

    Attributes:
        vocab_size: Number of token ids.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the MLP (`ffn_dim`).
        num_layers: Number of decoder layers.
        num_heads: Number of attention heads.
        max_position_embeddings: The longest sequence the learned positions cover (the table
            has two more rows: OPT offsets positions by 2).
        word_embed_proj_dim: Width of the token embeddings; when it differs from `hidden_size`
            (OPT-350m), `project_in`/`project_out` map between the two. `None` means
            `hidden_size`.
        do_layer_norm_before: Pre-norm layers with a final LayerNorm (`True`, most OPT models)
            or post-norm layers without it (`False`, OPT-350m).
        remove_final_layer_norm: Drop the final LayerNorm of a pre-norm model.
        activation: The MLP activation, a transformers `ACT2FN` name.
        enable_bias: Whether projections have biases.
        tie_word_embeddings: Whether the LM head reuses the token embedding matrix.
        dropout: Dropout rate, kept to write the config back; the model computes transformers'
            evaluation-mode function, without dropout (as do `attention_dropout` and
            `layerdrop`).
        attention_dropout: Attention dropout rate, not applied.
        layerdrop: Layer dropout rate, not applied.
        bos_token_id: Beginning-of-sequence token id, if any.
        eos_token_id: End-of-sequence token ids.
        pad_token_id: Padding token id, if any.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    activation: str = "relu"
    enable_bias: bool = True
    tie_word_embeddings: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.0
    layerdrop: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    model_type: ClassVar[str] = "opt"
    _hf_names: ClassVar = _HF_NAMES
    _hf_ignored: ClassVar = _IGNORED_FIELDS

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        self._validate(
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_layers",
                "num_heads",
                "max_position_embeddings",
                "word_embed_proj_dim",
            )
        )

    @property
    def has_final_layer_norm(self) -> bool:
        """Whether the decoder ends with `final_layer_norm`."""
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf(cls, hf_config: transformers.PretrainedConfig, /) -> OPTConfig:
        """Converts a transformers `OPTConfig`.

        Every field is either used, known not to matter for the language model's evaluation-mode
        forward computation, or rejected.

        Raises:
            UnsupportedConfigError: Naming the first field whose value this model cannot honour.
        """
        return cls(
            **cls._values_from_hf(
                hf_config, family="OPT", required={"layer_norm_elementwise_affine": True}
            )
        )


class OPTAttention(nnx.Module):
    """Causal multi-head self-attention; queries are scaled before the product, as in OPT."""

    def __init__(self, config: OPTConfig, *, dtype, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.config = config
        common = dict(use_bias=config.enable_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(hidden, hidden, logical_axes=("embed", "heads"), **common)
        self.v_proj = Linear(hidden, hidden, logical_axes=("embed", "heads"), **common)
        self.q_proj = Linear(hidden, hidden, logical_axes=("embed", "heads"), **common)
        self.out_proj = Linear(hidden, hidden, logical_axes=("heads", "embed"), **common)

    def __call__(self, x, mask, cache):
        config = self.config
        batch, length, _ = x.shape
        heads = (batch, length, config.num_heads, config.head_dim)
        query = (self.q_proj(x) * config.head_dim**-0.5).reshape(heads)
        key, value = self.k_proj(x).reshape(heads), self.v_proj(x).reshape(heads)
        out, new_cache = attend(query, key, value, mask, cache, scale=1.0)
        return self.out_proj(out), new_cache


class OPTDecoderLayer(nnx.Module):
    """Residual attention and MLP blocks, LayerNorm before (pre-norm) or after each."""

    def __init__(self, config: OPTConfig, *, dtype, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        common = dict(use_bias=config.enable_bias, dtype=dtype, rngs=rngs)
        self.self_attn = OPTAttention(config, dtype=dtype, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(hidden, eps=LAYER_NORM_EPS, dtype=dtype)
        self.fc1 = Linear(hidden, inner, logical_axes=("embed", "mlp"), **common)
        self.fc2 = Linear(inner, hidden, logical_axes=("mlp", "embed"), **common)
        self.final_layer_norm = LayerNorm(hidden, eps=LAYER_NORM_EPS, dtype=dtype)
        self.pre_norm = config.do_layer_norm_before
        self.activation = config.activation

    def __call__(self, x, mask, cache):
        residual = x
        if self.pre_norm:
            x = self.self_attn_layer_norm(x)
        attended, new_cache = self.self_attn(x, mask, cache)
        x = residual + attended
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.pre_norm:
            x = self.final_layer_norm(x)
        x = residual + self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x, new_cache


class OPTDecoder(nnx.Module):
    """Embeddings (and their projections), decoder layers and the final LayerNorm."""

    def __init__(self, config: OPTConfig, *, dtype, remat: bool, rngs: nnx.Rngs):
        hidden, word = config.hidden_size, config.word_embed_proj_dim
        # `word_embed` names the token-embedding width, which differs from `embed` in OPT-350m.
        self.embed_tokens = embedding(
            rngs, config.vocab_size, word, axes=("vocab", "word_embed"), dtype=dtype
        )
        self.embed_positions = embedding(
            rngs,
            config.max_position_embeddings + POSITION_OFFSET,
            hidden,
            axes=("positions", "embed"),
            dtype=dtype,
        )
        projected = word != hidden
        common = dict(use_bias=False, dtype=dtype, rngs=rngs)
        self.project_in = (
            Linear(word, hidden, logical_axes=("word_embed", "embed"), **common)
            if projected
            else None
        )
        self.project_out = (
            Linear(hidden, word, logical_axes=("embed", "word_embed"), **common)
            if projected
            else None
        )
        self.layers = nnx.List(
            [OPTDecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.final_layer_norm = (
            LayerNorm(hidden, eps=LAYER_NORM_EPS, dtype=dtype)
            if config.has_final_layer_norm
            else None
        )
        self.remat = remat


class OPTModel(nnx.Module):
    """The decoder, under the name transformers gives it (`model.decoder`)."""

    def __init__(self, config: OPTConfig, *, dtype, remat: bool, rngs: nnx.Rngs):
        self.decoder = OPTDecoder(config, dtype=dtype, remat=remat, rngs=rngs)


class OPTForCausalLM(CausalLMBase):
    """An OPT causal LM.

    Called like `LlamaForCausalLM`: `model(input_ids, attention_mask)` gives logits [batch,
    length, vocab]. Positions count only real tokens (`cumsum(attention_mask) - 1`, looked up 2
    rows into the position table), as transformers computes them.

    Attributes:
        config: The architecture.
        model: `model.decoder` holds embeddings, layers and the final norm.
        lm_head: The output projection, or `None` when tied to the token embeddings.
    """

    def __init__(
        self,
        config: OPTConfig,
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
            remat: Run the decoder layers as one loop, each rematerialised in the backward pass.
        """
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.model = OPTModel(config, dtype=self.dtype, remat=remat, rngs=rngs)
        self.lm_head = untied_lm_head(
            config,
            config.word_embed_proj_dim,
            input_axis="word_embed",
            dtype=self.dtype,
            rngs=rngs,
        )

    def _token_table(self) -> jax.Array:
        return self.model.decoder.embed_tokens[...]

    def _decode(self, hidden, positions, inputs, cache):
        decoder = self.model.decoder
        if decoder.project_in is not None:
            hidden = decoder.project_in(hidden)
        hidden = hidden + jnp.take(decoder.embed_positions[...], positions + POSITION_OFFSET, 0)
        hidden, new_cache = run_layers(
            decoder.layers,
            hidden,
            (inputs.mask,),
            inputs=inputs,
            cache=cache,
            remat=decoder.remat,
        )
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return hidden, new_cache
