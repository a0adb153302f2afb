"""The padding-free training forward (train/packing.py) computes what the transformers encoder computes."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import AutoModel, BertConfig

from embedforge.model import BertVectorModel, pad_batch
from embedforge.testing import build_tiny_model
from embedforge.train.packing import packed_hidden_states, packing_unsupported, supports_packing
from embedforge.train.trainer import PairVectors

TEXTS = ["how to boil an egg", "coffee", "boil the eggs in hot water for seven minutes and then cool them",
         "bread", "what is the best rice for soup", "tea"]


def batch(model: BertVectorModel) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(model.tokenize(TEXTS), model.tokenizer.pad_token_id, torch.device("cpu"))


def pair_cosine(module: PairVectors, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """cosine(query_i, document_i) for a batch holding queries, then documents."""
    queries, documents = module(input_ids, attention_mask).chunk(2)
    return (queries * documents).sum(dim=-1)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_packed_hidden_states_equal_the_encoder_at_real_tokens_and_zero_at_padding(tmp_path, model_type):
    model = build_tiny_model(tmp_path / "m", model_type=model_type).eval()
    input_ids, attention_mask = batch(model)
    assert (attention_mask == 0).any()  # the batch really holds padding
    with torch.no_grad():
        expected = model.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        packed = packed_hidden_states(model.encoder, input_ids, attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(packed[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(packed[~real]) == 0


@pytest.mark.parametrize(("pooling", "projection_dim"), [("mean", None), ("cls", 8)])
def test_packed_pair_cosine_gives_the_same_loss_gradients(tmp_path, pooling, projection_dim):
    model = build_tiny_model(tmp_path / "m", pooling=pooling, projection_dim=projection_dim).eval()  # no dropout
    input_ids, attention_mask = batch(model)
    gradients = {}
    for pack in (True, False):
        model.zero_grad()
        pair_vectors = PairVectors(model, pack_tokens=pack)
        assert pair_vectors.pack_tokens == pack
        cosine = pair_cosine(pair_vectors, input_ids, attention_mask)
        ((cosine - 0.5) ** 2).sum().backward()
        gradients[pack] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert gradients[True].keys() == gradients[False].keys()
    assert len(gradients[True]) > 20  # every layer's weights got a gradient
    for name, gradient in gradients[True].items():
        torch.testing.assert_close(gradient, gradients[False][name], atol=1e-5, rtol=1e-4, msg=name)


def test_attention_dropout_applies_only_in_training(tmp_path):
    model = build_tiny_model(tmp_path / "m")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # hidden-state dropout off: any randomness left is attention dropout
    model.encoder.config.attention_probs_dropout_prob = 0.5
    input_ids, attention_mask = batch(model)
    model.eval()
    with torch.no_grad():
        first, second = (packed_hidden_states(model.encoder, input_ids, attention_mask) for _ in range(2))
        torch.testing.assert_close(first, second)
        model.train()
        assert not torch.allclose(packed_hidden_states(model.encoder, input_ids, attention_mask), first)


def test_other_layouts_train_through_their_own_forward(tmp_path):
    model = build_tiny_model(tmp_path / "m").eval()
    assert supports_packing(model.encoder)
    relative = AutoModel.from_config(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=4, intermediate_size=64,
                                                position_embedding_type="relative_key"))
    assert not supports_packing(relative)
    fallback = BertVectorModel(relative, "mean", max_length=64)
    assert not PairVectors(fallback).pack_tokens
    ids = torch.randint(5, 100, (4, 7))
    with torch.no_grad():
        cosine = pair_cosine(PairVectors(fallback.eval()), ids, torch.ones_like(ids))
    queries, documents = fallback(ids, torch.ones_like(ids)).chunk(2)
    torch.testing.assert_close(cosine, (queries * documents).sum(dim=-1))


def test_an_encoder_laid_out_otherwise_falls_back_with_one_log_line(tmp_path, caplog):
    """A transformers release that moves a module the packed forward calls must not break training."""
    model = build_tiny_model(tmp_path / "m").eval()
    del model.encoder.encoder.layer[1].intermediate
    model.encoder.encoder.layer[1].intermediate_block = nn.Identity()  # renamed: the layout check must see it
    assert packing_unsupported(model.encoder) == "encoder layer 1 has no intermediate module"
    with caplog.at_level(logging.WARNING, logger="embedforge.train.packing"):
        assert not PairVectors(model).pack_tokens
        assert not PairVectors(model, pack_tokens=False).pack_tokens  # not asked for: nothing to say
    assert [record.getMessage() for record in caplog.records] == [
        "packed training forward off (encoder layer 1 has no intermediate module): "
        "training through the transformers forward"]
    narrow = build_tiny_model(tmp_path / "n").eval()
    narrow.encoder.encoder.layer[0].attention.self.value = nn.Linear(32, 32, bias=False)
    assert "attention.self.value is not a Linear layer with bias" in packing_unsupported(narrow.encoder)


def test_packed_forward_under_autocast_keeps_the_dtypes_consistent(tmp_path):
    """Mixed precision (bf16 here, on CPU; the trainer's CUDA path) runs and stays close to fp32."""
    model = build_tiny_model(tmp_path / "m").eval()
    input_ids, attention_mask = batch(model)
    with torch.no_grad():
        exact = pair_cosine(PairVectors(model), input_ids, attention_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = pair_cosine(PairVectors(model), input_ids, attention_mask)
    torch.testing.assert_close(mixed.float(), exact, atol=0.03, rtol=0.0)
