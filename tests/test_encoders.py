"""BERT, RoBERTa and DeBERTa-v2 each train, evaluate, export with parity and serve (tiny random configs)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from helpers import SAMPLE_PAIRS, write_jsonl

from embedforge.data import read_pairs
from embedforge.evaluate.runner import _truncate, evaluate_model, evaluate_pairs
from embedforge.export import export_checkpoint
from embedforge.model import BertVectorModel
from embedforge.server.embedder import l2_normalize
from embedforge.server.runtime import OnnxEmbedder
from embedforge.testing import build_tiny_model
from embedforge.train.trainer import TrainConfig, train

TEXTS = ["how to boil an egg", "bake the bread in a hot oven", "hot water and coffee in a cup", "rice"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["bert", "roberta", "deberta-v2"])
def test_encoder_trains_evaluates_exports_and_serves(model_type, tmp_path, caplog):
    build_tiny_model(tmp_path / "base", model_type=model_type, max_length=64)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", SAMPLE_PAIRS * 2)
    with caplog.at_level(logging.WARNING, logger="embedforge.train.packing"):
        result = train(TrainConfig(train_path=str(pairs), val_path=str(pairs), model_name=str(tmp_path / "base"),
                                   max_length=64, batch_size=4, num_epochs=1, warmup_steps=1, save_steps=100,
                                   save_path=str(tmp_path / "run"), pooling="mean", show_progress=False,
                                   loss="weighted-mse+in-batch", matryoshka_dims=(32, 16)))
    fallbacks = [r for r in caplog.records if "packed training forward off" in r.getMessage()]
    assert len(fallbacks) == (1 if model_type == "deberta-v2" else 0)  # said once, only where it applies

    checkpoint = result.best_checkpoint
    model = BertVectorModel.from_pretrained(checkpoint)
    assert model.matryoshka_dims == [32, 16]
    report = evaluate_model(model, read_pairs(pairs), show_progress=False)
    assert set(report["matryoshka"]) == {"32", "16"}
    assert report["matryoshka"]["32"]["spearman"] == pytest.approx(report["spearman"], abs=1e-6)
    cut = evaluate_pairs(read_pairs(pairs), lambda texts: _truncate(model.encode(texts), 16), show_progress=False)
    assert report["matryoshka"]["16"]["retrieval"]["ndcg@10"] == pytest.approx(cut["retrieval"]["ndcg@10"])

    manifest = export_checkpoint(checkpoint, tmp_path / "export", precisions=("fp32",), parity_texts=TEXTS)
    assert manifest["models"]["fp32"]["parity"]["min_cosine"] > 0.9999
    assert manifest["matryoshka_dims"] == [32, 16]
    served = OnnxEmbedder(tmp_path / "export", threads=1)
    assert set(served.info.matryoshka_dims) == {32, 16}  # what the server's `dimensions` option accepts
    got = l2_normalize(served.run_batch(served.tokenize(TEXTS).ids))
    np.testing.assert_allclose(np.sum(got * model.encode(TEXTS), axis=1), 1.0, atol=1e-4)
