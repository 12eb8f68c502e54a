"""Meshes and the rules that map parameters' logical axis names to mesh axes.

Layers annotate each parameter with logical names (`embed`, `word_embed`, `vocab`,
`positions`, `mlp`, `heads`, `kv_heads`, `norm`, `lora_rank`); the rules here, in one place, say
which mesh axis (`data`, `fsdp`, `tensor`) shards each. Changing a parallelism strategy means
changing the rules, never the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxunlearn.batch import Batch
from jaxunlearn.errors import SettingsError

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "ONE_DEVICE",
    "LogicalRules",
    "Placement",
    "activations_on",
    "batch_shardings",
    "constrain_logical",
    "constrain_rows",
    "host_array",
    "logical_sharding",
    "logical_to_mesh",
    "make_mesh",
    "mesh_from_spec",
    "mesh_sizes",
    "optimizer_state_shardings",
    "put",
    "replicated",
    "shard_model",
    "state_shardings",
    "vocab_splits",
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
        SettingsError: If there are not exactly `data * fsdp * tensor` devices to use.
    """
    for name, count in (("data", data), ("fsdp", fsdp), ("tensor", tensor)):
        if not isinstance(count, int) or count < 1:
            raise SettingsError(f"Mesh axis {name} must be a positive integer, got {count!r}.")
    size = data * fsdp * tensor
    if devices is None:
        available = jax.devices()
        if len(available) < size:
            raise SettingsError(
                f"A mesh data={data} × fsdp={fsdp} × tensor={tensor} needs {size} devices; "
                f"only {len(available)} are visible."
            )
        devices = available[:size]
    if len(devices) != size:
        raise SettingsError(f"Got {len(devices)} devices for a mesh of {size}.")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, auto, devices=devices)


