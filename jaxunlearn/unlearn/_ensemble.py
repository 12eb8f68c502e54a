"""An S3T or SISA ensemble: its stage checkpoints, which of them are still valid, and serving.

An ensemble folder holds one file, `ensemble.json` (plus, after a request that retrained,
the checkpoints it trained under `checkpoints/`). It records:

- the partition of the training set: shard → slice → example ids (as they stand, after the
  requests applied so far);
- per shard, the B models trained on it, one per slice order π: the checkpoint of every stage
  that is still valid, stage 0 being the adapter's initialization (it saw no data) and stage
  i the adapter after training on slices π(1), ..., π(i);
- the layer group each stage position trains (S3T), or every adapted layer (SISA);
- how the stages were trained (so a shard can be retrained exactly), and the provenance.

Checkpoint paths are relative to the ensemble folder, so a folder tree copied whole keeps
working. Each checkpoint's digest is recorded and checked when it is loaded, and the digest
of the ensemble is the digest of its manifest, so the ledger identifies an ensemble the way
it identifies an adapter.

Serving: per shard, the model with the longest valid prefix of stages (the first order
among equals); a shard whose every model lost its first stage has none and is left out.
The served models are combined by `EnsembleLM` (the mean of their next-token
log-probabilities, renormalized).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from jaxunlearn.adapter import LoraSettings, attach_lora
from jaxunlearn.checkpoint import load_adapter
from jaxunlearn.data import json_line
from jaxunlearn.errors import UserError
from jaxunlearn.models import load, split_lora
from jaxunlearn.unlearn._digests import tree_digest
from jaxunlearn.unlearn._lineage import Provenance

__all__ = [
    "ENSEMBLE_FILE",
    "SCHEMES",
    "Ensemble",
    "EnsembleError",
    "OpenEnsemble",
    "ShardModel",
    "StageCheckpoint",
    "is_ensemble",
    "open_ensemble",
    "read_ensemble",
    "write_ensemble",
]

ENSEMBLE_FORMAT = "jaxunlearn.ensemble/1"
ENSEMBLE_FILE = "ensemble.json"
SCHEMES = ("s3t", "sisa")


class EnsembleError(UserError, ValueError):
    """An ensemble folder is malformed, or a checkpoint it names is missing or changed."""


@dataclasses.dataclass(frozen=True)
class StageCheckpoint:
    """One stage's adapter.

    Attributes:
        path: The checkpoint folder, relative to the ensemble folder that names it.
        digest: `tree_digest` of its LoRA arrays.
        examples: The examples it was trained on (0 for the initialization).
    """

    path: str
    digest: str
    examples: int


@dataclasses.dataclass(frozen=True)
class ShardModel:
    """The model of one slice order of one shard.

    Attributes:
        order: The slice order π (0-based slice numbers).
        stages: Its valid checkpoints: stages[0] is the initialization, stages[i] the adapter
            after training on slices π[0], ..., π[i − 1]. A model with only stages[0] is gone.
    """

    order: tuple[int, ...]
    stages: tuple[StageCheckpoint, ...]

    @property
    def trained_stages(self) -> int:
        """How many stages are valid (0: the model is gone)."""
        return len(self.stages) - 1


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """The manifest of an S3T or SISA ensemble (see the module docstring).

    Attributes:
        method: "s3t" or "sisa".
        groups: Per stage position, the decoder layers whose adapters that stage trains.
        partition: shard → slice → example ids.
        models: shard → its models, one per slice order.
        recipe: How stages are trained (`StageRecipe.as_json`).
        lora: The adapters' `LoraSettings` as a dict.
        provenance: Where the ensemble comes from (its training set, ledger, requests).
    """

    method: str
    groups: tuple[tuple[int, ...], ...]
    partition: tuple[tuple[tuple[str, ...], ...], ...]
    models: tuple[tuple[ShardModel, ...], ...]
    recipe: Mapping[str, Any]
    lora: Mapping[str, Any]
    provenance: Provenance

    @property
    def shards(self) -> int:
        return len(self.partition)

    @property
    def slices(self) -> int:
        return len(self.groups)

    @property
    def budget(self) -> int:
        """Slice orders trained per shard."""
        return len(self.models[0])

    @property
    def lora_settings(self) -> LoraSettings:
        return LoraSettings(
            rank=self.lora["rank"],
            alpha=self.lora["alpha"],
            targets=tuple(self.lora["targets"]),
            dropout=self.lora["dropout"],
        )

    def served(self) -> tuple[int | None, ...]:
        """Per shard, the order whose model is served (longest valid prefix, the first order
        among equals), or None when every model of the shard is gone."""
        chosen = []
        for models in self.models:
            best = max(range(len(models)), key=lambda b: (models[b].trained_stages, -b))
            chosen.append(best if models[best].trained_stages > 0 else None)
        return tuple(chosen)

    def locate(self, example_id: str, /) -> tuple[int, int]:
        """(shard, slice) holding an example.

        Raises:
            KeyError: If no slice holds it.
        """
        for shard, slices in enumerate(self.partition):
            for slice_number, ids in enumerate(slices):
                if example_id in ids:
                    return shard, slice_number
        raise KeyError(example_id)

    def stage_ids(self, shard: int, order: Sequence[int], stage: int) -> list[str]:
        """The examples stage `stage` of `order` trains on: slices order[0..stage−1], in that
        order, each in its stored order."""
        return [
            example_id
            for slice_number in order[:stage]
            for example_id in self.partition[shard][slice_number]
        ]

    def as_json(self) -> dict[str, Any]:
        record = {
            "format": ENSEMBLE_FORMAT,
            "method": self.method,
            "groups": self.groups,
            "partition": self.partition,
            "models": [
                [
                    {"order": model.order, "stages": [dataclasses.asdict(s) for s in model.stages]}
                    for model in models
                ]
                for models in self.models
            ],
            "recipe": dict(self.recipe),
            "lora": dict(self.lora),
            "provenance": self.provenance.as_json(),
        }
        return json.loads(json_line(record))

    @classmethod
    def from_json(cls, record: Mapping[str, Any], /, *, where: str) -> Ensemble:
        if record.get("format") != ENSEMBLE_FORMAT:
            raise EnsembleError(
                f"{where}: ensemble format {record.get('format')!r}, this version of jaxunlearn "
                f"reads {ENSEMBLE_FORMAT!r}."
            )
        try:
            ensemble = cls(
                method=record["method"],
                groups=tuple(tuple(int(layer) for layer in group) for group in record["groups"]),
                partition=tuple(
                    tuple(tuple(str(i) for i in ids) for ids in slices)
                    for slices in record["partition"]
                ),
                models=tuple(
                    tuple(
                        ShardModel(
                            order=tuple(int(j) for j in model["order"]),
                            stages=tuple(StageCheckpoint(**stage) for stage in model["stages"]),
                        )
                        for model in models
                    )
                    for models in record["models"]
                ),
                recipe=dict(record["recipe"]),
                lora=dict(record["lora"]),
                provenance=Provenance.from_json(record["provenance"], where=where),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, UserError):
                raise
            raise EnsembleError(
                f"{where} is not a well-formed ensemble manifest: {error!r}"
            ) from None
        ensemble._check(where)
        return ensemble

    def _check(self, where: str) -> None:
        problems = []
        if self.method not in SCHEMES:
            problems.append(f"method {self.method!r} is not one of {SCHEMES}")
        if len(self.models) != self.shards or not self.partition:
            problems.append("it lists models for another number of shards than its partition")
        for shard, (slices, models) in enumerate(zip(self.partition, self.models, strict=False)):
            if len(slices) != self.slices:
                problems.append(f"shard {shard} has {len(slices)} slices, not {self.slices}")
            for model in models:
                if sorted(model.order) != list(range(self.slices)):
                    problems.append(
                        f"shard {shard} has an order {model.order} that is not a permutation"
                    )
                if not 1 <= len(model.stages) <= self.slices + 1:
                    problems.append(f"shard {shard} lists {len(model.stages)} stages")
        if len({len(models) for models in self.models}) > 1:
            problems.append("its shards have different numbers of orders")
        if problems:
            raise EnsembleError(f"{where} is not a consistent ensemble: {'; '.join(problems)}.")

    def digest(self) -> str:
        """The digest the ledger knows this ensemble by (its whole manifest)."""
        return hashlib.sha256(json_line(self.as_json()).encode()).hexdigest()

    def replace(self, **changes: Any) -> Ensemble:
        return dataclasses.replace(self, **changes)


def is_ensemble(path: str | os.PathLike, /) -> bool:
    """Whether `path` is an ensemble folder (it holds `ensemble.json`)."""
    return (pathlib.Path(path) / ENSEMBLE_FILE).is_file()


def read_ensemble(path: str | os.PathLike, /) -> Ensemble:
    """The manifest of the ensemble folder `path`.

    Raises:
        FileNotFoundError: If `path` is not an ensemble folder.
        EnsembleError: If its manifest is malformed.
    """
    manifest = pathlib.Path(path) / ENSEMBLE_FILE
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{os.fspath(path)} is not an ensemble folder (no {ENSEMBLE_FILE})."
        )
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EnsembleError(f"{manifest} is not JSON: {error}") from None
    return Ensemble.from_json(record, where=os.fspath(manifest))


def write_ensemble(path: str | os.PathLike, ensemble: Ensemble, /) -> None:
    """Writes the manifest into the folder `path` (created when missing)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(ensemble.as_json(), indent=1, allow_nan=False)
    (path / ENSEMBLE_FILE).write_text(text + "\n", encoding="utf-8")


