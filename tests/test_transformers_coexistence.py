"""The curvature kernels next to transformers and Hugging Face's own `kernels` package.

transformers (from 5.25 a hard dependency) imports a Hugging Face package named `kernels`, which
installs as a top-level `kernels`. The curvature library is `jaxunlearn.kernels`, so the two never
shadow each other: transformers' configs, tokenizers and PyTorch models keep working, and
`jaxunlearn.kernels` is always the curvature library.
"""

import importlib.util

import pytest


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path


def test_the_hub_kernels_package_and_the_curvature_kernels_are_distinct(hf_home):
    import transformers

    from jaxunlearn import kernels

    assert callable(kernels.hvp)
    assert kernels.__name__ == "jaxunlearn.kernels"
    hub = importlib.util.find_spec("kernels")
    if hub is not None:  # installed with transformers >= 5.25
        import kernels as hub_kernels

        assert hub_kernels is not kernels
        assert not hasattr(hub_kernels, "hvp")

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    config.save_pretrained(hf_home / "model")
    loaded = transformers.AutoConfig.from_pretrained(hf_home / "model")
    assert loaded.num_key_value_heads == 1


def test_tokenizer_round_trip_with_kernels_imported(hf_home):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from jaxunlearn import kernels  # noqa: F401

    vocabulary = {"[UNK]": 0, "hello": 1, "world": 2, "unlearn": 3}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(
        hf_home / "tokenizer"
    )
    tokenizer = AutoTokenizer.from_pretrained(hf_home / "tokenizer")
    assert tokenizer("hello unlearn world")["input_ids"] == [1, 3, 2]
    assert tokenizer("hello nobody")["input_ids"] == [1, 0]


def test_transformers_pytorch_model_runs_with_kernels_imported(hf_home):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxunlearn import kernels

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert tuple(logits.shape) == (1, 3, 32)
    assert kernels.__name__ == "jaxunlearn.kernels"
    assert hasattr(kernels, "cg")
