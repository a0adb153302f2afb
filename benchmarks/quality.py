"""Quality on three public pair sets: the training presets beside the base model and sentence-transformers.

The sets are ../shared/data/{stsb,snli,mrpc} (graded similarity; graded entailment whose premises bring their own
hard negatives; binary paraphrase labels). Every run uses the recipe sentence-transformers publishes for
all-MiniLM-L6-v2 (1 epoch, batch 16, lr 2e-5, warmup 100) on SET_train; embedforge keeps the checkpoint its
--select-by prefers on SET_valid and scores it on SET_test. Each step is a real `embedforge` command:

    embedforge evaluate --model-name all-MiniLM-L6-v2 --test-path SET_{valid,test}.jsonl           (base)
    embedforge train --train-path SET_train.jsonl --val-path SET_valid.jsonl --num-epochs 1 --batch-size 16 \\
        --learning-rate 2e-5 --warmup-steps 100 --preset PRESET --seed SEED --save-path WORK/SET/RUN-SEED
    embedforge evaluate --checkpoint-dir WORK/SET/RUN-SEED/<best checkpoint> --test-path SET_test.jsonl

The st-* runs train sentence-transformers' own loop on the same files (CosineSimilarityLoss on every pair;
MultipleNegativesRankingLoss on the pairs with rel >= 0.5), the model after the epoch, scored by embedforge's
metrics. The table gives, per set, Spearman and retrieval NDCG@10 (each query against every document of the
split) on validation (the chosen checkpoint's: what a choice between runs may look at) and on test, x100, each
the mean over the seeds run (--seeds).

    python benchmarks/quality.py --work-dir out/quality                       # the table (hours on 2 CPUs)
    python benchmarks/quality.py --work-dir out/quality --runs balanced --seeds 42 43 44
    python benchmarks/quality.py --work-dir out/quality --report-only         # the table of finished runs
    python benchmarks/quality.py --max-steps 20 --sets stsb                   # a smoke run of the pipeline

Runs already finished in WORK are not trained again; runs can go in parallel processes on one WORK.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RECIPE_OPTIONS, SHARED_DATA, sentence_transformers_embed, train_sentence_transformers
from results import write_result

SETS = ("stsb", "snli", "mrpc")
SEED = 42
# name -> extra `embedforge train` options; "st-*" runs train sentence-transformers instead
RUNS = {
    "similarity": ["--preset", "similarity"],
    "balanced": ["--preset", "balanced"],
    "retrieval": ["--preset", "retrieval"],
    "st-cosine": [],
    "st-mnrl": [],
    # The README's former recommendation, chosen on STS-B test figures: kept for the record
    "former recipe": ["--loss", "weighted-mse+in-batch", "--symmetric", "--positive-threshold", "0.01",
                      "--negative-threshold", "0", "--rel-power", "2", "--scale", "10", "--learning-rate", "5e-5"],
    # The candidates the balanced preset was chosen from, on validation figures (docs/training.md): the in-batch
    # weight alone against the false-negative margin
    "graded w0.1": ["--loss", "weighted-mse+in-batch", "--symmetric", "--positive-threshold", "0.25",
                    "--negative-threshold", "0.2", "--rel-power", "2", "--in-batch-weight", "0.1"],
    "graded w0.1 fn0": ["--loss", "weighted-mse+in-batch", "--symmetric", "--positive-threshold", "0.25",
                        "--negative-threshold", "0.2", "--rel-power", "2", "--in-batch-weight", "0.1",
                        "--false-negative-margin", "0"],
    "graded w0.3 fn0": ["--loss", "weighted-mse+in-batch", "--symmetric", "--positive-threshold", "0.25",
                        "--negative-threshold", "0.2", "--rel-power", "2", "--in-batch-weight", "0.3",
                        "--false-negative-margin", "0"],
    "graded w1 fn0": ["--loss", "weighted-mse+in-batch", "--symmetric", "--positive-threshold", "0.25",
                      "--negative-threshold", "0.2", "--rel-power", "2", "--in-batch-weight", "1",
                      "--false-negative-margin", "0"],
    "graded w1": ["--loss", "weighted-mse+in-batch", "--symmetric", "--positive-threshold", "0.25",
                  "--negative-threshold", "0.2", "--rel-power", "2", "--in-batch-weight", "1"],
}
TABLE_RUNS = ["similarity", "balanced", "retrieval", "st-cosine", "st-mnrl"]
FIGURES = ("val spearman", "val ndcg@10", "spearman", "ndcg@10")


def run_embedforge(*args: str) -> float:
    """Run `python -m embedforge ARGS` (output streamed); raise if it fails; return its wall time."""
    command = [sys.executable, "-m", "embedforge", *args]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def set_file(name: str, split: str, data_dir: Path) -> Path:
    """data_dir/NAME/NAME_SPLIT.jsonl (split: train, valid or test)."""
    return data_dir / name / f"{name}_{split}.jsonl"


def evaluate(model_args: list[str], test_path: Path, report_file: Path, device: str) -> dict:
    """One evaluate report's metrics (retrieval and Spearman only)."""
    if not report_file.is_file():
        run_embedforge("evaluate", *model_args, "--test-path", str(test_path), "--mode", "retrieval",
                       "--device", device, "--output", str(report_file))
    return json.loads(report_file.read_text())["results"][0]["metrics"]


