"""A LoRA adapter as a file: its settings, attaching it to a base model, saving and loading it.

An adapter directory (written by `save_lora`) holds the LoRA tree and a JSON description of the
settings needed to rebuild the model it fits: rank, alpha, targets, and the base checkpoint it
was trained on. Loading attaches fresh adapters with those settings and fills them.

Targets are projection names of the model's family (`jaxunlearn.models.lora_targets`: Llama's
`q_proj ... down_proj`, GPT-2's `c_attn c_proj c_fc`, OPT's `q_proj ... fc2`); settings are
checked against the family when they are attached, since the settings alone do not say which
family they are for.
"""

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from jaxunlearn.checkpoint import load_adapter, read_adapter_metadata, save_adapter
from jaxunlearn.errors import SettingsError
from jaxunlearn.models import CheckpointError, LoRALinear, add_lora, lora_targets, split_lora

ADAPTER_FORMAT = "jaxunlearn-lora/1"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """How adapters are attached: rank r, alpha (update scaled by alpha / r), targets, dropout.

    Attributes:
        rank: The adapter rank r.
        alpha: The LoRA alpha.
        targets: Projection names, as PEFT names them, among `lora_targets(model)` of the model
            the adapters are attached to (checked by `attach_lora`).
        dropout: Dropout rate on the adapters' input.

    Raises:
        SettingsError: If the targets are not a non-empty collection of distinct names, the
            rank is not a positive integer, alpha is not finite, or dropout is outside [0, 1).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.targets, str):
            # A bare string would be read as its characters.
            raise SettingsError(
                f"LoRA targets must be a collection of projection names, got the string "
                f"{self.targets!r}; write ({self.targets!r},)."
            )
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise SettingsError(
                f"LoRA targets must be a non-empty collection of projection names, got "
                f"{self.targets!r}."
            )
        if len(set(self.targets)) != len(self.targets):
            raise SettingsError(f"LoRA targets repeat a name: {self.targets}.")
        # Checked here as well as by add_lora, so that bad settings fail before a model loads.
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise SettingsError(f"LoRA rank must be a positive integer, got {self.rank!r}.")
        if not _is_real(self.alpha) or not math.isfinite(self.alpha):
            raise SettingsError(f"LoRA alpha must be a finite number, got {self.alpha!r}.")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise SettingsError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")


def attach_lora(model: nnx.Module, settings: LoraSettings, /, *, key: jax.Array) -> nnx.Module:
    """Adds adapters with `settings` to `model` in place and returns it.

    Raises:
        SettingsError: If a target is not a projection of the model's family (the message
            lists the family's targets).
        ValueError: If the model already holds adapters there.
    """
    family_targets = lora_targets(model)
    unknown = [target for target in settings.targets if target not in family_targets]
    if unknown:
        raise SettingsError(
            f"LoRA targets {unknown} are not projections of {type(model).__name__}; choose "
            f"among {','.join(family_targets)}."
        )
    return add_lora(
        model,
        rank=settings.rank,
        alpha=settings.alpha,
        targets=settings.targets,
        key=key,
        dropout=settings.dropout,
    )


def lora_settings_of(model: nnx.Module, /) -> LoraSettings:
    """The `LoraSettings` that describe the adapters a model holds, e.g. ones loaded from PEFT.

    `attach_lora(base, lora_settings_of(model), ...)` then adapts exactly the same projections
    with the same rank, alpha and dropout, so the adapters can be saved with `save_lora`.

    Raises:
        SettingsError: If the model has no adapters, or adapters one `LoraSettings` cannot
            describe: ranks, alphas or dropout rates that differ between projections,
            rank-stabilised scaling, or a target adapted in some layers only.
    """
    adapted: dict[str, LoRALinear] = {}
    others: set[str] = set()
    for path, module in nnx.iter_modules(model):
        if not path:
            continue
        name = ".".join(str(part) for part in path)
        if isinstance(module, LoRALinear):
            adapted[name] = module
        else:
            others.add(name)
    if not adapted:
        raise SettingsError("The model holds no LoRA adapters.")
    family_targets = lora_targets(model)
    targets = {name.rsplit(".", 1)[-1] for name in adapted}
    partial = sorted(name for name in others if name.rsplit(".", 1)[-1] in targets)

    ranks = {module.rank for module in adapted.values()}
    alphas = {float(module.alpha) for module in adapted.values()}
    dropouts = {
        0.0 if module.dropout is None else float(module.dropout.rate) for module in adapted.values()
    }
    problems = []
    if len(ranks) > 1:
        problems.append(f"ranks {sorted(ranks)}")
    if len(alphas) > 1:
        problems.append(f"alphas {sorted(alphas)}")
    if len(dropouts) > 1:
        problems.append(f"dropout rates {sorted(dropouts)}")
    if any(module.use_rslora for module in adapted.values()):
        problems.append("rank-stabilised scaling (use_rslora)")
    if partial:
        shown = ", ".join(partial[:3]) + (
            f" and {len(partial) - 3} more" if len(partial) > 3 else ""
        )
        problems.append(f"unadapted projections of an adapted target ({shown})")
    if problems:
        raise SettingsError(
            "The model's adapters cannot be described by one rank, alpha, dropout and target "
            f"list: {'; '.join(problems)}."
        )
    return LoraSettings(
        rank=ranks.pop(),
        alpha=alphas.pop(),
        targets=tuple(target for target in family_targets if target in targets),
        dropout=dropouts.pop(),
    )


def save_lora(
    model: nnx.Module,
    path: str | os.PathLike,
    /,
    *,
    settings: LoraSettings,
    description: Mapping[str, Any] | None = None,
) -> None:
    """Saves the adapters of `model` and their settings to a new directory, atomically.

    Args:
        model: a model holding adapters attached with `settings`.
        path: a directory that does not exist yet.
        settings: the settings the adapters were attached with.
        description: further JSON-serialisable facts to record (base model, data, training).
    """
    _, lora, _ = split_lora(model)
    metadata = {
        "format": ADAPTER_FORMAT,
        "lora": dataclasses.asdict(settings),
        **dict(description or {}),
    }
    save_adapter(path, lora, metadata=metadata)


def read_lora_settings(path: str | os.PathLike, /) -> tuple[LoraSettings, dict[str, Any]]:
    """The settings and the full description stored with an adapter, without loading it.

    Raises:
        FileNotFoundError: If `path` is not an adapter saved by `save_lora`.
        CheckpointError: If the adapter is not in jaxunlearn's format, or its settings are
            missing or invalid.
    """
    metadata = read_adapter_metadata(path)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(
            f"{os.fspath(path)} is not a jaxunlearn LoRA adapter (format "
            f"{metadata.get('format')!r}, expected {ADAPTER_FORMAT!r})"
        )
    try:
        lora = metadata["lora"]
        settings = LoraSettings(
            rank=lora["rank"],
            alpha=lora["alpha"],
            targets=tuple(lora["targets"]),
            dropout=lora["dropout"],
        )
    except (KeyError, TypeError, SettingsError) as error:
        raise CheckpointError(
            f"{os.fspath(path)} describes its LoRA settings incompletely or wrongly: {error}"
        ) from error
    return settings, metadata


def load_lora(model: nnx.Module, path: str | os.PathLike, /) -> tuple[nnx.Module, dict[str, Any]]:
    """Attaches the adapter saved at `path` to a base `model` (in place).

    Returns:
        `(model, metadata)`.

    Raises:
        FileNotFoundError: If `path` is not an adapter saved by `save_lora`.
        CheckpointError: If the adapter is not in jaxunlearn's format or does not fit the
            model (shapes, layers).
        SettingsError: If its targets are not projections of the model's family.
    """
    settings, _ = read_lora_settings(path)
    attach_lora(model, settings, key=jax.random.key(0))
    _, lora, _ = split_lora(model)
    restored, metadata = load_adapter(path, target=lora)
    nnx.update(model, restored)
    return model, metadata


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
