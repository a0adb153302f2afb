"""Evaluation: ranking and correlation metrics (pure numpy) and the runner that scores models on pair files.

``evaluate_pairs(pairs, embed_fn)`` works with any ``texts -> vectors`` function, so the trainer reuses it
with its in-memory model for validation NDCG@10.
"""

from embedforge.evaluate.metrics import pearson, query_metrics, ranking_metrics, spearman
from embedforge.evaluate.runner import evaluate_pairs

__all__ = ["evaluate_pairs", "pearson", "query_metrics", "ranking_metrics", "spearman"]
