"""Evaluation: how much a model still reveals about data, and how close it is to a retrain.

Per example (`score_examples`, the membership attacks, PII extraction) and per model: the
empirical ε audit (`epsilon_lower_bound`) takes one distinguisher score per trained model
(`model_statistic`: the forget set's mean attack score), unlearned against retrained over
seeds, and bounds how far apart the two distributions of models are at a stated confidence.
"""

from jaxunlearn.eval._audit_statistics import (
    AUDIT_STATISTICS,
    adapter_statistics,
    model_statistic,
    read_audit_scores,
)
from jaxunlearn.eval._cost import compiled_flops
from jaxunlearn.eval._divergence import next_token_kl
from jaxunlearn.eval._epsilon_audit import (
    AUDIT_DIRECTIONS,
    AuditError,
    EpsilonAudit,
    choose_threshold,
    clopper_pearson_upper,
    epsilon_lower_bound,
    write_audit_report,
)
from jaxunlearn.eval._fidelity import distance_to_retrain, forget_gap_closed, perplexity
from jaxunlearn.eval._mia import (
    ATTACKS,
    MIAResult,
    attack_scores,
    membership_inference,
    mia_auc,
    tpr_at_fpr,
)
from jaxunlearn.eval._pii import ExtractionAttempt, extraction_recall, pii_extraction
from jaxunlearn.eval._plots import plot_forget_losses, plot_module_scores, plot_score_histograms
from jaxunlearn.eval._scores import ExampleScores, min_k_mean, score_examples
from jaxunlearn.eval._tables import markdown_table
from jaxunlearn.eval._timing import Timed, timed

__all__ = [
    "ATTACKS",
    "AUDIT_DIRECTIONS",
    "AUDIT_STATISTICS",
    "AuditError",
    "EpsilonAudit",
    "ExampleScores",
    "ExtractionAttempt",
    "MIAResult",
    "Timed",
    "adapter_statistics",
    "attack_scores",
    "choose_threshold",
    "clopper_pearson_upper",
    "compiled_flops",
    "distance_to_retrain",
    "epsilon_lower_bound",
    "extraction_recall",
    "forget_gap_closed",
    "markdown_table",
    "membership_inference",
    "mia_auc",
    "min_k_mean",
    "model_statistic",
    "next_token_kl",
    "perplexity",
    "pii_extraction",
    "plot_forget_losses",
    "plot_module_scores",
    "plot_score_histograms",
    "read_audit_scores",
    "score_examples",
    "timed",
    "tpr_at_fpr",
    "write_audit_report",
]
