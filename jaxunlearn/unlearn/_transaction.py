"""Saving an adapter and recording it as one recoverable transaction.

The steps, each durable before the next:
1. the new adapter is written under a staging name beside its destination;
2. an `intent` record names the staging folder, the destination and the staged files' digest;
3. the staging folder is renamed to its destination (atomic on one file system);
4. a `commit` record closes the intent.

A process killed at any point leaves a state that `recover` (run under the ledger's lock
before any new request) completes or rolls back: an intent whose files are in place or
staged intact is committed; any other is rolled back and its staging folder removed; staging
folders without an intent are leftovers of a run killed before step 2 and are removed. So a
rerun ends in the same state as an uninterrupted run.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal

from jaxunlearn.processes import shared_random_hex
from jaxunlearn.unlearn._digests import file_sha256
from jaxunlearn.unlearn._ledger import Ledger, Record

# Set to one of FAULT_POINTS to kill the process there (SIGKILL): how the tests show that
# every step of the transaction recovers.
FAULT_ENVIRONMENT = "JAXUNLEARN_TEST_KILL_AT"
FAULT_POINTS = ("staged", "intent", "renamed", "committed")
_STAGING_MARK = ".staging-"


def fault_point(name: str, /) -> None:
    """Kills this process when the test environment asks for it at `name`."""
    if os.environ.get(FAULT_ENVIRONMENT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def staging_path(destination: str | os.PathLike, /) -> pathlib.Path:
    """A fresh staging folder name beside `destination` (hidden, never a final name), the
    same on every process (they all call it together)."""
    destination = pathlib.Path(destination)
    return destination.parent / f".{destination.name}{_STAGING_MARK}{shared_random_hex(6)}"


def open_intents(records: list[Record]) -> list[Record]:
    """Intents with neither a commit nor a rollback."""
    closed = {record["intent"] for record in records if record.type in ("commit", "rollback")}
    return [r for r in records if r.type == "intent" and r.sequence not in closed]


def recover(ledger: Ledger, /, *, log=None) -> list[str]:
    """Completes or rolls back what interrupted runs left (call under `ledger.lock()`).

    Returns:
        One line per action taken, for people.
    """
    actions = []
    for intent in open_intents(ledger.records()):
        destination = pathlib.Path(intent["adapter"])
        staged = pathlib.Path(intent["staged"])
        expected = intent["staged_sha256"]
        if destination.exists() and file_sha256(destination) == expected:
            ledger.append("commit", intent=intent.sequence, recovered=True)
            actions.append(f"completed interrupted request {intent.sequence}: {destination}")
        elif staged.exists() and file_sha256(staged) == expected and not destination.exists():
            os.rename(staged, destination)
            ledger.append("commit", intent=intent.sequence, recovered=True)
            actions.append(f"completed interrupted request {intent.sequence}: {destination}")
        else:
            shutil.rmtree(staged, ignore_errors=True)
            ledger.append(
                "rollback",
                intent=intent.sequence,
                reason="the staged adapter was missing or incomplete after an interruption",
            )
            actions.append(f"rolled back interrupted request {intent.sequence}")
    if log is not None:
        for action in actions:
            log(action)
    return actions


def remove_stale_staging(destination: str | os.PathLike, records: list[Record], /) -> None:
    """Removes staging folders of `destination` that no open intent names (call under lock)."""
    destination = pathlib.Path(destination)
    named = {intent["staged"] for intent in open_intents(records)}
    prefix = f".{destination.name}{_STAGING_MARK}"
    if not destination.parent.is_dir():
        return
    for entry in destination.parent.iterdir():
        if entry.name.startswith(prefix) and os.fspath(entry) not in named:
            shutil.rmtree(entry, ignore_errors=True)
