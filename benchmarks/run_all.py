"""Run every benchmark in this folder, one after another, and collect their printed ratios in one markdown file.

    python benchmarks/run_all.py [--quick] [--output output/bench/summary.md]

--quick shortens the training benchmarks (a few dozen steps instead of a full STS-B epoch). The benchmarks
run one at a time: on a small machine, two at once would measure each other. The training benchmarks work in
WORK_DIRS beside the summary; a new run replaces the previous run's (the summary keeps the figures).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK_DIRS = ("train", "quality")


def benchmarks(quick: bool, work: Path) -> list[tuple[str, list[str]]]:
    steps = ["--max-steps", "60"] if quick else []
    return [
        ("Training speed vs sentence-transformers", ["train_speed.py", "--work-dir", str(work / WORK_DIRS[0]), *steps]),
        ("Export speed: PyTorch vs ONNX fp32 vs ONNX int8", ["export_speed.py"]),
        ("Serving throughput and latency", ["serve_throughput.py"]),
        ("Embedding a corpus: embed-corpus vs raw ONNX Runtime, sentence-transformers and local Ray",
         ["embed_corpus.py", *(["--sentences", "2000", "--docs", "32"] if quick else [])]),
        ("Scaling out: replicas x threads, failover", ["scale_out.py"]),
        ("Quality on STS-B, SNLI and MRPC: the presets beside the base model and sentence-transformers",
         ["quality.py", "--work-dir", str(work / WORK_DIRS[1]), *steps]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short training runs")
    parser.add_argument("--output", type=Path, default=Path("output/bench/summary.md"))
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for name in WORK_DIRS:  # the training runs refuse a used work dir: start from empty ones
        shutil.rmtree(args.output.parent / name, ignore_errors=True)
    sections, failures = [f"# embedforge benchmarks ({time.strftime('%Y-%m-%d %H:%M')})\n"], 0
    for title, command in benchmarks(args.quick, args.output.parent):
        print(f"==> {title}: {' '.join(command)}", flush=True)
        started = time.perf_counter()
        run = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], capture_output=True, text=True)
        print(run.stdout, flush=True)
        elapsed = time.perf_counter() - started
        body = run.stdout.strip() if run.returncode == 0 else f"FAILED (exit {run.returncode})\n\n```\n" \
            f"{run.stderr.strip()[-3000:]}\n```"
        failures += run.returncode != 0
        sections.append(f"## {title}\n\n`python benchmarks/{' '.join(command)}` ({elapsed:.0f} s)\n\n{body}\n")
    args.output.write_text("\n".join(sections))
    print(f"summary: {args.output}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
