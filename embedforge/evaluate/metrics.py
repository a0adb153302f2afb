"""Ranking and correlation metrics, pure numpy.

Conventions shared by every function here:

- A query is one pair of arrays ``(scores, rels)``: the model's score for each candidate document
  and its graded relevance (``rel >= 0``, e.g. STS score / 5). Higher score = ranked earlier.
- Ranks are 1-based: the top document has rank 1.
- Graded metrics (NDCG) use the relevance as is (linear gain). Binary metrics (MRR, MAP, Recall) count a
  document as relevant when ``rel >= rel_threshold`` (default 0.5).
- Ties in the scores: NDCG averages over every order of the tied documents, exactly like
  ``sklearn.metrics.ndcg_score(ignore_ties=False)``. Binary metrics keep tied documents in input order.
- A query with nothing to find (no ``rel > 0`` for NDCG, no ``rel >= rel_threshold`` for the binary
  metrics) has an undefined score and is left out of that mean, as sentence-transformers'
  InformationRetrievalEvaluator does. sklearn's ``ndcg_score`` and trec_eval count such a query as 0
  instead; the counts returned by :func:`ranking_metrics` let you convert
  (``mean_with_zeros = mean * queries / (queries + skipped)``).
- All values are fractions in [0, 1] (correlations in [-1, 1]); reports multiply by 100.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10)
DEFAULT_REL_THRESHOLD = 0.5


def _check_query(scores: np.ndarray, rels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    rels = np.asarray(rels, dtype=np.float64)
    if scores.ndim != 1 or scores.shape != rels.shape:
        raise ValueError(f"scores and rels must be 1-D arrays of one length, got {scores.shape} and {rels.shape}")
    if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(rels))):
        raise ValueError("scores and rels must be finite numbers")
    if np.any(rels < 0):
        raise ValueError("relevance must be >= 0")
    return scores, rels


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be >= 1, got {ks}")
    return ks


def _tie_averaged_gains(sorted_scores: np.ndarray, sorted_rels: np.ndarray) -> np.ndarray:
    """Replace each gain by the mean gain of its group of equal scores (input sorted by score)."""
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    sizes = np.diff(np.r_[starts, len(sorted_scores)])
    group_means = np.add.reduceat(sorted_rels, starts) / sizes
    return np.repeat(group_means, sizes)


def query_metrics(
    scores: np.ndarray,
    rels: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    rel_threshold: float = DEFAULT_REL_THRESHOLD,
) -> tuple[dict[str, float], dict[str, float]]:
    """NDCG@k, MRR@k, MAP@k and Recall@k of one query, for every k in ``ks``.

    With documents sorted by descending score, ``d_i = 1 / log2(i + 1)`` the discount at rank i,
    ``g_i`` the relevance at rank i and ``b_i = [g_i >= rel_threshold]``, ``R = sum_i b_i``:

    - ``DCG@k  = sum_{i<=k} g~_i * d_i`` where ``g~_i`` is the mean relevance of the documents whose
      score equals the score at rank i (tie averaging, as sklearn's ``ndcg_score``);
      ``IDCG@k = sum_{i<=k} g*_i * d_i`` with ``g*`` the relevances sorted descending;
      ``NDCG@k = DCG@k / IDCG@k``.
    - ``MRR@k  = 1 / r`` for r the rank of the first relevant document if ``r <= k``, else 0.
    - ``MAP@k  = (1 / min(R, k)) * sum_{i<=k} b_i * P@i`` with ``P@i = (1/i) * sum_{j<=i} b_j``.
    - ``Recall@k = (1 / R) * sum_{i<=k} b_i``.

    When k exceeds the number of documents, the whole list is used. Returns two dicts keyed
    ``"ndcg@k"`` and ``"mrr@k"``/``"map@k"``/``"recall@k"``; a dict is empty when the query has nothing
    to find for that family (``IDCG = 0``, or ``R = 0``).
    """
    scores, rels = _check_query(scores, rels)
    ks = _check_ks(ks)
    n = len(scores)
    if n == 0:
        return {}, {}
    order = np.argsort(-scores, kind="stable")
    sorted_rels = rels[order]
    discounts = 1.0 / np.log2(np.arange(2, n + 2))

    graded: dict[str, float] = {}
    ideal = np.cumsum(np.sort(rels)[::-1] * discounts)
    if ideal[-1] > 0:
        dcg = np.cumsum(_tie_averaged_gains(scores[order], sorted_rels) * discounts)
        for k in ks:
            last = min(k, n) - 1
            graded[f"ndcg@{k}"] = float(dcg[last] / ideal[last])

    binary: dict[str, float] = {}
    hits = (sorted_rels >= rel_threshold).astype(np.float64)
    n_relevant = hits.sum()
    if n_relevant > 0:
        hits_so_far = np.cumsum(hits)
        ranks = np.arange(1, n + 1)
        first_rank = int(np.argmax(hits)) + 1
        precision_sum = np.cumsum(hits * hits_so_far / ranks)
        for k in ks:
            last = min(k, n) - 1
            binary[f"mrr@{k}"] = 1.0 / first_rank if first_rank <= k else 0.0
            binary[f"map@{k}"] = float(precision_sum[last] / min(n_relevant, k))
            binary[f"recall@{k}"] = float(hits_so_far[last] / n_relevant)
    return graded, binary


def ranking_metrics(
    queries: Iterable[tuple[np.ndarray, np.ndarray]],
    ks: Sequence[int] = DEFAULT_KS,
    rel_threshold: float = DEFAULT_REL_THRESHOLD,
) -> dict[str, float]:
    """Mean of :func:`query_metrics` over queries given as ``(scores, rels)`` pairs (any iterable).

    Returns ``ndcg@k``, ``mrr@k``, ``map@k``, ``recall@k`` for each k, plus the counts ``queries``,
    ``queries_graded`` (NDCG averaged over these: some ``rel > 0``) and ``queries_binary`` (MRR/MAP/Recall
    averaged over these: some ``rel >= rel_threshold``). A metric with no query to average is NaN.
    """
    ks = _check_ks(ks)
    graded_sum = {f"ndcg@{k}": 0.0 for k in ks}
    binary_sum = {f"{name}@{k}": 0.0 for name in ("mrr", "map", "recall") for k in ks}
    n_queries = n_graded = n_binary = 0
    for scores, rels in queries:
        graded, binary = query_metrics(scores, rels, ks, rel_threshold)
        n_queries += 1
        if graded:
            n_graded += 1
            for key, value in graded.items():
                graded_sum[key] += value
        if binary:
            n_binary += 1
            for key, value in binary.items():
                binary_sum[key] += value
    result: dict[str, float] = {}
    for key, total in graded_sum.items():
        result[key] = total / n_graded if n_graded else float("nan")
    for key, total in binary_sum.items():
        result[key] = total / n_binary if n_binary else float("nan")
    result.update(queries=n_queries, queries_graded=n_graded, queries_binary=n_binary)
    return result


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    sizes = np.diff(np.r_[starts, len(values)])
    group_ranks = starts + (sizes + 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(group_ranks, sizes)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation ``r = sum (x-mx)(y-my) / sqrt(sum (x-mx)^2 * sum (y-my)^2)``; NaN if x or y is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError(f"need two 1-D arrays of one length >= 2, got {x.shape} and {y.shape}")
    dx = x - x.mean()
    dy = y - y.mean()
    denominator = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
    if denominator == 0:
        return float("nan")
    return float(np.clip(np.dot(dx, dy) / denominator, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation: :func:`pearson` of the :func:`average_ranks` of x and y (ties share ranks)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError(f"need two 1-D arrays of one length >= 2, got {x.shape} and {y.shape}")
    return pearson(average_ranks(x), average_ranks(y))
