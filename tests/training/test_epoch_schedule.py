"""How a number of epochs becomes optimizer steps, and the default warmup."""

import pytest

from jaxunlearn.errors import SettingsError
from jaxunlearn.train import default_warmup_steps, steps_for_epochs


def test_steps_round_to_the_nearest_integer_and_never_reach_zero():
    assert steps_for_epochs(24, 520, 32) == 390
    assert steps_for_epochs(24, 494, 32) == 370  # 370.5: halves go to even, as `round`
    assert steps_for_epochs(24.1, 494, 32) == 372
    assert steps_for_epochs(0.01, 10, 32) == 1
    assert steps_for_epochs(1, 33, 32) == 1


@pytest.mark.parametrize(
    ("epochs", "num_examples", "examples_per_step"),
    [(0, 10, 2), (-1, 10, 2), (float("nan"), 10, 2), (float("inf"), 10, 2), (1, 0, 2), (1, 10, 0),
     (1, 10.0, 2), ("1", 10, 2)],
)  # fmt: skip
def test_bad_counts_are_settings_errors(epochs, num_examples, examples_per_step):
    with pytest.raises(SettingsError):
        steps_for_epochs(epochs, num_examples, examples_per_step)


def test_the_default_warmup_is_a_tenth_of_the_steps():
    assert [default_warmup_steps(n) for n in (1, 9, 10, 390)] == [0, 0, 1, 39]
