"""One embedding space at a time: the export's id, on every reply, pinned by clients, checked for corpora.

Two real replicas on 127.0.0.1 serve two exports behind one target list, as during a rolling update.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ServerThread, make_checkpoint, make_texts, write_jsonl

from embedforge.client import EmbedClient, SpaceMismatchError
from embedforge.corpus.command import check_space_command, embed_corpus_command
from embedforge.export import export_checkpoint
from embedforge.export.space import embedding_space
from embedforge.loadtest.command import loadtest_command
from embedforge.server.runtime import OnnxEmbedder, read_manifest
from embedforge.testing import build_tiny_model

PARITY_TEXTS = ["how to boil an egg", "bake the bread in a hot oven", "hot water and coffee in a cup", "rice"]


def export(model_dir: Path, out: Path) -> Path:
    export_checkpoint(model_dir, out, precisions=("fp32",), parity_texts=PARITY_TEXTS)
    return out


@pytest.fixture(scope="module")
def other_export_dir(tmp_path_factory) -> Path:
    """Another model (cls pooling, other weights): another embedding space."""
    path = tmp_path_factory.mktemp("other") / "checkpoint-step-1"
    build_tiny_model(path, pooling="cls", seed=1)
    return export(make_checkpoint(path), tmp_path_factory.mktemp("other_export") / "export")


def space_of(export_dir: Path) -> str:
    return json.loads((export_dir / "manifest.json").read_text())["embedding_space"]


def test_the_id_hashes_weights_tokenizer_and_settings(tmp_path):
    weights, tokenizer = tmp_path / "model.safetensors", tmp_path / "tokenizer.json"
    weights.write_bytes(b"weights")
    tokenizer.write_text("{}")
    settings = {"dim": 32, "max_length": 512, "pooling": "mean", "normalized": True, "prompts": {}}
    first = embedding_space([weights], [tokenizer], settings)
    assert first == embedding_space([weights], [tokenizer], dict(settings)) and len(first) == 16
    changed = [embedding_space([weights], [tokenizer], {**settings, key: value})
               for key, value in (("dim", 16), ("max_length", 256), ("pooling", "cls"), ("normalized", False),
                                  ("prompts", {"query": "query: "}))]
    tokenizer.write_text('{"changed": 1}')
    changed.append(embedding_space([weights], [tokenizer], settings))
    weights.write_bytes(b"weightz")
    changed.append(embedding_space([weights], [tokenizer], settings))
    assert len({first, *changed}) == len(changed) + 1


@pytest.mark.slow  # two exports
def test_a_repeated_export_keeps_the_id_and_another_model_changes_it(tiny_model_dir, tiny_export_dir, tmp_path,
                                                                    other_export_dir):
    again = export(tiny_model_dir, tmp_path / "again")
    assert space_of(again) == space_of(tiny_export_dir)
    projected = tmp_path / "projected" / "checkpoint-step-1"
    build_tiny_model(projected, pooling="mean", projection_dim=8)
    ids = {space_of(tiny_export_dir), space_of(other_export_dir),
           space_of(export(make_checkpoint(projected), tmp_path / "projected_export"))}
    assert len(ids) == 3


def test_an_export_without_an_id_gets_one_of_its_own(tiny_export_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_export_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["embedding_space"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    legacy = read_manifest(old)["embedding_space"]
    assert legacy.startswith("legacy-") and legacy == read_manifest(old)["embedding_space"]
    assert legacy != space_of(tiny_export_dir)


@pytest.fixture(scope="module")
def two_spaces(embedder, tiny_export_dir, other_export_dir):
    """Replica A (the tiny export) and replica B (another model) on 127.0.0.1."""
    with ServerThread(embedder, metrics_port=0, http_port=0) as a, \
            ServerThread(OnnxEmbedder(other_export_dir, threads=1)) as b:
        yield a, b, space_of(tiny_export_dir), space_of(other_export_dir)


def test_every_reply_and_info_carry_the_space(two_spaces):
    import urllib.request

    a, b, space_a, space_b = two_spaces
    with EmbedClient(a.target, timeout=10) as client:
        assert client.info().embedding_space == space_a
        assert client.embed(["egg"]).embedding_space == space_a
        assert client.score("egg", ["rice", "tea"]).embedding_space == space_a
    with EmbedClient(b.target, timeout=10) as client:
        assert client.embed(["egg"]).embedding_space == space_b != space_a
    http = f"http://127.0.0.1:{a.server.http.port}"
    body = json.dumps({"input": ["egg"]}).encode()
    request = urllib.request.Request(f"{http}/v1/embeddings", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.headers["X-Embedding-Space"] == space_a and json.load(reply)["embedding_space"] == space_a
    with urllib.request.urlopen(f"{http}/v1/models", timeout=10) as reply:
        assert json.load(reply)["data"][0]["embedding_space"] == space_a
    with urllib.request.urlopen(f"http://127.0.0.1:{a.server.metrics_port}/metrics", timeout=10) as reply:
        assert f'embedding_space="{space_a}"' in reply.read().decode()


def test_a_pinned_client_never_takes_a_vector_of_the_other_space(two_spaces, embedder):
    a, b, space_a, space_b = two_spaces
    both = f"{a.target},{b.target}"
    texts = make_texts(40, seed=3)
    reference = embedder.run_batch(embedder.tokenize(texts[:1]).ids)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    with EmbedClient(both, timeout=10, pin_space=False) as unpinned:
        assert {unpinned.embed([t]).embedding_space for t in texts[:8]} == {space_a, space_b}  # the hazard
    with EmbedClient(both, timeout=10, space=space_a) as pinned, ThreadPoolExecutor(8) as callers:  # under load
        results = list(callers.map(lambda text: pinned.embed([text]), texts))
        assert {r.embedding_space for r in results} == {space_a}
        np.testing.assert_allclose(results[0].vectors, reference, atol=1e-5)
        assert {pinned.score("egg", ["rice"]).embedding_space for _ in range(8)} == {space_a}
    with EmbedClient(both, timeout=10) as first_wins:  # pinned to the space of its first reply
        first = first_wins.embed(["egg"]).embedding_space
        assert {first_wins.embed([t]).embedding_space for t in texts[:16]} == {first}


def test_the_loadtest_counts_replies_per_space(two_spaces, tmp_path):
    a, b, space_a, space_b = two_spaces
    out = tmp_path / "report.json"
    result = CliRunner().invoke(loadtest_command, ["--target", f"{a.target},{b.target}", "--requests", "20",
                                                   "--warmup", "0", "--concurrency", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    spaces = json.loads(out.read_text())["spaces"]
    assert set(spaces) == {space_a, space_b} and sum(spaces.values()) == 20
    assert "2 embedding spaces" in result.output


def test_the_corpus_check_catches_a_mismatch(two_spaces, tiny_export_dir, tmp_path):
    a, b, space_a, space_b = two_spaces
    corpus_input = write_jsonl(tmp_path / "docs.jsonl", [{"document": t} for t in make_texts(5, seed=4)])
    vectors = tmp_path / "vectors"
    made = CliRunner().invoke(embed_corpus_command, ["--model-dir", str(tiny_export_dir), "--input", str(corpus_input),
                                                     "--output", str(vectors), "--no-progress"])
    assert made.exit_code == 0, made.output
    import pyarrow.parquet as pq

    schema = pq.read_schema(next(vectors.glob("part-*.parquet")))
    assert schema.metadata[b"embedding_space"].decode() == space_a
    assert json.loads((vectors / "_manifest.json").read_text())["embedding_space"] == space_a
    same = CliRunner().invoke(check_space_command, ["--corpus", str(vectors), "--target", a.target])
    assert same.exit_code == 0 and space_a in same.output
    other = CliRunner().invoke(check_space_command, ["--corpus", str(vectors), "--target", b.target])
    assert other.exit_code == 1 and "MISMATCH" in other.output and space_a in other.output and space_b in other.output


def test_a_pinned_client_fails_clearly_when_its_space_is_gone(embedder, other_export_dir):
    with ServerThread(embedder) as a, ServerThread(OnnxEmbedder(other_export_dir, threads=1)) as b:
        with EmbedClient(f"{a.target},{b.target}", timeout=10, space=space_of_export(embedder)) as pinned:
            assert pinned.embed(["egg"]).embedding_space == space_of_export(embedder)
            a.call(a.server.drain(0))  # the last replica of its space stops (its health says NOT_SERVING first)
            with pytest.raises(SpaceMismatchError, match="no replica of embedding space"):
                pinned.embed(["egg"])
            assert b.server.embedder.info.embedding_space != pinned.pin.space


def space_of_export(embedder: OnnxEmbedder) -> str:
    return embedder.info.embedding_space
