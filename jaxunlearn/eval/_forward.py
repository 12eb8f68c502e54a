"""Running a model in evaluation mode over every example of a dataset, a batch at a time."""

from collections.abc import Iterator

import numpy as np
from flax import nnx

from jaxunlearn.batch import Batch
from jaxunlearn.data import TokenizedDataset


def eval_split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """The (graphdef, state) of `model` with dropout off, leaving `model`'s own mode alone.

    A view shares the model's arrays, so nothing is copied; equal models give equal graphdefs,
    so a function jitted with the graphdef static compiles once per model kind and batch shape.
    """
    view = nnx.view(model, deterministic=True, raise_if_not_found=False)
    return nnx.split(view)


def length_sorted_batches(
    data: TokenizedDataset, batch_size: int
) -> Iterator[tuple[np.ndarray, Batch]]:
    """Yields (dataset positions, batch) covering every example once, shortest examples first.

    Sorting by length puts examples of similar length together, so batches fall into few
    bucket lengths (few compilations) and carry little padding. Every batch has `batch_size`
    rows; the last one is filled with padding rows (`example_mask` False).

    Raises:
        ValueError: If `batch_size` is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    # A stable sort keeps dataset order among equal lengths, so the batching is deterministic.
    order = np.argsort(np.asarray(data.lengths), kind="stable")
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        yield indices, data.batch(indices, batch_size=int(batch_size))
