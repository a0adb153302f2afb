"""What each output type costs: STS-B test Spearman and retrieval NDCG@10 of float32, int8, uint8, binary and
ubinary codes of the same export, scored as a vector store compares them (embedforge/quantize.py).

    python benchmarks/output_types.py                      # exports the bundled model into a temp dir first
    python benchmarks/output_types.py --export-dir output/vector_model/export

The export calibrates int8/uint8 on STS-B validation texts (its parity file), never on the test split; the
figures are `embedforge evaluate --export-dir EXPORT --test-path stsb_test.jsonl --output-types ...`.
Target: int8 within 0.5 of float32 on both figures; binary reported.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import cpu_name, export_bundled, stsb_file
from results import write_result

from embedforge.data import read_pairs
from embedforge.evaluate.runner import evaluate_export
from embedforge.quantize import OUTPUT_TYPES


def headline(rows: dict[str, dict[str, float]]) -> str:
    base = rows["float32"]
    parts = [f"{name} {row['spearman']:.2f}/{row['ndcg@10']:.2f} ({row['spearman'] - base['spearman']:+.2f}/"
             f"{row['ndcg@10'] - base['ndcg@10']:+.2f})" for name, row in rows.items() if name != "float32"]
    return (f"STS-B test Spearman/NDCG@10 x100: float32 {base['spearman']:.2f}/{base['ndcg@10']:.2f}; "
            + ", ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, default=None,
                        help="an export to score (default: the bundled model, exported with STS-B validation texts "
                        "as its parity and calibration data)")
    parser.add_argument("--test-path", type=Path, default=stsb_file("test"))
    args = parser.parse_args()

    export_dir = args.export_dir
    if export_dir is None:
        export_dir = export_bundled(Path(tempfile.mkdtemp(prefix="embedforge-types-")), ("fp32",),
                                    parity_path=stsb_file("valid"))
    metrics = evaluate_export(export_dir, read_pairs(args.test_path), OUTPUT_TYPES, mode="retrieval")
    rows = {name: {"spearman": figures["spearman"], "ndcg@10": figures["retrieval"]["ndcg@10"]}
            for name, figures in metrics["output_types"].items()}
    print(f"\n{args.test_path.name}, {cpu_name()}; x100 (change against float32)")
    print(f"{'output type':<12}{'Spearman':>10}{'NDCG@10':>10}{'bytes/vector':>14}")
    dim = json.loads((export_dir / "manifest.json").read_text())["dim"]
    for name, row in rows.items():
        row["bytes"] = {"float32": 4 * dim, "int8": dim, "uint8": dim}.get(name, -(-dim // 8))
        print(f"{name:<12}{row['spearman']:>10.2f}{row['ndcg@10']:>10.2f}{row['bytes']:>14}")
    write_result("output_types", {"headline": headline(rows), "types": rows})


if __name__ == "__main__":
    main()
