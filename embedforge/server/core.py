"""Request handling shared by the gRPC servicer and the HTTP API: validation, limits, tokenize, batch, reply data.

Knows neither gRPC nor HTTP nor onnxruntime. Each protocol front end turns its request into a call of
`EmbeddingCore.embed` / `score`, and an exception into its own status with `status_of`, so both protocols
refuse the same requests with the same messages and share one batcher, one queue and one set of limits.
Status names are gRPC's canonical codes ("INVALID_ARGUMENT", ...); the HTTP API maps them to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedforge.quantize import QuantizeError, check_output_type, quantize
from embedforge.server.admission import Admission, Overloaded, SlowBody, Ticket
from embedforge.server.batcher import Batcher, BatcherStopped, BatchFailed, DeadlineExceeded, QueueFull, TooLarge
from embedforge.server.config import TOKENIZE_SLICE_TEXTS
from embedforge.server.embedder import Embedder, ModelInfo, Tokenized, l2_normalize
from embedforge.st_layout import PROMPT_NAMES

log = logging.getLogger("embedforge.server.core")

INLINE_TOKENIZE_CHARS = 1024
"""Requests up to this many characters are tokenized on the event loop (the Rust tokenizer takes less time for
them than handing them to a thread would); larger ones go to the tokenizer thread so that the loop never
stalls."""

INLINE_PARSE_BYTES = 64 * 1024
"""Larger request bodies are parsed on a tokenizer thread (a 20 MB body takes tens of milliseconds)."""

TimingObserver = Callable[[float, float, float], None]
"""(queue_s, tokenize_s, inference_s) for every successful Embed/Score call."""
CallObserver = Callable[[str, str, str, float], None]
"""(protocol, rpc name, status name, seconds) for every finished call of either protocol, e.g. to update metrics."""


REQUEST_ID_MAX_CHARS = 64
REQUEST_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:/-]")


def sanitize_request_id(value: str | None) -> str:
    """The client's request id (gRPC x-request-id, HTTP X-Request-Id), safe to log: at most 64 characters of
    [A-Za-z0-9._:/-] (others become "_"); a fresh id when it is missing or empty."""
    if not value:
        return uuid.uuid4().hex[:16]
    return REQUEST_ID_UNSAFE.sub("_", value[:REQUEST_ID_MAX_CHARS])


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
    vectors: np.ndarray  # [n, dim or dimensions] (binary: packed bytes), row i belongs to text i
    tokens: int  # tokens the model processed (after truncation, no padding)
    timing: Timing
    embedding_space: str = ""  # the model's (ModelInfo.embedding_space)
    text_tokens: list[int] = field(default_factory=list)  # tokens used of each text (after truncation)
    truncated: list[int] = field(default_factory=list)  # indices of the texts cut at max_length
    output_type: str = "float32"  # vectors: float32, or int8 / uint8 / binary / ubinary codes (quantize.py)
    dim: int = 0  # dimensions of each vector (binary codes pack 8 to a byte)


@dataclass(frozen=True)
class Scored:
    scores: np.ndarray  # cosine of the query with each document, document order
    ranking: list[int]  # document indices, best first (ties: lower index first); at most top_k when top_k > 0
    tokens: int
    timing: Timing
    embedding_space: str = ""
    text_tokens: list[int] = field(default_factory=list)  # the query's, then each document's
    truncated: list[int] = field(default_factory=list)  # indices into [query, *documents] of the texts cut


INPUT_TYPES = PROMPT_NAMES  # the kinds of text a model may have a prompt for
TRUNCATION_DIRECTIONS = ("right", "left")  # which end of a text over max_length is cut
OVERFLOWS = ("truncate", "error", "chunk")  # what happens to a text over max_length


def overflow_policy(overflow: str | None, truncate: bool | None, default: str) -> str:
    """The policy of a call: `overflow` when given, else truncate=false -> error, truncate=true -> truncate,
    else the server's default."""
    if overflow is not None:
        if overflow not in OVERFLOWS:
            raise InvalidRequest(f"overflow must be one of {', '.join(OVERFLOWS)}, got {overflow!r}")
        return overflow
    if truncate is None:
        return default
    return "truncate" if truncate else "error"


def window_rows(vectors: np.ndarray, owners: list[int], count: int) -> np.ndarray:
    """One row per text from rows of windows: a text of one window keeps its row, a chunked text gets the mean
    of its windows' L2-normalised rows (owners[k]: the text window k belongs to; windows 0..count-1 are each
    text's first)."""
    if len(owners) == count:
        return vectors
    unit = l2_normalize(vectors.copy())
    rows = vectors[:count].copy()
    for text in sorted(set(owners[count:])):
        windows = [text] + [k for k in range(count, len(owners)) if owners[k] == text]
        rows[text] = unit[windows].mean(axis=0)
    return rows


