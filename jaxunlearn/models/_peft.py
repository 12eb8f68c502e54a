"""Hugging Face PEFT LoRA adapters in and out (`adapter_config.json` + `adapter_model.safetensors`).

An adapter directory written by PEFT's `save_pretrained` loads into a base model here, and one
written here loads with `PeftModel.from_pretrained`; both compute the same logits. Settings this
library cannot reproduce exactly (DoRA, trained extra modules, biases, other PEFT methods, ...)
are refused with a `PeftFormatError` rather than loaded approximately.

PEFT names a tensor `base_model.model.<module name>.lora_A.weight` ([r, in]) or `...lora_B.weight`
([out, r]), where the module name is transformers' (`model.layers.0.self_attn.q_proj`), i.e. the
module's NNX path here; our A [in, r] and B [r, out] are their transposes. The layout does not
depend on `fan_in_fan_out`, which only tells PEFT how to merge into GPT-2's `Conv1D` weights.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxunlearn import processes
from jaxunlearn.errors import UserError
from jaxunlearn.models._families import CausalLM, family_of
from jaxunlearn.models._lora import LoRALinear, attach_adapters, lora_modules, lora_sites
from jaxunlearn.parallel import host_array

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"

# Settings that only say where an adapter comes from or how PEFT initialised or ran it: the
# loaded weights compute the same function whatever they are.
_DESCRIPTIVE_FIELDS = frozenset(
    {
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "megatron_core",
        "qalora_group_size",
        "runtime_config",
        "ensure_weight_tying",
    }
)

# Settings that change the computation, named for the error message; each must be off.
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA",
    "modules_to_save": "fully trained extra modules",
    "lora_bias": "a bias on lora_B",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "megatron_config": "Megatron-parallel layers",
}

# Initialisations that leave the base weights alone (others, like PiSSA, OLoRA, CorDA and
# LoftQ, rewrite them, so their adapters only fit a modified base model).
_BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal")


class PeftFormatError(UserError, ValueError):
    """A PEFT adapter directory holds something jaxunlearn cannot load exactly."""


@dataclasses.dataclass(frozen=True)
class PeftSettings:
    """The parts of a PEFT `LoraConfig` that decide which modules are adapted and how.

    Attributes:
        r: The default rank.
        lora_alpha: The default alpha.
        target_modules: Module-name suffixes, or one regular expression matched against whole
            module names.
        exclude_modules: Like `target_modules`, for modules never to adapt.
        use_rslora: Whether the scaling is alpha / √r instead of alpha / r.
        lora_dropout: The adapters' input dropout rate (active only in training mode).
        layers_to_transform: The layer indices to adapt (`None`: all).
        layers_pattern: The name(s) of the layer list, to find the index in a module name.
        rank_pattern: Rank per module-name pattern, overriding `r`.
        alpha_pattern: Alpha per module-name pattern, overriding `lora_alpha`.
    """

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    exclude_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    lora_dropout: float = 0.0
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def targets(self, name: str) -> bool:
        """Whether PEFT adapts the module `name` (PEFT's `check_target_module_exists`)."""
        excluded = self.exclude_modules
        if isinstance(excluded, str):
            if re.fullmatch(excluded, name):
                return False
        elif excluded and (name in excluded or any(name.endswith(f".{e}") for e in excluded)):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        # As in PEFT, a module named in full is adapted whatever `layers_to_transform` says.
        if name in self.target_modules:
            return True
        if not any(name.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        # PEFT's expressions: the first number after the layer list's name is the layer index.
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
                if match is not None:
                    break
        return match is not None and int(match["idx"]) in self.layers_to_transform

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """The rank and alpha of module `name` (PEFT's `get_pattern_key`)."""
        return (
            self.rank_pattern.get(_pattern_key(self.rank_pattern, name), self.r),
            self.alpha_pattern.get(_pattern_key(self.alpha_pattern, name), self.lora_alpha),
        )


def _pattern_key(patterns: dict[str, Any], name: str) -> str:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def read_peft_config(path: str | os.PathLike, /) -> PeftSettings:
    """Reads and checks `adapter_config.json` of a PEFT LoRA adapter directory.

    Raises:
        FileNotFoundError: If the file does not exist.
        PeftFormatError: If it is not valid JSON, not a LoRA adapter for a causal LM, or asks for
            something this library does not compute (naming the setting).
    """
    config_file = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No {CONFIG_FILE} in adapter directory {os.fspath(path)!r}.")
    try:
        with open(config_file) as f:
            fields = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PeftFormatError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(fields, dict):
        raise PeftFormatError(f"{config_file} does not hold a JSON object.")

    def fail(message: str):
        raise PeftFormatError(f"{config_file}: {message}")

    if fields.get("peft_type") != "LORA":
        fail(f"peft_type is {fields.get('peft_type')!r}; only 'LORA' adapters are supported.")
    if fields.get("task_type") not in (None, "CAUSAL_LM"):
        fail(f"task_type is {fields['task_type']!r}; only causal LM adapters are supported.")
    if fields.get("bias", "none") != "none":
        fail(f"bias is {fields['bias']!r}; only 'none' (no trained biases) is supported.")
    init = fields.get("init_lora_weights", True)
    if init not in _BASE_PRESERVING_INITS:
        fail(
            f"init_lora_weights is {init!r}, which rewrites the base weights; convert the adapter "
            "to plain LoRA first (PEFT's path_initial_model_for_weight_conversion)."
        )
    honoured = {
        *_DESCRIPTIVE_FIELDS,
        *("peft_type", "task_type", "bias", "init_lora_weights", "fan_in_fan_out"),
        *(f.name for f in dataclasses.fields(PeftSettings)),
    }
    for name, value in fields.items():
        if name in honoured or value in (None, False, [], {}):
            continue
        feature = _UNSUPPORTED_FEATURES.get(name)
        if feature is not None:
            fail(f"{name} is {value!r}: {feature} is not supported.")
        fail(f"setting {name!r} is {value!r}, which jaxunlearn does not know how to apply.")

    rank = fields.get("r", 8)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        fail(f"r must be a positive integer, got {rank!r}.")
    alpha = fields.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        fail(f"lora_alpha must be a number, got {alpha!r}.")
    dropout = fields.get("lora_dropout", 0.0)
    if not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        fail(f"lora_dropout must be in [0, 1), got {dropout!r}.")
    layers = fields.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(i, int) for i in layers)
    ):
        fail(f"layers_to_transform must be an integer or a list of them, got {layers!r}.")
    layers_pattern = fields.get("layers_pattern")
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern] if layers_pattern else None
    rank_pattern, alpha_pattern = (
        fields.get("rank_pattern") or {},
        fields.get("alpha_pattern") or {},
    )
    if not isinstance(rank_pattern, dict) or not all(
        isinstance(v, int) and v > 0 for v in rank_pattern.values()
    ):
        fail(f"rank_pattern must map patterns to positive ranks, got {rank_pattern!r}.")
    if not isinstance(alpha_pattern, dict) or not all(
        isinstance(v, int | float) for v in alpha_pattern.values()
    ):
        fail(f"alpha_pattern must map patterns to numbers, got {alpha_pattern!r}.")
    target_modules = _module_names_setting(fields.get("target_modules"), "target_modules", fail)
    if target_modules is None:
        fail("target_modules is missing; it names the adapted modules.")
    if isinstance(target_modules, str) and layers:
        fail("layers_to_transform cannot be combined with a target_modules regular expression.")
    return PeftSettings(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        exclude_modules=_module_names_setting(
            fields.get("exclude_modules"), "exclude_modules", fail
        ),
        use_rslora=bool(fields.get("use_rslora", False)),
        lora_dropout=float(dropout),
        layers_to_transform=None if layers is None else tuple(layers),
        layers_pattern=None if not layers_pattern else tuple(layers_pattern),
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern),
    )


