"""Per-example scores of a model on a dataset: the loss and the Min-K% membership scores.

Every score looks only at the response tokens, end-of-sequence token included: exactly the
tokens that `jaxunlearn.batch.example_losses` scores, so the loss here is the training
objective L(z). Scores are kept per example (metrics.md) so that aggregates and attacks can be
recomputed offline.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.batch import token_log_probs
from jaxunlearn.data import TokenizedDataset
from jaxunlearn.eval._forward import eval_split, length_sorted_batches


class ExampleScores(NamedTuple):
    """Scores of every example of a dataset, in dataset order.

    Attributes:
        ids: The example ids; position i of every array belongs to `ids[i]`.
        losses: float64 [N], ℓ: the mean negative log-likelihood of the response tokens.
        token_counts: int64 [N], the number of response tokens scored (EOS included).
        min_k: float64 [N], Min-K%: the mean of the lowest ⌊k·n⌋ (at least 1) response-token
            log-probabilities; higher means more likely a training member.
        min_k_plus_plus: float64 [N], Min-K%++: the same mean over the standardized
            log-probabilities z_t = (log p(x_t) − μ_t) / σ_t; NaN where a predicted distribution
            is a single certain token (σ_t = 0), for which z_t is undefined.
    """

    ids: list[str]
    losses: np.ndarray
    token_counts: np.ndarray
    min_k: np.ndarray
    min_k_plus_plus: np.ndarray


def min_k_mean(values: np.ndarray, mask: np.ndarray, /, *, k: float = 0.4) -> np.ndarray:
    """The mean of the lowest ⌊k·n⌋ (at least 1) of the n masked values along the last axis.

    This is the pooling of Min-K% (arXiv 2310.16789) and Min-K%++ (arXiv 2404.02936): the count
    is `max(1, floor(k * n))` computed in float64, as the reference code's
    `int(len(scores) * k)`.

    Args:
        values: [..., T] per-token scores.
        mask: [..., T], true where a value counts (a response token).
        k: The fraction of values kept, in (0, 1].

    Returns:
        float64 [...]; NaN for a row where a masked value is NaN.

    Raises:
        ValueError: If `k` is outside (0, 1], the shapes differ, or a row has no masked value.
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k!r}.")
    values = np.asarray(values, np.float64)
    mask = np.asarray(mask).astype(bool)
    if values.shape != mask.shape:
        raise ValueError(f"values shape {values.shape} differs from mask shape {mask.shape}.")
    counts = mask.sum(axis=-1)
    if np.any(counts == 0):
        raise ValueError("A row has no masked value; Min-K% needs at least one scored token.")
    kept = np.maximum(np.floor(k * counts), 1.0)
    # Unmasked positions sort last, so the lowest `kept` entries are all masked values.
    lowest = np.sort(np.where(mask, values, np.inf), axis=-1)
    taken = np.arange(values.shape[-1]) < kept[..., None]
    means = np.where(taken, lowest, 0.0).sum(axis=-1) / kept
    # np.sort moves NaN to the end, where it would be silently skipped: report it instead.
    return np.where(np.any(mask & np.isnan(values), axis=-1), np.nan, means)


def score_examples(
    model: nnx.Module,
    data: TokenizedDataset,
    /,
    *,
    batch_size: int = 32,
    k: float = 0.4,
    placement: parallel.Placement = parallel.ONE_DEVICE,
) -> ExampleScores:
    """Scores every example of `data` under `model`, with dropout off.

    Examples are batched in order of length (few bucket shapes, little padding); the jitted
    forward pass compiles once per bucket length and is reused by later calls. Token
    log-probabilities are computed in float32 and pooled in float64.

    Args:
        model: A causal LM called as `model(input_ids, attention_mask)`; its mode (dropout on or
            off) is not changed.
        data: The tokenized examples.
        batch_size: Rows per forward pass; the last batch is padded to it.
        k: The fraction of response tokens Min-K% and Min-K%++ average over (0.4 as MUSE).
        placement: Where `model` lives: on a mesh, each batch's rows are split over its batch
            axes (and every process of a multi-host run must call this together).

    Returns:
        The `ExampleScores` of every example, in dataset order.

    Raises:
        ValueError: If `batch_size` is not a positive integer or `k` is outside (0, 1].
        SettingsError: If the placement's batch axes do not divide `batch_size`.
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k!r}.")
    placement.check_batch_size(batch_size, what="evaluation batch size")
    graphdef, state = eval_split(model)
    size = len(data)
    losses, min_k, min_k_plus_plus = (np.full(size, np.nan) for _ in range(3))
    token_counts = np.zeros(size, np.int64)
    for indices, batch in length_sorted_batches(data, batch_size):
        placed = placement.batch(batch)
        with parallel.activations_on(placement):
            log_probs, standardized = _token_scores(
                state, placed.input_ids, placed.attention_mask, graphdef=graphdef
            )
        real = len(indices)
        # Token t is predicted from the positions before it: log-prob column t−1 scores it.
        mask = batch.loss_mask[:real, 1:] > 0
        log_probs = parallel.host_array(log_probs).astype(np.float64)[:real]
        standardized = parallel.host_array(standardized)[:real]
        counts = mask.sum(axis=-1)
        token_counts[indices] = counts
        losses[indices] = -np.where(mask, log_probs, 0.0).sum(axis=-1) / counts
        min_k[indices] = min_k_mean(log_probs, mask, k=k)
        min_k_plus_plus[indices] = min_k_mean(standardized, mask, k=k)
    return ExampleScores(list(data.ids), losses, token_counts, min_k, min_k_plus_plus)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_scores(
    state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array, *, graphdef: nnx.GraphDef
) -> tuple[jax.Array, jax.Array]:
    """float32 [B, T−1] log p(x_t) and its Min-K%++ standardization z_t, for t = 1..T−1."""
    model = nnx.merge(graphdef, state)
    logits = model(input_ids, attention_mask)
    token = token_log_probs(logits, input_ids)
    # z_t is unchanged when every log p(v) moves by the same log-normalizer, so it is computed
    # from max-shifted logits: of order the logit spread instead of log V, they lose far less
    # to cancellation in log p(x_t) − μ_t when the distribution is flat and σ_t small.
    logits = logits[:, :-1].astype(jnp.float32)
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    probs = jax.nn.softmax(shifted, axis=-1)
    mean = jnp.sum(probs * shifted, axis=-1)
    # E[(s − μ)²] rather than E[s²] − μ², which cancels in float32.
    variance = jnp.sum(probs * jnp.square(shifted - mean[..., None]), axis=-1)
    token_shifted = jnp.take_along_axis(shifted, input_ids[:, 1:, None], axis=-1)[..., 0]
    return token, (token_shifted - mean) / jnp.sqrt(variance)
