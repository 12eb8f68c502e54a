"""The `jaxunlearn` command end to end on a tiny checkpoint."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_assets import make_tiny_checkpoint

from jaxunlearn.adapter import load_lora
from jaxunlearn.cli import main
from jaxunlearn.data import load_examples
from jaxunlearn.models import load


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def corpus_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["make-data", "--people", "4", "--seed", "1", "--out", str(root / "corpus")]) == 0
    return root, make_tiny_checkpoint(root / "model")


def test_make_data_writes_the_corpus_and_refuses_to_overwrite(corpus_and_model, capsys):
    root, _ = corpus_and_model
    manifest = json.loads((root / "corpus" / "manifest.json").read_text())
    assert manifest["seed"] == 1
    assert len(load_examples(root / "corpus" / "train.jsonl")) > 0
    status = main(["make-data", "--people", "4", "--seed", "1", "--out", str(root / "corpus")])
    assert status == 2
    assert "error" in capsys.readouterr().err


def test_finetune_writes_an_adapter_that_changes_the_model(corpus_and_model, tmp_path):
    root, model_dir = corpus_and_model
    data = root / "corpus" / "train.jsonl"
    arguments = ["finetune", "--model", str(model_dir), "--data", str(data)]
    arguments += ["--out", str(tmp_path / "run"), "--steps", "4", "--batch-size", "4"]
    arguments += ["--targets", "all", "--rank", "2", "--learning-rate", "1e-2", "--no-progress"]
    assert main(arguments) == 0
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["steps"] == 4
    assert np.isfinite(summary["final_loss"])
    tuned, metadata = load_lora(load(model_dir), tmp_path / "run" / "adapter")
    assert metadata["example_ids"] == [example.id for example in load_examples(data)]
    assert metadata["lora"]["targets"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    ids = jnp.asarray([[1, 40, 41, 42, 43]])
    assert not np.allclose(np.asarray(tuned(ids)), np.asarray(load(model_dir)(ids)))
    # The run is complete: resuming it trains nothing and keeps the adapter.
    assert main([*arguments, "--resume"]) == 0


def test_finetune_reports_bad_input_in_one_line(corpus_and_model, tmp_path, capsys):
    root, model_dir = corpus_and_model
    data = root / "corpus" / "train.jsonl"
    base = ["finetune", "--model", str(model_dir), "--out", str(tmp_path / "run")]
    assert main([*base, "--data", str(data), "--response-column", "answer"]) == 2
    assert "no column 'answer'" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main([*base, "--data", str(data), "--targets", "c_attn"]) == 2
    assert "c_attn" in capsys.readouterr().err
    assert main([*base, "--data", str(data), "--max-length", "8"]) == 2
    assert "tokens" in capsys.readouterr().err
