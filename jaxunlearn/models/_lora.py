"""LoRA adapters on the projections of a Llama, and the split into (graphdef, lora, base) trees."""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models._llama import MLP, Attention, Linear, LlamaForCausalLM

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
LORA_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


class LoRALinear(nnx.Module):
    """A frozen `Linear` plus a low-rank update: `base(x) + scaling · dropout(x) A B`.

    As in PEFT: A [in, rank] starts Kaiming-uniform, B [rank, out] starts at zero (so the model
    is unchanged at initialisation), `scaling = alpha / rank`, and the dropout acts on the
    adapter's input only. A and B are float32 `nnx.LoRAParam`s whatever the base dtype: the
    update is computed in float32 and cast to the base output dtype.
    """

    def __init__(self, base: Linear, *, rank: int, alpha: float, dropout: float, key: jax.Array):
        in_features, out_features = base.kernel.shape
        in_axis, out_axis = base.kernel.get_metadata()["logical_axes"]
        a_key, dropout_key = jax.random.split(key)
        # PEFT's kaiming_uniform_(a=√5) on the [rank, in] weight: bound = 1/√in.
        bound = 1.0 / math.sqrt(in_features)
        lora_a = jax.random.uniform(a_key, (in_features, rank), jnp.float32, -bound, bound)
        self.base = base
        self.lora_a = nnx.LoRAParam(lora_a, logical_axes=(in_axis, "lora_rank"))
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((rank, out_features), jnp.float32), logical_axes=("lora_rank", out_axis)
        )
        self.scaling = alpha / rank
        self.dropout = (
            nnx.Dropout(dropout, rngs=nnx.Rngs(dropout=dropout_key)) if dropout > 0 else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        h = x.astype(jnp.float32)
        if self.dropout is not None:
            h = self.dropout(h)
        update = (h @ self.lora_a[...]) @ self.lora_b[...]
        return y + (self.scaling * update).astype(y.dtype)


def add_lora(
    model: LlamaForCausalLM,
    /,
    *,
    rank: int,
    alpha: float,
    targets: Iterable[str],
    key: jax.Array,
    dropout: float = 0.0,
) -> LlamaForCausalLM:
    """Wraps the named projections of every layer with LoRA adapters, in place.

    Args:
        model: The model; it is modified and also returned.
        rank: The adapter rank r.
        alpha: The LoRA alpha; the update is scaled by alpha / rank, as in PEFT.
        targets: Projection names among `q_proj k_proj v_proj o_proj gate_proj up_proj
            down_proj`.
        key: PRNG key for the A matrices (and the dropout stream).
        dropout: Dropout rate on the adapters' input. Dropout is active in `model.train()` mode
            (the default) and off after `model.eval()`.

    Returns:
        The same model, now holding `nnx.LoRAParam`s.

    Raises:
        ValueError: For an unknown or repeated target, a non-positive rank, a dropout rate outside
            [0, 1), or a projection that already has an adapter.
    """
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(
            f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got {targets}."
        )
    if len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets repeat a name: {targets}.")
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    keys = iter(jax.random.split(key, len(model.model.layers) * len(targets)))
    for layer_index, layer in enumerate(model.model.layers):
        for target in targets:
            parent: Attention | MLP = layer.self_attn if target in ATTENTION_TARGETS else layer.mlp
            projection = getattr(parent, target)
            if isinstance(projection, LoRALinear):
                raise ValueError(f"layer {layer_index} {target} already has a LoRA adapter.")
            adapted = LoRALinear(
                projection, rank=rank, alpha=alpha, dropout=dropout, key=next(keys)
            )
            setattr(parent, target, adapted)
    return model


def split_lora(model: nnx.Module, /) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Splits a model into its structure, its LoRA parameters and everything else.

    `LoRAParam` subclasses `Param`, so the LoRA filter is applied first; `base` holds the
    frozen parameters and any other state (e.g. dropout random streams).

    Args:
        model: A model holding `nnx.LoRAParam`s (see `add_lora`).

    Returns:
        `(graphdef, lora, base)`; `join_lora(graphdef, lora, base)` rebuilds the model, so a loss
        written as a function of `lora` is a pure function of a pytree.

    Raises:
        ValueError: If the model has no LoRA parameters.
    """
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    if not jax.tree.leaves(lora):
        raise ValueError("The model has no LoRA parameters; call add_lora first.")
    return graphdef, lora, base


def join_lora(graphdef: nnx.GraphDef, lora: nnx.State, base: nnx.State, /) -> nnx.Module:
    """The inverse of `split_lora`: a model from its structure, LoRA tree and base tree."""
    return nnx.merge(graphdef, lora, base)
