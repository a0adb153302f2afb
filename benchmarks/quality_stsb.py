"""Quality on STS Benchmark: the bundled all-MiniLM-L6-v2 before and after `embedforge train`.

The recipe is the one sentence-transformers publishes for this model (CosineSimilarityLoss, 1 epoch,
batch 16, lr 2e-5, warmup 100): its fine-tuned test Spearman is 85.12. This script runs, each step a
real `embedforge` command in a subprocess:

    1. embedforge evaluate --model-name all-MiniLM-L6-v2 --test-path stsb_test.jsonl      (base model)
    2. embedforge train --train-path stsb_train.jsonl --val-path stsb_valid.jsonl --num-epochs 1 \\
           --batch-size 16 --learning-rate 2e-5 --warmup-steps 100 --save-path WORK/model
    3. embedforge evaluate --save-path WORK/model --test-path stsb_test.jsonl --select-best

and prints base vs fine-tuned (best checkpoint by val_loss) beside the sentence-transformers reference.
With --with-st it also trains sentence-transformers itself with the same recipe (if installed) and
scores it with the same metrics code.

    python benchmarks/quality_stsb.py                      # ~25+ min on 2 CPU cores, ~2 min on a GPU
    python benchmarks/quality_stsb.py --max-steps 20       # a quick smoke run of the whole pipeline
    python benchmarks/quality_stsb.py --work-dir out/stsb --skip-train   # re-evaluate a finished run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RECIPE_OPTIONS, STSB_DIR, sentence_transformers_embed, stsb_file, train_sentence_transformers

ST_PUBLISHED = {"spearman": 85.12}  # all-MiniLM-L6-v2 after the recipe, sentence-transformers' published figure
ROWS = ["spearman", "pearson", "retrieval ndcg@10", "retrieval recall@10", "retrieval mrr@10", "retrieval map@10",
        "retrieval ndcg@1"]


def run_embedforge(*args: str) -> float:
    """Run `python -m embedforge ARGS` (output streamed); raise if it fails; return its wall time."""
    command = [sys.executable, "-m", "embedforge", *args]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def figures(metrics: dict) -> dict[str, float]:
    """The table's rows from one entry of an evaluate report's "metrics"."""
    row = {"spearman": metrics["spearman"], "pearson": metrics["pearson"]}
    for name in ROWS[2:]:
        mode, metric = name.split()
        row[name] = metrics[mode][metric]
    return row


def score_sentence_transformers(data_dir: Path, work_dir: Path, device: str, max_steps: int | None) -> dict:
    """The same recipe with sentence-transformers' own training loop, scored with embedforge's metrics."""
    from embedforge.data import read_pairs
    from embedforge.devices import resolve_device
    from embedforge.evaluate.runner import evaluate_pairs

    model = train_sentence_transformers(read_pairs(stsb_file("train", data_dir)), work_dir,
                                        max_steps, str(resolve_device(device)))
    return evaluate_pairs(read_pairs(stsb_file("test", data_dir)), sentence_transformers_embed(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=STSB_DIR,
                        help="holds stsb_{train,valid,test}.jsonl (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="checkpoints and reports go here (default: a new temporary dir, kept)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-train", action="store_true", help="reuse the checkpoints already in WORK/model")
    parser.add_argument("--max-steps", type=int, default=None, help="stop training early (smoke runs)")
    parser.add_argument("--with-st", action="store_true", help="also train and score sentence-transformers")
    args = parser.parse_args()

    data = {split: stsb_file(split, args.data_dir) for split in ("train", "valid", "test")}
    for path in data.values():
        if not path.is_file():
            raise SystemExit(f"{path}: missing (give --data-dir)")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="embedforge-stsb-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    save_path = work_dir / "model"
    print(f"work dir: {work_dir}", flush=True)

    test = ["--test-path", str(data["test"]), "--device", args.device]
    base_seconds = run_embedforge("evaluate", "--model-name", "all-MiniLM-L6-v2", *test,
                              "--output", str(work_dir / "base_report.json"))
    train_seconds = None
    if not args.skip_train:
        limit = ["--max-steps", str(args.max_steps)] if args.max_steps else []
        train_seconds = run_embedforge("train", "--train-path", str(data["train"]), "--val-path", str(data["valid"]),
                                   *RECIPE_OPTIONS, *limit, "--save-path", str(save_path), "--device", args.device)
    run_embedforge("evaluate", "--save-path", str(save_path), *test, "--select-best",
               "--output", str(work_dir / "finetuned_report.json"))

    base = json.loads((work_dir / "base_report.json").read_text())["results"][0]
    finetuned_report = json.loads((work_dir / "finetuned_report.json").read_text())
    best_name = finetuned_report["best"]["checkpoint"]
    best = next(r for r in finetuned_report["results"] if r["name"] == best_name)
    columns = {"base": figures(base["metrics"]), f"fine-tuned ({best_name})": figures(best["metrics"])}
    if args.with_st:
        measured = score_sentence_transformers(args.data_dir, work_dir / "sentence_transformers", args.device,
                                               args.max_steps)
        columns["sentence-transformers (measured)"] = figures(measured)

    names = list(columns)
    print(f"\nSTS-B test ({base['metrics']['pairs']} pairs), all figures x100; "
          f"base evaluated in {base_seconds:.0f} s"
          + (f", trained in {train_seconds:.0f} s" if train_seconds is not None else ""))
    header = f"{'metric':<22}" + "".join(f"{name:>{max(len(name), 10) + 2}}" for name in names)
    print(header + f"{'delta':>9}{'ST published':>15}")
    for row in ROWS:
        cells = "".join(f"{columns[name][row]:>{max(len(name), 10) + 2}.2f}" for name in names)
        delta = columns[names[1]][row] - columns["base"][row]
        published = f"{ST_PUBLISHED[row]:.2f}" if row in ST_PUBLISHED else "-"
        print(f"{row:<22}{cells}{delta:>+9.2f}{published:>15}")
    gap = columns[names[1]]["spearman"] - ST_PUBLISHED["spearman"]
    print(f"\nfine-tuned test Spearman vs sentence-transformers' published 85.12: {gap:+.2f}")
    summary = {"work_dir": str(work_dir), "best_checkpoint": best_name, "train_seconds": train_seconds,
               "columns": columns, "sentence_transformers_published": ST_PUBLISHED}
    (work_dir / "quality_stsb.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {work_dir / 'quality_stsb.json'}")


if __name__ == "__main__":
    main()
