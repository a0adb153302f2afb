"""Batches for in-batch losses: no text twice in a batch, and hard negatives from the data.

A contrastive loss treats every other document of the batch as a negative. A text that appears twice
(the same query in two pairs, or one sentence as the query of one pair and the document of another) would
be pushed away from itself: a false negative. `duplicate_free_batches` defers such a pair to the next
batch that can take it, keeping the order otherwise.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence

import numpy as np


def duplicate_free_batches(order: Sequence[int], texts: Sequence[tuple[int, ...]], batch_size: int) -> list[np.ndarray]:
    """Cut `order` into batches of up to `batch_size` items in which no text id of `texts[item]` repeats.

    An item that would repeat a text waits, at the head of the queue, for the next batch; every batch
    takes the earliest items that fit, so only the colliding items move, and never by more than needed.
    """
    queue, batches = deque(order), []
    while queue:
        batch, seen, waiting = [], set(), []
        while queue and len(batch) < batch_size:
            item = queue.popleft()
            if seen.isdisjoint(texts[item]):
                batch.append(item)
                seen.update(texts[item])
            else:
                waiting.append(item)
        queue.extendleft(reversed(waiting))
        batches.append(np.array(batch, dtype=np.int64))
    return batches


def hard_negatives(query: Sequence[int], document: Sequence[int], rel: Sequence[float], positive_threshold: float,
                   negative_threshold: float) -> list[np.ndarray]:
    """For each pair: the documents labelled for its query with rel < negative_threshold, if the pair is a
    positive (rel >= positive_threshold); empty otherwise. Inputs are text ids and rels, one per pair."""
    negatives: dict[int, list[int]] = defaultdict(list)
    for q, d, r in zip(query, document, rel, strict=True):
        if r < negative_threshold:
            negatives[q].append(d)
    empty = np.array([], dtype=np.int64)
    return [np.array(sorted(set(negatives[q])), dtype=np.int64) if r >= positive_threshold else empty
            for q, r in zip(query, rel, strict=True)]


def pick_hard_negatives(batch: np.ndarray, candidates: Sequence[np.ndarray], taken: set[int]) -> list[int]:
    """One hard negative for each pair of `batch` that has any, drawn at random (seeded by the batch, so a
    resumed run draws the same) among those whose text is not in the batch already (`taken`)."""
    generator = np.random.default_rng(batch.tolist())
    picked = []
    for item in batch:
        free = [d for d in candidates[item] if d not in taken]
        if free:
            choice = int(free[generator.integers(len(free))])
            picked.append(choice)
            taken.add(choice)
    return picked
