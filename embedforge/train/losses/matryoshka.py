"""`--matryoshka-dims`: train every listed prefix of the vector as an embedding of its own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def truncate(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` components of each row, L2-normalised again."""
    return F.normalize(vectors[..., :dim], p=2, dim=-1)


class MatryoshkaLoss(nn.Module):
    """loss = sum_{m in dims} inner(truncate(vectors, m)): a loss on each prefix, each renormalised.

    The sizes are summed unweighted (as in Kusupati et al., Matryoshka Representation Learning, 2022), so
    the full size keeps its whole gradient and each smaller prefix adds its own.
    """

    def __init__(self, inner: nn.Module, dims: Sequence[int]) -> None:
        super().__init__()
        self.inner, self.dims = inner, tuple(dims)

    def forward(self, vectors: torch.Tensor, rel: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return sum(self.inner(truncate(vectors, dim), rel, weight) for dim in self.dims)
