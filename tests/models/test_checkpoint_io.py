"""Saving and loading Hugging Face checkpoint directories, and their error messages."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from model_references import TINY, assert_same_parameters, make_reference
from multi_device import run_report
from safetensors.numpy import load_file, save_file

from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.models import (
    CheckpointError,
    ModelConfig,
    UnsupportedConfigError,
    add_lora,
    from_config,
    load,
    save,
)

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    attention_bias=True,
    eos_token_id=(2,),
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_is_bit_exact(tmp_path, dtype, tied):
    config = ModelConfig(**{**vars(CONFIG), "tie_word_embeddings": tied})
    model = from_config(config, key=jax.random.key(0), dtype=dtype)
    save(model, tmp_path)
    loaded = load(tmp_path, dtype=dtype)
    assert loaded.config == config
    assert_same_parameters(model, loaded)


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    model = from_config(CONFIG, key=jax.random.key(0))
    save(model, tmp_path, max_shard_bytes=4096)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shard_files
    assert_same_parameters(model, load(tmp_path))
    # A later unsharded save replaces the shards instead of mixing with them.
    save(model, tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert_same_parameters(model, load(tmp_path))


def test_transformers_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    reference = make_reference(tmp_path / "single", "gqa")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert_same_parameters(load(tmp_path / "single"), load(tmp_path / "sharded"))


def test_transformers_reads_what_save_writes(tmp_path):
    import torch

    model = from_config(CONFIG, key=jax.random.key(0))
    save(model, tmp_path)
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = np.arange(12, dtype=np.int32).reshape(2, 6) % CONFIG.vocab_size
    with torch.no_grad():
        expected = reference(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=1e-5, rtol=0)


@pytest.mark.multi_device
def test_a_checkpoint_loaded_onto_a_mesh_equals_the_one_loaded_whole():
    report = run_report(os.path.join(os.path.dirname(__file__), "sharded_load.py"), "4", "2")
    print(report)
    for family in ("llama", "gpt2"):
        for dtype in ("float32", "bfloat16"):
            loaded = report[f"{family}_{dtype}"]
            assert loaded["max_abs_difference"] == 0.0
            assert loaded["dtypes"] == [dtype]
            assert loaded["devices"] == [8]
            # Each device holds its share and no more: every matrix is split (an eighth, or a
            # half or quarter where an axis has no rule), only norms and biases are whole.
            held, expected = loaded["share"]
            assert held == pytest.approx(expected)
            assert expected < 0.25


def test_save_refuses_a_model_with_lora(tmp_path):
    model = add_lora(
        from_config(CONFIG, key=jax.random.key(0)),
        rank=2,
        alpha=4.0,
        targets=["q_proj"],
        key=jax.random.key(1),
    )
    with pytest.raises(ValueError, match="LoRA"):
        save(model, tmp_path)


@pytest.fixture
def saved(tmp_path):
    save(from_config(CONFIG, key=jax.random.key(0)), tmp_path)
    return tmp_path


def rewrite_tensors(directory, change):
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    rewrite_tensors(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj"):
        load(saved)


def test_unexpected_tensor_is_named(saved):
    rewrite_tensors(saved, lambda t: t.update(extra_head=np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="unexpected tensors: extra_head"):
        load(saved)


def test_wrongly_shaped_tensor_is_named(saved):
    def transpose(tensors):
        name = "model.layers.0.self_attn.k_proj.weight"
        tensors[name] = np.ascontiguousarray(tensors[name].T)

    rewrite_tensors(saved, transpose)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight has shape \(16, 8\), expected"):
        load(saved)


def test_config_that_disagrees_with_tensors_is_reported(saved):
    config = json.loads((saved / "config.json").read_text())
    config["intermediate_size"] = 32
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight has shape \(24, 16\)"):
        load(saved)


def test_corrupted_file_is_reported(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        load(saved)


def test_index_naming_an_absent_shard_is_reported(saved):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        load(saved)


def test_directory_without_weights_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load(tmp_path)
    CONFIG.to_hf().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\*\.safetensors"):
        load(tmp_path)


def hf_config(**changes):
    return transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 2, **changes})


def test_config_fields_are_read_through_transformers():
    config = ModelConfig.from_hf(
        hf_config(
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 1234.0, "factor": 2.0},
            eos_token_id=[2, 5],
        )
    )
    assert (config.num_kv_heads, config.head_dim, config.rms_norm_eps) == (2, 8, 1e-5)
    assert config.tie_word_embeddings
    assert config.rope_theta == 1234.0
    assert (config.rope_scaling.rope_type, config.rope_scaling.factor) == ("linear", 2.0)
    assert config.eos_token_id == (2, 5)
    assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_dropout=0.1), "attention_dropout"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "yarn"),
        (
            dict(
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 1e4,
                    "partial_rotary_factor": 0.5,
                }
            ),
            "partial_rotary_factor",
        ),
        (dict(some_future_switch=True), "some_future_switch"),
    ],
)
def test_unsupported_config_fields_are_named(changes, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        ModelConfig.from_hf(hf_config(**changes))


def test_metadata_fields_are_accepted_unread():
    metadata = dict(
        unk_token_id=0,
        sep_token_id=3,
        _model_name_or_path="an-org/a-model",
        _attn_implementation_autoset=True,
        finetuning_task=None,
        prefix=None,
        task_specific_params=None,
        pruned_heads={},
    )
    assert ModelConfig.from_hf(hf_config(**metadata)) == ModelConfig.from_hf(hf_config())


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("quantization_config", {"quant_method": "bitsandbytes", "load_in_4bit": True}, "float"),
        ("pruned_heads", {"0": [1]}, "pruned"),
    ],
)
def test_fields_that_change_the_computation_are_refused_by_name(field, value, says):
    with pytest.raises(UnsupportedConfigError, match=f"'{field}'.*{says}"):
        ModelConfig.from_hf(hf_config(**{field: value}))


def test_unsupported_model_type_and_sliding_window_are_named():
    with pytest.raises(UnsupportedConfigError, match="model_type"):
        ModelConfig.from_hf(transformers.GPT2Config())
    mistral = transformers.MistralConfig(**{**TINY, "num_key_value_heads": 2}, sliding_window=4)
    with pytest.raises(UnsupportedConfigError, match="sliding_window"):
        ModelConfig.from_hf(mistral)
    mistral.sliding_window = None
    assert ModelConfig.from_hf(mistral).model_type == "mistral"


def test_invalid_model_config_is_rejected():
    with pytest.raises(SettingsError, match="multiple of num_kv_heads"):
        ModelConfig(**{**vars(CONFIG), "num_kv_heads": 3})
    with pytest.raises(SettingsError, match="vocab_size") as caught:
        ModelConfig(**{**vars(CONFIG), "vocab_size": 0})
    assert isinstance(caught.value, UserError)
    assert isinstance(caught.value, ValueError)
