import pytest
import torch

from embedforge.train.loss import WeightedMSELoss


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
    loss = WeightedMSELoss()(torch.tensor(cosine), torch.tensor(rel), weight_tensor)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_zero_weight_samples_get_no_gradient():
    cosine = torch.tensor([0.1, 0.9], requires_grad=True)
    WeightedMSELoss()(cosine, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])).backward()
    assert cosine.grad[1] == 0 and cosine.grad[0] == pytest.approx(2 * (0.1 - 1.0))
