"""A tiny tokenizer + Llama checkpoint folder, built in seconds, for end-to-end tests."""

import pathlib

import jax

from jaxunlearn.data import generate_corpus, train_bpe_tokenizer
from jaxunlearn.models import ModelConfig, from_config, save

TINY_CONFIG = ModelConfig(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    tie_word_embeddings=True,
    max_position_embeddings=192,
    bos_token_id=1,
    eos_token_id=(2,),
    pad_token_id=0,
)


def make_tiny_checkpoint(directory: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Writes config.json, model.safetensors and a tokenizer into `directory`."""
    corpus = generate_corpus(4, seed=seed, num_public_people=6)
    texts = [e.prompt + e.response for e in corpus.public_examples()]
    train_bpe_tokenizer(texts, vocab_size=TINY_CONFIG.vocab_size, out_dir=directory)
    save(from_config(TINY_CONFIG, key=jax.random.key(seed)), directory)
    return directory
