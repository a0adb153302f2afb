"""The server under hostile and mixed load (issues 13 and 25), measured against a subprocess server on 127.0.0.1.

    python benchmarks/hostile_load.py                                   # exports the bundled model (fp32) first
    python benchmarks/hostile_load.py --export-dir output/vector_model/export --phase-s 30 --flooders 200

Phases, --phase-s seconds each, a bystander (a process of its own) sending one short text every 20 ms throughout:
  1. the bystander alone;
  2. + --slow-clients connections, half HTTP and half gRPC, each holding an incomplete body (HTTP: headers and
     part of the body; gRPC: a call whose message never comes), opening a new one whenever the server drops it;
  3. + --flooders clients sending maximal Embed requests (max texts, each as long as the body limit allows) back
     to back;
  4. + --documenters clients sending Score requests of 64 documents of ~600 tokens (cut at max_length).
Attackers send each call once (a refused call is counted, and the client sends its next call 50 ms later).
Printed per phase: the server's peak RSS, the bystander's calls and p50/p99 (and where its slowest calls spent
their time, from the timing the server returns), the attackers' statuses (DEADLINE_EXCEEDED split into bodies
the server dropped and calls the server admitted that then ran out of time), how fast refusals came back (to the
attackers, whose one process pushes every flood body; to a prober in the bystander's process sending the same
call every 0.5 s; and server side from its metrics) and the server's batches' mean time, beside the duration of one
full-budget batch (the default --max-batch-tokens in 512-token texts, on the session a batch uses under load).
Targets (issue 25): slow clients: every bystander call through, p99 <= 2x the quiet p99, RSS <= quiet + 256 MB;
floods: RSS <= quiet + 1 GB, bystander p50 <= 0.5x and p99 <= 1.5x one full-budget batch, no admitted call past
its deadline, client-side refusal p90 <= 100 ms. Bounded: every loop stops at its phase's end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, stop_process  # noqa: E402
from results import write_result  # noqa: E402
from serve_throughput import free_port, start_server  # noqa: E402

from embedforge.io import write_text_atomic  # noqa: E402
from embedforge.server.config import FIELD_OVERHEAD_BYTES, MESSAGE_OVERHEAD_BYTES  # noqa: E402

WORDS = ("the a is of to and in how what egg boil water pasta salt minutes bread bake oven coffee tea cup hot cold "
         "cook rice pan fry soup recipe kitchen knife onion garlic sauce sugar flour butter milk").split()
IDENTITY = {"request_serializer": None, "response_deserializer": None}
# Attackers' and the prober's channels: maximal bodies out, replies of any size in; each its own connection
# (gRPC shares one between channels otherwise), as separate client processes would have.
CLIENT_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20),
                  ("grpc.use_local_subchannel_pool", 1)]


def export_fp32(workdir: Path) -> Path:
    from embedforge.export import export_checkpoint
    from embedforge.model import BertVectorModel

    checkpoint = workdir / "checkpoint-step-0"
    # max_length 512, the server's longest inputs: at the bundled model's own 256 every document is cut to one length
    BertVectorModel.from_base(None, max_length=512).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 0, "val_loss": None}))
    print("exporting the bundled model (fp32) ...", flush=True)
    export_checkpoint(checkpoint, workdir / "export", precisions=("fp32",), parity_texts=["a short text"] * 8)
    return workdir / "export"


def words(rng: np.random.Generator, chars: int) -> str:
    text = " ".join(rng.choice(WORDS, size=chars // 4 + 8))
    return text[:chars]


def maximal_chars(limits) -> int:
    """Characters per text of the largest Embed request the server takes: max_texts_per_request texts, as long
    as the body limit allows (ASCII) and the character limit."""
    per_text = (limits.max_receive_bytes - MESSAGE_OVERHEAD_BYTES) // limits.max_texts_per_request
    return min(limits.max_chars_per_text, per_text - FIELD_OVERHEAD_BYTES)


def full_batch_seconds(export_dir: Path, max_length: int, batch_tokens: int, repeats: int = 3) -> float:
    """Median seconds of one batch of batch_tokens / max_length texts of max_length tokens, on the session a
    batch uses under load (threads // workers), as the server runs it."""
    from embedforge.server.runtime import OnnxEmbedder

    cores = os.cpu_count() or 1
    embedder = OnnxEmbedder(export_dir, precision="fp32", provider="cpu", threads=cores, workers=min(cores, 4))
    ids = embedder.tokenize([words(np.random.default_rng(0), max_length * 8)] * (batch_tokens // max_length)).ids
    embedder.run_batch(ids, alone=False)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        embedder.run_batch(ids, alone=False)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


class RssSampler:
    """Peak VmRSS (bytes) of a process, sampled every 50 ms in a thread; `take()` returns and resets the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.rss())
            except OSError:
                return

    def take(self) -> int:
        peak, self.peak = self.peak, 0
        return peak

    def close(self) -> None:
        self._stop.set()


async def bystander(target: str, stop: float) -> tuple[list[tuple[float, ...]], collections.Counter]:
    """One short text every 20 ms until `stop` (time.time()): (per OK call: seconds on the client, then the
    server's own: handler total, queue, tokenize, inference; status counts)."""
    import grpc

    from embedforge._proto import embedding_pb2 as pb
    from embedforge.client import build_embed_request

    body = build_embed_request(["how to boil an egg"]).SerializeToString()
    calls: list[tuple[float, ...]] = []
    codes: collections.Counter = collections.Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/embedforge.v1.EmbeddingService/Embed", **IDENTITY)
        while time.time() < stop:
            started = time.monotonic()
            try:
                timing = pb.EmbedResponse.FromString(await call(body, timeout=60)).timing
                calls.append((time.monotonic() - started, timing.total_ms / 1e3, timing.queue_ms / 1e3,
                              timing.tokenize_ms / 1e3, timing.inference_ms / 1e3))
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                codes[f"  {(exc.details() or '')[:48]}"] += 1  # which refusal (counted apart from the codes)
            await asyncio.sleep(max(0.0, 0.02 - (time.monotonic() - started)))
    return calls, codes


async def prober(target: str, stop: float, method: str, body: bytes) -> tuple[list[float], collections.Counter]:
    """One attacker's call every 0.5 s on a connection of its own, each sent once: (seconds to each refusal,
    status counts). How fast a refusal reaches a client whose own process is not also sending the flood."""
    import grpc

    refusals: list[float] = []
    codes: collections.Counter = collections.Counter()
    async with grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS) as channel:
        call = channel.unary_unary(f"/embedforge.v1.EmbeddingService/{method}", **IDENTITY)
        while time.time() < stop:
            started = time.monotonic()
            await call_once(call, body, codes, refusals)
            await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - started)))
    return refusals, codes