def _module_names_setting(value: Any, name: str, fail) -> tuple[str, ...] | str | None:
    """A `target_modules`-like setting: `None`, one regular expression, or a list of names."""
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as error:
                fail(f"{name} {value!r} is not a valid regular expression: {error}")
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    fail(f"{name} must be a list of module names or one regular expression, got {value!r}.")


def _read_weights(path: str) -> dict[str, np.ndarray]:
    weights_file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights_file):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise PeftFormatError(
                f"{path!r} holds adapter_model.bin, a pickle, which is never read here; save the "
                "adapter with safe_serialization=True."
            )
        raise FileNotFoundError(f"No {WEIGHTS_FILE} in adapter directory {path!r}.")
    try:
        with safe_open(weights_file, framework="numpy") as f:
            names = list(f.keys())
            return {name: f.get_tensor(name) for name in names}
    except SafetensorError as error:
        raise PeftFormatError(f"cannot read safetensors file {weights_file}: {error}") from None


def module_names(model: nnx.Module, /) -> set[str]:
    """Names of the model's modules as transformers would list them, adapters' insides left out.

    PEFT matches its target patterns against these; embedding tables, modules in transformers,
    are parameters here, and `lm_head` exists in transformers even when tied.
    """
    names = {"lm_head"}
    for path, _ in nnx.iter_modules(model):
        names.add(".".join(str(p) for p in path))
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if str(path[-1]) not in ("kernel", "bias", "weight", "lora_a", "lora_b"):
            names.add(".".join(str(p) for p in path))
    adapters = tuple(f"{name}." for name in lora_modules(model))
    return {name for name in names if name and not name.startswith(adapters)}


