"""Replicas behind client-side load balancing, with real `embedforge serve` processes on 127.0.0.1.

The client (and so `embedforge loadtest`) spreads calls with gRPC round_robin and retries UNAVAILABLE /
RESOURCE_EXHAUSTED on another replica; each replica counts its own calls in its Prometheus metrics, which
is where the spread is read from. Every run is bounded (a few seconds) and every process is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from helpers import free_port
from prometheus_client.parser import text_string_to_metric_families

from embedforge._proto import embedding_pb2 as pb
from embedforge._proto import embedding_pb2_grpc as pb_grpc
from embedforge.client import RETRY_POLICY, SERVICE_NAME, EmbedClient, channel_target

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class Replica:
    """One `embedforge serve` process (1 thread) with its metrics port; `stop` kills it."""

    def __init__(self, export_dir: Path, log_dir: Path, *extra: str, port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port or free_port()
        self.metrics_port = free_port()
        self.log = log_dir / f"replica-{host}-{self.port}.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "embedforge", "serve", "--model-dir", str(export_dir), "--host", host,
                 "--port", str(self.port),
                 "--metrics-port", str(self.metrics_port), "--threads", "1", "--workers", "1", *extra],
                stdout=log, stderr=subprocess.STDOUT, env=ENV)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_serving(self, timeout_s: float = 60) -> None:
        give_up = time.monotonic() + timeout_s
        with EmbedClient(self.target, timeout=1) as client:
            while time.monotonic() < give_up:
                assert self.process.poll() is None, self.log.read_text()
                try:
                    if client.health() == "SERVING":
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"{self.target} not SERVING after {timeout_s} s:\n{self.log.read_text()}")

    def embed_calls(self) -> int:
        """Embed calls this replica answered OK, from its own request counter."""
        # metrics listen on loopback (serve --metrics-host default) whatever --host is
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return int(sum(sample.value for family in text_string_to_metric_families(body)
                       for sample in family.samples
                       if sample.name == "embedforge_requests_total"
                       and sample.labels == {"protocol": "grpc", "rpc": "Embed", "code": "OK"}))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture
def replicas(tiny_export_dir, tmp_path):
    """Start replicas with `start(n, *serve_flags)`; all of them are killed at the end."""
    started: list[Replica] = []

    def start(count: int, *extra: str, ports: list[int] | None = None, host: str = "127.0.0.1") -> list[Replica]:
        new = [Replica(tiny_export_dir, tmp_path, *extra, port=ports[i] if ports else None, host=host)
               for i in range(count)]
        started.extend(new)
        for replica in new:
            replica.wait_serving()
        return new

    yield start
    for replica in started:
        replica.stop()


def _loadtest(targets: str, out: Path, duration_s: float, concurrency: int = 6) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embedforge", "loadtest", "--target", targets, "--duration", str(duration_s),
         "--warmup", "0.5", "--concurrency", str(concurrency), "--batch", "1-4", "--tokens", "16",
         "--deadline-ms", "5000", "--output", str(out / "report.json"), "--plot", str(out / "report.png")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def _finish(process: subprocess.Popen, out: Path, timeout_s: float = 60) -> dict:
    output = process.communicate(timeout=timeout_s)[0]
    assert process.returncode == 0, output
    return json.loads((out / "report.json").read_text())


# ---- target forms (no server needed) ----

def test_target_forms_become_grpc_targets():
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("dns:///embedforge.default.svc:50051") == "dns:///embedforge.default.svc:50051"
    assert channel_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("localhost:7,127.0.0.1:7") == "ipv4:127.0.0.1:7"  # resolved, duplicates dropped
    for bad in ("127.0.0.1:1,", "127.0.0.1:1,nohost", "127.0.0.1:1,h:99999", ""):
        with pytest.raises(ValueError, match="target"):
            channel_target(bad)


@pytest.mark.slow
def test_loadtest_rejects_a_bad_target_list():
    result = subprocess.run([sys.executable, "-m", "embedforge", "loadtest", "--target", "127.0.0.1:1,oops"],
                            capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 2 and "'oops': expected HOST:PORT" in result.stderr


def test_report_timeline_counts_every_measured_call_in_its_step(tmp_path):
    from embedforge.loadtest import CallResult, LoadSpec, build_report, run_load
    from embedforge.loadtest.report import write_plot

    first_call: list[float] = []

    async def call(texts: list[str]) -> CallResult:
        first_call[:] = first_call or [time.perf_counter()]
        await asyncio.sleep(0.01)
        late = time.perf_counter() - first_call[0] > 0.8  # fails from 0.7 s after the warmup on
        return CallResult(ok=not late, code="UNAVAILABLE" if late else "OK", n_texts=len(texts))

    run = asyncio.run(run_load(call, lambda: ["a"], LoadSpec(concurrency=2, duration_s=1.2, warmup_s=0.1)))
    report = build_report({"target": "fake"}, [run], sweep=False)
    line = report["timeline"]
    assert sum(line["ok_per_s"]) * line["step_s"] == report["ok"] > 0
    assert sum(line["errors_per_s"]) * line["step_s"] == sum(report["errors"].values()) > 0
    assert line["ok_per_s"][0] > 0 and line["errors_per_s"][0] == 0 and line["ok_per_s"][-1] == 0
    write_plot(report, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 0


# ---- retries against fake servers that fail on purpose ----

class _Failing(pb_grpc.EmbeddingServiceServicer):
    """Answers every Embed with `code` (after `delay_s`), or with an empty OK when `code` is None."""

    def __init__(self, code: grpc.StatusCode | None, delay_s: float = 0.0) -> None:
        self.code, self.delay_s, self.calls = code, delay_s, 0
        self._lock = threading.Lock()

    def Embed(self, request, context):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay_s)
        if self.code is not None:
            context.abort(self.code, "on purpose")
        return pb.EmbedResponse(count=0, dim=0)


@pytest.fixture
def fake_servers():
    servers = []

    def start(servicer: _Failing, health_status: str | None = None) -> str:
        """A fake replica; with `health_status`, it also serves grpc.health.v1 saying so."""
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_EmbeddingServiceServicer_to_server(servicer, server)
        if health_status is not None:
            health_servicer = health.HealthServicer()
            for name in ("", SERVICE_NAME):  # as embedforge serve does: the whole server and the service
                health_servicer.set(name, health_pb2.HealthCheckResponse.ServingStatus.Value(health_status))
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def test_unavailable_is_retried_on_the_other_replica(fake_servers):
    down, up = _Failing(grpc.StatusCode.UNAVAILABLE), _Failing(None)
    targets = f"{fake_servers(down)},{fake_servers(up)}"
    with EmbedClient(targets, timeout=5) as client:
        for _ in range(10):
            client.embed(["a"])  # never raises: each call that hit `down` was sent again to `up`
    assert up.calls == 10 and down.calls >= 3  # round robin did send some calls to the failing replica


def test_replicas_not_serving_get_no_calls(fake_servers):
    """Client-side health checking: a replica whose health says NOT_SERVING (loading, draining) is skipped."""
    loading, ready = _Failing(None), _Failing(None)
    targets = f"{fake_servers(loading, 'NOT_SERVING')},{fake_servers(ready, 'SERVING')}"
    with EmbedClient(targets, timeout=5) as client:
        for _ in range(10):
            client.embed(["a"])
    assert (loading.calls, ready.calls) == (0, 10)


def test_health_command_asks_every_listed_replica(fake_servers):
    from click.testing import CliRunner

    from embedforge.server.cli import health_command

    serving, loading = fake_servers(_Failing(None), "SERVING"), fake_servers(_Failing(None), "NOT_SERVING")
    both = CliRunner().invoke(health_command, ["--target", f"{serving},{loading}"])
    assert both.exit_code == 1 and f"{serving} SERVING" in both.output and f"{loading} NOT_SERVING" in both.output
    assert CliRunner().invoke(health_command, ["--target", serving]).exit_code == 0


def test_resource_exhausted_is_retried_a_bounded_number_of_times(fake_servers):
    full = _Failing(grpc.StatusCode.RESOURCE_EXHAUSTED)
    with EmbedClient(fake_servers(full), timeout=10) as client, pytest.raises(grpc.RpcError) as caught:
        client.embed(["a"])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert full.calls == RETRY_POLICY["maxAttempts"]


def test_retries_can_be_switched_off(fake_servers):
    full = _Failing(grpc.StatusCode.RESOURCE_EXHAUSTED)
    with EmbedClient(fake_servers(full), timeout=10, retries=False) as client, pytest.raises(grpc.RpcError):
        client.embed(["a"])
    assert full.calls == 1


def test_the_deadline_covers_all_retries(fake_servers):
    slow = _Failing(grpc.StatusCode.UNAVAILABLE, delay_s=0.3)  # 4 attempts would take 1.2 s and more
    with EmbedClient(fake_servers(slow), timeout=0.5) as client, pytest.raises(grpc.RpcError) as caught:
        started = time.monotonic()
        client.embed(["a"])
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0 and slow.calls < RETRY_POLICY["maxAttempts"]


# ---- real replicas ----

@pytest.mark.slow
def test_three_replicas_share_the_load_evenly(replicas, tmp_path):
    group = replicas(3)
    report = _finish(_loadtest(",".join(r.target for r in group), tmp_path, duration_s=3), tmp_path)
    counts = [r.embed_calls() for r in group]
    mean = sum(counts) / 3
    assert report["errors"] == {} and sum(counts) >= report["ok"]  # the warmup's calls are counted too
    assert all(abs(c - mean) <= 0.2 * mean for c in counts), counts
    health = subprocess.run([sys.executable, "-m", "embedforge", "health", "--target",
                             ",".join(r.target for r in group)], capture_output=True, text=True, env=ENV, timeout=30)
    assert health.returncode == 0 and health.stdout.count(" SERVING") == 3


@pytest.mark.slow
def test_sigkill_of_a_replica_mid_load_fails_no_call(replicas, tmp_path):
    group = replicas(3)
    load = _loadtest(",".join(r.target for r in group), tmp_path, duration_s=4)
    time.sleep(2)
    group[0].process.send_signal(signal.SIGKILL)
    report = _finish(load, tmp_path)
    assert report["errors"] == {} and report["ok"] > 0
    survivors = [r.embed_calls() for r in group[1:]]
    assert all(c > 0 for c in survivors)
    line = report["timeline"]["ok_per_s"]
    assert len(line) >= 7 and min(line[-3:]) > 0  # the survivors kept serving to the end
    assert (tmp_path / "report.png").stat().st_size > 0
    health = subprocess.run([sys.executable, "-m", "embedforge", "health", "--target", group[0].target],
                            capture_output=True, text=True, env=ENV, timeout=30)
    assert health.returncode == 1 and "UNAVAILABLE" in health.stdout


@pytest.mark.slow
def test_a_replica_started_during_the_load_gets_calls_soon(replicas, tmp_path):
    age_s = 2.0
    late_port = free_port()
    early = replicas(2, "--max-connection-age-s", str(age_s), "--max-connection-age-grace-s", "1")
    targets = ",".join([*(r.target for r in early), f"127.0.0.1:{late_port}"])  # the third is not up yet
    load = _loadtest(targets, tmp_path, duration_s=7)
    try:
        time.sleep(1.5)
        (late,) = replicas(1, "--max-connection-age-s", str(age_s), ports=[late_port])
        serving_at = time.monotonic()
        while late.embed_calls() == 0 and time.monotonic() - serving_at < age_s + 4:
            time.sleep(0.1)
        waited = time.monotonic() - serving_at
    finally:
        report = _finish(load, tmp_path)
    assert late.embed_calls() > 0, f"no call reached the new replica within {waited:.1f} s"
    assert waited <= age_s + 3
    assert report["errors"] == {}


@pytest.mark.slow
def test_sigterm_of_a_replica_mid_load_fails_no_call(replicas, tmp_path):
    """SIGTERM: the replica reports NOT_SERVING and answers new calls UNAVAILABLE (retried on the other one),
    finishes what it holds, and exits 0."""
    group = replicas(2)
    load = _loadtest(",".join(r.target for r in group), tmp_path, duration_s=3)
    time.sleep(1.5)
    group[0].process.send_signal(signal.SIGTERM)
    report = _finish(load, tmp_path)
    assert group[0].process.wait(20) == 0
    assert report["errors"] == {} and report["ok"] > 0, (report["error_examples"], group[0].log.read_text())
    log = group[0].log.read_text()
    assert "event=draining" in log and "event=stopped" in log


class _FakeDns:
    """A DNS server on 127.0.0.1 (UDP) answering A queries for any name with `addresses` (changeable)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            end = 12
            while query[end]:
                end += query[end] + 1
            question = query[12: end + 5]  # name, type, class
            qtype = int.from_bytes(query[end + 1: end + 3], "big")
            answers = [socket.inet_aton(a) for a in list(self.addresses)] if qtype == 1 else []
            header = query[:2] + b"\x81\x80" + b"\x00\x01" + len(answers).to_bytes(2, "big") + b"\x00\x00\x00\x00"
            records = b"".join(b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x01\x00\x04" + a for a in answers)  # TTL 1 s
            self.sock.sendto(header + question + records, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.slow
def test_dns_target_finds_a_new_replica_after_max_connection_age(replicas, tmp_path):
    """dns:/// as on Kubernetes with a headless Service: a replica added to DNS is found when a connection
    reaches --max-connection-age-s and the client re-resolves (at most every 5 s, embedforge.client)."""
    age_s, port = 2.0, free_port()
    dns = _FakeDns(["127.0.0.1", "127.0.0.2"])
    try:
        flags = ("--max-connection-age-s", str(age_s), "--max-connection-age-grace-s", "1")
        early = []
        for host in ("127.0.0.1", "127.0.0.2"):
            early += replicas(1, *flags, ports=[port], host=host)
        load = _loadtest(f"dns://127.0.0.1:{dns.port}/replicas.test:{port}", tmp_path, duration_s=9)
        try:
            (late,) = replicas(1, *flags, ports=[port], host="127.0.0.3")
            dns.addresses.append("127.0.0.3")
            listed_at = time.monotonic()
            while late.embed_calls() == 0 and time.monotonic() - listed_at < age_s + 8:
                time.sleep(0.1)
            waited = time.monotonic() - listed_at
        finally:
            report = _finish(load, tmp_path)
    finally:
        dns.close()
    assert all(r.embed_calls() > 0 for r in early)
    assert late.embed_calls() > 0, f"no call reached the replica added to DNS within {waited:.1f} s"
    assert waited <= age_s + 5 + 2
    assert report["errors"] == {}
