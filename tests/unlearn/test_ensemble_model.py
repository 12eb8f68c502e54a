"""An ensemble of LoRA adapters on one base model serves the renormalised mean of its members'
next-token log-probabilities, to the call, to evaluation and to generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from unlearn_fixtures import CONFIG, random_examples

from jaxunlearn.eval import score_examples
from jaxunlearn.models import GPT2Config, OPTConfig, add_lora, from_config, generate
from jaxunlearn.unlearn._ensemble_model import EnsembleLM, MemberLoRA

TINY_GPT2 = GPT2Config(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2)
TINY_OPT = OPTConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
FAMILIES = {
    "llama": (CONFIG, ("q_proj", "v_proj")),
    "gpt2": (TINY_GPT2, ("c_attn", "c_proj")),
    "opt": (TINY_OPT, ("q_proj", "fc1")),
}


def lora_model(family="llama", *, seed=0, rank=2, targets=None, dropout=0.0):
    """A tiny model of `family` whose adapters are as initialised (B = 0)."""
    config, default_targets = FAMILIES[family]
    return add_lora(
        from_config(config, key=jax.random.key(seed)),
        rank=rank,
        alpha=4.0,
        targets=targets or default_targets,
        key=jax.random.key(seed + 1),
        dropout=dropout,
    )


def random_member(model, seed):
    """A LoRA state of `model`'s structure with every A and B drawn at random (B non-zero, so
    members differ)."""
    lora = nnx.state(model, nnx.LoRAParam)
    leaves, structure = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        structure,
        [0.5 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)],
    )


def member_logits(model, member, input_ids, attention_mask=None):
    """float64 logits of a clone of `model` holding `member`'s LoRA (the model is untouched)."""
    clone = nnx.clone(model)
    nnx.update(clone, member)
    return np.asarray(clone(input_ids, attention_mask), np.float64)


def log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference_log_probs(model, members, input_ids, attention_mask=None):
    """The ensemble rule computed in float64 from each member's own forward pass."""
    logits = [member_logits(model, m, input_ids, attention_mask) for m in members]
    return log_softmax(np.mean([log_softmax(x) for x in logits], axis=0)), logits


