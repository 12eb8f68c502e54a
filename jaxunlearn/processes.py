"""One program on several processes (the hosts of a pod): who writes files, and where they wait.

On a pod every host runs the same command; the arrays span all of them, so every process
takes part in every computation and every gather. Files are different: the ledger, the adapter
folders and the reports are written once, by the writer (process 0), on storage every process
sees. The others compute alongside, read what the writer wrote only after waiting for it
(`sync`), and never write.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxunlearn.errors import UserError

__all__ = ["WRITER", "initialize", "is_writer", "shared_random_hex", "sync"]

# The process that writes files.
WRITER = 0


def is_writer() -> bool:
    """True in the process that writes files: process 0, or the only one."""
    return jax.process_index() == WRITER


def sync(name: str, /) -> None:
    """Waits until every process has reached the point called `name` (at once with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


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
