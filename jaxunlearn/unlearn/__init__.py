"""Unlearning: requests to forget or correct training examples, and the ledger that records them.

A request (`Removal`, `QueryEdit`, `ResponseEdit`) names examples by id; `resolve_request`
checks it against the training set and gives the affected examples, their edited versions, the
dataset after the request and a fingerprint. The `Ledger` records every applied request by
hashes only, so that a repeated request is a no-op and a conflicting one an error.

`llmeraser` turns a request into an adapter update with influence functions (its
request-independent work prepared once by `prepare_llmeraser`), and `retrain` gives the
reference it is measured against.
"""

from jaxunlearn.unlearn._ledger import (
    ConflictingRequestError,
    Ledger,
    LedgerEntry,
    LedgerError,
    file_sha256,
)
from jaxunlearn.unlearn._llmeraser import (
    MODES,
    SOLVERS,
    EraserResult,
    EraserSettings,
    Preparation,
    PreparationMismatchError,
    llmeraser,
    load_preparation,
    prepare_llmeraser,
    save_preparation,
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
from jaxunlearn.unlearn._retrain import retrain, retrain_config

__all__ = [
    "MODES",
    "SOLVERS",
    "ConflictingRequestError",
    "EraserResult",
    "EraserSettings",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "Preparation",
    "PreparationMismatchError",
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
    "llmeraser",
    "load_preparation",
    "prepare_llmeraser",
    "resolve_request",
    "retrain",
    "retrain_config",
    "save_preparation",
]
