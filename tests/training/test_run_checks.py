"""finetune refuses a diverged run and resumes only on the data its checkpoints were trained on."""

import dataclasses
import logging

import numpy as np
import pytest
from training_fixtures import DROPOUT, RESUME_CONFIG, FakeDataset, lora_arrays, tiny_lora_model

from jaxunlearn.checkpoint import Checkpointer
from jaxunlearn.errors import UserError
from jaxunlearn.train import ResumeMismatchError, TrainConfig, TrainingDivergedError, finetune

# The resume test's config in test_train.py: the same compiled step.
SHORT = dataclasses.replace(RESUME_CONFIG, num_steps=2, warmup_steps=0)
FAR_TOO_HIGH = TrainConfig(learning_rate=1e4, num_steps=2, batch_size=8)


def all_equal(left, right) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(left, right, strict=True))


def test_a_far_too_high_learning_rate_is_refused_and_nothing_is_saved(tmp_path):
    # Measured at 1e4: the loss stays near a uniform guess's (about 4.1) while every adapter
    # weight moves by about 1e4 per step; only the size of the move shows the divergence.
    model = tiny_lora_model()
    before = lora_arrays(model)
    config = dataclasses.replace(FAR_TOO_HIGH, checkpoint_every=1)
    with pytest.raises(
        TrainingDivergedError,
        match=r"by step 1: a trained parameter moved by .* loss was 4\.\d+ at learning rate "
        r"1e\+04.*Lower the learning rate",
    ) as caught:
        finetune(model, FakeDataset(8, seed=1), config=config, checkpoint_dir=tmp_path / "run")
    assert isinstance(caught.value, UserError)
    assert isinstance(caught.value, RuntimeError)
    assert all_equal(lora_arrays(model), before)  # the model keeps its weights
    assert Checkpointer(tmp_path / "run").all_steps() == []


def test_the_check_also_runs_after_the_last_step_without_checkpoints():
    with pytest.raises(TrainingDivergedError, match="by step 2: a trained parameter moved"):
        finetune(tiny_lora_model(), FakeDataset(8, seed=1), config=FAR_TOO_HIGH, progress=False)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_parameters_are_refused():
    # 1e39 is a finite Python float but infinite in float32: the first update makes the
    # adapters infinite or NaN, while the loss of that step (taken before it) is finite.
    config = TrainConfig(learning_rate=1e39, num_steps=1, batch_size=8)
    with pytest.raises(TrainingDivergedError, match="by step 1: the trained parameters are not"):
        finetune(tiny_lora_model(), FakeDataset(8, seed=1), config=config, progress=False)


def test_a_normal_run_stays_far_below_the_bound():
    model = tiny_lora_model()
    before = lora_arrays(model)
    config = TrainConfig(learning_rate=5e-2, num_steps=4, batch_size=8)
    finetune(model, FakeDataset(8, seed=1), config=config, progress=False)
    moved = max(np.max(np.abs(a - b)) for a, b in zip(lora_arrays(model), before, strict=True))
    assert 0 < moved < 1.0  # the bound is 1000


@pytest.fixture
def trained_run(tmp_path):
    """A finished two-step run with checkpoints: (directory, its training data)."""
    directory, data = tmp_path / "run", FakeDataset(8, seed=3)
    finetune(
        tiny_lora_model(dropout=DROPOUT),
        data,
        config=SHORT,
        checkpoint_dir=directory,
        progress=False,
    )
    return directory, data


def test_resuming_on_other_tokens_is_refused(trained_run):
    directory, _ = trained_run
    other = FakeDataset(8, seed=4)  # the same ids and size, other token sequences
    with pytest.raises(ResumeMismatchError, match="holds other tokens") as caught:
        finetune(tiny_lora_model(), other, config=SHORT, checkpoint_dir=directory, resume=True)
    assert isinstance(caught.value, UserError)


def test_resuming_on_other_example_ids_is_refused(trained_run):
    directory, _ = trained_run
    renamed = FakeDataset(8, seed=3)
    renamed.ids = [f"other-{i}" for i in range(8)]
    with pytest.raises(ResumeMismatchError, match="holds other example ids"):
        finetune(tiny_lora_model(), renamed, config=SHORT, checkpoint_dir=directory, resume=True)


def test_resuming_on_the_same_data_works(trained_run):
    directory, data = trained_run
    again = FakeDataset(8, seed=3)  # another object with the same content
    assert again is not data
    history = finetune(
        tiny_lora_model(dropout=DROPOUT),
        again,
        config=SHORT,
        checkpoint_dir=directory,
        resume=True,
        progress=False,
    ).history
    assert history.resumed_from == 2


def test_a_checkpoint_without_a_data_digest_resumes_with_a_warning(tmp_path, monkeypatch, caplog):
    save = Checkpointer.save

    def save_as_older_versions_did(self, step, tree, /, *, metadata=None):
        metadata = {key: value for key, value in metadata.items() if key != "train_data"}
        save(self, step, tree, metadata=metadata)

    directory = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", save_as_older_versions_did)
        data = FakeDataset(8, seed=3)
        finetune(tiny_lora_model(dropout=DROPOUT), data, config=SHORT, checkpoint_dir=directory)
    with Checkpointer(directory) as checkpointer:
        assert "train_data" not in checkpointer.metadata()
    with caplog.at_level(logging.WARNING, logger="jaxunlearn.train"):
        history = finetune(
            tiny_lora_model(dropout=DROPOUT),
            FakeDataset(8, seed=4),  # not even the same data: nothing records what it was
            config=SHORT,
            checkpoint_dir=directory,
            resume=True,
            progress=False,
        ).history
    assert history.resumed_from == 2
    assert "records no digest of its training data" in caplog.text
