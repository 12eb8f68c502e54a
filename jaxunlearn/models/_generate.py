"""Jitted autoregressive generation with a key-value cache, greedy or sampled."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.errors import SettingsError
from jaxunlearn.models._families import CausalLM
from jaxunlearn.models._layers import KVCache


class Generation(NamedTuple):
    """The tokens `generate` produced.

    Attributes:
        tokens: [batch, max_new_tokens] new token ids; after a sequence's end-of-sequence token
            (which is included) the rest of its row is `pad_token_id`.
        lengths: [batch] number of new tokens of each sequence, its end token included.
    """

    tokens: jax.Array
    lengths: jax.Array


def generate(
    model: CausalLM,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array | None = None,
    /,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    eos_token_id: int | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    placement: parallel.Placement = parallel.ONE_DEVICE,
) -> Generation:
    """Continues a batch of prompts, greedily or by temperature / top-k sampling.

    Prompts may be padded on either side; they are moved to the left internally, so the result
    does not depend on the padding side. Generation runs as one compiled `jax.lax.while_loop`
    that stops when every sequence has produced an end token or `max_new_tokens` are made.
    Adapters with dropout sample their masks unless `model.eval()` was called.

    Args:
        model: A model of any family (Llama, GPT-2, OPT), or an `EnsembleLM` of adapters on one.
        prompt_ids: [batch, length] prompt token ids.
        prompt_mask: [batch, length], 1 for real tokens and 0 for padding; `None` for no padding.
        max_new_tokens: The most tokens to add to each prompt.
        temperature: 0 for greedy decoding (argmax); above 0, logits are divided by it and
            sampled.
        top_k: When sampling, sample among the `top_k` most likely tokens only.
        key: PRNG key; required when `temperature > 0`.
        eos_token_id: End token id(s); defaults to the model config's. `()` never stops early.
        pad_token_id: Fill value after the end; defaults to the config's pad id, else 0.
        placement: Where `model` lives: on a mesh, the prompts, the key-value cache and the
            tokens have their rows split over its batch axes (and every process of a
            multi-host run must call this together, with the same prompts).

    Returns:
        The new tokens and their counts (on a mesh, split by rows like the prompts).

    Raises:
        SettingsError: On a `max_new_tokens` that is not a positive integer, a negative
            temperature, a `top_k` outside [1, vocab_size], or a prompt length plus
            `max_new_tokens` beyond the positions a learned position table covers, or a batch
            that the placement's batch axes do not divide.
        ValueError: On inconsistent shapes, an empty prompt, or sampling without a key.
    """
    config = model.config
    prompt_ids = jnp.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [batch, length>0], got shape {prompt_ids.shape}.")
    if prompt_mask is None:
        prompt_mask = jnp.ones(prompt_ids.shape, bool)
    prompt_mask = jnp.asarray(prompt_mask).astype(bool)
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"prompt_mask shape {prompt_mask.shape} differs from prompt_ids {prompt_ids.shape}."
        )
    if not isinstance(prompt_mask, jax.core.Tracer) and not np.all(np.any(prompt_mask, axis=1)):
        raise ValueError("Every prompt needs at least one real token (a mask row is all zeros).")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise SettingsError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    limit = config.context_limit
    if limit is not None and prompt_ids.shape[1] + max_new_tokens > limit:
        raise SettingsError(
            f"A prompt of length {prompt_ids.shape[1]} plus {max_new_tokens} new tokens exceeds "
            f"the {limit} positions of this model's learned position embeddings."
        )
    if temperature < 0:
        raise SettingsError(f"temperature must be >= 0, got {temperature}.")
    if temperature > 0 and key is None:
        raise ValueError("Sampling (temperature > 0) needs a PRNG key.")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise SettingsError(f"top_k must be in [1, {config.vocab_size}], got {top_k}.")
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    # A stable sort of the mask puts padding first and keeps the real tokens in order.
    order = jnp.argsort(prompt_mask, axis=1, stable=True)
    prompt_ids = jnp.take_along_axis(prompt_ids, order, axis=1)
    prompt_mask = jnp.take_along_axis(prompt_mask, order, axis=1)
    prompt_ids, prompt_mask = placement.rows((prompt_ids, prompt_mask))
    graphdef, state = nnx.split(model)
    with parallel.activations_on(placement):
        return _generate(
            graphdef,
            state,
            prompt_ids,
            prompt_mask,
            jax.random.key(0) if key is None else key,
            jnp.float32(temperature),
            max_new_tokens=max_new_tokens,
            greedy=temperature == 0,
            top_k=top_k,
            eos=eos,
            pad=pad_token_id,
        )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "eos", "pad")
)
def _generate(
    graphdef,
    state,
    prompt_ids,
    prompt_mask,
    key,
    temperature,
    *,
    max_new_tokens,
    greedy,
    top_k,
    eos,
    pad,
):
    model = nnx.merge(graphdef, state)
    batch, prompt_length = prompt_ids.shape
    capacity = prompt_length + max_new_tokens
    # A model that keeps several caches (an ensemble of adapters, one per member) makes its own.
    if hasattr(model, "init_cache"):
        cache = model.init_cache(batch_size=batch, capacity=capacity)
    else:
        cache = KVCache.init(model.config, batch_size=batch, capacity=capacity, dtype=model.dtype)
    # On a mesh (`activations_on`), each device keeps the cache rows of its own sequences.
    cache = _rows_split(cache)
    logits, cache = model(prompt_ids, prompt_mask, cache=cache)
    eos_ids = jnp.asarray(eos, jnp.int32)

    def choose(step, last_logits):
        if greedy:
            return jnp.argmax(last_logits, axis=-1).astype(jnp.int32)
        scaled = last_logits.astype(jnp.float32) / temperature
        if top_k is not None:
            kth_largest = jax.lax.top_k(scaled, top_k)[0][:, -1:]
            scaled = jnp.where(scaled < kth_largest, -jnp.inf, scaled)
        return jax.random.categorical(jax.random.fold_in(key, step), scaled).astype(jnp.int32)

    def keep_going(carry):
        step, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_token(carry):
        step, cache, last_logits, tokens, done = carry
        token = jnp.where(done, pad, choose(step, last_logits))
        tokens = tokens.at[:, step].set(token)
        done = done | jnp.isin(token, eos_ids)
        # The last step's forward pass is wasted; a cond around it would cost more than it saves.
        next_logits, cache = model(token[:, None], cache=cache)
        return step + 1, _rows_split(cache), next_logits[:, -1], tokens, done

    tokens = parallel.constrain_rows(jnp.full((batch, max_new_tokens), pad, jnp.int32))
    done = parallel.constrain_rows(jnp.zeros((batch,), bool))
    carry = (jnp.int32(0), cache, logits[:, -1], tokens, done)
    _, _, _, tokens, _ = jax.lax.while_loop(keep_going, one_token, carry)
    is_end = jnp.isin(tokens, eos_ids)
    first_end = jnp.where(jnp.any(is_end, axis=1), jnp.argmax(is_end, axis=1) + 1, max_new_tokens)
    return Generation(tokens=tokens, lengths=first_end.astype(jnp.int32))


def _rows_split(cache: KVCache | tuple[KVCache, ...]) -> KVCache | tuple[KVCache, ...]:
    """`cache` with the rows of its keys, values and mask split over the batch axes of the
    `activations_on` placement (unchanged outside one); a tuple of caches (one per ensemble
    member) has each of them split."""
    if not isinstance(cache, KVCache):
        return tuple(map(_rows_split, cache))
    return cache._replace(
        keys=tuple(map(parallel.constrain_rows, cache.keys)),
        values=tuple(map(parallel.constrain_rows, cache.values)),
        mask=parallel.constrain_rows(cache.mask),
    )
