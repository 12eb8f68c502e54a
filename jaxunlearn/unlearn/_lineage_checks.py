"""Which adapter a request is applied to, checked against its lineage's ledger.

An adapter is identified by its digest, which the lineage's ledger must have recorded (a
fine-tune's output is registered when written; an adapter made elsewhere is registered on
first use, with the sources it came with). The request then goes to the newest adapter of the
lineage unless a branch is asked for; a request the lineage already holds is a no-op; the base
model and tokenizer must be the ones the provenance records.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from jaxunlearn import processes
from jaxunlearn.data import json_line
from jaxunlearn.errors import UserError
from jaxunlearn.parallel import ONE_DEVICE, Placement
from jaxunlearn.unlearn._adapter_files import OpenAdapter, open_adapter, save_adapter_files
from jaxunlearn.unlearn._ledger import Ledger, Record
from jaxunlearn.unlearn._lineage import (
    ArtifactMismatchError,
    Provenance,
    Sources,
    adapter_digest,
    base_model_digest,
    tokenizer_digest,
)
from jaxunlearn.unlearn._requests import Removal, Request

__all__ = [
    "DEFAULT_LEDGER_NAME",
    "LineageError",
    "already_applied",
    "check_sources",
    "identify",
    "known_adapters",
    "ledger_for",
    "lineage_head",
    "register_adapter",
    "request_key",
    "save_root_adapter",
]

DEFAULT_LEDGER_NAME = "unlearn-ledger.jsonl"


class LineageError(UserError, ValueError):
    """The adapter does not fit its lineage: unrecorded, changed, or ambiguous successors."""


def ledger_for(opened: OpenAdapter, ledger: str | os.PathLike | None) -> Ledger:
    named = None if opened.provenance is None else opened.provenance.ledger
    if ledger is not None:
        chosen = Ledger(ledger)
        if named is not None and chosen.exists() and chosen.id != named["id"]:
            raise LineageError(
                f"The adapter {opened.path} belongs to the ledger {named['path']} (id "
                f"{named['id'][:12]}), not {chosen.path}; pass that ledger."
            )
        return chosen
    if named is not None:
        chosen = Ledger(named["path"])
        if not chosen.exists():
            raise LineageError(
                f"The ledger of the adapter {opened.path}, {named['path']}, is missing; pass "
                "its new location with --ledger."
            )
        return chosen
    return Ledger(pathlib.Path(opened.path).parent / DEFAULT_LEDGER_NAME)


def identify(opened, ledger, records, sources, skip_checks, notes) -> str:
    """The adapter's digest, checked against (or first registered in) the ledger."""
    known = known_adapters(records)
    if opened.provenance is None:
        return _identify_unverified(opened, ledger, known, sources, skip_checks, notes)
    provenance = opened.provenance
    if provenance.ledger is not None and provenance.ledger["id"] != ledger.id:
        raise LineageError(
            f"The adapter {opened.path} belongs to the ledger {provenance.ledger['path']} (id "
            f"{provenance.ledger['id'][:12]}), not {ledger.path}."
        )
    digest = adapter_digest(opened.model, provenance)
    if digest in known:
        return digest
    if provenance.ledger is not None:
        raise LineageError(
            f"The adapter {opened.path} differs from every adapter its ledger {ledger.path} "
            "recorded (its arrays, LoRA settings or provenance were changed after it was "
            "written). Use the adapter as written, or start a new lineage from a fine-tune."
        )
    _append_root(ledger, opened.path, digest, provenance)
    notes.append(f"Registered {opened.path} as a new lineage in {ledger.path}.")
    return digest


def _identify_unverified(opened, ledger, known, sources, skip_checks, notes) -> str:
    """An adapter from elsewhere (no provenance) is known by its arrays and LoRA settings;
    the sources of its first use are recorded with it and checked on every later use."""
    digest = adapter_digest(opened.model, None)
    provenance = _unverified_provenance(opened, sources)
    given = _source_digests(provenance)
    root = known.get(digest)
    if root is None:
        _append_root(ledger, opened.path, digest, provenance, sources=given)
        notes.append(
            f"{opened.path} came without provenance: its base model, tokenizer and data could "
            "not be checked against what it was trained with. They are recorded as given now "
            f"(a new lineage in {ledger.path}), and later requests are checked against them."
        )
    else:
        recorded = root.get("sources") or {}
        for name, value in given.items():
            if name not in skip_checks and recorded.get(name) not in (None, value):
                raise ArtifactMismatchError(
                    f"The {name.replace('_', ' ')} given differs from the one this adapter was "
                    f"first unlearned with (ledger {ledger.path}, record {root.sequence}). Pass "
                    f"the same, or skip this check ({name}) if you know why."
                )
    opened.provenance = provenance
    return digest


