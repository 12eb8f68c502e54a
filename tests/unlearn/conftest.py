"""Fixtures of the unlearning tests: a small dataset of examples with metadata."""

import pathlib
import sys

import pytest

from jaxunlearn.data import Example

# The tiny checkpoint builder (tests/tiny_assets.py) lives beside the test folders.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


@pytest.fixture
def examples():
    """Six examples whose ids and texts are distinctive enough to search for in written files."""
    return [
        Example(
            f"secret-id-{index}",
            f"What is the email of Zelda Quark {index}?",
            f"zelda.quark{index}@example.org",
            {"person": index, "split": "train"},
        )
        for index in range(6)
    ]
