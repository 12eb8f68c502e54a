"""Next-token log-probabilities over chunks of the vocabulary, and the objective built on them."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multi_device import run_report
from output_head_cases import CHUNK, derivatives, tiny_batch, tiny_lora_model
from scipy.special import log_softmax
from tiny_assets import TINY_CONFIG

from jaxunlearn.batch import mean_loss, model_mean_loss
from jaxunlearn.models import OutputHead

HERE = os.path.dirname(os.path.abspath(__file__))

VOCAB, WIDTH, ROWS, LENGTH = 96, 8, 3, 7


def reference_log_probs(weight, hidden, input_ids, vocab_axis):
    """float64 numpy: log-softmax of the whole logits, read at the next tokens."""
    table = weight if vocab_axis == 0 else weight.T
    log_probs = log_softmax(hidden[:, :-1] @ table.T, axis=-1)
    return np.take_along_axis(log_probs, input_ids[:, 1:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("vocab_axis", [0, 1])
# 1: a chunk per token; 17, 40: the last chunk slides back over columns already counted;
# 32: chunks that divide the vocabulary; 95: one chunk and one column; 96 and None: whole.
@pytest.mark.parametrize("chunk", [1, 17, 32, 40, 95, 96, None])
def test_chunked_log_probs_are_the_log_softmax_at_the_next_token(vocab_axis, chunk):
    rng = np.random.default_rng(0)
    shape = (VOCAB, WIDTH) if vocab_axis == 0 else (WIDTH, VOCAB)
    weight = rng.normal(size=shape)
    hidden = 3 * rng.normal(size=(ROWS, LENGTH, WIDTH))
    input_ids = rng.integers(0, VOCAB, size=(ROWS, LENGTH))
    with jax.enable_x64(True):
        head = OutputHead(jnp.asarray(weight), vocab_axis=vocab_axis, chunk=chunk)
        got = head.next_token_log_probs(jnp.asarray(hidden), jnp.asarray(input_ids))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(
            np.asarray(got), reference_log_probs(weight, hidden, input_ids, vocab_axis), rtol=1e-12
        )


def test_chunked_log_probs_are_float32_for_a_bfloat16_head_and_match_its_whole_logits():
    rng = np.random.default_rng(1)
    weight = jnp.asarray(rng.normal(size=(VOCAB, WIDTH)), jnp.bfloat16)
    hidden = jnp.asarray(rng.normal(size=(ROWS, LENGTH, WIDTH)), jnp.bfloat16)
    input_ids = jnp.asarray(rng.integers(0, VOCAB, size=(ROWS, LENGTH)))
    whole = OutputHead(weight, vocab_axis=0, chunk=None).next_token_log_probs(hidden, input_ids)
    chunked = OutputHead(weight, vocab_axis=0, chunk=40).next_token_log_probs(hidden, input_ids)
    assert chunked.dtype == jnp.float32
    # Both round the logits to bfloat16 and sum in float32: only the order of the sums differs.
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"vocab_axis": 2}, "vocab_axis must be 0 or 1"),
        ({"vocab_axis": 0, "chunk": 0}, "chunk must be a positive width or None"),
        ({"vocab_axis": 0, "chunk": 2.5}, "chunk must be a positive width or None"),
    ],
)
def test_an_output_head_refuses_bad_settings(arguments, message):
    with pytest.raises(ValueError, match=message):
        OutputHead(jnp.zeros((4, 2)), **arguments)


# The chunks' derivatives go through one loop for both layouts (their values for both are
# checked above): the untied case runs with -m slow.
@pytest.mark.parametrize(
    "tied", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["tied", "untied"]
)
def test_the_objective_over_vocabulary_chunks_has_the_whole_objectives_derivatives(tied):
    batch = tiny_batch(TINY_CONFIG.vocab_size)
    whole_model = tiny_lora_model(tied, None)
    # The loss the objective computes over chunks is the loss of the model's logits.
    chunked_model = tiny_lora_model(tied, CHUNK)
    logits = whole_model(batch.input_ids, batch.attention_mask)
    np.testing.assert_allclose(
        model_mean_loss(chunked_model, batch), mean_loss(logits, batch), rtol=1e-6
    )
    whole = derivatives(whole_model, batch)
    chunked = derivatives(chunked_model, batch)
    for name, value in whole.items():
        for got, want in zip(jax.tree.leaves(chunked[name]), jax.tree.leaves(value), strict=True):
            scale = float(jnp.max(jnp.abs(want)))
            assert scale > 0, name
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=name)


@pytest.mark.multi_device
def test_on_a_mesh_splitting_the_vocabulary_each_device_reads_only_its_own_rows():
    report = run_report(os.path.join(HERE, "vocab_shards.py"))
    # The tied table's 512 rows split over tensor=2, so chunks are cut within each half.
    assert report["chunked_vocab_splits"] == 2
    for name in ("whole", "chunked"):
        for key, difference in report[f"{name}_max_difference"].items():
            assert difference < 1e-5, (name, key, difference)
    # Slicing the split axis itself would gather the whole table onto every device.
    assert report["chunked_gathered_head_rows"] < report["vocab"], report
