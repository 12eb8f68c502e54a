"""The compiled cost of a computation, as XLA counts it."""

from collections.abc import Callable
from typing import Any

import jax


def compiled_flops(fn: Callable, /, *args: Any, **kwargs: Any) -> float | None:
    """The floating-point operations XLA counts for one call of `fn(*args, **kwargs)`.

    Compiles (does not run) `fn` for these arguments and reads the compiled module's cost
    analysis; an n×n by n×n matmul counts 2n³. Loops count their body once, not per iteration,
    so compare computations of one structure.

    Args:
        fn: A function, plain or already jitted (its static arguments are honoured then).
        *args: Arguments to compile it for: arrays or `jax.ShapeDtypeStruct`s.
        **kwargs: Keyword arguments to compile it for.

    Returns:
        The FLOP count, or None when the backend reports none.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    analysis = jitted.lower(*args, **kwargs).compile().cost_analysis()
    # Older jax returns one dict per device program in a list; newer jax returns the dict.
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    return flops if flops >= 0 else None
