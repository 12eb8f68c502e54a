"""The model families, and the dispatch from a config (or config.json) to the right one.

A `Family` holds what generic code (checkpoints, LoRA, PEFT adapters) needs to know about a
family's layout, so that nothing else tests which family it has in hand.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import transformers
from flax import nnx

from jaxunlearn.models import _gpt2, _llama, _opt
from jaxunlearn.models._config import ModelConfig, UnsupportedConfigError, read_hf_config
from jaxunlearn.models._gpt2 import GPT2Config, GPT2LMHeadModel
from jaxunlearn.models._llama import LlamaForCausalLM
from jaxunlearn.models._opt import OPTConfig, OPTForCausalLM

AnyConfig = ModelConfig | GPT2Config | OPTConfig
CausalLM = LlamaForCausalLM | GPT2LMHeadModel | OPTForCausalLM


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family's classes and checkpoint layout.

    Attributes:
        name: A readable name for messages.
        config_class: The family's config dataclass.
        model_class: The family's causal LM module.
        architectures: transformers' causal LM class name for each `model_type` config.json may
            name.
        lora_targets: The projections LoRA can adapt, as PEFT names them (a module-name suffix).
        layers_path: Attribute path from the model to its list of decoder layers.
        checkpoint_prefix: transformers' `base_model_prefix`: checkpoints saved from the base
            model (not the LM) omit it from every tensor name.
        conv1d_modules: Projections stored [in, out] in checkpoints (transformers' `Conv1D`),
            where an `nn.Linear` stores [out, in].
        ignored_tensors: Suffixes of checkpoint tensors that are buffers recomputed here.
    """

    name: str
    config_class: type
    model_class: type
    architectures: Mapping[str, str]
    lora_targets: tuple[str, ...]
    layers_path: tuple[str, ...]
    checkpoint_prefix: str
    conv1d_modules: frozenset[str] = frozenset()
    ignored_tensors: tuple[str, ...] = ()


LLAMA = Family(
    name="Llama",
    config_class=ModelConfig,
    model_class=LlamaForCausalLM,
    architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"},
    lora_targets=_llama.LORA_TARGETS,
    layers_path=("model", "layers"),
    checkpoint_prefix="model",
    # Older transformers versions saved the rotary buffers.
    ignored_tensors=(".rotary_emb.inv_freq",),
)
GPT2 = Family(
    name="GPT-2",
    config_class=GPT2Config,
    model_class=GPT2LMHeadModel,
    architectures={"gpt2": "GPT2LMHeadModel"},
    lora_targets=_gpt2.LORA_TARGETS,
    layers_path=("transformer", "h"),
    checkpoint_prefix="transformer",
    conv1d_modules=frozenset({"c_attn", "c_proj", "c_fc"}),
    # Older checkpoints saved the causal-mask buffers.
    ignored_tensors=(".attn.bias", ".attn.masked_bias"),
)
OPT = Family(
    name="OPT",
    config_class=OPTConfig,
    model_class=OPTForCausalLM,
    architectures={"opt": "OPTForCausalLM"},
    lora_targets=_opt.LORA_TARGETS,
    layers_path=("model", "decoder", "layers"),
    checkpoint_prefix="model",
)
FAMILIES = (LLAMA, GPT2, OPT)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.architectures}


def family_of(model_or_config: Any, /) -> Family:
    """The family of a model or a config.

    Raises:
        TypeError: For anything that is not one of the families' models or configs.
    """
    for family in FAMILIES:
        if isinstance(model_or_config, family.config_class | family.model_class):
            return family
    raise TypeError(
        f"Expected a model or config of the Llama, GPT-2 or OPT family, got "
        f"{type(model_or_config).__name__}."
    )


def lora_targets(model_or_config: CausalLM | AnyConfig, /) -> tuple[str, ...]:
    """The projection names `add_lora` accepts for this model's family, as PEFT names them.

    Llama: `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`; GPT-2: `c_attn c_proj
    c_fc` (`c_proj` is both the attention and the MLP output, as in PEFT); OPT: `q_proj k_proj
    v_proj out_proj fc1 fc2`.
    """
    return family_of(model_or_config).lora_targets


def config_from_hf(hf_config: transformers.PretrainedConfig, /) -> AnyConfig:
    """Converts a transformers config of any supported family (by its `model_type`).

    Raises:
        UnsupportedConfigError: For another model type, or a config this family cannot honour.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedConfigError(
            f"config field 'model_type' is {model_type!r}; supported: {sorted(_BY_MODEL_TYPE)}."
        )
    return _BY_MODEL_TYPE[model_type].config_class.from_hf(hf_config)


def load_config(path: str | os.PathLike, /) -> AnyConfig:
    """Reads `config.json` of a local checkpoint directory into its family's config.

    Raises:
        FileNotFoundError: If `path/config.json` does not exist (nothing is downloaded).
        UnsupportedConfigError: For an unsupported model type or config field.
    """
    return config_from_hf(read_hf_config(path))


def architecture(config: AnyConfig, /) -> str:
    """transformers' causal LM class name for `config` (what `save` writes in config.json)."""
    return family_of(config).architectures[config.model_type]


def from_config(
    config: AnyConfig,
    /,
    *,
    key: jax.Array,
    dtype: jnp.dtype = jnp.float32,
    remat: bool = False,
) -> CausalLM:
    """Returns a randomly initialised model of the config's family.

    Weights are N(0, 0.02²), norm scales 1 and biases 0.

    Args:
        config: The architecture: a `ModelConfig` (Llama), `GPT2Config` or `OPTConfig`.
        key: PRNG key for the weights.
        dtype: Parameter and computation dtype.
        remat: Run the decoder layers as one loop, each rematerialised in the backward pass.
    """
    model_class = family_of(config).model_class
    return model_class(config, rngs=nnx.Rngs(params=key), dtype=dtype, remat=remat)
