"""Fixtures of the unlearning tests: a small dataset of examples with metadata."""

import pytest

from jaxunlearn.data import Example


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