@dataclasses.dataclass
class OpenEnsemble:
    """An ensemble folder and its base model (loaded on first use).

    Attributes:
        path: The ensemble folder (absolute).
        ensemble: Its manifest.
        digest: The ensemble's digest.
        base_model: The base checkpoint folder.
    """

    path: str
    ensemble: Ensemble
    digest: str
    base_model: str

    @property
    def provenance(self) -> Provenance:
        return self.ensemble.provenance

    @functools.cached_property
    def model(self) -> nnx.Module:
        """The base model with adapters attached (at no particular stage: see `load_stage`)."""
        model = load(self.base_model)
        # The attached adapters' values are replaced by a stage's before any use.
        attach_lora(model, self.ensemble.lora_settings, key=jax.random.key(0))
        return model

    def checkpoint_path(self, checkpoint: StageCheckpoint, /) -> str:
        """The absolute folder of a checkpoint this ensemble names."""
        return os.path.normpath(os.path.join(self.path, checkpoint.path))

    def load_stage(self, checkpoint: StageCheckpoint, /) -> nnx.State:
        """A stage's LoRA arrays, checked against the digest the manifest records.

        Raises:
            EnsembleError: If the checkpoint is missing (e.g. purged) or differs.
        """
        folder = self.checkpoint_path(checkpoint)
        if not os.path.isdir(folder):
            raise EnsembleError(
                f"The checkpoint {folder} of the ensemble {self.path} is missing (a request "
                "that removed data it saw deletes it: use the newest ensemble of the lineage)."
            )
        _, template, _ = split_lora(self.model)
        lora, _ = load_adapter(folder, target=template)
        if tree_digest(lora) != checkpoint.digest:
            raise EnsembleError(
                f"The checkpoint {folder} differs from what the ensemble {self.path} recorded."
            )
        return lora

    def served_members(self) -> list[tuple[int, int, nnx.State]]:
        """(shard, order, LoRA arrays) of every served shard model."""
        members = []
        for shard, order in enumerate(self.ensemble.served()):
            if order is not None:
                model = self.ensemble.models[shard][order]
                members.append((shard, order, self.load_stage(model.stages[-1])))
        return members

    def serving_model(self):
        """The `EnsembleLM` of the served shard models.

        Raises:
            EnsembleError: If no shard has a model left.
        """
        from jaxunlearn.unlearn._ensemble_model import EnsembleLM

        members = self.served_members()
        if not members:
            raise EnsembleError(
                f"No shard of the ensemble {self.path} has a model left: every model lost its "
                "first stage to a request. Retrain the shards (a request with retrain=True, "
                "--retrain) or fine-tune again."
            )
        return EnsembleLM(self.model, [lora for _, _, lora in members])


def open_ensemble(path: str | os.PathLike, base_model: str | os.PathLike, /) -> OpenEnsemble:
    """Reads an ensemble's manifest; its base model loads when first used."""
    path = os.path.abspath(os.fspath(path))
    ensemble = read_ensemble(path)
    return OpenEnsemble(path, ensemble, ensemble.digest(), os.fspath(base_model))
