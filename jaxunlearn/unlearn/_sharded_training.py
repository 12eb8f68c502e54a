"""Training an S3T or SISA ensemble, stage by stage, with a checkpoint after every stage.

The training set is split at random (seeded) into m shards and each shard into L slices.
For each shard and each of its B slice orders π, stage i trains on the slices
π(1), ..., π(i) together, starting from stage i − 1's adapter:

- S3T trains only the i-th layer group (the decoder layers split top-down into L blocks,
  `layer_groups`), the earlier groups and the base frozen;
- SISA trains every adapter at every stage (one order per shard).

A stage is an ordinary `finetune` of `StageRecipe.epochs` passes over its data, with a fresh
optimizer and a seed derived from (seed, shard, order, stage): so it is a deterministic
function of its starting adapter and its examples, and retraining a suffix of stages on the
data that survives a request gives, bit for bit, what training on that data from the start
gives. The initialization (stage 0) is shared by every model.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxunlearn import processes
from jaxunlearn.adapter import LoraSettings
from jaxunlearn.checkpoint import save_adapter
from jaxunlearn.data import Example, TokenizedDataset
from jaxunlearn.errors import SettingsError
from jaxunlearn.models import split_lora
from jaxunlearn.train import TrainConfig, default_warmup_steps, finetune, steps_for_epochs
from jaxunlearn.unlearn._digests import tree_digest
from jaxunlearn.unlearn._ensemble import (
    SCHEMES,
    Ensemble,
    ShardModel,
    StageCheckpoint,
    write_ensemble,
)
from jaxunlearn.unlearn._layer_groups import group_filter, layer_groups, lora_layer_indices
from jaxunlearn.unlearn._ledger import Ledger
from jaxunlearn.unlearn._lineage import Provenance
from jaxunlearn.unlearn._lineage_checks import _register_root
from jaxunlearn.unlearn._slice_orders import checked_count, cyclic_orders
from jaxunlearn.unlearn._transaction import staging_path

__all__ = [
    "StageRecipe",
    "TrainedEnsemble",
    "partition_examples",
    "retrain_stages",
    "train_ensemble",
]

INIT_CHECKPOINT = "checkpoints/init"


@dataclasses.dataclass(frozen=True)
class StageRecipe:
    """How every stage of an ensemble is trained.

    Attributes:
        train_config: A stage's fine-tune settings. Its `num_steps` and `warmup_steps` are
            set per stage (`epochs` passes over the stage's examples, a tenth of them warmup)
            and its `seed` seeds every stage's own seed; the rest is used as given.
        epochs: Passes over a stage's examples (they grow with the stage: stage i of an order
            holds i slices).
    """

    train_config: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    epochs: float = 1.0

    def stage_config(self, num_examples: int, *, shard: int, order: int, stage: int) -> TrainConfig:
        """The settings of stage `stage` (1-based) of order `order` of shard `shard`."""
        config = self.train_config
        steps = steps_for_epochs(self.epochs, num_examples, config.examples_per_step)
        seed = np.random.SeedSequence([config.seed, shard, order, stage]).generate_state(1)[0]
        return dataclasses.replace(
            config,
            num_steps=steps,
            warmup_steps=default_warmup_steps(steps),
            seed=int(seed) % 2**31,
            checkpoint_every=max(config.checkpoint_every, steps),
            eval_every=max(config.eval_every, steps),
        )

    def as_json(self) -> dict[str, Any]:
        return {"train_config": dataclasses.asdict(self.train_config), "epochs": self.epochs}

    @classmethod
    def from_json(cls, record) -> StageRecipe:
        return cls(train_config=TrainConfig(**record["train_config"]), epochs=record["epochs"])


def partition_examples(
    ids: Sequence[str],
    shards: int,
    slices: int,
    *,
    seed: int,
    groups: Sequence[str] | None = None,
) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """The ids split at random into `shards` shards of `slices` slices each.

    A seeded permutation is cut into shards of sizes differing by at most one, and each shard
    into slices the same way; within a slice, the examples keep their order in `ids`. With
    `groups` (one key per id, such as the person an example is about), the permutation is of
    the keys instead, and the shards and slices hold whole groups (as equal in groups as they
    can be): one person's erasure request then touches one slice of one shard, not most of
    them.

    Raises:
        SettingsError: If there are fewer examples (or groups) than slices in all.
        ValueError: If `groups` does not hold one key per id.
    """
    shards = checked_count(shards, "The number of shards")
    slices = checked_count(slices, "The number of slices")
    if groups is None:
        keys, members = list(range(len(ids))), [[i] for i in range(len(ids))]
    else:
        if len(groups) != len(ids):
            raise ValueError(f"groups holds {len(groups)} keys for {len(ids)} ids.")
        first_seen = dict.fromkeys(groups)
        index = {key: position for position, key in enumerate(first_seen)}
        keys, members = list(first_seen), [[] for _ in first_seen]
        for i, key in enumerate(groups):
            members[index[key]].append(i)
    unit = "examples" if groups is None else "groups"
    if len(keys) < shards * slices:
        raise SettingsError(
            f"{shards} shards of {slices} slices need at least {shards * slices} {unit}; the "
            f"data holds {len(keys)}."
        )
    permutation = np.random.default_rng([seed, 0x53_33_54]).permutation(len(keys))
    partition = []
    for shard in np.array_split(permutation, shards):
        partition.append(
            tuple(
                tuple(ids[i] for i in sorted(i for g in part for i in members[g]))
                for part in np.array_split(shard, slices)
            )
        )
    return tuple(partition)


def train_stage(
    model: nnx.Module,
    start: nnx.State,
    data: TokenizedDataset,
    /,
    *,
    layers: Sequence[int],
    config: TrainConfig,
) -> nnx.State:
    """Trains the adapters of `layers` from the adapter `start` on `data`; returns the new
    LoRA arrays (the model holds them too)."""
    nnx.update(model, start)
    finetune(model, data, config=config, trainable=group_filter(layers), progress=False)
    return detached_lora(model)


def detached_lora(model: nnx.Module, /) -> nnx.State:
    """The model's LoRA arrays in Variables of their own: `nnx.split` shares the model's
    Variables, so its state would follow the model into the next stage's training."""
    return jax.tree.map(lambda array: array, split_lora(model)[1])


