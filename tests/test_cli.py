"""The `jaxunlearn` command end to end on a tiny checkpoint."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_assets import TINY_CONFIG, make_tiny_checkpoint

from jaxunlearn.adapter import LoraSettings, load_lora, read_lora_settings
from jaxunlearn.cli import main
from jaxunlearn.data import load_examples
from jaxunlearn.demo import DemoSettings
from jaxunlearn.models import (
    GPT2Config,
    add_lora,
    from_config,
    load,
    load_peft_adapter,
    lora_targets,
    save,
    save_peft_adapter,
    split_lora,
)


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
    # On the mesh of this process's one device: the sharded path, end to end (the same run on
    # eight devices is test_sharded_training.py's).
    arguments += ["--mesh", "auto"]
    assert main(arguments) == 0
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["steps"] == 4
    assert summary["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert np.isfinite(summary["final_loss"])
    tuned, metadata = load_lora(load(model_dir), tmp_path / "run" / "adapter")
    assert metadata["provenance"]["example_ids"] == [example.id for example in load_examples(data)]
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


@pytest.mark.parametrize(
    ("mesh", "says"),
    [
        ("fsdp=3", "needs 3 devices; only 1 are visible"),
        ("pipeline=2", "AXIS one of data, fsdp, tensor"),
        ("fsdp=two", "not an integer"),
        ("fsdp=1,fsdp=1", "axis fsdp twice"),
        ("data=0", "positive integer"),
    ],
)
def test_a_mesh_that_cannot_be_made_exits_2_in_one_line(tmp_path, capsys, mesh, says):
    # Refused before the model or the data are read: neither exists here.
    arguments = ["finetune", "--model", str(tmp_path / "none"), "--data", str(tmp_path / "none")]
    assert main([*arguments, "--out", str(tmp_path / "run"), "--mesh", mesh]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert says in error
    assert not (tmp_path / "run").exists()


def test_unlearn_refuses_a_mesh_it_cannot_make_before_reading_anything(tmp_path, capsys):
    missing = str(tmp_path / "none")
    arguments = ["unlearn", "--model", missing, "--adapter", missing, "--data", missing]
    arguments += ["--forget", "a", "--out", str(tmp_path / "out"), "--mesh", "fsdp=3"]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "needs 3 devices" in error
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_mesh_it_cannot_make_before_building_anything(tmp_path, capsys):
    arguments = ["demo", "--out", str(tmp_path / "report"), "--cache-dir", str(tmp_path / "c")]
    assert main([*arguments, "--mesh", "fsdp=3"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "needs 3 devices" in error
    assert not (tmp_path / "report").exists()
    assert not (tmp_path / "c").exists()
    # The demo runs on one process: several hosts are the business of finetune and unlearn.
    with pytest.raises(SystemExit):
        main([*arguments, "--distributed"])
    assert "unrecognized arguments: --distributed" in capsys.readouterr().err


def test_finetune_defaults_are_the_demos_recipe(corpus_and_model, tmp_path, capsys):
    root, model_dir = corpus_and_model
    data = root / "corpus" / "train.jsonl"
    base = ["finetune", "--model", str(model_dir), "--data", str(data), "--no-progress"]
    # Only the length is given (the demo's 24 epochs would be slow here).
    assert main([*base, "--out", str(tmp_path / "run"), "--epochs", "2"]) == 0
    settings, metadata = read_lora_settings(tmp_path / "run" / "adapter")
    recipe = DemoSettings(epochs=2.0)
    assert settings == recipe.lora_settings()
    trained = metadata["provenance"]["train_config"]
    demo = dataclasses.asdict(recipe.train_config(len(load_examples(data))))
    observed = ("eval_every", "checkpoint_every", "keep_checkpoints")
    assert {k: v for k, v in trained.items() if k not in observed} == {
        k: v for k, v in demo.items() if k not in observed
    }
    assert trained["num_steps"] == round(2 * len(load_examples(data)) / 32)
    assert main([*base, "--out", str(tmp_path / "zero"), "--epochs", "0"]) == 2
    assert "epochs must be a positive finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main([*base, "--out", str(tmp_path / "both"), "--epochs", "1", "--steps", "3"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


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


def test_finetune_continues_a_peft_adapter_and_saves_it_in_our_format(
    corpus_and_model, tmp_path, capsys
):
    root, model_dir = corpus_and_model
    model = add_lora(
        load(model_dir), rank=2, alpha=4, targets=("k_proj", "up_proj"), key=jax.random.key(1)
    )
    lora = split_lora(model)[1]
    # B = 0.5 everywhere: a fresh adapter's B starts at 0, and two small steps cannot reach 0.5.
    nnx.update(model, jax.tree.map(lambda leaf: jnp.full_like(leaf, 0.5), lora))
    save_peft_adapter(model, tmp_path / "peft")
    arguments = [
        "finetune",
        "--model",
        str(model_dir),
        "--data",
        str(root / "corpus" / "train.jsonl"),
    ]
    arguments += ["--out", str(tmp_path / "run"), "--peft-adapter", str(tmp_path / "peft")]
    arguments += ["--steps", "2", "--batch-size", "4", "--learning-rate", "1e-2", "--no-progress"]
    assert main([*arguments, "--rank", "4"]) == 2
    assert "--peft-adapter brings its own" in capsys.readouterr().err
    assert main(arguments) == 0
    settings, metadata = read_lora_settings(tmp_path / "run" / "adapter")
    assert settings == LoraSettings(rank=2, alpha=4.0, targets=("k_proj", "up_proj"))
    assert metadata["initial_peft_adapter"] == str(tmp_path / "peft")
    tokenization = metadata["provenance"]["tokenization"]
    assert tokenization["max_length"] == TINY_CONFIG.max_position_embeddings
    assert tokenization["truncate"] is False
    tuned, _ = load_lora(load(model_dir), tmp_path / "run" / "adapter")
    tuned_b = [
        leaf for path, leaf in nnx.to_flat_state(split_lora(tuned)[1]) if path[-1] == "lora_b"
    ]
    assert len(tuned_b) == 2 * TINY_CONFIG.num_layers
    for leaf in tuned_b:
        assert np.allclose(np.asarray(leaf[...]), 0.5, atol=0.1)
        assert not np.allclose(np.asarray(leaf[...]), 0.5, atol=1e-6)  # and it was trained


def test_finetune_targets_all_of_a_gpt2_model_and_saves_peft(corpus_and_model, tmp_path):
    root, llama_dir = corpus_and_model
    gpt2_dir = tmp_path / "gpt2"
    config = GPT2Config(
        vocab_size=TINY_CONFIG.vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        max_position_embeddings=192,
        bos_token_id=1,
        eos_token_id=(2,),
        pad_token_id=0,
    )
    save(from_config(config, key=jax.random.key(0)), gpt2_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir / name, gpt2_dir / name)
    arguments = [
        "finetune",
        "--model",
        str(gpt2_dir),
        "--data",
        str(root / "corpus" / "train.jsonl"),
    ]
    arguments += ["--out", str(tmp_path / "run"), "--targets", "all", "--rank", "2"]
    arguments += ["--steps", "2", "--batch-size", "4", "--save-format", "peft", "--no-progress"]
    assert main(arguments) == 0
    adapter = tmp_path / "run" / "adapter"
    assert sorted(path.name for path in adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "jaxunlearn-provenance.json",  # ignored by PEFT
    ]
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(peft_config["target_modules"]) == sorted(lora_targets(config))
    assert peft_config["r"] == 2
    assert peft_config["base_model_name_or_path"] == str(gpt2_dir)
    tuned = load_peft_adapter(load(gpt2_dir), adapter)
    ids = jnp.asarray([[1, 40, 41, 42, 43]])
    assert not np.allclose(np.asarray(tuned(ids)), np.asarray(load(gpt2_dir)(ids)))
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["adapter_format"] == "peft"
