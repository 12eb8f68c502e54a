"""Flax NNX causal language models with LoRA, loaded from and saved to Hugging Face checkpoints.

Three families: Llama (also Mistral without sliding windows), GPT-2 and OPT. A model is an
`nnx.Module` called as `model(input_ids, attention_mask)`; `split_lora` turns it into
`(graphdef, lora, base)` trees so that losses and curvature are pure functions of `lora`.
Adapters also read and write the Hugging Face PEFT format (`load_peft_adapter`,
`save_peft_adapter`).
"""

from jaxunlearn.models._checkpoint import CheckpointError, load, save
from jaxunlearn.models._config import ModelConfig, RopeScaling, UnsupportedConfigError
from jaxunlearn.models._families import from_config, load_config, lora_targets
from jaxunlearn.models._generate import Generation, generate
from jaxunlearn.models._gpt2 import GPT2Config, GPT2LMHeadModel
from jaxunlearn.models._layers import KVCache
from jaxunlearn.models._llama import LORA_TARGETS, LlamaForCausalLM
from jaxunlearn.models._lora import LoRALinear, add_lora, join_lora, split_lora
from jaxunlearn.models._opt import OPTConfig, OPTForCausalLM
from jaxunlearn.models._output_head import VOCAB_CHUNK, OutputHead
from jaxunlearn.models._peft import PeftFormatError, load_peft_adapter, save_peft_adapter
from jaxunlearn.models._shipped import architecture_config, shipped_config_names

__all__ = [
    "LORA_TARGETS",
    "VOCAB_CHUNK",
    "CheckpointError",
    "GPT2Config",
    "GPT2LMHeadModel",
    "Generation",
    "KVCache",
    "LlamaForCausalLM",
    "LoRALinear",
    "ModelConfig",
    "OPTConfig",
    "OPTForCausalLM",
    "OutputHead",
    "PeftFormatError",
    "RopeScaling",
    "UnsupportedConfigError",
    "add_lora",
    "architecture_config",
    "from_config",
    "generate",
    "join_lora",
    "load",
    "load_config",
    "load_peft_adapter",
    "lora_targets",
    "save",
    "save_peft_adapter",
    "shipped_config_names",
    "split_lora",
]
