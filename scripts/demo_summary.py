"""Print the headline figures of a `make demo` run (its output folder is the one argument)."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def load(path: str) -> dict:
    return json.loads((out / path).read_text())


best, report, base = load("model/best_checkpoint.json"), load("model/eval_report.json"), load("base_model_report.json")
tuned = next(r["metrics"] for r in report["results"] if r["name"] == best["checkpoint"])
before = base["results"][0]["metrics"]
run = load("loadtest.json")
print(f"best checkpoint      {best['checkpoint']} (val_loss {best['val_loss']:.4f})")
for name, key in (("Spearman", None), ("retrieval NDCG@10", "ndcg@10"), ("retrieval Recall@10", "recall@10")):
    a, b = (m["spearman"] if key is None else m["retrieval"][key] for m in (before, tuned))
    print(f"{name:<20} base {a:6.2f}   fine-tuned {b:6.2f}")
for precision, model in load("model/export/manifest.json")["models"].items():
    parity = model["parity"]
    print(f"export {precision:<13} cosine vs PyTorch: min {parity['min_cosine']:.5f}, mean {parity['mean_cosine']:.5f}")
print(f"load test            {run['texts_per_s']:.1f} texts/s, p50 {run['latency_ms']['p50']:.1f} ms, "
      f"p99 {run['latency_ms']['p99']:.1f} ms, errors {sum(run['errors'].values())}")
print(f"plots                {out}/model/loss.png  {out}/model/eval_report.png  {out}/loadtest.png")
