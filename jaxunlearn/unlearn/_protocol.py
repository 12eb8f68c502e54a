"""`apply_request`: the one exactly-once protocol every unlearning method goes through.

In order, under the ledger's lock (so two requests on one lineage make a chain, not a fork):

1. Recover what interrupted runs left (`_transaction.recover`).
2. Identify the adapter: its digest must be recorded in the lineage's ledger (a fine-tune's
   output is registered when it is written; an adapter from elsewhere is registered on first
   use, and said so). An adapter that differs from its record (a changed alpha, other
   arrays) is refused.
3. Move to the head of the lineage: when the adapter already has a successor (a request was
   applied to it), the request goes to the newest adapter, so no earlier deletion is lost;
   `branch=True` applies it to the adapter itself instead.
4. A request already applied on this lineage is a no-op returning the recorded result.
5. Content checks before any work: the base weights, tokenizer and every training example
   must be the ones the adapter's provenance records (an override names what to skip).
6. Resolve the request against the adapter's current training set: removed examples are
   gone, edited ones hold their edits; a request touching a removed example, the removal of
   an edited one (unless allowed) or of everything left is refused.
7. The method computes (its preparation checked against this adapter); its outcome is
   refused when non-finite, when it changes nothing, or when it makes the objective after the
   request worse on a held sample.
8. Save and record as one transaction (`_transaction`), then list (or purge) what still
   holds the removed data.

An ensemble (S3T, SISA) goes through the same steps with its manifest in the adapter's place
(`_sharded_requests`): the method there is a fallback to checkpoints, exact by construction.

On several processes (the hosts of a pod, `jax.distributed`), every process calls
`apply_request` with the same arguments and takes part in every computation and save; the
writer (process 0) alone holds the lock, recovers, registers and records, and the others read
the ledger only once the writer is done with each step (`processes.sync`). All of them return
the same outcome.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any

from flax import nnx

from jaxunlearn import processes
from jaxunlearn._strict_json import finite
from jaxunlearn.data import (
    DEFAULT_BUCKETS,
    check_tokenizer_fits,
    load_tokenizer,
    tokenize_examples,
)
from jaxunlearn.errors import UserError
from jaxunlearn.eval import timed
from jaxunlearn.parallel import ONE_DEVICE, Placement, activations_on
from jaxunlearn.unlearn._adapter_files import open_adapter, save_adapter_files
from jaxunlearn.unlearn._digests import examples_digest, file_sha256
from jaxunlearn.unlearn._ensemble import is_ensemble, read_ensemble
from jaxunlearn.unlearn._ledger import ConflictingRequestError, Record
from jaxunlearn.unlearn._lineage import (
    ARTIFACTS,
    Provenance,
    Sources,
    adapter_digest,
    current_examples,
)
from jaxunlearn.unlearn._lineage_checks import (
    DEFAULT_LEDGER_NAME,
    LineageError,
    already_applied,
    check_sources,
    identify,
    ledger_for,
    lineage_head,
    register_adapter,
    request_key,
)
from jaxunlearn.unlearn._method import (
    Method,
    MethodOutcome,
    Prepared,
    UnlearningContext,
    get_method,
)
from jaxunlearn.unlearn._outcome_checks import NoEffectError, ObjectiveWorsenedError, check_outcome
from jaxunlearn.unlearn._requests import Request, ResolvedRequest, resolve_request
from jaxunlearn.unlearn._sharded_requests import (
    ShardedMethod,
    apply_sharded_request,
    check_sharded_options,
)
from jaxunlearn.unlearn._stale import StaleCopy, deletable, purge, stale_copies
from jaxunlearn.unlearn._transaction import (
    fault_point,
    recover,
    remove_stale_staging,
    staging_path,
)

__all__ = [
    "DEFAULT_LEDGER_NAME",
    "LineageError",
    "NoEffectError",
    "ObjectiveWorsenedError",
    "RequestOutcome",
    "Sources",
    "apply_request",
    "register_adapter",
    "request_key",
]


@dataclasses.dataclass(frozen=True)
class RequestOutcome:
    """What `apply_request` did.

    Attributes:
        applied: True when this call applied the request; False when it had been applied on
            this lineage already (nothing was done: the fields describe the earlier run).
        adapter: The adapter that holds the request's effect (new, or the earlier one).
        adapter_digest: Its digest.
        parent: The adapter the request was applied to (the head of the lineage).
        kind: "removal", "query_edit" or "response_edit".
        num_examples: Examples the request touched.
        method: The method's name.
        record: The ledger record of the request (its intent's sequence number).
        approximate: True when the method stopped on a budget or approximates by design.
        figures: Numbers about the run (finite JSON values).
        message: One line for people.
        notes: Things the user should know (a moved head, a default's cost, ...).
        ledger: The ledger's path.
        stale: Files that still hold data this lineage removed (empty after a purge).
        purged: Files deleted by `purge=True`.
    """

    applied: bool
    adapter: str
    adapter_digest: str
    parent: str
    kind: str
    num_examples: int
    method: str
    record: int
    approximate: bool
    figures: Mapping[str, Any]
    message: str
    notes: tuple[str, ...] = ()
    ledger: str = ""
    stale: tuple[StaleCopy, ...] = ()
    purged: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The outcome as strict JSON values (for `--json` and reports)."""
        summary = {
            name: getattr(self, name)
            for name in (
                "applied",
                "adapter",
                "adapter_digest",
                "parent",
                "kind",
                "num_examples",
                "method",
                "record",
                "approximate",
                "ledger",
            )
        }
        summary["figures"] = finite(dict(self.figures))
        summary["notes"] = list(self.notes)
        summary["stale"] = [dataclasses.asdict(copy) for copy in self.stale]
        summary["purged"] = list(self.purged)
        return summary


def apply_request(
    request: Request,
    /,
    *,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    sources: Sources,
    method: str = "llmeraser",
    settings: Any = None,
    ledger: str | os.PathLike | None = None,
    preparation: str | os.PathLike | None = None,
    save_format: str | None = None,
    branch: bool = False,
    allow_edited_removal: bool = False,
    skip_checks: Collection[str] = (),
    purge_stale: bool = False,
    placement: Placement = ONE_DEVICE,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> RequestOutcome:
    """Applies an unlearning request to an adapter exactly once, and proves it in the ledger.

    Args:
        request: A `Removal`, `QueryEdit` or `ResponseEdit`.
        adapter: The adapter folder to apply it to (jaxunlearn or PEFT format), or an S3T
            or SISA ensemble folder (`train_ensemble`; method "s3t" or "sisa", which serve
            the request from its checkpoints, see `S3T`).
        out: A new folder for the resulting adapter (or ensemble).
        sources: The base model, tokenizer and data the adapter was trained with.
        method: A registered method's name (`method_names()`).
        settings: The method's settings (its `settings_type`; None: its defaults).
        ledger: The lineage's ledger (default: the one the adapter's provenance names, else
            `unlearn-ledger.jsonl` beside the adapter).
        preparation: A folder for the method's request-independent work: loaded (and checked
            against this adapter) when it exists, else written after the request.
        save_format: "jaxunlearn" or "peft" (default: the format of `adapter`).
        branch: Apply to `adapter` itself even when it has successors (a new branch).
        allow_edited_removal: Allow removing an example an earlier request edited.
        skip_checks: Artifacts whose digests are not checked: any of "base_model",
            "tokenizer", "data" (for users who know why they differ).
        purge_stale: Delete the files that still hold removed data (see `stale_copies`).
        placement: Where the model and the method's work live: one device (the default), or
            a mesh (`parallel.Placement(mesh, rules)`) whose devices each read and hold their
            share of the base weights; the result is the same adapter to float32 rounding.
        progress: Show progress bars of long work (an ensemble's retraining).
        log: Where progress lines go (default: stderr).

    Returns:
        A `RequestOutcome`.

    Raises:
        RequestError: For a malformed request, unknown ids, a removal of everything left.
        ConflictingRequestError: For a request touching removed examples, or removing an
            edited one without `allow_edited_removal`.
        ArtifactMismatchError: When a base model, tokenizer or data file differs from the
            adapter's provenance.
        LineageError: When the adapter differs from its ledger record.
        NoEffectError, ObjectiveWorsenedError, kernels.SolverError: When the method's update
            is refused; nothing is written then.
    """
    log = log if log is not None else _stderr
    unknown = sorted(set(skip_checks) - set(ARTIFACTS))
    if unknown:
        raise UserError(f"Unknown checks to skip {unknown}; choose among {list(ARTIFACTS)}.")
    implementation = get_method(method)
    if settings is None:
        settings = implementation.settings_type()
    elif not isinstance(settings, implementation.settings_type):
        raise UserError(
            f"Method {method!r} takes {implementation.settings_type.__name__}, got "
            f"{type(settings).__name__}."
        )
    if isinstance(implementation, ShardedMethod) or is_ensemble(adapter):
        if not isinstance(implementation, ShardedMethod):
            raise UserError(
                f"{os.fspath(adapter)} is an ensemble of {read_ensemble(adapter).method.upper()}; "
                f"{method} edits single adapters. Apply requests to an ensemble with --method "
                f"{read_ensemble(adapter).method}."
            )
        check_sharded_options(skip_checks, placement, preparation, save_format)
        return apply_sharded_request(
            request,
            method=implementation,
            settings=settings,
            adapter=adapter,
            out=out,
            sources=sources,
            ledger=ledger,
            branch=branch,
            allow_edited_removal=allow_edited_removal,
            skip_checks=skip_checks,
            purge_stale=purge_stale,
            progress=progress,
            log=log,
        )
    out = pathlib.Path(os.path.abspath(os.fspath(out)))
    opened = open_adapter(adapter, sources.base_model, placement=placement)
    ledger = ledger_for(opened, ledger)
    writer = processes.is_writer()
    ledger = ledger if writer else ledger.reader()
    notes: list[str] = []
    # On a mesh, the method's programs keep activations' rows on their devices as traced.
    with ledger.lock(), activations_on(placement):
        with processes.step("jaxunlearn: ledger recovered"):
            if writer:
                recover(ledger, log=log)
        # Every process: the adapter's digest gathers its arrays (a reader's registration of
        # a new adapter is the writer's).
        digest = identify(opened, ledger, ledger.records(), sources, skip_checks, notes)
        processes.sync("jaxunlearn: adapter identified")
        records = ledger.records()
        head, digest = lineage_head(opened, digest, records, sources, branch, notes, placement)
        provenance = head.provenance
        assert provenance is not None
        previous = already_applied(request, provenance, ledger, records)
        if previous is not None:
            return repeat_outcome(previous, records, head, ledger, notes)
        if out.exists():
            raise FileExistsError(f"{out} exists; choose a new folder for the adapter.")
        check_sources(provenance, sources, skip_checks)
        tokenizer = load_tokenizer(sources.tokenizer_path)
        check_tokenizer_fits(tokenizer, head.model.config)
        current = examples_now(sources, provenance, ledger, skip_checks)
        resolved = resolve_against(request, current.examples, current.dropped, provenance, ledger)
        check_edited_removal(resolved, provenance, allow_edited_removal)
        tokenization = trained_tokenization(provenance, sources, head.model)
        data = tokenize_examples(current.examples, tokenizer, **tokenization)
        context = UnlearningContext(
            model=head.model,
            examples=current.examples,
            data=data,
            tokenizer=tokenizer,
            adapter_digest=digest,
            data_digest=examples_digest(current.examples),
            train_config=provenance.train_config,
            placement=placement,
        )
        settings, settle_notes = implementation.settle(settings, context)
        notes.extend(settle_notes)
        prepared, prepared_here = _preparation(implementation, context, settings, preparation)
        measured = timed(
            lambda: implementation.apply(context, resolved, settings, prepared),
            warm_up=lambda: implementation.warm_up(context, resolved, settings, prepared),
        )
        outcome: MethodOutcome = measured.value
        checks, check_notes = check_outcome(
            outcome,
            context,
            resolved,
            tokenizer,
            tokenization,
            settings,
            refuse_worse=getattr(implementation, "refuses_worse_objective", True),
        )
        notes.extend(check_notes)
        figures = {
            **outcome.figures,
            **checks,
            "seconds": measured.seconds,
            "compile_seconds": measured.compile_seconds,
            "prepare_seconds": prepared.seconds if prepared_here and prepared else 0.0,
        }
        new_model = nnx.clone(head.model)
        nnx.update(new_model, outcome.lora)
        result = _save_and_record(
            implementation,
            settings,
            resolved,
            outcome,
            figures,
            head,
            digest,
            new_model,
            out,
            save_format or opened.format,
            ledger,
            preparation,
        )
        if prepared_here and preparation is not None:
            _save_preparation(implementation, prepared, preparation, log)
        stale = stale_copies(ledger.records(), result.adapter_digest, sources)
        purged: tuple[str, ...] = ()
        if purge_stale:
            purged = deletable(stale)
            processes.sync("jaxunlearn: stale copies listed")
            with processes.step("jaxunlearn: stale copies purged"):
                if writer:
                    purge(stale)
            stale = ()
        return dataclasses.replace(
            result,
            message=outcome.message,
            notes=tuple(notes),
            stale=tuple(stale),
            purged=purged,
        )


def repeat_outcome(intent: Record, records, head, ledger, notes) -> RequestOutcome:
    message = (
        f"This {intent['kind']} request was already applied on this lineage (ledger "
        f"{ledger.path}, record {intent.sequence}, {intent['method']}, {intent.created}); its "
        f"result is {intent['adapter']}. Nothing to do."
    )
    return RequestOutcome(
        applied=False,
        adapter=intent["adapter"],
        adapter_digest=intent["adapter_digest"],
        parent=intent["parent_path"],
        kind=intent["kind"],
        num_examples=intent["num_examples"],
        method=intent["method"],
        record=intent.sequence,
        approximate=intent["approximate"],
        figures=intent["figures"],
        message=message,
        notes=tuple(notes),
        ledger=ledger.path,
    )


# 6. Resolution against the current training set.


def resolve_against(request, examples, dropped, provenance, ledger) -> ResolvedRequest:
    removed_ids = {example.id for example in dropped}
    touched = [example_id for example_id in request.ids if example_id in removed_ids]
    if touched:
        raise ConflictingRequestError(
            f"The {request.kind} request touches {len(touched)} example(s) already removed by an "
            f"earlier request on this lineage (e.g. {touched[0]!r}); they are no longer in the "
            "adapter."
        )
    return resolve_request(request, examples)


def check_edited_removal(resolved: ResolvedRequest, provenance, allow: bool) -> None:
    if resolved.kind != "removal" or allow:
        return
    edited = set(provenance.edited)
    touched = [example.id for example in resolved.affected if example.id in edited]
    if touched:
        raise ConflictingRequestError(
            f"The removal names {len(touched)} example(s) an earlier request edited (e.g. "
            f"{touched[0]!r}); the adapter holds their edited versions. Pass "
            "allow_edited_removal (--allow-edited-removal) to remove them as edited."
        )


def trained_tokenization(provenance: Provenance, sources: Sources, model) -> dict[str, Any]:
    """How the adapter's data is tokenized: as trained (the request's gradients and curvature
    must see the very token ids and padded lengths it was trained on), unless overridden."""
    trained = provenance.tokenization or {}
    buckets = trained.get("buckets")
    return {
        "max_length": sources.max_length
        or trained.get("max_length")
        or model.config.max_position_embeddings,
        "truncate": bool(sources.truncate or trained.get("truncate", False)),
        "buckets": DEFAULT_BUCKETS if buckets is None else tuple(buckets),
    }


def _preparation(method: Method, context, settings, path) -> tuple[Prepared | None, bool]:
    key = method.preparation_key(settings)
    if key is None:
        return None, False
    if path is not None and os.path.exists(path):
        prepared = method.load_preparation(path, context)
        prepared.check(method.name, context, key)
        return prepared, False
    return method.prepare(context, settings), True


def _save_preparation(method, prepared, path, log) -> None:
    """A new preparation is saved after the request; failing to is a warning only."""
    try:
        method.save_preparation(prepared, path)
    except (OSError, ValueError) as error:
        log(f"warning: preparation not saved to {path}: {' '.join(str(error).split())}")


# 8. Saving and recording.


def _save_and_record(
    method,
    settings,
    resolved,
    outcome,
    figures,
    head,
    parent_digest,
    new_model,
    out,
    save_format,
    ledger,
    preparation,
) -> RequestOutcome:
    provenance = head.provenance
    keyed_ids = [ledger.keyed(example.id, purpose="id") for example in resolved.affected]
    applied = applied_entry(ledger, resolved, method.name, approximate=outcome.approximate)
    sequence = applied["record"]
    new_provenance = provenance_after(provenance, resolved, applied, ledger, parent_digest)
    description = {
        name: value
        for name, value in head.metadata.items()
        if name not in ("format", "lora", "provenance", "example_ids", "train_config")
    }
    staged = staging_path(out)
    writer = processes.is_writer()
    with processes.step("jaxunlearn: staging cleared"):
        if writer:
            remove_stale_staging(out, ledger.records())
    save_adapter_files(  # every process: the arrays span them all
        new_model,
        staged,
        save_format=save_format,
        provenance=new_provenance,
        lora_settings=head.lora_settings,
        description=description,
        peft_base_model=head.peft_base_model or provenance.base_model["path"],
    )
    new_digest = adapter_digest(new_model, new_provenance)  # every process: a gather
    with processes.step("jaxunlearn: request committed"):
        if writer:
            commit_request(
                ledger,
                sequence,
                parent=parent_digest,
                parent_path=head.path,
                adapter=os.fspath(out),
                adapter_digest=new_digest,
                staged=os.fspath(staged),
                request_key=applied["request_key"],
                fingerprint=applied["fingerprint"],
                id_hashes=keyed_ids,
                kind=resolved.kind,
                num_examples=len(resolved.affected),
                method=method.name,
                settings=finite(settings_json(settings)),
                approximate=bool(outcome.approximate),
                converged=outcome.converged,
                figures=finite(dict(figures)),
                preparation=None if preparation is None else os.path.abspath(preparation),
                adapter_format=save_format,
            )
    return RequestOutcome(
        applied=True,
        adapter=os.fspath(out),
        adapter_digest=new_digest,
        parent=head.path,
        kind=resolved.kind,
        num_examples=len(resolved.affected),
        method=method.name,
        record=sequence,
        approximate=bool(outcome.approximate),
        figures=finite(dict(figures)),
        message=outcome.message,
        ledger=ledger.path,
    )


def provenance_after(provenance, resolved, applied, ledger, parent_digest) -> Provenance:
    """The provenance of the adapter a request makes: the training set after it, the request
    appended (`applied`, its record in the lineage), the removed ids keyed by the ledger."""
    keyed_ids = [ledger.keyed(example.id, purpose="id") for example in resolved.affected]
    after = resolved.examples_after
    edited = list(provenance.edited)
    if resolved.kind != "removal":
        edited += [example.id for example in resolved.affected if example.id not in edited]
    else:
        removed_ids = {example.id for example in resolved.affected}
        edited = [example_id for example_id in edited if example_id not in removed_ids]
    return provenance.replace(
        example_ids=tuple(example.id for example in after),
        example_hashes=tuple(example.content_hash for example in after),
        data={**provenance.data, "digest": examples_digest(after)},
        ledger={"id": ledger.id, "path": ledger.path},
        parent=parent_digest,
        requests=(*provenance.requests, applied),
        removed=(*provenance.removed, *keyed_ids)
        if resolved.kind == "removal"
        else provenance.removed,
        edited=tuple(edited),
    )


def examples_now(sources, provenance, ledger, skip_checks):
    """The adapter's current training set out of the data file (`current_examples`): what
    earlier requests removed left out, each example checked against what it was trained on."""
    return current_examples(
        sources.load_examples(),
        provenance,
        removed=provenance.removed,
        keyed_id=lambda example_id: ledger.keyed(example_id, purpose="id"),
        source=os.fspath(sources.data),
        check_contents="data" not in skip_checks,
    )


def applied_entry(ledger, resolved: ResolvedRequest, method: str, *, approximate) -> dict:
    """The request as the new adapter's provenance lists it, numbered by the ledger record
    its intent is about to take (the caller holds the ledger's lock)."""
    return {
        "record": len(ledger.records()),
        "kind": resolved.kind,
        "method": method,
        "request_key": ledger.keyed(request_key(resolved.request), purpose="request"),
        "fingerprint": ledger.keyed(resolved.fingerprint, purpose="fingerprint"),
        "num_examples": len(resolved.affected),
        "approximate": bool(approximate),
    }


def commit_request(ledger, sequence: int, /, **intent) -> None:
    """The writer's transaction: intent (with the staged files' digest), rename, commit."""
    staged, out = intent["staged"], intent["adapter"]
    fault_point("staged")
    record = ledger.append("intent", **intent, staged_sha256=file_sha256(staged))
    if record.sequence != sequence:
        raise RuntimeError("The ledger changed while its lock was held.")
    fault_point("intent")
    os.rename(staged, out)
    fault_point("renamed")
    ledger.append("commit", intent=record.sequence)
    fault_point("committed")


def settings_json(settings) -> dict[str, Any]:
    if dataclasses.is_dataclass(settings):
        return json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    return {}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
