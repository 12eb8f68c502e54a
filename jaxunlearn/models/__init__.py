"""Flax NNX causal language models with LoRA, loaded from and saved to Hugging Face checkpoints.

A model is an `nnx.Module` called as `model(input_ids, attention_mask)`; `split_lora` turns it
into `(graphdef, lora, base)` trees so that losses and curvature are pure functions of `lora`.
"""

from jaxunlearn.models._checkpoint import CheckpointError, load, save
from jaxunlearn.models._config import ModelConfig, RopeScaling, UnsupportedConfigError
from jaxunlearn.models._generate import Generation, generate
from jaxunlearn.models._llama import KVCache, LlamaForCausalLM, from_config
from jaxunlearn.models._lora import LORA_TARGETS, LoRALinear, add_lora, join_lora, split_lora

__all__ = [
    "LORA_TARGETS",
    "CheckpointError",
    "Generation",
    "KVCache",
    "LlamaForCausalLM",
    "LoRALinear",
    "ModelConfig",
    "RopeScaling",
    "UnsupportedConfigError",
    "add_lora",
    "from_config",
    "generate",
    "join_lora",
    "load",
    "save",
    "split_lora",
]
