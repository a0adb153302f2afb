"""--gather-across-ranks: two gloo processes give the loss of one process on the joined batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from embedforge.train.losses import InBatchLoss

SCRIPT = """
import os, sys, torch, torch.distributed as dist, torch.nn.functional as F
from embedforge.train.losses import InBatchLoss
dist.init_process_group("gloo")
rank = dist.get_rank()
data = torch.load(sys.argv[1])
rows = data["rows"][rank].clone().requires_grad_(True)
loss = InBatchLoss(scale=5.0, symmetric=True, gather_across_ranks=True)(F.normalize(rows, dim=-1), data["rel"][rank],
                                                                         data["weight"][rank])
loss.backward()
torch.save({"loss": loss.detach(), "grad": rows.grad}, f"{sys.argv[2]}/rank{rank}.pt")
dist.destroy_process_group()
"""


def make_rank(generator: torch.Generator, pairs: int, negatives: int) -> tuple[torch.Tensor, ...]:
    rows = torch.randn(2 * pairs + negatives, 8, generator=generator)
    rel = torch.tensor([1.0, 0.3, 0.9][:pairs])
    return rows, rel, torch.rand(pairs, generator=generator) + 0.5


def test_gathered_loss_and_gradients_equal_one_process_on_the_joined_batch(tmp_path):
    generator = torch.Generator().manual_seed(0)
    ranks = [make_rank(generator, 3, 1), make_rank(generator, 2, 2)]  # unequal pairs and hard negatives
    torch.save({"rows": [r[0] for r in ranks], "rel": [r[1] for r in ranks], "weight": [r[2] for r in ranks]},
               tmp_path / "data.pt")
    (tmp_path / "gather.py").write_text(SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(port), str(tmp_path / "gather.py"),
                          str(tmp_path / "data.pt"), str(tmp_path)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]

    # one process: queries of both ranks, then their documents, then all hard negatives
    parts = [(rows[:len(rel)], rows[len(rel):2 * len(rel)], rows[2 * len(rel):]) for rows, rel, _ in ranks]
    joined = torch.cat([torch.cat(side) for side in zip(*parts, strict=True)]).requires_grad_(True)
    loss = InBatchLoss(scale=5.0, symmetric=True)(F.normalize(joined, dim=-1), torch.cat([r[1] for r in ranks]),
                                                   torch.cat([r[2] for r in ranks]))
    loss.backward()
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for result in results:
        assert result["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    # each rank's rows get the gradient of the global loss (summed over the ranks computing it: x2), which
    # DistributedDataParallel's averaging over 2 ranks then brings back to the one-process gradient
    sizes = [(len(r[1]), len(r[0]) - 2 * len(r[1])) for r in ranks]
    grad = joined.grad
    b0, b1 = sizes[0][0], sizes[1][0]
    total = b0 + b1
    expected = [torch.cat([grad[:b0], grad[total:total + b0], grad[2 * total:2 * total + sizes[0][1]]]),
                torch.cat([grad[b0:total], grad[total + b0:2 * total], grad[2 * total + sizes[0][1]:]])]
    for result, want in zip(results, expected, strict=True):
        torch.testing.assert_close(result["grad"], 2 * want, rtol=1e-4, atol=1e-6)
