"""One program on several processes (the hosts of a pod): who writes files, and where they wait.

On a pod every host runs the same command; the arrays span all of them, so every process
takes part in every computation and every gather. Files are different: the ledger, the adapter
folders and the reports are written once, by the writer (process 0), on storage every process
sees. The others compute alongside, read what the writer wrote only after waiting for it
(`sync`), and never write.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxunlearn.errors import UserError

__all__ = ["WRITER", "initialize", "is_writer", "shared_random_hex", "step", "sync"]

# The process that writes files.
WRITER = 0


def is_writer() -> bool:
    """True in the process that writes files: process 0, or the only one."""
    return jax.process_index() == WRITER


def sync(name: str, /) -> None:
    """Waits until every process has reached the point called `name` (at once with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def step(name: str, /) -> Iterator[None]:
    """Runs its block here, then waits until every process has finished it (`sync`), and fails
    on every process when it failed on any.

    For blocks that only some processes run (the writer's file work) or whose failure may not
    be shared (a file one host cannot read): without it, the processes that did not fail would
    wait at the next collective for one that has stopped, forever (`jax.distributed` has no
    collective timeout). The block's own error is raised where it happened; elsewhere a
    `UserError` names the process and the step. A block must not itself run collectives that
    a failure could leave unmatched.

    Raises:
        UserError: In a process whose block succeeded, when another's failed.
    """
    if jax.process_count() == 1:
        yield
        return
    try:
        yield
    except BaseException:
        _statuses(failed=True)
        raise
    failed = [index for index, status in enumerate(_statuses(failed=False)) if status]
    if failed:
        raise UserError(
            f"Process {failed[0]} of this run failed at {name!r}; its own output says why "
            "(this process stopped with it)."
        )


def _statuses(*, failed: bool) -> list[int]:
    """Every process's status at the end of a step (1 for failed), exchanged among all of them:
    also the wait for the slowest."""
    status = np.asarray([int(failed)], np.int32)
    gathered = multihost_utils.process_allgather(status)
    return [int(value) for value in np.asarray(gathered).reshape(-1)]


def shared_random_hex(num_bytes: int = 6, /) -> str:
    """Random hex digits, the writer's on every process: for a fresh name (a staging folder)
    that every process must agree on. Every process calls it together."""
    token = np.frombuffer(os.urandom(num_bytes), np.uint8)
    if jax.process_count() > 1:
        token = np.asarray(multihost_utils.broadcast_one_to_all(token), np.uint8)
    return token.tobytes().hex()


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins this process to the others of one program (`jax.distributed.initialize`).

    Without arguments the cluster is read from the environment: JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID when set, otherwise what JAX detects (SLURM, Open
    MPI, Kubernetes, Cloud TPU). Call it before anything touches a device.

    Raises:
        UserError: When the environment names no cluster or names it in part.
    """
    numbers = {}
    for name, value, variable in (
        ("num_processes", num_processes, "JAX_NUM_PROCESSES"),
        ("process_id", process_id, "JAX_PROCESS_ID"),
    ):
        text = os.environ.get(variable) if value is None else str(value)
        if text is not None:
            try:
                numbers[name] = int(text)
            except ValueError:
                raise UserError(f"{variable} must be an integer, got {text!r}.") from None
    try:
        jax.distributed.initialize(coordinator, **numbers)
    except (ValueError, RuntimeError) as error:
        reason = " ".join(str(error).split()).rstrip(".")
        raise UserError(
            f"Cannot join the other processes of this run: {reason} (set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under a "
            "cluster JAX detects)."
        ) from error
