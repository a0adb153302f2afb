"""Dropout16: the same inverted dropout as nn.Dropout, with masks from 16-bit random numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from embedforge.train.dropout import Dropout16, replace_dropout


def test_drop_rate_and_scale_match_nn_dropout():
    torch.manual_seed(0)
    x = torch.ones(1000, 1001)  # not a multiple of 3: the last 64-bit draw is partly used
    y = Dropout16(0.1).train()(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.002)
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert Dropout16(0.1).threshold == 6554 - 32768  # drop probability 6554 / 65536


def test_masks_differ_per_call_and_follow_the_seed():
    layer = Dropout16(0.5).train()
    x = torch.ones(64, 64)
    torch.manual_seed(1)
    first, second = layer(x), layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), first)
    assert not torch.equal(first, second)


def test_gradient_is_the_scaled_mask():
    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    y = Dropout16(0.25).train()(x)
    y.sum().backward()
    expected = (y != 0).float() / 0.75
    assert torch.allclose(x.grad, expected)


def test_identity_in_eval_mode_and_at_p_zero():
    x = torch.randn(4, 8)
    assert Dropout16(0.3).eval()(x) is x
    assert Dropout16(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout16(1.0)


def test_replace_dropout_swaps_every_nn_dropout_keeping_p_and_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert replace_dropout(model) == 2
    assert [m.p for m in model.modules() if isinstance(m, Dropout16)] == [0.1, 0.2]
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
