"""A tiny LoRA Llama, a random tokenized dataset and dense float64 references of its objective.

The references flatten the LoRA tree and differentiate the mean objective over the whole
dataset, computed on one batch holding every example: an independent route to the same
numbers that `jaxunlearn.curvature` computes batch by batch from length-sorted, padded batches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from jaxunlearn.batch import Batch, mean_loss
from jaxunlearn.curvature import split_for_curvature
from jaxunlearn.data import Example, TokenizedDataset
from jaxunlearn.models import ModelConfig, add_lora, from_config

VOCAB_SIZE = 32
BUCKETS = (8, 12, 16)
MAX_LENGTH = 16

CONFIG = ModelConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
)


def tiny_lora_model(*, seed: int = 0, dtype=jnp.float32):
    """A base model with rank-1 adapters on q and v whose B is random (non-zero gradients).

    56 adapter parameters (one layer: compilation, not arithmetic, is what these tests spend
    their time on): small enough for dense Hessians and exact Krylov solves.
    """
    model = add_lora(
        from_config(CONFIG, key=jax.random.key(seed), dtype=dtype),
        rank=1,
        alpha=4.0,
        targets=("q_proj", "v_proj"),
        key=jax.random.key(seed + 100),
    )
    lora = nnx.state(model, nnx.LoRAParam)
    leaves, structure = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed + 200), len(leaves))
    randomized = [
        (0.5 * jax.random.normal(key, leaf.shape)).astype(dtype)
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(structure, randomized))
    return model


def random_examples(num_examples: int, *, seed: int = 0) -> tuple[list[Example], TokenizedDataset]:
    """Examples (ids and placeholder texts) and random token sequences of 5 to 16 tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, MAX_LENGTH + 1, size=num_examples)
    tokens = [rng.integers(3, VOCAB_SIZE, size=int(n)).astype(np.int32) for n in lengths]
    prompt_lengths = [int(rng.integers(1, 4)) for _ in lengths]
    ids = [f"example-{i}" for i in range(num_examples)]
    examples = [Example(i, f"prompt {i}", f" response {i}") for i in ids]
    data = TokenizedDataset(
        ids, tokens, prompt_lengths, pad_id=0, buckets=BUCKETS, max_length=MAX_LENGTH
    )
    return examples, data


def _loss_of_flat(flat, template, base, batch, *, graphdef):
    return mean_loss(_logits_of_flat(flat, template, base, batch, graphdef=graphdef), batch)


def _logits_of_flat(flat, template, base, batch, *, graphdef):
    # The LoRA tree is rebuilt from the flat vector inside the trace (`template` gives its
    # structure), so that these functions are module-level and each shape compiles once.
    lora = ravel_pytree(template)[1](flat)
    return nnx.merge(graphdef, lora, base)(batch.input_ids, batch.attention_mask)


_jit = functools.partial(jax.jit, static_argnames="graphdef")
_logits = _jit(_logits_of_flat)
_loss = _jit(_loss_of_flat)
_gradient = _jit(jax.grad(_loss_of_flat))
_hessian = _jit(jax.hessian(_loss_of_flat))
_logits_jacobian = _jit(jax.jacfwd(_logits_of_flat))


class DenseObjective:
    """The mean objective over a set of examples as a function of the flat LoRA vector."""

    def __init__(self, model, data: TokenizedDataset, indices=None):
        graphdef, lora, base = split_for_curvature(model)
        self.flat, self.unravel = ravel_pytree(lora)
        indices = np.arange(len(data)) if indices is None else np.asarray(indices)
        self.batch = Batch(*(jnp.asarray(a) for a in data.batch(indices, batch_size=len(indices))))
        self._arguments = (lora, base, self.batch)
        self._graphdef = graphdef

    def logits(self, flat):
        return _logits(flat, *self._arguments, graphdef=self._graphdef)

    def loss(self, flat):
        return _loss(flat, *self._arguments, graphdef=self._graphdef)

    def gradient(self) -> np.ndarray:
        return np.asarray(
            _gradient(self.flat, *self._arguments, graphdef=self._graphdef), np.float64
        )

    def hessian(self) -> np.ndarray:
        return np.asarray(
            _hessian(self.flat, *self._arguments, graphdef=self._graphdef), np.float64
        )

    def gauss_newton(self) -> np.ndarray:
        """(1/N) Σ_i (1/c_i) Σ_t w_it J_itᵀ (diag p − p pᵀ) J_it, in float64."""
        jacobian = np.asarray(
            _logits_jacobian(self.flat, *self._arguments, graphdef=self._graphdef), np.float64
        )  # [B, T, V, P]
        logits = np.asarray(self.logits(self.flat), np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        weights = np.asarray(self.batch.loss_mask, np.float64)[:, 1:]
        counts = weights.sum(-1)
        total = np.zeros((self.flat.size, self.flat.size))
        for b in range(logits.shape[0]):
            for t in range(logits.shape[1] - 1):
                if weights[b, t] == 0:
                    continue
                p = probs[b, t]
                curvature = np.diag(p) - np.outer(p, p)
                j = jacobian[b, t]
                total += weights[b, t] / counts[b] * j.T @ curvature @ j
        return total / logits.shape[0]

    def to_flat(self, tree) -> np.ndarray:
        return np.asarray(ravel_pytree(tree)[0], np.float64)

    def to_tree(self, flat):
        return self.unravel(jnp.asarray(flat).astype(self.flat.dtype))
