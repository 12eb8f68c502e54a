"""finetune: learning, determinism, gradient accumulation, frozen weights, and exact resume."""

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from flax import nnx
from training_fixtures import (
    DROPOUT,
    RESUME_CONFIG,
    FakeDataset,
    base_arrays,
    lora_arrays,
    tiny_lora_model,
    tiny_model,
)

from jaxunlearn.checkpoint import Checkpointer
from jaxunlearn.data import DataError
from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.train import ResumeMismatchError, TrainConfig, finetune

HERE = os.path.dirname(os.path.abspath(__file__))


def all_equal(left, right) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(left, right, strict=True))


@pytest.fixture(scope="module")
def lora_run():
    """A LoRA fine-tune of 40 steps on 8 examples: (model, history, weights before)."""
    model = tiny_lora_model()
    before = {"lora": lora_arrays(model), "base": base_arrays(model)}
    data = FakeDataset(8, seed=1)
    config = TrainConfig(learning_rate=5e-2, num_steps=40, batch_size=8, eval_every=10)
    result = finetune(model, data, config=config, eval_data=data, progress=True)
    assert result.model is model
    return model, result.history, before


def test_loss_decreases_on_memorizable_data(lora_run):
    _, history, _ = lora_run
    assert history.steps == list(range(1, 41))
    assert history.eval_steps == [10, 20, 30, 40]
    assert np.all(np.diff(history.eval_losses) < 0), history.eval_losses
    assert history.eval_losses[-1] < history.losses[0] - 0.3, (
        history.losses[0],
        history.eval_losses,
    )
    assert all(rate > 0 for rate in history.tokens_per_second)
    assert history.wall_seconds > 0
    assert history.resumed_from is None


def test_lora_training_changes_only_the_adapters(lora_run):
    model, _, before = lora_run
    assert all_equal(base_arrays(model), before["base"])
    changed = [
        not np.array_equal(a, b) for a, b in zip(lora_arrays(model), before["lora"], strict=True)
    ]
    assert all(changed)


def test_full_parameter_training_with_tied_embeddings():
    model = tiny_model(tied=True)
    embedding = np.array(model.model.embed_tokens[...])
    data = FakeDataset(8, seed=2)
    config = TrainConfig(learning_rate=1e-2, num_steps=20, batch_size=8, eval_every=20)
    history = finetune(
        model, data, config=config, eval_data=data, trainable=nnx.Param, progress=False
    ).history
    assert not np.array_equal(np.array(model.model.embed_tokens[...]), embedding)
    assert model.lm_head is None
    assert history.eval_losses[-1] < 0.5 * history.losses[0]


def test_same_seed_is_bit_identical_and_another_seed_differs():
    data = FakeDataset(8, seed=3)
    adapters = []
    for seed in (5, 5, 6):
        model = tiny_lora_model(dropout=DROPOUT)
        config = dataclasses.replace(RESUME_CONFIG, seed=seed)
        finetune(model, data, config=config, progress=False)
        adapters.append(lora_arrays(model))
    assert all_equal(adapters[0], adapters[1])
    assert not any(np.array_equal(a, b) for a, b in zip(adapters[0], adapters[2], strict=True))


def test_gradient_accumulation_equals_one_big_batch():
    # 10 examples in steps of 8: every second step holds 2 examples, which 4 micro-batches of 2
    # rows split as 1, 1, 0, 0 (two micro-batches are all padding).
    # Lengths up to 14 tokens: micro-batches of one step fall in different length buckets.
    data = FakeDataset(10, seed=4, max_length=14)
    adapters, losses = {}, {}
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        model = tiny_lora_model()
        config = TrainConfig(
            learning_rate=1e-2, num_steps=4, batch_size=batch_size, grad_accumulation=accumulation
        )
        history = finetune(model, data, config=config, progress=False).history
        adapters[accumulation], losses[accumulation] = lora_arrays(model), history.losses
    initial = lora_arrays(tiny_lora_model())
    change = max(np.max(np.abs(a - b)) for a, b in zip(adapters[1], initial, strict=True))
    for accumulation in (2, 4):
        np.testing.assert_allclose(losses[accumulation], losses[1], rtol=1e-6)
        # Adam divides each coordinate by its own gradient scale, so float32 rounding in tiny
        # gradient coordinates shows up in the training move: ~3e-5 of it on one machine, 2.7e-4
        # in one coordinate of 128 on another (XLA compiles for the host CPU, so its sums may
        # run in another order). Averaging the micro-batch means without
        # weighting them by their real examples is off by ~0.25 of it here.
        for got, want in zip(adapters[accumulation], adapters[1], strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * change)


