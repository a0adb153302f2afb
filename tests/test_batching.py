"""Duplicate-free batches and hard negatives, for the in-batch losses (train/batching.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from helpers import SAMPLE_PAIRS, write_jsonl

from embedforge.data import Pair
from embedforge.testing import build_tiny_model
from embedforge.train import trainer
from embedforge.train.batching import duplicate_free_batches, hard_negatives
from embedforge.train.trainer import TokenizedPairs, TrainConfig, train

PAIRS = [Pair(r["query"], r["document"], r["rel"], r.get("weight", 1.0)) for r in SAMPLE_PAIRS]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", max_length=64)


def texts_of(data: TokenizedPairs, batch: np.ndarray) -> list[int]:
    return [*data.query[batch].tolist(), *data.document[batch].tolist()]


def test_duplicate_free_batches_defer_only_the_colliding_item():
    texts = [(0, 1), (0, 2), (3, 4), (5, 6), (7, 8)]  # items 0 and 1 share text 0
    batches = duplicate_free_batches([0, 1, 2, 3, 4], texts, batch_size=2)
    assert [b.tolist() for b in batches] == [[0, 2], [1, 3], [4]]


def test_every_pair_once_and_no_text_twice_in_a_batch(model):
    data = TokenizedPairs(PAIRS * 3, model, unique_texts=True)
    for epoch in range(3):
        batches = data.batches(4, seed=1, epoch=epoch, group_by_length=True)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(data)))
        for batch in batches:
            assert max(Counter(texts_of(data, batch)).values()) == 1
    plain = TokenizedPairs(PAIRS * 3, model).batches(4, seed=1, epoch=0, group_by_length=True)
    assert any(max(Counter(texts_of(data, batch)).values()) > 1 for batch in plain)  # what it prevents


def test_ranks_share_duplicate_free_global_batches(model):
    data = TokenizedPairs(PAIRS * 3, model, unique_texts=True)
    ranks = [data.batches(2, seed=0, epoch=0, group_by_length=False, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
    for local in zip(*ranks, strict=True):
        assert max(Counter(texts_of(data, np.concatenate(local))).values()) == 1


def test_hard_negatives_are_low_rel_documents_of_the_same_query():
    # query 0: documents 1 (rel 1.0), 2 (rel 0.0), 3 (rel 0.1); query 4: document 5 (rel 0.9)
    negatives = hard_negatives([0, 0, 0, 4], [1, 2, 3, 5], [1.0, 0.0, 0.1, 0.9], 0.5, 0.2)
    assert [n.tolist() for n in negatives] == [[2, 3], [], [], []]


def test_collate_appends_a_hard_negative_not_already_in_the_batch(model):
    data = TokenizedPairs(PAIRS, model, unique_texts=True, negative_threshold=0.2)
    alone = data.collate(np.array([0]), torch.device("cpu"))  # egg query, its rel-0 bread document joins
    assert alone["input_ids"].shape[0] == 3
    expected = model.tokenize(["bake the bread in a hot oven"])[0]
    assert alone["input_ids"][2, :len(expected)].tolist() == expected
    both = data.collate(np.array([0, 4]), torch.device("cpu"))
    assert both["input_ids"].shape[0] == 4 + 1  # pair 4 (rel 0.1) is no positive; pair 0 brings one
    with_it = data.collate(np.array([0, 1]), torch.device("cpu"))
    assert with_it["input_ids"].shape[0] == 4  # the bread document is in the batch already


def test_training_with_an_in_batch_loss_sees_unique_texts_and_hard_negatives(model, tmp_path, monkeypatch):
    seen = []
    collate = TokenizedPairs.collate

    def spy(self, batch, device):
        inputs = collate(self, batch, device)
        seen.append((texts_of(self, batch), inputs["input_ids"].shape[0] - 2 * len(batch)))
        return inputs

    monkeypatch.setattr(trainer.TokenizedPairs, "collate", spy)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", SAMPLE_PAIRS * 3)
    model.save_pretrained(tmp_path / "base")
    train(TrainConfig(train_path=str(pairs), val_path=str(pairs), model_name=str(tmp_path / "base"), max_length=64,
                      batch_size=4, num_epochs=1, warmup_steps=1, save_steps=100, save_path=str(tmp_path / "run"),
                      pooling="mean", show_progress=False, loss="in-batch"))
    assert seen and all(max(Counter(texts).values()) == 1 for texts, _ in seen)
    assert sum(extra for _, extra in seen) > 0
