"""Unlearning: requests to forget or correct training examples, applied exactly once.

A request (`Removal`, `QueryEdit`, `ResponseEdit`) names examples by id. `apply_request` is the
one protocol that applies it to an adapter: it checks the adapter against its lineage (its
provenance and the ledger, `Ledger`), checks the base model, tokenizer and data against what
the adapter was trained with, lets a registered method compute the update (`get_method`;
`LLMEraser` by default), refuses an update that changes nothing or makes things worse, and
saves and records the result as one recoverable transaction. `retrain` gives the reference
every method is measured against.

A method is one module implementing `Method` plus one `register` call. `ModuleRemoval`
resets the LoRA modules a request's gradient dominates and restores them by a short fine-tune.
S3T and SISA are exact by construction: `train_ensemble` trains their shard models stage by
stage, and a request falls back to (or retrains from) the checkpoints that never saw the
examples. Where the objective is convex (a logistic head on frozen features, trained with a
random linear perturbation), `train_certified_head` and `remove_certified` give removals with an
(ε, δ) certificate instead: one Newton step each, its gradient residual bounded and spent from
a budget, and a retrain once the budget is gone.
"""

from jaxunlearn.unlearn._adapter_files import (
    ADAPTER_FORMATS,
    adapter_format,
    open_adapter,
    save_adapter_files,
)
from jaxunlearn.unlearn._certified_removal import (
    GRADIENT_BOUND,
    HESSIAN_LIPSCHITZ,
    CertificationError,
    CertifiedHead,
    RemovalCertificate,
    data_dependent_residual_bound,
    newton_step_residual_bound,
    noise_multiplier,
    noise_scale,
    removal_budget,
    remove_certified,
    retrain_certified_head,
    train_certified_head,
    worst_case_residual_bound,
)
from jaxunlearn.unlearn._deletion_rate_report import (
    DELETION_RATE_JSON,
    DELETION_RATE_PLOT,
    ORDER_SELECTIONS,
    DeletionRateRow,
    DeletionRateStudy,
    deletion_rate_study,
    read_prior,
    select_orders,
    write_deletion_rate_report,
)
from jaxunlearn.unlearn._deletion_simulator import (
    DeletionSimulation,
    expected_deletions,
    expected_sisa_deletions,
    simulate_deletions,
    simulate_sisa_deletions,
)
from jaxunlearn.unlearn._digests import examples_digest, file_sha256, tree_digest
from jaxunlearn.unlearn._ensemble import (
    ENSEMBLE_FILE,
    Ensemble,
    EnsembleError,
    OpenEnsemble,
    ShardModel,
    StageCheckpoint,
    is_ensemble,
    open_ensemble,
    read_ensemble,
)
from jaxunlearn.unlearn._ensemble_model import EnsembleLM, MemberLoRA
from jaxunlearn.unlearn._layer_groups import group_filter, layer_groups, layer_index
from jaxunlearn.unlearn._ledger import ConflictingRequestError, Ledger, LedgerError, Record
from jaxunlearn.unlearn._lineage import (
    ARTIFACTS,
    PEFT_PROVENANCE_FILE,
    ArtifactMismatchError,
    Provenance,
    adapter_digest,
)
from jaxunlearn.unlearn._lineage_checks import save_root_adapter
from jaxunlearn.unlearn._llmeraser import LLMEraser
from jaxunlearn.unlearn._llmeraser_preparation import EraserPreparation
from jaxunlearn.unlearn._llmeraser_settings import (
    MODES,
    CGConfig,
    CurvatureSettings,
    EraserSettings,
    LissaConfig,
    LowRankConfig,
    SGDConfig,
)
from jaxunlearn.unlearn._llmeraser_solvers import SOLVERS
from jaxunlearn.unlearn._method import (
    Method,
    MethodOutcome,
    PreparationMismatchError,
    Prepared,
    UnknownMethodError,
    UnlearningContext,
    get_method,
    method_names,
    register,
    unregister,
)
from jaxunlearn.unlearn._module_removal import (
    RESTORE_MODES,
    ModuleRemoval,
    ModuleRemovalSettings,
    ModuleScores,
    module_scores,
    reset_modules,
    select_modules,
)
from jaxunlearn.unlearn._open_context import open_context
from jaxunlearn.unlearn._protocol import (
    DEFAULT_LEDGER_NAME,
    LineageError,
    NoEffectError,
    ObjectiveWorsenedError,
    RequestOutcome,
    Sources,
    apply_request,
    register_adapter,
    request_key,
)
from jaxunlearn.unlearn._request_files import read_edits, read_removal
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
from jaxunlearn.unlearn._sharded_requests import S3T, SISA, S3TSettings, ShardedMethod, SISASettings
from jaxunlearn.unlearn._sharded_training import (
    StageRecipe,
    TrainedEnsemble,
    partition_examples,
    retrain_stages,
    train_ensemble,
)
from jaxunlearn.unlearn._slice_orders import cyclic_orders, prior_aware_orders
from jaxunlearn.unlearn._stale import StaleCopy, purge, stale_copies