def batch_of_prompts():
    """Two rows of 6 tokens, the second left-padded by two."""
    ids = np.asarray([[5, 9, 3, 17, 30, 11], [0, 0, 8, 21, 4, 26]], np.int32)
    mask = np.asarray([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def test_one_member_equal_to_the_model_serves_the_model():
    model = lora_model()
    nnx.update(model, random_member(model, seed=7))
    ensemble = EnsembleLM(model, [nnx.state(model, nnx.LoRAParam)])
    ids, mask = batch_of_prompts()
    out = ensemble(ids, mask)
    assert ensemble.num_members == 1
    assert out.shape == (2, 6, CONFIG.vocab_size)
    assert out.dtype == jnp.float32
    expected = np.asarray(jax.nn.log_softmax(model(ids, mask), axis=-1))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("num_members", [2, 3])
def test_members_combine_as_the_renormalised_mean_of_log_probs(family, num_members):
    model = lora_model(family)
    members = [random_member(model, seed=10 + k) for k in range(num_members)]
    ensemble = EnsembleLM(model, members)
    ids, mask = batch_of_prompts()
    out = np.asarray(ensemble(ids, mask), np.float64)
    expected, logits = reference_log_probs(model, members, ids, mask)
    # The members really differ, so the ensemble is not any one of them.
    assert np.abs(logits[0] - logits[1]).max() > 1e-2
    assert np.abs(out - log_softmax(logits[0])).max() > 1e-3
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    # The same rule as a normalised geometric mean: log_softmax of the mean logits.
    np.testing.assert_allclose(out, log_softmax(np.mean(logits, axis=0)), rtol=0, atol=1e-5)
    # Split and merged inside jit (as evaluation and generation use it), it computes the same.
    graphdef, state = nnx.split(ensemble)
    jitted = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    np.testing.assert_allclose(np.asarray(jitted(state, ids, mask)), out, rtol=0, atol=2e-6)


def test_score_examples_sees_the_ensemble_distribution():
    model = lora_model()
    members = [random_member(model, seed=20 + k) for k in range(3)]
    ensemble = EnsembleLM(model, members)
    _, data = random_examples(5, seed=3)
    scores = score_examples(ensemble, data, batch_size=2)
    batch = data.batch(np.arange(len(data)), batch_size=len(data))
    log_probs, _ = reference_log_probs(
        model, members, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
    )
    token = np.take_along_axis(log_probs[:, :-1], batch.input_ids[:, 1:, None], axis=-1)[..., 0]
    weights = batch.loss_mask[:, 1:] > 0
    expected = -np.where(weights, token, 0.0).sum(axis=-1) / weights.sum(axis=-1)
    np.testing.assert_allclose(scores.losses, expected, rtol=1e-5, atol=0)
    # Scoring under one member alone gives other losses: the check can tell them apart.
    single = EnsembleLM(model, members[:1])
    assert np.abs(score_examples(single, data, batch_size=2).losses - expected).max() > 1e-3


def test_greedy_generation_matches_the_uncached_ensemble():
    model = lora_model()
    ensemble = EnsembleLM(model, [random_member(model, seed=30 + k) for k in range(3)])
    ids, mask = batch_of_prompts()
    new_tokens = 5
    out = generate(ensemble, ids, mask, max_new_tokens=new_tokens, eos_token_id=())
    # Greedy decoding by hand: the full forward pass of the sequence so far, no cache.
    sequence, sequence_mask = ids, mask
    expected = []
    for _ in range(new_tokens):
        token = jnp.argmax(ensemble(sequence, sequence_mask)[:, -1], axis=-1).astype(jnp.int32)
        expected.append(np.asarray(token))
        sequence = jnp.concatenate([sequence, token[:, None]], axis=1)
        sequence_mask = jnp.concatenate([sequence_mask, jnp.ones_like(token[:, None])], axis=1)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.stack(expected, axis=1))
    np.testing.assert_array_equal(np.asarray(out.lengths), [new_tokens] * 2)


def test_identical_members_generate_what_the_model_generates():
    model = lora_model()
    nnx.update(model, random_member(model, seed=40))
    own = nnx.state(model, nnx.LoRAParam)
    ensemble = EnsembleLM(model, [own, own, own])
    ids, mask = batch_of_prompts()
    single = generate(model, ids, mask, max_new_tokens=6, eos_token_id=())
    served = generate(ensemble, ids, mask, max_new_tokens=6, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(served.tokens), np.asarray(single.tokens))
    # Another adapter generates something else, so the comparison above can fail.
    other = EnsembleLM(model, [random_member(model, seed=41)])
    different = generate(other, ids, mask, max_new_tokens=6, eos_token_id=())
    assert not np.array_equal(np.asarray(different.tokens), np.asarray(single.tokens))


def test_members_follow_the_models_dropout_mode():
    model = lora_model(dropout=0.5)
    members = [random_member(model, seed=50 + k) for k in range(2)]
    ensemble = EnsembleLM(model, members)
    ids, mask = batch_of_prompts()
    # In training mode the adapters draw dropout masks, and the streams advance between calls.
    assert np.abs(np.asarray(ensemble(ids, mask)) - np.asarray(ensemble(ids, mask))).max() > 1e-4
    evaluation = nnx.view(ensemble, deterministic=True, raise_if_not_found=False)
    reference_model = nnx.view(model, deterministic=True, raise_if_not_found=False)
    expected, _ = reference_log_probs(reference_model, members, ids, mask)
    np.testing.assert_allclose(np.asarray(evaluation(ids, mask)), expected, rtol=0, atol=1e-5)


def test_bad_members_are_refused():
    model = lora_model(rank=2)
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleLM(model, [])
    wider = nnx.state(lora_model(rank=3), nnx.LoRAParam)
    with pytest.raises(ValueError, match=r"member 1's .*lora_a has shape \(16, 3\)"):
        EnsembleLM(model, [random_member(model, 0), wider])
    elsewhere = nnx.state(lora_model(targets=("q_proj", "k_proj")), nnx.LoRAParam)
    with pytest.raises(ValueError, match=r"member 0's .*structure: missing .*v_proj"):
        EnsembleLM(model, [elsewhere])
    halved = jax.tree.map(lambda x: x.astype(jnp.float16), random_member(model, 0))
    with pytest.raises(ValueError, match="dtype float16"):
        EnsembleLM(model, [halved])
    with pytest.raises(ValueError, match="must be a LoRA state"):
        EnsembleLM(model, [jnp.zeros(3)])
    with pytest.raises(ValueError, match="no LoRA parameters"):
        EnsembleLM(from_config(CONFIG, key=jax.random.key(0)), [random_member(model, 0)])


def test_a_cache_for_another_number_of_members_is_refused():
    model = lora_model()
    ensemble = EnsembleLM(model, [random_member(model, k) for k in range(2)])
    caches = ensemble.init_cache(batch_size=2, capacity=8)
    assert len(caches) == 2
    ids, mask = batch_of_prompts()
    with pytest.raises(ValueError, match=r"tuple of 2 KVCaches .*got 1\."):
        ensemble(ids, mask, cache=caches[:1])
    with pytest.raises(ValueError, match="got one KVCache"):
        ensemble(ids, mask, cache=caches[0])


def test_the_base_is_held_once():
    model = lora_model()
    ensemble = EnsembleLM(model, [random_member(model, seed=60 + k) for k in range(3)])
    base_filter = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    base = jax.tree.leaves(nnx.state(model, base_filter))
    held = jax.tree.leaves(nnx.state(ensemble, base_filter))
    assert len(held) == len(base) > 0
    # The very arrays of the model, not copies.
    assert all(a is b for a, b in zip(held, base, strict=True))
    # The members are stacked into one array per LoRA array, none of them a parameter.
    lora = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    stacked = jax.tree.leaves(nnx.state(ensemble, MemberLoRA))
    assert [x.shape for x in stacked] == [(3, *x.shape) for x in lora]
    assert len(jax.tree.leaves(nnx.state(ensemble, nnx.LoRAParam))) == len(lora)
    # split / merge round-trips the whole ensemble.
    restored = nnx.merge(*nnx.split(ensemble))
    assert isinstance(restored, EnsembleLM)
    assert restored.num_members == 3
    ids, mask = batch_of_prompts()
    np.testing.assert_array_equal(np.asarray(restored(ids, mask)), np.asarray(ensemble(ids, mask)))
