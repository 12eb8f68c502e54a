"""The ledger: an append-only, keyed, tamper-evident record of a lineage of adapters.

A deletion must be applied exactly once, and it must be true of the adapter the user goes on
with. The ledger is the record that makes both checkable. It is a JSON Lines file holding:

- a header (its id and a check value of its secret key);
- `root` records: an adapter that requests may be applied to (a fine-tune's output, or an
  adapter from elsewhere registered on first use), by its content digest;
- `intent` records: a request about to be saved (the parent adapter's digest, the request's
  keyed fingerprint and keyed id hashes, where the new adapter is staged and its digest);
- `commit` records: the intent's adapter is in place (figures of the run), or `rollback`
  records: it never will be.

Every value that could identify an example (its id, a digest of its text) is stored only as
an HMAC-SHA256 under the ledger's secret key, which lives in a separate file (`<ledger>.key`,
readable by its owner alone): holding the ledger without the key, nobody can confirm a guess
of an id. Each line also carries an HMAC of itself chained to the previous line's, so an
edited, removed or reordered line is detected.

`Ledger.lock()` serializes every writer of one ledger (POSIX `flock` on `<ledger>.lock`),
so two requests on one lineage run one after the other and give a chain, not a fork. The
other processes of a program on several hosts read it through `Ledger.reader()`: they neither
lock it (the writer holds the lock for the whole request) nor write it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import secrets
import uuid
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from jaxunlearn.data import json_line
from jaxunlearn.errors import UserError
from jaxunlearn.unlearn._requests import RequestError

try:  # POSIX only; elsewhere concurrent writers are not guarded against.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "ConflictingRequestError",
    "Ledger",
    "LedgerError",
    "Record",
]

# Written into the header, so that a future layout can be told apart from this one.
_FORMAT = 2
_KEY_CHECK_MESSAGE = b"jaxunlearn ledger key check"
RECORD_TYPES = ("root", "intent", "commit", "rollback")


class LedgerError(UserError, ValueError):
    """A ledger cannot be used: unreadable, tampered with, its key missing or wrong."""


class _Unreadable(Exception):
    """A line that is not a sealed JSON object at all (what a torn write leaves)."""

    def __init__(self, error: LedgerError):
        super().__init__(str(error))
        self.error = error


class ConflictingRequestError(RequestError):
    """A request conflicts with the adapter's lineage (e.g. it edits a removed example)."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One line of the ledger after its header.

    Attributes:
        sequence: Position among the records: 0, 1, 2, ...
        type: "root", "intent", "commit" or "rollback".
        created: When it was written: ISO-8601, UTC, to the second.
        fields: The record's own fields (see the module docstring), JSON values.
    """

    sequence: int
    type: str
    created: str
    fields: Mapping[str, Any] = dataclasses.field(hash=False)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


class Ledger:
    """The ledger file at `path`, with its key at `path + ".key"`.

    A missing ledger is created (with a fresh random key) by the first `append`. A line is a
    record only once it is complete with its newline: a last line cut short by a crash is
    ignored with a warning and removed by the next `append`.

    Example:
        >>> ledger = Ledger("run/unlearn-ledger.jsonl")                   # doctest: +SKIP
        >>> with ledger.lock():                                          # doctest: +SKIP
        ...     records = ledger.records()
        ...     ledger.append("root", adapter_digest=digest, adapter="run/adapter")
    """

    def __init__(self, path: str | os.PathLike, /, *, read_only: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.read_only = read_only
        self.key_path = self.path + ".key"
        self._lock_path = self.path + ".lock"
        self._key: bytes | None = None
        self._locked = 0
        # The seal of the last complete line read: the next line's seal chains to it.
        self._last_mac = ""

    def __repr__(self) -> str:
        return f"Ledger({self.path!r}{', read_only=True' if self.read_only else ''})"

    def reader(self) -> Ledger:
        """The same ledger for a process that only reads it: `lock()` does nothing (the
        writing process holds the lock), and writing, or creating the key, is an error."""
        return Ledger(self.path, read_only=True)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[Ledger]:
        """Holds the ledger's exclusive lock (re-entrant within one process); a reader's
        does nothing."""
        if self._locked or self.read_only:
            self._locked += 1
            try:
                yield self
            finally:
                self._locked -= 1
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self._lock_path, "a+b") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # Released when the file closes.
            self._locked = 1
            try:
                yield self
            finally:
                self._locked = 0

    @property
    def id(self) -> str | None:
        """The ledger's id (from its header), None while it does not exist."""
        header = self._read()[0]
        return None if header is None else header["ledger_id"]

    def ensure_exists(self) -> str:
        """Creates the ledger (its header and key) when it does not exist; returns its id."""
        self._check_writable()
        with self.lock():
            header = self._read()[0]
            if header is not None:
                return header["ledger_id"]
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            line = self._sealed(self._new_header(), previous_mac="")
            with open(self.path, "ab") as file:
                file.truncate(0)  # What a crash during creation left: never a record.
                file.write((line + "\n").encode("utf-8"))
                file.flush()
                os.fsync(file.fileno())
            _fsync_directory(os.path.dirname(self.path))
            return json.loads(line)["ledger_id"]

    def _new_header(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "type": "header",
            "ledger_id": uuid.uuid4().hex,
            "key_check": self._key_check(),
        }

    def keyed(self, value: str, /, *, purpose: str) -> str:
        """HMAC-SHA256 of `value` under the ledger's key: how the ledger names examples.

        Args:
            value: A string to hide (an example id, a request fingerprint).
            purpose: What it is ("id", "fingerprint", ...): the same value keyed for two
                purposes gives unrelated digests.
        """
        message = json.dumps([purpose, value], ensure_ascii=False).encode()
        with self.lock():  # A key created here must not race another process creating it.
            key = self._secret(create=not self.read_only)
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def records(self) -> list[Record]:
        """Every record in order; empty when the ledger does not exist.

        Raises:
            LedgerError: If a line other than the last cannot be read, a line was changed,
                removed or reordered, or the key does not belong to this ledger.
        """
        _header, records, _, torn_line = self._read()
        if torn_line is not None:
            warnings.warn(
                f"{self.path}: ignoring line {torn_line}, an incomplete record left by an "
                "interrupted write.",
                RuntimeWarning,
                stacklevel=2,
            )
        return records

    def append(self, record_type: str, /, **fields: Any) -> Record:
        """Appends a record and makes it durable before returning (under the lock).

        Raises:
            ValueError: If `fields` is not JSON-serializable with finite numbers.
            LedgerError: If the ledger cannot be read.
        """
        self._check_writable()
        if record_type not in RECORD_TYPES:
            raise ValueError(f"record type must be one of {RECORD_TYPES}, got {record_type!r}.")
        fields = _json_object(fields)
        with self.lock():
            header, records, committed_length, torn_line = self._read()
            is_new_file = header is None
            lines = []
            previous_mac = self._last_mac
            if header is None:
                header_line = self._sealed(self._new_header(), previous_mac="")
                lines.append(header_line)
                previous_mac = json.loads(header_line)["mac"]
            row = {
                "sequence": len(records),
                "type": record_type,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                **fields,
            }
            line = self._sealed(row, previous_mac=previous_mac)
            lines.append(line)
            with open(self.path, "ab") as file:
                if torn_line is not None:
                    # Appending after a torn line would glue the new record onto it, so the
                    # torn bytes (never a complete record) are cut off first.
                    warnings.warn(
                        f"{self.path}: removing line {torn_line}, an incomplete record left by "
                        "an interrupted write, before appending.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    file.truncate(committed_length)
                file.write("".join(text + "\n" for text in lines).encode("utf-8"))
                file.flush()
                os.fsync(file.fileno())
            if is_new_file:
                _fsync_directory(os.path.dirname(self.path))
        return _record_of(json.loads(line))

    def _check_writable(self) -> None:
        if self.read_only:
            raise RuntimeError(f"{self!r} is read-only: only the writing process writes it.")

    # Reading and sealing.

    def _secret(self, *, create: bool) -> bytes:
        if self._key is not None:
            return self._key
        try:
            with open(self.key_path, encoding="ascii") as file:
                text = file.read().strip()
        except FileNotFoundError:
            if os.path.exists(self.path) or not create:
                raise LedgerError(
                    f"{self.key_path} is missing: the ledger {self.path} cannot be read or "
                    "extended without its key. Restore the key file from where it was kept."
                ) from None
            os.makedirs(os.path.dirname(self.key_path), exist_ok=True)
            text = secrets.token_hex(32)
            # Readable by its owner alone, and never replaced once written.
            descriptor = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w", encoding="ascii") as file:
                file.write(text + "\n")
                file.flush()
                os.fsync(file.fileno())
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise LedgerError(f"{self.key_path} does not hold a ledger key.") from None
        if len(key) < 16:
            raise LedgerError(f"{self.key_path} holds a key shorter than 128 bits.")
        self._key = key
        return key

    def _key_check(self) -> str:
        return hmac.new(self._secret(create=True), _KEY_CHECK_MESSAGE, hashlib.sha256).hexdigest()

    def _sealed(self, row: Mapping[str, Any], *, previous_mac: str) -> str:
        body = json_line(row)
        mac = hmac.new(
            self._secret(create=True), (previous_mac + "\n" + body).encode(), hashlib.sha256
        ).hexdigest()
        return json_line({**row, "mac": mac})

    def _read(self) -> tuple[dict | None, list[Record], int, int | None]:
        """(header, records, byte length of the complete lines, number of a torn last line)."""
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            self._last_mac = ""
            return None, [], 0, None
        if b"\n" not in data:
            # A crash while the ledger was being created left no complete line: nothing was
            # ever recorded, so it reads as a new ledger (rewritten by the next append).
            self._last_mac = ""
            return None, [], 0, (1 if data else None)
        # Splitting on newlines leaves b"" last when the file ends with a complete line, and the
        # fragment of an interrupted write otherwise.
        *lines, fragment = data.split(b"\n")
        header: dict | None = None
        records: list[Record] = []
        committed_length = 0
        previous_mac = ""
        self._last_mac = ""
        for line_number, line in enumerate(lines, start=1):
            try:
                row = self._verified(line, line_number, previous_mac)
            except _Unreadable as unreadable:
                # A crash can only leave an unreadable fragment at the end of an append-only
                # file; a readable line whose seal fails is tampering, wherever it is. (A file
                # cut exactly at a line boundary cannot be told from a shorter ledger.)
                if line_number == len(lines) and not fragment and line_number > 1:
                    return header, records, committed_length, line_number
                raise unreadable.error from None
            previous_mac = row["mac"]
            self._last_mac = previous_mac
            if line_number == 1:
                header = self._checked_header(row)
            else:
                record = _record_of(row)
                if record.sequence != len(records):
                    raise self._corrupt(
                        line_number,
                        f"record has sequence {record.sequence}, expected {len(records)}",
                    )
                records.append(record)
            committed_length += len(line) + 1
        if header is None and fragment:
            raise self._corrupt(1, "the header is incomplete")
        torn_line = len(lines) + 1 if fragment else None
        return header, records, committed_length, torn_line

    def _verified(self, line: bytes, line_number: int, previous_mac: str) -> dict:
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _Unreadable(self._corrupt(line_number, f"not a JSON record ({error})")) from None
        if line_number == 1 and isinstance(row, dict) and row.get("format") != _FORMAT:
            raise LedgerError(
                f"{self.path}: ledger format {row.get('format')!r}; this version of jaxunlearn "
                f"reads format {_FORMAT} (keyed, sealed records). Start a new ledger for new "
                "requests and keep the old file as the record of earlier ones."
            )
        if not isinstance(row, dict) or not isinstance(row.get("mac"), str):
            raise _Unreadable(self._corrupt(line_number, "not a sealed JSON object"))
        if line_number == 1 and not hmac.compare_digest(
            str(row.get("key_check", "")), self._key_check()
        ):
            raise LedgerError(f"{self.key_path} is not the key of the ledger {self.path}.")
        body = json_line({name: value for name, value in row.items() if name != "mac"})
        expected = hmac.new(
            self._secret(create=False), (previous_mac + "\n" + body).encode(), hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected, row["mac"]):
            raise self._corrupt(
                line_number,
                "its seal does not match: the line (or one before it) was changed, removed or "
                "reordered, or the key is not this ledger's",
            )
        return row

    def _checked_header(self, row: dict) -> dict:
        if row.get("type") != "header" or not isinstance(row.get("ledger_id"), str):
            raise self._corrupt(1, "the first line is not a ledger header")
        if not hmac.compare_digest(row.get("key_check", ""), self._key_check()):
            raise LedgerError(f"{self.key_path} is not the key of the ledger {self.path}.")
        return row

    def _corrupt(self, line_number: int, problem: str) -> LedgerError:
        return LedgerError(f"{self.path}, line {line_number}: {problem}.")


def _record_of(row: Mapping[str, Any]) -> Record:
    fields = {
        name: value
        for name, value in row.items()
        if name not in ("sequence", "type", "created", "mac")
    }
    if row.get("type") not in RECORD_TYPES or not isinstance(row.get("sequence"), int):
        raise LedgerError(f"A ledger record has an unknown type {row.get('type')!r}.")
    return Record(row["sequence"], row["type"], row["created"], fields)


def _json_object(value: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round trip of `value`, so that the record returned equals the one read back."""
    if not all(isinstance(key, str) for key in value):
        raise ValueError("Ledger fields must have string keys.")
    reserved = {"sequence", "type", "created", "mac", "format"} & set(value)
    if reserved:
        raise ValueError(f"Ledger fields may not be named {sorted(reserved)}.")
    try:
        return json.loads(json_line(value))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Ledger fields must be JSON-serializable with finite numbers: {error}"
        ) from None


def _fsync_directory(directory: str) -> None:
    # Makes a newly created file's directory entry durable; not possible on Windows.
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
