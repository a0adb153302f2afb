"""`--loss weighted-mse` (the default): fit cosine similarity to graded relevance."""

from __future__ import annotations

import torch
from torch import nn


def weighted_mse(cosine: torch.Tensor, rel: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean squared error between cosine similarity and graded relevance.

        loss = sum_i w_i * (cos_i - rel_i)^2 / sum_i w_i

    where cos_i = cosine(query_i, document_i) (the dot product of L2-normalised vectors), rel_i in
    [0, 1] and w_i >= 0. A batch whose weights are all zero contributes a loss of 0. Example::

        weighted_mse(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0]))
        # (1 * 0.01 + 3 * 0.01) / 4 = 0.01
    """
    cosine, rel = cosine.float(), rel.float()
    weight = torch.ones_like(rel) if weight is None else weight.float()
    return (weight * (cosine - rel) ** 2).sum() / weight.sum().clamp(min=torch.finfo(torch.float32).tiny)


class WeightedMSELoss(nn.Module):
    """`weighted_mse` on a training batch: `vectors` holds B queries, then their B documents (L2-normalised),
    then any hard negatives, which this loss does not use."""

    def forward(self, vectors: torch.Tensor, rel: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        batch = len(rel)
        cosine = (vectors[:batch] * vectors[batch:2 * batch]).sum(dim=-1)
        return weighted_mse(cosine, rel, weight)
