"""Token-budget dynamic batching, independent of gRPC and of the model runtime.

Callers `submit` the tokenized texts of one request; worker tasks merge the texts of concurrent requests
into model batches and run them through a `run_batch` callable in worker threads (so the event loop never
blocks while the model computes). `workers` batches may run at once (default 1; on a CPU, workers x
intra-op threads = cores: several single-threaded runs avoid the thread synchronisation of one wide run).
One more batch is formed while they run, so a thread never waits for the event loop between batches;
its texts are checked again (caller gone? deadline passed?) right before it starts. Each batch is told
whether it runs `alone` (no other batch in flight, nothing queued): a backend can then use all cores for a
lone request and keep to its share under load.

A batch's cost is its padded size:  cost = batch_size * longest_length  <=  max_batch_tokens.
To keep padding small the worker takes a window of the oldest queued texts, sorts it by length and cuts it
into chunks: a chunk ends where the budget would be exceeded, or where it already holds min_batch_tokens
real tokens and the next (longer) text would widen its padding. It runs the chunk holding the oldest
text (so no text waits forever); the rest stay queued for the next batches.
Texts of one request may land in several batches; their vectors are put back in request order.

Waiting: when a worker is idle, a new request runs at once. Right after a batch, if fewer than
min_batch_tokens are queued, the worker waits until the oldest text has waited `max_wait_ms`
(or min_batch_tokens are queued) so that a busy server runs fuller batches.

Backpressure: at most `max_queue_tokens` tokens wait in the queue; `submit` raises QueueFull at once beyond
that. Work whose caller is gone (cancelled) or whose deadline passed is dropped before it is computed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("embedforge.server.batcher")

RunBatch = Callable[[list[Any], bool], np.ndarray]
"""Takes the payloads of one batch (sorted by length, shortest first) and `alone`; returns float32
[len(payloads), dim]. alone: no other batch runs or waits and no text is queued, so the backend may give this
batch every core; False under load, where batches run side by side."""

WINDOW_BATCHES = 4  # how many batches' worth of queued tokens are sorted together


class QueueFull(Exception):
    """The queue holds max_queue_tokens already; the caller should retry later."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before all of its texts were computed."""


class BatchFailed(Exception):
    """run_batch raised for a batch that carried this request."""


class TooLarge(ValueError):
    """The request can never be queued: a text over max_batch_tokens or more than max_queue_tokens in all."""


class BatcherStopped(Exception):
    """The batcher is stopping or stopped and takes no more work."""


@dataclass(frozen=True)
class BatchStats:
    size: int  # texts in the batch
    tokens: int  # real tokens (sum of lengths)
    padded_tokens: int  # size * longest length
    seconds: float  # wall time of run_batch


@dataclass(frozen=True)
class BatchResult:
    vectors: np.ndarray  # float32 [n, dim] in submit order
    queue_s: float  # submit -> first of its texts entered a batch
    inference_s: float  # summed wall time of the batches that carried its texts


class _Request:
    __slots__ = ("future", "deadline", "request_id", "submitted", "first_batch", "inference_s", "count",
                 "remaining", "vectors")

    def __init__(self, future: asyncio.Future, deadline: float | None, request_id: str, count: int) -> None:
        self.future = future
        self.deadline = deadline
        self.request_id = request_id
        self.submitted = time.monotonic()
        self.first_batch: float | None = None
        self.inference_s = 0.0
        self.count = count
        self.remaining = count
        self.vectors: np.ndarray | None = None


class _Item:
    __slots__ = ("request", "index", "length", "payload")

    def __init__(self, request: _Request, index: int, length: int, payload: Any) -> None:
        self.request = request
        self.index = index
        self.length = length
        self.payload = payload


