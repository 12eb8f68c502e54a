"""Scores, divergences, PII extraction and generation on a device mesh give the one-device
answers, with the generated tokens split by rows."""

import os

import pytest
from multi_device import run_report

SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_evaluation.py")


@pytest.mark.multi_device
def test_evaluation_on_a_mesh_matches_one_device():
    report = run_report(SCRIPT, "2", "2", "2")
    print(report)
    # float32 summation order over split rows, widths and vocabulary is the only difference.
    assert report["loss_error"] <= 1e-6
    assert report["min_k_error"] <= 1e-6
    assert report["min_k_plus_plus_error"] <= 1e-5
    assert report["token_counts_equal"]
    assert report["kl"][0] > 0
    assert report["kl_error"] <= 1e-4
    # Greedy completions (left-padded prompts, a key-value cache split by rows) are the same.
    assert report["completions"] == 11
    assert report["completions_equal"]
    assert report["tokens_equal"]
    assert report["lengths_equal"]
    assert report["token_spec"][0] == ["data", "fsdp"]
    assert report["token_devices"] == 8
    assert "evaluation batch size 6 cannot be split" in report["refusal"]
