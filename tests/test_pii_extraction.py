"""PII extraction recall: greedy completions of training contexts, checked verbatim."""

import math

import jax
import pytest
from flax import nnx
from tiny_assets import TINY_CONFIG, make_tiny_checkpoint

from jaxunlearn.data import generate_corpus, load_tokenizer, tokenize_examples
from jaxunlearn.eval import extraction_recall, pii_extraction
from jaxunlearn.models import from_config
from jaxunlearn.train import TrainConfig, finetune


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_memorized_facts_are_extracted_and_unseen_ones_are_not(tmp_path):
    tokenizer = load_tokenizer(make_tiny_checkpoint(tmp_path / "model"))
    corpus = generate_corpus(4, seed=0, held_out_fraction=0.25)
    memorized, unseen = corpus.people[0], corpus.held_out[0]
    facts = [e for e in corpus.examples_of([memorized]) if e.metadata["kind"] == "fact"]
    data = tokenize_examples(facts, tokenizer, max_length=192)
    model = from_config(TINY_CONFIG, key=jax.random.key(0))
    config = TrainConfig(learning_rate=1e-2, num_steps=150, batch_size=len(facts), seed=0)
    finetune(model, data, config=config, trainable=nnx.Param, progress=False)

    seen = pii_extraction(model, tokenizer, corpus.recall_prompts([memorized]), batch_size=4)
    other = pii_extraction(model, tokenizer, corpus.recall_prompts([unseen]), batch_size=4)
    assert len(seen) == len(facts)  # one prompt per PII field; batch of 4 pads the last chunk
    assert extraction_recall(seen) >= 5 / 6
    assert extraction_recall(other) == 0.0
    for attempt in seen:
        assert attempt.extracted == (attempt.expected_value in attempt.completion)
    assert math.isnan(extraction_recall([]))  # nothing was attempted
