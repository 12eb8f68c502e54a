"""Length-grouped data order: every example once per epoch, less padding, still seed-determined."""

import numpy as np
import pytest
from training_fixtures import FakeDataset, tiny_lora_model

from jaxunlearn.errors import SettingsError
from jaxunlearn.train import TrainConfig, _DataOrder, finetune


def _epoch(order, steps_per_epoch, epoch):
    return [order.indices(epoch * steps_per_epoch + s) for s in range(steps_per_epoch)]


@pytest.mark.parametrize("num_examples", [200, 203])
def test_each_epoch_reads_every_example_once_in_length_homogeneous_steps(num_examples):
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 128, size=num_examples)
    config = TrainConfig(num_steps=100, batch_size=8, group_by_length=True)
    grouped = _DataOrder(num_examples, config, lengths)
    plain = _DataOrder(num_examples, TrainConfig(num_steps=100, batch_size=8), lengths)
    for epoch in range(2):
        steps = _epoch(grouped, grouped.steps_per_epoch, epoch)
        assert sorted(np.concatenate(steps).tolist()) == list(range(num_examples))
        padded = sum(len(s) * lengths[s].max() for s in steps)
        plain_steps = _epoch(plain, plain.steps_per_epoch, epoch)
        plain_padded = sum(len(s) * lengths[s].max() for s in plain_steps)
        # Sorting windows of 16 steps makes each step's examples nearly equal in length.
        assert padded < 0.75 * plain_padded
    # A partial last step (203 = 25 · 8 + 3) stays last, so every other step is full.
    assert [len(s) for s in steps[:-1]] == [8] * (len(steps) - 1)


def test_grouped_order_depends_only_on_seed_and_epoch():
    lengths = np.random.default_rng(1).integers(1, 50, size=100)
    config = TrainConfig(num_steps=50, batch_size=4, group_by_length=True, seed=3)
    first, second = _DataOrder(100, config, lengths), _DataOrder(100, config, lengths)
    # Reading steps out of order (as a resumed run does) gives the same indices.
    for step in [30, 2, 27, 2]:
        np.testing.assert_array_equal(first.indices(step), second.indices(step))
    other = _DataOrder(100, TrainConfig(num_steps=50, batch_size=4, group_by_length=True), lengths)
    assert not np.array_equal(first.indices(0), other.indices(0))


def test_group_by_length_needs_per_example_lengths():
    # FakeDataset has no `lengths` attribute.
    with pytest.raises(SettingsError, match="group_by_length needs train_data with per-example"):
        finetune(
            tiny_lora_model(),
            FakeDataset(8),
            config=TrainConfig(num_steps=2, batch_size=4, group_by_length=True),
            progress=False,
        )


def test_a_grouped_run_trains_like_a_plain_one():
    """Same data, same steps: grouping changes the order of the steps, not what is learned."""
    data = FakeDataset(8, seed=1, max_length=16)
    data.lengths = np.array([len(t) for t in data._tokens])
    final = {}
    for grouped in (False, True):
        config = TrainConfig(
            num_steps=40, batch_size=4, learning_rate=5e-2, eval_every=40, group_by_length=grouped
        )
        history = finetune(
            tiny_lora_model(), data, config=config, eval_data=data, progress=False
        ).history
        assert history.eval_losses[-1] < history.losses[0] - 0.3
        final[grouped] = history.eval_losses[-1]
    assert final[True] == pytest.approx(final[False], rel=0.2)
