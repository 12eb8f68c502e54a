"""The project's own exception types for problems in what a user gave it.

Every error that a user can cause and fix (a missing or malformed file, a checkpoint that does
not match, settings out of range, a request the ledger refuses, a solve that failed) is a
`UserError`. The command line prints such an error as one line and exits with status 2; any
other exception is a bug and keeps its traceback. Each subclass also derives from the built-in
type callers have caught so far (`ValueError` for most), so `except ValueError` keeps working.
"""

__all__ = ["SettingsError", "UserError"]


class UserError(Exception):
    """A problem in the user's input or files, reported as one line (never a bug)."""


class SettingsError(UserError, ValueError):
    """Settings out of range or in conflict (a rank of 0, a damping below zero, ...)."""
