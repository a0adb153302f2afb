"""Truncation is never silent: every reply says, per text, the tokens used and whether it was cut; a metric
counts cut texts; truncate=false names the text and its length; truncation_direction left keeps the end."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from helpers import ServerThread

from embedforge.client import EmbedClient

LONG = "rice " * 600 + "coffee egg"  # 602 words: over the tiny model's max_length of 512 tokens
TAIL = "rice " * 508 + "coffee egg"  # what left truncation keeps: [CLS] + the last 510 words + [SEP]


@pytest.fixture(scope="module")
def server(embedder):
    with ServerThread(embedder, http_port=0, metrics_port=0) as running:
        yield running


def truncated_total(server) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as reply:
        lines = [line for line in reply.read().decode().splitlines()
                 if line.startswith("embedforge_truncated_texts_total ")]
    return float(lines[0].split()[1])


def test_embed_replies_say_the_tokens_of_each_text_and_which_were_cut(server, embedder):
    before = truncated_total(server)
    with EmbedClient(server.target, timeout=10) as client:
        result = client.embed(["egg", LONG, "hot water", LONG])
    assert result.truncated == (1, 3)
    assert result.text_tokens == (3, 512, 4, 512) and sum(result.text_tokens) == result.tokens
    assert truncated_total(server) == before + 2
    with EmbedClient(server.target, timeout=10) as client:
        assert client.embed(["egg"]).truncated == ()
        assert truncated_total(server) == before + 2  # nothing cut, nothing counted


def test_left_truncation_keeps_the_end_of_the_text(server, embedder):
    with EmbedClient(server.target, timeout=10) as client:
        left = client.embed([LONG], truncation_direction="left")
        right = client.embed([LONG])
        tail = client.embed([TAIL])
    assert left.truncated == (0,) and left.text_tokens == (512,) and tail.truncated == ()
    np.testing.assert_allclose(left.vectors, tail.vectors, atol=1e-5)
    assert float(left.vectors[0] @ right.vectors[0]) < 0.999999  # the right cut lost "coffee egg"
    with pytest.raises(ValueError, match="truncation_direction"):
        EmbedClient(server.target).embed(["egg"], truncation_direction="middle")


def test_truncate_false_names_the_text_and_its_length(server):
    with EmbedClient(server.target, timeout=10) as client, pytest.raises(grpc.RpcError) as refused:
        client.embed(["egg", LONG], truncate=False)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1] has 604 tokens, more than max_length=512" in refused.value.details()


def test_score_replies_say_which_texts_were_cut(server):
    with EmbedClient(server.target, timeout=10) as client:
        scored = client.score(LONG, ["egg", LONG, "rice"])
        short = client.score("egg", ["rice"], truncation_direction="left")
    assert scored.query_truncated and scored.query_tokens == 512
    assert scored.truncated_documents == (1,) and scored.document_tokens == (3, 512, 3)
    assert not short.query_truncated and short.truncated_documents == ()


def post(server, path: str, body: dict) -> dict:
    url = f"http://127.0.0.1:{server.server.http.port}{path}"
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


def test_the_http_api_says_it_too(server):
    reply = post(server, "/v1/embeddings", {"input": ["egg", LONG]})
    assert reply["input_tokens"] == [3, 512] and reply["truncated"] == [1]
    assert reply["usage"]["total_tokens"] == 515
    left = post(server, "/v1/embeddings", {"input": [LONG], "truncation_direction": "Left"})  # TEI's spelling
    tail = post(server, "/v1/embeddings", {"input": [TAIL]})
    np.testing.assert_allclose(left["data"][0]["embedding"], tail["data"][0]["embedding"], atol=1e-5)
    reranked = post(server, "/v1/rerank", {"query": "egg", "documents": ["rice", LONG]})
    assert reranked["truncated_documents"] == [1] and reranked["document_tokens"] == [3, 512]
    assert reranked["query_tokens"] == 3 and reranked["query_truncated"] is False
    for body, param in (({"input": [LONG], "truncate": False}, "input[0] has 604 tokens"),
                        ({"input": ["egg"], "truncation_direction": "middle"}, "truncation_direction"),
                        ({"input": ["egg"], "truncate": "no"}, "truncate")):
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(server, "/v1/embeddings", body)
        assert bad.value.code == 400 and param in json.dumps(json.load(bad.value))


# ---- overflow "chunk": a long text in windows, its vector their normalised mean ----

def reference_chunked(embedder, text: str, overlap: int) -> np.ndarray:
    """The chunk policy computed here: windows of max_length tokens, each embedded alone, normalised, averaged."""
    windows = embedder.token_windows(text, overlap)
    rows = np.concatenate([embedder.run_batch([window]) for window in windows])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    mean = rows.mean(axis=0)
    return mean / np.linalg.norm(mean)


def test_token_windows_cover_the_text_with_overlap(embedder):
    ids = embedder.count_tokens(LONG)
    windows = embedder.token_windows(LONG, 64)
    assert len(windows) == 2 and all(len(w) <= 512 for w in windows)
    body = [w[1:-1] for w in windows]
    assert list(body[0][-64:]) == list(body[1][:64])  # neighbours share 64 tokens
    assert sum(len(b) for b in body) - 64 == ids - 2  # every token in a window, the overlap counted once
    assert len(embedder.token_windows(LONG, 0)) == 2 and len(embedder.token_windows("rice " * 2000, 0)) == 4


def test_chunk_returns_the_mean_of_the_windows_in_the_same_batches(server, embedder):
    texts = ["egg", LONG, "hot water", "rice " * 1400]
    with EmbedClient(server.target, timeout=30) as client:
        chunked = client.embed(texts, overflow="chunk", chunk_overlap=32)
        plain = client.embed(texts[:1])
        truncated = client.embed([LONG])
    assert chunked.truncated == ()  # nothing lost
    np.testing.assert_allclose(chunked.vectors[0], plain.vectors[0], atol=1e-5)  # a short text is itself
    for i in (1, 3):
        np.testing.assert_allclose(chunked.vectors[i], reference_chunked(embedder, texts[i], 32), atol=1e-5)
    assert float(chunked.vectors[1] @ truncated.vectors[0]) < 0.99999
    windows = embedder.token_windows(texts[3], 32)
    assert chunked.text_tokens[3] == sum(len(w) for w in windows) and len(windows) == 3


def test_the_overflow_policy_over_http_and_its_errors(server, embedder):
    reply = post(server, "/v1/embeddings", {"input": [LONG], "overflow": "chunk", "chunk_overlap": 16})
    np.testing.assert_allclose(reply["data"][0]["embedding"], reference_chunked(embedder, LONG, 16), atol=1e-5)
    assert reply["truncated"] == [] and reply["input_tokens"] == [sum(len(w) for w in
                                                                      embedder.token_windows(LONG, 16))]
    for body, param in (({"input": [LONG], "overflow": "error"}, "input[0] has 604 tokens"),
                        ({"input": [LONG], "overflow": "split"}, "overflow"),
                        ({"input": [LONG], "overflow": "chunk", "chunk_overlap": 400}, "chunk_overlap")):
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(server, "/v1/embeddings", body)
        assert bad.value.code == 400 and param in json.dumps(json.load(bad.value))


def test_the_server_default_policy_applies_to_calls_that_name_none(embedder):
    with ServerThread(embedder, overflow="chunk", chunk_overlap=8) as chunking, \
            EmbedClient(chunking.target, timeout=10) as client:
        np.testing.assert_allclose(client.embed([LONG]).vectors[0], reference_chunked(embedder, LONG, 8), atol=1e-5)
        assert client.embed([LONG], truncate=True).truncated == (0,)  # a call that names a policy keeps it
        with pytest.raises(grpc.RpcError):
            client.embed([LONG], overflow="error")
