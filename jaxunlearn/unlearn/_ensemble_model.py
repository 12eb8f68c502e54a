"""An ensemble of LoRA adapters on one frozen base model, served as one causal LM.

Sharded exact unlearning (SISA, S3T) trains m shard models that share a frozen base and differ
only in their adapters; a request retrains the shards that saw the deleted data, and the
ensemble of the shards answers queries. `EnsembleLM` holds the base once and the m adapters
stacked along a member axis, and is called like any model of `jaxunlearn.models`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxunlearn.models import KVCache, split_lora

__all__ = ["EnsembleLM", "MemberLoRA"]


class MemberLoRA(nnx.Variable):
    """One LoRA array of every ensemble member, stacked along a leading member axis.

    Its own Variable type, not `nnx.LoRAParam` (nor `nnx.Param`), so that code which trains or
    differentiates a model's LoRA parameters never picks up the served members.
    """


class EnsembleLM(nnx.Module):
    """m LoRA adapters on one base model, whose next-token distribution is their ensemble.

    The ensemble's next-token log-probabilities are the mean of the members' log-probabilities,
    renormalised:

        log p(v) = log_softmax(mean_k log_softmax(logits_k))(v)

    which equals `log_softmax(mean_k logits_k)`: a normalised geometric mean of the members'
    distributions. The call returns these log-probabilities in place of logits. They are valid
    logits (their `log_softmax` is themselves), so every consumer that normalises logits
    (`jaxunlearn.eval.score_examples`, `jaxunlearn.batch.token_log_probs`, `generate`) gets the
    ensemble's distribution.

    The base weights are held once, in `model`; each member contributes only its LoRA arrays,
    which replace the model's own LoRA parameters for that member's forward pass (the model's
    own LoRA values are therefore not used). Members run one after another with a running sum,
    so that only one member's [batch, length, vocab] log-probabilities are live at a time. Each
    member uses the wrapped model's dropout mode (`nnx.view(ensemble, deterministic=True)` or
    `ensemble.eval()` turns it off for all), and the dropout streams advance from member to
    member, so that members draw different masks.

    Attributes:
        model: The wrapped causal LM with LoRA attached.
        members: One `MemberLoRA` per LoRA array of `model`, in the leaf order of its LoRA
            state, each [num_members, *array shape].
        paths: The paths of those LoRA arrays in `model`, in the same order.
    """

    def __init__(self, model: nnx.Module, members: Sequence[nnx.State], /):
        """Wraps `model` with the LoRA states of the ensemble members.

        Args:
            model: A causal LM of `jaxunlearn.models` with LoRA attached (`add_lora`,
                `jaxunlearn.adapter.attach_lora`); it is shared, not copied.
            members: m >= 1 LoRA states, each with exactly the paths, shapes and dtypes of the
                model's own (`jaxunlearn.models.split_lora(model)[1]`). They are stacked into
                new arrays; the states themselves are not kept.

        Raises:
            ValueError: If `model` has no LoRA parameters, `members` is empty, or a member's
                paths, shapes or dtypes differ from the model's LoRA state.
        """
        _, lora, _ = split_lora(model)
        reference = _flat_arrays(lora)
        members = list(members)
        if not members:
            raise ValueError("An EnsembleLM needs at least one member LoRA state; got none.")
        flat_members = [
            _checked_member(index, member, reference) for index, member in enumerate(members)
        ]
        metadata = [variable.get_metadata() for _, variable in nnx.to_flat_state(lora)]
        stacked = []
        for position, info in enumerate(metadata):
            value = jnp.stack([flat[position] for flat in flat_members])
            # The member axis is replicated; the others shard as the model's LoRA arrays do.
            extra = {}
            if "logical_axes" in info:
                extra["logical_axes"] = (None, *info["logical_axes"])
            stacked.append(MemberLoRA(value, **extra))
        self.model = model
        self.members = nnx.List(stacked)
        self.paths = tuple(path for path, _ in reference)

    @property
    def config(self):
        """The wrapped model's architecture (generation reads its cache shape from it)."""
        return self.model.config

    @property
    def dtype(self) -> jnp.dtype:
        """The wrapped model's parameter and computation dtype."""
        return self.model.dtype

    @property
    def num_members(self) -> int:
        """The number m of ensemble members."""
        return self.members[0].shape[0]

    def init_cache(self, *, batch_size: int, capacity: int) -> tuple[KVCache, ...]:
        """Empty key-value caches, one per member (members attend with different projections,
        so each keeps its own keys and values).

        Args:
            batch_size: Sequences per batch.
            capacity: Token slots per sequence.

        Returns:
            A tuple of `num_members` empty `KVCache`s, to pass as `cache` to the call.
        """
        return tuple(
            KVCache.init(self.config, batch_size=batch_size, capacity=capacity, dtype=self.dtype)
            for _ in range(self.num_members)
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        cache: Sequence[KVCache] | None = None,
    ) -> jax.Array | tuple[jax.Array, tuple[KVCache, ...]]:
        """Computes the ensemble's next-token log-probabilities.

        Args:
            input_ids: [batch, length] integer token ids.
            attention_mask: [batch, length], 1 for real tokens and 0 for padding; `None` means
                no padding.
            positions: [batch, length] positions, passed to every member (see the wrapped
                model's call); by default counted from the real tokens.
            cache: One `KVCache` per member (from `init_cache`), holding earlier tokens.

        Returns:
            The ensemble's log-probabilities [batch, length, vocab], float32 (float64 for a
            float64 model); with `cache`, also the tuple of updated caches, one per member.

        Raises:
            ValueError: On inconsistent shapes (see the wrapped model), a cache that does not
                hold one `KVCache` per member, or a model whose LoRA parameters changed since
                the ensemble was built.
        """
        graphdef, lora, params, others = nnx.split(self.model, nnx.LoRAParam, nnx.Param, ...)
        lora_variables = nnx.to_flat_state(lora)
        if tuple(tuple(path) for path, _ in lora_variables) != self.paths:
            raise ValueError(
                "The wrapped model's LoRA parameters no longer match the ensemble members "
                "(adapters were added or removed after the ensemble was built)."
            )
        # Float64 models (float64 checks of the objective) keep float64, as token_log_probs does.
        dtype = jnp.promote_types(self.dtype, jnp.float32)
        stacked = [member[...] for member in self.members]

        def member_model(index, others):
            # The model's own LoRA Variables, each given member `index`'s array instead.
            member = nnx.from_flat_state(
                [
                    (path, variable.replace(leaf[index]))
                    for (path, variable), leaf in zip(lora_variables, stacked, strict=True)
                ]
            )
            return nnx.merge(graphdef, member, params, others)

        def member_log_probs(model, cached):
            out = model(input_ids, attention_mask, positions=positions, cache=cached)
            logits, new_cache = (out, None) if cached is None else out
            # The dropout streams the member advanced are handed on to the next member.
            rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)[3]
            return jax.nn.log_softmax(logits.astype(dtype), axis=-1), new_cache, rest

        if cache is None:
            # One compiled body for every member, and one member's log-probs live at a time.
            def body(index, carry):
                total, others = carry
                log_probs, _, others = member_log_probs(member_model(index, others), None)
                return total + log_probs, others

            # The streams are passed in, not closed over: a trace may only advance its own.
            first = jax.eval_shape(lambda others: body(0, (0.0, others))[0], others)
            total = jnp.zeros(first.shape, dtype)
            total, others = jax.lax.fori_loop(0, self.num_members, body, (total, others))
            nnx.update(self.model, others)
            return jax.nn.log_softmax(total / self.num_members, axis=-1)
        # A lone KVCache is itself a tuple (of keys, values, mask, index): name it as such.
        if isinstance(cache, KVCache) or not all(isinstance(c, KVCache) for c in cache):
            got = "one KVCache" if isinstance(cache, KVCache) else "entries that are not KVCaches"
            raise ValueError(
                f"cache must be a tuple of {self.num_members} KVCaches (one per member, from "
                f"init_cache); got {got}."
            )
        cache = tuple(cache)
        if len(cache) != self.num_members:
            raise ValueError(
                f"cache must be a tuple of {self.num_members} KVCaches (one per member, from "
                f"init_cache); got {len(cache)}."
            )
        # Each member updates its own cache, so the members run unrolled here; with a cache the
        # inputs are a prompt or one token, whose log-probs are small.
        total = None
        new_caches = []
        for index, member_cache in enumerate(cache):
            log_probs, new_cache, others = member_log_probs(
                member_model(index, others), member_cache
            )
            total = log_probs if total is None else total + log_probs
            new_caches.append(new_cache)
        nnx.update(self.model, others)
        return jax.nn.log_softmax(total / self.num_members, axis=-1), tuple(new_caches)


