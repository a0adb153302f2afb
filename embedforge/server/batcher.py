"""Token-budget dynamic batching, independent of gRPC and of the model runtime.

Callers `submit` the tokenized texts of one request; worker tasks merge the texts of concurrent requests
into model batches and run them through a `run_batch` callable in worker threads (so the event loop never
blocks while the model computes). `workers` batches may run at once (default 1; on a CPU, workers x
intra-op threads = cores: several single-threaded runs avoid the thread synchronisation of one wide run).
A batch is chosen only when a thread is free to run it, so that work arriving meanwhile can still go first.
Each batch is told whether it runs `alone` (no other batch in flight, nothing queued): a backend can then
use all cores for a lone request and keep to its share under load.

A batch's cost is its padded size:  cost = batch_size * longest_length  <=  max_batch_tokens.

Fairness (which work goes next): least attained service first. Of the requests with queued texts, the one
whose texts have had the fewest tokens computed so far goes first (ties: the one with the fewest tokens left,
then the oldest); so a short request that just arrived is next, whatever is queued, and requests that have
had equal service take turns (per-request round robin). Every AGEING_EVERY-th batch instead serves the
oldest request, so a long request finishes even under a flood of new ones. By design a short text waits for
the first running batch to end, not for the queue.

Padding: the worker takes a window of queued texts (the chosen request's first, then the others' in the same
order), sorts it by length and cuts it into chunks: a chunk ends where the budget would be exceeded, where it
already holds min_batch_tokens real tokens and the next (longer) text would widen its padding, or where the next
text is over WIDEN_LIMIT times its longest (a short text is never padded to, and never waits for, a batch of
long ones). It runs the chunk holding the chosen request's shortest text; the rest stay queued.
Texts of one request may land in several batches; their vectors are put back in request order.

Waiting: when a worker is idle, a new request runs at once. Right after a batch, if fewer than
min_batch_tokens are queued, the worker waits until the oldest text has waited `max_wait_ms`
(or min_batch_tokens are queued) so that a busy server runs fuller batches.

Backpressure: at most `max_queue_tokens` tokens wait in the queue and one request holds at most
`max_request_tokens` of them; `submit` raises QueueFull at once beyond that. Work whose caller is gone
(cancelled) or whose deadline passed is dropped before it is computed.

Wait estimate (for deadline-aware admission, server/admission.py): the batcher keeps its recent throughput,
an exponential average over batches of real tokens per second times the batches that ran at once, counting
batches of at least min_batch_tokens real tokens only (a lone short query is mostly fixed cost per batch and
would make long work look several times slower than it runs); the server starts it from its warm-up batch. Under least
attained service a request of n tokens finishes once every queued request has had up to n tokens of service,
so `estimated_wait_s(n)` = (n + sum of min(queued tokens of each request, n)) / throughput, plus one batch's
time while batches run. The newcomer overtakes queued requests by as much, so `delays_past_deadline(n)` says
whether admitting it would make a queued request late that would otherwise finish in time.

Memory: a backend keeps the working memory of its largest batch for the next one (allocating it again costs
each batch time); `on_idle`, run in a worker thread once nothing has been queued for IDLE_RELEASE_S after a
batch, is where it gives that memory back, so a burst's memory leaves when the burst ends, not after every batch.

Health: after `max_failures` failed batches in a row `healthy` turns False (and `on_health(False)` is called);
the next successful batch turns it back. A worker task that dies is logged and replaced. `stop(timeout)`
gives up on a batch that hangs and says so.
"""

from __future__ import annotations

import asyncio
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
WIDEN_LIMIT = 4  # a chunk is closed before a text over 4x its longest (a short text does not wait for long ones)
AGEING_EVERY = 4  # every 4th batch serves the oldest request (no request starves)
RATE_SMOOTHING = 0.2  # weight of the newest batch in the throughput average
IDLE_RELEASE_S = 1.0  # on_idle runs once the queue has been empty this long after a batch


def _smooth(average: float | None, sample: float) -> float:
    """An exponential moving average (RATE_SMOOTHING), started by its first sample."""
    return sample if average is None else average + RATE_SMOOTHING * (sample - average)


