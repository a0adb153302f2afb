"""The OpenAI-compatible HTTP API: a real server (gRPC + HTTP on one loop) called with the official `openai` SDK."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from click.testing import CliRunner
from helpers import HookedEmbedder, ServerThread, free_port

from embedforge.client import EmbedClient
from embedforge.loadtest.command import loadtest_command
from embedforge.server.runtime import OnnxEmbedder

MODEL = "tiny-random-bert"  # the tiny export's model name (the served model's id)
TEXTS = ["how to boil an egg", "bake the bread in a hot oven", "hot water and coffee in a cup"]


@pytest.fixture(scope="module")
def matryoshka_embedder(tiny_export_dir, tmp_path_factory) -> OnnxEmbedder:
    """The tiny export with Matryoshka sizes recorded in its manifest."""
    directory = tmp_path_factory.mktemp("matryoshka") / "export"
    shutil.copytree(tiny_export_dir, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["matryoshka_dims"] = [8, 16, 32]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return OnnxEmbedder(directory, threads=1)


@pytest.fixture(scope="module")
def server(embedder):
    with ServerThread(embedder, http_port=0, max_texts_per_request=16, max_chars_per_text=3000,
                      max_request_bytes=64 * 1024) as running:
        yield running


def sdk(running: ServerThread, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{running.server.http.port}/v1", api_key=api_key,
                         max_retries=0, timeout=30)


def http(running: ServerThread, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one raw HTTP call."""
    request = urllib.request.Request(f"http://127.0.0.1:{running.server.http.port}{path}", data=body,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_float_and_base64_equal_grpc_embed(server):
    with EmbedClient(server.target, timeout=30) as grpc_client:
        expected = grpc_client.embed(TEXTS)
    client = sdk(server)
    as_float = client.embeddings.create(input=TEXTS, model=MODEL, encoding_format="float")
    sdk_decoded = client.embeddings.create(input=TEXTS, model=MODEL)  # the SDK asks for base64 and decodes it
    raw = client.embeddings.create(input=TEXTS, model=MODEL, encoding_format="base64")
    raw_vectors = np.stack([np.frombuffer(base64.b64decode(item.embedding), "<f4") for item in raw.data])
    for response in (as_float, sdk_decoded):
        assert [item.index for item in response.data] == [0, 1, 2]
        vectors = np.array([item.embedding for item in response.data], dtype=np.float32)
        assert vectors.shape == expected.vectors.shape
        assert cosines(vectors, expected.vectors).min() >= 0.99999
    assert cosines(raw_vectors, expected.vectors).min() >= 0.99999
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == expected.tokens
    assert as_float.model == MODEL and as_float.object == "list"
    one = client.embeddings.create(input=TEXTS[1], model=MODEL, encoding_format="float")
    assert len(one.data) == 1 and cosines(np.array([one.data[0].embedding]), expected.vectors[1:2])[0] >= 0.99999


def test_models_and_health(server):
    models = sdk(server).models.list()
    [model] = models.data
    assert model.id == MODEL
    extra = model.model_extra
    assert extra["dim"] == 32 and extra["matryoshka_dims"] == [] and extra["limits"]["max_texts_per_request"] == 16
    assert http(server, "/health")[0::2] == (200, {"status": "serving"})


def test_rerank_agrees_with_score(server):
    query, documents = "how to boil an egg", ["bake the bread", "boil the eggs in water", "coffee", "eggs"]
    with EmbedClient(server.target, timeout=30) as grpc_client:
        scored = grpc_client.score(query, documents, top_k=3)
    status, headers, body = http(server, "/v1/rerank", json.dumps(
        {"query": query, "documents": [documents[0], {"text": documents[1]}, *documents[2:]], "top_n": 3,
         "return_documents": True}).encode())
    assert status == 200
    assert [r["index"] for r in body["results"]] == scored.top_indices
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]],
                               scored.scores[scored.top_indices], atol=1e-6)
    assert [r["document"]["text"] for r in body["results"]] == [documents[i] for i in scored.top_indices]
    assert body["usage"]["total_tokens"] == scored.tokens
    assert "inference;dur=" in headers["Server-Timing"]