def bystander_process(target: str, stop: float, probe: tuple[str, bytes] | None, results) -> None:
    """The bystander (and the prober, with `probe` = (method, body)) in a process of their own, so that their
    latency is the server's, not that of a client process busy sending the attackers' bodies."""
    async def both():
        probing = prober(target, stop, *probe) if probe else asyncio.sleep(0, ([], collections.Counter()))
        return await asyncio.gather(bystander(target, stop), probing)

    (calls, codes), (refusals, probe_codes) = asyncio.run(both())
    results.put((calls, codes, refusals, probe_codes))


async def attacker(channel, method: str, body: bytes, stop: float, codes: collections.Counter,
                   refusals: list[float]) -> None:
    """Calls back to back, each sent once; a refused one is followed by the next call 50 ms later."""
    call = channel.unary_unary(f"/embedforge.v1.EmbeddingService/{method}", **IDENTITY)
    while time.monotonic() < stop:
        if await call_once(call, body, codes, refusals) == "RESOURCE_EXHAUSTED":
            await asyncio.sleep(0.05)


async def call_once(call, body: bytes, codes: collections.Counter, refusals: list[float]) -> str:
    """Send one call: its status is counted (and returned), a refusal's seconds kept in `refusals`."""
    started = time.monotonic()
    try:
        await call(body, timeout=30)
        code = "OK"
    except Exception as exc:
        code = exc.code().name
        if code == "DEADLINE_EXCEEDED":  # the server dropped a slow body, or an admitted call ran out of time
            code += " (body dropped)" if "did not arrive" in (exc.details() or "") else " (admitted)"
        if code == "RESOURCE_EXHAUSTED":
            refusals.append(time.monotonic() - started)
    codes[code] += 1
    return code