class QueueFull(Exception):
    """The queue has no room for the request (`tokens`, 0 if not known yet); the caller should retry later."""

    def __init__(self, message: str, tokens: int = 0) -> None:
        super().__init__(message)
        self.tokens = tokens


class DeadlineExceeded(Exception):
    """The request's deadline passed before all of its texts were computed."""


class BatchFailed(Exception):
    """run_batch raised for a batch that carried this request."""


class TooLarge(ValueError):
    """The request can never be queued: a text over max_batch_tokens or more than max_request_tokens in all."""


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


class QueuedRequest:
    __slots__ = ("future", "deadline", "request_id", "submitted", "first_batch", "inference_s", "count",
                 "remaining", "vectors", "queue", "queued_tokens", "served")

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
        self.queue: list[QueuedText] = []  # its texts still waiting, shortest first
        self.queued_tokens = 0
        self.served = 0  # tokens of its texts taken into batches so far


class QueuedText:
    __slots__ = ("request", "index", "length", "payload")

    def __init__(self, request: QueuedRequest, index: int, length: int, payload: Any) -> None:
        self.request = request
        self.index = index
        self.length = length
        self.payload = payload


def service_order(requests: list[QueuedRequest], oldest_first: bool) -> list[QueuedRequest]:
    """Least attained service first (ties: fewest tokens left, then the oldest), or arrival order when
    `oldest_first` (every AGEING_EVERY-th batch)."""
    if oldest_first:
        return list(requests)
    return sorted(requests, key=lambda r: (r.served, r.queued_tokens))  # stable: ties keep arrival order


def fill_window(order: list[QueuedRequest], max_tokens: int) -> list[QueuedText]:
    """Queued texts in service order (each request's shortest first) up to `max_tokens`; the first text
    always, whatever its length. Stops at the first text that would not fit."""
    window: list[QueuedText] = []
    tokens = 0
    for item in (item for request in order for item in request.queue):
        if window and tokens + item.length > max_tokens:
            break
        window.append(item)
        tokens += item.length
    return window


def closes_chunk(chunk: list[QueuedText], chunk_tokens: int, item: QueuedText, budget: int,
                 min_batch_tokens: int) -> bool:
    """Whether `item` (no shorter than any text in the chunk) must start a new chunk: it would exceed the
    budget, widen the padding of a chunk that already holds min_batch_tokens, or be over WIDEN_LIMIT times
    the chunk's longest text."""
    longest = chunk[-1].length
    over_budget = (len(chunk) + 1) * item.length > budget
    widens = item.length > longest and chunk_tokens >= min_batch_tokens
    return over_budget or widens or item.length > WIDEN_LIMIT * longest


def cut_chunk(window: list[QueuedText], first: QueuedText, budget: int, min_batch_tokens: int) -> list[QueuedText]:
    """Cut the window (sorted by length) into chunks (`closes_chunk`) and return the one holding `first`."""
    chunk: list[QueuedText] = []
    chunk_tokens = 0
    for item in window:
        if chunk and closes_chunk(chunk, chunk_tokens, item, budget, min_batch_tokens):
            if first in chunk:
                break
            chunk, chunk_tokens = [], 0
        chunk.append(item)
        chunk_tokens += item.length
    return chunk


