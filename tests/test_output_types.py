"""Compact output types: int8 / uint8 codes from the export's calibration, binary sign bits, on gRPC and HTTP;
each checked against codes computed here from the float vectors."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from helpers import ServerThread

from embedforge.client import EmbedClient
from embedforge.quantize import Calibration, QuantizeError, check_output_type, quantize, scoring_vectors

TEXTS = ["how to boil an egg", "bake the bread in a hot oven", "rice", "hot water and coffee in a cup"]


def reference_codes(vectors: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """uint8 codes, one value at a time: the formula of the quantize docstring."""
    codes = np.zeros(vectors.shape, dtype=np.int64)
    for (i, d), value in np.ndenumerate(vectors):
        step = (high[d] - low[d]) / 255
        codes[i, d] = min(255, max(0, round((value - low[d]) / step)))
    return codes


def reference_bits(vectors: np.ndarray) -> np.ndarray:
    """Packed sign bits, one byte at a time: dimension 8k + j is bit 7 - j of byte k."""
    width = (vectors.shape[1] + 7) // 8
    packed = np.zeros((len(vectors), width), dtype=np.int64)
    for (i, d), value in np.ndenumerate(vectors):
        if value > 0:
            packed[i, d // 8] |= 1 << (7 - d % 8)
    return packed


def test_int8_and_uint8_codes_follow_the_calibrated_ranges_and_clip_outside_them():
    rng = np.random.default_rng(0)
    calibration_vectors = rng.normal(size=(50, 12)).astype(np.float32)
    calibration = Calibration.measure(calibration_vectors)
    assert np.array_equal(calibration.low, calibration_vectors.min(axis=0))
    vectors = rng.normal(scale=1.5, size=(6, 12)).astype(np.float32)  # some values outside the ranges
    expected = reference_codes(vectors, calibration.low, calibration.high)
    assert np.array_equal(quantize(vectors, "uint8", calibration), expected)
    assert np.array_equal(quantize(vectors, "int8", calibration), expected - 128)
    assert quantize(vectors, "int8", calibration).dtype == np.int8
    assert np.array_equal(scoring_vectors(quantize(vectors, "uint8", calibration), "uint8", 12),
                          scoring_vectors(quantize(vectors, "int8", calibration), "int8", 12))
    again = Calibration.from_manifest(json.loads(json.dumps(calibration.to_manifest())))
    assert np.array_equal(quantize(vectors, "int8", again), quantize(vectors, "int8", calibration))
    assert again.digest() == calibration.digest()


def test_binary_codes_pack_sign_bits_and_score_as_hamming_similarity():
    vectors = np.random.default_rng(1).normal(size=(5, 13)).astype(np.float32)  # 13 dims: 2 bytes, 3 bits spare
    assert np.array_equal(quantize(vectors, "ubinary"), reference_bits(vectors))
    assert np.array_equal(quantize(vectors, "binary"), reference_bits(vectors) - 128)
    signs = scoring_vectors(quantize(vectors, "binary"), "binary", 13)
    assert np.array_equal(signs, np.where(vectors > 0, 1.0, -1.0))
    hamming = (np.sign(vectors[0]) != np.sign(vectors[1])).sum()
    cosine = signs[0] @ signs[1] / 13
    assert cosine == pytest.approx(1 - 2 * hamming / 13)


def test_output_types_that_cannot_be_made_are_refused_with_the_reason():
    calibration = Calibration.measure(np.eye(4, dtype=np.float32))
    with pytest.raises(QuantizeError, match="unknown output type 'int4'"):
        check_output_type("int4", calibration, 4, 4)
    with pytest.raises(QuantizeError, match="this export has none"):
        check_output_type("int8", None, 4, 4)
    with pytest.raises(QuantizeError, match="calibrated for the full 4-dimension vectors"):
        check_output_type("uint8", calibration, 2, 4)
    check_output_type("binary", None, 2, 4)  # sign bits need no calibration, any size


def test_the_export_calibrates_on_its_parity_texts(tiny_export_dir, embedder):
    manifest = json.loads((tiny_export_dir / "manifest.json").read_text())
    calibration = Calibration.from_manifest(manifest["calibration"])
    assert calibration.texts == 4 and len(calibration.low) == manifest["dim"]
    vectors = embedder.run_batch(embedder.tokenize(TEXTS).ids)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(calibration.low, vectors.min(axis=0), atol=1e-4)
    np.testing.assert_allclose(calibration.high, vectors.max(axis=0), atol=1e-4)


@pytest.fixture(scope="module")
def server(embedder):
    with ServerThread(embedder, http_port=0, allow_any_dimensions=True) as running:
        yield running


@pytest.mark.parametrize("output_type", ["int8", "uint8", "binary", "ubinary"])
def test_embed_returns_the_codes_of_its_float_vectors(server, embedder, output_type):
    with EmbedClient(server.target, timeout=10) as client:
        floats = client.embed(TEXTS)
        codes = client.embed(TEXTS, output_type=output_type)
    assert codes.output_type == output_type and codes.dim == floats.dim
    assert codes.embedding_space == floats.embedding_space
    expected = quantize(floats.vectors, output_type, embedder.info.calibration)
    assert codes.vectors.dtype == expected.dtype and np.array_equal(codes.vectors, expected)


def post(server, body: dict) -> dict:
    url = f"http://127.0.0.1:{server.server.http.port}/v1/embeddings"
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


def test_http_embedding_types_follow_cohere_and_refuse_what_cannot_be_made(server, embedder):
    floats = np.array([row["embedding"] for row in post(server, {"input": TEXTS})["data"]], dtype=np.float32)
    reply = post(server, {"input": TEXTS, "embedding_types": ["int8"]})
    assert reply["embedding_type"] == "int8"
    codes = np.array([row["embedding"] for row in reply["data"]])
    assert np.array_equal(codes, quantize(floats, "int8", embedder.info.calibration))
    packed = post(server, {"input": TEXTS, "embedding_types": ["ubinary"], "encoding_format": "base64"})["data"]
    raw = np.stack([np.frombuffer(base64.b64decode(row["embedding"]), dtype=np.uint8) for row in packed])
    assert np.array_equal(raw, quantize(floats, "ubinary"))
    for body, message in (({"embedding_types": ["int4"]}, "embedding_types must be a list of one of"),
                          ({"embedding_types": ["int8", "binary"]}, "one type per request"),
                          ({"embedding_types": ["int8"], "dimensions": 8}, "dimensions")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(server, {"input": TEXTS, **body})
        assert refused.value.code == 400 and message in json.load(refused.value)["error"]["message"]


def test_grpc_refuses_int8_of_truncated_vectors_and_unnormalised_codes(server):
    with EmbedClient(server.target, timeout=10) as client:
        for options, message in (({"dimensions": 8}, "calibrated for the full"), ({"normalize": False}, "normalize")):
            with pytest.raises(grpc.RpcError) as refused:
                client.embed(TEXTS, output_type="int8", **options)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in refused.value.details()
        with pytest.raises(ValueError, match="output_type must be one of"):
            client.embed(TEXTS, output_type="int4")


def test_evaluate_on_an_export_scores_each_output_type_as_a_store_compares_codes(tiny_export_dir, pairs_file, tmp_path):
    from click.testing import CliRunner

    from embedforge.corpus.vectors import CorpusEmbedder
    from embedforge.data import read_pairs
    from embedforge.evaluate.cli import evaluate_command
    from embedforge.evaluate.metrics import spearman

    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(evaluate_command, ["--test-path", str(pairs_file), "--export-dir",
                                                   str(tiny_export_dir), "--output-types", "float32,int8,binary",
                                                   "--output", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "by output type" in result.output
    metrics = json.loads(report_path.read_text())["results"][0]["metrics"]
    assert list(metrics["output_types"]) == ["float32", "int8", "binary"]
    assert metrics["output_types"]["float32"]["spearman"] == pytest.approx(metrics["spearman"], abs=1e-9)
    # binary: Spearman of the Hamming similarity of each pair's sign bits against rel, computed here
    pairs = read_pairs(pairs_file)
    embedder = CorpusEmbedder(tiny_export_dir)
    queries, documents = (embedder.embed([getattr(p, side) for p in pairs]).vectors for side in ("query", "document"))
    dim = queries.shape[1]
    hamming = ((queries > 0) != (documents > 0)).sum(axis=1)
    expected = 100 * spearman(1 - 2 * hamming / dim, np.array([p.rel for p in pairs]))
    assert metrics["output_types"]["binary"]["spearman"] == pytest.approx(expected, abs=1e-6)
    refused = CliRunner().invoke(evaluate_command, ["--test-path", str(pairs_file), "--export-dir",
                                                    str(tiny_export_dir), "--output-types", "int4"])
    assert refused.exit_code == 2 and "choose from float32, int8" in refused.output