def _flat_arrays(state) -> list[tuple[tuple, jax.Array]]:
    """`(path, array)` of every leaf of a LoRA state, in `nnx.to_flat_state`'s (sorted) order."""
    flat = []
    for path, leaf in nnx.to_flat_state(state):
        flat.append((tuple(path), leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf))
    return flat


def _checked_member(index: int, member, reference) -> list[jax.Array]:
    """The arrays of member `index` in the reference order, after checking its paths, shapes
    and dtypes against the model's LoRA state `reference` (from `_flat_arrays`).

    Raises:
        ValueError: Naming the member and what differs.
    """
    if not isinstance(member, nnx.State | Mapping):
        raise ValueError(
            f"Ensemble member {index} must be a LoRA state (an nnx.State), got "
            f"{type(member).__name__}."
        )
    flat = dict(_flat_arrays(nnx.State(member)))
    expected = dict(reference)
    missing = [_name(path) for path in expected if path not in flat]
    extra = [_name(path) for path in flat if path not in expected]
    if missing or extra:
        raise ValueError(
            f"Ensemble member {index}'s LoRA state differs from the model's in structure: "
            f"missing {missing or 'nothing'}, unexpected {extra or 'nothing'}."
        )
    arrays = []
    for path, reference_array in reference:
        array = flat[path]
        shape, dtype = tuple(jnp.shape(array)), jnp.result_type(array)
        if shape != reference_array.shape or dtype != reference_array.dtype:
            raise ValueError(
                f"Ensemble member {index}'s {_name(path)} has shape {shape} and dtype "
                f"{dtype}; the model's has shape {reference_array.shape} and dtype "
                f"{reference_array.dtype}."
            )
        arrays.append(jnp.asarray(array))
    return arrays


def _name(path: tuple) -> str:
    """A state path as a dotted module name (`model.layers.0.self_attn.q_proj.lora_a`)."""
    return ".".join(str(part) for part in path)