class Batcher:
    """Merge concurrent requests into token-budget batches and run them through `run_batch`."""

    def __init__(self, run_batch: RunBatch, *, max_batch_tokens: int, min_batch_tokens: int, max_wait_ms: float,
                 max_queue_tokens: int, workers: int = 1,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        """The limits are explained above; the server takes them from `embedforge.server.config.ServeConfig`."""
        if min(max_batch_tokens, min_batch_tokens, max_queue_tokens, workers) < 1 or max_wait_ms < 0:
            raise ValueError("token limits and workers must be >= 1 and max_wait_ms >= 0")
        self._run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self.min_batch_tokens = min_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_tokens = max_queue_tokens
        self._on_batch = on_batch
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embedforge-infer")
        self._pending: collections.deque[_Item] = collections.deque()
        self._queued_tokens = 0
        self._in_flight = 0  # batches taken from the queue and not yet delivered
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_texts(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Start the worker tasks on the running event loop."""
        self._wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()  # one task more than threads: the next batch waits ready for a thread
        self._tasks = [loop.create_task(self._work(), name=f"embedforge-batcher-{i}") for i in range(self.workers + 1)]

    async def stop(self) -> None:
        """Refuse new work, let the running batch finish, fail what is still queued with BatcherStopped."""
        self._stopping = True
        if self._tasks:
            self._wakeup.set()
            await asyncio.gather(*self._tasks)
        while self._pending:
            self._fail(self._pending.popleft().request, BatcherStopped("server is shutting down"))
        self._queued_tokens = 0
        self._executor.shutdown(wait=True)

    async def submit(self, payloads: Sequence[Any], lengths: Sequence[int], deadline: float | None = None,
                     request_id: str = "") -> BatchResult:
        """Queue one request's texts (payload i has lengths[i] tokens) and wait for their vectors.

        deadline: time.monotonic() value after which the work is dropped (DeadlineExceeded)."""
        if self._stopping or not self._tasks:
            raise BatcherStopped("server is not accepting work")
        if len(payloads) != len(lengths) or not payloads:
            raise ValueError("payloads and lengths must be non-empty and of equal size")
        total = int(sum(lengths))
        if total > self.max_queue_tokens:
            raise TooLarge(f"request has {total} tokens, more than the queue holds ({self.max_queue_tokens}); "
                           "split it into smaller requests")
        if max(lengths) > self.max_batch_tokens:
            raise TooLarge(f"a text of {max(lengths)} tokens exceeds max_batch_tokens={self.max_batch_tokens}")
        if self._queued_tokens + total > self.max_queue_tokens:
            raise QueueFull(f"queue full: {self._queued_tokens} tokens queued, request needs {total}, "
                            f"limit {self.max_queue_tokens}")
        loop = asyncio.get_running_loop()
        request = _Request(loop.create_future(), deadline, request_id, len(payloads))
        items = enumerate(zip(payloads, lengths, strict=True))
        self._pending.extend(_Item(request, i, int(n), p) for i, (p, n) in items)
        self._queued_tokens += total
        self._wakeup.set()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(request.future, timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"deadline passed with {request.remaining} of {len(payloads)} texts "
                                   "not computed") from None

    # ---- worker ----

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        idle = True
        while True:
            batch = await self._next_batch(idle)
            if batch is None:
                return
            self._in_flight += 1
            try:
                batch, vectors, seconds = await loop.run_in_executor(self._executor, self._compute, batch)
                if batch:
                    self._deliver(batch, vectors, seconds)
            except Exception as exc:  # one failing batch fails only its own requests
                ids = sorted({it.request.request_id for it in batch})
                log.error("event=batch_failed size=%d request_ids=%s error=%r", len(batch), ",".join(ids), exc)
                for item in batch:
                    self._fail(item.request, BatchFailed(f"inference failed: {exc}"))
                batch = []
            finally:
                self._in_flight -= 1
            if batch and self._on_batch is not None:
                longest = max(it.length for it in batch)
                self._on_batch(BatchStats(len(batch), sum(it.length for it in batch), len(batch) * longest, seconds))
            idle = not self._pending

    def _compute(self, batch: list[_Item]) -> tuple[list[_Item], np.ndarray | None, float]:
        """In a worker thread: drop texts whose caller left or whose deadline passed while the batch waited
        for a thread, then run the rest. Returns (computed items, their vectors, seconds)."""
        started = time.monotonic()
        live = [it for it in batch if not it.request.future.done()
                and (it.request.deadline is None or started < it.request.deadline)]
        if not live:
            return live, None, 0.0
        for item in live:
            if item.request.first_batch is None:
                item.request.first_batch = started
        alone = self._in_flight == 1 and not self._pending  # read from this thread: a hint, not a guarantee
        vectors = self._run_batch([it.payload for it in live], alone)
        if vectors.shape[0] != len(live):
            raise RuntimeError(f"run_batch returned {vectors.shape[0]} vectors for {len(live)} texts")
        return live, vectors, time.monotonic() - started

    async def _next_batch(self, idle: bool) -> list[_Item] | None:
        """Wait for work, then take the next batch (see the module docstring for the policy); None: stop."""
        while True:
            if self._stopping:
                return None
            self._drop_dead()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                idle = True
                continue
            if not idle and self._queued_tokens < self.min_batch_tokens:
                wait = self._pending[0].request.submitted + self.max_wait_s - time.monotonic()
                if wait > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    except asyncio.TimeoutError:
                        idle = True  # waited long enough: run what is there
                    continue
            return self._take_batch()

    def _drop_dead(self) -> None:
        """Remove queued texts whose request is finished (cancelled, failed) or past its deadline."""
        now = time.monotonic()
        keep: list[_Item] = []
        dropped = False
        for item in self._pending:
            request = item.request
            if not request.future.done() and request.deadline is not None and now >= request.deadline:
                self._fail(request, DeadlineExceeded("deadline passed while queued"))
            if request.future.done():
                self._queued_tokens -= item.length
                dropped = True
            else:
                keep.append(item)
        if dropped:
            self._pending = collections.deque(keep)

    def _take_batch(self) -> list[_Item]:
        window: list[_Item] = []
        tokens = 0
        for item in self._pending:
            if window and tokens + item.length > WINDOW_BATCHES * self.max_batch_tokens:
                break
            window.append(item)
            tokens += item.length
        oldest = window[0]
        ordered = sorted(window, key=lambda it: it.length)
        batch: list[_Item] = []
        batch_tokens = 0
        has_oldest = False
        for item in ordered:  # cut the sorted window into chunks; keep the chunk that holds the oldest text
            if batch:
                over_budget = (len(batch) + 1) * item.length > self.max_batch_tokens
                widens = item.length > batch[-1].length and batch_tokens >= self.min_batch_tokens
                if over_budget or widens:
                    if has_oldest:
                        break
                    batch, batch_tokens, has_oldest = [], 0, False
            batch.append(item)
            batch_tokens += item.length
            has_oldest = has_oldest or item is oldest
        chosen = {id(it) for it in batch}
        rest = [it for it in window if id(it) not in chosen]
        for _ in range(len(window)):
            self._pending.popleft()
        self._pending.extendleft(reversed(rest))
        self._queued_tokens -= sum(it.length for it in batch)
        return batch

    def _deliver(self, batch: list[_Item], vectors: np.ndarray, seconds: float) -> None:
        seen: set[int] = set()
        for row, item in enumerate(batch):
            request = item.request
            if request.future.done():
                continue
            if request.vectors is None:
                request.vectors = np.empty((request.count, vectors.shape[1]), dtype=np.float32)
            if id(request) not in seen:
                seen.add(id(request))
                request.inference_s += seconds
            request.vectors[item.index] = vectors[row]
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(BatchResult(request.vectors, request.first_batch - request.submitted,
                                                      request.inference_s))

    @staticmethod
    def _fail(request: _Request, exc: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