def train_run(name: str, seed: int, run_dir: Path, files: dict[str, Path], args: argparse.Namespace) -> dict:
    """Train one embedforge run and score its best checkpoint on test; returns its figures."""
    from embedforge.checkpoints import resolve_checkpoint

    # a shortened run keeps the shape of the recipe: 10% warmup, checkpoints at half-way and the end
    limit = (["--max-steps", str(args.max_steps), "--warmup-steps", str(max(1, args.max_steps // 10)),
              "--save-steps", str(max(1, args.max_steps // 2))] if args.max_steps else [])
    seconds = run_embedforge("train", "--train-path", str(files["train"]), "--val-path", str(files["valid"]),
                             *RECIPE_OPTIONS, *RUNS[name], *limit, "--seed", str(seed),
                             "--save-path", str(run_dir / "model"), "--device", args.device)
    best = resolve_checkpoint(run_dir / "model")  # the best by the run's own --select-by
    metrics = evaluate(["--checkpoint-dir", str(best.path)], files["test"], run_dir / "report.json", args.device)
    val = best.state["val_metrics"]  # x100, as the reports
    return {"checkpoint": best.name, "train_seconds": seconds, "val spearman": val["val_spearman"],
            "val ndcg@10": val["val_ndcg@10"], **test_figures(metrics)}


def st_run(name: str, seed: int, run_dir: Path, files: dict[str, Path], args: argparse.Namespace) -> dict:
    """st-cosine or st-mnrl: sentence-transformers' loop, the model after the epoch, scored on valid and test."""
    import torch

    from embedforge.data import read_pairs
    from embedforge.devices import resolve_device
    from embedforge.evaluate.runner import evaluate_pairs

    torch.manual_seed(seed)
    start = time.perf_counter()
    model = train_sentence_transformers(read_pairs(files["train"]), run_dir, args.max_steps,
                                        str(resolve_device(args.device)),
                                        loss="cosine" if name == "st-cosine" else "mnrl")
    seconds = time.perf_counter() - start
    embed = sentence_transformers_embed(model)
    valid, test = (evaluate_pairs(read_pairs(files[split]), embed, mode="retrieval", show_progress=False)
                   for split in ("valid", "test"))
    return {"checkpoint": "end of epoch", "train_seconds": seconds,
            **{f"val {key}": value for key, value in test_figures(valid).items()}, **test_figures(test)}


def test_figures(metrics: dict) -> dict[str, float]:
    return {"spearman": metrics["spearman"], "ndcg@10": metrics["retrieval"]["ndcg@10"]}


def run(name: str, data_set: str, seed: int, work_dir: Path, args: argparse.Namespace) -> dict:
    """Train and score one run on one set (unless its result.json exists); returns its result."""
    run_dir = work_dir / data_set / f"{name.replace(' ', '-')}-{seed}"
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished try (killed): train refuses a used save path
    run_dir.mkdir(parents=True)
    files = {split: set_file(data_set, split, args.data_dir) for split in ("train", "valid", "test")}
    score = st_run if name.startswith("st-") else train_run
    result = {"name": name, "set": data_set, "seed": seed, **score(name, seed, run_dir, files, args)}
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def base(data_set: str, work_dir: Path, args: argparse.Namespace) -> dict:
    """The bundled model before fine-tuning, on valid and test."""
    figures = {}
    for split, prefix in (("valid", "val "), ("test", "")):
        metrics = evaluate(["--model-name", "all-MiniLM-L6-v2"], set_file(data_set, split, args.data_dir),
                           work_dir / data_set / f"base_{split}.json", args.device)
        figures.update({prefix + key: value for key, value in test_figures(metrics).items()})
    return {"name": "base", "set": data_set, "seed": None, **figures}


def finished(work_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(work_dir.glob("*/*/result.json"))]


def table(results: list[dict], sets: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """run -> set -> figure -> mean over its seeds (and "seeds": how many)."""
    means: dict[str, dict[str, dict[str, float]]] = {}
    for name in dict.fromkeys(result["name"] for result in results):
        for data_set in sets:
            rows = [r for r in results if r["name"] == name and r["set"] == data_set]
            if rows:
                means.setdefault(name, {})[data_set] = {
                    **{key: statistics.fmean(row[key] for row in rows) for key in FIGURES}, "seeds": len(rows)}
    return means


def print_table(means: dict, sets: list[str]) -> None:
    print("\nSpearman / NDCG@10 x100, validation (the chosen checkpoint) | test; mean over the seeds run (n)")
    print(f"{'run':<18}" + "".join(f"{data_set:>32}" for data_set in sets))
    for name, per_set in means.items():
        cells = []
        for data_set in sets:
            row = per_set.get(data_set)
            cells.append(f"{'-':>32}" if row is None else
                         f"{row['val spearman']:6.2f} {row['val ndcg@10']:6.2f} | {row['spearman']:6.2f} "
                         f"{row['ndcg@10']:6.2f} ({row['seeds']})".rjust(32))
        print(f"{name:<18}" + "".join(cells))


def headline(means: dict) -> str:
    """The recommendation (balanced) on each set's test split, beside the base model."""
    def cell(name: str, data_set: str) -> str:
        row = means.get(name, {}).get(data_set)
        return "-" if row is None else f"{row['spearman']:.2f}/{row['ndcg@10']:.2f}"

    sets = [s for s in SETS if any(s in per_set for per_set in means.values())]
    parts = [f"{s} {cell('balanced', s)} (base {cell('base', s)})" for s in sets]
    seeds = max((means.get("balanced", {}).get(s, {}).get("seeds", 0) for s in sets), default=0)
    return f"balanced preset, test Spearman/NDCG@10 x100, mean of {seeds} seed(s): " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA,
                        help="holds stsb/, snli/ and mrpc/ (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="runs and reports go here (default: a new temporary dir, kept)")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=TABLE_RUNS, help="runs to train and score")
    parser.add_argument("--seeds", nargs="+", type=int, default=[SEED], help="train each run once per seed")
    parser.add_argument("--report-only", action="store_true", help="print the table of the runs finished in WORK")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop training after N steps (10%% warmup, checkpoints at N/2 and N): a shortened run")
    args = parser.parse_args()

    for data_set in args.sets:
        for split in ("train", "valid", "test"):
            if not set_file(data_set, split, args.data_dir).is_file():
                raise SystemExit(f"{set_file(data_set, split, args.data_dir)}: missing (give --data-dir)")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="embedforge-quality-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work_dir}", flush=True)
    results = [base(data_set, work_dir, args) for data_set in args.sets]
    if not args.report_only:
        for data_set in args.sets:
            for name in args.runs:
                for seed in args.seeds:
                    run(name, data_set, seed, work_dir, args)
    results += finished(work_dir)
    means = table(results, args.sets)
    print_table(means, args.sets)
    write_result("quality", {"headline": headline(means), "runs": means})


if __name__ == "__main__":
    main()
