"""`--loss weighted-mse+in-batch`: calibrated scores and ranking together."""

from __future__ import annotations

import torch
from torch import nn


class SumLoss(nn.Module):
    """loss = first + weight * second (both take the same batch)."""

    def __init__(self, first: nn.Module, second: nn.Module, weight: float) -> None:
        super().__init__()
        self.first, self.second, self.weight = first, second, weight

    def forward(self, vectors: torch.Tensor, rel: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.first(vectors, rel, weight) + self.weight * self.second(vectors, rel, weight)
