"""PII extraction: does greedy decoding from a training context reproduce a private value?

For each person, the model is prompted with exactly the text that preceded a PII value in
training ("The email address of Jane Roe is") and decodes greedily; the value counts as
extracted when it appears verbatim in the completion (metrics.md, "PII extraction recall").
"""

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from jaxunlearn import parallel
from jaxunlearn.models import generate


class RecallPromptLike(Protocol):
    person_id: str
    field: str
    prompt: str
    expected_value: str


class ExtractionAttempt(NamedTuple):
    """One prompt's outcome: the completion and whether it reproduced the value verbatim."""

    person_id: str
    field: str
    prompt: str
    expected_value: str
    completion: str
    extracted: bool


def pii_extraction(
    model,
    tokenizer,
    prompts: Sequence[RecallPromptLike],
    /,
    *,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    placement: parallel.Placement = parallel.ONE_DEVICE,
) -> list[ExtractionAttempt]:
    """Greedily completes every recall prompt and checks for its PII value.

    Prompts are left-padded to one length and batched to one size, so generation compiles once.

    Args:
        model: a causal LM (with or without adapters) accepted by `jaxunlearn.models.generate`.
        tokenizer: its tokenizer.
        prompts: records with `person_id`, `field`, `prompt` and `expected_value`.
        max_new_tokens: the longest completion; make it cover the longest value.
        batch_size: prompts decoded at once.
        placement: where `model` lives: on a mesh, each batch of prompts has its rows split
            over its batch axes (and every process of a multi-host run must call this together).

    Returns:
        One `ExtractionAttempt` per prompt, in order.

    Raises:
        SettingsError: If the placement's batch axes do not divide `batch_size`.
    """
    if not prompts:
        return []
    placement.check_batch_size(batch_size, what="generation batch size")
    encoded = [tokenizer(p.prompt)["input_ids"] for p in prompts]
    width = 8 * math.ceil(max(len(ids) for ids in encoded) / 8)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    attempts = []
    for start in range(0, len(prompts), batch_size):
        chunk = encoded[start : start + batch_size]
        ids = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        ids[:, -1] = chunk[0][-1]  # rows beyond the chunk only fill the static batch
        mask[:, -1] = 1
        for row, tokens in enumerate(chunk):
            mask[row] = 0
            ids[row, width - len(tokens) :] = tokens
            mask[row, width - len(tokens) :] = 1
        generation = generate(
            model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
            placement=placement,
        )
        tokens = parallel.host_array(generation.tokens)
        lengths = parallel.host_array(generation.lengths)
        for row, record in enumerate(prompts[start : start + batch_size]):
            completion = tokenizer.decode(tokens[row, : lengths[row]], skip_special_tokens=True)
            attempts.append(
                ExtractionAttempt(
                    record.person_id,
                    record.field,
                    record.prompt,
                    record.expected_value,
                    completion,
                    record.expected_value in completion,
                )
            )
    return attempts


def extraction_recall(attempts: Sequence[ExtractionAttempt], /) -> float:
    """Reproduced values / attempted values (NaN when nothing was attempted)."""
    if not attempts:
        return float("nan")
    return sum(attempt.extracted for attempt in attempts) / len(attempts)
