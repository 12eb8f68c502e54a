"""How far a model's next-token distributions are from a reference model's, per example."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.data import TokenizedDataset
from jaxunlearn.eval._forward import eval_split, length_sorted_batches


def next_token_kl(
    reference_model: nnx.Module,
    model: nnx.Module,
    data: TokenizedDataset,
    /,
    *,
    batch_size: int = 32,
    placement: parallel.Placement = parallel.ONE_DEVICE,
) -> np.ndarray:
    """Per example, the mean KL(p_reference ‖ p_model) of the next-token distributions.

    The mean runs over the positions the loss scores: the predictions of the response tokens,
    end-of-sequence token included. Each KL is over the whole vocabulary, from float32
    log-softmaxes; both models run with dropout off and keep their own mode. Used with the
    retrained model as the reference, this is the distance to retrain of metrics.md.

    Args:
        reference_model: The model whose distributions are the reference (p in KL(p ‖ q)).
        model: The model compared with it; it must share the reference's vocabulary.
        data: The tokenized examples.
        batch_size: Rows per forward pass; the last batch is padded to it.
        placement: Where both models live: on a mesh, each batch's rows are split over its
            batch axes (and every process of a multi-host run must call this together).

    Returns:
        float64 [N], in dataset order; 0 where the models agree. The float32 log-probabilities
        put an absolute error of about 1e-7 · |log p| on each value (~1e-6 for typical
        vocabularies), which can leave nearly identical distributions a hair below 0.

    Raises:
        ValueError: If `batch_size` is not a positive integer or the vocabularies differ.
        SettingsError: If the placement's batch axes do not divide `batch_size`.
    """
    placement.check_batch_size(batch_size, what="evaluation batch size")
    reference_graphdef, reference_state = eval_split(reference_model)
    graphdef, state = eval_split(model)
    divergences = np.full(len(data), np.nan)
    for indices, batch in length_sorted_batches(data, batch_size):
        placed = placement.batch(batch)
        with parallel.activations_on(placement):
            token_kl = _token_kl(
                reference_state,
                state,
                placed.input_ids,
                placed.attention_mask,
                reference_graphdef=reference_graphdef,
                graphdef=graphdef,
            )
        real = len(indices)
        mask = batch.loss_mask[:real, 1:] > 0
        token_kl = parallel.host_array(token_kl).astype(np.float64)[:real]
        divergences[indices] = np.where(mask, token_kl, 0.0).sum(axis=-1) / mask.sum(axis=-1)
    return divergences


@functools.partial(jax.jit, static_argnames=("reference_graphdef", "graphdef"))
def _token_kl(
    reference_state: nnx.State,
    state: nnx.State,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    reference_graphdef: nnx.GraphDef,
    graphdef: nnx.GraphDef,
) -> jax.Array:
    """float32 [B, T−1]: KL(p_reference ‖ p_model) of the prediction of token t, t = 1..T−1."""
    reference_logits = nnx.merge(reference_graphdef, reference_state)(input_ids, attention_mask)
    logits = nnx.merge(graphdef, state)(input_ids, attention_mask)
    if reference_logits.shape != logits.shape:
        raise ValueError(
            f"The models' logits differ in shape: {reference_logits.shape} for the reference, "
            f"{logits.shape} for the model; they need one vocabulary."
        )
    reference_log_probs = jax.nn.log_softmax(reference_logits[:, :-1].astype(jnp.float32), -1)
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return jnp.sum(jnp.exp(reference_log_probs) * (reference_log_probs - log_probs), axis=-1)
