"""The request ledger: an append-only record of every applied unlearning request, without text.

A deletion must be applied exactly once. The ledger is a JSON Lines file with one entry per
applied request; before applying a request, `Ledger.check` finds out whether the same request
was applied already (the caller then does nothing) or whether it touches an example that an
earlier request removed (an error). Entries identify examples only by SHA-256 digests of their
ids and contents, never by their text, so the ledger can be kept after the data is gone.

The digests are unsalted: anyone holding the ledger and a guess of an example (its id, or its id
and exact text) can confirm the guess. They hide data from readers who do not already have it;
they do not make low-entropy ids secret.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

from jaxunlearn.data._jsonl import json_line
from jaxunlearn.errors import UserError
from jaxunlearn.unlearn._requests import RequestError, ResolvedRequest

try:  # POSIX only; elsewhere concurrent writers are not guarded against.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

# Written into every line, so that a future layout can be told apart from this one.
_FORMAT = 1


class LedgerError(UserError, ValueError):
    """A ledger file cannot be read: a corrupt line other than the last, or a missing line."""


class ConflictingRequestError(RequestError):
    """A request touches an example that an earlier, different request already removed."""


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One applied request, as stored on one line of the ledger.

    Attributes:
        fingerprint: The request's `ResolvedRequest.fingerprint`.
        kind: "removal", "query_edit" or "response_edit".
        example_hashes: Per affected example, the SHA-256 hex digest of its id and content hash.
        id_hashes: Per affected example (aligned with `example_hashes`), the SHA-256 hex digest of
            its id alone, which identifies the example even after its text was edited.
        num_examples: How many examples the request affected.
        method: The unlearning method that applied it (e.g. "llmeraser", "retrain").
        settings: The method's settings, as JSON.
        adapter: Where the resulting adapter was written.
        adapter_sha256: The `file_sha256` of that adapter, if computed.
        created: When the entry was recorded: ISO-8601, UTC, to the second.
        figures: Numbers about the run, e.g. the solver's residual or the seconds it took.
        sequence: The entry's position in the ledger: 0, 1, 2, ...
    """

    fingerprint: str
    kind: str
    example_hashes: tuple[str, ...]
    id_hashes: tuple[str, ...]
    num_examples: int
    method: str
    settings: dict[str, Any] = dataclasses.field(hash=False)
    adapter: str
    adapter_sha256: str | None
    created: str
    figures: dict[str, Any] = dataclasses.field(hash=False)
    sequence: int


