"""embed-corpus throughput: the whole job vs raw ONNX Runtime, sentence-transformers and the local-Ray run.

    python benchmarks/embed_corpus.py                     # exports the bundled model into a temp dir
    python benchmarks/embed_corpus.py --export-dir output/vector_model/export --rounds 3

Corpora (JSONL, `document` field): the unique sentences of STS-B train+valid+test (--stsb-dir, default
../shared/data/stsb), and --docs documents of 512 tokens built by joining consecutive sentences (cut at 512).
- embed-corpus: `embedforge embed-corpus` run in this process, timed end to end (model load, input scan and
  hash, tokenizing, embedding, Parquet shards, manifest): what a user waits for.
- raw ORT: the server's session (OnnxEmbedder.run_batch) on the job's own length-sorted batches (same shards,
  same plan_batches), pre-tokenized; only the session runs are timed. The compute limit. Goal: >= 0.95x.
- sentence-transformers: SentenceTransformer(bundled model).encode(texts, batch_size=32), max_seq_length 512.
  Goal: embed-corpus >= 2x.
- local Ray: the same job with --ray auto on a local Ray instance started beforehand (cores CPUs, one actor
  per core, one thread each), timed end to end without Ray's own start; the overhead against the local run.
Engines run interleaved for --rounds rounds and the median counts (the host's speed drifts).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import STSB_DIR, cpu_name, export_bundled, stsb_file
from results import write_result


def read_sentences(directory: Path) -> list[str]:
    texts: dict[str, None] = {}
    for split in ("train", "valid", "test"):
        with stsb_file(split, directory).open() as f:
            for line in f:
                record = json.loads(line)
                texts[record["query"]] = None
                texts[record["document"]] = None
    return list(texts)


def build_documents(sentences: list[str], count: int, per_document: int = 80) -> list[str]:
    """Documents of `per_document` consecutive sentences (over 600 tokens: every one is cut at 512)."""
    return [" ".join(sentences[(i * per_document + j) % len(sentences)] for j in range(per_document))
            for i in range(count)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"document": text}) + "\n" for text in texts))
    return path


class EmbedCorpus:
    """The command, in this process, on a fresh output directory each time."""

    def __init__(self, export_dir: Path, corpus: Path, workdir: Path, extra: list[str]) -> None:
        self.args = ["--model-dir", str(export_dir), "--input", str(corpus), "--no-progress", *extra]
        self.workdir, self.runs = workdir, 0

    def texts_per_s(self) -> float:
        from embedforge.corpus.command import embed_corpus_command

        self.runs += 1
        output = self.workdir / f"out-{self.runs}"
        start = time.perf_counter()
        embed_corpus_command.main([*self.args, "--output", str(output)], standalone_mode=False)
        elapsed = time.perf_counter() - start
        self.manifest = json.loads((output / "_manifest.json").read_text())
        self.embed_rate = self.manifest["count"] / self.manifest["embed_seconds"]
        return self.manifest["count"] / elapsed


class RawOrt:
    """OnnxEmbedder.run_batch on the job's batches: shards of shard_size texts, plan_batches within each."""

    def __init__(self, export_dir: Path, texts: list[str], threads: int, shard_size: int, precision: str) -> None:
        from embedforge.corpus.vectors import CorpusEmbedder

        embedder = CorpusEmbedder(export_dir, precision=precision, provider="cpu", threads=threads)
        self.runtime, self.batches = embedder.runtime, []
        for start in range(0, len(texts), shard_size):
            ids, lengths, _ = embedder.tokenize(texts[start: start + shard_size])
            self.batches += [[ids[i] for i in batch] for batch in embedder.batches(lengths)]
        self.count = len(texts)
        for batch in self.batches[:: max(1, len(self.batches) // 4)]:
            self.runtime.run_batch(batch)

    def texts_per_s(self) -> float:
        start = time.perf_counter()
        for batch in self.batches:
            self.runtime.run_batch(batch)
        return self.count / (time.perf_counter() - start)


class SentenceTransformersEncode:
    def __init__(self, texts: list[str], threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from embedforge.model import default_model_path

        torch.set_num_threads(threads)
        self.texts = texts
        self.model = SentenceTransformer(str(default_model_path()), device="cpu")
        self.model.max_seq_length = 512
        self.model.encode(texts[:32], batch_size=32)

    def texts_per_s(self) -> float:
        start = time.perf_counter()
        self.model.encode(self.texts, batch_size=32)
        return len(self.texts) / (time.perf_counter() - start)


def result_figures(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Per corpus: the engines' texts/s and the table's ratios (job/raw, job/ST, Ray/job)."""
    figures: dict[str, dict[str, float | None]] = {}
    for name, rates in results.items():
        job, raw = rates["embed-corpus"], rates["raw ORT"]
        st, on_ray = rates.get("sentence-transformers"), rates.get("local Ray")
        figures[name] = {"texts_per_s": dict(rates), "job_vs_raw": job / raw, "job_vs_st": job / st if st else None,
                         "ray_vs_job": on_ray / job if on_ray else None}
    return figures


def headline(figures: dict[str, dict], precision: str) -> str:
    parts = []
    for name, row in figures.items():
        versus = [f"{row[key]:.2f}x {label}" for key, label in (("job_vs_raw", "raw ORT"),
                                                                ("job_vs_st", "sentence-transformers"))
                  if row[key] is not None]
        parts.append(f"{name} {row['texts_per_s']['embed-corpus']:.1f} texts/s end to end = {', '.join(versus)}"
                     + (f", local Ray {row['ray_vs_job']:.2f}x" if row["ray_vs_job"] is not None else ""))
    return f"embed-corpus {precision}: " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", type=Path, help="export with an fp32 model (default: export the bundled "
                        "model into a temp dir)")
    parser.add_argument("--stsb-dir", type=Path, default=STSB_DIR)
    parser.add_argument("--sentences", type=int, default=None, help="use the first N sentences [default: all]")
    parser.add_argument("--docs", type=int, default=192, help="512-token documents to embed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="of the job, raw ORT and Ray (sentence-transformers stays fp32): int8 is what a CPU "
                        "fleet would run (its cosine to fp32 is in the export's parity table)")
    parser.add_argument("--no-ray", action="store_true", help="leave out the local-Ray run")
    parser.add_argument("--no-st", action="store_true", help="leave out sentence-transformers")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    sentences = read_sentences(args.stsb_dir)
    documents = build_documents(sentences, args.docs)
    sentences = sentences[: args.sentences]
    shard_size = 4096  # the command's default, which the raw ORT batches follow
    print(f"{len(sentences)} unique STS-B sentences, {len(documents)} documents of 512 tokens, {cores} cores",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="corpus-bench-") as tmp:
        workdir = Path(tmp)
        if args.export_dir is None:
            args.export_dir = export_bundled(workdir, precisions=("fp32", args.precision) if args.precision != "fp32"
                                             else ("fp32",), parity_texts=sentences[:256])
        ray = None
        if not args.no_ray:
            try:
                import ray
                import ray.data  # noqa: F401
            except ImportError:
                print("ray[data] is not installed: no local-Ray run")
        results: dict[str, dict[str, float]] = {}
        for name, texts in (("sentences", sentences), ("documents", documents)):
            corpus = write_jsonl(workdir / f"{name}.jsonl", texts)
            engines: dict[str, object] = {
                "embed-corpus": EmbedCorpus(args.export_dir, corpus, workdir / name, ["--precision", args.precision]),
                "raw ORT": RawOrt(args.export_dir, texts, cores, shard_size, args.precision),
            }
            if not args.no_st:
                try:
                    engines["sentence-transformers"] = SentenceTransformersEncode(texts, cores)
                except ImportError:
                    print("sentence-transformers is not installed: no ST comparison")
            if ray is not None:
                engines["local Ray"] = EmbedCorpus(args.export_dir, corpus, workdir / f"{name}-ray",
                                                   ["--ray", "auto", "--ray-actors", str(cores),
                                                    "--precision", args.precision])
                if not ray.is_initialized():
                    started = time.perf_counter()
                    ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
                    print(f"ray.init (local, {cores} CPUs): {time.perf_counter() - started:.1f} s", flush=True)
                    ray.data.DataContext.get_current().enable_progress_bars = False
            runs: dict[str, list[float]] = {}
            for round_index in range(args.rounds):
                for engine_name, engine in engines.items():
                    runs.setdefault(engine_name, []).append(engine.texts_per_s())
                    if isinstance(engine, EmbedCorpus):  # the embedding phase alone (what the progress bar shows)
                        runs.setdefault(f"{engine_name} (embedding)", []).append(engine.embed_rate)
                print(f"{name} round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()),
                      flush=True)
            results[name] = {k: float(np.median(v)) for k, v in runs.items()}
            manifest = engines["embed-corpus"].manifest
            print(f"{name}: {manifest['count']} texts, {manifest['tokens'] / manifest['count']:.0f} tokens each, "
                  f"{manifest['truncated']} truncated", flush=True)
        if ray is not None and ray.is_initialized():
            ray.shutdown()

    print(f"\n{args.precision} (sentence-transformers: fp32 torch), texts/s, median of {args.rounds} interleaved "
          f"rounds, {cores} cores ({cpu_name()}). end to end: model load, input "
          "scan + sha256, embedding, shards, manifest (Ray: without ray.init); embedding: the job's embedding phase")
    print("corpus      job end-to-end (embedding)  raw ORT  /raw end-to-end (embedding)      ST  /ST    "
          "Ray end-to-end (embedding)  Ray/job")
    for name, figures in results.items():
        job, embedding, raw = figures["embed-corpus"], figures["embed-corpus (embedding)"], figures["raw ORT"]
        st, on_ray = figures.get("sentence-transformers"), figures.get("local Ray")
        print(f"{name:10}  {job:14.1f} ({embedding:9.1f})  {raw:7.1f}  {job / raw:15.2f} ({embedding / raw:9.2f})  "
              + (f"{st:6.1f}  {job / st:4.2f}" if st else f"{'-':>6}  {'-':>4}")
              + (f"  {on_ray:18.1f} ({figures['local Ray (embedding)']:9.1f})  {on_ray / job:7.2f}" if on_ray else ""))
    print("goals: job/raw >= 0.95, job/ST >= 2")
    figures = result_figures(results)
    write_result("embed_corpus", {"headline": headline(figures, args.precision), "precision": args.precision,
                                  "rounds": args.rounds, "corpora": figures})


if __name__ == "__main__":
    main()
