"""Metrics; for now the `shapes` attribute analyzer and its scores."""

from cclddg.evaluation.shapes_eval import Analysis, analyze, score

__all__ = ["Analysis", "analyze", "score"]