def prompt_for(info: ModelInfo, input_type: str | None) -> str:
    """The model's prompt for `input_type` ("" for None, or when the model has none of that kind: a model trained
    without prompts embeds every text as it is, so clients that always send an input type work with it too)."""
    if input_type is None:
        return ""
    if input_type not in INPUT_TYPES:
        raise InvalidRequest(f"input_type must be one of {', '.join(INPUT_TYPES)}, got {input_type!r}")
    return info.prompts.get(input_type, "")


def status_of(exc: Exception, request_id: str) -> tuple[str, str]:
    """The status name and message a failed call answers with; unexpected errors are logged as INTERNAL."""
    if isinstance(exc, (InvalidRequest, TooLarge)):
        return "INVALID_ARGUMENT", str(exc)
    if isinstance(exc, (QueueFull, Overloaded)):
        return "RESOURCE_EXHAUSTED", f"{exc}; retry later"
    if isinstance(exc, (DeadlineExceeded, SlowBody)):
        return "DEADLINE_EXCEEDED", str(exc)
    if isinstance(exc, (Unavailable, BatcherStopped)):
        return "UNAVAILABLE", str(exc)
    if isinstance(exc, BatchFailed):
        return "INTERNAL", f"{exc} (request id {request_id})"
    log.error("event=call_failed request_id=%s", request_id, exc_info=exc)
    return "INTERNAL", f"internal error (request id {request_id})"


