"""`jaxunlearn finetune --distributed` on two processes gives the one-process adapter, and
registers it once."""

import json
import os

import jax
import numpy as np
import pytest
from multi_device import run_processes
from sharded_request import fine_tune

from jaxunlearn.models import split_lora
from jaxunlearn.unlearn import Ledger, open_adapter

TWO_PROCESSES = os.path.join(os.path.dirname(__file__), "two_process_finetune_cli.py")


@pytest.mark.multi_device
def test_two_processes_fine_tune_as_one_process_does(tmp_path):
    assets = fine_tune(tmp_path)  # the one-process run, on one device
    run_processes(TWO_PROCESSES, str(tmp_path), processes=2, devices=4)
    reports = [json.loads((tmp_path / f"process-{i}.json").read_text()) for i in (0, 1)]
    assert [(r["status"], r["processes"], r["devices"]) for r in reports] == [(0, 2, 8)] * 2
    # The writer prints the summary and writes training.json; the other process prints nothing.
    assert reports[1]["stdout"] == ""
    summary = json.loads(reports[0]["stdout"])
    assert summary["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    pair = tmp_path / "run-pair"
    assert json.loads((pair / "training.json").read_text()) == summary
    single_summary = json.loads((assets["run"] / "training.json").read_text())
    assert summary["final_loss"] == pytest.approx(single_summary["final_loss"], rel=1e-5)
    # 30 AdamW steps from the same initialization: float32 summation order is the only
    # difference between one device and 8 devices of two processes.
    pair_lora = split_lora(open_adapter(pair / "adapter", assets["model"]).model)[1]
    single_lora = split_lora(open_adapter(assets["run"] / "adapter", assets["model"]).model)[1]
    for got, want in zip(jax.tree.leaves(pair_lora), jax.tree.leaves(single_lora), strict=True):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    # Registered once, by the writer: the ledger holds one root, the adapter's.
    records = Ledger(pair / "unlearn-ledger.jsonl").records()
    assert [record.type for record in records] == ["root"]
    assert records[0]["adapter"] == os.fspath(pair / "adapter")
