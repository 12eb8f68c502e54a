"""Tiny reference checkpoints made by transformers' PyTorch Llama, batch helpers, and checks
shared by the tests of every family."""

import numpy as np
from flax import nnx

# Small enough for 2 CPU cores, large enough for grouped heads, several layers and real RoPE.
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

REFERENCE_CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    # Tied embeddings and grouped-query attention, with the metadata fields that published
    # checkpoints carry and that `save_pretrained` writes back: they must load unread.
    "tied": dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        unk_token_id=0,
        _model_name_or_path="an-org/tiny-llama",
        _attn_implementation_autoset=True,
        finetuning_task=None,
    ),
    "rope_theta": dict(
        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0}
    ),
    # Llama 3.1 frequency bands (an original context of 16 puts head_dim 8 in all three bands)
    # and projection biases.
    "llama3_bias": dict(
        num_key_value_heads=1,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def make_reference(directory, name, seed=0):
    """Saves a random tiny transformers Llama with `save_pretrained` and returns it (eager)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**TINY, **REFERENCE_CONFIGS[name])
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        # transformers starts norms at 1 and biases at 0; random values make them testable.
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param_name.endswith(".bias"):
                param.copy_(0.05 * torch.randn_like(param))
    model.save_pretrained(directory)
    reference = transformers.LlamaForCausalLM.from_pretrained(
        directory, attn_implementation="eager"
    )
    return reference.eval()


def padded_batch(seed=0, length=9):
    """Token ids and a mask with one unpadded, one left-padded and one right-padded row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], size=(3, length)).astype(np.int32)
    mask = np.ones((3, length), np.int32)
    mask[1, :3] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    ids[mask == 0] = TINY["pad_token_id"]
    return ids, mask


def positions_from_mask(mask):
    """What jaxunlearn and transformers' generate use: count of real tokens before each token."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def left_padded_prompts(seed=7, length=6):
    """`padded_batch` with every row's padding moved to the left, as transformers' generate
    expects."""
    ids, mask = padded_batch(seed=seed, length=length)
    order = np.argsort(mask, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)


def reference_generate(reference, ids, mask, *, max_new_tokens, eos_token_id):
    """The new tokens of transformers' greedy generate (padding with 0 after the end token)."""
    import torch

    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].numpy()


def assert_same_parameters(a, b):
    """Two models have the same parameter paths, dtypes and values, bit for bit."""
    flat_a, flat_b = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert x[...].dtype == y[...].dtype, path
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))
