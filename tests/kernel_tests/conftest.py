"""Kernel tests run in float64 so that matrix-free results can be held to dense answers."""

import jax
import pytest


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield
