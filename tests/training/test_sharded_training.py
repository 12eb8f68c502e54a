"""Fine-tuning on a device mesh gives the single-device adapter, with the state sharded."""

import os

import pytest
from jax.sharding import AbstractMesh
from multi_device import run_report
from training_fixtures import FakeDataset, tiny_lora_model

from jaxunlearn import parallel
from jaxunlearn.errors import SettingsError
from jaxunlearn.train import TrainConfig, finetune

SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_finetune.py")


@pytest.mark.multi_device
def test_finetune_on_a_mesh_matches_one_device_and_shards_its_state():
    report = run_report(SCRIPT, "4", "2")
    print(report)
    # Dropout on, two micro-batches per step, three steps: float32 reduction order only.
    assert report["lora_relative_error"] <= 1e-5
    assert report["loss_error"] <= 1e-5
    assert report["eval_loss_error"] <= 1e-5
    # The run resumed on the mesh reads back exactly what the mesh run wrote.
    assert report["resumed_relative_error"] == 0.0
    assert report["specs"] == {
        "q_lora_a": ["fsdp", None],
        "q_lora_b": [None, "tensor"],
        "q_kernel": ["fsdp", "tensor"],
        "down_lora_a": ["tensor", None],
    }
    # Adam's moments are sharded like the parameters, its step count replicated, and all of
    # the optimizer state is on the mesh's 8 devices (not on the first one).
    assert report["adam_mu_q_lora_a"] == ["fsdp", None]
    assert report["adam_count"] == []
    assert report["opt_state_devices"] == [8]
    # Each device holds its share of the base model and no more: an eighth of every matrix,
    # the norms whole.
    held, expected = report["base_share"]
    assert held == pytest.approx(expected)
    assert expected < 0.15


def test_a_batch_the_mesh_cannot_split_is_refused():
    mesh = AbstractMesh((1, 4, 1), parallel.MESH_AXES)
    with pytest.raises(SettingsError, match=r"6 rows cannot be split .* fsdp=4 .* multiple of 4"):
        parallel.batch_shardings(6, mesh)
    assert parallel.batch_shardings(8, mesh).input_ids.spec == parallel.logical_to_mesh(
        ("batch", None), mesh=mesh
    )


def test_finetune_refuses_the_batch_before_moving_the_model():
    model = tiny_lora_model()
    config = TrainConfig(num_steps=1, batch_size=3, warmup_steps=0)
    mesh = AbstractMesh((1, 2, 1), parallel.MESH_AXES)
    with pytest.raises(SettingsError, match="3 rows cannot be split"):
        finetune(model, FakeDataset(4), config=config, mesh=mesh, progress=False)


TWO_PROCESSES = os.path.join(os.path.dirname(__file__), "two_process_finetune.py")


@pytest.mark.multi_device
def test_two_processes_on_one_mesh_reproduce_the_single_process_fine_tune(tmp_path):
    import jax
    import numpy as np
    from flax import nnx
    from multi_device import run_processes
    from sharded_finetune import CONFIG

    from jaxunlearn.unlearn import tree_digest

    out = tmp_path / "lora.npz"
    run_processes(TWO_PROCESSES, str(out), processes=2, devices=4)
    single = tiny_lora_model(dropout=0.1)
    run = finetune(
        single, FakeDataset(32, seed=1), config=CONFIG, eval_data=FakeDataset(8, seed=2),
        progress=False,
    )  # fmt: skip
    saved = np.load(out)
    want = [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(single, nnx.LoRAParam))]
    got = [saved[f"arr_{index}"] for index in range(len(want))]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w)
    np.testing.assert_allclose(saved["losses"], run.history.losses, rtol=1e-5)
    # The digest of the adapter split over both processes is the digest of its whole arrays.
    structure = jax.tree.structure(nnx.state(single, nnx.LoRAParam))
    assert str(saved["digest"]) == tree_digest(jax.tree.unflatten(structure, got))
