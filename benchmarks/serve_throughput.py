"""Serving throughput: the gRPC server vs raw ONNX Runtime and sentence-transformers, measured in one run.

    python benchmarks/serve_throughput.py                         # exports the bundled model into a temp dir
    python benchmarks/serve_throughput.py --export-dir output/vector_model/export --threads 2

Texts: the unique sentences of STS-B test (../shared/data/stsb/stsb_test.jsonl), in file order.
- raw ORT: the same session options as the server, texts pre-tokenized and cut into length-sorted batches
  of --raw-batch texts; no server, no gRPC. The compute limit the server is measured against.
- sentence-transformers: SentenceTransformer(bundled model).encode(texts, batch_size=32) on CPU.
- server: `embedforge serve` in a subprocess (--threads), driven from this process by --clients concurrent
  asyncio clients, each sending --texts-per-call texts per Embed call, until every text was sent once.
Engines run interleaved for --rounds rounds and the median counts, so a busy moment hits all of them alike.
- HTTP: the same server's OpenAI-compatible API (`--http-port`, same batcher), driven the same way by aiohttp
  clients posting /v1/embeddings with encoding_format=base64 (the openai SDK's default), vectors decoded.
- latency: one client, one text per call, sequential; p50 and p99 of the client-side wall time (gRPC, and HTTP
  over one keep-alive connection).
- serialization: encode + decode of 32 x 384 vectors as packed bytes vs `repeated float`.
Goals: server/raw-ORT >= 0.85, server/ST >= 1.4 (fp32), int8 server/ST >= 2, single-text p50 <= 4 ms,
HTTP/gRPC texts/s >= 0.85 and HTTP single-text p50 within 1 ms of gRPC's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import export_bundled, stsb_file
from results import write_result


def read_texts(path: Path) -> list[str]:
    texts: dict[str, None] = {}
    with path.open() as f:
        for line in f:
            record = json.loads(line)
            texts[record["query"]] = None
            texts[record["document"]] = None
    return list(texts)


def bench_serialization(count: int = 32, dim: int = 384, rounds: int = 200) -> dict[str, float]:
    """Microseconds to build + serialize + parse + decode one response of count x dim vectors."""
    from embedforge._proto import embedding_pb2 as pb

    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)

    def packed() -> np.ndarray:
        wire = pb.EmbedResponse(vectors=vectors.astype("<f4").tobytes(), dim=dim, count=count).SerializeToString()
        message = pb.EmbedResponse.FromString(wire)
        return np.frombuffer(message.vectors, "<f4").reshape(message.count, message.dim)

    def repeated() -> np.ndarray:  # ScoreResponse.scores is a `repeated float`
        wire = pb.ScoreResponse(scores=vectors.ravel().tolist()).SerializeToString()
        return np.asarray(pb.ScoreResponse.FromString(wire).scores, dtype=np.float32).reshape(count, dim)

    result = {}
    for name, fn in (("packed bytes", packed), ("repeated float", repeated)):
        np.testing.assert_array_equal(fn(), vectors)
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        result[name] = (time.perf_counter() - start) / rounds * 1e6
    return result


class RawOrt:
    """The server's own session on pre-tokenized, length-sorted batches: no server, no gRPC."""

    def __init__(self, export_dir: Path, precision: str, texts: list[str], threads: int, batch: int) -> None:
        from embedforge.server.runtime import OnnxEmbedder

        self.embedder = OnnxEmbedder(export_dir, precision=precision, provider="cpu", threads=threads)
        ids = sorted(self.embedder.tokenize(texts).ids, key=len)
        self.batches = [ids[i: i + batch] for i in range(0, len(ids), batch)]
        for b in self.batches[:: max(1, len(self.batches) // 8)]:  # warm-up over several shapes
            self.embedder.run_batch(b)

    def texts_per_s(self) -> float:
        start, cpu = time.perf_counter(), time.process_time()
        for b in self.batches:
            self.embedder.run_batch(b)
        self.cpu_ms_per_text = (time.process_time() - cpu) * 1e3 / sum(map(len, self.batches))
        return sum(map(len, self.batches)) / (time.perf_counter() - start)


class SentenceTransformersEncode:
    def __init__(self, texts: list[str], threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from embedforge.model import default_model_path

        torch.set_num_threads(threads)
        self.texts = texts
        self.model = SentenceTransformer(str(default_model_path()), device="cpu")
        self.model.encode(texts[:64], batch_size=32)

    def texts_per_s(self) -> float:
        start = time.perf_counter()
        self.model.encode(self.texts, batch_size=32)
        return len(self.texts) / (time.perf_counter() - start)


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(export_dir: Path, precision: str, threads: int,
                 extra: list[str]) -> tuple[subprocess.Popen, str, int]:
    """`embedforge serve` with gRPC and the HTTP API; (process, gRPC target, HTTP port) once SERVING."""
    from embedforge.client import EmbedClient

    port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "embedforge", "serve", "--model-dir", str(export_dir), "--port", str(port),
               "--http-port", str(http_port), "--precision", precision, "--provider", "cpu", "--threads",
               str(threads), "--log-level", "warning", *extra]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    target = f"127.0.0.1:{port}"
    with EmbedClient(target, timeout=1) as client:
        for _ in range(600):
            try:
                if client.health() == "SERVING":
                    return process, target, http_port
            except Exception:  # not listening yet
                if process.poll() is not None:
                    sys.exit(f"server exited with {process.returncode}")
            time.sleep(0.1)
    process.kill()
    sys.exit("server did not become SERVING within 60 s")


async def drive(target: str, texts: list[str], clients: int, per_call: int, passes: int = 1) -> float:
    """texts/s with `clients` concurrent callers sending `per_call` texts per call, `passes` over the texts."""
    from embedforge.client import AsyncEmbedClient

    calls = [texts[i: i + per_call] for i in range(0, len(texts), per_call)] * passes
    next_call = iter(range(len(calls)))

    async with AsyncEmbedClient(target, timeout=120) as client:
        async def worker() -> int:
            sent = 0
            for i in next_call:
                result = await client.embed(calls[i])
                assert result.vectors.shape[0] == len(calls[i])
                sent += len(calls[i])
            return sent

        await asyncio.gather(*(client.embed(c) for c in calls[:clients]))  # warm-up
        start = time.perf_counter()
        total = sum(await asyncio.gather(*(worker() for _ in range(clients))))
        return total / (time.perf_counter() - start)


def decode_http(payload: bytes, count: int) -> np.ndarray:
    data = json.loads(payload)["data"]
    assert len(data) == count
    return np.stack([np.frombuffer(base64.b64decode(item["embedding"]), "<f4") for item in data])


async def drive_http(port: int, texts: list[str], clients: int, per_call: int) -> float:
    """As `drive`, over the HTTP API: POST /v1/embeddings (base64), one keep-alive connection per client."""
    import aiohttp

    calls = [texts[i: i + per_call] for i in range(0, len(texts), per_call)]
    next_call = iter(range(len(calls)))
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def embed(batch: list[str]) -> int:
            async with session.post(url, json={"input": batch, "encoding_format": "base64"}) as response:
                assert response.status == 200, await response.text()
                return decode_http(await response.read(), len(batch)).shape[0]

        async def worker() -> int:
            return sum([await embed(calls[i]) for i in next_call])

        await asyncio.gather(*(embed(c) for c in calls[:clients]))  # warm-up
        start = time.perf_counter()
        total = sum(await asyncio.gather(*(worker() for _ in range(clients))))
        return total / (time.perf_counter() - start)


def single_text_latency(target: str, http_port: int, texts: list[str], calls: int) -> dict[str, tuple[float, float]]:
    """p50 and p99 ms of one-text calls over gRPC and over HTTP (one keep-alive connection), interleaved."""
    from embedforge.client import EmbedClient

    connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)

    def over_http(text: str) -> None:
        connection.request("POST", "/v1/embeddings", json.dumps({"input": [text], "encoding_format": "base64"}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        decode_http(response.read(), 1)

    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"grpc": [], "http": []}
    with EmbedClient(target, timeout=10) as client:
        embed = {"grpc": lambda text: client.embed([text]), "http": over_http}
        for text in texts[:20]:
            for fn in embed.values():
                fn(text)
        for i in rng.integers(0, len(texts), size=calls):
            for name, fn in embed.items():
                start = time.perf_counter()
                fn(texts[i])
                times[name].append(time.perf_counter() - start)
    connection.close()
    return {name: tuple(float(x) for x in np.percentile(np.array(t) * 1e3, [50, 99])) for name, t in times.items()}


def result_figures(precisions: list[str], best: dict[str, float], runs: dict[str, list[float]],
                   latency: dict) -> dict[str, dict[str, float | None]]:
    """Per precision: the figures both tables print (texts/s, ratios, single-text latency in ms)."""
    figures: dict[str, dict[str, float | None]] = {}
    for precision in precisions:
        served, raw, st = best[f"server-{precision}"], best.get(f"raw-{precision}"), best.get("st")
        http_vs_grpc = np.array(runs[f"http-{precision}"]) / np.array(runs[f"server-{precision}"])
        figures[precision] = {
            "grpc_texts_per_s": served, "http_texts_per_s": best[f"http-{precision}"],
            "raw_ort_texts_per_s": raw, "st_texts_per_s": st,
            "server_vs_raw": served / raw if raw else None, "server_vs_st": served / st if st else None,
            "http_vs_grpc": float(np.median(http_vs_grpc)),
            "grpc_p50_ms": latency[precision]["grpc"][0], "grpc_p99_ms": latency[precision]["grpc"][1],
            "http_p50_ms": latency[precision]["http"][0]}
    return figures


def headline(figures: dict[str, dict[str, float | None]]) -> str:
    parts = []
    for precision, row in figures.items():
        versus = [f"{row[key]:.2f}x {label}" for key, label in (("server_vs_raw", "raw ORT"),
                                                                ("server_vs_st", "sentence-transformers"))
                  if row[key] is not None]
        parts.append(f"{precision} {row['grpc_texts_per_s']:.0f} texts/s"
                     + (f" = {', '.join(versus)}" if versus else "")
                     + f", HTTP/gRPC {row['http_vs_grpc']:.2f}, single-text p50 {row['grpc_p50_ms']:.1f} ms")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", type=Path, help="export with fp32 (+ int8) models (default: export the "
                        "bundled model into a temp dir)")
    parser.add_argument("--data", type=Path, default=stsb_file("test"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--texts-per-call", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="engines run interleaved, one pass each per round; "
                        "the median round counts (robust to a busy machine)")
    parser.add_argument("--raw-batch", type=int, default=32)
    parser.add_argument("--latency-calls", type=int, default=500)
    parser.add_argument("--server-args", default="", help="extra `embedforge serve` options, e.g. '--max-wait-ms 0'")
    parser.add_argument("--protocols-only", action="store_true", help="measure only the server, over gRPC and "
                        "HTTP (no raw ORT / sentence-transformers anchors): quicker on a busy host")
    args = parser.parse_args()

    texts = read_texts(args.data)
    print(f"{len(texts)} unique STS-B test texts, {args.threads} threads, {os.cpu_count()} cores", flush=True)
    serialization = bench_serialization()
    print("serialization of 32 x 384 vectors (build+serialize+parse+decode): "
          + ", ".join(f"{k} {v:.0f} us" for k, v in serialization.items()), flush=True)

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as workdir:
        export_dir = args.export_dir or export_bundled(Path(workdir), parity_texts=texts[:256])
        exported = json.loads((export_dir / "manifest.json").read_text())["models"]
        precisions = [p for p in ("fp32", "int8") if p in exported]
        engines: dict[str, object] = {}
        if not args.protocols_only:
            try:
                engines["st"] = SentenceTransformersEncode(texts, args.threads)
            except ImportError:
                print("sentence-transformers is not installed: no ST comparison")
        servers = {}
        try:
            for precision in precisions:
                if not args.protocols_only:
                    engines[f"raw-{precision}"] = RawOrt(export_dir, precision, texts, args.threads, args.raw_batch)
                servers[precision] = start_server(export_dir, precision, args.threads, args.server_args.split())
            runs: dict[str, list[float]] = {}
            cpu_ms: dict[str, list[float]] = {}  # CPU ms per text: server process vs raw ORT in this process
            for round_index in range(args.rounds):
                for name, engine in engines.items():
                    runs.setdefault(name, []).append(engine.texts_per_s())
                    if isinstance(engine, RawOrt):
                        cpu_ms.setdefault(name, []).append(engine.cpu_ms_per_text)
                for precision, (process, target, http_port) in servers.items():
                    protocols = {"server": functools.partial(drive, target, texts, args.clients, args.texts_per_call),
                                 "http": functools.partial(drive_http, http_port, texts, args.clients,
                                                           args.texts_per_call)}
                    for kind in sorted(protocols, reverse=bool(round_index % 2)):  # alternate which goes first
                        cpu, client_cpu = process_cpu_s(process.pid), time.process_time()
                        runs.setdefault(f"{kind}-{precision}", []).append(asyncio.run(protocols[kind]()))
                        cpu_ms.setdefault(f"{kind}-{precision}", []).append(
                            (process_cpu_s(process.pid) - cpu) * 1e3 / len(texts))
                        cpu_ms.setdefault(f"client-{kind}-{precision}", []).append(
                            (time.process_time() - client_cpu) * 1e3 / len(texts))
                print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()),
                      flush=True)
            latency = {p: single_text_latency(target, http_port, texts, args.latency_calls)
                       for p, (_, target, http_port) in servers.items()}
        finally:
            for process, _, _ in servers.values():
                process.terminate()
                process.wait(30)

    best = {name: float(np.median(values)) for name, values in runs.items()}
    if not args.protocols_only:
        print_anchor_table(args, precisions, best, latency, cpu_ms)
    print(f"\nHTTP API vs gRPC on the same server (same batcher), {args.clients} clients x {args.texts_per_call} "
          f"texts/call, median of {args.rounds} rounds (the order alternates); HTTP/gRPC: median of the rounds' ratios")
    print("precision  gRPC t/s  HTTP t/s  HTTP/gRPC  server CPU ms/text gRPC HTTP  client gRPC HTTP  "
          "gRPC p50 ms  HTTP p50 ms  HTTP-gRPC p50 ms")
    for precision in precisions:
        grpc_tps, http_tps = best[f"server-{precision}"], best[f"http-{precision}"]
        ratio = float(np.median(np.array(runs[f"http-{precision}"]) / np.array(runs[f"server-{precision}"])))
        cpu = {key: float(np.median(cpu_ms[f"{key}-{precision}"]))
               for key in ("server", "http", "client-server", "client-http")}
        grpc_p50, http_p50 = latency[precision]["grpc"][0], latency[precision]["http"][0]
        print(f"{precision:9}  {grpc_tps:8.0f}  {http_tps:8.0f}  {ratio:9.2f}  {cpu['server']:23.2f} {cpu['http']:4.2f}"
              f"  {cpu['client-server']:11.2f} {cpu['client-http']:4.2f}  {grpc_p50:11.2f}  {http_p50:11.2f}  "
              f"{http_p50 - grpc_p50:16.2f}")
    print("server CPU ms/text: the server process's CPU time per text (all threads); client: this process's (the "
          "load generator's), on the same cores")
    print("goals: fp32 server/raw >= 0.85, fp32 server/ST >= 1.4, int8 server/ST >= 2.0, p50 <= 4 ms, "
          "HTTP/gRPC >= 0.85, HTTP p50 - gRPC p50 <= 1 ms")
    figures = result_figures(precisions, best, runs, latency)
    write_result("serve_throughput", {"headline": headline(figures), "clients": args.clients,
                                      "texts_per_call": args.texts_per_call, "threads": args.threads,
                                      "rounds": args.rounds, "precisions": figures})


def print_anchor_table(args: argparse.Namespace, precisions: list[str], best: dict[str, float],
                       latency: dict, cpu_ms: dict[str, list[float]]) -> None:
    """The server over gRPC against raw ONNX Runtime and sentence-transformers."""
    st = best.get("st")
    print(f"\ntexts/s, median of {args.rounds} interleaved rounds; server: {args.clients} clients x "
          f"{args.texts_per_call} texts/call; raw ORT: length-sorted batches of {args.raw_batch}; "
          f"ST: encode batch 32 = {st or float('nan'):.0f} texts/s")
    print("precision  server t/s  raw ORT t/s  server/raw  server/ST  p50 ms  p99 ms  CPU ms/text server raw")
    for precision in precisions:
        served, raw = best[f"server-{precision}"], best[f"raw-{precision}"]
        p50, p99 = latency[precision]["grpc"]
        vs_st = f"{served / st:9.2f}" if st else "      n/a"
        cpu_server, cpu_raw = (float(np.median(cpu_ms[f"{k}-{precision}"])) for k in ("server", "raw"))
        print(f"{precision:9}  {served:10.0f}  {raw:11.0f}  {served / raw:10.2f}  {vs_st}  {p50:6.2f}  {p99:6.2f}"
              f"  {cpu_server:17.2f} {cpu_raw:4.2f}")
    print("CPU ms/text: CPU time per text of the server process (all its threads) and of raw ORT; on a shared "
          "machine it shows the server's own cost better than texts/s do")


if __name__ == "__main__":
    main()
