"""Honest load and throughput against earlier commits, in one run (issue 25).

    python benchmarks/admission.py --export-dir output/vector_model/export --baseline 527f74c --baseline 9b77739

Servers: `embedforge serve` from this tree and from each --baseline commit (checked out with `git worktree` into
a temporary folder and run from there), on the same fp32 export with the flags all of them share (CPU,
--threads, defaults otherwise). Loads, each call sent once (no client retries; a refusal is counted, not
retried), one gRPC connection per client as separate processes would have, every call's deadline 60 s:
- docs 4x4: 4 clients x 4 documents of 256-640 tokens per call (--docs documents, cut at max_length);
- stsb 16x8 and stsb 64x8: the unique sentences of STS-B test, 16 or 64 clients x 8 per call;
- stsb 64x64: the same sentences twice over, 64 clients x 64 per call.
Servers run interleaved for --rounds rounds (a busy moment hits all alike); the median counts. Raw ONNX Runtime
(the server's session options, no server): the documents as each call's 4 in one padded batch, in order (what a
client would run itself), the sentences in length-sorted batches of 32 (serve_throughput.py's reference).
Targets: no refusal or failure on any load from this tree; docs 4x4 and stsb 16x8 not below the first baseline;
docs 4x4 >= 1.1x raw ORT and stsb 16x8 >= 0.97x raw ORT.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, stop_process, stsb_file  # noqa: E402
from hostile_load import export_fp32, words  # noqa: E402
from results import write_result  # noqa: E402
from serve_throughput import RawOrt, free_port, read_texts  # noqa: E402

from embedforge.io import write_text_atomic  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EMBED = "/embedforge.v1.EmbeddingService/Embed"
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1),
                  ("grpc.max_receive_message_length", -1)]


def start_server(source: Path, export_dir: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`embedforge serve` of the code in `source` (its package first on the path); (process, target) once
    SERVING."""
    from embedforge.client import EmbedClient

    port = free_port()
    command = [sys.executable, "-m", "embedforge", "serve", "--model-dir", str(export_dir), "--port", str(port),
               "--precision", "fp32", "--provider", "cpu", "--threads", str(threads), "--log-level", "warning", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(source)}
    process = subprocess.Popen(command, cwd=source, env=env)
    target = f"127.0.0.1:{port}"
    with EmbedClient(target, timeout=1) as client:
        for _ in range(900):
            try:
                if client.health() == "SERVING":
                    return process, target
            except Exception:  # not listening yet
                if process.poll() is not None:
                    sys.exit(f"server of {source} exited with {process.returncode}")
            time.sleep(0.1)
    process.kill()
    sys.exit(f"server of {source} did not become SERVING within 90 s")


async def drive(target: str, calls: list[list[str]], clients: int) -> tuple[float, collections.Counter]:
    """(texts/s, status counts) of `clients` callers taking the calls in turn, each call sent once."""
    import grpc

    from embedforge.client import build_embed_request

    bodies = [build_embed_request(texts).SerializeToString() for texts in calls]
    codes: collections.Counter = collections.Counter()
    next_call = iter(range(len(calls)))
    channels = [grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(clients)]
    try:
        async def client(channel) -> int:
            embed = channel.unary_unary(EMBED, request_serializer=None, response_deserializer=None)
            sent = 0
            for i in next_call:
                try:
                    await embed(bodies[i], timeout=60)
                    codes["OK"] += 1
                    sent += len(calls[i])
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
            return sent

        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        started = time.perf_counter()
        texts = sum(await asyncio.gather(*(client(channel) for channel in channels)))
        return texts / (time.perf_counter() - started), codes
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def loads(documents: list[str], sentences: list[str]) -> dict[str, tuple[list[list[str]], int]]:
    """name -> (calls, clients)."""
    def cut(texts: list[str], size: int) -> list[list[str]]:
        return [texts[i: i + size] for i in range(0, len(texts), size)]

    return {"docs 4x4": (cut(documents, 4), 4), "stsb 16x8": (cut(sentences, 8), 16),
            "stsb 64x8": (cut(sentences, 8), 64), "stsb 64x64": (cut(sentences * 2, 64), 64)}


def measure_server(source: Path, extra: list[str], export_dir: Path, threads: int,
                   work: dict[str, tuple[list[list[str]], int]]) -> dict[str, tuple[float, collections.Counter]]:
    process, target = start_server(source, export_dir, threads, extra)
    try:
        asyncio.run(drive(target, work["docs 4x4"][0][:4], 4))  # warm-up: the long shapes
        return {name: asyncio.run(drive(target, calls, clients)) for name, (calls, clients) in work.items()}
    finally:
        stop_process(process)


def raw_docs_per_s(export_dir: Path, calls: list[list[str]], threads: int) -> float:
    """Each call's documents as one batch padded to its longest, in order, on the server's session options."""
    from embedforge.server.runtime import OnnxEmbedder

    embedder = OnnxEmbedder(export_dir, precision="fp32", provider="cpu", threads=threads)
    batches = [embedder.tokenize(texts).ids for texts in calls]
    embedder.run_batch(batches[0])
    started = time.perf_counter()
    for batch in batches:
        embedder.run_batch(batch)
    return sum(map(len, batches)) / (time.perf_counter() - started)


