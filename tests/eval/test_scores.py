"""Per-example scores: the loss, Min-K% and Min-K%++, batched by length but in dataset order."""

import jax
import numpy as np
import pytest
from eval_fixtures import (
    example_logits,
    random_dataset,
    response_predictions,
    tiny_lora_model,
)

from jaxunlearn.batch import example_losses
from jaxunlearn.eval import min_k_mean, score_examples

NUM_EXAMPLES = 7
K = 0.4


@pytest.fixture(scope="module")
def model():
    return tiny_lora_model(seed=0)


@pytest.fixture(scope="module")
def data():
    return random_dataset(NUM_EXAMPLES, seed=1)


@pytest.fixture(scope="module")
def scores(model, data):
    return score_examples(model, data, batch_size=3, k=K)


def _reference_min_k(values: np.ndarray, k: float) -> float:
    """Min-K% pooling written out as in the paper's code, for one example."""
    kept = max(1, int(len(values) * k))
    return float(np.mean(np.sort(values)[:kept]))


def test_the_data_is_not_in_length_order(data):
    # The order tests below would pass trivially otherwise.
    assert np.any(np.diff(data.lengths) < 0)
    assert len({data.bucket_length([i]) for i in range(len(data))}) > 1


def test_losses_are_the_training_objective_in_dataset_order(model, data, scores):
    assert scores.ids == data.ids
    assert scores.losses.dtype == np.float64
    for index in range(len(data)):
        logits, batch = example_logits(model, data, index)
        expected = float(example_losses(logits[None], batch)[0])
        # Both sum the same float32 log-probs; only the accumulation precision differs.
        np.testing.assert_allclose(scores.losses[index], expected, rtol=1e-6)
    np.testing.assert_array_equal(scores.token_counts, data.lengths - data.prompt_lengths)


def test_losses_match_a_float64_recomputation_from_the_logits(model, data, scores):
    for index in range(len(data)):
        log_probs, targets = response_predictions(model, data, index)
        expected = -np.mean(log_probs[np.arange(len(targets)), targets])
        # float32 log-softmax against float64 on the same logits: ~1e-7 relative error.
        np.testing.assert_allclose(scores.losses[index], expected, rtol=1e-6)


def test_min_k_scores_match_a_float64_recomputation_from_the_logits(model, data, scores):
    for index in range(len(data)):
        log_probs, targets = response_predictions(model, data, index)
        token = log_probs[np.arange(len(targets)), targets]
        probs = np.exp(log_probs)
        mean = np.sum(probs * log_probs, axis=-1)
        std = np.sqrt(np.sum(probs * log_probs**2, axis=-1) - mean**2)
        np.testing.assert_allclose(scores.min_k[index], _reference_min_k(token, K), rtol=1e-6)
        # z_t divides float32 rounding of the logits by σ_t ≈ 0.1 for this nearly uniform model.
        np.testing.assert_allclose(
            scores.min_k_plus_plus[index], _reference_min_k((token - mean) / std, K), rtol=1e-5
        )


def test_padding_rows_do_not_change_scores(model, data):
    # One batch of the 7 examples either way, so the only difference is 9 rows of padding.
    exact = score_examples(model, data, batch_size=len(data), k=K)
    padded = score_examples(model, data, batch_size=16, k=K)
    for name in ("losses", "token_counts", "min_k", "min_k_plus_plus"):
        np.testing.assert_array_equal(getattr(padded, name), getattr(exact, name))


def test_batch_size_changes_scores_only_by_float32_rounding(model, data, scores):
    # One example per batch: other bucket lengths, so XLA may sum in another order.
    single = score_examples(model, data, batch_size=1, k=K)
    assert single.ids == scores.ids
    np.testing.assert_array_equal(single.token_counts, scores.token_counts)
    np.testing.assert_allclose(single.losses, scores.losses, rtol=1e-6)
    np.testing.assert_allclose(single.min_k, scores.min_k, rtol=1e-6)
    # z_t divides logit rounding by σ_t ≈ 0.1 (the random model is nearly uniform): 10× more.
    np.testing.assert_allclose(single.min_k_plus_plus, scores.min_k_plus_plus, rtol=1e-5)


def test_scores_use_eval_mode_without_changing_the_model():
    data = random_dataset(4, seed=2)
    model = tiny_lora_model(seed=3, dropout=0.5)
    dropout = model.model.layers[0].self_attn.q_proj.dropout
    assert not dropout.deterministic  # training mode: dropout on
    first = score_examples(model, data, batch_size=4)
    second = score_examples(model, data, batch_size=4)
    assert not dropout.deterministic
    np.testing.assert_array_equal(first.losses, second.losses)
    model.eval()
    np.testing.assert_array_equal(score_examples(model, data, batch_size=4).losses, first.losses)


def test_later_calls_reuse_the_compiled_forward_pass(data):
    score_examples(tiny_lora_model(seed=4), data, batch_size=3)
    events = []

    def record(event, duration, **kwargs):
        if event.startswith("/jax/core/compile/"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        # Other weights of the same architecture: same graphdef and shapes, no new trace.
        score_examples(tiny_lora_model(seed=5), data, batch_size=3)
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    assert events == []


def test_min_k_mean_by_hand():
    values = np.array(
        [
            [-1.0, -5.0, -3.0, -2.0, -4.0],  # 5 tokens: the lowest ⌊0.4·5⌋ = 2 are −5, −4
            [-9.0, -1.0, -2.0, -0.5, -7.0],  # masked to −1, −2: ⌊0.8⌋ = 0 → the lowest 1
            [-1.0, -2.0, -3.0, -4.0, np.nan],  # masked NaN is not scored
        ]
    )
    mask = np.array(
        [
            [1, 1, 1, 1, 1],
            [0, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
        ]
    )
    np.testing.assert_array_equal(min_k_mean(values, mask, k=0.4), [-4.5, -2.0, -4.0])
    # ⌊0.5·4⌋ = 2 lowest of row three: −4 and −3; k = 1 averages every masked value.
    np.testing.assert_array_equal(min_k_mean(values[2], mask[2], k=0.5), -3.5)
    np.testing.assert_array_equal(min_k_mean(values[2], mask[2], k=1.0), -2.5)


def test_min_k_mean_reports_nan_and_rejects_bad_input():
    values = np.array([[-1.0, np.nan, -3.0]])
    assert np.isnan(min_k_mean(values, np.ones((1, 3)), k=0.4)[0])
    with pytest.raises(ValueError, match="k must be"):
        min_k_mean(values, np.ones((1, 3)), k=0.0)
    with pytest.raises(ValueError, match="k must be"):
        min_k_mean(values, np.ones((1, 3)), k=1.5)
    with pytest.raises(ValueError, match="no masked value"):
        min_k_mean(values, np.zeros((1, 3)), k=0.4)
    with pytest.raises(ValueError, match="shape"):
        min_k_mean(values, np.ones((1, 2)), k=0.4)


def test_bad_settings_are_rejected(model, data):
    with pytest.raises(ValueError, match="batch_size"):
        score_examples(model, data, batch_size=0)
    with pytest.raises(ValueError, match="k must be"):
        score_examples(model, data, k=0.0)
