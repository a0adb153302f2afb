"""Each training loss against a hand computation on a tiny batch (vectors: queries, documents, negatives)."""

import math

import pytest
import torch
import torch.nn.functional as F

from embedforge.train.config import TrainConfig
from embedforge.train.losses import (
    InBatchLoss,
    MatryoshkaLoss,
    SumLoss,
    WeightedMSELoss,
    build_loss,
    loss_for,
    weighted_mse,
)


@pytest.mark.parametrize(
    ("cosine", "rel", "weight", "expected"),
    [
        ([0.9, 0.1], [1.0, 0.0], [1.0, 3.0], (1 * 0.01 + 3 * 0.01) / 4),
        ([0.5, 0.5, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0], (0.25 + 0.25 + 0) / 3),
        ([0.2, -0.4], [0.6, 0.0], [2.0, 0.5], (2 * 0.16 + 0.5 * 0.16) / 2.5),
        ([0.3, 0.8], [0.3, 0.0], [0.0, 0.0], 0.0),
        ([0.3, 0.8], [0.5, 0.0], None, (0.04 + 0.64) / 2),
    ],
)
def test_weighted_mse_matches_hand_computed_values(cosine, rel, weight, expected):
    weight_tensor = None if weight is None else torch.tensor(weight)
    loss = weighted_mse(torch.tensor(cosine), torch.tensor(rel), weight_tensor)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_zero_weight_samples_get_no_gradient():
    cosine = torch.tensor([0.1, 0.9], requires_grad=True)
    weighted_mse(cosine, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])).backward()
    assert cosine.grad[1] == 0 and cosine.grad[0] == pytest.approx(2 * (0.1 - 1.0))


# q1 = (1, 0), q2 = (0, 1); d1 = (0.6, 0.8), d2 = (0.8, 0.6); hard negative n = (1, 0)
Q1, Q2, D1, D2, N = (1.0, 0.0), (0.0, 1.0), (0.6, 0.8), (0.8, 0.6), (1.0, 0.0)


def batch(*rows):
    return torch.tensor(rows)


def nll(logits, target):
    """-log softmax(logits)[target], by hand."""
    return -logits[target] + math.log(sum(math.exp(x) for x in logits))


