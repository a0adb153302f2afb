"""What the quick worker (`--quick-batch-tokens`) costs in throughput: the server's texts/s with each budget.

    python benchmarks/quick_worker.py --export-dir output/vector_model/export
    python benchmarks/quick_worker.py --budgets 0,512,1024 --rounds 2

For each budget (0: no quick worker), `embedforge serve` runs in a subprocess (--threads, default flags
otherwise) and is driven by concurrent clients over gRPC until every text was sent once:
- documents: --docs texts of ~600 tokens (cut at max_length), --doc-clients callers x 4 texts per call;
- sentences: the unique sentences of STS-B test, 16 callers x 8 texts per call.
Budgets run interleaved for --rounds rounds and the median counts. Printed: texts/s and the ratio to budget 0.
What the quick worker buys (a short request's wait under load) is measured by benchmarks/hostile_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, stop_process, stsb_file  # noqa: E402
from hostile_load import export_fp32, words  # noqa: E402
from serve_throughput import drive, read_texts, start_server  # noqa: E402


def measure(export_dir: Path, budget: int, threads: int, documents: list[str], sentences: list[str],
            doc_clients: int) -> tuple[float, float]:
    """(documents/s, sentences/s) of a server whose quick worker has `budget` tokens."""
    process, target, _ = start_server(export_dir, "fp32", threads, ["--quick-batch-tokens", str(budget)])
    try:
        asyncio.run(drive(target, documents[:8], doc_clients, 4))  # warm-up: the long shapes
        docs = asyncio.run(drive(target, documents, doc_clients, 4))
        short = asyncio.run(drive(target, sentences, 16, 8))
    finally:
        stop_process(process)
    return docs, short


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, help="an fp32 export (default: export the bundled model)")
    parser.add_argument("--budgets", default="0,512,1024")
    parser.add_argument("--docs", type=int, default=96)
    parser.add_argument("--doc-clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    rng = np.random.default_rng(5)
    documents = [words(rng, 3000) for _ in range(args.docs)]
    sentences = read_texts(stsb_file("test"))
    results: dict[int, list[tuple[float, float]]] = {b: [] for b in budgets}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = args.export_dir or export_fp32(Path(tmp))
        for round_ in range(args.rounds):
            for budget in budgets:
                results[budget].append(measure(export_dir, budget, args.threads, documents, sentences,
                                               args.doc_clients))
                print(f"round {round_ + 1}, quick budget {budget}: {results[budget][-1][0]:.2f} docs/s, "
                      f"{results[budget][-1][1]:.0f} sentences/s", flush=True)
    median = {b: np.median(np.array(r), axis=0) for b, r in results.items()}
    base = median[budgets[0]]
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; server --threads {args.threads}, medians of "
          f"{args.rounds} rounds\n")
    print(f"| quick budget | docs/s | / budget {budgets[0]} | sentences/s | / budget {budgets[0]} |")
    print("|---|---|---|---|---|")
    for budget, (docs, short) in median.items():
        print(f"| {budget} | {docs:.2f} | {docs / base[0]:.2f} | {short:.0f} | {short / base[1]:.2f} |")


if __name__ == "__main__":
    main()
