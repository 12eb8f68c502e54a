"""Checkpointer and adapter saves: round trips, strict targets, and atomicity under SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training_fixtures import tiny_lora_model

from jaxunlearn.checkpoint import Checkpointer, load_adapter, save_adapter
from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.models import CheckpointError, split_lora


def small_tree(value: float):
    return {
        "weights": {"a": jnp.full((3, 2), value), "b": jnp.arange(4, dtype=jnp.int32)},
        "step": jnp.asarray(7, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(3)),
    }


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert np.asarray(got).dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_save_restore_round_trip_and_pruning(tmp_path):
    checkpointer = Checkpointer(tmp_path / "run", keep=2)
    assert checkpointer.latest_step() is None
    assert checkpointer.all_steps() == []
    for step in (1, 2, 3):
        checkpointer.save(step, small_tree(float(step)), metadata={"step": step, "tags": ("x",)})
    assert checkpointer.all_steps() == [2, 3]
    assert checkpointer.latest_step() == 3
    assert checkpointer.metadata() == {"step": 3, "tags": ["x"]}
    assert checkpointer.metadata(2)["step"] == 2
    assert_trees_equal(checkpointer.restore(target=small_tree(0.0)), small_tree(3.0))
    abstract = jax.eval_shape(lambda: small_tree(0.0))
    assert_trees_equal(checkpointer.restore(2, target=abstract), small_tree(2.0))
    checkpointer.close()

    reopened = Checkpointer(tmp_path / "run")
    assert reopened.all_steps() == [2, 3]
    with pytest.raises(FileExistsError, match="step 3 already exists"):
        reopened.save(3, small_tree(9.0))
    with pytest.raises(FileNotFoundError, match="No checkpoint step 1"):
        reopened.restore(1, target=small_tree(0.0))
    with pytest.raises(ValueError, match="JSON"):
        reopened.save(4, small_tree(4.0), metadata={"bad": object()})
    reopened.close()


@pytest.mark.parametrize("keep", [0, -1, 1.5])
def test_keep_must_be_a_positive_integer(tmp_path, keep):
    with pytest.raises(SettingsError, match="keep must be a positive integer") as caught:
        Checkpointer(tmp_path / "run", keep=keep)
    assert isinstance(caught.value, UserError)


def test_nnx_state_and_optimizer_state_round_trip(tmp_path):
    import optax

    _, lora, _ = split_lora(tiny_lora_model())
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    tree = {"trainable": lora, "opt_state": optimizer.init(lora)}
    with Checkpointer(tmp_path / "run") as checkpointer:
        checkpointer.save(5, tree)
        restored = checkpointer.restore(target=jax.eval_shape(lambda: tree))
    assert isinstance(restored["trainable"], nnx.State)
    assert_trees_equal(restored, tree)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: {**t, "rng": jnp.zeros(3, jnp.uint32)}, r"at rng: target uint32\[3\]"),
        (lambda t: {**t, "step": np.asarray(7, np.int64)}, r"at step: target int64"),
        (lambda t: {k: v for k, v in t.items() if k != "rng"}, "only in the checkpoint"),
        (lambda t: {**t, "extra": jnp.zeros(2)}, "only in the target"),
    ],
)
def test_restore_rejects_a_mismatched_target(tmp_path, change, message):
    with Checkpointer(tmp_path / "run") as checkpointer:
        checkpointer.save(1, small_tree(1.0))
        with pytest.raises(CheckpointError, match=message) as caught:
            checkpointer.restore(target=change(small_tree(0.0)))
        assert isinstance(caught.value, UserError)


def test_adapter_round_trip_and_no_overwrite(tmp_path):
    _, lora, _ = split_lora(tiny_lora_model())
    lora = jax.tree.map(lambda x: x + 0.5, lora)
    metadata = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj", "down_proj"]}
    path = tmp_path / "adapter"
    save_adapter(path, lora, metadata=metadata)
    loaded, loaded_metadata = load_adapter(path, target=jax.eval_shape(lambda: lora))
    assert loaded_metadata == metadata
    assert_trees_equal(loaded, lora)
    with pytest.raises(FileExistsError, match="new path"):
        save_adapter(path, lora, metadata=metadata)
    with pytest.raises(CheckpointError, match="does not match"):
        load_adapter(path, target={"lora": jnp.zeros(3)})
    with pytest.raises(FileNotFoundError):
        load_adapter(tmp_path / "missing", target=lora)


# Saves a small step 1, then a ~64 MB step 2 whose save the parent interrupts with SIGKILL.
_SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from jaxunlearn.checkpoint import Checkpointer

    checkpointer = Checkpointer(sys.argv[1])
    checkpointer.save(1, {"w": np.arange(8, dtype=np.float32)}, metadata={"step": 1})
    big = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
    tree = {"w": np.arange(8, dtype=np.float32) + 1, "big": [big + i for i in range(16)]}
    print("saving", flush=True)
    checkpointer.save(2, tree, metadata={"step": 2})
    print("saved", flush=True)
    """
)


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    directory = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "saving"
        # Kill once orbax has started writing step 2 (its temporary directory exists), so the
        # signal lands in the middle of the save rather than before it.
        deadline = time.monotonic() + 60
        while not any(name.startswith("2.") for name in os.listdir(directory)):
            assert child.poll() is None, "the child finished the save before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    left = sorted(os.listdir(directory))
    with Checkpointer(directory) as checkpointer:
        if checkpointer.all_steps() == [1, 2]:
            # The save finished before the signal landed: then step 2 must be whole.
            restored = checkpointer.restore(
                target={
                    "w": np.zeros(8, np.float32),
                    "big": [np.zeros(1 << 20, np.float32) for _ in range(16)],
                }
            )
            np.testing.assert_array_equal(restored["w"], np.arange(8, dtype=np.float32) + 1)
            return
        # Killed mid-save: step 2's temporary directory is left behind, never listed as a step.
        assert checkpointer.all_steps() == [1]
        assert checkpointer.latest_step() == 1
        assert any(name.startswith("2.") and "tmp" in name for name in left), left
        restored = checkpointer.restore(target={"w": np.zeros(8, np.float32)})
        np.testing.assert_array_equal(restored["w"], np.arange(8, dtype=np.float32))
        assert checkpointer.metadata() == {"step": 1}
        # The interrupted step can be written again, as a resumed run would do.
        checkpointer.save(2, {"w": np.ones(8, np.float32)})
        assert checkpointer.all_steps() == [1, 2]
