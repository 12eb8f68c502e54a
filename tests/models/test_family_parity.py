"""The GPT-2 and OPT families compute what transformers' PyTorch models compute.

Logits with padding, greedy generation, checkpoints both ways, configs, and LoRA gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from family_references import (
    FAMILY_CONFIGS,
    GPT2_CONFIGS,
    hf_class,
    hf_config,
    make_family_reference,
)
from flax import nnx
from lora_references import (
    ALPHA,
    RANK,
    TorchLoRA,
    assert_gradients_match,
    lora_loss_and_gradients,
    torch_loss_and_gradients,
)
from model_references import (
    assert_same_parameters,
    left_padded_prompts,
    padded_batch,
    positions_from_mask,
    reference_generate,
)

from jaxunlearn import parallel
from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.models import (
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    UnsupportedConfigError,
    add_lora,
    from_config,
    generate,
    load,
    load_config,
    lora_targets,
    save,
)

NEW_TOKENS = 6


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family_checkpoint(request, tmp_path_factory):
    """(name, directory, transformers model) for each GPT-2 and OPT reference config."""
    directory = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    return request.param, directory, make_family_reference(directory, request.param)


def reference_logits(name, reference, ids, mask):
    inputs = dict(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
    )
    if name in GPT2_CONFIGS:
        # GPT-2 counts positions from 0 whatever the padding unless told; OPT derives them from
        # the attention mask itself, which is what this test checks for it.
        inputs["position_ids"] = torch.tensor(positions_from_mask(mask), dtype=torch.long)
    with torch.no_grad():
        return reference(**inputs).logits.numpy()


def test_logits_match_transformers_with_left_and_right_padding(family_checkpoint):
    name, directory, reference = family_checkpoint
    model = load(directory)
    family_class = GPT2LMHeadModel if name in GPT2_CONFIGS else OPTForCausalLM
    assert isinstance(model, family_class)
    ids, mask = padded_batch()
    logits = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    expected = reference_logits(name, reference, ids, mask)
    real = mask.astype(bool)
    error = np.max(np.abs(logits[real] - expected[real]))
    print(f"\n[{name}] max abs logit error: {error:.2e}")
    assert error <= 1e-4
    # The comparison is not vacuous: logits vary across tokens by far more than the tolerance.
    assert np.std(expected[real]) > 1e-2


# Every family shares the cache logic, which the logits test does not reach: one config per
# family (the ones with the most switches) keeps the test run short.
@pytest.mark.parametrize("family_checkpoint", ["gpt2_variants", "opt_projected"], indirect=True)
def test_greedy_generation_matches_transformers(family_checkpoint):
    _, directory, reference = family_checkpoint
    model = load(directory)
    # transformers' generate expects left padding; ours accepts either.
    left_ids, left_mask = left_padded_prompts()
    expected = reference_generate(
        reference, left_ids, left_mask, max_new_tokens=NEW_TOKENS, eos_token_id=None
    )
    ids, mask = padded_batch(seed=7, length=6)
    ours = generate(model, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=())
    assert expected.shape == (3, NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(ours.tokens), expected)


def test_save_then_load_is_bit_exact_and_transformers_reads_it(family_checkpoint, tmp_path):
    name, directory, reference = family_checkpoint
    model = load(directory)
    save(model, tmp_path)
    reloaded = load(tmp_path)
    assert reloaded.config == model.config
    assert_same_parameters(model, reloaded)
    theirs = hf_class(name).from_pretrained(tmp_path, attn_implementation="eager")
    expected = reference.state_dict()
    for tensor_name, tensor in theirs.state_dict().items():
        torch.testing.assert_close(tensor, expected[tensor_name], rtol=0, atol=0)
    # bfloat16 checkpoints round-trip bit-exactly too.
    half = load(directory, dtype=jnp.bfloat16)
    save(half, tmp_path / "half")
    assert_same_parameters(half, load(tmp_path / "half", dtype=jnp.bfloat16))


def type_for(hf):
    return GPT2Config if hf.model_type == "gpt2" else OPTConfig


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_config_round_trips_through_transformers(name):
    config = type_for(hf_config(name)).from_hf(hf_config(name))
    assert type(config).from_hf(config.to_hf()) == config


def test_load_config_dispatches_on_model_type(tmp_path):
    hf_config("opt_projected").save_pretrained(tmp_path / "opt")
    config = load_config(tmp_path / "opt")
    assert isinstance(config, OPTConfig)
    assert (config.word_embed_proj_dim, config.do_layer_norm_before) == (16, False)
    transformers.BertConfig().save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedConfigError, match="model_type"):
        load_config(tmp_path / "bert")


@pytest.mark.parametrize(
    ("name", "changes", "field"),
    [
        ("gpt2", dict(add_cross_attention=True), "add_cross_attention"),
        ("gpt2", dict(activation_function="quick_gelu"), "activation_function"),
        ("gpt2", dict(some_future_switch=1), "some_future_switch"),
        ("opt_pre_norm", dict(layer_norm_elementwise_affine=False), "elementwise_affine"),
        ("opt_pre_norm", dict(some_future_switch=1), "some_future_switch"),
    ],
)
def test_unsupported_config_fields_are_named(name, changes, field):
    hf = hf_config(name)
    for key, value in changes.items():
        setattr(hf, key, value)
    with pytest.raises(UnsupportedConfigError, match=field):
        type_for(hf).from_hf(hf)


@pytest.mark.parametrize("name", ["gpt2", "opt_projected"])
def test_checkpoint_of_the_base_model_loads(name, tmp_path):
    """transformers' GPT2Model/OPTModel save tensor names without `transformer.`/`model.`."""
    reference = make_family_reference(tmp_path / "lm", name)
    base = reference.transformer if name in GPT2_CONFIGS else reference.model
    base.save_pretrained(tmp_path / "base")
    assert_same_parameters(load(tmp_path / "lm"), load(tmp_path / "base"))


