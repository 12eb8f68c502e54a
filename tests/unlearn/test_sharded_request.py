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


TWO_PROCESSES = os.path.join(os.path.dirname(__file__), "two_process_request.py")


@pytest.mark.multi_device
def test_two_processes_apply_one_request_as_one_process_does(tmp_path):
    """`unlearn --distributed` on two processes × 4 devices: the single-process adapter, one
    ledger chain written once, and the output printed once."""
    import json
    import shutil

    import jax
    import numpy as np
    from multi_device import run_processes
    from sharded_request import SETTINGS, fine_tune

    from jaxunlearn.data import load_examples
    from jaxunlearn.models import split_lora
    from jaxunlearn.unlearn import Ledger, Removal, Sources, apply_request, open_adapter

    assets = fine_tune(tmp_path)
    forget = [example.id for example in load_examples(assets["data"])][:3]
    for name in ("single", "pair"):
        shutil.copytree(assets["run"], tmp_path / f"run-{name}")
    single_run = tmp_path / "run-single"
    single = apply_request(
        Removal(forget),
        adapter=single_run / "adapter",
        out=single_run / "unlearned",
        sources=Sources(base_model=assets["model"], data=assets["data"]),
        ledger=single_run / "unlearn-ledger.jsonl",
        settings=SETTINGS,
        log=lambda line: None,
    )
    run_processes(TWO_PROCESSES, str(tmp_path), ",".join(forget), processes=2, devices=4)
    reports = [json.loads((tmp_path / f"process-{i}.json").read_text()) for i in (0, 1)]
    assert [(r["status"], r["processes"], r["devices"]) for r in reports] == [(0, 2, 8)] * 2
    # The writer prints the outcome; the other process prints nothing.
    assert reports[1]["stdout"] == ""
    outcome = json.loads(reports[0]["stdout"])
    assert outcome["applied"]
    assert outcome["num_examples"] == 3
    pair_run = tmp_path / "run-pair"
    pair_lora = split_lora(open_adapter(pair_run / "unlearned", assets["model"]).model)[1]
    single_lora = split_lora(open_adapter(single_run / "unlearned", assets["model"]).model)[1]
    for got, want in zip(jax.tree.leaves(pair_lora), jax.tree.leaves(single_lora), strict=True):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)
    for name in ("update_norm", "held_objective_after"):
        assert outcome["figures"][name] == pytest.approx(single.figures[name], rel=1e-5)
    # One writer: the ledger holds the fine-tune's root, one intent and one commit, in a
    # chain that verifies, and no staging folder is left behind.
    records = Ledger(pair_run / "unlearn-ledger.jsonl").records()
    assert [record.type for record in records] == ["root", "intent", "commit"]
    assert records[1]["adapter_digest"] == outcome["adapter_digest"]
    assert sorted(entry.name for entry in pair_run.iterdir() if "staging" in entry.name) == []
