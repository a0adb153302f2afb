"""Soak: mixed short and long texts at 80% of measured capacity for --minutes, against a subprocess server.

    python benchmarks/soak.py --minutes 10                       # exports the bundled model (fp32) first
    python benchmarks/soak.py --minutes 2 --export-dir /tmp/export

First the capacity (calls/s) of the mix is measured closed-loop (--clients callers, --capacity-s seconds); then
calls start open-loop at 80% of that rate (Poisson arrivals, bounded by --max-in-flight) for --minutes; each
minute replays the same arrivals and calls, so that the first and last minute carry the same load. The mix:
9 in 10 calls embed 1-8 short STS-B-like texts (5-40 words), 1 in 10 embeds 4 long texts (~600 tokens, cut at
max_length). Printed: errors by status, the server's RSS each minute and its growth after the first (warm-up)
minute, p50/p99 per minute and the last minute's p99 against the first's.
Targets (issue 13, --minutes 10): zero errors, RSS growth under 5% after warm-up, p99 last/first within 20%.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, stop_process  # noqa: E402
from hostile_load import RssSampler, export_fp32, words  # noqa: E402
from results import write_result  # noqa: E402
from serve_throughput import start_server  # noqa: E402


def make_calls(count: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(count):
        if rng.random() < 0.1:
            calls.append([words(rng, 3000) for _ in range(4)])
        else:
            calls.append([words(rng, int(rng.integers(5, 40)) * 5) for _ in range(int(rng.integers(1, 9)))])
    return calls


async def capacity(client, calls: list[list[str]], clients: int, seconds: float) -> float:
    """Calls per second with `clients` closed-loop callers."""
    stop = time.monotonic() + seconds
    done = [0]

    async def caller(offset: int) -> None:
        i = offset
        while time.monotonic() < stop:
            await client.embed(calls[i % len(calls)])
            done[0] += 1
            i += clients

    started = time.monotonic()
    await asyncio.gather(*(caller(k) for k in range(clients)))
    return done[0] / (time.monotonic() - started)


def minute_schedule(rate: float, calls: int, seed: int) -> list[tuple[float, int]]:
    """One minute of Poisson arrivals at `rate` calls/s: (offset in seconds, index into the calls). Every minute
    replays it, so that minutes differ only by the server's state and the host, not by the draw of the load."""
    rng = np.random.default_rng(seed)
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=int(rate * 60 * 2) + 10))
    offsets = offsets[offsets < 60.0]
    return [(float(offset), int(i) % calls) for i, offset in enumerate(offsets)]


async def soak(client, calls: list[list[str]], rate: float, minutes: int, max_in_flight: int,
               sampler: RssSampler) -> tuple[list[list[float]], collections.Counter, list[int]]:
    import grpc

    schedule = minute_schedule(rate, len(calls), seed=7)
    per_minute: list[list[float]] = [[] for _ in range(minutes)]
    codes: collections.Counter = collections.Counter()
    rss: list[int] = []
    in_flight = asyncio.Semaphore(max_in_flight)
    tasks = set()

    async def one(minute: int, texts: list[str]) -> None:
        t0 = time.monotonic()
        try:
            await client.embed(texts)
            per_minute[minute].append(time.monotonic() - t0)
            codes["OK"] += 1
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
        finally:
            in_flight.release()

    started = time.monotonic()
    for minute in range(minutes):
        for offset, index in schedule:
            await asyncio.sleep(max(0.0, started + minute * 60 + offset - time.monotonic()))
            if in_flight.locked():
                codes["SKIPPED_CLIENT_SIDE"] += 1  # the server fell behind: counted, not queued without bound
                continue
            await in_flight.acquire()
            task = asyncio.ensure_future(one(minute, calls[index]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(max(0.0, started + (minute + 1) * 60 - time.monotonic()))
        rss.append(sampler.rss())
    await asyncio.gather(*tasks)
    return per_minute, codes, rss


async def run(target: str, args: argparse.Namespace, sampler: RssSampler) -> dict:
    """Measure the capacity, soak, print; returns the printed figures."""
    from embedforge.client import AsyncEmbedClient

    calls = make_calls(2000, seed=3)
    async with AsyncEmbedClient(target, timeout=60) as client:
        measured = await capacity(client, calls, args.clients, args.capacity_s)
        rate = 0.8 * measured
        print(f"capacity: {measured:.1f} calls/s with {args.clients} callers; soaking at {rate:.1f} calls/s "
              f"for {args.minutes} min", flush=True)
        per_minute, codes, rss = await soak(client, calls, rate, args.minutes, args.max_in_flight, sampler)
    errors = {code: n for code, n in codes.items() if code != "OK"}
    print(f"calls OK: {codes['OK']}, errors: {errors or 0}")
    figures = {"capacity_calls_per_s": measured, "soak_calls_per_s": rate, "minutes": args.minutes,
               "calls_ok": codes["OK"], "errors": errors, "rss_mb": [value / 1e6 for value in rss],
               "rss_growth_pct": None, "p99_last_vs_first": None,
               "p99_ms": [float(np.quantile(m, 0.99)) * 1e3 if m else None for m in per_minute]}
    for minute, latencies in enumerate(per_minute):
        if latencies:
            print(f"minute {minute + 1}: {len(latencies)} calls, p50 {np.quantile(latencies, 0.5) * 1e3:.1f} ms, "
                  f"p99 {np.quantile(latencies, 0.99) * 1e3:.1f} ms, RSS {rss[minute] / 1e6:.0f} MB")
    if len(rss) >= 2:
        print(f"RSS growth after the first minute: {(rss[-1] / rss[0] - 1) * 100:+.1f}% "
              f"({rss[0] / 1e6:.0f} -> {rss[-1] / 1e6:.0f} MB)")
        figures["rss_growth_pct"] = (rss[-1] / rss[0] - 1) * 100
    filled = [m for m in per_minute if m]
    if len(filled) >= 2:
        first, last = np.quantile(filled[0], 0.99), np.quantile(filled[-1], 0.99)
        print(f"p99 last / first minute: {last / first:.2f} ({first * 1e3:.1f} -> {last * 1e3:.1f} ms)")
        figures["p99_last_vs_first"] = float(last / first)
    return figures


def headline(figures: dict) -> str:
    errors = sum(figures["errors"].values())
    parts = [f"{figures['minutes']} min at {figures['soak_calls_per_s']:.1f} calls/s (80% of capacity): "
             f"{figures['calls_ok']} calls OK, {errors} errors"]
    if figures["rss_growth_pct"] is not None:
        parts.append(f"RSS {figures['rss_growth_pct']:+.1f}% after the first minute")
    if figures["p99_last_vs_first"] is not None:
        parts.append(f"p99 last / first minute {figures['p99_last_vs_first']:.2f}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--export-dir", type=Path, help="an fp32 export (default: export the bundled model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--capacity-s", type=float, default=20.0)
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = args.export_dir or export_fp32(Path(tmp))
        process, target, _ = start_server(export_dir, "fp32", args.threads, [])
        sampler = RssSampler(process.pid)
        try:
            figures = asyncio.run(run(target, args, sampler))
        finally:
            sampler.close()
            stop_process(process)
    cpu = cpu_name()
    print(f"CPU: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    write_result("soak", {"headline": headline(figures), **figures})


if __name__ == "__main__":
    main()
