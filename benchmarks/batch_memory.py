"""Working memory and time per text of one model batch, by batch shape: what `--max-batch-tokens` costs.

    python benchmarks/batch_memory.py                                  # exports the bundled model (fp32) first
    python benchmarks/batch_memory.py --export-dir output/vector_model/export --threads 1

Each shape (texts x tokens) runs in a fresh process on one ONNX Runtime session as the server makes it (CPU
memory arena shrunk after each run, --threads intra-op threads: 1 is what each of a 2-core server's two workers
uses under load):
one warm-up batch of one short text, then --repeats batches of the shape. Printed per shape: the peak RSS
growth over the warm process (the batch's working memory) and the best time per text, beside the ratios to the
first shape of the same length. The server's CPU default (4096 tokens: 8 x 512) came from this table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402
from hostile_load import export_fp32  # noqa: E402
from results import write_result  # noqa: E402

SHAPES = [(8, 512), (16, 512), (32, 512), (32, 128), (128, 128), (256, 16), (1024, 16)]

CHILD = """
import json, resource, sys, time
import numpy as np
from embedforge.onnxrt import create_session, shrinking_run
texts, length, threads, repeats = (int(value) for value in sys.argv[1:5])
model = sys.argv[5]
session = create_session(model, threads, ["CPUExecutionProvider"])
ids = np.random.default_rng(0).integers(1000, 2000, size=(texts, length))
feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
session.run(None, {name: value[:1, :8] for name, value in feeds.items()}, shrinking_run())
warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(repeats):
    started = time.perf_counter()
    session.run(None, feeds, shrinking_run())
    times.append(time.perf_counter() - started)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mb": (peak - warm) / 1024, "ms_per_text": 1000 * min(times) / texts}))
"""


def measure(model: Path, texts: int, length: int, threads: int, repeats: int) -> dict:
    command = [sys.executable, "-c", CHILD, str(texts), str(length), str(threads), str(repeats), str(model)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def headline(shapes: dict[str, dict[str, float]], threads: int) -> str:
    """The first shape's working memory and time per text, and the largest working memory measured."""
    first = next(iter(shapes))
    largest = max(shapes, key=lambda shape: shapes[shape]["mb"])
    return (f"{first}: {shapes[first]['mb']:.0f} MB, {shapes[first]['ms_per_text']:.2f} ms per text; largest "
            f"working memory {shapes[largest]['mb']:.0f} MB at {largest} ({threads} intra-op thread(s))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, help="an fp32 export (default: export the bundled model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", action="append", help="TEXTSxTOKENS, e.g. 2x512 (repeatable; default: "
                        + ", ".join(f"{texts}x{length}" for texts, length in SHAPES) + ")")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shape] if args.shape else SHAPES
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = args.export_dir or export_fp32(Path(tmp))
        model = export_dir / json.loads((export_dir / "manifest.json").read_text())["models"]["fp32"]["file"]
        rows = [(texts, length, measure(model, texts, length, args.threads, args.repeats))
                for texts, length in shapes]
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} cores; {args.threads} intra-op thread(s), "
          "memory arena shrunk after each run\n")
    print("| batch | tokens | peak working memory | ms per text | memory / first of its length | time / first |")
    print("|---|---|---|---|---|---|")
    first: dict[int, dict] = {}
    for texts, length, row in rows:
        base = first.setdefault(length, row)
        print(f"| {texts} x {length} | {texts * length} | {row['mb']:.0f} MB | {row['ms_per_text']:.2f} | "
              f"{row['mb'] / base['mb']:.2f} | {row['ms_per_text'] / base['ms_per_text']:.2f} |")
    shapes_figures = {f"{texts}x{length}": row for texts, length, row in rows}
    write_result("batch_memory", {"headline": headline(shapes_figures, args.threads), "threads": args.threads,
                                  "repeats": args.repeats, "shapes": shapes_figures})


if __name__ == "__main__":
    main()
