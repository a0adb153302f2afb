"""Integration tests: a real gRPC server on a free 127.0.0.1 port serving the tiny model's fp32 ONNX export."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    HookedEmbedder,
    ServerThread,
    assert_same_vectors,
    free_port,
    make_texts,
    pytorch_unnormalized,
)

from embedforge.client import AsyncEmbedClient, EmbedClient
from embedforge.server.cli import embed_command, serve_command
from embedforge.server.config import ServeConfig
from embedforge.server.embedder import ModelInfo, Tokenized
from embedforge.server.runtime import OnnxEmbedder, RuntimeConfigError

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture(scope="module")
def server(embedder):
    with ServerThread(embedder, max_texts_per_request=64, max_chars_per_text=3000, metrics_port=0) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with EmbedClient(server.target, timeout=30) as c:
        yield c


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# ---- correctness ----

def test_embed_matches_pytorch_model(client, tiny_model_dir):
    from embedforge.model import BertVectorModel

    texts = make_texts(20, seed=1) + ["egg " * 600]  # the last one is truncated at max_length
    result = client.embed(texts)
    reference = BertVectorModel.from_pretrained(tiny_model_dir).encode(texts)
    assert result.vectors.shape == reference.shape and result.vectors.dtype == np.float32
    cosine = np.sum(result.vectors * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert result.tokens == sum(min(len(t.split()), 510) + 2 for t in texts)
    assert result.timing.total_ms > 0 and result.timing.inference_ms > 0


def test_normalize_false_returns_the_unnormalized_pytorch_vector(client, tiny_model_dir):
    from embedforge.model import BertVectorModel

    texts = make_texts(12, seed=5)
    model = BertVectorModel.from_pretrained(tiny_model_dir)
    raw = client.embed(texts, normalize=False).vectors
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-2)
    assert_same_vectors(raw, pytorch_unnormalized(model, texts))
    normalised = client.embed(texts).vectors
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-5)
    assert np.einsum("ij,ij->i", normalised, model.encode(texts)).min() >= 0.9999


def test_serving_an_unchecked_precision_logs_a_warning(tiny_export_dir, tmp_path, caplog):
    export = shutil.copytree(tiny_export_dir, tmp_path / "export")
    OnnxEmbedder(export, precision="fp32", threads=1)
    assert "unchecked_precision" not in caplog.text
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["models"]["fp32"]["parity"] = {"skipped": "no CUDA here", "checked": False, "min_cosine_floor": 0.99}
    (export / "manifest.json").write_text(json.dumps(manifest))
    OnnxEmbedder(export, precision="fp32", threads=1)
    assert "event=unchecked_precision precision=fp32" in caplog.text and "no CUDA here" in caplog.text


def test_old_export_without_unnormalized_output_refuses_normalize_false(tiny_export_dir, client, tmp_path):
    old_export = shutil.copytree(tiny_export_dir, tmp_path / "old_export")
    manifest = json.loads((old_export / "manifest.json").read_text())
    del manifest["unnormalized_output"]  # as written before the graph had that output
    (old_export / "manifest.json").write_text(json.dumps(manifest))
    old = OnnxEmbedder(old_export, threads=1)
    assert not old.info.unnormalized
    texts = make_texts(6, seed=6)
    with ServerThread(old) as running, EmbedClient(running.target, timeout=10) as c:
        error = rpc_error(c.embed, texts, normalize=False)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "this export has no unnormalized output; re-export with `embedforge export`" in error.details()
        np.testing.assert_allclose(c.embed(texts).vectors, client.embed(texts).vectors, atol=1e-5)
        query, docs = texts[0], texts[1:]
        np.testing.assert_allclose(c.score(query, docs).scores, client.score(query, docs).scores, atol=1e-5)


def test_score_is_cosine_of_embed(client):
    query, docs = "how to boil an egg", make_texts(12, seed=2)
    vectors = client.embed([query, *docs]).vectors
    expected = vectors[1:] @ vectors[0]
    result = client.score(query, docs, top_k=5)
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)
    assert result.top_indices == list(np.argsort(-expected, kind="stable")[:5])
    assert client.score(query, docs).top_indices == []


def test_order_preserved_under_many_concurrent_mixed_calls(server, client):
    pool = make_texts(60, seed=3, max_words=120)
    single = {t: client.embed([t]).vectors[0] for t in pool}
    rng = np.random.default_rng(4)
    calls = [list(rng.choice(pool, size=int(rng.integers(1, 9)))) for _ in range(300)]

    async def fire():
        async with AsyncEmbedClient(server.target, timeout=60) as aclient:
            return await asyncio.gather(*(aclient.embed(texts) for texts in calls))

    results = asyncio.run(fire())
    for texts, result in zip(calls, results, strict=True):
        expected = np.stack([single[t] for t in texts])
        np.testing.assert_allclose(result.vectors, expected, atol=1e-5)


def test_info_health_and_reflection(server, client):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    info = client.info()
    assert (info.dim, info.max_length, info.precision, info.pooling) == (32, 512, "fp32", "mean")
    assert info.provider == "CPUExecutionProvider" and info.max_texts_per_request == 64
    assert client.health() == "SERVING" and client.health("embedforge.v1.EmbeddingService") == "SERVING"
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"embedforge.v1.EmbeddingService", "grpc.health.v1.Health"} <= services


def test_metrics_endpoint(server, client):
    client.embed(["hot tea"])
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read()
    text = body.decode()
    assert 'embedforge_requests_total{code="OK",protocol="grpc",rpc="Embed"}' in text
    for name in ("embedforge_batch_size_bucket", "embedforge_batch_tokens_bucket", "embedforge_queue_tokens",
                 'embedforge_stage_seconds_count{stage="tokenize"}', "embedforge_request_seconds_bucket"):
        assert name in text


# ---- bad input ----

@pytest.mark.parametrize(("call", "message"), [
    (lambda c: c.embed([]), "texts is empty"),
    (lambda c: c.embed(["ok", "fine", ""]), "texts[2] is empty"),
    (lambda c: c.embed(["egg"] * 65), "texts has more than 64 items; the limit is 64"),
    (lambda c: c.embed(["egg", "x" * 3001]), "texts[1] has 3001 characters"),
    (lambda c: c.embed(["egg", "ok", "egg " * 600], truncate=False),
     "texts[2] has 602 tokens, more than max_length=512"),
    (lambda c: c.score("", ["doc"]), "query is empty"),
    (lambda c: c.score("query", []), "documents is empty"),
    (lambda c: c.score("query", ["doc", ""]), "documents[1] is empty"),
    (lambda c: c.score("query", ["doc", "egg " * 600], truncate=False), "documents[1] has 602 tokens, more than"),
    (lambda c: c.embed(["a"], dimensions=8), "not trained for truncated vectors"),
])
def test_bad_input_is_invalid_argument_naming_the_item(client, call, message):
    error = rpc_error(call, client)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


# ---- load, deadlines, failures ----

def test_flood_gets_resource_exhausted_and_server_stays_healthy(embedder):
    hooked = HookedEmbedder(embedder, delay_s=0.05)
    with ServerThread(hooked, max_queue_tokens=200) as running:
        async def flood():
            async with AsyncEmbedClient(running.target, timeout=30) as aclient:
                return await asyncio.gather(*(aclient.embed(make_texts(4, seed=i)) for i in range(60)),
                                            return_exceptions=True)

        outcomes = asyncio.run(flood())
        codes = [o.code() if isinstance(o, grpc.RpcError) else grpc.StatusCode.OK for o in outcomes]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        with EmbedClient(running.target, timeout=10) as c:
            assert c.health() == "SERVING"
            assert c.embed(["still fine"]).vectors.shape == (1, 32)
            too_big = rpc_error(c.embed, ["egg " * 100] * 3)  # 306 tokens can never fit a 200-token queue
            assert too_big.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "more than one request may queue" in too_big.details()


def test_deadline_expired_call_is_never_computed(embedder):
    hooked = HookedEmbedder(embedder, delay_s=0.5)
    late_text = "garlic sauce with butter"
    late_ids = tuple(embedder.tokenize([late_text]).ids[0])
    with ServerThread(hooked, max_wait_ms=0) as running:
        async def scenario():
            async with AsyncEmbedClient(running.target) as aclient:
                busy = asyncio.ensure_future(aclient.embed(["the kitchen"], deadline_s=30))
                await asyncio.sleep(0.1)  # the slow batch is running now
                with pytest.raises(grpc.RpcError) as late:
                    await aclient.embed([late_text], deadline_s=0.1)
                await busy
                await asyncio.sleep(0.6)  # a batch started after the deadline would be done by now
                return late.value

        error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert late_ids not in hooked.computed
    assert len(hooked.computed) >= 1


def test_failing_batch_fails_only_its_call_with_request_id(embedder, caplog):
    marker = "sugar sugar sugar sugar sugar"
    hooked = HookedEmbedder(embedder, fail_marker=marker)
    with ServerThread(hooked) as running, EmbedClient(running.target, timeout=10) as c:
        error = rpc_error(c.embed, ["hot tea", marker])
        assert error.code() == grpc.StatusCode.INTERNAL
        request_id = error.details().split("request id ")[1].rstrip(")")
        assert f"request_ids={request_id}" in caplog.text
        assert c.embed(["hot tea"]).vectors.shape == (1, 32)


def test_unset_normalize_defaults_true_and_false_passes_raw_vectors():
    class Raw:
        info = ModelInfo("raw", 2, 8, "mean", "fp32", "test")

        def tokenize(self, texts):
            return Tokenized([len(t) for t in texts], [1] * len(texts), [])

        def run_batch(self, batch, alone=True):
            return np.array([[float(n), 0.0] for n in batch], dtype=np.float32)

        def release_memory(self):
            pass

    with ServerThread(Raw()) as running, EmbedClient(running.target, timeout=10) as c:
        np.testing.assert_allclose(c.embed(["abc"]).vectors, [[1.0, 0.0]])
        np.testing.assert_allclose(c.embed(["abc"], normalize=False).vectors, [[3.0, 0.0]])


# ---- security ----

def test_api_key_required_except_for_health(embedder):
    with ServerThread(embedder, api_key="s3cret") as running:
        with EmbedClient(running.target, timeout=10) as anonymous:
            assert rpc_error(anonymous.embed, ["egg"]).code() == grpc.StatusCode.UNAUTHENTICATED
            assert rpc_error(anonymous.info).code() == grpc.StatusCode.UNAUTHENTICATED
            assert anonymous.health() == "SERVING"
        with EmbedClient(running.target, timeout=10, api_key="wrong") as wrong:
            assert rpc_error(wrong.embed, ["egg"]).code() == grpc.StatusCode.UNAUTHENTICATED
        with EmbedClient(running.target, timeout=10, api_key="s3cret") as good:
            assert good.embed(["egg"]).vectors.shape == (1, 32)
        with grpc.insecure_channel(running.target) as channel:  # the x-api-key spelling works too
            from embedforge._proto import embedding_pb2, embedding_pb2_grpc

            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            assert stub.Info(embedding_pb2.InfoRequest(), metadata=(("x-api-key", "s3cret"),), timeout=10).dim == 32


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(embedder, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with ServerThread(embedder, tls_cert=cert, tls_key=key) as running:
        with EmbedClient(running.target, timeout=10, tls_root_cert=cert) as secure:
            assert secure.embed(["egg"]).vectors.shape == (1, 32)
        with EmbedClient(running.target, timeout=3) as plain:
            assert rpc_error(plain.embed, ["egg"]).code() == grpc.StatusCode.UNAVAILABLE


# ---- lifecycle ----

def test_drain_finishes_in_flight_refuses_new_and_reports_not_serving(embedder):
    hooked = HookedEmbedder(embedder, delay_s=0.4)
    running = ServerThread(hooked).__enter__()
    try:
        with EmbedClient(running.target, timeout=10) as c:
            in_flight = c._stub.Embed.future(_request(["hot soup"]), timeout=10)
            time.sleep(0.1)
            drain = asyncio.run_coroutine_threadsafe(running.server.drain(5), running.loop)
            time.sleep(0.05)
            assert running.call(running.server.health.Check(_health_request(), None)).status == 2  # NOT_SERVING
            assert rpc_error(c.embed, ["new call"]).code() == grpc.StatusCode.UNAVAILABLE
            response = in_flight.result()
            assert response.count == 1
            drain.result(10)
    finally:
        running.stop_loop()


def test_port_opens_before_the_model_loads(embedder):
    loaded = threading.Event()
    release = threading.Event()

    def slow_load():
        release.wait(30)
        loaded.set()
        return embedder

    with ServerThread(None, make_embedder=slow_load) as running, EmbedClient(running.target, timeout=10) as c:
        try:
            assert c.health() == "NOT_SERVING" and c.health("embedforge.v1.EmbeddingService") == "NOT_SERVING"
            for call in (lambda: c.embed(["egg"]), lambda: c.score("egg", ["hot water"]), c.info):
                error = rpc_error(call)
                assert error.code() == grpc.StatusCode.UNAVAILABLE and "model is loading" in error.details()
            assert not loaded.is_set()
        finally:
            release.set()
        running.loading.result(30)
        assert c.health() == "SERVING"
        assert c.embed(["egg"]).vectors.shape == (1, 32) and c.info().dim == 32


def _request(texts):
    from embedforge.client import build_embed_request

    return build_embed_request(texts)


def _health_request():
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest(service="")


def _wait_health(target: str, process: subprocess.Popen, status: str = "SERVING", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with EmbedClient(target, timeout=1) as c:
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1]
            try:
                if c.health() == status:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"server did not report {status}")


def _wait_until_closed(target: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with EmbedClient(target, timeout=1) as c:
        while time.monotonic() < deadline:
            try:
                c.health()
            except grpc.RpcError:
                return
            time.sleep(0.1)
    raise AssertionError(f"{target} still answers")


@pytest.mark.slow
def test_sigterm_drains_in_flight_call_and_exits_zero(tiny_export_dir):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "embedforge", "serve", "--model-dir", str(tiny_export_dir),
                                "--port", str(port), "--threads", "1", "--grace-s", "20"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        target = f"127.0.0.1:{port}"
        _wait_health(target, process)
        with EmbedClient(target, timeout=60) as c:
            big = ["egg " * 500] * 300  # takes a while with one thread, so it is still in flight at SIGTERM
            in_flight = c._stub.Embed.future(_request(big), timeout=60)
            time.sleep(0.3)
            assert not in_flight.done(), "the call ended before SIGTERM: nothing was in flight to drain"
            process.send_signal(signal.SIGTERM)
            response = in_flight.result()
        assert response.count == 300
        assert process.wait(30) == 0
        stderr = process.stderr.read()
        assert "event=draining" in stderr and "event=stopped" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_sigterm_while_the_model_loads_exits_zero(tiny_export_dir):
    port = free_port()
    script = textwrap.dedent(f"""
        import logging, sys
        from embedforge.server.app import run_server
        from embedforge.server.config import ServeConfig
        from embedforge.server.runtime import OnnxEmbedder

        def slow_load():
            sys.stdin.readline()  # loading lasts until the test writes a line
            return OnnxEmbedder({str(tiny_export_dir)!r}, threads=1)

        logging.basicConfig(level="INFO", stream=sys.stderr)
        run_server(slow_load, ServeConfig(port={port}))
        print("returned")
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_health(f"127.0.0.1:{port}", process, "NOT_SERVING")
        process.send_signal(signal.SIGTERM)
        _wait_until_closed(f"127.0.0.1:{port}")  # drained while the model is still loading
        stdout, stderr = process.communicate("go\n", timeout=30)
        assert process.returncode == 0, stderr
        assert stdout.strip() == "returned"
        events = [line.split("event=")[1].split()[0] for line in stderr.splitlines() if "event=" in line]
        assert events == ["listening", "loading", "draining", "stopped", "load_discarded"], stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_cli_reports_a_failed_model_load(tiny_export_dir):
    result = CliRunner().invoke(serve_command, ["--model-dir", str(tiny_export_dir), "--port", "0",
                                                "--precision", "int8"])
    assert result.exit_code == 1, result.output
    assert "precision 'int8' was not exported" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_serving_path_never_imports_torch(tiny_export_dir):
    script = textwrap.dedent(f"""
        import asyncio, sys
        import embedforge.client, embedforge.server.app, embedforge.server.batcher, embedforge.server.cli
        import embedforge.server.runtime, embedforge.server.service, embedforge.cli
        from embedforge.server.app import EmbeddingServer
        from embedforge.server.config import ServeConfig
        from embedforge.server.runtime import OnnxEmbedder
        from embedforge.client import AsyncEmbedClient

        async def main():
            server = EmbeddingServer(OnnxEmbedder({str(tiny_export_dir)!r}, threads=1), ServeConfig(port=0))
            port = await server.start()
            async with AsyncEmbedClient(f"127.0.0.1:{{port}}") as client:
                result = await client.embed(["hot water", "egg"])
                assert result.vectors.shape == (2, 32)
            await server.drain(0)

        asyncio.run(main())
        heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        assert not heavy, heavy
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# ---- runtime and command line ----

def test_runtime_config_errors(tiny_export_dir, tmp_path):
    with pytest.raises(RuntimeConfigError, match="precision 'int8' was not exported"):
        OnnxEmbedder(tiny_export_dir, precision="int8")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(RuntimeConfigError, match="CUDAExecutionProvider is not available"):
            OnnxEmbedder(tiny_export_dir, provider="cuda")
        assert OnnxEmbedder(tiny_export_dir, provider="auto", threads=1).info.provider == "CPUExecutionProvider"
    with pytest.raises(RuntimeConfigError, match="manifest.json: not found"):
        OnnxEmbedder(tmp_path)


def export_with_model_file(tiny_export_dir: Path, tmp_path: Path, value: str, unpadded: bool = False) -> Path:
    """A copy of the export whose manifest names `value` as the fp32 (or unpadded fp32) graph's file."""
    export = shutil.copytree(tiny_export_dir, tmp_path / "export")
    manifest = json.loads((export / "manifest.json").read_text())
    entry = manifest["models"]["fp32"]["unpadded"] if unpadded else manifest["models"]["fp32"]
    shutil.copyfile(export / entry["file"], tmp_path / "x.onnx")  # a real graph waits outside the export
    entry["file"] = value
    (export / "manifest.json").write_text(json.dumps(manifest))
    return export


@pytest.mark.parametrize("unpadded", [False, True], ids=["model", "unpadded"])
@pytest.mark.parametrize("value", ["../x.onnx", "ABSOLUTE"])
def test_a_manifest_naming_a_model_file_outside_the_export_is_refused(tiny_export_dir, tmp_path, value, unpadded):
    value = str(tmp_path / "x.onnx") if value == "ABSOLUTE" else value
    export = export_with_model_file(tiny_export_dir, tmp_path, value, unpadded)
    field = "models.fp32.unpadded.file" if unpadded else "models.fp32.file"
    with pytest.raises(RuntimeConfigError) as info:
        OnnxEmbedder(export, provider="cpu", threads=1)
    assert str(info.value).startswith(f"{export / 'manifest.json'}: field {field!r} must be a plain file name")
    assert repr(value) in str(info.value)
    result = CliRunner().invoke(serve_command, ["--model-dir", str(export), "--port", "0", "--provider", "cpu"])
    assert result.exit_code == 1, result.output
    assert f"field {field!r} must be a plain file name" in result.output and "Traceback" not in result.output


def test_serve_config_resolves_automatic_settings_per_provider():
    cpu = ServeConfig().resolved(on_cuda=False, cores=8)
    assert (cpu.workers, cpu.threads, cpu.min_batch_tokens, cpu.max_queue_tokens) == (4, 8, 128, 32 * 4096)
    assert cpu.max_batch_tokens == 4096 and ServeConfig().resolved(on_cuda=True).max_batch_tokens == 16384
    cuda = ServeConfig(max_batch_tokens=1000).resolved(on_cuda=True, cores=8)
    assert (cuda.workers, cuda.threads, cuda.min_batch_tokens, cuda.max_queue_tokens) == (1, 8, 256, 32000)
    assert ServeConfig().resolved(on_cuda=False, cores=2).workers == 2
    given = ServeConfig(threads=3, workers=5, min_batch_tokens=7, max_queue_tokens=9).resolved(on_cuda=False)
    assert (given.workers, given.threads, given.min_batch_tokens, given.max_queue_tokens) == (5, 3, 7, 9)
    # one body limit for both protocols, and a byte budget of 64 of the largest bodies
    assert cpu.max_receive_bytes == 4 * 1024 * 1024 and cpu.max_pending_bytes == 64 * cpu.max_receive_bytes


def test_serve_cli_hands_the_server_its_options_and_resolved_defaults(tiny_export_dir, monkeypatch):
    import embedforge.server.app

    handed = []
    monkeypatch.setattr(embedforge.server.app, "run_server", lambda make_embedder, config: handed.append(config))
    monkeypatch.setenv("TEST_SERVE_KEY", "k3y")
    result = CliRunner().invoke(serve_command, ["--model-dir", str(tiny_export_dir), "--provider", "cpu",
                                                "--max_batch_tokens", "4096", "--workers", "3",
                                                "--max_texts_per_request", "7", "--api_key_env", "TEST_SERVE_KEY"])
    assert result.exit_code == 0, result.output
    config = handed[0]
    assert (config.max_batch_tokens, config.workers, config.max_texts_per_request) == (4096, 3, 7)
    assert (config.min_batch_tokens, config.max_queue_tokens) == (128, 4 * (7 + 1) * 512)  # CPU defaults
    assert config.max_receive_bytes == 8 * (20000 * 4 + 16) + 1024
    assert config.max_pending_bytes == 64 * config.max_receive_bytes
    assert config.threads == (os.cpu_count() or 1) and config.api_key == "k3y"
    assert (config.port, config.max_wait_ms, config.grace_s) == (50051, 2.0, 10.0)


def test_serve_cli_explains_missing_export(tmp_path):
    result = CliRunner().invoke(serve_command, ["--save-path", str(tmp_path)])
    assert result.exit_code != 0 and "embedforge export" in result.output
    result = CliRunner().invoke(serve_command, ["--model_dir", str(tmp_path)])
    assert result.exit_code != 0 and "no manifest.json" in result.output
    result = CliRunner().invoke(serve_command, [])
    assert result.exit_code != 0 and "--model-dir" in result.output


def test_embed_cli(server):
    result = CliRunner().invoke(embed_command, ["--target", server.target, "hot water", "egg"])
    assert result.exit_code == 0, result.output
    rows = [np.array(line.split(), dtype=np.float32) for line in result.stdout.strip().splitlines()]
    assert len(rows) == 2 and rows[0].shape == (32,)
    space = server.server.embedder.info.embedding_space
    assert len(space) == 16 and f"embedding_space {space}" in result.stderr
    result = CliRunner().invoke(embed_command, ["--target", server.target, "--json", "egg"])
    assert '"dim": 32' in result.output and json.loads(result.stdout)["embedding_space"] == space
    result = CliRunner().invoke(embed_command, ["--target", server.target, ""])
    assert result.exit_code != 0 and "INVALID_ARGUMENT" in result.output
    result = CliRunner().invoke(embed_command, ["--target", server.target, "--wait-ready", "5", "egg"])
    assert result.exit_code == 0, result.output


def test_embed_cli_wait_ready_gives_up_on_a_missing_server():
    nothing_listens = "127.0.0.1:1"
    result = CliRunner().invoke(embed_command, ["--target", nothing_listens, "--wait-ready", "0.5",
                                                "--timeout", "0.2", "egg"])
    assert result.exit_code != 0 and "UNAVAILABLE" in result.output


def test_overlapping_batches_use_the_narrow_session_with_equal_results(tiny_export_dir):
    from concurrent.futures import ThreadPoolExecutor

    adaptive = OnnxEmbedder(tiny_export_dir, threads=2, workers=2)
    assert adaptive.session is not adaptive._shared_session
    batches = [adaptive.tokenize(make_texts(16, seed=i)).ids for i in range(8)]
    alone = [adaptive.run_batch(b) for b in batches]
    calls = {"wide": 0, "narrow": 0}

    def counting(name, run, delay):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            time.sleep(delay)  # keeps the wide run going while the others start
            return run(*args, **kwargs)
        return wrapped

    adaptive.session.run = counting("wide", adaptive.session.run, 0.2)
    adaptive._shared_session.run = counting("narrow", adaptive._shared_session.run, 0.0)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(adaptive.run_batch, batches))
    assert calls["wide"] >= 1 and calls["narrow"] >= 1
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_batches_under_load_use_the_narrow_session_even_when_they_start_alone(tiny_export_dir):
    adaptive = OnnxEmbedder(tiny_export_dir, threads=2, workers=2)
    batch = adaptive.tokenize(make_texts(8, seed=0)).ids
    wide_vectors = adaptive.run_batch(batch, alone=True)
    calls = []

    def counting(name, run):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return run(*args, **kwargs)
        return wrapped

    adaptive.session.run = counting("wide", adaptive.session.run)
    adaptive._shared_session.run = counting("narrow", adaptive._shared_session.run)
    narrow_vectors = adaptive.run_batch(batch, alone=False)
    adaptive.run_batch(batch, alone=True)
    assert calls == ["narrow", "wide"]
    np.testing.assert_allclose(narrow_vectors, wide_vectors, atol=1e-5)