def checkout(revision: str, folder: Path) -> Path:
    path = folder / revision
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(path), revision],
                   check=True)
    return path


def headline(loads: dict) -> str:
    """One line of the result's `loads`: this tree's docs 4x4 and stsb 16x8 rates, against the first other server
    and raw ORT, and the calls refused or failed on this tree."""
    def rate(name: str, label: str) -> float:
        return loads[name]["texts_per_s"][label]

    first = next((label for label in loads["docs 4x4"]["texts_per_s"] if label != "this tree"), None)
    parts = [f"this tree: docs 4x4 {rate('docs 4x4', 'this tree'):.1f}, stsb 16x8 {rate('stsb 16x8', 'this tree'):.1f}"
             " texts/s"]
    if first is not None:
        parts.append(f"{rate('docs 4x4', 'this tree') / rate('docs 4x4', first):.2f}x / "
                     f"{rate('stsb 16x8', 'this tree') / rate('stsb 16x8', first):.2f}x {first}")
    raw = [f"{rate(name, 'this tree') / loads[name]['raw_ort_texts_per_s']:.2f}x"
           for name in ("docs 4x4", "stsb 16x8") if loads[name].get("raw_ort_texts_per_s")]
    if raw:
        parts.append(" / ".join(raw) + " raw ORT")
    not_ok = sum(n for load in loads.values() for code, n in load["codes"]["this tree"].items() if code != "OK")
    return "; ".join(parts) + f"; calls refused or failed on this tree: {not_ok}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, help="an fp32 export (default: export the bundled model)")
    parser.add_argument("--baseline", action="append", default=[], help="a commit to compare with (repeatable)")
    parser.add_argument("--variant", action="append", default=[], help="this tree again with these `embedforge "
                        "serve` options, e.g. '--max-batch-tokens 16384' (repeatable)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--docs", type=int, default=96)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", type=Path, help="also copy the result JSON here (it always goes to "
                        "benchmarks/results/admission.json)")
    args = parser.parse_args()

    rng = np.random.default_rng(5)
    documents = [words(rng, int(rng.integers(1280, 3200))) for _ in range(args.docs)]  # ~256-640 tokens
    sentences = read_texts(stsb_file("test"))
    work = loads(documents, sentences)
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = args.export_dir or export_fp32(Path(tmp))
        sources = {"this tree": (REPO, []), **{f"this tree {v}": (REPO, v.split()) for v in args.variant},
                   **{rev: (checkout(rev, Path(tmp)), []) for rev in args.baseline}}
        try:
            results: dict[str, dict[str, list]] = {label: collections.defaultdict(list) for label in sources}
            for round_ in range(args.rounds):
                for label, (source, extra) in sources.items():
                    for name, (rate, codes) in measure_server(source, extra, export_dir, args.threads,
                                                              work).items():
                        results[label][name].append((rate, codes))
                        print(f"round {round_ + 1}, {label}, {name}: {rate:.1f} texts/s {dict(codes)}", flush=True)
            raw = {"docs 4x4": raw_docs_per_s(export_dir, work["docs 4x4"][0], args.threads),
                   "stsb 16x8": RawOrt(export_dir, "fp32", sentences, args.threads, 32).texts_per_s()}
        finally:
            for source, _ in sources.values():
                if source != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(source)])

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; servers --threads {args.threads}; this tree on {commit} "
          f"(plus uncommitted changes, if any); medians of {args.rounds} rounds; raw ORT measured once after\n")
    labels = list(sources)
    print("| load | " + " | ".join(f"{label} texts/s (refused, failed)" for label in labels)
          + "".join(f" | this tree / {label}" for label in labels[1:]) + " | this tree / raw ORT |")
    print("|---|" + "---|" * (2 * len(labels)))
    summary = {}
    for name in work:
        medians = {label: float(np.median([rate for rate, _ in results[label][name]])) for label in labels}
        totals = {label: sum((codes for _, codes in results[label][name]), collections.Counter()) for label in labels}
        cells = [f"{medians[label]:.1f} ({totals[label]['RESOURCE_EXHAUSTED']}, "
                 f"{sum(totals[label].values()) - totals[label]['OK'] - totals[label]['RESOURCE_EXHAUSTED']})"
                 for label in labels]
        ratios = [f"{medians['this tree'] / medians[label]:.2f}" for label in labels[1:]]
        versus_raw = f"{medians['this tree'] / raw[name]:.2f} ({raw[name]:.1f})" if name in raw else "-"
        print(f"| {name} | " + " | ".join(cells + ratios + [versus_raw]) + " |")
        summary[name] = {"texts_per_s": medians, "codes": {label: dict(totals[label]) for label in labels},
                         "raw_ort_texts_per_s": raw.get(name)}
    path = write_result("admission", {"headline": headline(summary), "rounds": args.rounds, "loads": summary})
    if args.output and args.output.resolve() != path.resolve():
        write_text_atomic(args.output, path.read_text())


if __name__ == "__main__":
    main()
