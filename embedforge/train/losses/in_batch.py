"""`--loss in-batch`: contrastive loss with in-batch negatives (InfoNCE, "multiple negatives ranking")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedforge.train.config import TrainConfig
from embedforge.train.losses.gather import gather_rows


class InBatchLoss(nn.Module):
    """Each positive pair's document must out-score every other document of the batch for its query.

    Pairs with rel_i >= positive_threshold are the anchors A, each weighing w_i = weight_i * rel_i^p
    (p = rel_power; 0: every anchor alike, 2: a barely related pair pulls little). With q, d the
    L2-normalised query and document vectors of the batch and n the hard negatives appended to it
    (documents of the same query with a low rel, train/batching.py), the documents
    D = [d_1..d_B, n_1..n_H] and s the scale:

        forward_i  = -log( exp(s cos(q_i, d_i)) / sum_{j in D} exp(s cos(q_i, D_j)) )
        backward_i = -log( exp(s cos(d_i, q_i)) / sum_{k <= B}  exp(s cos(d_i, q_k)) )   (symmetric only)
        loss = sum_{i in A} w_i * forward_i / sum_{i in A} w_i                         (not symmetric)
        loss = sum_{i in A} w_i * (forward_i + backward_i) / 2 / sum_{i in A} w_i      (symmetric)

    False negatives (false_negative_margin = m, off when None): another pair's document that the model itself
    already scores close to the query's positive is probably related, not a negative, so it leaves the sum:

        D_j drops out of forward_i   when  j <= B, j != i  and  cos(q_i, D_j) > cos(q_i, d_i) - m
        q_k drops out of backward_i  when  k != i          and  cos(d_i, q_k) > cos(d_i, q_i) - m

    The guide is the model being trained, its cosines taken without gradient (GISTEmbed's rule with the
    model as its own guide: no second model to run, and at step 0 it is the base model). Hard negatives
    (n_j, labelled below --negative-threshold) are never dropped: their labels say they are negatives.

    A batch without anchors (or whose anchors all weigh 0) contributes 0. The batch must not hold the
    same text twice, or a copy of a positive counts as a negative (the duplicate-free batches see to it).
    With gather_across_ranks the rows of every rank join before the loss: each query sees the global
    batch as negatives, and every rank computes the same loss.
    """

    def __init__(self, scale: float = TrainConfig.scale, positive_threshold: float = TrainConfig.positive_threshold,
                 symmetric: bool = TrainConfig.symmetric, gather_across_ranks: bool = TrainConfig.gather_across_ranks,
                 rel_power: float = TrainConfig.rel_power,
                 false_negative_margin: float | None = TrainConfig.false_negative_margin) -> None:
        super().__init__()
        self.scale, self.positive_threshold, self.rel_power = scale, positive_threshold, rel_power
        self.false_negative_margin = false_negative_margin
        self.symmetric, self.gather_across_ranks = symmetric, gather_across_ranks

    def forward(self, vectors: torch.Tensor, rel: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        batch = len(rel)
        queries, documents, negatives = vectors[:batch], vectors[batch:2 * batch], vectors[2 * batch:]
        if self.gather_across_ranks:
            queries, documents, negatives = gather_rows(queries), gather_rows(documents), gather_rows(negatives)
            rel, weight = gather_rows(rel), gather_rows(weight)
        anchors = (rel >= self.positive_threshold).nonzero().squeeze(1)
        weight = weight.float()[anchors]
        if self.rel_power:
            weight = weight * rel.float()[anchors] ** self.rel_power
        queries, candidates = queries.float(), torch.cat([documents, negatives]).float()
        cosines = queries[anchors] @ candidates.T
        losses = F.cross_entropy(self.scale * self._without_false_negatives(cosines, anchors, len(documents)),
                                 anchors, reduction="none")
        if self.symmetric:
            reverse = documents.float()[anchors] @ queries.T
            reverse = self._without_false_negatives(reverse, anchors, len(queries))
            losses = (losses + F.cross_entropy(self.scale * reverse, anchors, reduction="none")) / 2
        return (weight * losses).sum() / weight.sum().clamp(min=torch.finfo(torch.float32).tiny)

    def _without_false_negatives(self, cosines: torch.Tensor, anchors: torch.Tensor, in_batch: int) -> torch.Tensor:
        """`cosines` [A, C] (row a: anchor a against every candidate; its positive in column anchors[a]) with the
        probable false negatives among the first `in_batch` columns set to -inf (see the class docstring)."""
        if self.false_negative_margin is None:
            return cosines
        rows = torch.arange(len(anchors), device=cosines.device)
        guide = cosines.detach()
        threshold = guide[rows, anchors] - self.false_negative_margin
        drop = guide > threshold.unsqueeze(1)
        drop[:, in_batch:] = False  # labelled hard negatives stay
        drop[rows, anchors] = False  # the positive stays
        return cosines.masked_fill(drop, float("-inf"))
