"""S3T and SISA as methods of `apply_request`: a request served from checkpoints, exactly.

A removal of examples in slice j of a shard makes each model of that shard fall back to its
last checkpoint that never saw slice j: with j at position p of the model's slice order,
stages p..L saw it, so the model keeps stages 0..p−1 (p = 1: it is gone). Every checkpoint
kept was trained only on slices the request did not touch, so what is served is what
training on the surviving data gives, bit for bit, with no approximation to bound.

With `retrain`, each model of an affected shard then trains its lost stages again on the
data after the request (SISA's way, and the only way an edit is served: the stages that saw
the old text are redone with the new one). It also completes every model an earlier request
left short of stages, so a shard with no model left is served again.

Checkpoints that saw removed (or edited) data are deleted from disk once the request is
committed, and the ledger's record names them: keeping a model with a point and one without
it lets an attacker recover the point from their difference. A deletion interrupted between
the commit and the purge is completed by the next request on the ledger.

The transaction is the protocol's: the new ensemble folder (its manifest and any retrained
checkpoints) is staged, recorded as an intent, renamed into place and committed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
import types
from collections.abc import Callable, Collection
from typing import Any, ClassVar

from tqdm.auto import tqdm

from jaxunlearn._strict_json import finite
from jaxunlearn.data import check_tokenizer_fits, load_tokenizer, tokenize_examples
from jaxunlearn.errors import SettingsError, UserError
from jaxunlearn.unlearn._ensemble import (
    Ensemble,
    ShardModel,
    StageCheckpoint,
    is_ensemble,
    open_ensemble,
    write_ensemble,
)
from jaxunlearn.unlearn._ledger import Record
from jaxunlearn.unlearn._lineage import ARTIFACTS
from jaxunlearn.unlearn._lineage_checks import (
    LineageError,
    already_applied,
    check_sources,
    known_adapters,
    ledger_for,
    newest_record,
)
from jaxunlearn.unlearn._requests import Request, RequestError, ResolvedRequest
from jaxunlearn.unlearn._sharded_training import retrain_stages
from jaxunlearn.unlearn._stale import StaleCopy, data_copy
from jaxunlearn.unlearn._transaction import recover, remove_stale_staging, staging_path

__all__ = [
    "S3T",
    "SISA",
    "S3TSettings",
    "SISASettings",
    "ShardedMethod",
    "apply_sharded_request",
]


@dataclasses.dataclass(frozen=True)
class S3TSettings:
    """How S3T serves a request.

    Attributes:
        retrain: Train the stages each affected model lost again, on the data after the
            request, so the shard's models are whole again (costs those stages' training);
            models that earlier requests left short are completed too. Without it a request
            costs no training at all; an edit needs it.
    """

    retrain: bool = False


@dataclasses.dataclass(frozen=True)
class SISASettings:
    """How SISA serves a request.

    Attributes:
        retrain: Train the affected shard again from its last checkpoint before the slice
            that held the examples, on the data after the request (SISA's rule). Without it
            the shard's model falls back to that checkpoint (fewer slices learned) and says
            so; an edit needs it. A retraining request also completes shards that earlier
            requests left short.
    """

    retrain: bool = True


class ShardedMethod:
    """An exact method served from an ensemble's checkpoints (S3T, SISA).

    Attributes:
        name: The registry name, also the ensemble's `method`.
        settings_type: Its settings.
        description: One line for `--help`.
    """

    name: ClassVar[str]
    settings_type: ClassVar[type]
    description: ClassVar[str]


class S3T(ShardedMethod):
    name = "s3t"
    settings_type = S3TSettings
    description = (
        "S3T: exact, from an ensemble trained by finetune --method s3t (each model falls back "
        "to its last stage that never saw the examples)"
    )


class SISA(ShardedMethod):
    name = "sisa"
    settings_type = SISASettings
    description = (
        "SISA: exact, from an ensemble trained by finetune --method sisa (the affected shard "
        "retrains from its last checkpoint before the examples' slice)"
    )


def apply_sharded_request(
    request: Request,
    /,
    *,
    method: ShardedMethod,
    settings: Any,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    sources,
    ledger: str | os.PathLike | None,
    branch: bool,
    allow_edited_removal: bool,
    skip_checks: Collection[str],
    purge_stale: bool,
    progress: bool = True,
    log: Callable[[str], None],
):
    """`apply_request` for an ensemble folder (see the module docstring); same arguments."""
    from jaxunlearn.unlearn import _protocol as protocol

    if not is_ensemble(adapter):
        raise UserError(
            f"{os.fspath(adapter)} is a single adapter; --method {method.name} serves requests "
            f"from an ensemble trained by `jaxunlearn finetune --method {method.name}`."
        )
    out = pathlib.Path(os.path.abspath(os.fspath(out)))
    opened = open_ensemble(adapter, sources.base_model)
    if opened.ensemble.method != method.name:
        raise UserError(
            f"{opened.path} is an {opened.ensemble.method.upper()} ensemble; apply requests to "
            f"it with --method {opened.ensemble.method}."
        )
    ledger = ledger_for(opened, ledger)
    notes: list[str] = []
    with ledger.lock():
        recover(ledger, log=log)
        records = ledger.records()
        purged_earlier = _finish_interrupted_purges(records)
        known = known_adapters(records)
        provenance = opened.provenance
        if provenance.ledger is None or provenance.ledger["id"] != ledger.id:
            raise LineageError(
                f"The ensemble {opened.path} does not belong to the ledger {ledger.path}."
            )
        if opened.digest not in known:
            raise LineageError(
                f"The ensemble {opened.path} differs from every ensemble its ledger {ledger.path} "
                "recorded (its manifest was changed after it was written)."
            )
        head = opened if branch else _head(opened, known, sources, notes)
        provenance = head.provenance
        previous = already_applied(request, provenance, ledger, records)
        if previous is not None:
            return protocol.repeat_outcome(previous, records, head, ledger, notes)
        if out.exists():
            raise FileExistsError(f"{out} exists; choose a new folder for the ensemble.")
        check_sources(provenance, sources, skip_checks)
        tokenizer = load_tokenizer(sources.tokenizer_path)
        config = json.loads((pathlib.Path(sources.base_model) / "config.json").read_text())
        check_tokenizer_fits(tokenizer, types.SimpleNamespace(vocab_size=config["vocab_size"]))
        current = protocol.examples_now(sources, provenance, ledger, skip_checks)
        resolved = protocol.resolve_against(
            request, current.examples, current.dropped, provenance, ledger
        )
        protocol.check_edited_removal(resolved, provenance, allow_edited_removal)
        if resolved.kind != "removal" and not settings.retrain:
            raise RequestError(
                f"{method.name.upper()} serves an edit only by retraining the stages that saw "
                "the old text: pass retrain=True (--retrain)."
            )
        remove_stale_staging(out, records)
        staged = staging_path(out)
        started = time.perf_counter()
        try:
            new, invalidated, retrained = _serve(
                head, resolved, settings, sources, tokenizer, staged, progress
            )
            seconds = time.perf_counter() - started
            applied = protocol.applied_entry(ledger, resolved, method.name, approximate=False)
            sequence = applied["record"]
            new = new.replace(
                provenance=protocol.provenance_after(
                    provenance, resolved, applied, ledger, head.digest
                )
            )
            write_ensemble(staged, new)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        figures = _figures(new, invalidated, retrained, seconds)
        invalidated_paths = sorted({head.checkpoint_path(c) for c in invalidated})
        protocol.commit_request(
            ledger,
            sequence,
            parent=head.digest,
            parent_path=head.path,
            adapter=os.fspath(out),
            adapter_digest=new.digest(),
            staged=os.fspath(staged),
            request_key=applied["request_key"],
            fingerprint=applied["fingerprint"],
            id_hashes=[ledger.keyed(example.id, purpose="id") for example in resolved.affected],
            kind=resolved.kind,
            num_examples=len(resolved.affected),
            method=method.name,
            settings=finite(protocol.settings_json(settings)),
            approximate=False,
            converged=None,
            figures=finite(figures),
            preparation=None,
            adapter_format="ensemble",
            invalidated=invalidated_paths,
        )
        purged = (*purged_earlier, *_purge(invalidated_paths))
        notes.extend(_shard_notes(new, method))
        stale = _stale_copies(ledger.records(), new.digest(), sources)
        if purge_stale:
            purged = (*purged, *_purge([copy.path for copy in stale if copy.purgeable]))
            stale = [copy for copy in stale if not copy.purgeable]
    message = _message(method, resolved, invalidated_paths, retrained, new)
    return protocol.RequestOutcome(
        applied=True,
        adapter=os.fspath(out),
        adapter_digest=new.digest(),
        parent=head.path,
        kind=resolved.kind,
        num_examples=len(resolved.affected),
        method=method.name,
        record=sequence,
        approximate=False,
        figures=finite(figures),
        message=message,
        notes=tuple(notes),
        ledger=ledger.path,
        stale=tuple(stale),
        purged=tuple(purged),
    )


def _serve(head, resolved: ResolvedRequest, settings, sources, tokenizer, staged, progress):
    """The ensemble after the request: (manifest without new provenance, invalidated
    checkpoints, stages retrained)."""
    from jaxunlearn.unlearn import _protocol as protocol

    ensemble = head.ensemble
    where = {
        example_id: (shard, slice_number)
        for shard, slices in enumerate(ensemble.partition)
        for slice_number, ids in enumerate(slices)
        for example_id in ids
    }
    hit: dict[int, set[int]] = {}
    for example in resolved.affected:
        shard, slice_number = where[example.id]
        hit.setdefault(shard, set()).add(slice_number)
    removed = {example.id for example in resolved.affected} if resolved.kind == "removal" else set()
    partition = tuple(
        tuple(tuple(i for i in ids if i not in removed) for ids in slices)
        for slices in ensemble.partition
    )
    after = ensemble.replace(partition=partition)
    data = None
    if settings.retrain:
        tokenization = protocol.trained_tokenization(head.provenance, sources, head.model)
        data = tokenize_examples(resolved.examples_after, tokenizer, **tokenization)
    invalidated: list[StageCheckpoint] = []
    retrained = 0
    bar = tqdm(
        desc=f"{ensemble.method} retrain", unit="stage", disable=not progress or data is None
    )
    models = []
    for shard, shard_models in enumerate(ensemble.models):
        kept_models = []
        for order, model in enumerate(shard_models):
            keep = model.stages
            if shard in hit:
                # Stage i saw slices order[0..i−1]: keep the stages before the first hit slice.
                first_hit = min(model.order.index(j) for j in hit[shard]) + 1
                keep = model.stages[: min(len(model.stages), first_hit)]
                invalidated.extend(model.stages[len(keep) :])
            # Retraining completes every model short of its stages, also one an earlier
            # request left short (a shard with no model left comes back this way).
            if settings.retrain and len(keep) <= ensemble.slices:
                start = head.load_stage(keep[-1])
                new_stages = retrain_stages(
                    head.model,
                    after,
                    data,
                    shard=shard,
                    order=order,
                    start=start,
                    first_stage=len(keep),
                    folder=staged,
                    on_stage=lambda: bar.update(1),
                )
                retrained += len(new_stages)
            else:
                new_stages = ()
            # Kept checkpoints are named from the new folder; retrained ones live in it.
            kept = tuple(_rebased(checkpoint, head.path, staged) for checkpoint in keep)
            kept_models.append(ShardModel(model.order, (*kept, *new_stages)))
        models.append(tuple(kept_models))
    bar.close()
    return after.replace(models=tuple(models)), invalidated, retrained


def _rebased(checkpoint: StageCheckpoint, old_folder: str, staged) -> StageCheckpoint:
    """A checkpoint named by the ensemble at `old_folder`, as the new ensemble (staged at
    `staged`, renamed to its destination when committed) names it."""
    absolute = os.path.normpath(os.path.join(old_folder, checkpoint.path))
    return dataclasses.replace(checkpoint, path=os.path.relpath(absolute, _final_folder(staged)))


def _final_folder(staged) -> str:
    """The destination of a staging folder (`.NAME.staging-XXXX` beside NAME)."""
    staged = pathlib.Path(staged)
    name = staged.name[1:].rsplit(".staging-", 1)[0]
    return os.fspath(staged.parent / name)


def _head(opened, known: dict[str, Record], sources, notes):
    head_record = newest_record(known, opened.digest, "ensemble")
    if head_record is None:
        return opened
    current = head_record["adapter_digest"]
    head = open_ensemble(head_record["adapter"], sources.base_model)
    if head.digest != current:
        raise LineageError(
            f"{head_record['adapter']}, the newest ensemble of this lineage (ledger record "
            f"{head_record.sequence}), differs from what the ledger recorded."
        )
    notes.append(
        f"{opened.path} already has successors; the request is applied to the newest ensemble "
        f"of its lineage, {head.path}, so that no earlier request is undone."
    )
    return head


def _purge(paths) -> tuple[str, ...]:
    deleted = []
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
            deleted.append(path)
        elif os.path.exists(path):
            os.remove(path)
            deleted.append(path)
    return tuple(deleted)


def _finish_interrupted_purges(records) -> tuple[str, ...]:
    """Deletes the invalidated checkpoints of committed requests that are still on disk (a
    process killed between a commit and its purge)."""
    committed = {record["intent"] for record in records if record.type == "commit"}
    paths = [
        path
        for record in records
        if record.type == "intent" and record.sequence in committed
        for path in record.get("invalidated") or ()
    ]
    return _purge(paths)


def _stale_copies(records, digest: str, sources) -> list[StaleCopy]:
    """The earlier manifests of the lineage (they name the removed examples; their
    checkpoints that saw them are deleted already) and the data file."""
    by_digest = known_adapters(records)
    copies, record, removed_any = [], by_digest.get(digest), False
    while record is not None and record.type == "intent":
        removed_any = removed_any or record["kind"] == "removal"
        parent = by_digest.get(record["parent"])
        if parent is not None:
            manifest = os.path.join(parent["adapter"], "ensemble.json")
            if os.path.exists(manifest):
                copies.append(
                    StaleCopy(
                        manifest,
                        "manifest",
                        f"the manifest of an earlier ensemble, made before record "
                        f"{record.sequence}; it lists the examples that request changed",
                    )
                )
        record = parent
    if removed_any:
        copies.extend(data_copy(sources))
    return copies


def _figures(ensemble: Ensemble, invalidated, retrained: int, seconds: float) -> dict[str, Any]:
    served = ensemble.served()
    return {
        "seconds": seconds,
        "compile_seconds": 0.0,
        "prepare_seconds": 0.0,
        "checkpoints_invalidated": len(invalidated),
        "stages_retrained": retrained,
        "shards": ensemble.shards,
        "shards_served": sum(order is not None for order in served),
        "served_stages": [
            0 if order is None else ensemble.models[shard][order].trained_stages
            for shard, order in enumerate(served)
        ],
    }


def _shard_notes(ensemble: Ensemble, method: ShardedMethod) -> list[str]:
    gone = [shard for shard, order in enumerate(ensemble.served()) if order is None]
    if not gone:
        return []
    shards = ", ".join(map(str, gone))
    return [
        f"Shard(s) {shards} have no model left (every model lost its first stage) and are left "
        f"out of the ensemble; the next request with retrain=True (--retrain) trains every "
        f"model short of stages again, these shards' included, or fine-tune a new ensemble "
        f"with --method {method.name}."
    ]


def _message(method, resolved, invalidated_paths, retrained, ensemble: Ensemble) -> str:
    served = ensemble.served()
    prefixes = [
        "none" if order is None else str(ensemble.models[shard][order].trained_stages)
        for shard, order in enumerate(served)
    ]
    return (
        f"{method.name.upper()}: {resolved.kind} of {len(resolved.affected)} example(s); "
        f"{len(invalidated_paths)} checkpoint(s) that saw them invalidated and deleted, "
        f"{retrained} stage(s) retrained; served stages per shard: {', '.join(prefixes)} "
        f"of {ensemble.slices}."
    )


def check_sharded_options(skip_checks, placement, preparation, save_format) -> None:
    """Refuses the options of `apply_request` that an ensemble does not take."""
    unknown = sorted(set(skip_checks) - set(ARTIFACTS))
    if unknown:
        raise UserError(f"Unknown checks to skip {unknown}; choose among {list(ARTIFACTS)}.")
    if placement.mesh is not None:
        raise SettingsError("S3T and SISA requests run on one device; drop the mesh.")
    if preparation is not None:
        raise SettingsError("S3T and SISA prepare nothing: drop the preparation folder.")
    if save_format not in (None, "ensemble"):
        raise SettingsError("An S3T or SISA request writes an ensemble folder: drop save_format.")
