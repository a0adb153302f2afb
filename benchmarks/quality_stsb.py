"""Quality on STS Benchmark: each `--loss` beside the base model and sentence-transformers' losses.

Every run uses the recipe sentence-transformers publishes for all-MiniLM-L6-v2 (1 epoch, batch 16, lr 2e-5,
warmup 100); embedforge runs keep the checkpoint with the lowest validation loss. Each step is a real
`embedforge` command in a subprocess:

    embedforge evaluate --model-name all-MiniLM-L6-v2 --test-path stsb_test.jsonl                 (base)
    embedforge train --train-path stsb_train.jsonl --val-path stsb_valid.jsonl --num-epochs 1 \\
        --batch-size 16 --learning-rate 2e-5 --warmup-steps 100 --loss LOSS [...] --save-path WORK/NAME
    embedforge evaluate --save-path WORK/NAME --test-path stsb_test.jsonl --select-best

The sentence-transformers columns train its own loop on the same files: CosineSimilarityLoss on every pair
(label = rel), MultipleNegativesRankingLoss on the pairs with rel >= 0.5 (its positives), scored with
embedforge's metrics code. The table gives test Spearman and retrieval NDCG@10, MRR@10 and Recall@10 (each
query against every test document), and Spearman/NDCG@10 at each Matryoshka size.

    python benchmarks/quality_stsb.py --work-dir out/stsb                       # everything (hours on 2 CPUs)
    python benchmarks/quality_stsb.py --work-dir out/stsb --runs mse+in-batch in-batch    # some runs
    python benchmarks/quality_stsb.py --work-dir out/stsb --report-only          # the table of finished runs
    python benchmarks/quality_stsb.py --max-steps 20                             # a smoke run of the pipeline

Runs already finished in WORK are not trained again; runs can go in parallel processes on one WORK.
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
from results import write_result

MATRYOSHKA = ["--matryoshka-dims", "384,256,128,64"]
RUNS = {  # name -> extra `embedforge train` options; "st-*" runs train sentence-transformers instead
    "weighted-mse": ["--loss", "weighted-mse"],
    "in-batch": ["--loss", "in-batch"],
    "mse+in-batch": ["--loss", "weighted-mse+in-batch", "--symmetric"],  # docs/training.md's for calibrated correlation
    "mse+in-batch matryoshka": ["--loss", "weighted-mse+in-batch", "--symmetric", *MATRYOSHKA],
    # docs/training.md's recommended recipe: every related pair a positive, weighing rel^2, a softer scale and a higher
    # learning rate (given after the shared recipe's, so it wins)
    "mse+in-batch graded": ["--loss", "weighted-mse+in-batch", "--symmetric", "--positive-threshold", "0.01",
                            "--negative-threshold", "0", "--rel-power", "2", "--scale", "10",
                            "--learning-rate", "5e-5"],
    # E5-style prompts on symmetric data: what they cost or bring beside the plain weighted-mse run
    "weighted-mse prompts": ["--loss", "weighted-mse", "--query-prompt", "query: ", "--document-prompt", "passage: "],
    "st-cosine": [],
    "st-mnrl": [],
}
ROWS = ["spearman", "retrieval ndcg@10", "retrieval mrr@10", "retrieval recall@10"]


def run_embedforge(*args: str) -> float:
    """Run `python -m embedforge ARGS` (output streamed); raise if it fails; return its wall time."""
    command = [sys.executable, "-m", "embedforge", *args]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def figures(metrics: dict) -> dict[str, float]:
    """The table's rows from one evaluate result's metrics."""
    row = {"spearman": metrics["spearman"]}
    for name in ROWS[1:]:
        mode, metric = name.split()
        row[name] = metrics[mode][metric]
    return row


def matryoshka_figures(metrics: dict) -> dict[str, dict[str, float]]:
    return {dim: {"spearman": m["spearman"], "ndcg@10": m["retrieval"]["ndcg@10"]}
            for dim, m in metrics.get("matryoshka", {}).items()}


def score_sentence_transformers(name: str, work_dir: Path, args: argparse.Namespace) -> tuple[dict, float]:
    """st-cosine (CosineSimilarityLoss) or st-mnrl (MultipleNegativesRankingLoss) with the same recipe, in
    sentence-transformers' own loop, scored with embedforge's metrics. No checkpoint selection: the model
    after the epoch."""
    from embedforge.data import read_pairs
    from embedforge.devices import resolve_device
    from embedforge.evaluate.runner import evaluate_pairs

    start = time.perf_counter()
    model = train_sentence_transformers(read_pairs(stsb_file("train", args.data_dir)), work_dir, args.max_steps,
                                        str(resolve_device(args.device)),
                                        loss="cosine" if name == "st-cosine" else "mnrl")
    seconds = time.perf_counter() - start
    test = read_pairs(stsb_file("test", args.data_dir))
    return evaluate_pairs(test, sentence_transformers_embed(model), show_progress=False), seconds


def run(name: str, work_dir: Path, data: dict[str, Path], args: argparse.Namespace) -> dict:
    """Train and score one run (unless WORK/NAME/result.json exists); returns its result."""
    run_dir = work_dir / name.replace(" ", "-")
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    if name.startswith("st-"):
        metrics, seconds = score_sentence_transformers(name, run_dir, args)
        result = {"name": name, "checkpoint": "end of epoch", "train_seconds": seconds, "metrics": metrics}
    else:
        # a shortened run keeps the shape of the recipe: 10% warmup, checkpoints at half-way and the end
        limit = (["--max-steps", str(args.max_steps), "--warmup-steps", str(max(1, args.max_steps // 10)),
                  "--save-steps", str(max(1, args.max_steps // 2))] if args.max_steps else [])
        seconds = run_embedforge("train", "--train-path", str(data["train"]), "--val-path", str(data["valid"]),
                                 *RECIPE_OPTIONS, *RUNS[name], *limit, "--save-path", str(run_dir / "model"),
                                 "--device", args.device)
        report_file = run_dir / "report.json"
        run_embedforge("evaluate", "--save-path", str(run_dir / "model"), "--test-path", str(data["test"]),
                       "--device", args.device, "--select-best", "--output", str(report_file))
        report = json.loads(report_file.read_text())
        best = next(r for r in report["results"] if r["name"] == report["best"]["checkpoint"])
        result = {"name": name, "checkpoint": best["name"], "train_seconds": seconds, "metrics": best["metrics"]}
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def base(work_dir: Path, data: dict[str, Path], device: str) -> dict:
    report_file = work_dir / "base_report.json"
    if not report_file.is_file():
        run_embedforge("evaluate", "--model-name", "all-MiniLM-L6-v2", "--test-path", str(data["test"]),
                       "--device", device, "--output", str(report_file))
    metrics = json.loads(report_file.read_text())["results"][0]["metrics"]
    return {"name": "base", "checkpoint": "-", "train_seconds": None, "metrics": metrics}


def print_table(results: list[dict]) -> None:
    print("\nSTS-B test, all figures x100 (retrieval: each test query against every test document)")
    print(f"{'run':<26}{'checkpoint':>22}{'train s':>9}" + "".join(f"{row:>21}" for row in ROWS))
    for result in results:
        cells = "".join(f"{value:>21.2f}" for value in figures(result["metrics"]).values())
        seconds = "-" if result["train_seconds"] is None else f"{result['train_seconds']:.0f}"
        print(f"{result['name']:<26}{result['checkpoint']:>22}{seconds:>9}{cells}")
    for result in results:
        sizes = matryoshka_figures(result["metrics"])
        if sizes:
            print(f"\n{result['name']}: by Matryoshka size (dims: Spearman / NDCG@10)")
            for dim, row in sizes.items():
                print(f"  {dim:>5}: {row['spearman']:6.2f} / {row['ndcg@10']:6.2f}")


def headline(runs: dict[str, dict[str, float]]) -> str:
    """One line of the per-run figures (x100): the best trained run's test Spearman and retrieval NDCG@10, beside
    the base model's and sentence-transformers' cosine run."""
    def best(metric: str) -> str:
        name = max(trained, key=lambda run: trained[run][metric])
        return f"{name} {trained[name][metric]:.2f}"

    trained = {name: row for name, row in runs.items() if name != "base"}
    anchors = [f"{name} {runs[name]['spearman']:.2f} / {runs[name]['retrieval ndcg@10']:.2f}"
               for name in ("base", "st-cosine") if name in runs]
    if not trained:
        return "test Spearman / NDCG@10 x100: " + ", ".join(anchors)
    return (f"best test Spearman x100: {best('spearman')}; best NDCG@10: {best('retrieval ndcg@10')}"
            + (f" (Spearman / NDCG@10: {', '.join(anchors)})" if anchors else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=STSB_DIR,
                        help="holds stsb_{train,valid,test}.jsonl (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="runs and reports go here (default: a new temporary dir, kept)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="runs to train and score")
    parser.add_argument("--report-only", action="store_true", help="print the table of the runs finished in WORK")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop training after N steps (10%% warmup, checkpoints at N/2 and N): a shortened run")
    args = parser.parse_args()

    data = {split: stsb_file(split, args.data_dir) for split in ("train", "valid", "test")}
    for path in data.values():
        if not path.is_file():
            raise SystemExit(f"{path}: missing (give --data-dir)")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="embedforge-stsb-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work_dir}", flush=True)
    results = [base(work_dir, data, args.device)]
    for name in RUNS:
        result_file = work_dir / name.replace(" ", "-") / "result.json"
        if args.report_only:
            if result_file.is_file():
                results.append(json.loads(result_file.read_text()))
        elif name in args.runs:
            results.append(run(name, work_dir, data, args))
    print_table(results)
    (work_dir / "quality_stsb.json").write_text(json.dumps(results, indent=2) + "\n")
    runs = {result["name"]: figures(result["metrics"]) for result in results}
    write_result("quality_stsb", {"headline": headline(runs), "runs": runs})


if __name__ == "__main__":
    main()
