"""LoRA adapters on a model's projections, and the split into (graphdef, lora, base) trees.

Adapters are addressed by the module names transformers and PEFT use
(`model.layers.0.self_attn.q_proj`, `transformer.h.0.attn.c_attn`, ...): a module's NNX path
joined by dots.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.errors import SettingsError
from jaxunlearn.models._families import CausalLM, family_of
from jaxunlearn.models._layers import Linear


class LoRALinear(nnx.Module):
    """A frozen `Linear` plus a low-rank update: `base(x) + scaling · dropout(x) A B`.

    As in PEFT: A [in, rank] starts Kaiming-uniform, B [rank, out] starts at zero (so the model
    is unchanged at initialisation), `scaling = alpha / rank` (or `alpha / √rank` with
    rank-stabilised LoRA), and the dropout acts on the adapter's input only. A and B are float32
    `nnx.LoRAParam`s whatever the base dtype: the update is computed in float32 and cast to the
    base output dtype.

    Attributes:
        base: The frozen projection.
        lora_a: A, [in, rank].
        lora_b: B, [rank, out].
        rank: The rank r.
        alpha: The LoRA alpha.
        use_rslora: Whether the scaling is `alpha / √rank` (rsLoRA) instead of `alpha / rank`.
        scaling: The factor of the update.
        dropout: The adapter input's dropout, or `None`.
    """

    def __init__(
        self,
        base: Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float,
        key: jax.Array,
        use_rslora: bool = False,
    ):
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
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
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


class Site(NamedTuple):
    """A projection LoRA can adapt.

    Attributes:
        layer: The index of its decoder layer.
        name: Its module name (`transformer.h.0.mlp.c_proj`).
        parent: The module holding it.
        attribute: Its attribute name on `parent`, the name LoRA targets use (`c_proj`).
    """

    layer: int
    name: str
    parent: nnx.Module
    attribute: str


def lora_sites(model: CausalLM, /) -> list[Site]:
    """Every projection of the decoder layers that LoRA can adapt, with or without an adapter.

    Ordered by layer, then module path.
    """
    family = family_of(model)
    layers = model
    for attribute in family.layers_path:
        layers = getattr(layers, attribute)
    sites = []
    for index, layer in enumerate(layers):
        for path, module in sorted(nnx.iter_modules(layer), key=lambda item: item[0]):
            # A LoRALinear's frozen projection sits at `.../q_proj/base` and is not a site.
            if not path or path[-1] not in family.lora_targets:
                continue
            if not isinstance(module, Linear | LoRALinear):
                continue
            parent = layer
            for attribute in path[:-1]:
                parent = getattr(parent, attribute)
            name = ".".join(str(p) for p in (*family.layers_path, index, *path))
            sites.append(Site(index, name, parent, path[-1]))
    return sites


def lora_modules(model: nnx.Module, /) -> dict[str, LoRALinear]:
    """The model's adapters by module name, in the order of `lora_sites`."""
    return {
        site.name: getattr(site.parent, site.attribute)
        for site in lora_sites(model)
        if isinstance(getattr(site.parent, site.attribute), LoRALinear)
    }


def attach_adapters(
    model: CausalLM,
    sites: Iterable[tuple[Site, int, float]],
    /,
    *,
    use_rslora: bool,
    dropout: float,
    key: jax.Array,
) -> None:
    """Wraps each `(site, rank, alpha)` in a fresh `LoRALinear`, in place.

    Raises:
        ValueError: If a site already has an adapter (nothing is changed then).
    """
    sites = list(sites)
    for site, _, _ in sites:
        if isinstance(getattr(site.parent, site.attribute), LoRALinear):
            raise ValueError(f"{site.name} already has a LoRA adapter.")
    keys = jax.random.split(key, len(sites))
    for (site, rank, alpha), site_key in zip(sites, keys, strict=True):
        adapted = LoRALinear(
            getattr(site.parent, site.attribute),
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            key=site_key,
            use_rslora=use_rslora,
        )
        setattr(site.parent, site.attribute, adapted)


def add_lora(
    model: CausalLM,
    /,
    *,
    rank: int,
    alpha: float,
    targets: Iterable[str],
    key: jax.Array,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> CausalLM:
    """Wraps the named projections of every layer with LoRA adapters, in place.

    Targets are named as PEFT names them, and like PEFT a name adapts every projection of that
    name: GPT-2's `c_proj` adapts both the attention and the MLP output projections.

    Args:
        model: The model; it is modified and also returned.
        rank: The adapter rank r.
        alpha: The LoRA alpha; the update is scaled by alpha / rank, as in PEFT.
        targets: Projection names among `lora_targets(model)`: for Llama `q_proj k_proj v_proj
            o_proj gate_proj up_proj down_proj`, for GPT-2 `c_attn c_proj c_fc`, for OPT
            `q_proj k_proj v_proj out_proj fc1 fc2`.
        key: PRNG key for the A matrices (and the dropout stream).
        dropout: Dropout rate on the adapters' input. Dropout is active in `model.train()` mode
            (the default) and off after `model.eval()`.
        use_rslora: Scale the update by alpha / √rank (rank-stabilised LoRA) instead.

    Returns:
        The same model, now holding `nnx.LoRAParam`s.

    Raises:
        SettingsError: For an unknown or repeated target, a non-positive rank or a dropout rate
            outside [0, 1).
        ValueError: For a projection that already has an adapter.
    """
    family_targets = family_of(model).lora_targets
    targets = tuple(targets)
    unknown = [t for t in targets if t not in family_targets]
    if unknown or not targets:
        raise SettingsError(
            f"LoRA targets must be a non-empty subset of {family_targets}, got {targets}."
        )
    if len(set(targets)) != len(targets):
        raise SettingsError(f"LoRA targets repeat a name: {targets}.")
    if not isinstance(rank, int) or rank <= 0:
        raise SettingsError(f"LoRA rank must be a positive integer, got {rank!r}.")
    if not 0.0 <= dropout < 1.0:
        raise SettingsError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    sites = lora_sites(model)
    # Layer by layer, then in the order of `targets`: the order the A matrices draw their keys.
    chosen = [
        (site, rank, alpha)
        for layer in sorted({site.layer for site in sites})
        for target in targets
        for site in sites
        if site.layer == layer and site.attribute == target
    ]
    attach_adapters(model, chosen, use_rslora=use_rslora, dropout=dropout, key=key)
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
