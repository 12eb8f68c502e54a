"""Meshes and the rules that map parameters' logical axis names to mesh axes.

Layers annotate each parameter with logical names (`embed`, `word_embed`, `vocab`,
`positions`, `mlp`, `heads`, `kv_heads`, `norm`, `lora_rank`); the rules here, in one place, say
which mesh axis (`data`, `fsdp`, `tensor`) shards each. Changing a parallelism strategy means
changing the rules, never the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "LogicalRules",
    "logical_sharding",
    "logical_to_mesh",
    "make_mesh",
    "shard_model",
    "state_shardings",
]

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# FSDP shards the model width, tensor parallelism the per-head and MLP widths (Megatron style:
# q/k/v/gate/up split their outputs, o/down their inputs), and the batch spans data and fsdp.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    # OPT's token-embedding width, which `project_in`/`project_out` map to and from `embed`.
    ("word_embed", "fsdp"),
    ("vocab", "tensor"),
    # Rows of learned position tables (GPT-2, OPT): small, so replicated.
    ("positions", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("lora_rank", None),
)


def make_mesh(
    *, data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Returns a (data, fsdp, tensor) mesh with automatic (propagated) shardings.

    `jax.make_mesh` defaults to Explicit axes in JAX 0.10, which would make every operation of
    the model state its output sharding; Auto axes let `jax.jit` propagate them instead.

    Args:
        data: Number of data-parallel replicas.
        fsdp: Number of devices the parameters' `embed` axis (and the batch) is split over.
        tensor: Number of devices the heads, MLP and vocabulary axes are split over.
        devices: The devices; by default the first `data * fsdp * tensor` of `jax.devices()`.

    Raises:
        ValueError: If there are not exactly `data * fsdp * tensor` devices to use.
    """
    size = data * fsdp * tensor
    if devices is None:
        available = jax.devices()
        if len(available) < size:
            raise ValueError(
                f"A mesh data={data} × fsdp={fsdp} × tensor={tensor} needs {size} devices; "
                f"only {len(available)} are visible."
            )
        devices = available[:size]
    if len(devices) != size:
        raise ValueError(f"Got {len(devices)} devices for a mesh of {size}.")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, auto, devices=devices)


def logical_to_mesh(
    logical_axes: Sequence[str | None],
    /,
    *,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a `PartitionSpec` over `mesh`.

    A mesh axis shards at most one dimension (the first that asks for it). With `shape`, a
    dimension that the mesh axes do not divide keeps only the leading axes that do (possibly
    none), because JAX cannot split 32001 vocabulary rows over 2 devices.

    Args:
        logical_axes: One name (or `None` for replicated) per dimension.
        mesh: The mesh.
        shape: The array shape, to check divisibility.
        rules: (logical name, mesh axis or axes or None) pairs.

    Raises:
        ValueError: For a logical name without a rule, or a rule naming an axis not in `mesh`.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"No sharding rule for logical axis {name!r}; rules: {sorted(table)}.")
        target = table[name]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for axis in axes:
            if axis not in mesh.shape:
                raise ValueError(f"Rule {name!r} -> {axis!r} names an axis not in the mesh.")
        axes = tuple(a for a in axes if a not in used)
        if shape is not None:
            while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_sharding(
    logical_axes: Sequence[str | None],
    /,
    *,
    mesh: Mesh,
    shape: Sequence[int] | None = None,
    rules: LogicalRules = DEFAULT_RULES,
) -> NamedSharding:
    """`logical_to_mesh` wrapped in a `NamedSharding`, e.g. `(\"batch\", None)` for token ids."""
    return NamedSharding(mesh, logical_to_mesh(logical_axes, mesh=mesh, shape=shape, rules=rules))


def state_shardings(state: nnx.State, mesh: Mesh, /, *, rules: LogicalRules = DEFAULT_RULES):
    """Returns a tree like `state` whose values are the `NamedSharding` of each variable.

    Variables without `logical_axes` metadata (random-stream counters, ...) are replicated. The
    result is a valid `jax.device_put` target and `jax.jit` `in_shardings`/`out_shardings` for
    `state`.
    """

    def sharding_of(variable):
        metadata = variable.get_metadata()
        value = variable.get_value()
        if "logical_axes" not in metadata:
            return variable.replace(value=NamedSharding(mesh, PartitionSpec()))
        names = metadata["logical_axes"]
        if len(names) != value.ndim:
            raise ValueError(f"logical_axes {names} do not match a value of shape {value.shape}.")
        spec = logical_to_mesh(names, mesh=mesh, shape=value.shape, rules=rules)
        return variable.replace(value=NamedSharding(mesh, spec))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, /, *, rules: LogicalRules = DEFAULT_RULES):
    """Moves every variable of `model` onto `mesh` following `rules`, in place; returns `model`."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules=rules)))
    return model
