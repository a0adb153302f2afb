"""Tokens/s of PyTorch vs the exported ONNX fp32 and int8 graphs, measured in one run.

    python benchmarks/export_speed.py                      # exports the bundled model into a temp dir first
    python benchmarks/export_speed.py --export-dir output/vector_model/export

Shapes: batch 32 x 128 tokens and batch 8 x 512 tokens (every token real, no padding). PyTorch runs the
source checkpoint with its default attention (SDPA, which drops an all-ones mask) under inference_mode;
ONNX Runtime runs through the serving runtime (OnnxEmbedder on CPU), which takes the export's unpadded
graph for unpadded batches of >= 256 tokens (here: 8 x 512); both use the same thread count. Engines are
interleaved round by round and each one's fastest round counts (as timeit does: other work on the machine
only ever adds time).
Targets on the 2-core dev machine: fp32 >= 1.1x PyTorch, int8 1.8-2.2x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import export_bundled, stsb_file
from results import write_result

from embedforge.model import BertVectorModel
from embedforge.server.embedder import l2_normalize
from embedforge.server.runtime import OnnxEmbedder

SHAPES = ((32, 128), (8, 512))
STSB_TEST = stsb_file("test")


def measure(engines: dict, batch: int, length: int, vocab_size: int, rounds: int) -> dict[str, float]:
    """Fastest seconds per call of each engine on one random [batch, length] input, engines interleaved."""
    rng = np.random.default_rng(0)
    input_ids = rng.integers(1000, vocab_size, size=(batch, length), dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    outputs = {name: run(input_ids, attention_mask) for name, run in engines.items()}  # warm-up, and a check
    for name, output in outputs.items():
        cosine = float(np.einsum("ij,ij->i", output, outputs["pytorch"]).min())
        if cosine < 0.95:
            sys.exit(f"{name} disagrees with PyTorch at {batch}x{length} (min cosine {cosine:.4f})")
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, run in engines.items():
            start = time.perf_counter()
            run(input_ids, attention_mask)
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def headline(shapes: dict[str, dict[str, dict[str, float]]]) -> str:
    """Each ONNX engine's speed against PyTorch, per shape."""
    return "; ".join(f"{shape}: " + ", ".join(f"{name} {row['vs_pytorch']:.2f}x" for name, row in engines.items()
                                              if name != "pytorch") + " PyTorch"
                     for shape, engines in shapes.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", type=Path, help="an export dir (default: export the bundled model)")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per engine and shape")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for PyTorch and ORT")
    parser.add_argument("--parity-path", type=Path, default=STSB_TEST if STSB_TEST.is_file() else None,
                        help="pair file for the export's parity check (default: STS-B test when present)")
    parser.add_argument("--max-parity-texts", type=int, default=100_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="export-speed-") as workdir:
        export_dir = args.export_dir or export_bundled(Path(workdir), parity_path=args.parity_path,
                                                       max_parity_texts=args.max_parity_texts)
        manifest = json.loads((export_dir / "manifest.json").read_text())
        torch.set_num_threads(args.threads)
        model = BertVectorModel.from_pretrained(manifest["source_checkpoint"]).eval()

        def pytorch(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).numpy()

        engines = {"pytorch": pytorch}
        for precision in ("fp32", "int8"):
            if precision in manifest["models"]:
                embedder = OnnxEmbedder(export_dir, precision=precision, provider="cpu", threads=args.threads)
                engines[f"onnx {precision}"] = (lambda e: lambda ids, mask: l2_normalize(e.run_batch(list(ids))))(
                    embedder)

        print(f"\n{args.threads} threads, best of {args.rounds} rounds")
        print(f"{'shape':<10}{'engine':<12}{'tokens/s':>10}{'vs pytorch':>12}")
        shapes: dict[str, dict[str, dict[str, float]]] = {}
        for batch, length in SHAPES:
            seconds = measure(engines, batch, length, model.encoder.config.vocab_size, args.rounds)
            for name, value in seconds.items():
                ratio = seconds["pytorch"] / value
                print(f"{f'{batch}x{length}':<10}{name:<12}{batch * length / value:>10.0f}{ratio:>11.2f}x")
                shapes.setdefault(f"{batch}x{length}", {})[name] = {"tokens_per_s": batch * length / value,
                                                                    "vs_pytorch": ratio}
    write_result("export_speed", {"headline": headline(shapes), "threads": args.threads, "rounds": args.rounds,
                                  "shapes": shapes})


if __name__ == "__main__":
    main()
