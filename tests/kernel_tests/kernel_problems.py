"""Small problems with dense float64 answers, shared by the kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def as_tree(kind: str, leaves: dict) -> object:
    """The same leaves as a dict tree or as a tuple tree (sorted by name)."""
    if kind == "dict":
        return dict(leaves)
    if kind == "tuple":
        return tuple(leaves[name] for name in sorted(leaves))
    raise ValueError(kind)


def mlp_problem(seed: int, tree_kind: str):
    """A two-layer tanh MLP with softmax cross-entropy on a batch of 6 examples.

    Returns (loss, params, batch, model, loss_of_logits_factory) where `model(params, inputs)`
    gives logits and `loss_of_logits_factory(targets)` the mean cross-entropy of logits.
    """
    rng = np.random.default_rng(seed)
    leaves = {
        "w1": jnp.asarray(rng.normal(size=(5, 7)) / np.sqrt(5)),
        "b1": jnp.asarray(rng.normal(size=(7,)) * 0.1),
        "w2": jnp.asarray(rng.normal(size=(7, 4)) / np.sqrt(7)),
    }
    params = as_tree(tree_kind, leaves)
    inputs = jnp.asarray(rng.normal(size=(6, 5)))
    targets = jnp.asarray(rng.integers(0, 4, size=6))

    def unpack(p):
        return p if isinstance(p, dict) else dict(zip(sorted(leaves), p, strict=True))

    def model(p, x):
        q = unpack(p)
        return jnp.tanh(x @ q["w1"] + q["b1"]) @ q["w2"]

    def loss_of_logits_factory(y):
        def loss_of_logits(logits):
            log_probs = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))

        return loss_of_logits

    def loss(p, batch):
        x, y = batch
        return loss_of_logits_factory(y)(model(p, x))

    return loss, params, (inputs, targets), model, loss_of_logits_factory


def attention_problem(seed: int, tree_kind: str, *, length: int = 5, width: int = 6, rank: int = 2):
    """A causal single-head attention block with frozen base weights and LoRA adapters on the
    query and value projections (B non-zero, so every adapter leaf has curvature)."""
    rng = np.random.default_rng(seed)
    base = {name: jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width)) for name in "qkvo"}
    leaves = {
        "q_a": jnp.asarray(rng.normal(size=(width, rank)) / np.sqrt(width)),
        "q_b": jnp.asarray(rng.normal(size=(rank, width)) * 0.5),
        "v_a": jnp.asarray(rng.normal(size=(width, rank)) / np.sqrt(width)),
        "v_b": jnp.asarray(rng.normal(size=(rank, width)) * 0.5),
    }
    params = as_tree(tree_kind, leaves)
    tokens = jnp.asarray(rng.normal(size=(2, length, width)))
    targets = jnp.asarray(rng.integers(0, width, size=(2, length)))

    def unpack(p):
        return p if isinstance(p, dict) else dict(zip(sorted(leaves), p, strict=True))

    def model(p, x):
        q = unpack(p)
        query = x @ (base["q"] + q["q_a"] @ q["q_b"])
        keys = x @ base["k"]
        values = x @ (base["v"] + q["v_a"] @ q["v_b"])
        scores = query @ jnp.swapaxes(keys, -1, -2) / np.sqrt(width)
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        return (weights @ values) @ base["o"]  # logits over `width` classes per position

    def loss_of_logits_factory(y):
        def loss_of_logits(logits):
            log_probs = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(log_probs, y[..., None], axis=-1))

        return loss_of_logits

    def loss(p, batch):
        x, y = batch
        return loss_of_logits_factory(y)(model(p, x))

    return loss, params, (tokens, targets), model, loss_of_logits_factory


def gauss_newton_split(model, loss_of_logits_factory):
    """A problem's `(model_fn, loss_fn)` in the form `kernels.gnvp` takes: both functions get
    the batch `(inputs, targets)`, the model using the inputs and the loss the targets."""

    def model_fn(params, batch):
        inputs, _ = batch
        return model(params, inputs)

    def loss_fn(logits, batch):
        _, targets = batch
        return loss_of_logits_factory(targets)(logits)

    return model_fn, loss_fn


def random_like(seed: int, tree):
    """A random float64 tree shaped like `tree`."""
    rng = np.random.default_rng(seed + 1000)
    return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape)), tree)


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def relative_error(actual, expected) -> float:
    actual, expected = flat(actual), flat(expected)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def spd_matrix(seed: int, eigenvalues) -> np.ndarray:
    """A symmetric matrix with exactly the given eigenvalues and a random eigenbasis."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(eigenvalues.size, eigenvalues.size)))
    return basis @ np.diag(eigenvalues) @ basis.T


def tree_operator(matrix: np.ndarray, like):
    """v ↦ M v acting on trees shaped like `like` (raveling is fine in a test)."""
    _, unravel = ravel_pytree(like)
    dense = jnp.asarray(matrix)

    def matvec(v):
        flat_v, _ = ravel_pytree(v)
        return unravel((dense @ flat_v.astype(dense.dtype)).astype(flat_v.dtype))

    return matvec


def vector_tree(kind: str, seed: int, dtype=jnp.float64):
    """A right-hand side with 17 entries in three leaves, as a dict or a tuple."""
    rng = np.random.default_rng(seed)
    leaves = {
        "a": jnp.asarray(rng.normal(size=(3, 4)), dtype),
        "b": jnp.asarray(rng.normal(size=(4,)), dtype),
        "c": jnp.asarray(rng.normal(size=(1,)), dtype),
    }
    return as_tree(kind, leaves)