def retrain_stages(
    model: nnx.Module,
    ensemble: Ensemble,
    data: TokenizedDataset,
    /,
    *,
    shard: int,
    order: int,
    start: nnx.State,
    first_stage: int,
    folder: str | os.PathLike,
    on_stage: Callable[[], None] | None = None,
) -> tuple[StageCheckpoint, ...]:
    """Trains stages `first_stage`..L of one model from the adapter `start` (stage
    `first_stage − 1`'s) on the ensemble's partition, saving each stage under `folder` (the
    ensemble folder that will name it).

    Returns:
        The new stages' checkpoints, paths relative to `folder`.
    """
    recipe = StageRecipe.from_json(ensemble.recipe)
    slice_order = ensemble.models[shard][order].order
    checkpoints = []
    lora = start
    for stage in range(first_stage, ensemble.slices + 1):
        ids = ensemble.stage_ids(shard, slice_order, stage)
        if ids:  # Requests may have emptied every slice so far: nothing to learn yet.
            config = recipe.stage_config(len(ids), shard=shard, order=order, stage=stage)
            stage_data = data.subset(data.indices_of(ids))
            lora = train_stage(
                model, lora, stage_data, layers=ensemble.groups[stage - 1], config=config
            )
        relative = f"checkpoints/shard-{shard}/order-{order}/stage-{stage}"
        save_adapter(pathlib.Path(folder) / relative, lora, metadata={"stage": stage})
        checkpoints.append(StageCheckpoint(relative, tree_digest(lora), len(ids)))
        if on_stage is not None:
            on_stage()
    return tuple(checkpoints)


@dataclasses.dataclass(frozen=True)
class TrainedEnsemble:
    """What `train_ensemble` wrote.

    Attributes:
        path: The ensemble folder.
        ensemble: Its manifest.
        digest: Its digest (recorded as a root in the ledger).
        ledger: The ledger's path.
        seconds: Wall-clock of the whole training.
        stages: Stages trained.
        examples_seen: The sum over stages of the examples each trained on (times the
            epochs, the work in examples' forward and backward passes).
    """

    path: str
    ensemble: Ensemble
    digest: str
    ledger: str
    seconds: float
    stages: int
    examples_seen: float


