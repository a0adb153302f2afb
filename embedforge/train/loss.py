"""The training objective."""

from __future__ import annotations

import torch
from torch import nn


class WeightedMSELoss(nn.Module):
    """Weighted mean squared error between cosine similarity and graded relevance.

        loss = sum_i w_i * (cos_i - rel_i)^2 / sum_i w_i

    where cos_i = cosine(query_i, document_i) (the dot product of L2-normalised vectors), rel_i in
    [0, 1] and w_i >= 0. A batch whose weights are all zero contributes a loss of 0. Example::

        loss_fn = WeightedMSELoss()
        loss = loss_fn(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0]))
        # (1 * 0.01 + 3 * 0.01) / 4 = 0.01
    """

    def forward(self, cosine: torch.Tensor, rel: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        cosine, rel = cosine.float(), rel.float()
        if weight is None:
            weight = torch.ones_like(rel)
        weight = weight.float()
        return (weight * (cosine - rel) ** 2).sum() / weight.sum().clamp(min=torch.finfo(torch.float32).tiny)
