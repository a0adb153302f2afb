"""Texts -> vectors for a corpus job, through the server's own runtime (server/runtime.py OnnxEmbedder).

The same tokenizer, session options and `run_batch` as `embedforge serve` (including the unpadded graph for
equal-length batches of long texts), and the same L2 norm as its Embed call: a corpus vector equals the
served vector of the same text. Each chunk of texts is sorted by token count and cut into batches of at
most `max_batch_tokens` padded tokens, so that a batch carries little padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedforge.corpus import INPUT_TYPES, MAX_BATCH_SIZE, MAX_BATCH_TOKENS
from embedforge.quantize import QuantizeError, check_output_type, quantize
from embedforge.server.embedder import l2_normalize
from embedforge.server.runtime import OnnxEmbedder, RuntimeConfigError, read_calibration, read_manifest, read_prompts

OVERFLOWS = ("truncate", "error", "chunk")  # what a text over max_length becomes (embed-corpus --overflow)
CHUNK_OVERLAP = 64  # tokens shared by neighbouring windows, as the server's --chunk-overlap
MIN_CHUNK_TOKENS = 16  # the smallest window embed-corpus --chunk-tokens takes


@dataclass(frozen=True)
class Rows:
    """A chunk of texts as the rows of its output: one per text, or with overflow "chunk" one per window of
    each text over max_length (windows of max_length tokens sharing `chunk_overlap` tokens, in order)."""

    owner: np.ndarray  # int [rows]: the text each row belongs to
    ids: list[np.ndarray]  # token ids of each row
    lengths: np.ndarray  # int32 [rows]: tokens of each row
    truncated: np.ndarray  # bool [rows]: the row is a text cut at max_length (never, when chunking)
    chunk_index: np.ndarray  # int32 [rows]: 0 for a whole text, else the window's position in its text
    spans: np.ndarray  # int32 [rows, 2]: the row's characters [start, end) in its text


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # float32 [n, dims], L2-normalised, in input order
    tokens: np.ndarray  # int32 [n], after truncation, special tokens included
    truncated: np.ndarray  # bool [n]: the text was longer than max_length and was cut


def output_dims(manifest: dict, dimensions: int | None) -> int:
    """The vector size to write: the model's dim, or a Matryoshka size the export declares (matryoshka_dims)."""
    dim = int(manifest["dim"])
    if dimensions is None or dimensions == dim:
        return dim
    sizes = manifest.get("matryoshka_dims")
    if not sizes:
        raise RuntimeConfigError(f"--dimensions {dimensions}: this export was not trained for Matryoshka "
                                 f"truncation (its manifest.json has no matryoshka_dims); its vectors have "
                                 f"{dim} dimensions")
    if dimensions not in sizes:
        raise RuntimeConfigError(f"--dimensions {dimensions}: the export's Matryoshka sizes are "
                                 f"{', '.join(map(str, sorted(sizes)))} (and the full {dim})")
    return dimensions


def input_prompt(manifest: dict, model_dir: Path, input_type: str | None) -> str:
    """The prompt the export's manifest gives `input_type` ("query" or "document"); "" for None, and for an
    export without prompts (made before they existed, or trained without them: its texts need none)."""
    if input_type is None:
        return ""
    if input_type not in INPUT_TYPES:
        raise RuntimeConfigError(f"input type {input_type!r}: choose one of {', '.join(INPUT_TYPES)}")
    return read_prompts(manifest, model_dir).get(input_type, "")


def check_corpus_output_type(output_type: str, manifest: dict, model_dir: Path, dims: int) -> None:
    """Refuse an output type the export cannot make (int8/uint8 need its calibration and full dimensions)."""
    try:
        check_output_type(output_type, read_calibration(manifest, model_dir), dims, int(manifest["dim"]))
    except QuantizeError as error:
        raise RuntimeConfigError(f"--output-type {output_type}: {error}") from error


