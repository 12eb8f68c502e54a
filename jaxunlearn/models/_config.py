"""`ModelConfig`: the architecture of a Llama-family causal LM, read from a Hugging Face config.

Also the helpers every family's config uses to read a Hugging Face config strictly, and
`LearnedPositionsConfig`, what the GPT-2 and OPT configs have in common.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Set
from typing import Any, ClassVar, Self

import transformers

from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.models._layers import ACTIVATIONS

# Model types whose modeling code is the Llama computation (Mistral without sliding windows is).
SUPPORTED_MODEL_TYPES = ("llama", "mistral")

# Hugging Face fields that do not change the forward computation of a checkpoint we can run:
# how the checkpoint was made, named or meant to be used. Besides these, a field whose name
# starts with "_" (transformers' and exporters' bookkeeping: `_name_or_path`,
# `_attn_implementation_autoset`, ...) or ends with "_token_id" (which token is `unk`, `sep`,
# `mask`, ...: names of tokens, not part of the logits) is metadata too; see `is_metadata`.
IGNORED_FIELDS = frozenset(
    {
        # Bookkeeping of PreTrainedConfig.
        "transformers_version",
        "architectures",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "dtype",
        "torch_dtype",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "model_type",
        "use_cache",
        "initializer_range",
        "tokenizer_class",
        # What a checkpoint was fine-tuned for or how pipelines should prompt it.
        "finetuning_task",
        "prefix",
        "task_specific_params",
        "keys_to_ignore_at_inference",
        # Export switches of older transformers versions.
        "torchscript",
        "tf_legacy_loss",
        "use_bfloat16",
        # transformers 5 no longer reads it: the slicing it selected computed the same product.
        "pretraining_tp",
    }
)

# Fields that change the computation in a way no family here implements, with what to do
# instead: refused by name even though `check_fields` would refuse them as unknown.
REFUSED_FIELDS = {
    "quantization_config": (
        "a quantized checkpoint is not supported; load its float (or bfloat16) weights instead"
    ),
    "pruned_heads": "a checkpoint with pruned attention heads is not supported",
}

_ROPE_KEYS = {
    "default": frozenset({"rope_type", "rope_theta"}),
    "linear": frozenset({"rope_type", "rope_theta", "factor"}),
    "llama3": frozenset(
        {
            "rope_type",
            "rope_theta",
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        }
    ),
}


class UnsupportedConfigError(UserError, ValueError):
    """A Hugging Face config asks for something this Llama implementation does not compute."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling, as transformers 5 writes it in `rope_parameters`.

    Attributes:
        rope_type: `"linear"` (position interpolation) or `"llama3"` (Llama 3.1 wavelength bands).
        factor: The scaling factor.
        low_freq_factor: Llama 3 only: wavelengths above `original / low_freq_factor` are scaled.
        high_freq_factor: Llama 3 only: wavelengths below `original / high_freq_factor` are kept.
        original_max_position_embeddings: Llama 3 only: the pre-training context length.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family causal language model.

    Build one with `ModelConfig.from_pretrained(directory)` or `ModelConfig.from_hf(hf_config)`;
    the constructor is for tests and experiments that make a model from scratch. The config is
    frozen and hashable, so it can be a static argument of `jax.jit`.

    Attributes:
        vocab_size: Number of token ids.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the SwiGLU MLP.
        num_layers: Number of decoder layers.
        num_heads: Number of query heads.
        num_kv_heads: Number of key/value heads (fewer than `num_heads` with grouped-query
            attention).
        head_dim: Width of one attention head.
        rms_norm_eps: Epsilon of every RMSNorm.
        rope_theta: Base wavelength of the rotary embeddings.
        rope_scaling: Frequency scaling of the rotary embeddings, `None` for the original RoPE.
        tie_word_embeddings: Whether the LM head reuses the token embedding matrix.
        attention_bias: Whether q, k, v and o projections have biases.
        mlp_bias: Whether gate, up and down projections have biases.
        max_position_embeddings: The longest context the checkpoint was made for.
        bos_token_id: Beginning-of-sequence token id, if any.
        eos_token_id: End-of-sequence token ids (a tuple: Llama 3 has several).
        pad_token_id: Padding token id, if any.
        model_type: The Hugging Face `model_type` written back by `save`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    model_type: str = "llama"

    # Rotary embeddings encode any position: no length limit.
    context_limit: ClassVar[int | None] = None

    def __post_init__(self):
        require_positive_ints(
            self,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_layers",
                "num_heads",
                "num_kv_heads",
                "head_dim",
                "max_position_embeddings",
            ),
        )
        if self.num_heads % self.num_kv_heads:
            raise SettingsError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention."
            )
        if self.head_dim % 2:
            raise SettingsError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}.")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise SettingsError(
                f"ModelConfig.model_type must be one of {SUPPORTED_MODEL_TYPES}, "
                f"got {self.model_type!r}."
            )
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def num_parameters(self) -> int:
        """Number of parameters of the base model (no adapters)."""
        attention = self.hidden_size * self.head_dim * 2 * (self.num_heads + self.num_kv_heads)
        if self.attention_bias:
            attention += self.head_dim * (self.num_heads + 2 * self.num_kv_heads) + self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + self.hidden_size
        layer = attention + mlp + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embeddings
        return embeddings + self.num_layers * layer + self.hidden_size + head

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, /) -> ModelConfig:
        """Reads `config.json` of a local checkpoint directory with transformers' config classes.

        Args:
            path: A directory holding `config.json`.

        Returns:
            The config.

        Raises:
            FileNotFoundError: If `path/config.json` does not exist (nothing is downloaded).
            UnsupportedConfigError: If the config asks for something this model does not compute.
        """
        return cls.from_hf(read_hf_config(path))

    @classmethod
    def from_hf(cls, hf_config: transformers.PretrainedConfig, /) -> ModelConfig:
        """Converts a transformers config object (e.g. `LlamaConfig`).

        Every field of the config is either used, known not to matter for the forward
        computation, or rejected: nothing is silently replaced by a default.

        Args:
            hf_config: A transformers config of model type `llama` or `mistral`.

        Returns:
            The config.

        Raises:
            UnsupportedConfigError: Naming the first field whose value this model cannot honour.
        """
        fields = hf_config.to_dict()
        model_type = fields.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"config field 'model_type' is {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}."
            )
        used = {
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "rope_parameters",
            "tie_word_embeddings",
            "attention_bias",
            "mlp_bias",
            "max_position_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "hidden_act",
            "attention_dropout",
            "sliding_window",
        }
        check_fields(fields, used, family="Llama")
        require(fields, "hidden_act", "silu")
        require(fields, "attention_dropout", 0.0)
        require(fields, "sliding_window", None)
        rope_theta, rope_scaling = _parse_rope(fields.get("rope_parameters"))
        num_heads = fields["num_attention_heads"]
        head_dim = fields.get("head_dim") or fields["hidden_size"] // num_heads
        eos = eos_tuple(fields.get("eos_token_id"))
        return cls(
            vocab_size=fields["vocab_size"],
            hidden_size=fields["hidden_size"],
            intermediate_size=fields["intermediate_size"],
            num_layers=fields["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=fields.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(fields["rms_norm_eps"]),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(fields.get("tie_word_embeddings", False)),
            attention_bias=bool(fields.get("attention_bias", False)),
            mlp_bias=bool(fields.get("mlp_bias", False)),
            max_position_embeddings=fields["max_position_embeddings"],
            bos_token_id=fields.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=fields.get("pad_token_id"),
            model_type=model_type,
        )

    def to_hf(self) -> transformers.PretrainedConfig:
        """Returns the equivalent transformers config (`LlamaConfig` or `MistralConfig`)."""
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            scaling = dataclasses.asdict(self.rope_scaling)
            rope_parameters.update({k: v for k, v in scaling.items() if v is not None})
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope_parameters,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos_field(self.eos_token_id),
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "mistral":
            if self.mlp_bias:
                raise UnsupportedConfigError("Mistral configs have no 'mlp_bias' field.")
            kwargs["sliding_window"] = None
        else:
            kwargs["mlp_bias"] = self.mlp_bias
        return transformers.AutoConfig.for_model(self.model_type, **kwargs)


class LearnedPositionsConfig:
    """What the GPT-2 and OPT configs share: multi-head attention over a learned position table,
    and fields that map one to one onto those of transformers' config.

    A subclass is a frozen dataclass with (at least) the fields `vocab_size`, `hidden_size`,
    `num_heads`, `max_position_embeddings`, `activation` and `eos_token_id`; it calls
    `_validate` from `__post_init__` and sets the class variables below.
    """

    # The Hugging Face `model_type`.
    model_type: ClassVar[str]
    # transformers' name of each of our fields (keys: theirs).
    _hf_names: ClassVar[Mapping[str, str]]
    # transformers fields of this family that do not change the LM's evaluation-mode forward
    # computation, beyond `IGNORED_FIELDS`.
    _hf_ignored: ClassVar[Set[str]]

    def _validate(self, positive: Iterable[str]) -> None:
        """Checks the fields named in `positive`, the head split and the activation, and makes
        `eos_token_id` a tuple."""
        name = type(self).__name__
        require_positive_ints(self, positive)
        if self.hidden_size % self.num_heads:
            raise SettingsError(
                f"{name}.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads})."
            )
        if self.activation not in ACTIVATIONS:
            raise SettingsError(
                f"{name}.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}."
            )
        if isinstance(self.eos_token_id, list | int):
            object.__setattr__(self, "eos_token_id", eos_tuple(self.eos_token_id))

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        """One key/value head per query head."""
        return self.num_heads

    @property
    def context_limit(self) -> int:
        """The longest sequence (cache included) the learned positions cover."""
        return self.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, /) -> Self:
        """Reads `config.json` of a local checkpoint directory (see `from_hf`).

        Raises:
            FileNotFoundError: If `path/config.json` does not exist (nothing is downloaded).
            UnsupportedConfigError: If the config asks for something this model does not compute.
        """
        return cls.from_hf(read_hf_config(path))

    @classmethod
    def _values_from_hf(
        cls,
        hf_config: transformers.PretrainedConfig,
        /,
        *,
        family: str,
        required: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Our field values in a transformers config of this family, which is read strictly.

        Args:
            hf_config: The transformers config.
            family: The family's name for messages.
            required: transformers fields with no counterpart here, and the only value each may
                have when present.

        Raises:
            UnsupportedConfigError: Naming the first field whose value this model cannot honour.
        """
        fields = hf_config.to_dict()
        if fields.get("model_type") != cls.model_type:
            raise UnsupportedConfigError(
                f"config field 'model_type' is {fields.get('model_type')!r}; "
                f"expected {cls.model_type!r}."
            )
        check_fields(fields, {*cls._hf_names, *cls._hf_ignored, *required}, family=family)
        for name, expected in required.items():
            require(fields, name, expected)
        if "activation_function" in fields and fields["activation_function"] not in ACTIVATIONS:
            raise UnsupportedConfigError(
                f"config field 'activation_function' is {fields['activation_function']!r}; "
                f"supported: {sorted(ACTIVATIONS)}."
            )
        values = {ours: fields[hf] for hf, ours in cls._hf_names.items() if hf in fields}
        values["eos_token_id"] = eos_tuple(values.get("eos_token_id"))
        return values

    def to_hf(self) -> transformers.PretrainedConfig:
        """Returns the equivalent transformers config (of the class for `model_type`)."""
        values = {hf: getattr(self, ours) for hf, ours in self._hf_names.items()}
        values["eos_token_id"] = eos_field(self.eos_token_id)
        # Looked up by name when needed: reading transformers' config classes at import time
        # imports PyTorch where it is installed (seconds at every start of the command line).
        return transformers.AutoConfig.for_model(self.model_type, **values)


def read_hf_config(path: str | os.PathLike, /) -> transformers.PretrainedConfig:
    """Reads `config.json` of a local checkpoint directory with transformers' config classes.

    Raises:
        FileNotFoundError: If `path/config.json` does not exist (nothing is downloaded).
    """
    config_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No config.json in checkpoint directory {os.fspath(path)!r}.")
    return transformers.AutoConfig.from_pretrained(os.fspath(path), local_files_only=True)


def is_metadata(name: str, /) -> bool:
    """Whether a config field describes the checkpoint without changing what it computes."""
    return name in IGNORED_FIELDS or name.startswith("_") or name.endswith("_token_id")


def check_fields(fields: dict[str, Any], used: set[str], *, family: str) -> None:
    """Rejects a config holding a field that is neither used nor metadata (`is_metadata`).

    A field of `REFUSED_FIELDS` is refused with its reason, unless it holds an empty value
    (`pruned_heads: {}`, as older versions wrote by default).

    Raises:
        UnsupportedConfigError: Naming the refused field, or the first unknown one.
    """
    for name, reason in REFUSED_FIELDS.items():
        if fields.get(name):
            raise UnsupportedConfigError(f"config field {name!r} is set: {reason}.")
    unknown = sorted(
        name for name in set(fields) - used if not is_metadata(name) and name not in REFUSED_FIELDS
    )
    if unknown:
        raise UnsupportedConfigError(
            f"config field {unknown[0]!r} is not supported by the jaxunlearn {family} "
            f"(all unknown fields: {unknown}); only fields that change nothing of the "
            "computation (metadata) are accepted unread."
        )


def require_positive_ints(config: Any, names: Iterable[str]) -> None:
    """Rejects a config whose field in `names` is not a positive integer.

    Raises:
        SettingsError: Naming the first such field.
    """
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise SettingsError(
                f"{type(config).__name__}.{name} must be a positive integer, got {value!r}."
            )


def require(fields: dict[str, Any], name: str, expected: Any) -> None:
    """Rejects a config whose field `name` is present with another value than `expected`."""
    if name in fields and fields[name] != expected:
        raise UnsupportedConfigError(
            f"config field {name!r} is {fields[name]!r}; only {expected!r} is supported."
        )


def eos_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    """A config's `eos_token_id` (absent, one id or several) as a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def eos_field(eos: tuple[int, ...]) -> int | list[int] | None:
    """The inverse of `eos_tuple`, as transformers configs write it."""
    return eos[0] if len(eos) == 1 else (list(eos) or None)


def _parse_rope(rope_parameters: dict[str, Any] | None) -> tuple[float, RopeScaling | None]:
    if not rope_parameters:
        raise UnsupportedConfigError("config field 'rope_parameters' is missing or empty.")
    if "rope_type" not in rope_parameters or "rope_theta" not in rope_parameters:
        raise UnsupportedConfigError(
            f"config field 'rope_parameters' needs 'rope_type' and 'rope_theta', "
            f"got {rope_parameters!r}."
        )
    rope_type = rope_parameters["rope_type"]
    if rope_type not in _ROPE_KEYS:
        raise UnsupportedConfigError(
            f"config field 'rope_parameters' has rope_type {rope_type!r}; "
            f"supported: {sorted(_ROPE_KEYS)}."
        )
    extra = sorted(set(rope_parameters) - _ROPE_KEYS[rope_type])
    if extra:
        raise UnsupportedConfigError(
            f"config field 'rope_parameters' has key {extra[0]!r}, which rope_type "
            f"{rope_type!r} does not support here (all unsupported keys: {extra})."
        )
    missing = sorted(_ROPE_KEYS[rope_type] - set(rope_parameters))
    if missing:
        raise UnsupportedConfigError(
            f"config field 'rope_parameters' of rope_type {rope_type!r} lacks {missing}."
        )
    theta = float(rope_parameters["rope_theta"])
    if rope_type == "default":
        return theta, None
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=float(rope_parameters["factor"]),
        low_freq_factor=rope_parameters.get("low_freq_factor"),
        high_freq_factor=rope_parameters.get("high_freq_factor"),
        original_max_position_embeddings=rope_parameters.get("original_max_position_embeddings"),
    )
    return theta, scaling
