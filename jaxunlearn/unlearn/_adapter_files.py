"""Reading and writing the adapters a lineage is made of, in either format, with provenance.

A jaxunlearn adapter (orbax arrays + JSON description, `jaxunlearn.adapter.save_lora`) keeps
its provenance in its description; a PEFT adapter folder (`adapter_config.json` +
`adapter_model.safetensors`) keeps it in a side file PEFT ignores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from flax import nnx

from jaxunlearn import processes
from jaxunlearn.adapter import (
    LoraSettings,
    load_lora,
    lora_settings_of,
    read_lora_settings,
    save_lora,
)
from jaxunlearn.models import load, load_peft_adapter, save_peft_adapter
from jaxunlearn.parallel import ONE_DEVICE, Placement
from jaxunlearn.unlearn._lineage import (
    PEFT_PROVENANCE_FILE,
    Provenance,
    read_peft_provenance,
    read_provenance,
)

ADAPTER_FORMATS = ("jaxunlearn", "peft")


@dataclasses.dataclass
class OpenAdapter:
    """An adapter loaded onto its base model.

    Attributes:
        path: The adapter folder.
        format: "jaxunlearn" or "peft".
        model: The base model with the adapter attached.
        metadata: The jaxunlearn description (empty for PEFT).
        provenance: Its provenance; None for an adapter made elsewhere.
        lora_settings: The settings to save it in jaxunlearn's format (None when one
            `LoraSettings` cannot describe a PEFT adapter).
        peft_base_model: The base model name a PEFT adapter names.
    """

    path: str
    format: str
    model: nnx.Module
    metadata: dict[str, Any]
    provenance: Provenance | None
    lora_settings: LoraSettings | None
    peft_base_model: str | None = None


def adapter_format(path: str | os.PathLike, /) -> str:
    """ "peft" for a folder with `adapter_config.json`, else "jaxunlearn"."""
    return "peft" if (pathlib.Path(path) / "adapter_config.json").exists() else "jaxunlearn"


def open_adapter(
    path: str | os.PathLike,
    base_model: str | os.PathLike,
    /,
    *,
    placement: Placement = ONE_DEVICE,
) -> OpenAdapter:
    """Loads the base checkpoint and attaches the adapter at `path` (either format).

    On a mesh (`placement`), each device reads its own block of the base weights, and the
    adapter is moved onto the mesh once attached.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No adapter folder {path!r}.")
    model = load(base_model, mesh=placement.mesh, rules=placement.rules)
    if adapter_format(path) == "peft":
        load_peft_adapter(model, path)
        placement.model(model)
        try:
            settings = lora_settings_of(model)
        except ValueError:
            settings = None
        config = json.loads((pathlib.Path(path) / "adapter_config.json").read_text())
        return OpenAdapter(
            path,
            "peft",
            model,
            {},
            read_peft_provenance(path),
            settings,
            peft_base_model=config.get("base_model_name_or_path"),
        )
    _, metadata = load_lora(model, path)
    placement.model(model)
    settings, _ = read_lora_settings(path)
    return OpenAdapter(
        path, "jaxunlearn", model, metadata, read_provenance(metadata, where=path), settings
    )


def save_adapter_files(
    model: nnx.Module,
    path: str | os.PathLike,
    /,
    *,
    save_format: str,
    provenance: Provenance,
    lora_settings: LoraSettings | None,
    description: dict[str, Any] | None = None,
    peft_base_model: str | None = None,
) -> None:
    """Writes the model's adapter with its provenance to a new folder `path`.

    On several processes every process calls it (the arrays span them all); orbax writes each
    process's blocks, and the writer the rest.

    Raises:
        FileExistsError: If `path` exists.
        ValueError: If `save_format` is unknown, or jaxunlearn's format cannot describe the
            adapter (per-module ranks of a PEFT adapter: save it as PEFT).
    """
    path = pathlib.Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; save the adapter to a new path.")
    if save_format == "peft":
        # Every process gathers the arrays, then the writer alone writes the files.
        with processes.step("jaxunlearn: PEFT adapter written"):
            save_peft_adapter(model, path, base_model_name_or_path=peft_base_model)
            if processes.is_writer():
                sidecar = path / PEFT_PROVENANCE_FILE
                text = json.dumps(provenance.as_json(), indent=2, allow_nan=False)
                sidecar.write_text(text + "\n")
        return
    if save_format != "jaxunlearn":
        raise ValueError(f"save_format must be one of {ADAPTER_FORMATS}, got {save_format!r}.")
    settings = lora_settings if lora_settings is not None else lora_settings_of(model)
    save_lora(
        model,
        path,
        settings=settings,
        description={**(description or {}), "provenance": provenance.as_json()},
    )
