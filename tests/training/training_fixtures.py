"""A tiny Llama and a fake tokenized dataset for the training tests."""

import jax
import numpy as np
from flax import nnx

from jaxunlearn.batch import Batch
from jaxunlearn.models import ModelConfig, add_lora, from_config
from jaxunlearn.train import TrainConfig

VOCAB_SIZE = 64
PROMPT_LENGTH = 2
BUCKETS = (8, 16)

# One config for the dropout, determinism and resume tests, so that they share a compiled step.
# 8 examples in steps of 2 x 2 = 4: two steps per epoch, so six steps cross two epoch boundaries.
RESUME_CONFIG = TrainConfig(
    learning_rate=1e-2,
    warmup_steps=2,
    num_steps=6,
    batch_size=2,
    grad_accumulation=2,
    eval_every=3,
    checkpoint_every=2,
    keep_checkpoints=2,
    seed=5,
)
DROPOUT = 0.1


def tiny_config(*, tied: bool = False) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        tie_word_embeddings=tied,
    )


def tiny_model(*, seed: int = 0, tied: bool = False):
    """A randomly initialised base model with no adapter."""
    return from_config(tiny_config(tied=tied), key=jax.random.key(seed))


def tiny_lora_model(*, seed: int = 0, dropout: float = 0.0):
    """The base model of `seed` with rank-4 adapters on q, v and down projections."""
    model = tiny_model(seed=seed)
    return add_lora(
        model,
        rank=4,
        alpha=8.0,
        targets=("q_proj", "v_proj", "down_proj"),
        key=jax.random.key(seed + 1000),
        dropout=dropout,
    )


class FakeDataset:
    """Random token sequences (2 prompt tokens, then the response), right-padded to buckets.

    Implements `jaxunlearn.train.BatchSource`. Lengths vary from 4 to `max_length` tokens;
    batches are padded to 8 or 16 tokens, so with `max_length` > 8 micro-batches differ in length.
    """

    def __init__(self, num_examples: int, *, seed: int = 0, max_length: int = 8):
        rng = np.random.default_rng(seed)
        lengths = rng.integers(PROMPT_LENGTH + 2, max_length + 1, size=num_examples)
        self._tokens = [rng.integers(1, VOCAB_SIZE, size=int(n)) for n in lengths]
        self.ids = [f"example-{i}" for i in range(num_examples)]

    def __len__(self) -> int:
        return len(self._tokens)

    def batch(self, indices, /, *, batch_size=None) -> Batch:
        indices = [int(i) for i in indices]
        rows = len(indices) if batch_size is None else batch_size
        assert rows >= len(indices) > 0
        longest = max(len(self._tokens[i]) for i in indices)
        length = next(bucket for bucket in BUCKETS if bucket >= longest)
        input_ids = np.zeros((rows, length), np.int32)
        attention_mask = np.zeros((rows, length), np.int32)
        loss_mask = np.zeros((rows, length), np.float32)
        example_mask = np.zeros((rows,), bool)
        for row, index in enumerate(indices):
            tokens = self._tokens[index]
            input_ids[row, : len(tokens)] = tokens
            attention_mask[row, : len(tokens)] = 1
            loss_mask[row, PROMPT_LENGTH : len(tokens)] = 1.0
            example_mask[row] = True
        return Batch(input_ids, attention_mask, loss_mask, example_mask)


def arrays(state) -> list[np.ndarray]:
    """Host copies of a state's leaves, to compare before and after training."""
    return [np.array(leaf) for leaf in jax.tree.leaves(state)]


def lora_arrays(model) -> list[np.ndarray]:
    return arrays(nnx.state(model, nnx.LoRAParam))


def base_arrays(model) -> list[np.ndarray]:
    """Every non-LoRA parameter of the model."""
    return arrays(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
