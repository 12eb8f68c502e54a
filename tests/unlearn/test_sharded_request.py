"""An unlearning request on a device mesh gives the single-device adapter."""

import os

import pytest
from jax.sharding import AbstractMesh
from multi_device import run_report

from jaxunlearn import parallel
from jaxunlearn.errors import SettingsError
from jaxunlearn.unlearn import CurvatureSettings, EraserSettings, LLMEraser, UnlearningContext

SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_request.py")


@pytest.mark.multi_device
def test_a_request_on_a_mesh_matches_one_device_and_keeps_the_adapter_sharded():
    report = run_report(SCRIPT, "4", "2")
    print(report)
    assert report["applied"] == [True, True]
    # The same request through apply_request: base read block by block onto fsdp=4 × tensor=2,
    # gradients, the curvature sample's products and CG on the mesh. Float32 summation order
    # is the only difference (the adapter's own rounding is 6e-8 of its norm).
    assert report["lora_relative_error"] <= 1e-6
    for name, (single, sharded) in report["figures"].items():
        assert sharded == pytest.approx(single, rel=1e-5), name
    # LiSSA draws its mini-batches on the devices (split over fsdp as they are drawn): the same
    # draws as on one device, so the same answer to rounding.
    assert report["lissa_relative_error"] <= 1e-6
    # The curvature sample recomputed batch by batch on the mesh (no saved linearization):
    # the same products, so the adapter of the saved linearizations on the same mesh.
    assert report["recomputed_relative_error"] <= 1e-6
    assert report["recomputed_devices"] == [8]
    # The new adapter is laid out like the adapter it came from, on all 8 devices.
    assert (
        report["specs"]
        == report["reference_specs"]
        == {
            "q_lora_a": ["fsdp", None],
            "q_lora_b": [None, "tensor"],
            "down_lora_a": ["tensor", None],
        }
    )
    assert report["lora_devices"] == [8]
    held, expected = report["base_share"]
    assert held == pytest.approx(expected)
    assert expected < 0.15


def test_a_curvature_batch_the_mesh_cannot_split_is_refused_when_settling():
    placement = parallel.Placement(AbstractMesh((2, 2, 1), parallel.MESH_AXES))
    context = UnlearningContext(
        model=None,
        examples=(),
        data=None,
        tokenizer=None,
        adapter_digest="",
        data_digest="",
        train_config={"l2_regularization": 1e-3},
        placement=placement,
    )
    with pytest.raises(SettingsError, match=r"curvature batch size \(--batch-size\) 6 .* 4 batch"):
        LLMEraser().settle(EraserSettings(curvature=CurvatureSettings(batch_size=6)), context)
    settled, _ = LLMEraser().settle(EraserSettings(), context)
    assert settled.curvature.batch_size == 8
