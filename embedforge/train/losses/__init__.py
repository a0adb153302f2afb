"""The training objectives (`--loss`); each takes (vectors, rel, weight) and returns a scalar.

`vectors` are L2-normalised: the batch's B queries, then their B documents, then any hard negatives
(extra documents: none unless an in-batch loss is on). rel and weight are the pairs' [B] labels.

- weighted-mse (weighted_mse.py): cosine fitted to rel. Calibrated scores, best Spearman; on its own it
  can cost ranking, since it never compares one query's documents with another's.
- in-batch (in_batch.py): InfoNCE over the other documents of the batch. Ranking; scores not calibrated.
- weighted-mse+in-batch (combined.py): the sum, in-batch scaled by --in-batch-weight.
Any of them with --matryoshka-dims (matryoshka.py): summed over the listed vector prefixes.
"""

from __future__ import annotations

from torch import nn

from embedforge.train.config import TrainConfig
from embedforge.train.losses.combined import SumLoss
from embedforge.train.losses.in_batch import InBatchLoss
from embedforge.train.losses.matryoshka import MatryoshkaLoss, truncate
from embedforge.train.losses.weighted_mse import WeightedMSELoss, weighted_mse

LOSSES = ("weighted-mse", "in-batch", "weighted-mse+in-batch")

__all__ = ["LOSSES", "InBatchLoss", "MatryoshkaLoss", "SumLoss", "WeightedMSELoss", "build_loss", "loss_for",
           "truncate", "uses_in_batch", "weighted_mse"]


def uses_in_batch(loss: str) -> bool:
    """True when `loss` compares a query with the other documents of its batch (duplicates must go)."""
    return "in-batch" in loss


def build_loss(loss: str, scale: float = TrainConfig.scale, positive_threshold: float = TrainConfig.positive_threshold,
               symmetric: bool = TrainConfig.symmetric, in_batch_weight: float = TrainConfig.in_batch_weight,
               matryoshka_dims: tuple[int, ...] | None = None,
               gather_across_ranks: bool = TrainConfig.gather_across_ranks,
               rel_power: float = TrainConfig.rel_power,
               false_negative_margin: float | None = TrainConfig.false_negative_margin) -> nn.Module:
    """The loss module named by `loss` (one of LOSSES), wrapped for Matryoshka training if dims are given; the
    defaults are TrainConfig's."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    in_batch = InBatchLoss(scale, positive_threshold, symmetric, gather_across_ranks, rel_power, false_negative_margin)
    module = {"weighted-mse": WeightedMSELoss(), "in-batch": in_batch,
              "weighted-mse+in-batch": SumLoss(WeightedMSELoss(), in_batch, in_batch_weight)}[loss]
    return MatryoshkaLoss(module, matryoshka_dims) if matryoshka_dims else module


def loss_for(config: TrainConfig, gather_across_ranks: bool | None = None) -> nn.Module:
    """The loss a training run's `config` chooses (--loss and its options). gather_across_ranks: None follows
    the config; False for a loss computed on one rank alone (validation)."""
    gather = config.gather_across_ranks if gather_across_ranks is None else gather_across_ranks
    return build_loss(config.loss, config.scale, config.positive_threshold, config.symmetric, config.in_batch_weight,
                      config.matryoshka_dims, gather, config.rel_power,
                      config.false_negative_margin)
