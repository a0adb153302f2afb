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

    A batch without anchors (or whose anchors all weigh 0) contributes 0. The batch must not hold the
    same text twice, or a copy of a positive counts as a negative (the duplicate-free batches see to it).
    With gather_across_ranks the rows of every rank join before the loss: each query sees the global
    batch as negatives, and every rank computes the same loss.
    """

    def __init__(self, scale: float = TrainConfig.scale, positive_threshold: float = TrainConfig.positive_threshold,
                 symmetric: bool = TrainConfig.symmetric, gather_across_ranks: bool = TrainConfig.gather_across_ranks,
                 rel_power: float = TrainConfig.rel_power) -> None:
        super().__init__()
        self.scale, self.positive_threshold, self.rel_power = scale, positive_threshold, rel_power
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
        logits = self.scale * queries[anchors] @ candidates.T
        losses = F.cross_entropy(logits, anchors, reduction="none")
        if self.symmetric:
            reverse = self.scale * documents.float()[anchors] @ queries.T
            losses = (losses + F.cross_entropy(reverse, anchors, reduction="none")) / 2
        return (weight * losses).sum() / weight.sum().clamp(min=torch.finfo(torch.float32).tiny)