def _source_digests(provenance: Provenance) -> dict[str, str]:
    digests = {"base_model": provenance.base_model["digest"], "data": provenance.data["digest"]}
    if provenance.tokenizer is not None:
        digests["tokenizer"] = provenance.tokenizer["digest"]
    return digests


def _append_root(
    ledger: Ledger, path: str, digest: str, provenance: Provenance, *, sources=None
) -> Record | None:
    if ledger.read_only:
        return None  # Another process, the writer, appends the same record.
    return ledger.append(
        "root",
        adapter=path,
        adapter_digest=digest,
        verified=provenance.verified,
        checkpoints=provenance.checkpoints,
        sources=sources,
    )


def register_adapter(
    adapter: str | os.PathLike,
    /,
    *,
    base_model: str | os.PathLike,
    ledger: str | os.PathLike | None = None,
) -> Ledger:
    """Registers a newly written adapter as the root of a lineage (what `finetune` does).

    Write the adapter with `provenance.ledger = {"id": ledger.ensure_exists(), "path":
    ledger.path}` first, so that it names the ledger that records it.

    Returns:
        The ledger.
    """
    opened = open_adapter(adapter, base_model)  # every process: orbax restores together
    if opened.provenance is None:
        raise LineageError(f"{opened.path} has no provenance to register.")
    chosen = Ledger(ledger or pathlib.Path(opened.path).parent / DEFAULT_LEDGER_NAME)
    digest = adapter_digest(opened.model, opened.provenance)
    _register_root(chosen, opened.path, digest, opened.provenance)
    return chosen


def _register_root(ledger: Ledger, path: str, digest: str, provenance: Provenance) -> None:
    """The writer records the adapter at `path` as a root, unless the ledger knows it; every
    process calls it, and returns once the record is written."""
    with processes.step("jaxunlearn: root adapter registered"):
        if processes.is_writer():
            with ledger.lock():
                if digest not in known_adapters(ledger.records()):
                    _append_root(ledger, path, digest, provenance)


def save_root_adapter(
    model,
    path: str | os.PathLike,
    /,
    *,
    provenance: Provenance,
    ledger: str | os.PathLike,
    save_format: str = "jaxunlearn",
    lora_settings=None,
    description: dict[str, Any] | None = None,
    peft_base_model: str | None = None,
) -> Ledger:
    """Writes a fine-tune's adapter as the root of a new lineage and registers it.

    The adapter's provenance names the ledger (created when missing), and the ledger records
    the adapter's digest, so a request on a changed copy of it is refused. On several
    processes every process calls it; the writer creates and writes the ledger.

    Returns:
        The ledger.
    """
    chosen = Ledger(ledger)
    with processes.step("jaxunlearn: root ledger created"):
        if processes.is_writer():
            chosen.ensure_exists()
    provenance = provenance.replace(ledger={"id": chosen.id, "path": chosen.path})
    save_adapter_files(  # every process: the arrays may span them all
        model,
        path,
        save_format=save_format,
        provenance=provenance,
        lora_settings=lora_settings,
        description=description,
        peft_base_model=peft_base_model,
    )
    # The digest of the arrays just written, from memory (every process: a gather). Reading
    # them back would load the whole base on one device of the writer, and orbax restores
    # only with every process; each request checks the files against this digest anyway.
    digest = adapter_digest(model, provenance)
    _register_root(chosen, os.path.abspath(path), digest, provenance)
    return chosen