def test_long_unpadded_batches_use_the_unpadded_graph_with_equal_results(tiny_export_dir):
    embedder = OnnxEmbedder(tiny_export_dir, threads=1, unpadded_min_tokens=6)
    calls = {"padded": 0, "unpadded": 0}

    def counting(name, run):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return run(*args, **kwargs)
        return wrapped

    padded_session, unpadded_session = embedder.session, embedder._unpadded[0]
    padded_run = padded_session.run
    padded_session.run = counting("padded", padded_session.run)
    unpadded_session.run = counting("unpadded", unpadded_session.run)
    same_length = embedder.tokenize(["boil the eggs in hot water", "bake the bread in the oven"]).ids
    assert len(same_length[0]) == len(same_length[1]) >= 6
    vectors = embedder.run_batch(same_length)
    assert calls == {"padded": 0, "unpadded": 1}
    feeds = embedder._feeds(same_length)
    np.testing.assert_allclose(vectors, padded_run([embedder._output_name], feeds)[0], atol=1e-5)
    embedder.run_batch(embedder.tokenize(["tea", "boil the eggs in hot water"]).ids)  # padded: the usual graph
    embedder.run_batch(embedder.tokenize(["tea", "tea"]).ids)  # unpadded but short: the usual graph
    assert calls == {"padded": 2, "unpadded": 1}
