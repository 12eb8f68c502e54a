"""`jaxunlearn unlearn --distributed` on two processes gives the one-process adapter.

Its own file, so that the test runner's workers (which take whole files) run it beside the
one-process mesh request rather than after it.
"""

import os

import pytest

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


@pytest.mark.multi_device
def test_a_failure_only_the_writer_meets_stops_every_process(tmp_path):
    """Process 0 alone fails (its storage refuses the ledger, injected) while process 1 has
    nothing to do at that step: both exit 2 at once, each with one line, instead of process 1
    waiting forever for a writer that has stopped; and nothing is recorded."""
    import json
    import shutil

    from multi_device import run_processes
    from sharded_request import fine_tune

    from jaxunlearn.data import load_examples
    from jaxunlearn.unlearn import Ledger

    assets = fine_tune(tmp_path)
    forget = [example.id for example in load_examples(assets["data"])][:3]
    shutil.copytree(assets["run"], tmp_path / "run-pair")
    arguments = (str(tmp_path), ",".join(forget), "writer-fails")
    run_processes(TWO_PROCESSES, *arguments, processes=2, devices=4, timeout=300)
    reports = [json.loads((tmp_path / f"process-{i}.json").read_text()) for i in (0, 1)]
    assert [report["status"] for report in reports] == [2, 2]
    errors = [report["stderr"].strip() for report in reports]
    assert all(error.count("\n") == 0 for error in errors), errors
    assert "injected: cannot write" in errors[0]
    assert "Process 0 of this run failed at 'jaxunlearn: ledger recovered'" in errors[1]
    assert [r.type for r in Ledger(tmp_path / "run-pair" / "unlearn-ledger.jsonl").records()] == [
        "root"
    ]
    assert not (tmp_path / "run-pair" / "unlearned").exists()