def load_peft_adapter(
    model: CausalLM, path: str | os.PathLike, /, *, key: jax.Array | None = None
) -> CausalLM:
    """Adds the LoRA adapter saved by PEFT at `path` to a base model, in place.

    Supports PEFT's `target_modules` (a list of module-name suffixes or a regular expression),
    `exclude_modules`, `layers_to_transform`/`layers_pattern`, `rank_pattern`/`alpha_pattern`,
    `use_rslora` and `lora_dropout` (active in `model.train()` mode, the default; call
    `model.eval()` for deterministic outputs).

    Args:
        model: A Llama, GPT-2 or OPT model without adapters.
        path: A directory with `adapter_config.json` and `adapter_model.safetensors`.
        key: PRNG key of the adapters' dropout streams (by default `jax.random.key(0)`).

    Returns:
        The same model, holding the adapter's A and B as float32 `nnx.LoRAParam`s.

    Raises:
        FileNotFoundError: If either file is missing.
        PeftFormatError: If the adapter uses a setting not supported here, targets modules that
            cannot be adapted here, or its tensors are missing, unexpected or wrongly shaped for
            this model (then the model is left unchanged).
        ValueError: If the model already holds adapters.
    """
    directory = os.fspath(path)
    settings = read_peft_config(directory)
    tensors = _read_weights(directory)
    if lora_modules(model):
        raise ValueError("The model already holds LoRA adapters; load a PEFT adapter into a base.")
    family = family_of(model)
    sites = {site.name: site for site in lora_sites(model)}
    targeted = sorted(name for name in module_names(model) if settings.targets(name))
    problems = []
    foreign = [name for name in targeted if name not in sites]
    if foreign:
        problems.append(
            f"it targets modules that jaxunlearn cannot adapt: {_describe(foreign)} (a "
            f"{family.name} model adapts {', '.join(family.lora_targets)} in its layers)"
        )
    if not targeted:
        problems.append(f"its target_modules match no module of this {family.name} model")
    expected = {
        f"{_KEY_PREFIX}{name}{s}": name for name in targeted for s in (_A_SUFFIX, _B_SUFFIX)
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    chosen = []
    for name in targeted:
        if name not in sites or f"{_KEY_PREFIX}{name}{_A_SUFFIX}" in missing:
            continue
        site = sites[name]
        rank, alpha = settings.rank_and_alpha(name)
        in_features, out_features = getattr(site.parent, site.attribute).kernel.shape
        for suffix, shape in ((_A_SUFFIX, (rank, in_features)), (_B_SUFFIX, (out_features, rank))):
            tensor = tensors.get(f"{_KEY_PREFIX}{name}{suffix}")
            if tensor is not None and tuple(tensor.shape) != shape:
                problems.append(
                    f"{_KEY_PREFIX}{name}{suffix} has shape {tuple(tensor.shape)}, expected "
                    f"{shape} (rank {rank} from adapter_config.json)"
                )
        chosen.append((site, rank, alpha))
    if problems:
        raise PeftFormatError(
            f"adapter {directory!r} does not fit this {family.name} model: " + "; ".join(problems)
        )
    attach_adapters(
        model,
        chosen,
        use_rslora=settings.use_rslora,
        dropout=settings.lora_dropout,
        key=jax.random.key(0) if key is None else key,
    )
    for site, _, _ in chosen:
        adapter = getattr(site.parent, site.attribute)
        prefix = f"{_KEY_PREFIX}{site.name}"
        adapter.lora_a[...] = jnp.asarray(tensors[prefix + _A_SUFFIX], jnp.float32).T
        adapter.lora_b[...] = jnp.asarray(tensors[prefix + _B_SUFFIX], jnp.float32).T
    return model


def save_peft_adapter(
    model: CausalLM, path: str | os.PathLike, /, *, base_model_name_or_path: str | None = None
) -> None:
    """Writes the model's LoRA adapters as a PEFT adapter directory.

    `PeftModel.from_pretrained(base, path)` on the transformers model of the same base
    checkpoint then computes the same logits, and so does `load_peft_adapter`. The adapted
    modules are written as `target_modules` suffixes (e.g. `["q_proj", "v_proj"]`) when those
    select exactly them, else as full module names; ranks and alphas that differ from the most
    common ones go to `rank_pattern`/`alpha_pattern`. Each file is written to a temporary name
    and renamed, so a crash never leaves a half-written file under its final name. On
    several processes, every process calls it (the adapter's arrays are gathered) and the
    writer alone writes.

    Args:
        model: A model holding adapters (from `add_lora` or `load_peft_adapter`).
        path: The directory; created if needed, and earlier adapter files in it are replaced.
        base_model_name_or_path: Recorded in `adapter_config.json` for PEFT's `AutoPeftModel`.

    Raises:
        ValueError: If the model has no adapters, or adapters that one PEFT config cannot
            describe (both rsLoRA and plain scaling, or several dropout rates).
    """
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("The model has no LoRA adapters to save; call add_lora first.")
    rslora = {adapter.use_rslora for adapter in adapters.values()}
    dropouts = {_dropout_rate(adapter) for adapter in adapters.values()}
    if len(rslora) > 1 or len(dropouts) > 1:
        raise ValueError(
            "A PEFT adapter has one use_rslora and one lora_dropout for all modules; this model's "
            f"adapters mix use_rslora {sorted(rslora)} and dropout rates {sorted(dropouts)}."
        )
    ranks = {name: adapter.rank for name, adapter in adapters.items()}
    alphas = {name: adapter.alpha for name, adapter in adapters.items()}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    family = family_of(model)
    config = {
        "alpha_pattern": {re.escape(n): _number(a) for n, a in alphas.items() if a != alpha},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        # PEFT sets it for Conv1D (GPT-2) targets whatever it is told; write what it would.
        "fan_in_fan_out": all(n.rsplit(".", 1)[1] in family.conv1d_modules for n in adapters),
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _number(alpha),
        "lora_bias": False,
        "lora_dropout": dropouts.pop(),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
        "revision": None,
        "target_modules": _target_modules(model, set(adapters)),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": rslora.pop(),
    }
    tensors = {}
    for name, adapter in adapters.items():
        # On several processes, a gather every process takes part in.
        lora_a = host_array(adapter.lora_a[...]).astype(np.float32)
        lora_b = host_array(adapter.lora_b[...]).astype(np.float32)
        tensors[f"{_KEY_PREFIX}{name}{_A_SUFFIX}"] = np.ascontiguousarray(lora_a.T)
        tensors[f"{_KEY_PREFIX}{name}{_B_SUFFIX}"] = np.ascontiguousarray(lora_b.T)
    if not processes.is_writer():
        return
    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".save-", dir=directory)
    try:
        # PyTorch loaders refuse safetensors files whose metadata lacks a known format.
        save_file(tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for file_name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(os.path.join(staging, file_name), os.path.join(directory, file_name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _target_modules(model: nnx.Module, adapted: set[str]) -> list[str]:
    """The shortest `target_modules` list that makes PEFT adapt exactly `adapted`."""
    suffixes = sorted({name.rsplit(".", 1)[1] for name in adapted})
    settings = PeftSettings(r=1, lora_alpha=1, target_modules=tuple(suffixes))
    if {name for name in module_names(model) if settings.targets(name)} == adapted:
        return suffixes
    # E.g. only GPT-2's attention c_proj: full names match only themselves.
    return sorted(adapted)


def _dropout_rate(adapter: LoRALinear) -> float:
    return 0.0 if adapter.dropout is None else float(adapter.dropout.rate)


def _number(value: float) -> int | float:
    """Writes whole alphas as integers, as PEFT configs usually hold them."""
    return int(value) if float(value).is_integer() else float(value)


def _describe(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")
