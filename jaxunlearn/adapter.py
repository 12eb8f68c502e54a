"""A LoRA adapter as a file: its settings, attaching it to a base model, saving and loading it.

An adapter directory (written by `save_lora`) holds the LoRA tree and a JSON description of the
settings needed to rebuild the model it fits: rank, alpha, targets, and the base checkpoint it
was trained on. Loading attaches fresh adapters with those settings and fills them.
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from jaxunlearn.checkpoint import load_adapter, read_adapter_metadata, save_adapter
from jaxunlearn.models import LORA_TARGETS, add_lora, split_lora

ADAPTER_FORMAT = "jaxunlearn-lora/1"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """How adapters are attached: rank r, alpha (update scaled by alpha / r), targets, dropout."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(
                f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got {self.targets}"
            )


def attach_lora(model: nnx.Module, settings: LoraSettings, /, *, key: jax.Array) -> nnx.Module:
    """Adds adapters with `settings` to `model` in place and returns it."""
    return add_lora(
        model,
        rank=settings.rank,
        alpha=settings.alpha,
        targets=settings.targets,
        key=key,
        dropout=settings.dropout,
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
    """The settings and the full description stored with an adapter, without loading it."""
    metadata = read_adapter_metadata(path)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(
            f"{os.fspath(path)} is not a jaxunlearn LoRA adapter (format "
            f"{metadata.get('format')!r}, expected {ADAPTER_FORMAT!r})"
        )
    lora = metadata["lora"]
    settings = LoraSettings(
        rank=lora["rank"],
        alpha=lora["alpha"],
        targets=tuple(lora["targets"]),
        dropout=lora["dropout"],
    )
    return settings, metadata


def load_lora(model: nnx.Module, path: str | os.PathLike, /) -> tuple[nnx.Module, dict[str, Any]]:
    """Attaches the adapter saved at `path` to a base `model` (in place).

    Returns:
        `(model, metadata)`.

    Raises:
        ValueError: if the adapter does not fit the model (shapes, targets, layers).
    """
    settings, _ = read_lora_settings(path)
    attach_lora(model, settings, key=jax.random.key(0))
    _, lora, _ = split_lora(model)
    restored, metadata = load_adapter(path, target=lora)
    nnx.update(model, restored)
    return model, metadata
