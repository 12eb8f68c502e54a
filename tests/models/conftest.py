"""Fixtures of the model tests: a private HF_HOME and the reference checkpoints."""

import os

import pytest
from model_references import REFERENCE_CONFIGS, make_reference


@pytest.fixture(scope="session", autouse=True)
def _private_hf_home(tmp_path_factory):
    """Keeps transformers' caches out of the home folder and off the network."""
    saved = {name: os.environ.get(name) for name in ("HF_HOME", "HF_HUB_OFFLINE")}
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module", params=sorted(REFERENCE_CONFIGS))
def reference_checkpoint(request, tmp_path_factory):
    """(name, directory, transformers model) for each reference config."""
    directory = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    return request.param, directory, make_reference(directory, request.param)