# The built-in methods: one entry each.
register(LLMEraser.name, LLMEraser)
register(S3T.name, S3T)
register(SISA.name, SISA)
register(ModuleRemoval.name, ModuleRemoval)

__all__ = [
    "ADAPTER_FORMATS",
    "ARTIFACTS",
    "DEFAULT_LEDGER_NAME",
    "DELETION_RATE_JSON",
    "DELETION_RATE_PLOT",
    "ENSEMBLE_FILE",
    "GRADIENT_BOUND",
    "HESSIAN_LIPSCHITZ",
    "MODES",
    "ORDER_SELECTIONS",
    "PEFT_PROVENANCE_FILE",
    "RESTORE_MODES",
    "S3T",
    "SISA",
    "SOLVERS",
    "ArtifactMismatchError",
    "CGConfig",
    "CertificationError",
    "CertifiedHead",
    "ConflictingRequestError",
    "CurvatureSettings",
    "DeletionRateRow",
    "DeletionRateStudy",
    "DeletionSimulation",
    "Ensemble",
    "EnsembleError",
    "EnsembleLM",
    "EraserPreparation",
    "EraserSettings",
    "LLMEraser",
    "Ledger",
    "LedgerError",
    "LineageError",
    "LissaConfig",
    "LowRankConfig",
    "MemberLoRA",
    "Method",
    "MethodOutcome",
    "ModuleRemoval",
    "ModuleRemovalSettings",
    "ModuleScores",
    "NoEffectError",
    "ObjectiveWorsenedError",
    "OpenEnsemble",
    "PreparationMismatchError",
    "Prepared",
    "Provenance",
    "QueryEdit",
    "Record",
    "Removal",
    "RemovalCertificate",
    "Request",
    "RequestError",
    "RequestOutcome",
    "ResolvedRequest",
    "ResponseEdit",
    "S3TSettings",
    "SGDConfig",
    "SISASettings",
    "ShardModel",
    "ShardedMethod",
    "Sources",
    "StageCheckpoint",
    "StageRecipe",
    "StaleCopy",
    "TrainedEnsemble",
    "UnknownExampleError",
    "UnknownMethodError",
    "UnlearningContext",
    "WholeDatasetError",
    "adapter_digest",
    "adapter_format",
    "apply_request",
    "cyclic_orders",
    "data_dependent_residual_bound",
    "deletion_rate_study",
    "examples_digest",
    "expected_deletions",
    "expected_sisa_deletions",
    "file_sha256",
    "get_method",
    "group_filter",
    "id_hash",
    "is_ensemble",
    "layer_groups",
    "layer_index",
    "method_names",
    "module_scores",
    "newton_step_residual_bound",
    "noise_multiplier",
    "noise_scale",
    "open_adapter",
    "open_context",
    "open_ensemble",
    "partition_examples",
    "prior_aware_orders",
    "purge",
    "read_edits",
    "read_ensemble",
    "read_prior",
    "read_removal",
    "register",
    "register_adapter",
    "removal_budget",
    "remove_certified",
    "request_key",
    "reset_modules",
    "resolve_request",
    "retrain",
    "retrain_certified_head",
    "retrain_config",
    "retrain_stages",
    "save_adapter_files",
    "save_root_adapter",
    "select_modules",
    "select_orders",
    "simulate_deletions",
    "simulate_sisa_deletions",
    "stale_copies",
    "train_certified_head",
    "train_ensemble",
    "tree_digest",
    "unregister",
    "worst_case_residual_bound",
    "write_deletion_rate_report",
]