class Batcher:
    """Merge concurrent requests into token-budget batches and run them through `run_batch`."""

    def __init__(self, run_batch: RunBatch, *, max_batch_tokens: int, min_batch_tokens: int, max_wait_ms: float,
                 max_queue_tokens: int, max_failures: int, workers: int = 1, max_request_tokens: int | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_health: Callable[[bool], None] | None = None,
                 on_idle: Callable[[], None] | None = None) -> None:
        """The limits are explained above; the server takes them from `embedforge.server.config.ServeConfig`.
        max_request_tokens: the most one request may queue (None: max_queue_tokens)."""
        max_request_tokens = max_request_tokens or max_queue_tokens
        if min(max_batch_tokens, min_batch_tokens, max_queue_tokens, workers, max_request_tokens,
               max_failures) < 1 or max_wait_ms < 0:
            raise ValueError("token limits, workers and max_failures must be >= 1 and max_wait_ms >= 0")
        self._run_batch = run_batch
        self.max_batch_tokens = max_batch_tokens
        self.min_batch_tokens = min_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_tokens = max_queue_tokens
        self.max_request_tokens = min(max_request_tokens, max_queue_tokens)
        self.max_failures = max_failures
        self._on_batch = on_batch
        self._on_health = on_health
        self._on_idle = on_idle
        self._idle_due = on_idle is not None  # batches ran since on_idle last did (the warm-up counts)
        self.workers = workers
        self.tokens_per_s: float | None = None  # recent throughput (see the module docstring); None: no batch yet
        self._batch_s = 0.0  # recent seconds per batch
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embedforge-infer")
        self._requests: list[QueuedRequest] = []  # requests with queued texts, in arrival order
        self._queued_tokens = 0
        self._queued_texts = 0
        self._in_flight = 0  # batches taken from the queue and not yet delivered
        self._batches = 0  # batches taken so far (every AGEING_EVERY-th serves the oldest request)
        self._failures = 0  # failed batches in a row
        self.healthy = True
        self._wakeup: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def estimated_wait_s(self, tokens: int) -> float | None:
        """Seconds until a request of `tokens` tokens submitted now would be computed (module docstring); None
        until a batch has been timed."""
        if self.tokens_per_s is None:
            return None
        ahead = tokens + sum(min(request.queued_tokens, tokens) for request in self._requests)
        return ahead / self.tokens_per_s + (self._batch_s if self._in_flight else 0.0)

    def delays_past_deadline(self, tokens: int, safety: float) -> float | None:
        """Whether a new request of `tokens` tokens would make a queued request miss its deadline: the seconds
        until the first such request is computed (a retry hint), else None (and None until a batch has been
        timed). Served least attained service first, the newcomer overtakes queued request r for up to
        min(tokens, F_r) tokens, where F_r = r's served + queued tokens; r itself finishes after
        sum over queued requests q of min(queued tokens of q, F_r - served of q, 0 at least). A request counts
        when its wait, times `safety`, fits in the time it has left without the newcomer and not with it."""
        if self.tokens_per_s is None:
            return None
        now = time.monotonic()
        extra_s = self._batch_s if self._in_flight else 0.0
        whole_queue_s = (self._queued_tokens + tokens) / self.tokens_per_s + extra_s
        deadlines = [r.deadline for r in self._requests if r.deadline is not None]
        if not deadlines or (min(deadlines) - now) >= whole_queue_s * safety:
            return None  # the whole queue and the newcomer fit before the nearest deadline
        for request in self._requests:
            if request.deadline is None or request.future.done():
                continue
            finish = request.served + request.queued_tokens
            ahead = sum(min(other.queued_tokens, max(0, finish - other.served)) for other in self._requests)
            wait_s = ahead / self.tokens_per_s + extra_s
            delay_s = min(tokens, finish) / self.tokens_per_s
            if wait_s * safety <= request.deadline - now < (wait_s + delay_s) * safety:
                return wait_s
        return None

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    def start(self) -> None:
        """Start the worker tasks on the running event loop."""
        self._wakeup = asyncio.Event()
        for _ in range(self.workers):
            self._spawn_worker()

    def _spawn_worker(self) -> None:
        task = asyncio.get_running_loop().create_task(self._work(), name="embedforge-batcher")
        self._tasks.add(task)
        task.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task) -> None:
        """A worker returns only when stopping; one that died of an error is logged and replaced."""
        self._tasks.discard(task)
        if task.cancelled() or self._stopping:
            return
        log.error("event=worker_died error=%r detail=\"replaced by a new worker\"", task.exception())
        self._spawn_worker()

    async def stop(self, timeout: float | None = None) -> bool:
        """Refuse new work, let running batches finish, fail what is still queued with BatcherStopped.

        timeout: seconds to wait for running batches (None: as long as they take). Returns False if a batch
        was still running then: its thread is left behind (it cannot be interrupted) and its callers fail."""
        self._stopping = True
        finished = True
        if self._tasks:
            self._wakeup.set()
            _, running = await asyncio.wait(set(self._tasks), timeout=timeout)
            finished = not running
            for task in running:
                task.cancel()
        for request in self._requests:
            self._fail(request, BatcherStopped("server is shutting down"))
        self._requests.clear()
        self._queued_tokens = self._queued_texts = 0
        self._executor.shutdown(wait=finished)
        return finished

    async def submit(self, payloads: Sequence[Any], lengths: Sequence[int], deadline: float | None = None,
                     request_id: str = "") -> BatchResult:
        """Queue one request's texts (payload i has lengths[i] tokens) and wait for their vectors.

        deadline: time.monotonic() value after which the work is dropped (DeadlineExceeded)."""
        if self._stopping or not self._tasks:
            raise BatcherStopped("server is not accepting work")
        if len(payloads) != len(lengths) or not payloads:
            raise ValueError("payloads and lengths must be non-empty and of equal size")
        total = int(sum(lengths))
        if total > self.max_request_tokens:
            raise TooLarge(f"request has {total} tokens, more than one request may queue "
                           f"({self.max_request_tokens}); split it into smaller requests")
        if max(lengths) > self.max_batch_tokens:
            raise TooLarge(f"a text of {max(lengths)} tokens exceeds max_batch_tokens={self.max_batch_tokens}")
        if self._queued_tokens + total > self.max_queue_tokens:
            raise QueueFull(f"queue full: {self._queued_tokens} tokens queued, request needs {total}, "
                            f"limit {self.max_queue_tokens}", tokens=total)
        loop = asyncio.get_running_loop()
        request = QueuedRequest(loop.create_future(), deadline, request_id, len(payloads))
        items = [QueuedText(request, i, int(n), p) for i, (p, n) in enumerate(zip(payloads, lengths, strict=True))]
        request.queue = sorted(items, key=lambda it: it.length)
        request.queued_tokens = total
        self._requests.append(request)
        self._queued_tokens += total
        self._queued_texts += len(items)
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
            running = self._in_flight
            try:
                batch, vectors, seconds = await loop.run_in_executor(self._executor, self._compute, batch)
                if batch:
                    self._deliver(batch, vectors, seconds)
                    self._on_outcome(ok=True)
                    self.record_batch(sum(it.length for it in batch), seconds, running)
                    self._idle_due = self._on_idle is not None
            except Exception as exc:  # one failing batch fails only its own requests
                ids = sorted({it.request.request_id for it in batch})
                log.error("event=batch_failed size=%d request_ids=%s error=%r", len(batch), ",".join(ids), exc)
                for item in batch:
                    self._fail(item.request, BatchFailed(f"inference failed: {exc}"))
                batch = []
                self._on_outcome(ok=False)
            finally:
                self._in_flight -= 1
            if batch and self._on_batch is not None:
                longest = max(it.length for it in batch)
                self._on_batch(BatchStats(len(batch), sum(it.length for it in batch), len(batch) * longest, seconds))
            idle = not self._requests

    def record_batch(self, tokens: int, seconds: float, running: int = 1) -> None:
        """Fold a batch of `tokens` real tokens that took `seconds` while `running` batches ran (this one included)
        into the throughput average; one under min_batch_tokens is not counted (module docstring)."""
        if seconds <= 0 or tokens < self.min_batch_tokens:
            return
        self.tokens_per_s = _smooth(self.tokens_per_s, tokens / seconds * running)
        self._batch_s = _smooth(self._batch_s or None, seconds)

    def _on_outcome(self, ok: bool) -> None:
        self._failures = 0 if ok else self._failures + 1
        healthy = self._failures < self.max_failures
        if healthy != self.healthy:
            self.healthy = healthy
            if healthy:
                log.info("event=healthy detail=\"a batch succeeded\"")
            else:
                log.error("event=unhealthy failures_in_a_row=%d", self._failures)
            if self._on_health is not None:
                self._on_health(healthy)

    def _compute(self, batch: list[QueuedText]) -> tuple[list[QueuedText], np.ndarray | None, float]:
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
        alone = self._in_flight == 1 and not self._requests  # read from this thread: a hint, not a guarantee
        vectors = self._run_batch([it.payload for it in live], alone)
        if vectors.shape[0] != len(live):
            raise RuntimeError(f"run_batch returned {vectors.shape[0]} vectors for {len(live)} texts")
        return live, vectors, time.monotonic() - started

    async def _next_batch(self, idle: bool) -> list[QueuedText] | None:
        """Wait for work, then take the next batch (see the module docstring for the policy); None: stop."""
        while True:
            if self._stopping:
                return None
            self._drop_dead()
            if not self._requests:
                self._wakeup.clear()
                if self._idle_due:
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), IDLE_RELEASE_S)
                    except asyncio.TimeoutError:
                        await self._run_on_idle()
                else:
                    await self._wakeup.wait()
                idle = True
                continue
            if not idle and self._queued_tokens < self.min_batch_tokens:
                wait = self._requests[0].submitted + self.max_wait_s - time.monotonic()
                if wait > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    except asyncio.TimeoutError:
                        idle = True  # waited long enough: run what is there
                    continue
            return self._take_batch()

    async def _run_on_idle(self) -> None:
        """on_idle in a worker thread, once per idle spell (several workers may time out together)."""
        if not self._idle_due:
            return
        self._idle_due = False
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._on_idle)
        except Exception as exc:  # giving memory back is best effort; serving goes on
            log.warning("event=on_idle_failed error=%r", exc)

    def _drop_dead(self) -> None:
        """Remove queued requests that are finished (cancelled, failed) or past their deadline."""
        now = time.monotonic()
        keep: list[QueuedRequest] = []
        for request in self._requests:
            if not request.future.done() and request.deadline is not None and now >= request.deadline:
                self._fail(request, DeadlineExceeded("deadline passed while queued"))
            if request.future.done():
                self._queued_tokens -= request.queued_tokens
                self._queued_texts -= len(request.queue)
            else:
                keep.append(request)
        self._requests = keep

    def _take_batch(self) -> list[QueuedText]:
        """The next batch, in four steps: the order requests are served in, a window of their queued texts,
        the chunk of the sorted window that holds the first text in that order, and its dequeueing."""
        self._batches += 1
        order = service_order(self._requests, oldest_first=self._batches % AGEING_EVERY == 0)
        window = fill_window(order, WINDOW_BATCHES * self.max_batch_tokens)
        batch = cut_chunk(sorted(window, key=lambda it: it.length), order[0].queue[0], self.max_batch_tokens,
                          self.min_batch_tokens)
        self._dequeue(batch)
        return batch

    def _dequeue(self, batch: list[QueuedText]) -> None:
        """Take the batch's texts off their requests' queues, counting them as service those requests had."""
        taken = set(batch)
        for request in {item.request for item in batch}:
            kept = [it for it in request.queue if it not in taken]
            kept_tokens = sum(it.length for it in kept)
            request.served += request.queued_tokens - kept_tokens
            request.queue, request.queued_tokens = kept, kept_tokens
        self._requests = [r for r in self._requests if r.queue]
        self._queued_tokens -= sum(it.length for it in batch)
        self._queued_texts -= len(batch)

    def _deliver(self, batch: list[QueuedText], vectors: np.ndarray, seconds: float) -> None:
        seen: set[QueuedRequest] = set()
        for row, item in enumerate(batch):
            request = item.request
            if request.future.done():
                continue
            if request.vectors is None:
                request.vectors = np.empty((request.count, vectors.shape[1]), dtype=np.float32)
            if request not in seen:
                seen.add(request)
                request.inference_s += seconds
            request.vectors[item.index] = vectors[row]
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(BatchResult(request.vectors, request.first_batch - request.submitted,
                                                      request.inference_s))

    @staticmethod
    def _fail(request: QueuedRequest, exc: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