async def slow_http_client(port: int, stop: float, codes: collections.Counter) -> None:
    """Sends headers and part of a body, then nothing; again whenever the server answers or drops it."""
    head = (b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"input\": ")
    while time.monotonic() < stop:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head)
            reply = await asyncio.wait_for(reader.read(64), max(0.01, stop - time.monotonic()))
            codes[f"HTTP {reply[9:12].decode() or 'closed'}"] += 1
        except asyncio.TimeoutError:
            codes["HTTP still held at the end"] += 1
        finally:
            writer.close()


async def slow_grpc_client(channel, stop: float, codes: collections.Counter) -> None:
    """A call whose message never comes; again whenever the server ends it."""
    async def nothing():
        await asyncio.sleep(max(0.0, stop - time.monotonic()) + 1)
        yield b""

    call = channel.stream_unary("/embedforge.v1.EmbeddingService/Embed", **IDENTITY)
    while time.monotonic() < stop:
        try:
            await call(nothing(), timeout=max(0.01, stop - time.monotonic()))
            codes["gRPC OK"] += 1
        except Exception as exc:
            dropped = "did not arrive" in (exc.details() or "")
            codes[f"gRPC {exc.code().name}{' (body dropped)' if dropped else ''}"] += 1


def slowest_breakdown(calls: list[tuple[float, ...]], share: float = 0.05) -> str:
    """Where the slowest `share` of the bystander's calls spent their time, in mean milliseconds: outside the
    server's handler (the body in gRPC, its read slot and parse, the reply going out), then in the handler's
    queue, tokenize and inference stages."""
    if not calls:
        return "-"
    slow = np.array(sorted(calls, reverse=True)[:max(1, int(len(calls) * share))])
    client, total, queue, tokenize, inference = slow.mean(axis=0) * 1e3
    return (f"{len(slow)} calls, mean {client:.0f} ms = outside the handler {client - total:.0f} + queue "
            f"{queue:.0f} + tokenize {tokenize:.0f} + inference {inference:.0f} + other "
            f"{total - queue - tokenize - inference:.0f}")


def ms(values: list[float], q: float) -> str:
    return f"{np.quantile(values, q) * 1e3:.1f}" if values else "-"


