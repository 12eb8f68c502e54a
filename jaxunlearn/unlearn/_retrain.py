"""Retraining: the reference every unlearning method is measured against.

The retrained adapter is fine-tuned on the data after the request (the retain set, or the
edited data) from the same initialization, with the same settings and the same number of
passes over the data, so that the only difference from the original fine-tune is the request.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.train import BatchSource, TrainConfig, TrainResult, finetune

__all__ = ["retrain", "retrain_config"]


def retrain_config(config: TrainConfig, /, *, num_examples: int, num_examples_after: int):
    """The original run's config with the number of steps (and warmup) scaled to the new data
    size, so the retrain makes as many passes over its data as the original made over its own.
    """
    if num_examples <= 0 or num_examples_after <= 0:
        raise ValueError(
            f"Both data sizes must be positive, got {num_examples} and {num_examples_after}."
        )
    ratio = num_examples_after / num_examples
    num_steps = max(1, math.ceil(config.num_steps * ratio))
    warmup_steps = min(round(config.warmup_steps * ratio), num_steps - 1)
    return dataclasses.replace(config, num_steps=num_steps, warmup_steps=warmup_steps)


def retrain(
    initial: nnx.Module,
    data_after: BatchSource,
    /,
    *,
    config: TrainConfig,
    num_examples: int,
    progress: bool = True,
    placement: parallel.Placement = parallel.ONE_DEVICE,
) -> TrainResult:
    """Fine-tunes a copy of the initial LoRA model on the data after a request.

    Args:
        initial: The model as it was before the original fine-tune (base weights plus the
            adapter at its initialization); it is not modified.
        data_after: The retain set (or the edited data), tokenized as the original data was.
        config: The original fine-tune's settings.
        num_examples: The size of the original training set (to keep the number of epochs).
        progress: Show a progress bar.
        placement: Train on its mesh (the copy's variables moved there), as `finetune` does.

    Returns:
        The retrained model and its history.
    """
    config = retrain_config(config, num_examples=num_examples, num_examples_after=len(data_after))
    return finetune(
        nnx.clone(initial),
        data_after,
        config=config,
        progress=progress,
        mesh=placement.mesh,
        rules=placement.rules,
    )
