"""Architectures of well-known checkpoints, by name, for planning without the weights.

Each is the `config.json` its publisher ships (the fields that matter, and the metadata fields
transformers writes), so that `jaxunlearn plan --model Llama-2-7B` needs no download.
"""

from __future__ import annotations

import os
from typing import Any

from jaxunlearn.errors import SettingsError

_LLAMA_COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "float16",
}

SHIPPED_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-2-7B": {
        **_LLAMA_COMMON,
        "_name_or_path": "meta-llama/Llama-2-7b-hf",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "Llama-2-13B": {
        **_LLAMA_COMMON,
        "_name_or_path": "meta-llama/Llama-2-13b-hf",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "Llama-3-8B": {
        **_LLAMA_COMMON,
        "_name_or_path": "meta-llama/Meta-Llama-3-8B",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    "OPT-13B": {
        "_name_or_path": "facebook/opt-13b",
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "activation_function": "relu",
        "attention_dropout": 0.0,
        "dropout": 0.1,
        "do_layer_norm_before": True,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "ffn_dim": 20480,
        "hidden_size": 5120,
        "word_embed_proj_dim": 5120,
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "max_position_embeddings": 2048,
        "vocab_size": 50272,
        "layerdrop": 0.0,
        "init_std": 0.02,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float16",
    },
}


def shipped_config_names() -> tuple[str, ...]:
    """The names `architecture_config` knows without a file."""
    return tuple(SHIPPED_CONFIGS)


def architecture_config(model: str | os.PathLike, /):
    """The config of a named shipped architecture, a checkpoint directory or a config.json.

    Names match case-insensitively (`llama-2-7b`).

    Raises:
        SettingsError: If `model` is neither a known name nor a path holding a config.
        UnsupportedConfigError: If the config asks for something the models do not compute.
    """
    import transformers

    from jaxunlearn.models._families import config_from_hf, load_config

    text = os.fspath(model)
    by_lower = {name.lower(): name for name in SHIPPED_CONFIGS}
    if text.lower() in by_lower:
        fields = dict(SHIPPED_CONFIGS[by_lower[text.lower()]])
        model_type = fields.pop("model_type")
        return config_from_hf(transformers.AutoConfig.for_model(model_type, **fields))
    if os.path.isdir(text):
        return load_config(text)
    if os.path.isfile(text) and os.path.basename(text) == "config.json":
        return load_config(os.path.dirname(text) or ".")
    raise SettingsError(
        f"--model {text!r} is neither a shipped architecture ({', '.join(SHIPPED_CONFIGS)}) "
        "nor a checkpoint directory or config.json."
    )
