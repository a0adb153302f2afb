"""Gather rows from every rank, with gradients, so that a loss sees the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every rank, rank 0's first, as one tensor; gradients flow back to each rank's own rows.

    Ranks may hold different row counts (a short last batch, a different number of hard negatives): the
    counts are exchanged first and each rank pads to the largest, since all_gather needs equal shapes.
    Outside torch.distributed (or with one rank) it returns `rows` unchanged.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
    sizes = [int(count) for count in counts]
    padded = torch.cat([rows, rows.new_zeros(max(sizes) - len(rows), *rows.shape[1:])])
    gathered = dist_nn.all_gather(padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)])
