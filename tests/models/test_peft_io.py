"""PEFT LoRA adapters made by the `peft` library load here, and ours load in `peft`, with the same
logits; settings that cannot be honoured are refused with a `PeftFormatError`."""

import copy
import json

import jax
import numpy as np
import peft
import pytest
import torch
from family_references import hf_class, make_family_reference
from flax import nnx
from lora_references import perturbed
from model_references import make_reference, padded_batch, positions_from_mask
from safetensors.numpy import load_file, save_file

from jaxunlearn.models import (
    LORA_TARGETS,
    PeftFormatError,
    add_lora,
    join_lora,
    load,
    load_peft_adapter,
    save_peft_adapter,
    split_lora,
)

# The reference checkpoint of each family (see model_references and family_references).
FAMILIES = {"llama": "gqa", "gpt2": "gpt2_variants", "opt": "opt_projected"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{family: (checkpoint directory, transformers model in eval mode)}."""
    found = {}
    for family, name in FAMILIES.items():
        directory = tmp_path_factory.mktemp(f"base_{family}")
        make = make_reference if family == "llama" else make_family_reference
        found[family] = (directory, make(directory, name))
    return found


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions_from_mask(mask), dtype=torch.long),
        ).logits.numpy()


@jax.jit
def jax_logits(model, ids, mask):
    return model(ids, mask)


def max_error_on_real_tokens(ours, theirs, mask):
    real = mask.astype(bool)
    return float(np.max(np.abs(np.asarray(ours)[real] - theirs[real])))


def make_peft_adapter(reference, directory, seed=0, **lora_settings):
    """An adapter made and saved by PEFT, with random non-zero B (PEFT starts B at zero)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(task_type="CAUSAL_LM", **lora_settings)
    peft_model = peft.get_peft_model(copy.deepcopy(reference), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(directory)
    return peft_model.eval()


CASES = {
    "llama_all_targets": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=list(LORA_TARGETS)),
    ),
    # A regular expression (layer 1's projections) with an exclusion: PEFT adapts exactly the
    # matches, so ours are saved back as full module names.
    "llama_regex_layer_1": (
        "llama",
        dict(r=2, lora_alpha=3, target_modules=r".*1\..*_proj", exclude_modules=["o_proj"]),
    ),
    "llama_layers_to_transform": (
        "llama",
        dict(r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[0]),
    ),
    # GPT-2's Conv1D projections: PEFT sets fan_in_fan_out; rank-stabilised scaling.
    "gpt2_rslora": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True),
    ),
    # Only the attention's c_proj, not the MLP's: a dotted suffix.
    "gpt2_attention_output": ("gpt2", dict(r=3, lora_alpha=6, target_modules=["attn.c_proj"])),
    "opt_patterns_and_dropout": (
        "opt",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
            rank_pattern={"fc1": 2, "layers.1.self_attn.q_proj": 6},
            alpha_pattern={"v_proj": 3},
            lora_dropout=0.1,
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_here_and_saves_back_for_peft(case, bases, tmp_path):
    family, settings = CASES[case]
    base_dir, reference = bases[family]
    peft_model = make_peft_adapter(reference, tmp_path / "theirs", **settings)
    ids, mask = padded_batch(seed=4)
    expected = torch_logits(peft_model, ids, mask)
    # The adapter changes the logits by far more than the tolerance: B is not zero.
    assert max_error_on_real_tokens(expected, torch_logits(reference, ids, mask), mask) > 1e-3

    model = load_peft_adapter(load(base_dir), tmp_path / "theirs")
    model.eval()  # PEFT's model is in eval mode too: no adapter dropout.
    error = max_error_on_real_tokens(jax_logits(model, ids, mask), expected, mask)
    print(f"\n[{case}] PEFT → jaxunlearn max abs logit error: {error:.2e}")
    assert error <= 1e-4

    # Saved here, the same adapter loads in PEFT (a fresh transformers base) unchanged.
    save_peft_adapter(model, tmp_path / "ours")
    fresh_base = hf_class_of(family).from_pretrained(base_dir, attn_implementation="eager")
    reloaded = peft.PeftModel.from_pretrained(fresh_base, tmp_path / "ours").eval()
    # PEFT adapts exactly the modules it adapted before (a missing tensor would only warn).
    assert adapted_modules(reloaded) == adapted_modules(peft_model)
    error = max_error_on_real_tokens(torch_logits(reloaded, ids, mask), expected, mask)
    print(f"[{case}] PEFT → jaxunlearn → PEFT max abs logit error: {error:.2e}")
    assert error <= 1e-5


def adapted_modules(peft_model):
    return {
        name
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def hf_class_of(family):
    import transformers

    return transformers.LlamaForCausalLM if family == "llama" else hf_class(FAMILIES[family])


@pytest.mark.parametrize(
    ("family", "targets", "use_rslora"),
    [
        ("llama", ("q_proj", "v_proj"), False),
        ("gpt2", ("c_proj",), True),  # both c_proj of each layer, as PEFT would
        ("opt", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), False),
    ],
)
def test_adapter_made_here_loads_in_peft(family, targets, use_rslora, bases, tmp_path):
    base_dir, reference = bases[family]
    model = add_lora(
        load(base_dir), rank=4, alpha=16.0, targets=targets, key=jax.random.key(1),
        use_rslora=use_rslora,
    )  # fmt: skip
    graphdef, lora, base = split_lora(model)
    model = join_lora(graphdef, perturbed(lora, 0.1), base)  # B is zero at first
    save_peft_adapter(model, tmp_path)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == sorted(targets)
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (4, 16, use_rslora)
    assert written["fan_in_fan_out"] == (family == "gpt2")
    assert (written["peft_type"], written["task_type"]) == ("LORA", "CAUSAL_LM")
    layer_count = 2
    per_layer = 2 if family == "gpt2" else len(targets)
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == 2 * per_layer * layer_count

    fresh_base = hf_class_of(family).from_pretrained(base_dir, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(fresh_base, tmp_path).eval()
    ids, mask = padded_batch(seed=5)
    expected = torch_logits(theirs, ids, mask)
    assert max_error_on_real_tokens(expected, torch_logits(reference, ids, mask), mask) > 1e-3
    error = max_error_on_real_tokens(jax_logits(model, ids, mask), expected, mask)
    print(f"\n[{family}] jaxunlearn → PEFT max abs logit error: {error:.2e}")
    assert error <= 1e-4


@pytest.fixture
def saved_adapter(bases, tmp_path):
    """A valid Llama adapter directory written here, and the base checkpoint directory."""
    base_dir, _ = bases["llama"]
    model = add_lora(load(base_dir), rank=2, alpha=4.0, targets=["q_proj"], key=jax.random.key(0))
    save_peft_adapter(model, tmp_path)
    return tmp_path, base_dir


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(directory, change):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("config_changes", "message"),
    [
        (dict(use_dora=True), "DoRA"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(bias="lora_only"), "bias"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(peft_type="IA3"), "peft_type"),
        (dict(task_type="SEQ_CLS"), "task_type"),
        (dict(init_lora_weights="pissa"), "rewrites the base weights"),
        (dict(some_future_switch=[1]), "some_future_switch"),
        (dict(target_modules=["q_proj", "lm_head"]), "cannot adapt: lm_head"),
        (dict(target_modules=["embed_tokens"]), "cannot adapt: model.embed_tokens"),
        (dict(target_modules=["qkv"]), "match no module"),
        (dict(target_modules="(unclosed"), "regular expression"),
        (dict(r=3), r"lora_A\.weight has shape \(2, 32\), expected \(3, 32\)"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
        (dict(target_modules=["q_proj", "k_proj"]), "missing tensors: .*k_proj"),
    ],
)
def test_unsupported_settings_are_refused_and_leave_the_model_alone(
    saved_adapter, config_changes, message
):
    adapter_dir, base_dir = saved_adapter
    edit_config(adapter_dir, **config_changes)
    model = load(base_dir)
    with pytest.raises(PeftFormatError, match=message):
        load_peft_adapter(model, adapter_dir)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop(f"{Q0}.lora_B.weight"), r"missing tensors: .*q_proj\.lora_B"),
        (
            lambda t: t.update({f"{Q0}.lora_magnitude_vector": np.ones(32, np.float32)}),
            "unexpected tensors: .*lora_magnitude_vector",
        ),
        (
            lambda t: t.update({f"{Q0}.lora_B.weight": np.zeros((16, 2), np.float32)}),
            r"lora_B\.weight has shape \(16, 2\), expected \(32, 2\)",
        ),
    ],
)
def test_tensors_that_do_not_fit_are_named(saved_adapter, change, message):
    adapter_dir, base_dir = saved_adapter
    edit_tensors(adapter_dir, change)
    with pytest.raises(PeftFormatError, match=message):
        load_peft_adapter(load(base_dir), adapter_dir)


def test_pickles_and_broken_files_are_refused(saved_adapter):
    adapter_dir, base_dir = saved_adapter
    (adapter_dir / "adapter_model.safetensors").rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(PeftFormatError, match="pickle"):
        load_peft_adapter(load(base_dir), adapter_dir)
    (adapter_dir / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        load_peft_adapter(load(base_dir), adapter_dir)
    (adapter_dir / "adapter_config.json").write_text("{not json")
    with pytest.raises(PeftFormatError, match="not valid JSON"):
        load_peft_adapter(load(base_dir), adapter_dir)


def test_saving_needs_adapters_and_loading_needs_a_bare_model(saved_adapter):
    adapter_dir, base_dir = saved_adapter
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_peft_adapter(load(base_dir), adapter_dir / "again")
    model = load_peft_adapter(load(base_dir), adapter_dir)
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        load_peft_adapter(model, adapter_dir)
