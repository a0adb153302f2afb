"""Scaling out on one host: 1 replica x 2 threads against 2 replicas x 1 thread, and failover, measured in one run.

    python benchmarks/scale_out.py                         # exports the bundled model (fp32) into a temp dir
    python benchmarks/scale_out.py --export-dir output/vector_model/export --duration 8 --rounds 3

Texts: STS-B test (../shared/data/stsb/stsb_test.jsonl), driven by `embedforge loadtest` (a subprocess, closed
loop, --clients callers x --batch texts per call) against `embedforge serve` subprocesses on 127.0.0.1.
- throughput: one replica with --threads 2 (2 workers) against two replicas with --threads 1 --workers 1
  behind the client's round robin (`--target a,b`), on the same cores (all of this host's, shared with the
  load generator in both cases), interleaved for --rounds rounds; the median counts.
- failover: two replicas x 1 thread under load; at --kill-at s one is SIGKILLed and restarted at once on
  the same port (what a Deployment does). Reported: failed calls at the client, throughput before, the
  lowest 0.5 s step after the kill, the last steps, and how long the restarted replica took to get calls.
- memory: peak RSS of a replica (for the Kubernetes requests in deploy/k8s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, export_bundled, stsb_file  # noqa: E402
from results import write_result  # noqa: E402
from serve_throughput import free_port, read_texts  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class Replica:
    def __init__(self, export_dir: Path, threads: int, workers: int, port: int | None = None) -> None:
        self.port, self.metrics_port = port or free_port(), free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "embedforge", "serve", "--model-dir", str(export_dir), "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--precision", "fp32", "--provider", "cpu",
             "--threads", str(threads), "--workers", str(workers), "--log-level", "warning"], env=ENV)
        self.started = time.monotonic()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self) -> float:
        """Seconds from process start to SERVING."""
        from embedforge.client import EmbedClient

        with EmbedClient(self.target, timeout=1) as client:
            for _ in range(1200):
                try:
                    if client.health() == "SERVING":
                        return time.monotonic() - self.started
                except Exception:  # noqa: BLE001 - not listening yet
                    if self.process.poll() is not None:
                        sys.exit(f"replica exited with {self.process.returncode}")
                time.sleep(0.05)
        sys.exit("replica not SERVING within 60 s")

    def embed_calls(self) -> int:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                       if line.startswith("embedforge_requests_total{") and 'rpc="Embed"' in line
                       and 'code="OK"' in line))

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def loadtest(targets: str, args: argparse.Namespace, duration: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embedforge", "loadtest", "--target", targets, "--data", str(args.data),
         "--concurrency", str(args.clients), "--batch", str(args.batch), "--duration", str(duration),
         "--warmup", "1", "--deadline-ms", "10000", "--output", str(out), "--plot", str(out.with_suffix(".png"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(process: subprocess.Popen, out: Path) -> dict:
    _, err = process.communicate(timeout=300)
    if process.returncode != 0:
        sys.exit(f"loadtest failed: {err}")
    return json.loads(out.read_text())


def throughput(export_dir: Path, layout: tuple[int, int, int], args: argparse.Namespace, out: Path) -> tuple[float,
                                                                                                                float]:
    """(texts/s, peak RSS MiB of the first replica) of `count` replicas x `threads` threads x `workers`."""
    count, threads, workers = layout
    replicas = [Replica(export_dir, threads, workers) for _ in range(count)]
    try:
        for replica in replicas:
            replica.wait_serving()
        report = finish(loadtest(",".join(r.target for r in replicas), args, args.duration, out), out)
        if report["errors"]:
            sys.exit(f"errors during the throughput run: {report['errors']}")
        return report["texts_per_s"], replicas[0].peak_rss_mib()
    finally:
        for replica in replicas:
            replica.stop()


def failover(export_dir: Path, args: argparse.Namespace, out: Path) -> dict:
    replicas = [Replica(export_dir, 1, 1) for _ in range(2)]
    try:
        for replica in replicas:
            replica.wait_serving()
        load = loadtest(",".join(r.target for r in replicas), args, args.failover_duration, out)
        time.sleep(1 + args.kill_at)  # warmup + kill_at
        replicas[0].process.send_signal(signal.SIGKILL)
        replicas[0].process.wait()
        killed_at = time.monotonic()
        replicas[0] = Replica(export_dir, 1, 1, port=replicas[0].port)
        start_s = replicas[0].wait_serving()
        while replicas[0].embed_calls() == 0 and time.monotonic() - killed_at < args.failover_duration:
            time.sleep(0.05)
        calls_after_s = time.monotonic() - killed_at
        report = finish(load, out)
    finally:
        for replica in replicas:
            replica.stop()
    line, step = report["timeline"]["ok_per_s"], report["timeline"]["step_s"]
    kill_step = int(args.kill_at / step)
    return {
        "failed_calls": sum(report["errors"].values()), "ok_calls": report["ok"], "errors": report["errors"],
        "before_calls_per_s": statistics.mean(line[1:kill_step]),
        "lowest_step_after_kill": min(line[kill_step: kill_step + int(4 / step)]),
        "last_2s_calls_per_s": statistics.mean(line[-int(2 / step) - 1: -1]),
        "restart_to_serving_s": start_s, "kill_to_first_call_s": calls_after_s, "timeline": line,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", type=Path, help="export with an fp32 model (default: export the bundled "
                        "model into a temp dir)")
    parser.add_argument("--data", type=Path, default=stsb_file("test"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="texts per call")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--failover-duration", type=float, default=14.0)
    parser.add_argument("--kill-at", type=float, default=4.0, help="seconds into the measured failover run")
    args = parser.parse_args()

    cpu = cpu_name()
    print(f"host: {os.cpu_count()} cores, {cpu}, {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_dir = args.export_dir or export_bundled(work, ("fp32",), parity_texts=read_texts(args.data)[:256])
        layouts = {"1 replica x 2 threads": (1, 2, 2), "2 replicas x 1 thread": (2, 1, 1)}
        results: dict[str, list[float]] = {name: [] for name in layouts}
        rss: dict[str, float] = {}
        for round_ in range(args.rounds):
            for name, layout in layouts.items():
                texts_per_s, rss[name] = throughput(export_dir, layout, args, work / f"tp-{round_}-{layout[0]}.json")
                results[name].append(texts_per_s)
                print(f"  round {round_ + 1} {name}: {texts_per_s:.0f} texts/s", flush=True)
        one, two = (statistics.median(results[name]) for name in layouts)
        print(f"\nthroughput (median of {args.rounds}, {args.clients} clients x {args.batch} texts per call):")
        print(f"  1 replica x 2 threads: {one:.0f} texts/s (peak RSS {rss['1 replica x 2 threads']:.0f} MiB)")
        print(f"  2 replicas x 1 thread: {two:.0f} texts/s (peak RSS {rss['2 replicas x 1 thread']:.0f} MiB each)")
        print(f"  ratio 2x1 / 1x2: {two / one:.2f}")
        fail = failover(export_dir, args, work / "failover.json")
        print(f"\nfailover (2 replicas x 1 thread, SIGKILL of one at {args.kill_at:g} s, restarted at once):")
        print(f"  failed calls at the client: {fail['failed_calls']} of {fail['ok_calls'] + fail['failed_calls']} "
              f"{fail['errors'] or ''}")
        print(f"  calls/s before: {fail['before_calls_per_s']:.0f}; lowest 0.5 s step after the kill: "
              f"{fail['lowest_step_after_kill']:.0f}; last 2 s: {fail['last_2s_calls_per_s']:.0f}")
        print(f"  restarted replica SERVING after {fail['restart_to_serving_s']:.1f} s, first call "
              f"{fail['kill_to_first_call_s']:.1f} s after the kill")
        print("  timeline (OK calls/s per 0.5 s): " + " ".join(f"{v:.0f}" for v in fail["timeline"]))
    total = fail["ok_calls"] + fail["failed_calls"]
    write_result("scale_out", {
        "headline": f"2 replicas x 1 thread {two:.0f} texts/s = {two / one:.2f}x 1 replica x 2 threads ({one:.0f}); "
                    f"failover: {fail['failed_calls']} of {total} calls failed, the restarted replica took calls "
                    f"{fail['kill_to_first_call_s']:.1f} s after the kill",
        "texts_per_s": {"1 replica x 2 threads": one, "2 replicas x 1 thread": two}, "ratio_2x1_vs_1x2": two / one,
        "peak_rss_mib": rss, "clients": args.clients, "batch": args.batch, "rounds": args.rounds,
        "failover": {key: fail[key] for key in ("ok_calls", "failed_calls", "errors", "before_calls_per_s",
                                                "lowest_step_after_kill", "last_2s_calls_per_s",
                                                "restart_to_serving_s", "kill_to_first_call_s")}})


if __name__ == "__main__":
    main()