def plan_batches(lengths: list[int] | np.ndarray, max_batch_tokens: int, max_batch_size: int) -> list[np.ndarray]:
    """Indices of length-sorted batches: each holds at most max_batch_size texts and its size x longest text
    is at most max_batch_tokens (a text longer than the budget gets a batch of its own)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        if end - start > max_batch_size or (end - start) * longest > max_batch_tokens and end - 1 > start:
            batches.append(order[start: end - 1])
            start = end - 1
    if start < len(order):
        batches.append(order[start:])
    return batches


class CorpusEmbedder:
    """An export's ONNX model and tokenizer, embedding chunks of texts in length-sorted batches."""

    def __init__(self, model_dir: str | Path, precision: str = "auto", provider: str = "auto",
                 threads: int | None = None, dimensions: int | None = None, max_batch_tokens: int = MAX_BATCH_TOKENS,
                 max_batch_size: int = MAX_BATCH_SIZE, input_type: str | None = None,
                 output_type: str = "float32", chunk: bool = False, chunk_overlap: int = CHUNK_OVERLAP,
                 chunk_tokens: int | None = None) -> None:
        """chunk: `rows` cuts a text longer than chunk_tokens (default max_length) into windows sharing
        chunk_overlap tokens, a row each."""
        manifest = read_manifest(Path(model_dir))
        self.dims = output_dims(manifest, dimensions)
        self.prompt = input_prompt(manifest, Path(model_dir), input_type)
        check_corpus_output_type(output_type, manifest, Path(model_dir), self.dims)
        self.output_type = output_type
        self.runtime = OnnxEmbedder(model_dir, precision=precision, provider=provider, threads=threads, workers=1)
        self.info = self.runtime.info
        self.chunk, self.chunk_tokens = chunk, chunk_tokens or self.info.max_length
        if chunk and not MIN_CHUNK_TOKENS <= self.chunk_tokens <= self.info.max_length:
            raise RuntimeConfigError(f"--chunk-tokens must be from {MIN_CHUNK_TOKENS} to the model's max_length "
                                     f"{self.info.max_length}, got {chunk_tokens}")
        if chunk and not 0 <= chunk_overlap < self.chunk_tokens // 2:
            raise RuntimeConfigError(f"--chunk-overlap must be from 0 to {self.chunk_tokens // 2 - 1} tokens (under "
                                     f"half a window), got {chunk_overlap}")
        self.chunk_overlap = chunk_overlap
        self.max_batch_tokens = max(max_batch_tokens, self.info.max_length)
        self.max_batch_size = max_batch_size

    def tokenize(self, texts: list[str]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(token ids per text, token counts, truncated mask), the input type's prompt prefixed to each text (it
        counts towards the tokens and max_length)."""
        tokenized = self.runtime.tokenize([self.prompt + text for text in texts] if self.prompt else texts)
        truncated = np.zeros(len(texts), dtype=bool)
        truncated[tokenized.truncated] = True
        return tokenized.ids, np.asarray(tokenized.lengths, dtype=np.int32), truncated

    def rows(self, texts: list[str]) -> Rows:
        """The output rows of `texts`: one per text, or (chunk) one per window of chunk_tokens tokens of a text over
        chunk_tokens (max_length by default)."""
        ids, lengths, truncated = self.tokenize(texts)
        if self.chunk and self.chunk_tokens < self.info.max_length:
            truncated = truncated | (lengths > self.chunk_tokens)
        whole = np.array([[0, len(text)] for text in texts], dtype=np.int32).reshape(-1, 2)
        if not (self.chunk and truncated.any()):
            return Rows(np.arange(len(texts)), ids, lengths, truncated, np.zeros(len(texts), np.int32), whole)
        owner, row_ids, spans, index = [], [], [], []
        cut = len(self.prompt)  # spans count in the text as written, without the prompt
        for i, text in enumerate(texts):
            if truncated[i]:
                windows, window_spans = self.runtime.token_windows_with_spans(self.prompt + text, self.chunk_overlap,
                                                                              self.chunk_tokens)
                window_spans = [(max(start - cut, 0), max(end - cut, 0)) for start, end in window_spans]
            else:
                windows, window_spans = [ids[i]], [tuple(whole[i])]
            owner += [i] * len(windows)
            row_ids += windows
            spans += window_spans
            index += range(len(windows))
        return Rows(np.array(owner), row_ids, np.array([len(x) for x in row_ids], dtype=np.int32),
                    np.zeros(len(row_ids), dtype=bool), np.array(index, dtype=np.int32),
                    np.array(spans, dtype=np.int32))

    def batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        return plan_batches(lengths, self.max_batch_tokens, self.max_batch_size)

    def embed_batch(self, batch: list[np.ndarray]) -> np.ndarray:
        """One model batch of token ids -> float32 [len(batch), dims]: Matryoshka cut, then L2 norm."""
        return l2_normalize(np.ascontiguousarray(self.runtime.run_batch(batch)[:, : self.dims]))

    def codes(self, vectors: np.ndarray) -> np.ndarray:
        """`vectors` as the job's output type (float32 unchanged)."""
        return quantize(vectors, self.output_type, self.info.calibration)

    def embed_ids(self, ids: list[np.ndarray], lengths: np.ndarray) -> np.ndarray:
        """Vectors of tokenized texts, in their order, computed in length-sorted batches."""
        vectors = np.empty((len(ids), self.dims), dtype=np.float32)
        for batch in self.batches(lengths):
            vectors[batch] = self.embed_batch([ids[i] for i in batch])
        return vectors

    def embed(self, texts: list[str]) -> Embedded:
        ids, lengths, truncated = self.tokenize(texts)
        return Embedded(self.embed_ids(ids, lengths), lengths, truncated)
