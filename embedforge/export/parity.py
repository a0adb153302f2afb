"""Parity between the PyTorch model and an exported ONNX graph (numpy + onnxruntime + tokenizers, no torch).

For reference vectors r_i (PyTorch) and candidate vectors c_i (ONNX Runtime) of the same texts, both
L2-normalised:

    cosine_i      = r_i . c_i                     -> min_cosine, mean_cosine
    max_abs_diff  = max_i,j |r_ij - c_ij|
    delta metric  = metric(candidate vectors) - metric(reference vectors)   (NDCG@10, Spearman; x100)

The metrics are those of :func:`embedforge.evaluate.runner.evaluate_pairs` in retrieval mode on the
parity pairs. The candidate side runs exactly as a server would: tokenizer.json through
:func:`embedforge.tokenization.load_tokenizer`, batches padded to their longest text, one session run
per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from embedforge.data import Pair
from embedforge.evaluate.runner import evaluate_pairs
from embedforge.onnxrt import create_session, pad_token_ids

NDCG_K = 10


def select_parity_pairs(pairs: Sequence[Pair], max_texts: int) -> tuple[list[Pair], list[str]]:
    """The leading pairs whose unique texts number at most `max_texts`, and those texts in first-seen order."""
    if max_texts < 2:
        raise ValueError(f"max_texts must be >= 2, got {max_texts}")
    chosen: list[Pair] = []
    texts: dict[str, None] = {}
    for pair in pairs:
        new = [text for text in dict.fromkeys((pair.query, pair.document)) if text not in texts]
        if len(texts) + len(new) > max_texts:
            break
        chosen.append(pair)
        texts.update(dict.fromkeys(new))
    return chosen, list(texts)


def onnx_session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0):
    """The serving runtime's session for `path` (threads 0: ONNX Runtime's default)."""
    return create_session(path, threads, list(providers))


def onnx_embed(session, tokenizer, texts: Sequence[str], batch_size: int = 32, show_progress: bool = False,
               equal_lengths: bool = False) -> np.ndarray:
    """Vectors of `texts` (float32 [N, dim]) from an exported graph; batches padded to their longest text.

    equal_lengths: every batch holds texts of one token length (no padding), for the unpadded graphs.
    """
    encodings = tokenizer.encode_batch(list(texts))
    lengths = np.array([len(encoding.ids) for encoding in encodings])
    order = np.argsort(-lengths, kind="stable")
    cuts = np.flatnonzero(np.diff(lengths[order])) + 1 if equal_lengths else np.array([], dtype=int)
    batches = [chunk[i:i + batch_size] for chunk in np.split(order, cuts) for i in range(0, len(chunk), batch_size)]
    vectors: np.ndarray | None = None
    for batch in tqdm(batches, desc="onnx embedding", unit="batch", disable=not show_progress):
        input_ids, attention_mask = pad_token_ids([encodings[i].ids for i in batch])
        (output,) = session.run(["embedding"], {"input_ids": input_ids, "attention_mask": attention_mask})
        if vectors is None:
            vectors = np.empty((len(texts), output.shape[1]), dtype=np.float32)
        vectors[batch] = output
    if vectors is None:
        raise ValueError("no texts to embed")
    return vectors


def _metrics(pairs: Sequence[Pair], texts: Sequence[str], vectors: np.ndarray) -> dict[str, float]:
    row = {text: i for i, text in enumerate(texts)}
    report = evaluate_pairs(pairs, lambda batch: vectors[[row[text] for text in batch]], ks=(NDCG_K,),
                            mode="retrieval", show_progress=False)
    return {f"ndcg@{NDCG_K}": report["retrieval"][f"ndcg@{NDCG_K}"], "spearman": report["spearman"]}


def compare(reference: np.ndarray, candidate: np.ndarray, pairs: Sequence[Pair] = (),
            texts: Sequence[str] = ()) -> dict:
    """Parity figures of `candidate` against `reference` (rows = `texts`); metric deltas when >= 2 pairs."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape}, candidate {candidate.shape}")
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    cosines = np.einsum("ij,ij->i", reference, candidate) / np.maximum(
        np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1), 1e-12)
    result: dict = {"texts": len(reference), "min_cosine": float(cosines.min()),
                    "mean_cosine": float(cosines.mean()),
                    "max_abs_diff": float(np.abs(reference - candidate).max())}
    if len(pairs) >= 2:
        before = _metrics(pairs, texts, reference)
        after = _metrics(pairs, texts, candidate)
        result["pairs"] = len(pairs)
        for name in before:
            result[name] = {"pytorch": before[name], "onnx": after[name], "delta": after[name] - before[name]}
    return result


def format_parity_table(models: dict[str, dict]) -> str:
    """A short text table of the parity figures per precision (manifest["models"])."""
    header = f"{'precision':<16}{'min cos':>10}{'mean cos':>10}{'max |diff|':>12}{'dNDCG@10':>10}{'dSpearman':>11}"
    lines = [header, "-" * len(header)]
    rows = list(models.items())
    rows += [(f"{precision} unpadded", entry["unpadded"]) for precision, entry in models.items() if "unpadded" in entry]
    for name, entry in rows:
        parity = entry.get("parity", {})
        if "skipped" in parity:
            lines.append(f"{name:<16}skipped: {parity['skipped']}")
            continue

        def delta(metric: str, parity: dict = parity) -> str:
            return f"{parity[metric]['delta']:+.2f}" if metric in parity else "-"

        lines.append(f"{name:<16}{parity['min_cosine']:>10.5f}{parity['mean_cosine']:>10.5f}"
                     f"{parity['max_abs_diff']:>12.2e}{delta(f'ndcg@{NDCG_K}'):>10}{delta('spearman'):>11}")
    return "\n".join(lines)
