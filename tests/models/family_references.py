"""Tiny reference checkpoints of the GPT-2 and OPT families made by transformers' PyTorch models."""

from model_references import TINY

_COMMON = dict(vocab_size=TINY["vocab_size"], bos_token_id=1, eos_token_id=2, pad_token_id=0)

GPT2_CONFIGS = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    # Every switch away from the defaults: untied head, n_inner, exact GELU, per-layer score
    # scaling and float32 scores.
    "gpt2_variants": dict(
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=48,
        n_inner=40,
        activation_function="gelu",
        tie_word_embeddings=False,
        scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True,
    ),
}

OPT_CONFIGS = {
    "opt_pre_norm": dict(do_layer_norm_before=True),
    "opt_post_norm": dict(do_layer_norm_before=False),
    # OPT-350m's layout: post-norm, token embeddings narrower than the residual stream.
    "opt_projected": dict(do_layer_norm_before=False, word_embed_proj_dim=16),
    "opt_variants": dict(
        enable_bias=False, tie_word_embeddings=False, activation_function="gelu", ffn_dim=40
    ),
}
# OPT's weights start at N(0, init_std²); at the usual 0.02 the 16-wide tied embeddings of
# `opt_projected` would make every logit smaller than 0.01.
_OPT_BASE = dict(
    hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, init_std=0.1,
)  # fmt: skip

FAMILY_CONFIGS = {**GPT2_CONFIGS, **OPT_CONFIGS}


def hf_config(name):
    """The transformers config of reference `name`."""
    import transformers

    if name in GPT2_CONFIGS:
        return transformers.GPT2Config(**_COMMON, **GPT2_CONFIGS[name])
    return transformers.OPTConfig(**_COMMON, **{**_OPT_BASE, **OPT_CONFIGS[name]})


def hf_class(name):
    """The transformers causal LM class of reference `name`."""
    import transformers

    return transformers.GPT2LMHeadModel if name in GPT2_CONFIGS else transformers.OPTForCausalLM


def make_family_reference(directory, name, seed=0):
    """Saves a random tiny transformers model with `save_pretrained`; returns it (eager, eval).

    Norm scales, norm shifts and biases are randomised too (transformers starts them at 1 and
    0), so that every parameter matters.
    """
    import torch

    torch.manual_seed(seed)
    model = hf_class(name)(hf_config(name))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            is_norm = "ln_" in param_name or "layer_norm" in param_name
            if is_norm and param_name.endswith(".weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param_name.endswith(".bias"):
                param.copy_(0.05 * torch.randn_like(param))
    model.save_pretrained(directory)
    return hf_class(name).from_pretrained(directory, attn_implementation="eager").eval()
