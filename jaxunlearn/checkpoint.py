"""Atomic, restorable saves of pytrees with orbax: numbered training checkpoints and adapters.

Every save is written by orbax into a temporary directory that is renamed into place only once
it is complete, so a process killed in the middle of a save leaves the previous checkpoint (or
adapter) intact and loadable; the half-written temporary directory is never listed as a step.
Saves are synchronous: when `save` returns, the checkpoint is on disk.

Restores are checked against a target tree (concrete arrays or `jax.ShapeDtypeStruct`s): a
missing or extra leaf, a shape or a dtype that differs from the checkpoint is a
`CheckpointError` (a `ValueError`) naming the leaf, never a silent cast or a partial restore.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxunlearn.errors import SettingsError
from jaxunlearn.models import CheckpointError

__all__ = ["Checkpointer", "load_adapter", "read_adapter_metadata", "save_adapter"]

_TREE = "tree"
_METADATA = "metadata"
_ADAPTER = "adapter"


class Checkpointer:
    """Numbered checkpoints of one pytree plus JSON metadata, in one directory.

    A thin layer over `orbax.checkpoint.CheckpointManager`: step `s` lives in `directory/s/`
    with two items, the array tree (`StandardSave`) and the metadata (`JsonSave`).

    Example:
        >>> checkpointer = Checkpointer("/tmp/run", keep=3)          # doctest: +SKIP
        >>> checkpointer.save(100, {"w": w}, metadata={"lr": 1e-3})  # doctest: +SKIP
        >>> checkpointer.restore(target={"w": w})                    # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike, /, *, keep: int | None = None):
        """Opens (and creates if needed) a checkpoint directory.

        Args:
            directory: Where the numbered step directories live.
            keep: How many of the most recent checkpoints to keep; older ones are deleted after
                each save. `None` keeps all.

        Raises:
            SettingsError: If `keep` is not a positive integer or `None`.
        """
        if keep is not None and (not isinstance(keep, int) or keep <= 0):
            raise SettingsError(f"keep must be a positive integer or None, got {keep!r}.")
        self._directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=options,
            item_handlers={
                _TREE: ocp.StandardCheckpointHandler(),
                _METADATA: ocp.JsonCheckpointHandler(),
            },
        )

    @property
    def directory(self) -> str:
        """The absolute path of the checkpoint directory."""
        return self._directory

    def all_steps(self) -> list[int]:
        """The steps of all complete checkpoints, in increasing order."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or `None` if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, tree: Any, /, *, metadata: Mapping[str, Any] | None = None) -> None:
        """Writes checkpoint `step` and returns once it is durable on disk.

        Args:
            step: A non-negative step number not already saved in this directory.
            tree: A pytree of arrays (`jax.Array` or numpy), e.g. an `nnx.State`.
            metadata: A JSON-serialisable mapping stored beside the arrays.

        Raises:
            FileExistsError: If checkpoint `step` already exists.
            ValueError: If `step` is negative or `metadata` is not JSON-serialisable.
        """
        if not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}.")
        step = int(step)
        metadata = _checked_json(metadata)
        if step in self.all_steps():
            raise FileExistsError(f"Checkpoint step {step} already exists in {self._directory}.")
        args = ocp.args.Composite(
            **{_TREE: ocp.args.StandardSave(tree), _METADATA: ocp.args.JsonSave(metadata)}
        )
        # force: save every step we are asked to; the interval policy belongs to the caller.
        if not self._manager.save(step, args=args, force=True):
            raise RuntimeError(f"orbax declined to save step {step} in {self._directory}.")
        self._manager.wait_until_finished()

    def restore(self, step: int | None = None, /, *, target: Any) -> Any:
        """Reads the array tree of a checkpoint.

        Args:
            step: The step to read; `None` reads the latest.
            target: A pytree with the structure, shapes and dtypes of the saved tree: concrete
                arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`). Restored arrays
                take the targets' shardings (the default device where a target has none).

        Returns:
            The restored tree, with the structure of `target`.

        Raises:
            FileNotFoundError: If the directory holds no checkpoint, or not `step`.
            CheckpointError: If `target` does not match the checkpoint (structure, shape or
                dtype).
        """
        step = self._existing_step(step)
        stored = self._manager.item_metadata(step)[_TREE]
        _check_matches(target, stored, where=f"checkpoint step {step} in {self._directory}")
        args = ocp.args.Composite(**{_TREE: ocp.args.StandardRestore(_abstract(target))})
        return self._manager.restore(step, args=args)[_TREE]

    def metadata(self, step: int | None = None, /) -> dict[str, Any]:
        """The JSON metadata saved with a checkpoint (`None`: the latest)."""
        step = self._existing_step(step)
        args = ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
        return self._manager.restore(step, args=args)[_METADATA]

    def close(self) -> None:
        """Waits for pending work and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _existing_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self._directory}.")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint step {step} in {self._directory}; steps there: {steps}."
            )
        return step


def save_adapter(
    path: str | os.PathLike, lora_tree: Any, /, *, metadata: Mapping[str, Any]
) -> None:
    """Saves a final adapter and its description atomically to a new directory.

    The arrays and the metadata are two items of one orbax checkpoint, so they appear together
    or not at all.

    Args:
        path: A directory that must not exist yet.
        lora_tree: The adapter pytree (e.g. the `lora` tree of `split_lora`).
        metadata: A JSON-serialisable description chosen by the caller (rank, alpha, targets,
            base model, ...), needed to rebuild the model that the adapter fits.

    Raises:
        FileExistsError: If `path` exists (an adapter is never overwritten in place).
        ValueError: If `metadata` is not JSON-serialisable.
    """
    path = os.path.abspath(os.fspath(path))
    metadata = _checked_json(metadata)
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; save the adapter to a new path.")
    with ocp.Checkpointer(_adapter_handler()) as checkpointer:
        checkpointer.save(
            path,
            args=ocp.args.Composite(
                **{
                    _ADAPTER: ocp.args.StandardSave(lora_tree),
                    _METADATA: ocp.args.JsonSave(metadata),
                }
            ),
        )


def load_adapter(path: str | os.PathLike, /, *, target: Any) -> tuple[Any, dict[str, Any]]:
    """Loads an adapter written by `save_adapter`.

    Args:
        path: The adapter directory.
        target: A pytree with the adapter's structure, shapes and dtypes (arrays or
            `jax.ShapeDtypeStruct`s), e.g. the `lora` tree of a model built from the metadata.

    Returns:
        `(lora_tree, metadata)`.

    Raises:
        FileNotFoundError: If `path` is not a saved adapter.
        CheckpointError: If `target` does not match the saved adapter.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(os.path.join(path, _ADAPTER)):
        raise FileNotFoundError(f"{path} is not an adapter saved by save_adapter.")
    with ocp.Checkpointer(_adapter_handler()) as checkpointer:
        stored = checkpointer.metadata(path).item_metadata[_ADAPTER]
        _check_matches(target, stored, where=f"adapter {path}")
        restored = checkpointer.restore(
            path,
            args=ocp.args.Composite(
                **{
                    _ADAPTER: ocp.args.StandardRestore(_abstract(target)),
                    _METADATA: ocp.args.JsonRestore(),
                }
            ),
        )
    return restored[_ADAPTER], restored[_METADATA]


def read_adapter_metadata(path: str | os.PathLike, /) -> dict[str, Any]:
    """The JSON description saved with an adapter by `save_adapter`, without its arrays.

    Raises:
        FileNotFoundError: If `path` is not a saved adapter.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(os.path.join(path, _ADAPTER)):
        raise FileNotFoundError(f"{path} is not an adapter saved by save_adapter.")
    with ocp.Checkpointer(_adapter_handler()) as checkpointer:
        restored = checkpointer.restore(
            path, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
        )
    return restored[_METADATA]


def _adapter_handler() -> ocp.CompositeCheckpointHandler:
    return ocp.CompositeCheckpointHandler(
        **{_ADAPTER: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()}
    )


def _checked_json(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    metadata = {} if metadata is None else dict(metadata)
    try:
        # A round trip turns tuples into lists now rather than after a restore.
        return json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from error


def _abstract(tree: Any) -> Any:
    """The tree as `ShapeDtypeStruct`s that carry each array's sharding (when it has one)."""

    def to_struct(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
        return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)

    return jax.tree.map(to_struct, tree)


def _check_matches(target: Any, stored: Any, *, where: str) -> None:
    """Raises a CheckpointError naming the first leaf where `target` and the stored tree differ."""
    stored = getattr(stored, "tree", stored)
    if stored is None:
        raise CheckpointError(f"{where} holds no array tree.")
    wanted = ocp.tree.to_flat_dict(
        ocp.tree.serialize_tree(_abstract(target), keep_empty_nodes=True)
    )
    found = ocp.tree.to_flat_dict(stored)
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    if missing or extra:
        raise CheckpointError(
            f"The target does not match {where}: "
            f"{len(missing)} leaves only in the target (first: {_name(missing)}), "
            f"{len(extra)} only in the checkpoint (first: {_name(extra)})."
        )
    for key in sorted(wanted):
        want, have = wanted[key], found[key]
        if tuple(want.shape) != tuple(have.shape) or np.dtype(want.dtype) != np.dtype(have.dtype):
            raise CheckpointError(
                f"The target does not match {where} at {_name([key])}: target "
                f"{want.dtype}{list(want.shape)}, checkpoint {have.dtype}{list(have.shape)}."
            )


def _name(keys: list[tuple]) -> str:
    return "/".join(str(part) for part in keys[0]) if keys else "-"
