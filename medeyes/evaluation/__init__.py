"""Benchmark evaluation (``medeyes eval``): run an agent on datasets, score it the way the rewards do."""

from medeyes.evaluation.run import EvalConfig, EvalReport, evaluate, evaluate_source
from medeyes.evaluation.scores import PAPER_RESULTS, DatasetScores, bootstrap_ci, score_records

__all__ = [
    "PAPER_RESULTS",
    "DatasetScores",
    "EvalConfig",
    "EvalReport",
    "bootstrap_ci",
    "evaluate",
    "evaluate_source",
    "score_records",
]
