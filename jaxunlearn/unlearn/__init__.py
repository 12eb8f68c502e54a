"""Unlearning: requests to forget or correct training examples, and the ledger that records them.

A request (`Removal`, `QueryEdit`, `ResponseEdit`) names examples by id; `resolve_request`
checks it against the training set and gives the affected examples, their edited versions, the
dataset after the request and a fingerprint. The `Ledger` records every applied request by
hashes only, so that a repeated request is a no-op and a conflicting one an error.
"""

from jaxunlearn.unlearn._ledger import (
    ConflictingRequestError,
    Ledger,
    LedgerEntry,
    LedgerError,
    file_sha256,
)
from jaxunlearn.unlearn._requests import (
    QueryEdit,
    Removal,
    Request,
    RequestError,
    ResolvedRequest,
    ResponseEdit,
    UnknownExampleError,
    WholeDatasetError,
    id_hash,
    resolve_request,
)

__all__ = [
    "ConflictingRequestError",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "QueryEdit",
    "Removal",
    "Request",
    "RequestError",
    "ResolvedRequest",
    "ResponseEdit",
    "UnknownExampleError",
    "WholeDatasetError",
    "file_sha256",
    "id_hash",
    "resolve_request",
]