def test_weighted_mse_loss_reads_the_pairs_of_a_training_batch():
    vectors = batch(Q1, Q2, D1, D2, N)  # the hard negative plays no part
    loss = WeightedMSELoss()(vectors, torch.tensor([1.0, 0.5]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx(((0.6 - 1.0) ** 2 + (0.6 - 0.5) ** 2) / 2, rel=1e-6)


def test_in_batch_loss_ranks_the_positive_above_other_documents_and_hard_negatives():
    vectors = batch(Q1, Q2, D1, D2, N)
    rel, weight = torch.tensor([1.0, 0.8]), torch.tensor([1.0, 3.0])
    loss = InBatchLoss(scale=2.0)(vectors, rel, weight)
    # q1 . [d1, d2, n] = [0.6, 0.8, 1.0]; q2 . [d1, d2, n] = [0.8, 0.6, 0.0]; scaled by 2
    first, second = nll([1.2, 1.6, 2.0], 0), nll([1.6, 1.2, 0.0], 1)
    assert loss.item() == pytest.approx((1 * first + 3 * second) / 4, rel=1e-6)


def test_in_batch_loss_uses_only_pairs_above_the_positive_threshold_as_anchors():
    vectors = batch(Q1, Q2, D1, D2)
    loss = InBatchLoss(scale=2.0, positive_threshold=0.5)(vectors, torch.tensor([1.0, 0.3]), torch.ones(2))
    assert loss.item() == pytest.approx(nll([1.2, 1.6], 0), rel=1e-6)  # d2 stays a negative for q1
    none = InBatchLoss()(vectors, torch.tensor([0.1, 0.3]), torch.ones(2))
    assert none.item() == 0.0


def test_rel_power_weighs_each_anchor_by_its_graded_relevance():
    vectors = batch(Q1, Q2, D1, D2)
    rel, weight = torch.tensor([1.0, 0.5]), torch.tensor([1.0, 2.0])
    loss = InBatchLoss(scale=2.0, positive_threshold=0.01, rel_power=2.0)(vectors, rel, weight)
    # anchor weights 1 * 1^2 and 2 * 0.5^2 = 0.5; q1 . [d1, d2] = [0.6, 0.8], q2 . [d1, d2] = [0.8, 0.6]
    first, second = nll([1.2, 1.6], 0), nll([1.6, 1.2], 1)
    assert loss.item() == pytest.approx((1.0 * first + 0.5 * second) / 1.5, rel=1e-6)
    plain = InBatchLoss(scale=2.0, positive_threshold=0.01)(vectors, rel, weight)
    assert plain.item() == pytest.approx((1.0 * first + 2.0 * second) / 3.0, rel=1e-6)


def test_a_training_config_hands_every_loss_option_to_the_loss():
    config = TrainConfig(loss="weighted-mse+in-batch", scale=5.0, positive_threshold=0.01, symmetric=True,
                         in_batch_weight=0.5, rel_power=2.0, gather_across_ranks=True)
    loss = loss_for(config)
    assert isinstance(loss, SumLoss) and loss.weight == 0.5
    in_batch = loss.second
    assert (in_batch.scale, in_batch.positive_threshold, in_batch.symmetric, in_batch.rel_power,
            in_batch.gather_across_ranks) == (5.0, 0.01, True, 2.0, True)
    assert loss_for(config, gather_across_ranks=False).second.gather_across_ranks is False  # validation: one rank


def test_symmetric_in_batch_loss_adds_the_document_to_query_direction():
    vectors = batch(Q1, Q2, D1, D2, N)
    loss = InBatchLoss(scale=2.0, symmetric=True)(vectors, torch.tensor([1.0, 0.2]), torch.ones(2))
    forward = nll([1.2, 1.6, 2.0], 0)
    backward = nll([1.2, 1.6], 0)  # d1 . [q1, q2] = [0.6, 0.8]; negatives are not queries
    assert loss.item() == pytest.approx((forward + backward) / 2, rel=1e-6)


def test_false_negative_margin_drops_other_documents_scored_near_the_positive_but_keeps_hard_negatives():
    vectors = batch(Q1, Q2, D1, D2, N)
    rel, weight = torch.tensor([1.0, 1.0]), torch.ones(2)
    loss = InBatchLoss(scale=2.0, false_negative_margin=0.0)(vectors, rel, weight)
    # q1 . [d1, d2, n] = [0.6, 0.8, 1.0]: d2 out-scores q1's positive, so it drops; n is labelled, so it stays.
    # q2 . [d1, d2, n] = [0.8, 0.6, 0.0]: d1 out-scores q2's positive and drops
    first, second = nll([1.2, 2.0], 0), nll([1.2, 0.0], 0)
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    wide = InBatchLoss(scale=2.0, false_negative_margin=0.3)(vectors, rel, weight)
    # a margin of 0.3 drops the same documents: nothing else scores above 0.6 - 0.3 but the labelled n
    assert wide.item() == pytest.approx(loss.item(), rel=1e-6)
    kept = InBatchLoss(scale=2.0)(vectors, rel, weight)
    assert kept.item() == pytest.approx((nll([1.2, 1.6, 2.0], 0) + nll([1.6, 1.2, 0.0], 1)) / 2, rel=1e-6)


def test_false_negative_margin_applies_to_the_symmetric_direction_and_passes_no_gradient_through_the_guide():
    vectors = batch(Q1, Q2, D1, D2).requires_grad_()
    loss = InBatchLoss(scale=2.0, symmetric=True, false_negative_margin=-0.1)(vectors, torch.tensor([1.0, 0.0]),
                                                                            torch.ones(2))
    # q1 . [d1, d2] = [0.6, 0.8]: d2 > 0.6 + 0.1, dropped; d1 . [q1, q2] = [0.6, 0.8]: q2 > 0.7, dropped
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # only the positive is left in each softmax
    loss.backward()
    assert torch.count_nonzero(vectors.grad) == 0


def test_sum_loss_adds_the_in_batch_term_with_its_weight():
    vectors = batch(Q1, Q2, D1, D2)
    rel, weight = torch.tensor([1.0, 0.3]), torch.ones(2)
    loss = build_loss("weighted-mse+in-batch", scale=2.0, in_batch_weight=0.25)(vectors, rel, weight)
    assert isinstance(build_loss("weighted-mse+in-batch"), SumLoss)
    mse = ((0.6 - 1.0) ** 2 + (0.6 - 0.3) ** 2) / 2
    assert loss.item() == pytest.approx(mse + 0.25 * nll([1.2, 1.6], 0), rel=1e-6)


def test_matryoshka_loss_sums_the_loss_over_renormalised_prefixes():
    q, d = (0.6, 0.0, 0.8), (0.0, 0.6, 0.8)
    loss = MatryoshkaLoss(WeightedMSELoss(), dims=(3, 1))(batch(q, d), torch.tensor([0.5]), torch.ones(1))
    # 3 dims: cos = 0.64; 1 dim: q -> (1,), d -> (0,) renormalised (a zero stays zero): cos = 0
    assert loss.item() == pytest.approx((0.64 - 0.5) ** 2 + (0.0 - 0.5) ** 2, rel=1e-5)


def test_in_batch_gradient_pulls_the_positive_closer():
    raw = batch(Q1, Q2, D1, D2).requires_grad_(True)
    loss = InBatchLoss()(F.normalize(raw, dim=-1), torch.tensor([1.0, 1.0]), torch.ones(2))
    loss.backward()
    step = F.normalize(raw - 0.01 * raw.grad, dim=-1)
    assert (step[0] @ step[2]).item() > 0.6 and (step[0] @ step[3]).item() < 0.8


def test_unknown_loss_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown loss 'cosine'.*weighted-mse"):
        build_loss("cosine")
