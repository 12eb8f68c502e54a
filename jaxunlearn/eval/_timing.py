"""Wall-clock of a computation after its compilation, with the compilation reported apart.

JAX compiles a function on its first call for each input shape and dispatches work
asynchronously: a clock read right after a call measures compiling (the first time) and
queueing, not running. `timed` runs a warm-up first (timed as compilation) and waits for the
result's arrays before it stops the clock.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import jax

__all__ = ["Timed", "timed"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Timed(Generic[T]):
    """A value with the wall-clock it took.

    Attributes:
        value: What the timed function returned.
        seconds: Wall-clock of running it, until every array leaf of `value` was ready.
        compile_seconds: Wall-clock of the warm-up before it (0 without one).
    """

    value: T
    seconds: float
    compile_seconds: float


def timed(run: Callable[[], T], /, *, warm_up: Callable[[], Any] | None = None) -> Timed[T]:
    """Runs `warm_up` (if given), then `run`, timing each until its arrays are ready.

    Args:
        run: The computation to time.
        warm_up: Compiles what `run` will execute (e.g. runs it once on padding), so that the
            time of `run` is the time of running, not of compiling.

    Returns:
        `Timed(value of run, seconds of run, seconds of warm_up)`.
    """
    compile_seconds = 0.0
    if warm_up is not None:
        started = time.perf_counter()
        jax.block_until_ready(warm_up())
        compile_seconds = time.perf_counter() - started
    started = time.perf_counter()
    value = jax.block_until_ready(run())
    return Timed(value, time.perf_counter() - started, compile_seconds)