def test_l2_regularization_is_part_of_the_objective():
    """Two steps with the penalty equal AdamW on the gradient of mean loss + (μ/2)‖Θ‖²."""
    import jax
    import optax

    from jaxunlearn.batch import mean_loss

    data, mu, learning_rate = FakeDataset(8, seed=2), 0.5, 1e-2
    config = TrainConfig(
        learning_rate=learning_rate, num_steps=2, batch_size=8, l2_regularization=mu
    )
    trained = tiny_lora_model()
    finetune(trained, data, config=config, progress=False)

    # Each step holds all 8 examples, so the mean loss is the same whatever their order.
    model = tiny_lora_model()
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    batch = data.batch(np.arange(8), batch_size=8)

    def objective(params, penalty):
        merged = nnx.merge(graphdef, params, rest)
        loss = mean_loss(merged(batch.input_ids, batch.attention_mask), batch)
        return loss + 0.5 * penalty * optax.tree.norm(params, squared=True)

    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, 0, 2)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))

    @jax.jit  # one compilation for both replays, instead of op-by-op dispatch
    def step(current, state, penalty):
        grads = jax.grad(objective)(current, penalty)
        updates, state = optimizer.update(grads, state, current)
        return optax.apply_updates(current, updates), state

    def replay(penalty):
        state, current = optimizer.init(params), params
        for _ in range(2):
            current, state = step(current, state, penalty)
        return [np.asarray(leaf) for leaf in jax.tree.leaves(current)]

    got = lora_arrays(trained)
    penalized, plain = replay(mu), replay(0.0)
    initial = lora_arrays(tiny_lora_model())
    change = max(np.max(np.abs(a - b)) for a, b in zip(penalized, initial, strict=True))
    # As in the gradient-accumulation test: Adam divides each coordinate by its own gradient
    # scale, so float32 rounding of tiny coordinates shows up at ~1e-5 of the training move.
    for g, want in zip(got, penalized, strict=True):
        np.testing.assert_allclose(g, want, rtol=0, atol=2e-4 * change)
    # The penalty moved the adapter by far more than that tolerance.
    difference = max(np.max(np.abs(a - b)) for a, b in zip(penalized, plain, strict=True))
    assert difference > 0.05 * change


def test_compilation_is_timed_apart_and_done_once_per_shape(caplog):
    """Each batch shape compiles once, ahead of its first step (which reuses the executable)."""
    import jax

    data = FakeDataset(10, seed=4, max_length=14)
    # A learning rate no other test uses: the step is static in it, so it compiles afresh here.
    config = TrainConfig(learning_rate=1.234e-2, num_steps=6, batch_size=4)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            history = finetune(tiny_lora_model(), data, config=config, progress=False).history
    finally:
        jax.config.update("jax_log_compiles", False)
    compiles = [
        r.getMessage() for r in caplog.records if "Compiling jit(_train_step)" in r.getMessage()
    ]
    # The message names the argument shapes: a second compilation of one shape would repeat it.
    assert compiles
    assert len(compiles) == len(set(compiles))
    assert 0 < history.compile_seconds < history.wall_seconds


