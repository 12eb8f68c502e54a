"""Evaluation: how much a model still reveals about data, and how close it is to a retrain."""

from jaxunlearn.eval._pii import ExtractionAttempt, extraction_recall, pii_extraction

__all__ = ["ExtractionAttempt", "extraction_recall", "pii_extraction"]
