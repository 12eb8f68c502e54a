"""Evaluation: how much a model still reveals about data, and how close it is to a retrain."""

from jaxunlearn.eval._cost import compiled_flops
from jaxunlearn.eval._divergence import next_token_kl
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
from jaxunlearn.eval._plots import plot_forget_losses, plot_score_histograms
from jaxunlearn.eval._scores import ExampleScores, min_k_mean, score_examples
from jaxunlearn.eval._tables import markdown_table
from jaxunlearn.eval._timing import Timed, timed

__all__ = [
    "ATTACKS",
    "ExampleScores",
    "ExtractionAttempt",
    "MIAResult",
    "Timed",
    "attack_scores",
    "compiled_flops",
    "distance_to_retrain",
    "extraction_recall",
    "forget_gap_closed",
    "markdown_table",
    "membership_inference",
    "mia_auc",
    "min_k_mean",
    "next_token_kl",
    "perplexity",
    "pii_extraction",
    "plot_forget_losses",
    "plot_score_histograms",
    "score_examples",
    "timed",
    "tpr_at_fpr",
]
