"""Building blocks every model family shares: projections, LayerNorm, masked cached attention,
and the forward pass of a causal LM around a family's decoder.

The decoder families differ in their layers (norms, MLPs, position encodings) but not in how a
batch with padding and a key-value cache is attended over; that logic lives here once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn import parallel
from jaxunlearn.errors import SettingsError
from jaxunlearn.models._output_head import VOCAB_CHUNK, OutputHead

# transformers initialises every weight matrix with N(0, initializer_range = 0.02).
INIT_STDDEV = 0.02

# transformers' `ACT2FN` names of the activations the families use, as JAX functions.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    # GPT-2's "gelu_new" is the tanh approximation; "gelu_pytorch_tanh" computes the same.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


class CacheShape(Protocol):
    """What `KVCache.init` reads from a config (every family's config has these)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class KVCache(NamedTuple):
    """Keys and values of the tokens seen so far, in a fixed number of slots.

    Attributes:
        keys: One [batch, capacity, kv_heads, head_dim] array per layer.
        values: One [batch, capacity, kv_heads, head_dim] array per layer.
        mask: [batch, capacity] booleans: which slots hold a real (non-padding) token.
        index: Scalar int32: the slot the next token is written to.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(
        cls, config: CacheShape, /, *, batch_size: int, capacity: int, dtype: jnp.dtype
    ) -> KVCache:
        """Returns an empty cache with room for `capacity` tokens per sequence."""
        shape = (batch_size, capacity, config.num_kv_heads, config.head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            mask=jnp.zeros((batch_size, capacity), bool),
            index=jnp.zeros((), jnp.int32),
        )


class Linear(nnx.Module):
    """`x @ kernel + bias` with a [in, out] kernel annotated with logical axis names."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        logical_axes: tuple[str, str],
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kernel = INIT_STDDEV * jax.random.normal(rngs.params(), (in_features, out_features))
        self.kernel = nnx.Param(kernel.astype(dtype), logical_axes=logical_axes)
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=logical_axes[1:])
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with a learned scale and shift, computed in float32 and cast back."""

    def __init__(self, size: int, *, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((size,), dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((size,), dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(variance + self.eps)
        return (normed * self.weight[...] + self.bias[...]).astype(x.dtype)


def embedding(rngs: nnx.Rngs, rows: int, width: int, *, axes: tuple[str, str], dtype) -> nnx.Param:
    """A N(0, 0.02²) embedding table [rows, width] as a parameter with logical axes."""
    table = INIT_STDDEV * jax.random.normal(rngs.params(), (rows, width))
    return nnx.Param(table.astype(dtype), logical_axes=axes)


class AttentionMask(NamedTuple):
    """Which keys each query may attend to: causal in slot order, and never towards padding.

    Kept factored, as the slot of each query and the real key slots of each sequence, so that
    the [batch, queries, keys] mask is never an array of its own: each block of queries builds
    its part where its scores are masked, and the compiler fuses it into that select (at 4096
    tokens the whole mask would be 16M booleans per sequence, held for every layer).

    Attributes:
        query_slots: [queries] int32: the cache slot of each query (its index without a cache).
        key_mask: [batch, keys]: which key slots hold real tokens.
    """

    query_slots: jax.Array
    key_mask: jax.Array

    def allowed(self) -> jax.Array:
        """[batch, queries, keys]: whether each query may attend to each key."""
        key_slots = jnp.arange(self.key_mask.shape[1])
        causal = key_slots[None, None, :] <= self.query_slots[None, :, None]
        return causal & self.key_mask[:, None, :]


class AttentionInputs(NamedTuple):
    """Where each query may look, derived once per forward pass and shared by every layer.

    Attributes:
        mask: The `AttentionMask`: causal in slot order, and never towards padding; its
            `key_mask` says which key slots hold real tokens (the cache's slots with a cache,
            else the input's tokens).
        positions: [batch, queries]: the count of real tokens before each query (those already
            in the cache included), i.e. the position transformers' `generate` gives it.
    """

    mask: AttentionMask
    positions: jax.Array


def attention_inputs(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    cache: KVCache | None,
    *,
    context_limit: int | None = None,
) -> AttentionInputs:
    """Validates a batch and returns its key mask, allowed pairs and default positions.

    Args:
        input_ids: [batch, length] token ids.
        attention_mask: [batch, length], 1 for real tokens and 0 for padding; `None` for none.
        cache: The key-value cache the new tokens are appended to, if any.
        context_limit: The most positions the model can encode (learned position tables), or
            `None` when any length works (rotary embeddings).

    Raises:
        ValueError: On inconsistent shapes.
        SettingsError: On a sequence (or cache) longer than `context_limit`.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}.")
    batch, length = input_ids.shape
    if attention_mask is None:
        mask = jnp.ones((batch, length), bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} differs from input_ids shape "
                f"{input_ids.shape}."
            )
        mask = attention_mask.astype(bool)
    query_slots = jnp.arange(length)
    if cache is None:
        key_mask, key_slots, seen = mask, query_slots, 0
    else:
        if cache.mask.shape[0] != batch:
            raise ValueError(f"cache batch {cache.mask.shape[0]} differs from input {batch}.")
        key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
        key_slots = jnp.arange(cache.mask.shape[1])
        query_slots = cache.index + query_slots
        seen = jnp.sum(cache.mask, axis=-1, keepdims=True)
    # A position is at most the slot count minus one, so this static check bounds every position.
    slots = key_slots.shape[0]
    if context_limit is not None and slots > context_limit:
        raise SettingsError(
            f"{slots} token slots exceed the {context_limit} positions this model's learned "
            "position embeddings cover."
        )
    positions = jnp.maximum(seen + jnp.cumsum(mask, axis=-1) - 1, 0)
    attention_mask = AttentionMask(query_slots.astype(jnp.int32), key_mask)
    return AttentionInputs(mask=attention_mask, positions=positions)


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: AttentionMask,
    cache: tuple[jax.Array, jax.Array, jax.Array] | None,
    *,
    scale: float,
    float32_scores: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Masked softmax attention of grouped query heads, writing new keys/values to a cache.

    Args:
        query: [batch, length, heads, head_dim].
        key: [batch, length, kv_heads, head_dim]; `heads` is a multiple of `kv_heads`.
        value: Like `key`.
        mask: The `AttentionMask` from `attention_inputs` (its keys are the cache's slots with
            a cache, else the input's tokens).
        cache: `(keys, values, index)` of this layer; the new keys and values are written from
            slot `index` on and the queries attend over every slot.
        scale: Multiplies the scores `q · k`.
        float32_scores: Compute `q · k` in float32 whatever the dtype (GPT-2's
            `reorder_and_upcast_attn`).

    Returns:
        The attended values [batch, length, heads * head_dim] and, with a cache, this layer's
        updated `(keys, values)`.
    """
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    new_cache = None
    if cache is not None:
        cached_keys, cached_values, index = cache
        start = (0, index, 0, 0)
        key = jax.lax.dynamic_update_slice(cached_keys, key.astype(cached_keys.dtype), start)
        value = jax.lax.dynamic_update_slice(
            cached_values, value.astype(cached_values.dtype), start
        )
        new_cache = (key, value)
    # Query heads are grouped by the key/value head they share: no copies of keys/values.
    grouped = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    score_dtype = jnp.float32 if float32_scores else query.dtype
    block = functools.partial(_attend_block, scale=scale, score_dtype=score_dtype)
    if cache is None and length > QUERY_CHUNK and length % QUERY_CHUNK == 0:
        out = _attend_in_query_chunks(block, grouped, key, value, mask)
    else:
        out = block(grouped, key, value, mask)
    return out.reshape(batch, length, heads * head_dim), new_cache


# Sequences longer than this attend in blocks of this many queries (when it divides the length).
QUERY_CHUNK = 512


def _attend_block(grouped, key, value, mask, *, scale: float, score_dtype) -> jax.Array:
    """Attention of a block of grouped queries [batch, queries, kv_heads, group, head_dim] over
    every key; `mask` is the block's `AttentionMask` (its queries' slots)."""
    allowed = mask.allowed()
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped.astype(score_dtype), key.astype(score_dtype))
    scores = scores * scale
    # Masked after the cast to float32: float64's minimum would become −inf there, and a row
    # with no allowed key (a padding row) would then turn into NaN instead of uniform weights.
    scores = jnp.where(
        allowed[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min
    )
    weights = jax.nn.softmax(scores, axis=-1).astype(grouped.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", weights, value.astype(grouped.dtype))


def _attend_in_query_chunks(block, grouped, key, value, mask: AttentionMask) -> jax.Array:
    """`block` over chunks of `QUERY_CHUNK` queries in a loop, each rematerialized.

    Each query's softmax reads only its own scores, so chunking the queries changes no
    formula (the compiler may sum in another order, within float rounding). It bounds the
    [batch, heads, queries, keys] scores and weights to a chunk in every mode of
    differentiation: forward mode (the products of Gauss-Newton and Hessian curvature) carries
    their tangents chunk by chunk, and the reverse pass recomputes them per chunk rather than
    keeping them for the whole sequence.
    """
    batch, length = grouped.shape[:2]
    chunks = length // QUERY_CHUNK

    def split(x):
        return x.reshape(batch, chunks, QUERY_CHUNK, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(inputs):
        query_chunk, slots_chunk = inputs
        return block(query_chunk, key, value, mask._replace(query_slots=slots_chunk))

    slots = mask.query_slots.reshape(chunks, QUERY_CHUNK)
    out = jax.lax.map(one_chunk, (split(grouped), slots))
    return out.swapaxes(0, 1).reshape(grouped.shape)


def run_layers(
    layers: Sequence[nnx.Module],
    hidden: jax.Array,
    layer_args: tuple[Any, ...],
    *,
    inputs: AttentionInputs,
    cache: KVCache | None,
    remat: bool,
) -> tuple[jax.Array, KVCache | None]:
    """Runs decoder layers called as `layer(hidden, *layer_args, layer_cache)`.

    Each layer returns `(hidden, (keys, values) or None)`. With `remat` the layers run as one
    loop, each rematerialised in the backward pass (`_run_layers_in_a_loop`). Calls with a cache
    (generation) run unrolled and never rematerialise: nothing is differentiated there.

    Returns:
        The last hidden states and, with `cache`, the cache holding the new tokens too.
    """
    if remat and cache is None:
        return _run_layers_in_a_loop(layers, hidden, layer_args), None
    new_keys, new_values = [], []
    for i, layer in enumerate(layers):
        layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.index)
        # Each layer starts from rows split over the batch axes, on a mesh (a no-op otherwise).
        hidden = parallel.constrain_rows(hidden)
        hidden, layer_kv = layer(hidden, *layer_args, layer_cache)
        if layer_kv is not None:
            new_keys.append(layer_kv[0])
            new_values.append(layer_kv[1])
    if cache is None:
        return hidden, None
    length = hidden.shape[1]
    return hidden, KVCache(
        tuple(new_keys), tuple(new_values), inputs.mask.key_mask, cache.index + length
    )


def _run_layers_in_a_loop(
    layers: Sequence[nnx.Module], hidden: jax.Array, layer_args: tuple[Any, ...]
) -> jax.Array:
    """The layers as one `fori_loop` whose rematerialised body switches on the layer's index.

    Unrolled, each layer is a separate stretch of one program, and the compiler is free to keep
    a layer's temporaries from its forward pass to its backward pass: on an fsdp mesh the
    weights each layer all-gathers (the 4-layer Llama-2-13B gradient on fsdp=4 × tensor=2 grew
    by 0.42 GiB per layer), and on CPU the float32 copies of bfloat16 weights. In a loop, what a
    layer gathers or converts lives only in its own iteration; the backward pass runs the loop
    in reverse, recomputing each layer from the hidden states that entered it (the only thing
    saved per layer). Each layer keeps its own weights (the switch's branches), so layers need
    not be alike (PEFT may adapt only some), and nothing is copied into a stacked array.

    What a layer may change (the random streams of LoRA dropout) travels in the loop's carry and
    is written back to the layers afterwards, as an unrolled call would have left it.
    """
    graphdefs, weights, streams = zip(
        *(nnx.split(layer, nnx.Param, ...) for layer in layers), strict=True
    )

    def branch(index: int):
        def call(hidden, streams):
            layer = nnx.merge(graphdefs[index], weights[index], streams[index])
            # Each layer starts from rows split over the batch axes, on a mesh.
            hidden, _ = layer(parallel.constrain_rows(hidden), *layer_args, None)
            changed = nnx.state(layer, nnx.Not(nnx.Param))
            return hidden, (*streams[:index], changed, *streams[index + 1 :])

        return call

    branches = [branch(index) for index in range(len(layers))]

    # The loop already keeps the recomputation from being merged with the forward pass.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def body(index, carry):
        return jax.lax.switch(index, branches, *carry)

    hidden, streams = jax.lax.fori_loop(0, len(layers), body, (hidden, streams))
    for layer, changed in zip(layers, streams, strict=True):
        nnx.update(layer, changed)
    return hidden


def untied_lm_head(
    config: Any, in_features: int, *, input_axis: str, dtype: jnp.dtype, rngs: nnx.Rngs
) -> Linear | None:
    """The output projection [in_features, vocab] without bias, or `None` when `config` ties it
    to the token embeddings (`config.tie_word_embeddings`).

    Args:
        config: The architecture (reads `tie_word_embeddings` and `vocab_size`).
        in_features: Width of the hidden states the head reads.
        input_axis: Logical axis name of that width.
        dtype: Parameter dtype.
        rngs: Random streams; `rngs.params` initialises the kernel.
    """
    if config.tie_word_embeddings:
        return None
    return Linear(
        in_features,
        config.vocab_size,
        use_bias=False,
        logical_axes=(input_axis, "vocab"),
        dtype=dtype,
        rngs=rngs,
    )


class CausalLMBase(nnx.Module):
    """The forward pass every family's causal LM shares: padding and cache bookkeeping, token
    embeddings and the output head around the family's decoder.

    A subclass sets `config`, `dtype` and `lm_head` (see `untied_lm_head`) and implements
    `_token_table` and `_decode`.
    """

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Computes next-token logits.

        Args:
            input_ids: [batch, length] integer token ids.
            attention_mask: [batch, length], 1 for real tokens and 0 for padding (left or right).
                `None` means no padding.
            positions: [batch, length] positions, counted from 0; by default the count of real
                tokens before each token (including those already in `cache`).
            cache: Keys and values of earlier tokens. The new tokens are written from slot
                `cache.index` on and attend to every real earlier token.

        Returns:
            Logits [batch, length, vocab] in the model dtype; with `cache`, also the updated cache.

        Raises:
            ValueError: On inconsistent shapes or, for a family with learned positions (GPT-2,
                OPT), more tokens (cache slots included) than `config.max_position_embeddings`.
        """
        hidden, new_cache = self._hidden_states(input_ids, attention_mask, positions, cache)
        logits = self.output_head().logits(hidden)
        return logits if cache is None else (logits, new_cache)

    # The width of the vocabulary chunks of `next_token_log_probs` (None: whole). A model
    # attribute, so that setting it on a model changes its graph's static structure, and with
    # it every compiled function's cache key.
    vocab_chunk: int | None = VOCAB_CHUNK

    def hidden_states(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """The final hidden states [batch, length, width] that the output head reads: the
        logits are `output_head().logits(hidden_states(...))`."""
        return self._hidden_states(input_ids, attention_mask, None, None)[0]

    def output_head(self) -> OutputHead:
        """The output projection as stored (the token table when tied, else `lm_head`'s
        kernel), cut into chunks of `vocab_chunk`."""
        if self.lm_head is None:
            return OutputHead(self._token_table(), vocab_axis=0, chunk=self.vocab_chunk)
        return OutputHead(self.lm_head.kernel[...], vocab_axis=1, chunk=self.vocab_chunk)

    def next_token_log_probs(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """log p(token t | tokens < t) for t = 1..T−1, [batch, length − 1] in float32, over
        vocabulary chunks of `vocab_chunk` (`OutputHead.next_token_log_probs`), so that the
        [batch, length, vocab] logits are never held whole."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.output_head().next_token_log_probs(hidden, input_ids)

    def _hidden_states(self, input_ids, attention_mask, positions, cache):
        inputs = attention_inputs(
            input_ids, attention_mask, cache, context_limit=self.config.context_limit
        )
        if positions is None:
            positions = inputs.positions
        # On a mesh the rows of the table stay split over the vocabulary's axes but its width is
        # gathered first (FSDP), and the embeddings then start with their rows split: a lookup
        # into a table split both ways, for ids split over data × fsdp, is one the partitioner
        # can only do by replicating its output.
        table = parallel.constrain_logical(self._token_table(), ("vocab", None))
        hidden = parallel.constrain_rows(jnp.take(table, input_ids, axis=0))
        return self._decode(hidden, positions, inputs, cache)

    def _token_table(self) -> jax.Array:
        """The token embedding table [vocab, width], also the tied output projection."""
        raise NotImplementedError

    def _decode(
        self,
        hidden: jax.Array,
        positions: jax.Array,
        inputs: AttentionInputs,
        cache: KVCache | None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Maps the token embeddings to the hidden states the output head reads.

        Returns:
            Those hidden states and, with `cache`, the cache holding the new tokens too.
        """
        raise NotImplementedError