def train_ensemble(
    model: nnx.Module,
    examples: Sequence[Example],
    data: TokenizedDataset,
    /,
    *,
    method: str,
    shards: int,
    slices: int,
    out: str | os.PathLike,
    provenance: Provenance,
    ledger: str | os.PathLike,
    lora_settings: LoraSettings,
    recipe: StageRecipe = StageRecipe(),
    budget: int = 1,
    orders: Sequence[Sequence[int]] | np.ndarray | None = None,
    group_by: str | None = None,
    progress: bool = True,
) -> TrainedEnsemble:
    """Trains an S3T or SISA ensemble and registers it as the root of a lineage.

    Args:
        model: The base model with adapters attached at their initialization (changed: it
            ends holding the last stage trained).
        examples: The training set.
        data: `examples` tokenized, in the same order.
        method: "s3t" or "sisa".
        shards: m, the shards.
        slices: L, the slices per shard (S3T: also the layer groups).
        out: A new folder for the ensemble (its manifest and checkpoints).
        provenance: The training set's provenance (`Provenance.of_training`).
        ledger: The lineage's ledger (created when missing).
        lora_settings: The adapters' settings.
        recipe: How each stage trains.
        budget: B, slice orders per shard (S3T; SISA trains one).
        orders: The B slice orders (0-based), the same for every shard; default: the first B
            cyclic rotations (`cyclic_orders`), best for a uniform deletion prior
            (`prior_aware_orders` gives orders for a known one).
        group_by: A metadata field (such as "person_id") whose examples share a slice, so a
            request to erase one person touches one slice (`partition_examples`); None
            partitions examples one by one.
        progress: Show a progress bar over the stages.

    Raises:
        SettingsError: For an unknown method, a budget above the slices (or above 1 for SISA),
            orders that are not permutations, fewer adapted layers than slices (S3T), fewer
            examples (or groups) than slices in all, or an example without the `group_by`
            field.
        FileExistsError: If `out` exists.
    """
    started = time.perf_counter()
    if method not in SCHEMES:
        raise SettingsError(f"The method must be one of {SCHEMES}, got {method!r}.")
    out = pathlib.Path(os.path.abspath(os.fspath(out)))
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder for the ensemble.")
    slices = checked_count(slices, "The number of slices")
    orders = _orders(method, slices, budget, orders)
    layers = lora_layer_indices(model)
    groups = layer_groups(layers, slices) if method == "s3t" else (tuple(layers),) * slices
    ids = [example.id for example in examples]
    if list(data.ids) != ids:
        raise ValueError("data must hold `examples` tokenized, in the same order.")
    partition = partition_examples(
        ids, shards, slices, seed=recipe.train_config.seed, groups=_group_keys(examples, group_by)
    )
    chosen = Ledger(ledger)
    with processes.step("jaxunlearn: root ledger created"):
        if processes.is_writer():
            chosen.ensure_exists()
    provenance = provenance.replace(ledger={"id": chosen.id, "path": chosen.path}, checkpoints=None)

    staged = staging_path(out)
    initial = detached_lora(model)
    init = StageCheckpoint(INIT_CHECKPOINT, tree_digest(initial), 0)
    skeleton = Ensemble(
        method=method,
        groups=groups,
        partition=partition,
        models=tuple(
            tuple(ShardModel(tuple(int(j) for j in order), (init,)) for order in orders)
            for _ in range(len(partition))
        ),
        recipe=recipe.as_json(),
        lora=dataclasses.asdict(lora_settings),
        provenance=provenance,
    )
    total = len(partition) * len(orders) * slices
    bar = tqdm(total=total, disable=not progress, desc=method, unit="stage")
    try:
        save_adapter(staged / INIT_CHECKPOINT, initial, metadata={"stage": 0})
        models = []
        for shard in range(len(partition)):
            trained = []
            for order in range(len(orders)):
                stages = retrain_stages(
                    model,
                    skeleton,
                    data,
                    shard=shard,
                    order=order,
                    start=initial,
                    first_stage=1,
                    folder=staged,
                    on_stage=lambda: bar.update(1),
                )
                trained.append(ShardModel(skeleton.models[shard][order].order, (init, *stages)))
            models.append(tuple(trained))
        ensemble = skeleton.replace(models=tuple(models))
        write_ensemble(staged, ensemble)
        os.rename(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        bar.close()
    digest = ensemble.digest()
    _register_root(chosen, os.fspath(out), digest, provenance)
    seen = sum(stage.examples for models in ensemble.models for m in models for stage in m.stages)
    return TrainedEnsemble(
        path=os.fspath(out),
        ensemble=ensemble,
        digest=digest,
        ledger=chosen.path,
        seconds=time.perf_counter() - started,
        stages=total,
        examples_seen=float(seen * recipe.epochs),
    )


def _group_keys(examples: Sequence[Example], field: str | None) -> list[str] | None:
    if field is None:
        return None
    missing = [example.id for example in examples if field not in example.metadata]
    if missing:
        raise SettingsError(
            f"{len(missing)} example(s) have no metadata field {field!r} to group by "
            f"(first: {missing[0]!r})."
        )
    return [str(example.metadata[field]) for example in examples]


def _orders(method: str, slices: int, budget, orders) -> np.ndarray:
    if method == "sisa":
        if budget != 1 or (orders is not None and len(orders) != 1):
            raise SettingsError("SISA trains one model per shard: its budget is 1.")
        orders = None
    if orders is None:
        return cyclic_orders(slices, budget)
    orders = np.asarray(orders)
    if orders.ndim != 2 or orders.shape[1] != slices or len(orders) == 0:
        raise SettingsError(
            f"Slice orders must be B rows of {slices} slice numbers, got shape {orders.shape}."
        )
    for order in orders:
        if sorted(order.tolist()) != list(range(slices)):
            raise SettingsError(
                f"The slice order {order.tolist()} is not a permutation of 0..{slices - 1}."
            )
    return orders
