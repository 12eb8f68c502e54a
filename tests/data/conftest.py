"""Fixtures of the data tests: a private Hugging Face cache and tiny tokenizers."""

import os

import datasets
import pytest
from data_fixtures import make_tokenizer

from jaxunlearn.data import load_tokenizer


@pytest.fixture(scope="session", autouse=True)
def _private_hf_home(tmp_path_factory):
    """Keeps datasets' and transformers' caches in a temporary folder and off the network."""
    home = tmp_path_factory.mktemp("hf_home")
    names = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {name: os.environ.get(name) for name in names}
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # datasets reads HF_HOME once, at import, which may have happened before this fixture.
    saved_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = home / "datasets"
    yield
    datasets.config.HF_DATASETS_CACHE = saved_cache
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def bos_tokenizer(tmp_path_factory):
    """A tokenizer that prepends BOS and has a pad token."""
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok_bos")))


@pytest.fixture(scope="session")
def plain_tokenizer(tmp_path_factory):
    """A tokenizer that adds no BOS and has no pad token (EOS pads)."""
    return load_tokenizer(
        make_tokenizer(tmp_path_factory.mktemp("tok_plain"), bos=False, pad=False)
    )