def _unverified_provenance(opened: OpenAdapter, sources: Sources) -> Provenance:
    """Provenance of an adapter from elsewhere, from the sources given at its first use.

    An older jaxunlearn adapter lists the example ids it was trained on; those are kept."""
    examples = sources.load_examples()
    listed = opened.metadata.get("example_ids")
    if listed is not None:
        present = {example.id for example in examples}
        missing = [example_id for example_id in listed if example_id not in present]
        if missing:
            raise ArtifactMismatchError(
                f"{sources.data} lacks {len(missing)} of the {len(listed)} examples the "
                f"adapter was trained on (e.g. {missing[0]!r})."
            )
        by_id = {example.id: example for example in examples}
        examples = [by_id[example_id] for example_id in listed]
    return Provenance.of_training(
        base_model=sources.base_model,
        tokenizer=sources.tokenizer_path,
        data=sources.data,
        examples=examples,
        train_config=opened.metadata.get("train_config"),
        tokenization=opened.metadata.get("tokenization", {}),
        verified=False,
    )


def known_adapters(records: Sequence[Record]) -> dict[str, Record]:
    """Adapter digest → the root or committed intent record that wrote it."""
    committed = {record["intent"] for record in records if record.type == "commit"}
    known = {}
    for record in records:
        if record.type == "root" or (record.type == "intent" and record.sequence in committed):
            known[record["adapter_digest"]] = record
    return known


def newest_record(known: dict[str, Record], digest: str, noun: str) -> Record | None:
    """The committed intent that wrote the newest descendant of `digest` (None: it has none).

    Raises:
        LineageError: If the lineage branches after `digest` (two requests on one parent).
    """
    children: dict[str, list[Record]] = {}
    for record in known.values():
        if record.type == "intent":
            children.setdefault(record["parent"], []).append(record)
    current, head_record = digest, None
    while current in children:
        successors = children[current]
        if len(successors) > 1:
            paths = ", ".join(record["adapter"] for record in successors)
            raise LineageError(
                f"The lineage branches after {noun} {current[:12]}: {paths}. Pass the {noun} "
                "to extend, or branch=True (--branch) to apply to this one."
            )
        head_record = successors[0]
        current = head_record["adapter_digest"]
    return head_record


def lineage_head(
    opened, digest, records, sources, branch, notes, placement: Placement = ONE_DEVICE
) -> tuple[OpenAdapter, str]:
    if branch:
        return opened, digest
    head_record = newest_record(known_adapters(records), digest, "adapter")
    if head_record is None:
        return opened, digest
    current = head_record["adapter_digest"]
    head = open_adapter(head_record["adapter"], sources.base_model, placement=placement)
    if adapter_digest(head.model, head.provenance) != current:
        raise LineageError(
            f"{head_record['adapter']}, the newest adapter of this lineage (ledger record "
            f"{head_record.sequence}), differs from what the ledger recorded."
        )
    notes.append(
        f"{opened.path} already has successors; the request is applied to the newest adapter "
        f"of its lineage, {head.path}, so that no earlier request is undone (branch=True, "
        "--branch, applies it to the adapter given instead)."
    )
    return head, current


def request_key(request: Request, /) -> str:
    """A digest of the request itself, independent of the data: its kind and ids (and, for an
    edit, digests of the new texts). Keyed by the ledger before it is stored."""
    if isinstance(request, Removal):
        body: Any = sorted(request.ids)
    else:
        body = [
            [example_id, hashlib.sha256(text.encode()).hexdigest()]
            for example_id, text in request.edits
        ]
    return hashlib.sha256(json_line({"kind": request.kind, "body": body}).encode()).hexdigest()


def already_applied(request, provenance: Provenance, ledger: Ledger, records):
    key = ledger.keyed(request_key(request), purpose="request")
    for applied in provenance.requests:
        if applied["request_key"] == key:
            return records[applied["record"]]
    return None


def check_sources(provenance: Provenance, sources: Sources, skip_checks) -> None:
    checks = [("base_model", sources.base_model, provenance.base_model, base_model_digest)]
    if provenance.tokenizer is not None:
        checks.append(("tokenizer", sources.tokenizer_path, provenance.tokenizer, tokenizer_digest))
    for name, path, recorded, digest_of in checks:
        if name in skip_checks:
            continue
        if digest_of(path) != recorded["digest"]:
            raise ArtifactMismatchError(
                f"The {name.replace('_', ' ')} {os.fspath(path)} is not the one the adapter was "
                f"trained with ({recorded['path']}, digest {recorded['digest'][:12]}): its files "
                f"differ. Pass the original, or skip this check ({name}) if you know why."
            )