class EmbeddingCore:
    """One model and its batcher behind every protocol. Until `attach`, every call raises Unavailable.

    `admission` (server/admission.py) decides which calls are taken on; the front ends ask it before reading a
    body and hand its Ticket to `embed` / `score`."""

    def __init__(self, limits: Limits, admission: Admission, *, allow_any_dimensions: bool, tokenizer_threads: int,
                 overflow: str, chunk_overlap: int, on_timing: TimingObserver | None = None,
                 on_truncated: Callable[[int], None] | None = None) -> None:
        self.limits = limits
        self.admission = admission
        self.allow_any_dimensions = allow_any_dimensions
        self.overflow, self.chunk_overlap = overflow, chunk_overlap  # defaults of calls that name none
        self.embedder: Embedder | None = None
        self.batcher: Batcher | None = None
        self.draining = False
        self._on_timing = on_timing
        self._on_truncated = on_truncated  # called with the number of texts a call had cut at max_length
        self._tokenize_pool = ThreadPoolExecutor(max_workers=tokenizer_threads,
                                                 thread_name_prefix="embedforge-tokenize")

    async def parse(self, parse: Callable[..., Any], raw: bytes | bytearray, *args: Any) -> Any:
        """parse(raw, *args), on a tokenizer thread for a body over INLINE_PARSE_BYTES (the event loop stays
        responsive)."""
        if len(raw) > INLINE_PARSE_BYTES:
            return await self.run_in_pool(parse, raw, *args)
        return parse(raw, *args)

    def run_in_pool(self, fn: Callable, *args: Any) -> Awaitable:
        """Run fn(*args) on a tokenizer thread (e.g. parsing a large request body)."""
        return asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    def attach(self, embedder: Embedder, batcher: Batcher) -> None:
        """Serve calls with this (loaded, warmed-up) model and its running batcher."""
        self.embedder = embedder
        self.batcher = batcher
        self.admission.queue = batcher

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

    async def embed(self, texts: list[str], *, ticket: Ticket, truncate: bool | None = None, normalize: bool = True,
                    dimensions: int | None = None, request_id: str = "", field: str = "texts",
                    release_texts: bool = False, input_type: str | None = None,
                    truncation_direction: str = "right", overflow: str | None = None,
                    chunk_overlap: int | None = None, output_type: str = "float32") -> Embedded:
        """One vector per text, in order, within the ticket's deadline; `field` names the texts in error messages
        (texts[3] is empty). release_texts: empty the list once it is tokenized (the caller no longer needs it),
        so that the texts' memory is freed while the call waits for its batches. input_type ("query",
        "document"): the model's prompt of that kind is prefixed to each text (none if it has none).
        overflow (see overflow_policy): a text over max_length is cut ("truncate"), refused ("error"), or embedded
        in windows of max_length tokens overlapping by chunk_overlap ("chunk": the mean of its windows).
        output_type (embedforge/quantize.py): float32 vectors, or int8, uint8, binary or ubinary codes of the
        normalised vectors."""
        info = self.check_ready()
        prompt = prompt_for(info, input_type)
        self.check_texts(texts, field, prompt=prompt)
        if not normalize and not info.unnormalized:
            raise InvalidRequest("normalize=false: this export has no unnormalized output; re-export with "
                                 "`embedforge export`")
        self.check_dimensions(dimensions, info)
        self.check_output_type(output_type, normalize, dimensions, info)
        count = len(texts)
        if prompt:
            prompted = [prompt + text for text in texts]
            if release_texts:
                texts.clear()
        else:
            prompted = texts if release_texts else list(texts)  # _run empties its list once it is tokenized
        policy = overflow_policy(overflow, truncate, self.overflow)
        overlap = self.chunk_overlap if chunk_overlap is None else chunk_overlap
        if policy == "chunk" and not 0 <= overlap < info.max_length // 2:
            raise InvalidRequest(f"chunk_overlap must be from 0 to {info.max_length // 2 - 1} tokens, got {overlap}")
        done = await self._run(prompted, [field] * count, list(range(count)), policy, ticket, request_id,
                               truncation_direction, overlap)
        vectors = done.vectors
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = np.ascontiguousarray(vectors[:, :dimensions])
        if normalize:
            vectors = l2_normalize(vectors)
        dim = vectors.shape[1]
        if output_type != "float32":
            vectors = quantize(vectors, output_type, info.calibration)
        return Embedded(vectors, done.tokens, done.timing, info.embedding_space, done.text_tokens, done.truncated,
                        output_type, dim)

    async def score(self, query: str, documents: list[str], *, ticket: Ticket, top_k: int = 0,
                    truncate: bool | None = True, request_id: str = "", release_texts: bool = False,
                    truncation_direction: str = "right") -> Scored:
        """Cosine of the query with each document and the documents ranked best first, each with the model's
        prompt of its kind; release_texts: as for `embed` (documents is emptied)."""
        info = self.check_ready()
        query_prompt, document_prompt = prompt_for(info, "query"), prompt_for(info, "document")
        self.check_texts([query], "query", indexed=False, prompt=query_prompt)
        self.check_texts(documents, "documents", prompt=document_prompt)
        count = len(documents)
        texts = [query_prompt + query, *(document_prompt + document for document in documents)]
        if release_texts:
            documents.clear()
        done = await self._run(texts, ["query"] + ["documents"] * count, [0, *range(count)],
                               "error" if truncate is False else "truncate", ticket, request_id,
                               truncation_direction)
        vectors = l2_normalize(done.vectors)
        scores = vectors[1:] @ vectors[0]
        ranking = np.argsort(-scores, kind="stable")
        if top_k:
            ranking = ranking[:top_k]
        return Scored(scores, [int(i) for i in ranking], done.tokens, done.timing, info.embedding_space,
                      done.text_tokens, done.truncated)

    def check_texts(self, texts: list[str], field: str, indexed: bool = True, prompt: str = "") -> None:
        """Non-empty, valid Unicode, and within the character limit with the prompt that will be prefixed."""
        if not texts:
            raise InvalidRequest(f"{field} is empty: send at least one text")
        if len(texts) > self.limits.max_texts_per_request:
            raise InvalidRequest(f"{field} has {len(texts)} texts; the limit is "
                                 f"{self.limits.max_texts_per_request} per request")
        for i, text in enumerate(texts):
            name = f"{field}[{i}]" if indexed else field
            if not text:
                raise InvalidRequest(f"{name} is empty")
            if len(prompt) + len(text) > self.limits.max_chars_per_text:
                with_prompt = f" and its prompt {len(prompt)}" if prompt else ""
                raise InvalidRequest(f"{name} has {len(text)} characters{with_prompt}; the limit is "
                                     f"{self.limits.max_chars_per_text}")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise InvalidRequest(f"{name} holds a lone surrogate at character {exc.start} "
                                         f"({text[exc.start]!r}): it is not valid Unicode text") from None

    @staticmethod
    def check_output_type(output_type: str, normalize: bool, dimensions: int | None, info: ModelInfo) -> None:
        if output_type != "float32" and not normalize:
            raise InvalidRequest(f"output type {output_type} codes L2-normalised vectors; omit normalize=false")
        try:
            check_output_type(output_type, info.calibration, dimensions or info.dim, info.dim)
        except QuantizeError as error:
            raise InvalidRequest(str(error)) from error

    def check_dimensions(self, dimensions: int | None, info: ModelInfo) -> None:
        """Truncated vectors only from a model trained for them (Matryoshka), unless the server allows any size."""
        if dimensions is None:
            return
        if not info.matryoshka_dims and not self.allow_any_dimensions:
            raise InvalidRequest(f"dimensions={dimensions}: this model was not trained for truncated vectors (its "
                                 f"export records no matryoshka_dims); omit dimensions to get all {info.dim}")
        if not 1 <= dimensions <= info.dim:
            raise InvalidRequest(f"dimensions={dimensions} is out of range: 1 to {info.dim}")

    async def _run(self, texts: list[str], fields: list[str], indices: list[int], overflow: str,
                   ticket: Ticket, request_id: str, truncation_direction: str = "right",
                   chunk_overlap: int = 0) -> Embedded:
        """Tokenize and run texts through the batcher; fields/indices name each text in error messages. texts is
        emptied once tokenized (the caller passes a list of its own), so that only token ids wait for batches.
        overflow "chunk": a text over max_length runs as windows in the same batches as other work."""
        arrived = time.monotonic()
        batcher, embedder = self.batcher, self.embedder
        if batcher.queued_tokens >= batcher.max_queue_tokens:  # refuse before paying for tokenization
            raise QueueFull(f"queue full: {batcher.queued_tokens} tokens queued")
        self.admission.check_texts_wait(ticket, texts, embedder.info.max_length)
        deadline = ticket.deadline
        if truncation_direction not in TRUNCATION_DIRECTIONS:
            raise InvalidRequest(f"truncation_direction must be one of {', '.join(TRUNCATION_DIRECTIONS)}, "
                                 f"got {truncation_direction!r}")
        tokenized = await self._tokenize(embedder, texts, deadline, truncation_direction)
        if overflow == "error" and tokenized.truncated:
            i = tokenized.truncated[0]
            raise InvalidRequest(f"{fields[i]}[{indices[i]}] has {embedder.count_tokens(texts[i])} tokens, more than "
                                 f"max_length={embedder.info.max_length}, and truncate is false")
        count, owners = len(tokenized.ids), list(range(len(tokenized.ids)))
        if overflow == "chunk" and tokenized.truncated:
            tokenized, owners = self._windows(embedder, texts, tokenized, chunk_overlap)
        texts.clear()
        ticket.tokenized()  # the queue's token budget counts them from here
        tokenize_s = time.monotonic() - arrived
        if tokenized.truncated and self._on_truncated is not None:
            self._on_truncated(len(tokenized.truncated))
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed during tokenization")
        self.admission.check_wait(ticket, int(sum(tokenized.lengths)))
        result = await batcher.submit(tokenized.ids, tokenized.lengths, deadline, request_id)
        total_s = time.monotonic() - arrived
        if self._on_timing is not None:
            self._on_timing(result.queue_s, tokenize_s, result.inference_s)
        timing = Timing(result.queue_s, tokenize_s, result.inference_s, total_s)
        text_tokens = [0] * count
        for owner, length in zip(owners, tokenized.lengths, strict=True):
            text_tokens[owner] += length
        return Embedded(window_rows(result.vectors, owners, count), int(sum(tokenized.lengths)), timing,
                        text_tokens=text_tokens, truncated=list(tokenized.truncated))

    @staticmethod
    def _windows(embedder: Embedder, texts: list[str], tokenized: Tokenized,
                 overlap: int) -> tuple[Tokenized, list[int]]:
        """The truncated texts as windows: each keeps its first window in place, the rest go after all texts;
        returns the new Tokenized (none truncated) and the text each window belongs to."""
        ids, lengths, owners = list(tokenized.ids), list(tokenized.lengths), list(range(len(tokenized.ids)))
        for i in tokenized.truncated:
            windows = embedder.token_windows(texts[i], overlap)
            ids[i], lengths[i] = windows[0], len(windows[0])
            ids += windows[1:]
            lengths += [len(w) for w in windows[1:]]
            owners += [i] * (len(windows) - 1)
        return Tokenized(ids, lengths, []), owners

    async def _tokenize(self, embedder: Embedder, texts: list[str], deadline: float | None,
                        truncation_direction: str) -> Tokenized:
        """Small requests inline (tens of microseconds: cheaper than a thread hop); larger ones in slices of
        TOKENIZE_SLICE_TEXTS texts on the tokenizer threads, stopping if the deadline passes meanwhile."""
        tokenize = embedder.tokenize if truncation_direction == "right" else functools.partial(
            embedder.tokenize, truncation_direction=truncation_direction)
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            return tokenize(texts)
        ids: list = []
        lengths: list[int] = []
        truncated: list[int] = []
        for start in range(0, len(texts), TOKENIZE_SLICE_TEXTS):
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline passed during tokenization")
            part = await self.run_in_pool(tokenize, texts[start:start + TOKENIZE_SLICE_TEXTS])
            ids.extend(part.ids)
            lengths.extend(part.lengths)
            truncated.extend(start + i for i in part.truncated)
        return Tokenized(ids, lengths, truncated)