@pytest.mark.parametrize("kwargs, message, param", [
    ({"input": ["fine", ""]}, "input[1] is empty", "input"),
    ({"input": []}, "input is empty", "input"),
    ({"input": [[1, 2, 3]]}, "token arrays are not supported", "input"),
    ({"input": ["a"] * 17}, "the limit is 16 per request", "input"),
    ({"input": ["a" * 3001]}, "input[0] has 3001 characters", "input"),
    ({"input": "a", "dimensions": 8}, "not trained for truncated vectors", "dimensions"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format must be", "encoding_format"),
])
def test_bad_input_is_bad_request_naming_the_item(server, kwargs, message, param):
    with pytest.raises(openai.BadRequestError) as info:
        sdk(server).embeddings.create(model=MODEL, **kwargs)
    assert message in info.value.message
    assert info.value.body["param"] == param and info.value.body["type"] == "invalid_request_error"


def test_wrong_model_body_and_route(server):
    with pytest.raises(openai.NotFoundError) as info:
        sdk(server).embeddings.create(model="text-embedding-3-small", input="a")
    assert f"serves {MODEL!r}" in info.value.message and info.value.code == "model_not_found"
    status, headers, body = http(server, "/v1/embeddings", b"{not json", {"X-Request-Id": "req-7"})
    assert status == 400 and "not valid JSON" in body["error"]["message"] and headers["X-Request-Id"] == "req-7"
    assert http(server, "/v1/embeddings", b"[1, 2]")[2]["error"]["message"] == "request body must be a JSON object"
    status, _, body = http(server, "/v1/embeddings", json.dumps({"input": ["x" * 70_000]}).encode())
    assert status == 413 and "limit is 65536 bytes" in body["error"]["message"]
    assert http(server, "/v1/nothing")[0] == 404 and "error" in http(server, "/v1/nothing")[2]
    assert sdk(server).embeddings.create(model=MODEL, input="still serving").data  # no bad call hurt it


def test_dimensions_truncate_and_renormalise(matryoshka_embedder):
    with ServerThread(matryoshka_embedder, http_port=0) as running:
        with EmbedClient(running.target, timeout=30) as grpc_client:
            full = grpc_client.embed(TEXTS).vectors
            info = grpc_client.info()
            short = grpc_client.embed(TEXTS, dimensions=8).vectors
        assert info.matryoshka_dims == (8, 16, 32) and not info.any_dimensions
        prefix = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
        np.testing.assert_allclose(short, prefix, atol=1e-6)
        response = sdk(running).embeddings.create(input=TEXTS, model=MODEL, dimensions=8, encoding_format="float")
        vectors = np.array([item.embedding for item in response.data], dtype=np.float32)
        assert vectors.shape == (3, 8) and cosines(vectors, prefix).min() >= 0.99999
        assert sdk(running).models.list().data[0].model_extra["matryoshka_dims"] == [8, 16, 32]
        for bad in (0, 33):
            with pytest.raises(openai.BadRequestError, match="out of range: 1 to 32"):
                sdk(running).embeddings.create(input="a", model=MODEL, dimensions=bad)


def test_allow_any_dimensions(embedder):
    with ServerThread(embedder, http_port=0, allow_any_dimensions=True) as running:
        response = sdk(running).embeddings.create(input=TEXTS, model=MODEL, dimensions=5)
        vectors = np.array([item.embedding for item in response.data])
        assert vectors.shape == (3, 5) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert sdk(running).models.list().data[0].model_extra["any_dimensions"] is True


def test_api_key_is_required_over_http(embedder):
    with ServerThread(embedder, http_port=0, api_key="s3cret") as running:
        with pytest.raises(openai.AuthenticationError) as info:
            sdk(running, api_key="wrong").embeddings.create(input="a", model=MODEL)
        assert info.value.code == "invalid_api_key"
        assert sdk(running, api_key="s3cret").embeddings.create(input="a", model=MODEL).data
        assert http(running, "/health")[0] == 200  # probes need no key


def test_full_queue_is_rate_limited_with_retry_after(embedder):
    hooked = HookedEmbedder(embedder, delay_s=0.05)
    with ServerThread(hooked, http_port=0, max_queue_tokens=200) as running:
        async def flood():
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{running.server.http.port}/v1",
                                        api_key="none", max_retries=0, timeout=30)
            async with client:
                texts = [f"egg water salt number {i} " * 3 for i in range(40)]
                return await asyncio.gather(*(client.embeddings.create(input=[t] * 4, model=MODEL)
                                              for t in texts), return_exceptions=True)

        outcomes = asyncio.run(flood())
        limited = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
        assert limited and len(limited) < len(outcomes)
        assert all(not isinstance(o, Exception) for o in outcomes if not isinstance(o, openai.RateLimitError))
        assert limited[0].response.headers["Retry-After"] == "1" and "queue full" in limited[0].message


