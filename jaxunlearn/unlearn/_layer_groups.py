"""S3T's layer groups: the decoder layers split into L contiguous blocks, ordered top-down.

Group 1 holds the top-most layers, group L the bottom-most: stage i of a slice order trains
only group i, so the groups trained last (on the most data) sit nearest the input. Adapters
are assigned to groups by the integer index of their decoder layer in the module path
(`model.layers.<i>...`, `transformer.h.<i>...`), never by matching names: a name match on
"layers.1" would also select layers 10 to 19.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
from flax import nnx

from jaxunlearn.errors import SettingsError

__all__ = ["group_filter", "layer_groups", "layer_index", "lora_layer_indices"]

# The names of the containers that hold a family's decoder layers, indexed by position.
_LAYER_CONTAINERS = ("layers", "h")


def layer_index(path: Sequence[object], /) -> int | None:
    """The decoder layer an NNX path lies in (the integer after `layers` or `h`), or None."""
    for position in range(len(path) - 1):
        name, index = path[position], path[position + 1]
        if name in _LAYER_CONTAINERS and isinstance(index, int) and not isinstance(index, bool):
            return index
    return None


def lora_layer_indices(model: nnx.Module, /) -> tuple[int, ...]:
    """The decoder layers holding LoRA parameters, ascending.

    Raises:
        SettingsError: If the model has no LoRA parameter, or one outside the decoder layers
            (no layer group could hold it).
    """
    indices = set()
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        index = layer_index(path)
        if index is None:
            raise SettingsError(
                f"The adapter {'.'.join(map(str, path))} is outside the decoder layers; S3T "
                "assigns adapters to layer groups by their layer."
            )
        indices.add(index)
    if not indices:
        raise SettingsError("The model has no LoRA parameters to group.")
    return tuple(sorted(indices))


def layer_groups(layers: Sequence[int], num_groups: int, /) -> tuple[tuple[int, ...], ...]:
    """The adapted layers split into `num_groups` contiguous blocks, the top-most block first.

    Blocks differ in size by at most one (the upper blocks are the larger ones): 6 layers in
    4 groups give ((5, 4), (3, 2), (1,), (0,)).

    Raises:
        SettingsError: If there are fewer adapted layers than groups.
    """
    layers = sorted(set(int(layer) for layer in layers))
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise SettingsError(
            f"The number of layer groups must be a positive integer, got {num_groups!r}."
        )
    if len(layers) < num_groups:
        raise SettingsError(
            f"S3T trains one layer group per slice: {num_groups} slices need at least "
            f"{num_groups} adapted decoder layers, the adapter has {len(layers)}. Use fewer "
            "slices or adapt more layers."
        )
    top_down = layers[::-1]
    return tuple(
        tuple(int(layer) for layer in block) for block in np.array_split(top_down, num_groups)
    )


def group_filter(layers: Collection[int], /) -> nnx.filterlib.Filter:
    """An NNX filter selecting the LoRA parameters of the given decoder layers."""
    chosen = frozenset(int(layer) for layer in layers)

    def in_group(path, value) -> bool:
        return layer_index(path) in chosen

    return nnx.All(nnx.LoRAParam, in_group)
