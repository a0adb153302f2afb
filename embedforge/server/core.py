"""Request handling shared by the gRPC servicer and the HTTP API: validation, limits, tokenize, batch, reply data.

Knows neither gRPC nor HTTP nor onnxruntime. Each protocol front end turns its request into a call of
`EmbeddingCore.embed` / `score`, and an exception into its own status with `status_of`, so both protocols
refuse the same requests with the same messages and share one batcher, one queue and one set of limits.
Status names are gRPC's canonical codes ("INVALID_ARGUMENT", ...); the HTTP API maps them to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from embedforge.server.batcher import Batcher, BatcherStopped, BatchFailed, DeadlineExceeded, QueueFull, TooLarge
from embedforge.server.embedder import Embedder, ModelInfo, l2_normalize

log = logging.getLogger("embedforge.server.core")

INLINE_TOKENIZE_CHARS = 1024
"""Requests up to this many characters are tokenized on the event loop (the Rust tokenizer takes tens of
microseconds for them, less than handing them to a thread: single-text p50 latency drops by about 0.15 ms);
larger ones go to the tokenizer thread so that the loop never stalls."""

TimingObserver = Callable[[float, float, float], None]
"""(queue_s, tokenize_s, inference_s) for every successful Embed/Score call."""
CallObserver = Callable[[str, str, str, float], None]
"""(protocol, rpc name, status name, seconds) for every finished call of either protocol, e.g. to update metrics."""


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_chars_per_text: int


class InvalidRequest(Exception):
    """Bad input; the message names the offending field or item."""


class Unavailable(Exception):
    """The model is still loading, or the server is draining."""


@dataclass(frozen=True)
class Timing:
    """Server-side seconds of one call: queue (submit until its first batch started), tokenize, inference, total."""

    queue_s: float
    tokenize_s: float
    inference_s: float
    total_s: float


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # float32 [n, dim or dimensions], row i belongs to text i
    tokens: int  # tokens the model processed (after truncation, no padding)
    timing: Timing


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # cosine of the query with each document, document order
    ranking: list[int]  # document indices, best first (ties: lower index first); at most top_k when top_k > 0
    tokens: int
    timing: Timing


def status_of(exc: Exception, request_id: str) -> tuple[str, str]:
    """The status name and message a failed call answers with; unexpected errors are logged as INTERNAL."""
    if isinstance(exc, (InvalidRequest, TooLarge)):
        return "INVALID_ARGUMENT", str(exc)
    if isinstance(exc, QueueFull):
        return "RESOURCE_EXHAUSTED", f"{exc}; retry later"
    if isinstance(exc, DeadlineExceeded):
        return "DEADLINE_EXCEEDED", str(exc)
    if isinstance(exc, (Unavailable, BatcherStopped)):
        return "UNAVAILABLE", str(exc)
    if isinstance(exc, BatchFailed):
        return "INTERNAL", f"{exc} (request id {request_id})"
    log.error("event=call_failed request_id=%s", request_id, exc_info=exc)
    return "INTERNAL", f"internal error (request id {request_id})"


class EmbeddingCore:
    """One model and its batcher behind every protocol. Until `attach`, every call raises Unavailable."""

    def __init__(self, limits: Limits, allow_any_dimensions: bool = False,
                 on_timing: TimingObserver | None = None) -> None:
        self.limits = limits
        self.allow_any_dimensions = allow_any_dimensions
        self.embedder: Embedder | None = None
        self.batcher: Batcher | None = None
        self.draining = False
        self._on_timing = on_timing
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedforge-tokenize")

    def attach(self, embedder: Embedder, batcher: Batcher) -> None:
        """Serve calls with this (loaded, warmed-up) model and its running batcher."""
        self.embedder = embedder
        self.batcher = batcher

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False)

    @property
    def state(self) -> str:
        """"serving", "loading" or "draining"."""
        if self.draining:
            return "draining"
        return "loading" if self.embedder is None else "serving"

    def check_ready(self) -> ModelInfo:
        """The served model's info; Unavailable while loading or draining."""
        if self.draining:
            raise Unavailable("server is shutting down")
        if self.embedder is None:
            raise Unavailable("model is loading; retry when health reports SERVING")
        return self.embedder.info

    async def embed(self, texts: list[str], *, truncate: bool = True, normalize: bool = True,
                    dimensions: int | None = None, deadline: float | None = None, request_id: str = "",
                    field: str = "texts") -> Embedded:
        """One vector per text, in order; `field` names the texts in error messages (texts[3] is empty)."""
        info = self.check_ready()
        self.check_texts(texts, field)
        if not normalize and not info.unnormalized:
            raise InvalidRequest("normalize=false: this export has no unnormalized output; re-export with "
                                 "`embedforge export`")
        self.check_dimensions(dimensions, info)
        done = await self._run(texts, [field] * len(texts), list(range(len(texts))), truncate, deadline, request_id)
        vectors = done.vectors
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = np.ascontiguousarray(vectors[:, :dimensions])
        if normalize:
            vectors = l2_normalize(vectors)
        return Embedded(vectors, done.tokens, done.timing)

    async def score(self, query: str, documents: list[str], *, top_k: int = 0, truncate: bool = True,
                    deadline: float | None = None, request_id: str = "") -> Scored:
        """Cosine of the query with each document and the documents ranked best first."""
        self.check_ready()
        self.check_texts([query], "query", indexed=False)
        self.check_texts(documents, "documents")
        done = await self._run([query, *documents], ["query"] + ["documents"] * len(documents),
                               [0, *range(len(documents))], truncate, deadline, request_id)
        vectors = l2_normalize(done.vectors)
        scores = vectors[1:] @ vectors[0]
        ranking = np.argsort(-scores, kind="stable")
        if top_k:
            ranking = ranking[:top_k]
        return Scored(scores, [int(i) for i in ranking], done.tokens, done.timing)

    def check_texts(self, texts: list[str], field: str, indexed: bool = True) -> None:
        if not texts:
            raise InvalidRequest(f"{field} is empty: send at least one text")
        if len(texts) > self.limits.max_texts_per_request:
            raise InvalidRequest(f"{field} has {len(texts)} texts; the limit is "
                                 f"{self.limits.max_texts_per_request} per request")
        for i, text in enumerate(texts):
            name = f"{field}[{i}]" if indexed else field
            if not text:
                raise InvalidRequest(f"{name} is empty")
            if len(text) > self.limits.max_chars_per_text:
                raise InvalidRequest(f"{name} has {len(text)} characters; the limit is "
                                     f"{self.limits.max_chars_per_text}")

    def check_dimensions(self, dimensions: int | None, info: ModelInfo) -> None:
        """Truncated vectors only from a model trained for them (Matryoshka), unless the server allows any size."""
        if dimensions is None:
            return
        if not info.matryoshka_dims and not self.allow_any_dimensions:
            raise InvalidRequest(f"dimensions={dimensions}: this model was not trained for truncated vectors (its "
                                 f"export records no matryoshka_dims); omit dimensions to get all {info.dim}")
        if not 1 <= dimensions <= info.dim:
            raise InvalidRequest(f"dimensions={dimensions} is out of range: 1 to {info.dim}")

    async def _run(self, texts: list[str], fields: list[str], indices: list[int], truncate: bool,
                   deadline: float | None, request_id: str) -> Embedded:
        """Tokenize and run texts through the batcher; fields/indices name each text in error messages."""
        arrived = time.monotonic()
        batcher, embedder = self.batcher, self.embedder
        if batcher.queued_tokens >= batcher.max_queue_tokens:  # refuse before paying for tokenization
            raise QueueFull(f"queue full: {batcher.queued_tokens} tokens queued")
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            tokenized = embedder.tokenize(texts)  # tens of microseconds: cheaper than a thread hop
        else:
            tokenized = await asyncio.get_running_loop().run_in_executor(self._tokenize_pool,
                                                                         embedder.tokenize, texts)
        tokenize_s = time.monotonic() - arrived
        if not truncate and tokenized.truncated:
            i = tokenized.truncated[0]
            raise InvalidRequest(f"{fields[i]}[{indices[i]}] is longer than max_length="
                                 f"{embedder.info.max_length} tokens and truncate is false")
        result = await batcher.submit(tokenized.ids, tokenized.lengths, deadline, request_id)
        total_s = time.monotonic() - arrived
        if self._on_timing is not None:
            self._on_timing(result.queue_s, tokenize_s, result.inference_s)
        timing = Timing(result.queue_s, tokenize_s, result.inference_s, total_s)
        return Embedded(result.vectors, int(sum(tokenized.lengths)), timing)