class Ledger:
    """The ledger file at `path` (conventionally `ledger.jsonl` beside the adapters).

    A line is an entry only once it is complete with its newline: a last line cut short by a
    crash is ignored with a warning, and removed by the next `record`. Any other line that
    cannot be read, and entries out of sequence (a line deleted or moved), raise `LedgerError`.

    Example:
        >>> ledger = Ledger("runs/ledger.jsonl")                          # doctest: +SKIP
        >>> resolved = resolve_request(Removal(["p-17"]), examples)        # doctest: +SKIP
        >>> if (earlier := ledger.check(resolved)) is None:               # doctest: +SKIP
        ...     adapter = unlearn(...)
        ...     ledger.record(resolved, method="llmeraser", settings={...}, adapter=path)
    """

    def __init__(self, path: str | os.PathLike, /):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"Ledger({self.path!r})"

    def entries(self) -> list[LedgerEntry]:
        """The recorded entries in order; empty when the file does not exist.

        Raises:
            LedgerError: If a line other than the last cannot be read, or entries are out of
                sequence.
        """
        entries, _, torn_line = self._read()
        if torn_line is not None:
            warnings.warn(
                f"{self.path}: ignoring line {torn_line}, an incomplete entry left by an "
                "interrupted write; the request it was recording is not in the ledger.",
                RuntimeWarning,
                stacklevel=2,
            )
        return entries

    def find(self, fingerprint: str) -> LedgerEntry | None:
        """The entry with this request fingerprint, or None if there is none."""
        return next((entry for entry in self.entries() if entry.fingerprint == fingerprint), None)

    def check(self, resolved: ResolvedRequest, /) -> LedgerEntry | None:
        """Whether a request may be applied, given what the ledger has recorded.

        Args:
            resolved: The request, resolved against the dataset it is to be applied to.

        Returns:
            The earlier entry if this exact request (same fingerprint) was already applied: the
            caller should then do nothing. None if the request is new.

        Raises:
            ConflictingRequestError: If the request touches an example that an earlier,
                different request removed (matched by id, so also after edits of the example).
            LedgerError: If the ledger cannot be read.
        """
        return _check(resolved, self.entries())

    def record(
        self,
        resolved: ResolvedRequest,
        /,
        *,
        method: str,
        settings: Mapping[str, Any],
        adapter: str | os.PathLike,
        adapter_sha256: str | None = None,
        figures: Mapping[str, Any] | None = None,
    ) -> LedgerEntry:
        """Appends an entry for an applied request and makes it durable before returning.

        The ledger is checked again under an exclusive lock (on POSIX), so two processes cannot
        record the same or conflicting requests. Recording is not idempotent on purpose: an
        application that reaches `record` twice for one request has applied it twice, which is
        a bug to report, not to hide. Use `check` first to make a repeated request a no-op.

        Args:
            resolved: The applied request.
            method: The unlearning method's name.
            settings: The method's settings; must be JSON-serializable with string keys.
            adapter: Where the resulting adapter was written.
            adapter_sha256: Its `file_sha256`, if computed.
            figures: Numbers about the run (JSON-serializable, finite).

        Returns:
            The entry as it is stored (and as `entries` reads it back).

        Raises:
            RequestError: If this request (same fingerprint) was already recorded.
            ConflictingRequestError: If it touches an example removed by an earlier request.
            ValueError: If `settings` or `figures` is not JSON-serializable.
            LedgerError: If the ledger cannot be read.
        """
        settings = _json_object("settings", settings)
        figures = _json_object("figures", {} if figures is None else figures)
        if not isinstance(method, str) or not method:
            raise ValueError(f"The method must be a non-empty string, got {method!r}.")
        if adapter_sha256 is not None and not isinstance(adapter_sha256, str):
            raise ValueError(f"adapter_sha256 must be a string or None, got {adapter_sha256!r}.")

        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        is_new_file = not os.path.exists(self.path)
        with open(self.path, "ab") as file:
            if fcntl is not None:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX)  # Released when the file is closed.
            entries, committed_length, torn_line = self._read()
            earlier = _check(resolved, entries)
            if earlier is not None:
                raise RequestError(
                    f"{self.path}: this {resolved.kind} request was already recorded as entry "
                    f"{earlier.sequence} ({earlier.created}); recording it again would mean it "
                    "was applied twice. Call Ledger.check before applying a request."
                )
            line = json_line(
                {
                    "format": _FORMAT,
                    "fingerprint": resolved.fingerprint,
                    "kind": resolved.kind,
                    "example_hashes": list(resolved.example_hashes),
                    "id_hashes": list(resolved.id_hashes),
                    "num_examples": len(resolved.affected),
                    "method": method,
                    "settings": settings,
                    "adapter": os.fspath(adapter),
                    "adapter_sha256": adapter_sha256,
                    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "figures": figures,
                    "sequence": len(entries),
                }
            ).encode("utf-8")
            entry = _parse_line(line, len(entries) + 1, self.path)
            if torn_line is not None:
                # Appending after a torn line would glue the new entry onto it, so the torn
                # bytes (never a complete entry) are cut off first.
                warnings.warn(
                    f"{self.path}: removing line {torn_line}, an incomplete entry left by an "
                    "interrupted write, before appending.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                file.truncate(committed_length)
            file.write(line + b"\n")
            file.flush()
            os.fsync(file.fileno())
        if is_new_file:
            _fsync_directory(directory)
        return entry

    def _read(self) -> tuple[list[LedgerEntry], int, int | None]:
        """The entries, the byte length of the lines they come from, and the torn line's number.

        The torn line is the last line when it is not a complete entry; None when there is none.
        """
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return [], 0, None
        # Splitting on newlines leaves b"" last when the file ends with a complete line, and the
        # fragment of an interrupted write otherwise.
        *lines, fragment = data.split(b"\n")
        entries: list[LedgerEntry] = []
        committed_length = 0
        for line_number, line in enumerate(lines, start=1):
            try:
                entry = _parse_line(line, line_number, self.path)
            except LedgerError:
                # A crash can only damage the end of an append-only file.
                if line_number == len(lines) and not fragment:
                    return entries, committed_length, line_number
                raise
            if entry.sequence != len(entries):
                raise LedgerError(
                    f"{self.path}, line {line_number}: entry has sequence {entry.sequence}, "
                    f"expected {len(entries)}; lines of the ledger were removed or reordered."
                )
            entries.append(entry)
            committed_length += len(line) + 1
        torn_line = len(lines) + 1 if fragment else None
        return entries, committed_length, torn_line


def file_sha256(path: str | os.PathLike, /) -> str:
    """The SHA-256 hex digest of a file, or of a directory's files and their relative paths.

    For a directory, the digest covers every file below it, in sorted order of relative paths
    (with "/" separators), as (path, digest of contents) pairs; empty directories, permissions
    and times do not count. So the same adapter files give the same digest on every platform.

    Raises:
        FileNotFoundError: If `path` does not exist.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return _contents_sha256(path)
    relative_paths = []
    for folder, _, names in os.walk(path):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), path)
            relative_paths.append(relative.replace(os.sep, "/"))
    digest = hashlib.sha256()
    for relative in sorted(relative_paths):
        contents = _contents_sha256(os.path.join(path, *relative.split("/")))
        # One JSON line per file: an unambiguous encoding whatever characters a name holds.
        digest.update((json.dumps([relative, contents], ensure_ascii=False) + "\n").encode())
    return digest.hexdigest()


def _contents_sha256(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _check(resolved: ResolvedRequest, entries: list[LedgerEntry]) -> LedgerEntry | None:
    for entry in entries:
        if entry.fingerprint == resolved.fingerprint:
            return entry
    removed_by = {
        id_hash: entry
        for entry in entries
        if entry.kind == "removal"
        for id_hash in entry.id_hashes
    }
    conflicts = [
        (example.id, removed_by[id_hash])
        for example, id_hash in zip(resolved.affected, resolved.id_hashes, strict=True)
        if id_hash in removed_by
    ]
    if conflicts:
        shown = ", ".join(repr(example_id) for example_id, _ in conflicts[:5])
        more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
        sequences = sorted({entry.sequence for _, entry in conflicts})
        raise ConflictingRequestError(
            f"The {resolved.kind} request touches {len(conflicts)} example(s) already removed by "
            f"earlier requests (ledger entries {sequences}): {shown}{more}. Resolve requests "
            "against the dataset as it is after earlier removals."
        )
    return None


# The type every stored field must have; `format` is checked separately.
_FIELD_TYPES = {
    "fingerprint": str,
    "kind": str,
    "example_hashes": list,
    "id_hashes": list,
    "num_examples": int,
    "method": str,
    "settings": dict,
    "adapter": str,
    "adapter_sha256": (str, type(None)),
    "created": str,
    "figures": dict,
    "sequence": int,
}


def _parse_line(line: bytes, line_number: int, path: str) -> LedgerEntry:
    def corrupt(problem: str) -> LedgerError:
        return LedgerError(f"{path}, line {line_number}: {problem}")

    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise corrupt(f"not a JSON entry ({error}).") from None
    if not isinstance(row, dict):
        raise corrupt("not a JSON object.")
    if row.get("format") != _FORMAT:
        raise corrupt(
            f"ledger format {row.get('format')!r}, this version of jaxunlearn reads {_FORMAT}."
        )
    fields = {name: value for name, value in row.items() if name != "format"}
    if set(fields) != set(_FIELD_TYPES):
        missing = sorted(set(_FIELD_TYPES) - set(fields))
        extra = sorted(set(fields) - set(_FIELD_TYPES))
        raise corrupt(f"missing fields {missing}, unexpected fields {extra}.")
    for name, expected in _FIELD_TYPES.items():
        value = fields[name]
        # bool is an int subclass, but never a valid count.
        if not isinstance(value, expected) or isinstance(value, bool):
            raise corrupt(f"field {name!r} has the wrong type {type(value).__name__}.")
    for name in ("example_hashes", "id_hashes"):
        if not all(isinstance(digest, str) for digest in fields[name]):
            raise corrupt(f"field {name!r} must hold strings.")
        fields[name] = tuple(fields[name])
    return LedgerEntry(**fields)


def _json_object(name: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round trip of `value`, so that the entry returned equals the one read back."""
    if not isinstance(value, Mapping):
        raise ValueError(f"The ledger's {name} must be a mapping, got {type(value).__name__}.")
    if not all(isinstance(key, str) for key in value):
        raise ValueError(f"The ledger's {name} must have string keys.")
    try:
        return json.loads(json_line(value))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"The ledger's {name} must be JSON-serializable with finite numbers: {error}"
        ) from None


def _fsync_directory(directory: str) -> None:
    # Makes a newly created ledger file's directory entry durable; not possible on Windows.
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
