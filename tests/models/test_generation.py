"""Generation with a key-value cache agrees with transformers' generate and the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_references import (
    left_padded_prompts,
    make_reference,
    padded_batch,
    reference_generate,
)

from jaxunlearn.errors import UserError
from jaxunlearn.models import generate, load

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("generation")
    reference = make_reference(directory, "gqa", seed=5)
    return load(directory), reference


def test_greedy_matches_transformers_generate(models):
    model, reference = models
    ids, mask = left_padded_prompts()
    never_stop = reference_generate(
        reference, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=None
    )
    ours = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=())
    assert never_stop.shape == (3, NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(ours.tokens), never_stop)
    np.testing.assert_array_equal(np.asarray(ours.lengths), [NEW_TOKENS] * 3)

    # Make the token row 0 emits at step 2 the end token: rows stop at different steps.
    eos = int(never_stop[0, 2])
    stopping = reference_generate(reference, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    ours = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    width = stopping.shape[1]
    np.testing.assert_array_equal(np.asarray(ours.tokens[:, :width]), stopping)
    assert np.all(np.asarray(ours.tokens[:, width:]) == 0)
    assert int(ours.lengths[0]) == 3
    assert np.all(np.asarray(ours.tokens[0, 3:]) == 0)


def test_padding_side_does_not_matter(models):
    model, _ = models
    ids, mask = padded_batch(seed=7, length=6)  # row 1 left-padded, row 2 right-padded
    left_ids, left_mask = left_padded_prompts()
    a = generate(model, ids, mask, max_new_tokens=4, eos_token_id=())
    b = generate(model, left_ids, left_mask, max_new_tokens=4, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_a_rematerialising_model_generates_the_same_tokens(models, tmp_path):
    """Remat only changes the backward pass; generation (no backward pass) must not trip on it."""
    model, _ = models
    directory = tmp_path / "remat"
    make_reference(directory, "gqa", seed=5)
    remat_model = load(directory, remat=True)
    ids, mask = left_padded_prompts()
    plain = generate(model, ids, mask, max_new_tokens=4, eos_token_id=())
    rematerialised = generate(remat_model, ids, mask, max_new_tokens=4, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(rematerialised.tokens), np.asarray(plain.tokens))


def test_sampling_respects_top_k_and_the_key(models):
    model, _ = models
    ids, mask = left_padded_prompts()
    key = jax.random.key(3)

    def sample(**kwargs):
        out = generate(model, ids, mask, max_new_tokens=6, eos_token_id=(), **kwargs)
        return np.asarray(out.tokens)

    greedy = sample()
    np.testing.assert_array_equal(sample(temperature=1.0, top_k=1, key=key), greedy)
    first = sample(temperature=2.0, top_k=5, key=key)
    np.testing.assert_array_equal(sample(temperature=2.0, top_k=5, key=key), first)
    assert not np.array_equal(sample(temperature=2.0, top_k=5, key=jax.random.key(4)), first)
    assert not np.array_equal(first, greedy)
    # Every sampled token is among the 5 most likely given its prefix (full forward, no cache).
    sequences = jnp.concatenate([jnp.asarray(ids), jnp.asarray(first)], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask), jnp.ones_like(first)], axis=1)
    logits = model(sequences, full_mask)[:, ids.shape[1] - 1 : -1]
    top5 = np.asarray(jax.lax.top_k(logits, 5)[1])
    assert np.all(np.any(top5 == first[..., None], axis=-1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=1.0), "PRNG key"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=1.0, top_k=0, key=jax.random.key(0)), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_generation_arguments(models, kwargs, message):
    model, _ = models
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match=message) as caught:
        generate(model, ids, mask, **{"max_new_tokens": 2, **kwargs})
    # Settings a user chooses are user errors; sampling without a key is a caller's bug.
    assert isinstance(caught.value, UserError) == (message != "PRNG key")


def test_empty_prompt_row_is_rejected(models):
    model, _ = models
    ids, mask = left_padded_prompts()
    mask[0] = 0
    with pytest.raises(ValueError, match="at least one real token"):
        generate(model, ids, mask, max_new_tokens=2)