def test_http_bodies_count_against_the_byte_budget(embedder):
    """A body larger than --max-pending-bytes could ever hold is too large (413), as over --max-request-bytes;
    bodies that are refused or answered give their bytes back."""
    with ServerThread(embedder, http_port=0, max_pending_bytes=2000) as running:
        small = json.dumps({"input": ["tea"], "model": MODEL}).encode()
        large = json.dumps({"input": ["egg water " * 30] * 8, "model": MODEL}).encode()
        bad = b"{" + b" " * 1500
        assert http(running, "/v1/embeddings", large)[0] == 413
        assert http(running, "/v1/embeddings", bad)[0] == 400
        assert http(running, "/v1/embeddings", small)[0] == 200
        assert running.server.core.admission.budget.taken == 0


def test_a_stalled_http_body_is_dropped_and_holds_no_one_up(embedder):
    """Connections that send headers and part of a body, more of them than there used to be read slots, neither
    refuse nor slow the calls beside them; each gets 408 after the body timeout and gives back what it held."""
    with ServerThread(embedder, http_port=0, body_timeout_s=1.0) as running:
        stalled = []
        for _ in range(3):
            connection = socket.create_connection(("127.0.0.1", running.server.http.port), timeout=10)
            connection.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                               b"\r\nContent-Length: 100\r\n\r\n{\"input\": ")
            stalled.append(connection)
        time.sleep(0.3)
        answers = [sdk(running).embeddings.create(input=f"tea {i}", model=MODEL) for i in range(5)]  # each sent once
        replies = [connection.recv(4096) for connection in stalled]
        for connection in stalled:
            connection.close()
        assert running.server.core.admission.budget.taken == 0
    assert all(len(answer.data) == 1 for answer in answers)
    assert all(reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply for reply in replies)


def test_a_client_that_leaves_mid_body_is_dropped_quietly(embedder, caplog):
    """Closing the connection halfway through a body is the client's choice, not a server error: nothing is
    logged as a failure and the bytes it held go back."""
    with ServerThread(embedder, http_port=0) as running:
        connection = socket.create_connection(("127.0.0.1", running.server.http.port), timeout=10)
        connection.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                           b"\r\nContent-Length: 100\r\n\r\n{\"input\": ")
        time.sleep(0.3)
        connection.close()
        time.sleep(0.3)
        assert running.server.core.admission.budget.taken == 0
        assert sdk(running).embeddings.create(input="tea", model=MODEL).data
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


