"""Shared fixtures: a tiny random BERT saved like a real checkpoint, and small pair files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import SAMPLE_PAIRS, make_checkpoint, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the library versions this run used (`make test` takes the newest, `make test-min` the lowest)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "transformers", "huggingface-hub", "tokenizers", "safetensors", "onnx", "onnxruntime")
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} absent")
    terminalreporter.write_line("libraries: " + ", ".join(found))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random BERT (mean pooling, no projection) that is also a complete checkpoint."""
    from embedforge.testing import build_tiny_model

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


@pytest.fixture(scope="session")
def embedder(tiny_export_dir):
    """The tiny model's fp32 export loaded by the serving runtime (one thread)."""
    from embedforge.server.runtime import OnnxEmbedder

    return OnnxEmbedder(tiny_export_dir, threads=1)
