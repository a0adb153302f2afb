"""Shared fixtures: a tiny random BERT saved like a real checkpoint, and small pair files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE_PAIRS = [
    {"query": "how to boil an egg", "document": "boil the eggs in hot water for seven minutes", "rel": 1.0},
    {"query": "how to boil an egg", "document": "bake the bread in a hot oven", "rel": 0.0},
    {"query": "how to boil an egg", "document": "eggs are cooked in water", "rel": 0.6, "weight": 2.0},
    {"query": "how to cook rice", "document": "cook the rice in salt water for ten minutes", "rel": 0.9},
    {"query": "how to cook rice", "document": "fry the onion and garlic in butter", "rel": 0.1},
    {"query": "how to cook rice", "document": "rice and water in a pan", "rel": 0.7},
    {"query": "what is in a coffee", "document": "hot water and coffee in a cup", "rel": 0.8},
    {"query": "what is in a coffee", "document": "cheese and bread", "rel": 0.05},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def make_checkpoint(model_dir: Path, step: int = 1, val_loss: float | None = 0.5) -> Path:
    """Turn a saved model dir into a complete checkpoint by adding trainer_state.json."""
    state = {"step": step, "epoch": 0, "train_loss": 0.5, "val_loss": val_loss, "val_metrics": {}}
    (model_dir / "trainer_state.json").write_text(json.dumps(state))
    return model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random BERT (mean pooling, no projection) that is also a complete checkpoint."""
    from embedforge.model import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "checkpoint-step-1"
    build_tiny_model(path, pooling="mean")
    return make_checkpoint(path)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", SAMPLE_PAIRS)


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """tiny_model_dir exported to fp32 ONNX (manifest, model.onnx, tokenizer files): what the server loads."""
    from embedforge.export import export_checkpoint

    out = tmp_path_factory.mktemp("tiny_export") / "export"
    texts = ["how to boil an egg", "bake the bread in a hot oven", "hot water and coffee in a cup", "rice"]
    export_checkpoint(tiny_model_dir, out, precisions=("fp32",), parity_texts=texts)
    return out
