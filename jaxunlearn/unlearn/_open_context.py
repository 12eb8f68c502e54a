"""What a method sees of a saved adapter, for calling a method directly (notebooks, experiments)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from jaxunlearn.data import Example, TokenizedDataset
from jaxunlearn.parallel import ONE_DEVICE, Placement
from jaxunlearn.unlearn._adapter_files import open_adapter
from jaxunlearn.unlearn._digests import examples_digest
from jaxunlearn.unlearn._lineage import adapter_digest
from jaxunlearn.unlearn._method import UnlearningContext

__all__ = ["open_context"]


def open_context(
    adapter: str | os.PathLike,
    base_model: str | os.PathLike,
    /,
    *,
    examples: Sequence[Example],
    data: TokenizedDataset,
    tokenizer: Any,
    placement: Placement = ONE_DEVICE,
) -> UnlearningContext:
    """The `UnlearningContext` `apply_request` would show a method for a first request on
    `adapter`: the adapter loaded on `base_model`, its digest and its fine-tune's settings.

    Unlike `apply_request`, nothing is checked against the adapter's provenance and nothing
    is recorded: `examples` and `data` must be the adapter's training set as it was tokenized
    for training. `Method.prepare`, `warm_up` and `apply` then run on it one stage at a time,
    which is how to time or inspect a method's stages.
    """
    opened = open_adapter(adapter, base_model, placement=placement)
    return UnlearningContext(
        model=opened.model,
        examples=examples,
        data=data,
        tokenizer=tokenizer,
        adapter_digest=adapter_digest(opened.model, opened.provenance),
        data_digest=examples_digest(examples),
        train_config=None if opened.provenance is None else opened.provenance.train_config,
        placement=placement,
    )