def mesh_from_spec(spec: str, /, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh a command line asks for: `"data=2,fsdp=4,tensor=1"` or `"auto"`.

    Axes left out have size 1. `"auto"` puts every device on `fsdp`: the parameters (and the
    batch) are split over all of them, which is what LoRA fine-tuning of a model too large for
    one device needs, and on one device it is that device.

    Raises:
        SettingsError: For an unknown axis, a size that is not a positive integer, an axis
            given twice, or a mesh of more devices than there are.
    """
    if spec.strip() == "auto":
        available = jax.devices() if devices is None else list(devices)
        return make_mesh(fsdp=len(available), devices=available)
    sizes = mesh_sizes(spec)
    return make_mesh(**sizes, devices=devices)


def mesh_sizes(spec: str, /) -> dict[str, int]:
    """The axis sizes a mesh spec such as `"data=2,fsdp=4"` names (axes left out are absent),
    read without looking at any device.

    Raises:
        SettingsError: As `mesh_from_spec` does, also for `"auto"` (whose sizes depend on the
            devices).
    """
    if spec.strip() == "auto":
        raise SettingsError("The mesh 'auto' has no sizes before the devices are known.")
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        name, equals, value = item.partition("=")
        name = name.strip()
        if not equals or name not in MESH_AXES:
            raise SettingsError(
                f"Cannot read the mesh {spec!r}: each item is AXIS=SIZE with AXIS one of "
                f"{', '.join(MESH_AXES)} (e.g. 'data=2,fsdp=4'), or the whole is 'auto'."
            )
        if name in sizes:
            raise SettingsError(f"The mesh {spec!r} gives axis {name} twice.")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise SettingsError(
                f"The mesh {spec!r} gives axis {name} the size {value.strip()!r}, not an integer."
            ) from None
    for name, size in sizes.items():
        if size < 1:
            raise SettingsError(f"Mesh axis {name} must be a positive integer, got {size}.")
    return sizes


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
    nnx.update(model, put(state, state_shardings(state, mesh, rules=rules)))
    return model


def replicated(mesh: Mesh, /) -> NamedSharding:
    """The sharding of a value every device holds whole (a step count, a random key)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_shardings(
    batch_size: int,
    mesh: Mesh,
    /,
    *,
    rules: LogicalRules = DEFAULT_RULES,
    stacked: bool = False,
) -> Batch:
    """A `Batch` of the shardings that split its rows over the mesh axes of `"batch"`.

    A batch whose rows those axes do not divide is refused rather than replicated: every
    device would then compute the whole batch, at several times the memory, without a word.

    Args:
        batch_size: The number of rows.
        mesh: The mesh.
        rules: The logical-axis rules (`"batch"` names the axes the rows are split over).
        stacked: Whether the arrays have a leading micro-batch axis ([M, B, T] arrays, as a
            training step with gradient accumulation takes), which is not split.

    Raises:
        SettingsError: If the batch axes' device count does not divide `batch_size`.
    """
    spec, axes = _batch_axes(mesh, rules)
    devices = math.prod(mesh.shape[axis] for axis in axes)
    if batch_size % devices:
        split = " × ".join(f"{axis}={mesh.shape[axis]}" for axis in axes)
        raise SettingsError(
            f"A batch of {batch_size} rows cannot be split over the mesh's {split} "
            f"({devices} devices); use a batch size that is a multiple of {devices}."
        )
    lead = (None,) if stacked else ()
    rows = NamedSharding(mesh, PartitionSpec(*lead, spec))
    tokens = NamedSharding(mesh, PartitionSpec(*lead, spec, None))
    return Batch(input_ids=tokens, attention_mask=tokens, loss_mask=tokens, example_mask=rows)


def _batch_axes(mesh: Mesh, rules: LogicalRules) -> tuple[Any, tuple[str, ...]]:
    """The partition-spec entry of a batch's rows, and the mesh axes it names."""
    spec = logical_to_mesh(("batch",), mesh=mesh, rules=rules)[0]
    return spec, () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def optimizer_state_shardings(
    optimizer: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh, /
) -> Any:
    """The shardings of `optimizer.init(params)`: every copy of the parameter tree in it (Adam's
    moments, ...) sharded like the parameters, everything else (step counts) replicated.

    Computed on abstract values: nothing is allocated.
    """
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def host_array(value: Any, /) -> np.ndarray:
    """The whole of an array as a NumPy array on this host, also an array split over the
    devices of several processes: then its blocks are gathered, and every process must call
    this together (as it calls every collective)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def put(value: Any, sharding: jax.sharding.Sharding, /) -> Any:
    """`value` (a tree of host or device arrays) placed with `sharding` (one, or a tree).

    Host (NumPy) arrays are assembled with `jax.make_array_from_callback`, so each device
    receives only its own block and, with several processes, each process builds only the
    blocks of its devices from the same host value: a plain `jax.device_put` of a host array
    cannot target devices of another process.
    """

    def place(leaf, target):
        if isinstance(leaf, jax.Array) and (
            target.is_fully_addressable or not leaf.is_fully_addressable
        ):
            return jax.device_put(leaf, target)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            # Typed keys have no host form: their key data moves, and is wrapped again.
            data = place(jax.random.key_data(leaf), target)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        # A host array, or one on this process's devices only (built before the mesh).
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda leaf: place(leaf, sharding), value)
    return jax.tree.map(place, value, sharding)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a computation keeps its arrays: on the default device (`mesh` None), or on a mesh
    with the parameters split by `rules` and every batch's rows split over the batch axes.

    One object carried through a request (its model, batches and curvature sample), so that
    nothing in it is placed by accident: a host batch fed to a jitted function beside
    parameters on a mesh would be copied whole to every device.

    Attributes:
        mesh: The mesh, or None for one device.
        rules: The logical-axis rules.
    """

    mesh: Mesh | None = None
    rules: LogicalRules = DEFAULT_RULES

    @property
    def batch_devices(self) -> int:
        """How many devices a batch's rows are split over (1 without a mesh)."""
        if self.mesh is None:
            return 1
        _, axes = _batch_axes(self.mesh, self.rules)
        return math.prod(self.mesh.shape[axis] for axis in axes)

    def check_batch_size(self, batch_size: int, /, *, what: str = "batch size") -> None:
        """Raises `SettingsError` naming `what` if the batch axes do not divide `batch_size`."""
        devices = self.batch_devices
        if batch_size % devices:
            raise SettingsError(
                f"The {what} {batch_size} cannot be split over the mesh's {devices} batch "
                f"devices ({self.describe()}); use a multiple of {devices}."
            )

    def round_batch_size(self, batch_size: int, /) -> int:
        """The smallest multiple of the batch devices at least `batch_size`."""
        devices = self.batch_devices
        return -(-batch_size // devices) * devices

    def batch(self, batch: Batch, /) -> Batch:
        """`batch` with its rows split over the batch axes (unchanged without a mesh).

        Raises:
            SettingsError: If the batch axes do not divide its rows.
        """
        if self.mesh is None:
            return batch
        rows = int(np.shape(batch.input_ids)[0])
        return put(batch, batch_shardings(rows, self.mesh, rules=self.rules))

    def rows(self, value: Any, /) -> Any:
        """`value` (a tree of host or device arrays with a leading row axis) with its rows split
        over the batch axes, its other axes whole (unchanged without a mesh).

        Raises:
            SettingsError: If the batch axes do not divide a leaf's rows.
        """
        if self.mesh is None:
            return value
        spec, _ = _batch_axes(self.mesh, self.rules)

        def place(leaf):
            self.check_batch_size(int(np.shape(leaf)[0]), what="number of rows")
            trailing = (None,) * (np.ndim(leaf) - 1)
            return put(leaf, NamedSharding(self.mesh, PartitionSpec(spec, *trailing)))

        return jax.tree.map(place, value)

    def model(self, model: nnx.Module, /) -> nnx.Module:
        """Moves `model`'s variables onto the mesh by their logical axes, in place."""
        return model if self.mesh is None else shard_model(model, self.mesh, rules=self.rules)

    def row_sharding(self, batch_size: int, /) -> Batch | None:
        """The shardings of a `Batch` of `batch_size` rows (None without a mesh)."""
        if self.mesh is None:
            return None
        return batch_shardings(batch_size, self.mesh, rules=self.rules)

    def describe(self) -> str:
        """E.g. "data=1 × fsdp=4 × tensor=2", or "one device"."""
        if self.mesh is None:
            return "one device"
        return " × ".join(f"{axis}={size}" for axis, size in self.mesh.shape.items())


# The placement of everything on the default device: what every `placement=` defaults to.
ONE_DEVICE = Placement()


# The placement whose batch axes split activations' rows, while a computation is traced.
_ACTIVATIONS: contextvars.ContextVar[Placement | None] = contextvars.ContextVar(
    "jaxunlearn_activation_placement", default=None
)


@contextlib.contextmanager
def activations_on(placement: Placement, /):
    """Within it, models traced keep their activations' rows split over `placement`'s batch
    axes (`constrain_rows`); without a mesh it changes nothing.

    Without the constraint the compiler is free to lay activations out as it likes, and with
    parameters split over fsdp it often splits the model width instead of the rows: fsdp then
    acts as a second tensor axis, and each layer all-reduces and all-to-alls its activations.
    With it, each device keeps its own rows and gathers the weights it needs (FSDP).

    The constraint is part of a program's trace, and JAX reuses a trace for arguments of the
    same shapes and shardings: a function first traced outside this context keeps that layout
    when called again inside it (a layout only: the values are the same).
    """
    token = _ACTIVATIONS.set(None if placement.mesh is None else placement)
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain_rows(x: jax.Array, /) -> jax.Array:
    """`x` with its leading (batch) axis split over the batch axes of the `activations_on`
    placement, and its other axes whole; `x` itself outside one, or when those axes do not
    divide its rows."""
    placement = _ACTIVATIONS.get()
    if placement is None or x.shape[0] % placement.batch_devices:
        return x
    spec, _ = _batch_axes(placement.mesh, placement.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(placement.mesh, PartitionSpec(spec)))


def constrain_logical(x: jax.Array, logical_axes: Sequence[str | None], /) -> jax.Array:
    """`x` laid out by the `activations_on` placement's rules for these logical axes (one per
    dimension, `None` for whole); `x` itself outside one."""
    placement = _ACTIVATIONS.get()
    if placement is None:
        return x
    sharding = logical_sharding(
        logical_axes, mesh=placement.mesh, shape=x.shape, rules=placement.rules
    )
    return jax.lax.with_sharding_constraint(x, sharding)


def vocab_splits(vocab_size: int, /) -> int:
    """The number of devices the `activations_on` placement splits a vocabulary of this size
    over (its rules for the logical axis `vocab`; 1 outside one, or when they do not divide
    it)."""
    placement = _ACTIVATIONS.get()
    if placement is None:
        return 1
    spec = logical_to_mesh(
        ("vocab",), mesh=placement.mesh, shape=(vocab_size,), rules=placement.rules
    )[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(placement.mesh.shape[axis] for axis in axes)
