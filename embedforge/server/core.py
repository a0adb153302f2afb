"""Request handling shared by the gRPC servicer and the HTTP API: validation, limits, tokenize, batch, reply data.

Knows neither gRPC nor HTTP nor onnxruntime. Each protocol front end turns its request into a call of
`EmbeddingCore.embed` / `score`, and an exception into its own status with `status_of`, so both protocols
refuse the same requests with the same messages and share one batcher, one queue and one set of limits.
Status names are gRPC's canonical codes ("INVALID_ARGUMENT", ...); the HTTP API maps them to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedforge.server.batcher import Batcher, BatcherStopped, BatchFailed, DeadlineExceeded, QueueFull, TooLarge
from embedforge.server.config import MAX_REQUEST_BYTES
from embedforge.server.embedder import Embedder, ModelInfo, Tokenized, l2_normalize

log = logging.getLogger("embedforge.server.core")

INLINE_TOKENIZE_CHARS = 1024
"""Requests up to this many characters are tokenized on the event loop (the Rust tokenizer takes tens of
microseconds for them, less than handing them to a thread: single-text p50 latency drops by about 0.15 ms);
larger ones go to the tokenizer thread so that the loop never stalls."""

INLINE_PARSE_BYTES = 64 * 1024
"""Larger request bodies are parsed on a tokenizer thread (a 20 MB body takes tens of milliseconds)."""

TimingObserver = Callable[[float, float, float], None]
"""(queue_s, tokenize_s, inference_s) for every successful Embed/Score call."""
CallObserver = Callable[[str, str, str, float], None]
"""(protocol, rpc name, status name, seconds) for every finished call of either protocol, e.g. to update metrics."""


TOKENIZE_SLICE_TEXTS = 32
"""A large request is tokenized 32 texts at a time (a few milliseconds each), so that other requests' slices
run in between."""


READ_SLOT_WAIT_S = 0.05
"""A call waits at most this long for a free read slot (`max_concurrent_reads`), then is refused: a body's size
is not known before it is read, so only a bounded number of bodies may be in flight at once."""


REMEMBERED_CONNECTIONS = 4096
"""Connections whose last (and last refused) body size is remembered (least recently seen forgotten first)."""


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_chars_per_text: int
    max_pending_bytes: int = 1 << 30  # request bytes held before tokenization
    max_concurrent_reads: int = 2  # bodies being read at once
    max_receive_bytes: int = MAX_REQUEST_BYTES  # the largest body


class Overloaded(Exception):
    """Too many request bytes wait for tokenization already, or too many bodies are being read."""


class ReadSlots:
    """`count` slots for reading request bodies, handed to waiters first come, first served.

    A call whose body is expected to be large never waits and never takes the last free slot (unless there is
    only one): a crowd of large bodies retrying cannot stand between a small call and a slot. Others wait up
    to READ_SLOT_WAIT_S. Either is refused with Overloaded."""

    def __init__(self, count: int) -> None:
        self.count = self.free = count
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self, large: bool = False) -> None:
        busy = Overloaded(f"{self.count} request bodies are being read already")
        kept = 1 if large and self.count > 1 else 0
        if self.free > kept and not self._waiters:
            self.free -= 1
            return
        if large:
            raise busy
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await asyncio.wait({slot}, timeout=READ_SLOT_WAIT_S)
        except BaseException:  # this task was cancelled while it waited
            if slot.done():
                self.release()  # handed over at that moment: pass it on
            else:
                slot.cancel()
                self._waiters.remove(slot)
            raise
        if not slot.done():  # timed out
            slot.cancel()
            self._waiters.remove(slot)
            raise busy

    def release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes to the oldest waiter
                return
        self.free += 1

    @property
    def busy(self) -> bool:
        return self.free == 0


class Held:
    """Request bytes counted against max_pending_bytes until the request is tokenized (or finished)."""

    def __init__(self, core: EmbeddingCore, size: int) -> None:
        self._core = core
        self.size = size  # still counted against the budget
        self.body_bytes = size  # the body's size, also after release

    def release(self) -> None:
        self._core._pending_bytes -= self.size
        self.size = 0


_HELD: contextvars.ContextVar[Held | None] = contextvars.ContextVar("embedforge_held_bytes", default=None)


def _remember(remembered: collections.OrderedDict, connection: str, value: Any) -> None:
    """Set remembered[connection], forgetting the least recently set beyond REMEMBERED_CONNECTIONS."""
    remembered[connection] = value
    remembered.move_to_end(connection)
    if len(remembered) > REMEMBERED_CONNECTIONS:
        remembered.popitem(last=False)


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
    if isinstance(exc, (QueueFull, Overloaded)):
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
                 on_timing: TimingObserver | None = None, tokenizer_threads: int = 2) -> None:
        self.limits = limits
        self.allow_any_dimensions = allow_any_dimensions
        self.embedder: Embedder | None = None
        self.batcher: Batcher | None = None
        self.draining = False
        self._on_timing = on_timing
        self._tokenize_pool = ThreadPoolExecutor(max_workers=tokenizer_threads,
                                                 thread_name_prefix="embedforge-tokenize")
        self._pending_bytes = 0
        self.read_slots = ReadSlots(limits.max_concurrent_reads)
        self._refused_bodies: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        self._last_body_bytes: collections.OrderedDict[str, int] = collections.OrderedDict()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def admit(self, size: int) -> Held:
        """Count a call's body (size bytes) against max_pending_bytes, or refuse it with Overloaded at once.
        The call's `_run` releases it once the texts are tokens; the caller releases it when the call ends."""
        if self._pending_bytes + size > self.limits.max_pending_bytes:
            raise Overloaded(f"{self._pending_bytes} request bytes wait for tokenization, this one has {size}, "
                             f"the limit is {self.limits.max_pending_bytes}")
        self._pending_bytes += size
        held = Held(self, size)
        _HELD.set(held)
        return held

    def check_room(self, expected_bytes: int = 0, expected_from: str = "", expected_tokens: int = 0) -> None:
        """Refuse (Overloaded, QueueFull) a call whose body has not been read yet when it could not be admitted:
        the byte budget is spent, or cannot take the `expected_bytes` the body will likely hold (`expected_from`
        says why: its Content-Length, or the previous body on its connection), or the queue is full or has no
        room for the `expected_tokens` the previous body needed. Such a call costs no memory and no read, and is
        answered at once."""
        pending, limit = self._pending_bytes, self.limits.max_pending_bytes
        if pending >= limit:
            raise Overloaded(f"{pending} request bytes wait for tokenization; the limit is {limit}")
        if pending + expected_bytes > limit:
            raise Overloaded(f"{pending} request bytes wait for tokenization and this call's body likely holds "
                             f"{expected_bytes} ({expected_from}); the limit is {limit}")
        batcher = self.batcher
        if batcher is None:
            return
        queued = batcher.queued_tokens
        if queued >= batcher.max_queue_tokens:
            raise QueueFull(f"queue full: {queued} tokens queued")
        # a body of n bytes holds about n tokens at most (plus two a text): one larger than the queue's reserve
        # for small requests is refused unread once only that reserve is left
        if expected_bytes > batcher.reserved_tokens and queued >= batcher.large_request_limit:
            raise QueueFull(f"queue full for large requests: {queued} tokens queued, the last "
                            f"{batcher.reserved_tokens} are kept for small ones, and this call's body likely "
                            f"holds {expected_bytes} bytes ({expected_from})")
        if expected_tokens and queued + expected_tokens > batcher.limit_for(expected_tokens):
            raise QueueFull(f"queue full: {queued} tokens queued, and this call likely needs {expected_tokens} "
                            f"({expected_from}); the limit is {batcher.limit_for(expected_tokens)}")

    def expected_body(self, connection: str) -> tuple[int, int]:
        """(bytes, tokens) of this connection's last body if it was refused for lack of room (budget: tokens 0;
        queue: both; (0, 0) otherwise): the likely size of its next, so that a client sending bodies the server
        cannot take is refused before each is read rather than after (tens of megabytes read and tokenized for
        nothing)."""
        return self._refused_bodies.get(connection, (0, 0))

    def remember_refused(self, connection: str, size: int, tokens: int = 0) -> None:
        """A body of `size` bytes (`tokens` once tokenized) from this connection was refused for lack of room."""
        _remember(self._refused_bodies, connection, (size, tokens))

    def likely_body_bytes(self, connection: str) -> int:
        """For read slots (ReadSlots): the size of the last body read on this connection, and for a connection
        without one (new, or forgotten) the largest body allowed. While slots are short, the calls of a
        connection that sent a large body, or none yet, neither wait for a slot nor take the last free one:
        the last slot is kept for connections known to send small bodies."""
        return self._last_body_bytes.get(connection, self.limits.max_receive_bytes)

    def record_body(self, connection: str, size: int) -> None:
        _remember(self._last_body_bytes, connection, size)

    def forget_refused(self, connection: str) -> None:
        """A body from this connection was admitted: its next is not expected to be refused."""
        self._refused_bodies.pop(connection, None)

    async def read_body(self, read: Callable[[], Awaitable[bytes]], connection: str | None = None,
                        content_length: int | None = None) -> tuple[Held, bytes]:
        """Read one request body with `read()` under the admission rules of both protocols and count it against
        the byte budget: refused unread (check_room) when it could not be admitted, read on a read slot, and
        refused after reading if the budget cannot take it. The caller releases the returned Held.

        gRPC passes its `connection`: the refused body before it, if any, is the size to expect, and the sizes
        it sends are remembered. HTTP passes its `content_length` instead."""
        if connection is None:
            expected = {"expected_bytes": content_length or 0, "expected_from": "its Content-Length"}
            slot_bytes = content_length or 0
        else:
            size, tokens = self.expected_body(connection)
            expected = {"expected_bytes": size, "expected_tokens": tokens,
                        "expected_from": "its connection's last body had as many and was refused"}
            slot_bytes = self.likely_body_bytes(connection)
        self.check_room(**expected)
        async with self.read_slot(slot_bytes):  # until the body is read and counted in the budget
            self.check_room(**expected)  # the budget may have been spent while this call waited for its slot
            raw = await read()
            if connection is not None:
                self.record_body(connection, len(raw))
            try:
                held = self.admit(len(raw))
            except Overloaded:
                if connection is not None:
                    self.remember_refused(connection, len(raw))
                raise
        if connection is not None:
            self.forget_refused(connection)
        return held, raw

    async def parse_body(self, held: Held, parse: Callable[..., Any], raw: bytes, *args: Any) -> Any:
        """parse(raw, *args), on a tokenizer thread for a body over INLINE_PARSE_BYTES (the event loop stays
        responsive); a body that fails to parse gives its bytes back to the budget."""
        try:
            if len(raw) > INLINE_PARSE_BYTES:
                return await self.run_in_pool(parse, raw, *args)
            return parse(raw, *args)
        except BaseException:
            held.release()
            raise

    @contextlib.asynccontextmanager
    async def read_slot(self, expected_bytes: int = 0) -> AsyncIterator[None]:
        """Hold a read slot (ReadSlots) while a body is read and admitted; Overloaded if none can be had. Bodies
        of unknown size in memory are thus bounded by the slots, not the calls. `expected_bytes` over
        INLINE_PARSE_BYTES (a Content-Length, or the last body on the connection) marks the body as large."""
        await self.read_slots.acquire(large=expected_bytes > INLINE_PARSE_BYTES)
        try:
            yield
        finally:
            self.read_slots.release()

    def run_in_pool(self, fn: Callable, *args: Any) -> Awaitable:
        """Run fn(*args) on a tokenizer thread (e.g. parsing a large request body)."""
        return asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

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
                    field: str = "texts", release_texts: bool = False) -> Embedded:
        """One vector per text, in order; `field` names the texts in error messages (texts[3] is empty).
        release_texts: empty the list once it is tokenized (the caller no longer needs it), so that the texts'
        memory is freed while the call waits for its batches."""
        info = self.check_ready()
        self.check_texts(texts, field)
        if not normalize and not info.unnormalized:
            raise InvalidRequest("normalize=false: this export has no unnormalized output; re-export with "
                                 "`embedforge export`")
        self.check_dimensions(dimensions, info)
        count = len(texts)
        done = await self._run(texts if release_texts else list(texts), [field] * count, list(range(count)),
                               truncate, deadline, request_id)
        vectors = done.vectors
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = np.ascontiguousarray(vectors[:, :dimensions])
        if normalize:
            vectors = l2_normalize(vectors)
        return Embedded(vectors, done.tokens, done.timing)

    async def score(self, query: str, documents: list[str], *, top_k: int = 0, truncate: bool = True,
                    deadline: float | None = None, request_id: str = "", release_texts: bool = False) -> Scored:
        """Cosine of the query with each document and the documents ranked best first; release_texts: as for
        `embed` (documents is emptied)."""
        self.check_ready()
        self.check_texts([query], "query", indexed=False)
        self.check_texts(documents, "documents")
        count = len(documents)
        texts = [query, *documents]
        if release_texts:
            documents.clear()
        done = await self._run(texts, ["query"] + ["documents"] * count, [0, *range(count)], truncate, deadline,
                               request_id)
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
        """Tokenize and run texts through the batcher; fields/indices name each text in error messages. texts is
        emptied once tokenized (the caller passes a list of its own), so that only token ids wait for batches."""
        arrived = time.monotonic()
        batcher, embedder = self.batcher, self.embedder
        if batcher.queued_tokens >= batcher.max_queue_tokens:  # refuse before paying for tokenization
            raise QueueFull(f"queue full: {batcher.queued_tokens} tokens queued")
        tokenized = await self._tokenize(embedder, texts, deadline)
        texts.clear()
        held = _HELD.get()
        if held is not None:
            held.release()  # the texts are tokens now: the queue's token budget counts them from here
        tokenize_s = time.monotonic() - arrived
        if not truncate and tokenized.truncated:
            i = tokenized.truncated[0]
            raise InvalidRequest(f"{fields[i]}[{indices[i]}] is longer than max_length="
                                 f"{embedder.info.max_length} tokens and truncate is false")
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed during tokenization")
        result = await batcher.submit(tokenized.ids, tokenized.lengths, deadline, request_id)
        total_s = time.monotonic() - arrived
        if self._on_timing is not None:
            self._on_timing(result.queue_s, tokenize_s, result.inference_s)
        timing = Timing(result.queue_s, tokenize_s, result.inference_s, total_s)
        return Embedded(result.vectors, int(sum(tokenized.lengths)), timing)

    async def _tokenize(self, embedder: Embedder, texts: list[str], deadline: float | None) -> Tokenized:
        """Small requests inline (tens of microseconds: cheaper than a thread hop); larger ones in slices of
        TOKENIZE_SLICE_TEXTS texts on the tokenizer threads, stopping if the deadline passes meanwhile."""
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            return embedder.tokenize(texts)
        ids: list = []
        lengths: list[int] = []
        truncated: list[int] = []
        for start in range(0, len(texts), TOKENIZE_SLICE_TEXTS):
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline passed during tokenization")
            part = await self.run_in_pool(embedder.tokenize, texts[start:start + TOKENIZE_SLICE_TEXTS])
            ids.extend(part.ids)
            lengths.extend(part.lengths)
            truncated.extend(start + i for i in part.truncated)
        return Tokenized(ids, lengths, truncated)