@pytest.mark.parametrize("body, message", [
    (b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nests JSON too deeply"),
    (b'{"input": ["fine", "\\ud800"]}', "input[1] holds a lone surrogate"),
])
def test_nested_json_and_lone_surrogates_are_bad_requests(server, body, message):
    status, _, answer = http(server, "/v1/embeddings", body)
    assert status == 400 and message in answer["error"]["message"]


def test_request_ids_are_sanitised_and_metrics_need_the_key(embedder):
    with ServerThread(embedder, http_port=0, api_key="s3cret") as running:
        key = {"Authorization": "Bearer s3cret"}
        _, headers, _ = http(running, "/v1/models", headers={**key, "X-Request-Id": "a b=\"forged\" " + "x" * 100})
        assert headers["X-Request-Id"] == "a_b__forged__" + "x" * 51
        metrics = f"http://127.0.0.1:{running.server.http.port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(metrics, timeout=5)
        assert refused.value.code == 401
        opened = urllib.request.urlopen(urllib.request.Request(metrics, headers=key), timeout=5)
        assert b"embedforge_requests_total" in opened.read()


def test_loading_then_serving_then_draining(embedder):
    def slow_load():
        time.sleep(0.5)
        return embedder

    with ServerThread(None, make_embedder=slow_load, http_port=0) as running:
        status, _, body = http(running, "/health")
        embed_status, _, error = http(running, "/v1/embeddings", json.dumps({"input": "a"}).encode())
        running.loading.result(30)
        assert (status, body) == (503, {"status": "loading"})
        assert embed_status == 503 and "loading" in error["error"]["message"]
        assert http(running, "/health")[0] == 200
        running.server.core.draining = True
        assert http(running, "/health")[0::2] == (503, {"status": "draining"})
        running.server.core.draining = False


def test_metrics_carry_the_protocol(server):
    sdk(server).embeddings.create(input="metric", model=MODEL)
    with EmbedClient(server.target, timeout=30) as grpc_client:
        grpc_client.embed(["metric"])
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.http.port}/metrics", timeout=5).read().decode()
    assert 'embedforge_requests_total{code="OK",protocol="http",rpc="Embed"}' in text
    assert 'embedforge_requests_total{code="OK",protocol="grpc",rpc="Embed"}' in text
    assert http(server, "/v1/embeddings", json.dumps({"input": ""}).encode())[0] == 400
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.http.port}/metrics", timeout=5).read().decode()
    assert 'embedforge_requests_total{code="INVALID_ARGUMENT",protocol="http",rpc="Embed"}' in text


def test_tls_over_https(embedder, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with ServerThread(embedder, http_port=0, tls_cert=cert, tls_key=key) as running:
        trusted = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=cert))
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{running.server.http.port}/v1", api_key="none",
                               max_retries=0, http_client=trusted)
        assert len(client.embeddings.create(input=TEXTS, model=MODEL).data) == 3
        with pytest.raises(openai.APIConnectionError):  # plain HTTP is not served on a TLS port
            openai.OpenAI(base_url=f"http://127.0.0.1:{running.server.http.port}/v1", api_key="none",
                          max_retries=0, timeout=5).embeddings.create(input="a", model=MODEL)


def test_loadtest_drives_the_http_api(server, tmp_path):
    output = tmp_path / "http.json"
    target = f"http://127.0.0.1:{server.server.http.port}"
    result = CliRunner().invoke(loadtest_command, ["--target", target, "--concurrency", "4", "--batch", "1-4",
                                                   "--requests", "40", "--warmup", "0", "--output", str(output)])
    assert result.exit_code == 0, result.output
    report = json.loads(output.read_text())
    assert report["ok"] == 40 and not report["errors"]
    assert report["config"]["server"]["dim"] == 32 and report["config"]["protocol"] == "http"
    assert report["server_ms"]["inference"] > 0
    scored = CliRunner().invoke(loadtest_command, ["--target", target, "--rpc", "score", "--batch", "3",
                                                   "--requests", "5", "--warmup", "0"])
    assert scored.exit_code == 0, scored.output


@pytest.mark.slow
def test_serve_cli_http_port_drains_in_flight_call_on_sigterm(tiny_export_dir):
    http_port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "embedforge", "serve", "--model-dir", str(tiny_export_dir),
                                "--port", "0", "--http-port", str(http_port), "--threads", "1", "--grace-s", "20"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{http_port}"
    try:
        for _ in range(300):
            assert process.poll() is None, process.communicate()[1]
            try:
                if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        body = json.dumps({"input": ["egg " * 500] * 300, "encoding_format": "base64"}).encode()
        request = urllib.request.Request(url + "/v1/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})

        def call() -> tuple[dict, float]:
            reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
            return reply, time.monotonic()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(call)
            time.sleep(0.3)  # 300 texts of 500 tokens on one thread: still computing at SIGTERM
            process.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            reply, finished_at = in_flight.result()
        assert len(reply["data"]) == 300 and finished_at > sent_at
        assert process.wait(30) == 0
        assert "event=stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
