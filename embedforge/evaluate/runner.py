"""Evaluate an embedding model on a pair file: checkpoints in, a report out.

Two rankings are scored (see :mod:`embedforge.evaluate.metrics` for the formulas and conventions):

- ``rerank``: each unique query ranks only the documents the file labels for it;
- ``retrieval``: each unique query ranks every unique document of the file; a pair the file does not
  label has rel 0. This is the headline figure.

Scores are cosines of L2-normalised vectors. A (query, document) pair labelled more than once takes the
mean of its rels; ``weight`` (a training-loss weight) plays no part here. Spearman and Pearson of cosine
vs rel are computed over every pair of the file, as is usual for STS. Every text is embedded once.

Reports give every metric x100 (percent) and the query counts behind each mean.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from embedforge.data import Pair
from embedforge.evaluate.metrics import DEFAULT_KS, DEFAULT_REL_THRESHOLD, pearson, ranking_metrics, spearman
from embedforge.io import new_figure, save_figure, write_text_atomic
from embedforge.quantize import Calibration, quantize, scoring_vectors

EmbedFn = Callable[[list[str]], np.ndarray]
MODES = ("rerank", "retrieval", "both")
_QUERY_BLOCK = 256


def embed_texts(texts: Sequence[str], embed_fn: EmbedFn, batch_size: int = 64,
                show_progress: bool = True) -> np.ndarray:
    """Vectors of ``texts`` (float32 [N, dim], rows L2-normalised), calling ``embed_fn`` on batches.

    Texts are batched longest first, so that each batch holds texts of similar length (little padding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    vectors: np.ndarray | None = None
    with tqdm(total=len(texts), desc="embedding", unit="text", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            output = np.asarray(embed_fn([texts[i] for i in batch]), dtype=np.float32)
            if output.ndim != 2 or output.shape[0] != len(batch):
                raise ValueError(f"embed_fn returned shape {output.shape} for {len(batch)} texts")
            if vectors is None:
                vectors = np.empty((len(texts), output.shape[1]), dtype=np.float32)
            vectors[batch] = output
            bar.update(len(batch))
    if vectors is None:
        raise ValueError("no texts to embed")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _labels(pairs: Sequence[Pair], query_ids: dict[str, int],
            document_ids: dict[str, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each unique query: (document column ids, mean rel) of its labelled documents."""
    sums: list[dict[int, list[float]]] = [{} for _ in query_ids]
    for pair in pairs:
        total = sums[query_ids[pair.query]].setdefault(document_ids[pair.document], [0.0, 0.0])
        total[0] += pair.rel
        total[1] += 1
    labels = []
    for per_query in sums:
        columns = np.fromiter(per_query.keys(), dtype=np.int64, count=len(per_query))
        rels = np.array([total / count for total, count in per_query.values()], dtype=np.float64)
        labels.append((columns, rels))
    return labels


def _rerank_queries(query_vectors: np.ndarray, document_vectors: np.ndarray,
                    labels: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for row, (columns, rels) in enumerate(labels):
        yield document_vectors[columns] @ query_vectors[row], rels


def _retrieval_queries(query_vectors: np.ndarray, document_vectors: np.ndarray,
                       labels: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(query_vectors), _QUERY_BLOCK):
        scores = query_vectors[start:start + _QUERY_BLOCK] @ document_vectors.T
        for offset, row_scores in enumerate(scores):
            columns, label_rels = labels[start + offset]
            rels = np.zeros(len(document_vectors))
            rels[columns] = label_rels
            yield row_scores, rels


def _percent(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value if key.startswith("queries") else 100.0 * value for key, value in metrics.items()}


def evaluate_pairs(pairs: Sequence[Pair], embed_fn: EmbedFn, ks: Sequence[int] = DEFAULT_KS,
                   rel_threshold: float = DEFAULT_REL_THRESHOLD, mode: str = "both", batch_size: int = 64,
                   show_progress: bool = True, dims: Sequence[int] | None = None,
                   prompts: Mapping[str, str] | None = None, output_types: Sequence[str] = (),
                   calibration: Calibration | None = None) -> dict:
    """Score a model, given as ``embed_fn(texts) -> [N, dim] vectors``, on ``pairs``.

    Returns ``{"pairs", "queries", "documents", "texts", "spearman", "pearson"}`` plus a ``"rerank"`` and/or
    ``"retrieval"`` dict of ``ndcg@k``, ``mrr@k``, ``map@k``, ``recall@k`` and the query counts
    (see :func:`embedforge.evaluate.metrics.ranking_metrics`). Metrics are x100. With ``dims`` (Matryoshka
    sizes), ``"matryoshka"`` maps each size to the same metrics on the vectors cut to that many components
    and renormalised. ``prompts`` ({"query": ..., "document": ...}, the model's) are prefixed to the queries
    and the documents before they are embedded. With ``output_types`` (embedforge/quantize.py), ``"output_types"``
    maps each type to the same metrics on its codes, scored as a store compares them (int8/uint8 by cosine of the
    centred codes, binary by Hamming similarity; int8 and uint8 need the export's ``calibration``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 pairs to evaluate, got {len(pairs)}")
    query_ids = {text: i for i, text in enumerate(dict.fromkeys(p.query for p in pairs))}
    document_ids = {text: i for i, text in enumerate(dict.fromkeys(p.document for p in pairs))}
    query_prompt, document_prompt = (prompts or {}).get("query", ""), (prompts or {}).get("document", "")
    texts = list(dict.fromkeys([*(query_prompt + text for text in query_ids),
                                *(document_prompt + text for text in document_ids)]))
    text_ids = {text: i for i, text in enumerate(texts)}
    vectors = embed_texts(texts, embed_fn, batch_size, show_progress)

    query_vectors = vectors[[text_ids[query_prompt + text] for text in query_ids]]
    document_vectors = vectors[[text_ids[document_prompt + text] for text in document_ids]]
    report: dict = {"pairs": len(pairs), "queries": len(query_ids), "documents": len(document_ids),
                    "texts": len(texts)}
    report.update(_score(pairs, query_ids, document_ids, query_vectors, document_vectors, ks, rel_threshold, mode))
    for dim in dims or ():
        if not 1 <= dim <= vectors.shape[1]:
            raise ValueError(f"Matryoshka size {dim} is outside 1..{vectors.shape[1]} (the vectors' size)")
        cut = [_truncate(matrix, dim) for matrix in (query_vectors, document_vectors)]
        report.setdefault("matryoshka", {})[str(dim)] = _score(pairs, query_ids, document_ids, *cut, ks,
                                                               rel_threshold, mode)
    for output_type in output_types:
        coded = [_unit(scoring_vectors(quantize(matrix, output_type, calibration), output_type, matrix.shape[1]))
                 for matrix in (query_vectors, document_vectors)]
        report.setdefault("output_types", {})[output_type] = _score(pairs, query_ids, document_ids, *coded, ks,
                                                                    rel_threshold, mode)
    return report


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` components of each row, L2-normalised again."""
    return _unit(vectors[:, :dim])


def _score(pairs: Sequence[Pair], query_ids: dict[str, int], document_ids: dict[str, int],
           query_vectors: np.ndarray, document_vectors: np.ndarray, ks: Sequence[int], rel_threshold: float,
           mode: str) -> dict:
    """Spearman and Pearson over the pairs, and the ranking metrics of `mode`."""
    cosines = np.einsum("ij,ij->i", query_vectors[[query_ids[p.query] for p in pairs]],
                        document_vectors[[document_ids[p.document] for p in pairs]])
    rels = np.array([p.rel for p in pairs])
    report = {"spearman": 100.0 * spearman(cosines, rels), "pearson": 100.0 * pearson(cosines, rels)}
    labels = _labels(pairs, query_ids, document_ids)
    if mode in ("rerank", "both"):
        rerank = _rerank_queries(query_vectors, document_vectors, labels)
        report["rerank"] = _percent(ranking_metrics(rerank, ks, rel_threshold))
    if mode in ("retrieval", "both"):
        retrieval = _retrieval_queries(query_vectors, document_vectors, labels)
        report["retrieval"] = _percent(ranking_metrics(retrieval, ks, rel_threshold))
    return report


# -- models and checkpoints ------------------------------------------------------------------


def model_embed_fn(model, batch_size: int = 64, device: str = "auto") -> EmbedFn:
    """An ``embed_fn`` for a BertVectorModel: one forward pass per call (the runner does the batching).

    ``device``: auto (cuda if available), cpu, cuda or cuda:N, resolved as the trainer does.
    """
    from embedforge.devices import resolve_device

    target = resolve_device(device)
    return lambda texts: model.encode(texts, batch_size=max(batch_size, len(texts)), device=target,
                                      convert_to_numpy=True)


def evaluate_export(export_dir: Path, pairs: Sequence[Pair], output_types: Sequence[str],
                    ks: Sequence[int] = DEFAULT_KS, rel_threshold: float = DEFAULT_REL_THRESHOLD, mode: str = "both",
                    batch_size: int = 64, show_progress: bool = True) -> dict:
    """:func:`evaluate_pairs` for an ONNX export (what `serve` and `embed-corpus` run: its default precision, its
    prompts and calibration), with the metrics of each of `output_types` beside the float32 vectors'."""
    from embedforge.server.embedder import l2_normalize
    from embedforge.server.runtime import OnnxEmbedder

    runtime = OnnxEmbedder(export_dir, workers=1)
    info = runtime.info

    def embed(texts: list[str]) -> np.ndarray:  # texts of similar length (embed_texts sorts them)
        return l2_normalize(runtime.run_batch(runtime.tokenize(texts).ids))

    return evaluate_pairs(pairs, embed, ks, rel_threshold, mode, batch_size, show_progress,
                          dims=info.matryoshka_dims or None, prompts=info.prompts, output_types=output_types,
                          calibration=info.calibration)


def evaluate_model(model, pairs: Sequence[Pair], ks: Sequence[int] = DEFAULT_KS,
                   rel_threshold: float = DEFAULT_REL_THRESHOLD, mode: str = "both", batch_size: int = 64,
                   device: str = "auto", show_progress: bool = True) -> dict:
    """:func:`evaluate_pairs` for a BertVectorModel (a loaded checkpoint or base model) with its query and document
    prompts, at each of its Matryoshka sizes too if it was trained with them."""
    return evaluate_pairs(pairs, model_embed_fn(model, batch_size, device), ks, rel_threshold, mode,
                          batch_size, show_progress, dims=getattr(model, "matryoshka_dims", None),
                          prompts=getattr(model, "prompts", None))


# -- reports -----------------------------------------------------------------------------------


def headline(metrics: dict, ks: Sequence[int]) -> dict[str, float]:
    """The figures a table shows: Spearman, then NDCG/Recall/MRR at k=10 (or the largest k) per mode."""
    k = 10 if 10 in ks else max(ks)
    row = {"spearman": metrics["spearman"]}
    for mode in ("retrieval", "rerank"):
        if mode in metrics:
            for name in ("ndcg", "recall", "mrr"):
                row[f"{mode} {name}@{k}"] = metrics[mode][f"{name}@{k}"]
    return row


def format_output_types(metrics: dict, ks: Sequence[int]) -> str:
    """One line per output type of one result's metrics (evaluate_pairs with output_types)."""
    rows = {name: headline(figures, ks) for name, figures in metrics["output_types"].items()}
    header = ["output type", *next(iter(rows.values()))]
    lines = [header, *([name, *(f"{value:.2f}" for value in row.values())] for name, row in rows.items())]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def format_table(results: Sequence[dict], ks: Sequence[int], best: str | None = None,
                 selected_by: str = "val_loss") -> str:
    """One line per result ({"name", "step", "val_loss", "metrics"}), the best one marked with '*'."""
    header = ["", "checkpoint", "step", "val_loss", *headline(results[0]["metrics"], ks)]
    rows = [header]
    for result in results:
        val_loss = result.get("val_loss")
        rows.append(["*" if result["name"] == best else "", result["name"],
                     "-" if result.get("step") is None else str(result["step"]),
                     "-" if val_loss is None else f"{val_loss:.5f}",
                     *(f"{value:.2f}" for value in headline(result["metrics"], ks).values())])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i > 1 else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    if best is not None:
        lines.append(f"* best checkpoint (by {selected_by})")
    return "\n".join(lines)


def _json_safe(value):
    """NaN (an undefined metric) becomes null: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_report(report: dict, path: str | Path) -> None:
    """Write the report as indented JSON (atomically)."""
    text = json.dumps(_json_safe(report), indent=2) + "\n"
    write_text_atomic(path, text)


def plot_report(report: dict, path: str | Path) -> None:
    """PNG of the headline metrics over training steps, the best checkpoint marked (atomically)."""
    results = [r for r in report["results"] if r.get("step") is not None]
    if not results:
        raise ValueError("no result has a training step to plot")
    steps = [r["step"] for r in results]
    rows = [headline(r["metrics"], report["ks"]) for r in results]
    figure, (metrics_axis, loss_axis) = new_figure(2, 1, figsize=(8, 7), sharex=True)
    for name in rows[0]:
        metrics_axis.plot(steps, [row[name] for row in rows], marker="o", label=name)
    metrics_axis.set_ylabel("test metric (x100)")
    metrics_axis.legend(fontsize="small")
    metrics_axis.grid(alpha=0.3)
    losses = [(r["step"], r["val_loss"]) for r in results if r.get("val_loss") is not None]
    if losses:
        loss_axis.plot(*zip(*losses, strict=True), marker="o", color="black", label="val_loss")
    best = report.get("best")
    if best is not None:
        for axis in (metrics_axis, loss_axis):
            axis.axvline(best["step"], color="gray", linestyle="--", label="best" if axis is loss_axis else None)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("val_loss")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend(fontsize="small")
    figure.suptitle(f"{Path(report['test_path']).name}: metrics over training steps")
    figure.tight_layout()
    save_figure(figure, path)
