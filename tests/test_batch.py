"""The shared objective: mean response-token NLL per example, mean over real examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.batch import Batch, example_losses, mean_loss, token_log_probs


def make_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    attention_mask = np.array([[1] * 7, [1] * 5 + [0] * 2, [0] * 7], np.int32)
    loss_mask = np.array(
        [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0], [0] * 7], np.float32
    )  # row 0: prompt of 3 tokens; row 1: prompt of 2, then padding; row 2: a padding row
    example_mask = np.array([True, True, False])
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    return logits, Batch(input_ids, attention_mask, loss_mask, example_mask)


def reference_losses(logits, batch):
    losses = []
    for row in range(logits.shape[0]):
        nll = []
        for t in range(1, logits.shape[1]):
            if batch.loss_mask[row, t]:
                z = logits[row, t - 1].astype(np.float64)
                log_norm = np.log(np.sum(np.exp(z - z.max()))) + z.max()
                nll.append(log_norm - z[batch.input_ids[row, t]])
        losses.append(np.mean(nll) if nll and batch.example_mask[row] else 0.0)
    return np.array(losses)


def test_example_losses_score_only_response_tokens():
    logits, batch = make_batch()
    expected = reference_losses(logits, batch)
    np.testing.assert_allclose(np.asarray(example_losses(logits, batch)), expected, rtol=1e-5)
    assert float(mean_loss(logits, batch)) == pytest.approx(expected[:2].mean(), rel=1e-5)


def test_prompt_tokens_do_not_affect_the_loss_gradient_of_their_logits():
    logits, batch = make_batch(1)
    gradient = jax.grad(lambda z: mean_loss(z, batch))(jnp.asarray(logits))
    # Position t−1 predicts token t: only positions before a scored token get a gradient.
    scored = np.zeros(batch.loss_mask.shape, bool)
    scored[:, :-1] = batch.loss_mask[:, 1:] > 0
    assert np.all(np.asarray(gradient)[~scored] == 0)
    assert np.all(np.abs(np.asarray(gradient)[scored]).sum(axis=-1) > 0)


def test_token_log_probs_are_normalized_log_probabilities():
    logits, batch = make_batch(2)
    values = np.asarray(token_log_probs(jnp.asarray(logits), jnp.asarray(batch.input_ids)))
    assert values.shape == (3, 6)
    assert np.all(values <= 0)
