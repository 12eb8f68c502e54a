"""Next-token KL between a reference model and a model, per example."""

import numpy as np
import pytest
from eval_fixtures import random_dataset, response_predictions, tiny_lora_model, tiny_model

from jaxunlearn.eval import next_token_kl


@pytest.fixture(scope="module")
def data():
    return random_dataset(6, seed=7)


def test_identical_models_have_zero_divergence(data):
    model = tiny_lora_model(seed=0)
    np.testing.assert_array_equal(next_token_kl(model, model, data, batch_size=8), 0.0)
    same_weights = tiny_lora_model(seed=0)
    np.testing.assert_array_equal(next_token_kl(model, same_weights, data, batch_size=8), 0.0)


def test_divergence_matches_a_float64_recomputation(data):
    # A LoRA model against a plain one: the two graphdefs differ.
    reference, model = tiny_lora_model(seed=0), tiny_model(seed=1)
    divergences = next_token_kl(reference, model, data, batch_size=4)
    assert divergences.shape == (len(data),)
    assert divergences.dtype == np.float64
    for index in range(len(data)):
        reference_log_probs, _ = response_predictions(reference, data, index)
        log_probs, _ = response_predictions(model, data, index)
        # KL is not symmetric, so this also checks which model is the reference.
        token_kl = np.sum(np.exp(reference_log_probs) * (reference_log_probs - log_probs), -1)
        # Each float32 log-prob (≈ −log 64 ≈ −4) is off by ~eps32 · 4 ≈ 5e-7, absolutely.
        np.testing.assert_allclose(divergences[index], np.mean(token_kl), rtol=0, atol=1e-6)
    assert np.all(divergences > 0)
