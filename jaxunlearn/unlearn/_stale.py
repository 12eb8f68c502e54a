"""What still holds data a lineage removed, and purging it.

After a request, the adapter the user goes on with no longer encodes the removed examples,
but other files may: the earlier adapters of the lineage, the fine-tune's checkpoints, the
preparations made at earlier adapters (their full-data gradients sum over the removed
examples), and the data file itself. Keeping both an old and a new model lets an attacker
extract what the deletion removed, so `apply_request` lists these and `purge` deletes them
(all but the user's own data file, which it only names).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence

from jaxunlearn.unlearn._ledger import Record
from jaxunlearn.unlearn._lineage_checks import known_adapters

__all__ = ["StaleCopy", "purge", "stale_copies"]


@dataclasses.dataclass(frozen=True)
class StaleCopy:
    """A file or folder that still holds data the lineage removed.

    Attributes:
        path: Where it is.
        kind: "adapter", "checkpoints", "preparation" or "data".
        reason: Why it still holds removed data.
        purgeable: Whether `purge` deletes it (never the user's data file).
    """

    path: str
    kind: str
    reason: str
    purgeable: bool = True


def stale_copies(records: Sequence[Record], digest: str, sources) -> list[StaleCopy]:
    """What still holds examples removed (or texts edited) on the way to adapter `digest`.

    Args:
        records: The ledger's records.
        digest: The newest adapter's digest.
        sources: The `Sources` of the request (its data file is listed, never deleted).
    """
    by_digest = known_adapters(records)
    copies: list[StaleCopy] = []
    record = by_digest.get(digest)
    removed_any = False
    while record is not None and record.type == "intent":
        removed_any = removed_any or record["kind"] == "removal"
        preparation = record.get("preparation")
        if preparation and os.path.exists(preparation):
            copies.append(
                StaleCopy(
                    preparation,
                    "preparation",
                    f"made at the adapter before record {record.sequence}; its gradients and "
                    "curvature include the examples that request changed",
                )
            )
        parent = by_digest.get(record["parent"])
        if parent is not None and os.path.exists(parent["adapter"]):
            copies.append(
                StaleCopy(
                    parent["adapter"],
                    "adapter",
                    f"an earlier adapter of this lineage, made before record {record.sequence} "
                    f"({record['kind']} of {record['num_examples']} examples)",
                )
            )
        record = parent
    checkpoints = _checkpoints_of(by_digest, digest)
    if checkpoints and os.path.exists(checkpoints):
        copies.append(
            StaleCopy(
                checkpoints,
                "checkpoints",
                "the fine-tune's checkpoints, trained on every example",
            )
        )
    if removed_any:
        copies.extend(data_copy(sources))
    return _unique(copies)


def data_copy(sources) -> list[StaleCopy]:
    """The training data file, which still holds removed examples: named, never purged."""
    if not os.path.exists(sources.data):
        return []
    return [
        StaleCopy(
            os.path.abspath(sources.data),
            "data",
            "the training data file still holds the removed examples (your file: edit it "
            "yourself; purging leaves it alone)",
            purgeable=False,
        )
    ]


def deletable(copies: Sequence[StaleCopy], /) -> tuple[str, ...]:
    """The paths `purge` would delete: the purgeable copies that exist."""
    return tuple(copy.path for copy in copies if copy.purgeable and os.path.exists(copy.path))


def purge(copies: Sequence[StaleCopy], /) -> tuple[str, ...]:
    """Deletes every purgeable copy; returns the paths deleted."""
    deleted = deletable(copies)
    for path in deleted:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return deleted


def _checkpoints_of(by_digest, digest) -> str | None:
    record = by_digest.get(digest)
    while record is not None and record.type == "intent":
        record = by_digest.get(record["parent"])
    return None if record is None else record.get("checkpoints")


def _unique(copies: list[StaleCopy]) -> list[StaleCopy]:
    seen, unique = set(), []
    for copy in copies:
        if copy.path not in seen:
            seen.add(copy.path)
            unique.append(copy)
    return unique