# Runs RESUME_CONFIG and hangs right after writing checkpoint 4, until the parent kills it.
_KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    from jaxunlearn.checkpoint import Checkpointer
    from jaxunlearn.train import finetune
    from training_fixtures import DROPOUT, RESUME_CONFIG, FakeDataset, tiny_lora_model

    save = Checkpointer.save

    def save_then_hang(self, step, tree, /, **kwargs):
        save(self, step, tree, **kwargs)
        print(f"saved {step}", flush=True)
        if step == 4:
            time.sleep(600)

    Checkpointer.save = save_then_hang
    finetune(tiny_lora_model(dropout=DROPOUT), FakeDataset(8, seed=3), config=RESUME_CONFIG,
             eval_data=FakeDataset(3, seed=9), checkpoint_dir=sys.argv[1], progress=False)
    print("finished", flush=True)
    """
)


def test_resume_after_sigkill_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    directory = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, directory],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(120, child.kill)
    watchdog.start()
    try:
        lines = [child.stdout.readline().strip() for _ in range(2)]
        assert lines == ["saved 2", "saved 4"], (lines, child.stderr.read()[-3000:])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    with Checkpointer(directory) as checkpointer:
        assert checkpointer.all_steps() == [2, 4]
        assert checkpointer.metadata()["data_position"] == {"epoch": 2, "offset": 0}

    data, eval_data = FakeDataset(8, seed=3), FakeDataset(3, seed=9)
    resumed_model = tiny_lora_model(dropout=DROPOUT)
    resumed = finetune(
        resumed_model,
        data,
        config=RESUME_CONFIG,
        eval_data=eval_data,
        checkpoint_dir=directory,
        resume=True,
        progress=False,
    ).history
    straight_model = tiny_lora_model(dropout=DROPOUT)
    straight = finetune(
        straight_model, data, config=RESUME_CONFIG, eval_data=eval_data, progress=False
    ).history

    assert resumed.resumed_from == 4
    assert all_equal(lora_arrays(resumed_model), lora_arrays(straight_model))
    assert resumed.losses == straight.losses
    assert resumed.eval_steps == straight.eval_steps == [3, 6]
    assert resumed.eval_losses == straight.eval_losses
    assert Checkpointer(directory).all_steps() == [4, 6]


def test_resume_checks_the_run_and_refuses_to_overwrite(tmp_path, caplog):
    directory = str(tmp_path / "run")
    data = FakeDataset(8, seed=3)
    config = dataclasses.replace(RESUME_CONFIG, num_steps=2, warmup_steps=0)

    with caplog.at_level(logging.INFO, logger="jaxunlearn.train"):
        model = tiny_lora_model(dropout=DROPOUT)
        finetune(model, data, config=config, checkpoint_dir=directory, resume=True, progress=False)
    assert "training from scratch" in caplog.text
    trained = lora_arrays(model)

    with pytest.raises(FileExistsError, match="pass resume=True"):
        finetune(tiny_lora_model(), data, config=config, checkpoint_dir=directory)
    changed = dataclasses.replace(config, learning_rate=2e-2)
    with pytest.raises(ResumeMismatchError, match=r"learning_rate: 0\.01 -> 0\.02") as caught:
        finetune(tiny_lora_model(), data, config=changed, checkpoint_dir=directory, resume=True)
    assert isinstance(caught.value, UserError)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ResumeMismatchError, match="trained on 8 examples, train_data has 9"):
        finetune(
            tiny_lora_model(), FakeDataset(9), config=config, checkpoint_dir=directory, resume=True
        )
    with pytest.raises(ResumeMismatchError, match="do not match"):
        finetune(
            tiny_lora_model(),
            data,
            config=config,
            checkpoint_dir=directory,
            resume=True,
            trainable=nnx.Param,
        )

    # A finished run resumes to its final adapter without training; settings that do not change
    # the adapter may differ.
    model = tiny_lora_model(dropout=DROPOUT)
    untouched = dataclasses.replace(config, eval_every=1, checkpoint_every=1)
    history = finetune(
        model, data, config=untouched, checkpoint_dir=directory, resume=True, progress=False
    ).history
    assert history.resumed_from == 2
    assert history.steps == [1, 2]
    assert all_equal(lora_arrays(model), trained)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("num_steps", 0),
        ("batch_size", -1),
        ("grad_accumulation", 1.5),
        ("max_grad_norm", 0),
        ("weight_decay", -0.1),
        ("l2_regularization", -1e-3),
        ("l2_regularization", float("inf")),
        ("eval_every", 0),
        ("checkpoint_every", True),
        ("keep_checkpoints", 0),
        ("seed", -1),
        ("warmup_steps", 100),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(SettingsError, match=field) as caught:
        TrainConfig(**{field: value})
    assert isinstance(caught.value, UserError)
    assert isinstance(caught.value, ValueError)  # what callers caught before


def test_bad_arguments():
    data = FakeDataset(4)
    with pytest.raises(SettingsError, match="checkpoint_dir"):
        finetune(tiny_lora_model(), data, config=TrainConfig(), resume=True)
    with pytest.raises(SettingsError, match="selects no parameter"):
        finetune(tiny_model(), data, config=TrainConfig(), progress=False)
    with pytest.raises(DataError, match="no example"):
        finetune(tiny_lora_model(), FakeDataset(0), config=TrainConfig())
    with pytest.raises(DataError, match="eval_data holds no example"):
        finetune(tiny_lora_model(), data, config=TrainConfig(), eval_data=FakeDataset(0))