@pytest.mark.parametrize("family_checkpoint", ["gpt2"], indirect=True)
def test_learned_positions_bound_the_length(family_checkpoint):
    _, directory, _ = family_checkpoint
    model = load(directory)
    limit = model.config.max_position_embeddings
    assert jax.eval_shape(model, jnp.zeros((1, limit), jnp.int32)).shape == (1, limit, 128)
    with pytest.raises(SettingsError, match=f"{limit} positions"):
        jax.eval_shape(model, jnp.zeros((1, limit + 1), jnp.int32))
    with pytest.raises(SettingsError, match="learned position") as caught:
        generate(model, jnp.zeros((1, limit - 4), jnp.int32), max_new_tokens=5)
    assert isinstance(caught.value, UserError)


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_every_parameter_has_logical_axes_that_the_sharding_rules_map(name):
    config = type_for(hf_config(name)).from_hf(hf_config(name))

    def build():
        model = from_config(config, key=jax.random.key(0))
        return add_lora(
            model, rank=2, alpha=2.0, targets=lora_targets(model), key=jax.random.key(1)
        )

    state = nnx.state(nnx.eval_shape(build), nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        axes = variable.get_metadata().get("logical_axes")
        assert axes is not None, path
        assert len(axes) == len(variable.shape), path
    # Raises for a logical name without a rule.
    parallel.state_shardings(state, parallel.make_mesh())


def test_lora_gradient_matches_hand_wrapped_pytorch_lora(tmp_path):
    # GPT-2: Conv1D projections, and `c_proj` adapted in both the attention and the MLP.
    name = "gpt2"
    reference = make_family_reference(tmp_path, name)
    reference.requires_grad_(False)
    model = load(tmp_path)
    targets = lora_targets(model)
    ids, mask = padded_batch(seed=3)
    lora, jax_loss, jax_grads = lora_loss_and_gradients(model, targets, ids, mask)

    flat_lora = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(lora)}
    adapted = {key.rsplit(".", 1)[0] for key in flat_lora}
    # c_attn, both c_proj and c_fc in each of the 2 layers.
    assert len(adapted) == 4 * 2
    for module_name in adapted:
        parent_name, attribute = module_name.rsplit(".", 1)
        parent = reference.get_submodule(parent_name)
        wrapped = TorchLoRA(
            getattr(parent, attribute),
            flat_lora[f"{module_name}.lora_a"],
            flat_lora[f"{module_name}.lora_b"],
            scaling=ALPHA / RANK,
        )
        setattr(parent, attribute, wrapped)
    torch_loss, torch_grads = torch_loss_and_gradients(reference, ids, mask)

    assert abs(float(jax_loss) - torch_loss) <= 1e-5
    worst = assert_gradients_match(jax_grads, torch_grads)
    print(f"\n[{name}] worst LoRA gradient relative error: {worst:.2e}")