def server_metrics(metrics_port: int) -> dict[str, float]:
    """The server's cumulative samples that this benchmark reads: the gRPC refusal-time buckets
    ("refused <= bound") and the model batches' count and summed seconds."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("embedforge_refused_seconds_bucket") and 'protocol="grpc"' in name:
            bound = float(name.split('le="')[1].split('"')[0])
            samples[f"refused <= {bound}"] = float(value)
        elif name in ("embedforge_batch_seconds_count", "embedforge_batch_seconds_sum"):
            samples[name] = float(value)
    return samples


def phase_metrics(before: dict[str, float], after: dict[str, float]) -> dict[str, str]:
    """Of the phase (after - before): refusals the server answered within 100 ms and 1 s, and its batches'
    count and mean time."""
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    batches = delta("embedforge_batch_seconds_count")
    mean = delta("embedforge_batch_seconds_sum") / batches if batches else float("nan")
    return {"server_refusals_within_100ms": f"{delta('refused <= 0.1'):.0f} of {delta('refused <= inf'):.0f}",
            "server_refusals_within_1s": f"{delta('refused <= 1.0'):.0f}",
            "server_batches": f"{batches:.0f}, mean {mean * 1e3:.0f} ms"}


async def run_phases(target: str, http_port: int, sampler: RssSampler, args: argparse.Namespace, limits,
                     metrics_port: int) -> list[dict]:
    import grpc

    from embedforge.client import build_embed_request, build_score_request

    rng = np.random.default_rng(1)
    flood_body = build_embed_request([words(rng, maximal_chars(limits))
                                      for _ in range(limits.max_texts_per_request)]).SerializeToString()
    documents = [words(rng, 3000) for _ in range(64)]  # ~600 tokens each
    score_body = build_score_request("how to boil an egg", documents).SerializeToString()
    # One connection per client (CLIENT_OPTIONS), new ones for each phase: its attackers are other clients than
    # the last phase's.
    channels: list = []
    slow_grpc = args.slow_clients // 2
    probes = [None, None, ("Embed", flood_body), ("Score", score_body)]  # the phase's attacker call, probed
    phases = [("bystander alone", lambda stop, codes, refusals: []),
              (f"+ {args.slow_clients} slow clients ({args.slow_clients - slow_grpc} HTTP, {slow_grpc} gRPC) "
               "holding incomplete bodies",
               lambda stop, codes, refusals: [slow_http_client(http_port, stop, codes)
                                              for _ in range(args.slow_clients - slow_grpc)]
               + [slow_grpc_client(channels[i], stop, codes) for i in range(slow_grpc)]),
              (f"+ {args.flooders} clients: maximal Embed ({limits.max_texts_per_request} x "
               f"{maximal_chars(limits)} chars, {len(flood_body) / 2**20:.1f} MiB)",
               lambda stop, codes, refusals: [attacker(channels[i], "Embed", flood_body, stop, codes, refusals)
                                              for i in range(args.flooders)]),
              (f"+ {args.documenters} clients: Score, 64 documents of ~600 tokens",
               lambda stop, codes, refusals: [attacker(channels[i], "Score", score_body, stop, codes, refusals)
                                              for i in range(args.documenters)])]
    rows = []
    try:
        for (name, attackers), probe in zip(phases, probes, strict=True):
            channels[:] = [grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)
                           for _ in range(max(args.flooders, args.documenters, args.slow_clients, 1))]
            sampler.take()
            stop = time.monotonic() + args.phase_s
            spawn = multiprocessing.get_context("spawn")
            results = spawn.Queue()
            watcher = spawn.Process(target=bystander_process, args=(target, time.time() + args.phase_s, probe,
                                                                              results))
            watcher.start()
            at_codes: collections.Counter = collections.Counter()
            refusals: list[float] = []
            metrics_before = server_metrics(metrics_port)
            await asyncio.gather(*attackers(stop, at_codes, refusals))
            calls, by_codes, probe_refusals, probe_codes = await asyncio.to_thread(results.get, timeout=120)
            latencies = [call[0] for call in calls]
            watcher.join()
            rows.append({"phase": name, "peak_rss_mb": sampler.take() / 1e6, "bystander_calls": by_codes["OK"],
                         "bystander_errors": dict(by_codes - collections.Counter({"OK": by_codes["OK"]})),
                         "p50_ms": ms(latencies, 0.5), "p99_ms": ms(latencies, 0.99),
                         "p50_s": float(np.quantile(latencies, 0.5)) if latencies else float("nan"),
                         "p99_s": float(np.quantile(latencies, 0.99)) if latencies else float("nan"),
                         "slowest_calls": slowest_breakdown(calls), "attackers": dict(at_codes),
                         "refusal_p90_ms": ms(refusals, 0.9), "refusal_max_ms": ms(refusals, 1.0),
                         "probe": dict(probe_codes), "probe_refusal_p90_ms": ms(probe_refusals, 0.9),
                         **phase_metrics(metrics_before, server_metrics(metrics_port))})
            print(json.dumps(rows[-1]), flush=True)
            await asyncio.sleep(2)  # let the last attackers' calls finish before the next phase
            for channel in channels:
                await channel.close()
            channels.clear()
    finally:
        for channel in channels:
            await channel.close()
    return rows


def headline(phases: list[dict], batch_s: float) -> str:
    """One line of the result's phases: the bystander's p99 alone and under each load (against one full-budget
    batch under the floods), and the server's largest RSS growth over the quiet phase."""
    quiet = phases[0]
    parts = [f"bystander p99 alone {quiet['p99_ms']} ms"]
    for label, row in zip(("slow clients", "Embed floods", "Score floods"), phases[1:], strict=True):
        parts.append(f"{label} {row['p99_ms']} ms ({row['p99_s'] / batch_s:.2f}x one full batch of "
                     f"{batch_s * 1e3:.0f} ms)" if label == "Embed floods" else f"{label} {row['p99_ms']} ms")
    growth = max(row["peak_rss_mb"] for row in phases) - quiet["peak_rss_mb"]
    return "; ".join(parts) + f"; peak RSS +{growth:.0f} MB over the quiet phase"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, help="an fp32 export (default: export the bundled model)")
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--flooders", type=int, default=48)
    parser.add_argument("--documenters", type=int, default=16)
    parser.add_argument("--slow-clients", type=int, default=100)
    parser.add_argument("--output", type=Path, help="also copy the result JSON here (it always goes to "
                        "benchmarks/results/hostile_load.json)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `embedforge serve` argument")
    parser.add_argument("--batch-s", type=float, help="one full-budget batch's seconds, measured before (default: "
                        "measure it now, about a minute on a busy 2-core host)")
    args = parser.parse_args()

    from embedforge.server.config import ServeConfig

    with tempfile.TemporaryDirectory() as tmp:
        export_dir = args.export_dir or export_fp32(Path(tmp))
        max_length = int(json.loads((export_dir / "manifest.json").read_text())["max_length"])
        limits = ServeConfig().resolved(on_cuda=False, max_length=max_length)  # the server's defaults on this CPU
        batch_s = args.batch_s or full_batch_seconds(export_dir, max_length, limits.max_batch_tokens)
        metrics_port = free_port()
        process, target, http_port = start_server(export_dir, "fp32", args.threads,
                                          ["--metrics-port", str(metrics_port), *args.serve_arg])
        sampler = RssSampler(process.pid)
        try:
            rows = asyncio.run(run_phases(target, http_port, sampler, args, limits, metrics_port))
            alive = process.poll() is None
        finally:
            sampler.close()
            stop_process(process)
    cpu = cpu_name()
    print(f"\nCPU: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"one full-budget batch ({limits.max_batch_tokens // max_length} x {max_length} tokens, under-load "
          f"session): {batch_s * 1e3:.0f} ms; server alive after the floods: {alive}\n")
    quiet = rows[0]["peak_rss_mb"]
    print("| load | peak RSS | bystander calls | p50 | p99 | p99 / quiet p99 | p50 / batch | p99 / batch | "
          "attackers | refusal p90 (attackers) | probe | refusal p90 (probe) | refused within 100 ms (server) | "
          "batches (server) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['phase']} | {row['peak_rss_mb']:.0f} MB (+{row['peak_rss_mb'] - quiet:.0f}) | "
              f"{row['bystander_calls']} {row['bystander_errors'] or ''} | {row['p50_ms']} ms | {row['p99_ms']} ms | "
              f"{row['p99_s'] / rows[0]['p99_s']:.2f} | "
              f"{row['p50_s'] / batch_s:.2f} | {row['p99_s'] / batch_s:.2f} | {row['attackers'] or '-'} | "
              f"{row['refusal_p90_ms']} ms | {row['probe'] or '-'} | {row['probe_refusal_p90_ms']} ms | "
              f"{row['server_refusals_within_100ms']} "
              f"({row['server_refusals_within_1s']} within 1 s) | {row['server_batches']} |")
    path = write_result("hostile_load", {"headline": headline(rows, batch_s), "batch_s": batch_s,
                                         "server_alive": alive, "phases": rows})
    if args.output and args.output.resolve() != path.resolve():
        write_text_atomic(args.output, path.read_text())


if __name__ == "__main__":
    main()
