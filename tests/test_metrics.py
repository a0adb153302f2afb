"""Metrics against trusted references (sklearn, scipy) and hand-computed cases."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import ndcg_score

from embedforge.evaluate.metrics import pearson, query_metrics, ranking_metrics, spearman


def _random_queries(rng: np.random.Generator, n_queries: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Graded rels in [0, 1] (many zeros) and scores rounded to few levels so that ties are common."""
    queries = []
    for _ in range(n_queries):
        n = int(rng.integers(2, 30))
        rels = np.round(rng.random(n) * rng.integers(0, 2, n), 2)
        scores = np.round(rng.normal(size=n), 1)
        queries.append((scores, rels))
    return queries


@pytest.mark.parametrize("k", [1, 3, 5, 10, 50])
def test_ndcg_matches_sklearn_with_ties(k):
    rng = np.random.default_rng(k)
    queries = _random_queries(rng, 300)
    assert sum(len(np.unique(s)) < len(s) for s, _ in queries) > 100  # ties are really exercised
    expected = []
    for scores, rels in queries:
        graded, _ = query_metrics(scores, rels, ks=[k])
        reference = ndcg_score(rels[None, :], scores[None, :], k=k, ignore_ties=False)
        if rels.max() > 0:
            assert graded[f"ndcg@{k}"] == pytest.approx(reference, abs=1e-12)
            expected.append(reference)
        else:
            assert graded == {}
    result = ranking_metrics(queries, ks=[k])
    assert result[f"ndcg@{k}"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert result["queries"] == 300
    assert result["queries_graded"] == len(expected) < 300


def test_ndcg_tie_averaging_by_hand():
    # Two documents tied at the top, gains 1 and 0: DCG@1 = mean gain 0.5 * discount 1; IDCG@1 = 1.
    graded, _ = query_metrics(np.array([0.9, 0.9, 0.1]), np.array([1.0, 0.0, 0.5]), ks=[1, 2, 3])
    assert graded["ndcg@1"] == pytest.approx(0.5)
    idcg2 = 1 + 0.5 / math.log2(3)
    assert graded["ndcg@2"] == pytest.approx((0.5 + 0.5 / math.log2(3)) / idcg2)
    idcg3 = idcg2 + 0 / 2
    assert graded["ndcg@3"] == pytest.approx((0.5 + 0.5 / math.log2(3) + 0.5 / 2) / idcg3)


def test_binary_metrics_by_hand():
    # Ranked by score: d0 (rel 0.2), d1 (0.8), d2 (0.0), d3 (0.5), d4 (1.0). Relevant at 0.5: ranks 2, 4, 5.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    rels = np.array([0.2, 0.8, 0.0, 0.5, 1.0])
    order = np.random.default_rng(0).permutation(5)  # input order must not matter
    _, binary = query_metrics(scores[order], rels[order], ks=[1, 3, 5, 10])
    assert binary["mrr@1"] == 0.0
    assert binary["mrr@3"] == pytest.approx(1 / 2)
    assert binary["recall@1"] == 0.0
    assert binary["recall@3"] == pytest.approx(1 / 3)
    assert binary["recall@5"] == pytest.approx(1.0)
    assert binary["map@1"] == 0.0
    assert binary["map@3"] == pytest.approx((1 / 2) / 3)  # P@2 only, over min(R=3, k=3)
    ap5 = (1 / 2 + 2 / 4 + 3 / 5) / 3
    assert binary["map@5"] == pytest.approx(ap5)
    assert binary["map@10"] == pytest.approx(ap5)  # k beyond the list: whole list, min(R, k) = R
    assert binary["mrr@10"] == pytest.approx(1 / 2)


def test_rel_threshold_changes_binary_relevance():
    scores = np.array([0.9, 0.8, 0.7])
    rels = np.array([0.4, 0.6, 0.0])
    _, at_half = query_metrics(scores, rels, ks=[1], rel_threshold=0.5)
    _, at_low = query_metrics(scores, rels, ks=[1], rel_threshold=0.3)
    assert at_half["mrr@1"] == 0.0
    assert at_low["mrr@1"] == 1.0
    _, none = query_metrics(scores, rels, ks=[1], rel_threshold=0.9)
    assert none == {}


def test_ranking_metrics_means_skip_queries_with_nothing_relevant():
    queries = [
        (np.array([0.9, 0.1]), np.array([1.0, 0.0])),  # perfect
        (np.array([0.1, 0.9]), np.array([1.0, 0.0])),  # relevant at rank 2
        (np.array([0.5, 0.4]), np.array([0.0, 0.0])),  # nothing to find: left out
        (np.array([0.5, 0.4]), np.array([0.3, 0.0])),  # graded only
    ]
    result = ranking_metrics(queries, ks=[1])
    assert result["queries"] == 4
    assert result["queries_graded"] == 3
    assert result["queries_binary"] == 2
    assert result["mrr@1"] == pytest.approx(0.5)
    assert result["recall@1"] == pytest.approx(0.5)
    assert result["ndcg@1"] == pytest.approx((1 + 0 + 1) / 3)


def test_ranking_metrics_without_queries_is_nan():
    result = ranking_metrics([], ks=[10])
    assert math.isnan(result["ndcg@10"]) and math.isnan(result["mrr@10"])
    assert result["queries"] == 0


@pytest.mark.parametrize(
    "scores, rels, message",
    [
        (np.array([0.1, 0.2]), np.array([1.0]), "one length"),
        (np.array([0.1, np.nan]), np.array([1.0, 0.0]), "finite"),
        (np.array([0.1, 0.2]), np.array([1.0, -0.5]), ">= 0"),
    ],
)
def test_bad_query_input_is_rejected(scores, rels, message):
    with pytest.raises(ValueError, match=message):
        query_metrics(scores, rels)


def test_bad_k_is_rejected():
    with pytest.raises(ValueError, match="k values"):
        query_metrics(np.array([0.1, 0.2]), np.array([1.0, 0.0]), ks=[0, 5])


def test_spearman_and_pearson_match_scipy_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(3, 200))
        x = np.round(rng.normal(size=n), 1)  # ties
        y = np.round(x + rng.normal(size=n), 0)  # heavy ties
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_correlation_edge_cases():
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([30.0, 20.0, 10.0])) == pytest.approx(-1.0)
    assert math.isnan(pearson(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError):
        spearman(np.array([1.0]), np.array([1.0]))
