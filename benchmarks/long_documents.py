"""Long documents: what chunking finds that truncation loses, and what it costs to serve.

Retrieval: documents of 2,000-6,000 tokens made of unrelated sentences (STS-B and SNLI test sentences), each
holding one relevant sentence: the document of an STS-B test pair with rel >= 0.8, placed after token 512 in
half of the documents and in the first 300 tokens of the others; the pair's other sentence is the query. Each
query ranks every document:

- chunk N: `embed-corpus --overflow chunk --chunk-tokens N` rows (windows of N tokens, max_length by default,
  sharing min(64, N / 4)), a document scored by its best window;
- pooled chunk: the normalised mean of its windows (the server's `overflow=chunk` vector);
- truncate: its first max_length tokens;
- sentence alone: the same queries against the relevant sentences alone (the ceiling).

Target: Recall@10 of chunk >= 0.9x the sentence alone. The relevant sentence is one of 10-20 sentences in a
max_length window of 256 tokens (all-MiniLM-L6-v2), so smaller windows are scored too.

Throughput: `embedforge serve` embeds the documents with overflow=chunk (one document per call, 4 clients) and
then the same windows sent as separate texts (each window's character span, one document's windows per call),
interleaved rounds; tokens/s of each. Target: chunked >= 0.95x the windows as texts.

    python benchmarks/long_documents.py                    # exports the bundled model into a temp dir first
    python benchmarks/long_documents.py --export-dir output/vector_model/export --docs 100
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SHARED_DATA, cpu_name, export_bundled, stop_process, stsb_file
from results import write_result
from serve_throughput import start_server

from embedforge.corpus.vectors import CHUNK_OVERLAP, CorpusEmbedder
from embedforge.data import read_pairs


def build_documents(count: int, embedder: CorpusEmbedder, seed: int) -> tuple[list[str], list[str], list[str],
                                                                               list[bool]]:
    """(queries, relevant sentences, documents, late): document i holds relevant sentence i among filler."""
    rng = np.random.default_rng(seed)
    pairs = [p for p in read_pairs(stsb_file("test")) if p.rel >= 0.8 and p.query != p.document]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))[:count]]
    taken = {text for p in pairs for text in (p.query, p.document)}
    filler = [text for path in (stsb_file("test"), SHARED_DATA / "snli" / "snli_test.jsonl")
              for p in read_pairs(path) for text in (p.query, p.document) if text not in taken]
    filler = list(dict.fromkeys(filler))
    tokens = dict(zip(filler, (len(ids) - 2 for ids in embedder.runtime.tokenize(filler).ids), strict=True))
    documents, late = [], []
    for i, pair in enumerate(pairs):
        target, is_late = int(rng.integers(2000, 6001)), i % 2 == 1
        where = int(rng.integers(520, target - 50)) if is_late else int(rng.integers(0, 300))
        sentences, length, placed = [], 0, False
        while length < target:
            if not placed and length >= where:
                sentences.append(pair.document)
                placed = True
            sentence = filler[int(rng.integers(len(filler)))]
            sentences.append(sentence)
            length += tokens[sentence]
        if not placed:
            sentences.append(pair.document)
        documents.append(" ".join(sentences))
        late.append(is_late)
    return [p.query for p in pairs], [p.document for p in pairs], documents, late


def recall_at_10(scores: np.ndarray) -> np.ndarray:
    """Per query (row): 1 when its own document (the same index) is among the 10 best scores."""
    own = scores[np.arange(len(scores)), np.arange(len(scores))]
    return ((scores > own[:, None]).sum(axis=1) < 10).astype(float)


def retrieval(export_dir: Path, queries: list[str], sentences: list[str], documents: list[str], late: list[bool],
              sizes: list[int]) -> dict[str, dict[str, float]]:
    """Recall@10 of each method, over all queries and the early and late halves."""
    embedder = CorpusEmbedder(export_dir, precision="fp32", provider="cpu")
    query_vectors = embedder.embed(queries).vectors
    methods = {"sentence alone": embedder.embed(sentences).vectors}
    for size in [embedder.info.max_length, *sizes]:
        sized = CorpusEmbedder(export_dir, precision="fp32", provider="cpu", chunk=True, chunk_tokens=size,
                               chunk_overlap=min(CHUNK_OVERLAP, size // 4))
        rows = sized.rows(documents)
        windows = sized.embed_ids(rows.ids, rows.lengths)
        print(f"{len(documents)} documents, {int(rows.lengths.sum())} tokens in {len(rows.ids)} windows of {size}")
        methods[f"chunk {size}"] = (windows, rows.owner)
        if size == embedder.info.max_length:
            pooled = np.stack([windows[rows.owner == i].mean(axis=0) for i in range(len(documents))])
            methods["pooled chunk"] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
            methods["truncate"] = windows[rows.chunk_index == 0]
    late_mask, figures = np.array(late), {}
    for name, vectors in methods.items():
        if isinstance(vectors, tuple):  # a document scores as its best window
            windows, owner = vectors
            per_window = query_vectors @ windows.T
            scores = np.stack([per_window[:, owner == i].max(axis=1) for i in range(len(documents))], axis=1)
        else:
            scores = query_vectors @ vectors.T
        hits = recall_at_10(scores)
        figures[name] = {"recall@10": 100 * hits.mean(), "early": 100 * hits[~late_mask].mean(),
                         "late": 100 * hits[late_mask].mean()}
    return figures


def window_texts(export_dir: Path, documents: list[str]) -> list[list[str]]:
    """Each document's max_length windows (the server's) as the text of their character spans."""
    rows = CorpusEmbedder(export_dir, precision="fp32", provider="cpu", chunk=True).rows(documents)
    texts: list[list[str]] = [[] for _ in documents]
    for owner, (start, end) in zip(rows.owner, rows.spans, strict=True):
        texts[owner].append(documents[owner][start:end])
    return texts


async def tokens_per_second(target: str, calls: list[list[str]], overflow: str | None) -> float:
    from embedforge.client import AsyncEmbedClient

    queue = iter(calls)
    async with AsyncEmbedClient(target, timeout=600) as client:
        async def worker() -> int:
            tokens = 0
            for texts in queue:
                result = await client.embed(texts, overflow=overflow, chunk_overlap=CHUNK_OVERLAP)
                tokens += result.tokens
            return tokens

        start = time.perf_counter()
        total = sum(await asyncio.gather(*(worker() for _ in range(4))))
        return total / (time.perf_counter() - start)


def throughput(export_dir: Path, documents: list[str], rounds: int) -> dict[str, float]:
    windows = window_texts(export_dir, documents)
    process, target, _ = start_server(export_dir, "fp32", 2, ["--max-chars-per-text", "200000"])
    rates: dict[str, list[float]] = {"chunked": [], "windows as texts": []}
    try:
        asyncio.run(tokens_per_second(target, [[d] for d in documents[:4]], "chunk"))  # warm-up
        for _ in range(rounds):
            rates["chunked"].append(asyncio.run(tokens_per_second(target, [[d] for d in documents], "chunk")))
            rates["windows as texts"].append(asyncio.run(tokens_per_second(target, windows, None)))
    finally:
        stop_process(process)
    return {name: statistics.median(values) for name, values in rates.items()}


def headline(figures: dict[str, dict[str, float]], rates: dict[str, float]) -> str:
    alone = figures["sentence alone"]["recall@10"]
    chunks = ", ".join(f"{name} {row['recall@10']:.1f} ({row['recall@10'] / alone:.2f}x)"
                       for name, row in figures.items() if name.startswith("chunk "))
    return (f"Recall@10 x100, sentence alone {alone:.1f}: {chunks}, pooled {figures['pooled chunk']['recall@10']:.1f}, "
            f"truncate {figures['truncate']['recall@10']:.1f}; chunked serving "
            f"{rates['chunked'] / rates['windows as texts']:.2f}x the windows as texts in tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, default=None)
    parser.add_argument("--docs", type=int, default=60, help="documents (and queries) for retrieval")
    parser.add_argument("--serve-docs", type=int, default=16, help="documents sent to the server per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, nargs="*", default=[64, 128],
                        help="smaller windows to score beside max_length's (embed-corpus --chunk-tokens)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    export_dir = args.export_dir or export_bundled(Path(tempfile.mkdtemp(prefix="embedforge-long-")), ("fp32",))
    embedder = CorpusEmbedder(export_dir, precision="fp32", provider="cpu")
    queries, sentences, documents, late = build_documents(args.docs, embedder, args.seed)
    figures = retrieval(export_dir, queries, sentences, documents, late, args.chunk_tokens)
    print(f"\n{cpu_name()}; Recall@10 x100 over {len(queries)} queries (early: relevant sentence in the first 300 "
          "tokens; late: after token 512)")
    print(f"{'method':<16}{'all':>8}{'early':>8}{'late':>8}")
    for name, row in figures.items():
        print(f"{name:<16}{row['recall@10']:>8.1f}{row['early']:>8.1f}{row['late']:>8.1f}")
    rates = throughput(export_dir, documents[:args.serve_docs], args.rounds)
    print(f"\nserving, median of {args.rounds} interleaved rounds, 4 clients: "
          + ", ".join(f"{name} {rate:.0f} tokens/s" for name, rate in rates.items())
          + f"; ratio {rates['chunked'] / rates['windows as texts']:.3f}")
    write_result("long_documents", {"headline": headline(figures, rates), "retrieval": figures,
                                    "tokens_per_s": rates, "docs": len(documents)})


if __name__ == "__main__":
    main()
