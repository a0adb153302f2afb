"""Load generator engine: workload, closed/open loop scheduling, HDR latency histograms, JSON report.

The engine knows neither gRPC nor HTTP: it drives any ``async def call(texts) -> CallResult``.

Closed loop (``rate=None``): ``concurrency`` workers, each sends its next call when the previous one
returns; latency = done - sent.

Open loop (``rate=R``): call ``i`` is scheduled at ``t0 + i / R`` whatever the server does, with at most
``concurrency`` calls in flight. Latency = done - *scheduled*, so time spent waiting for a free slot
(queueing behind a slow server) is counted instead of hidden (coordinated omission). The service time
(done - actually sent) is kept in a second histogram; the gap between the two shows the queueing.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hdrh.histogram import HdrHistogram

REPORT_FORMAT_VERSION = 1
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
# Latencies are recorded in microseconds, from 1 us to 1 hour, with 3 significant digits.
_HIST_LOWEST_US = 1
_HIST_HIGHEST_US = 3_600_000_000
_HIST_DIGITS = 3
TIMELINE_STEP_S = 0.5  # width of one point of the report's throughput-over-time line

# Words that are each exactly one WordPiece token in the BERT uncased vocabulary (checked in the tests),
# so a synthetic text of n words is n + 2 tokens with [CLS] and [SEP].
_SYNTHETIC_WORDS = (
    "the of and to in is that for it as with was on be by at this from or an are not have which one all "
    "were they but has had more their can been there will would who when other its also into time than "
    "some only these new two first may over such after most people water world city state work part year "
    "years used number system between music team game film book house school river light power market "
    "story court group line way day life form place name family high large small early long great"
).split()


class LoadTestError(ValueError):
    """Bad load-test input (workload file, batch spec, report file), with a message naming the culprit."""


@dataclass
class CallResult:
    """Outcome of one call: ``code`` is "OK", the gRPC status name or, over HTTP, "HTTP <status>".

    ``n_texts`` counts the texts the server encoded, ``tokens`` the tokens it reports in its usage, and
    ``server_timing`` its own split of the call in milliseconds (e.g. queue, tokenize, inference).
    """

    ok: bool
    code: str
    n_texts: int = 0
    tokens: int = 0
    server_timing: dict[str, float] = field(default_factory=dict)
    message: str = ""
    embedding_space: str = ""  # the space the reply came from (replicas may serve two during an update)


Call = Callable[[list[str]], Awaitable[CallResult]]


@dataclass(frozen=True)
class LoadSpec:
    """How to drive the load: closed loop when ``rate`` is None, open loop at ``rate`` calls/s otherwise.

    ``concurrency`` is the number of workers (closed) or the cap on calls in flight (open). The measured
    phase starts after ``warmup_s`` and ends after ``duration_s`` or ``requests`` measured calls,
    whichever comes first; at least one of the two must be set.
    """

    concurrency: int = 1
    rate: float | None = None
    duration_s: float | None = None
    requests: int | None = None
    warmup_s: float = 0.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise LoadTestError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise LoadTestError(f"rate must be > 0 calls/s, got {self.rate}")
        if self.duration_s is None and self.requests is None:
            raise LoadTestError("set a duration or a number of requests (the run must stop by itself)")
        if self.duration_s is not None and not self.duration_s > 0:
            raise LoadTestError(f"duration must be > 0 s, got {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            raise LoadTestError(f"requests must be >= 1, got {self.requests}")
        if self.warmup_s < 0:
            raise LoadTestError(f"warmup must be >= 0 s, got {self.warmup_s}")

    @property
    def mode(self) -> str:
        return "closed" if self.rate is None else "open"


# ---------------------------------------------------------------------------------------------- workload


def parse_batch(spec: str) -> tuple[int, int]:
    """Parse ``"8"`` -> (8, 8) or ``"1-16"`` -> (1, 16): texts per call, drawn uniformly from the range."""
    parts = spec.strip().split("-")
    try:
        low, high = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise LoadTestError(f"batch must be a number or a range like 1-16, got {spec!r}") from None
    if len(parts) > 2 or low < 1 or high < low:
        raise LoadTestError(f"batch must be a number >= 1 or a range LOW-HIGH with 1 <= LOW <= HIGH, got {spec!r}")
    return low, high


def synthetic_texts(n_tokens: int, count: int = 256, seed: int = 0) -> list[str]:
    """``count`` different texts of exactly ``n_tokens`` BERT tokens each ([CLS] + n_tokens-2 words + [SEP])."""
    if n_tokens < 3:
        raise LoadTestError(f"synthetic texts need at least 3 tokens ([CLS] word [SEP]), got {n_tokens}")
    rng = random.Random(seed)
    return [" ".join(rng.choice(_SYNTHETIC_WORDS) for _ in range(n_tokens - 2)) for _ in range(count)]


def load_texts(path: str | Path) -> list[str]:
    """Texts from a pair file (.json/.jsonl: every distinct query and document) or a text file, one per line."""
    path = Path(path)
    if path.suffix.lower() in (".json", ".jsonl"):
        from embedforge.data import DataError, read_pairs

        try:
            pairs = read_pairs(path)
        except DataError as exc:
            raise LoadTestError(str(exc)) from None
        texts = list(dict.fromkeys(t for p in pairs for t in (p.query, p.document)))
    else:
        try:
            with path.open(encoding="utf-8") as handle:
                texts = [line.strip() for line in handle]
        except UnicodeDecodeError as exc:
            raise LoadTestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise LoadTestError(f"{path}: cannot read ({exc.strerror})") from None
        texts = [t for t in texts if t]
    if not texts:
        raise LoadTestError(f"{path}: no texts found")
    return texts


class Workload:
    """Draws the texts of each call: a batch size uniform in [low, high], then texts at random from a pool.

    For ``rpc="score"`` one more text is drawn for the query, so ``batch`` counts documents.
    """

    def __init__(self, texts: Sequence[str], batch: tuple[int, int] = (1, 1), rpc: str = "embed", seed: int = 0):
        if not texts:
            raise LoadTestError("the workload needs at least one text")
        if rpc not in ("embed", "score"):
            raise LoadTestError(f"rpc must be embed or score, got {rpc!r}")
        self.texts = list(texts)
        self.batch = batch
        self.rpc = rpc
        self._rng = random.Random(seed)

    def next_texts(self) -> list[str]:
        n = self._rng.randint(*self.batch) + (1 if self.rpc == "score" else 0)
        return [self._rng.choice(self.texts) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- recording


def new_histogram() -> HdrHistogram:
    return HdrHistogram(_HIST_LOWEST_US, _HIST_HIGHEST_US, _HIST_DIGITS)


def _record_seconds(hist: HdrHistogram, seconds: float) -> None:
    hist.record_value(min(max(round(seconds * 1e6), _HIST_LOWEST_US), _HIST_HIGHEST_US))


@dataclass
class RunResult:
    """Everything measured in one run (the measured phase only; warmup calls are not counted)."""

    spec: LoadSpec
    latency: HdrHistogram = field(default_factory=new_histogram)  # OK calls, from scheduled (open) or sent
    service: HdrHistogram = field(default_factory=new_histogram)  # OK calls, from actually sent
    sent: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    texts: int = 0
    tokens: int = 0
    server_sums: dict[str, float] = field(default_factory=dict)
    server_counts: Counter = field(default_factory=Counter)
    spaces: Counter = field(default_factory=Counter)  # OK replies per embedding space
    unsent: int = 0  # open loop: calls scheduled in the measured phase but never sent (client fell behind)
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    t_measure: float = 0.0  # perf_counter() at the end of the warmup
    ok_per_step: Counter = field(default_factory=Counter)  # OK calls finished in each TIMELINE_STEP_S
    errors_per_step: Counter = field(default_factory=Counter)

    def record(self, result: CallResult, scheduled: float, sent: float, done: float) -> None:
        self.sent += 1
        step = int(max(done - self.t_measure, 0.0) / TIMELINE_STEP_S)
        if not result.ok:
            self.errors_per_step[step] += 1
            self.errors[result.code] += 1
            self.error_examples.setdefault(result.code, result.message)
            return
        self.ok += 1
        self.ok_per_step[step] += 1
        self.texts += result.n_texts
        self.tokens += result.tokens
        self.spaces[result.embedding_space] += 1
        _record_seconds(self.latency, done - scheduled)
        _record_seconds(self.service, done - sent)
        for key, value in result.server_timing.items():
            self.server_sums[key] = self.server_sums.get(key, 0.0) + value
            self.server_counts[key] += 1


async def _safe_call(call: Call, texts: list[str]) -> CallResult:
    """Run the call; a client-side exception becomes an error result instead of killing the run."""
    try:
        return await call(texts)
    except Exception as exc:  # noqa: BLE001 - any client bug is reported under its own code
        return CallResult(ok=False, code=f"CLIENT_{type(exc).__name__}", message=str(exc)[:500])


# ---------------------------------------------------------------------------------------------- scheduling


async def run_load(call: Call, next_texts: Callable[[], list[str]], spec: LoadSpec) -> RunResult:
    """Drive ``call`` as ``spec`` says and return what was measured after the warmup.

    ``elapsed_s`` runs from the end of the warmup until the last measured call returned;
    ``cpu_s`` is this process's CPU time (all threads) over the same span.
    """
    t0 = time.perf_counter()
    t_measure = t0 + spec.warmup_s
    result = RunResult(spec=spec, t_measure=t_measure)
    t_end = t_measure + spec.duration_s if spec.duration_s is not None else math.inf
    cpu_at_measure: list[float] = []
    loop = asyncio.get_running_loop()
    loop.call_later(spec.warmup_s, lambda: cpu_at_measure.append(time.process_time()))
    if spec.rate is None:
        await _closed_loop(call, next_texts, spec, result, t_measure, t_end)
    else:
        await _open_loop(call, next_texts, spec, result, t0, t_measure, t_end)
    finished = time.perf_counter()
    result.elapsed_s = max(finished - t_measure, 1e-9)
    result.cpu_s = time.process_time() - (cpu_at_measure[0] if cpu_at_measure else time.process_time())
    return result


async def _closed_loop(
    call: Call, next_texts: Callable[[], list[str]], spec: LoadSpec, result: RunResult,
    t_measure: float, t_end: float,
) -> None:
    budget = spec.requests if spec.requests is not None else math.inf

    async def worker() -> None:
        nonlocal budget
        while True:
            sent = time.perf_counter()
            if sent >= t_end:
                return
            measured = sent >= t_measure
            if measured:
                if budget <= 0:
                    return
                budget -= 1
            outcome = await _safe_call(call, next_texts())
            if measured:
                result.record(outcome, sent, sent, time.perf_counter())

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))


async def _open_loop(
    call: Call, next_texts: Callable[[], list[str]], spec: LoadSpec, result: RunResult,
    t0: float, t_measure: float, t_end: float,
) -> None:
    assert spec.rate is not None
    interval = 1.0 / spec.rate
    slots = asyncio.Semaphore(spec.concurrency)
    tasks: set[asyncio.Task] = set()
    measured_sent = 0

    async def one(scheduled: float, measured: bool) -> None:
        try:
            sent = time.perf_counter()
            outcome = await _safe_call(call, next_texts())
            if measured:
                result.record(outcome, scheduled, sent, time.perf_counter())
        finally:
            slots.release()

    i = 0
    while True:
        scheduled = t0 + i * interval
        if scheduled >= t_end or (spec.requests is not None and measured_sent >= spec.requests):
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        waited = slots.locked()
        await slots.acquire()  # a slow server makes this wait: later calls go out late, latency counts it
        if waited and time.perf_counter() >= t_end:
            slots.release()
            # Every call scheduled in the measured phase from i on was due but never sent.
            first = max(i, math.ceil((t_measure - t0) / interval))
            last = math.ceil((t_end - t0) / interval)
            if spec.requests is not None:
                last = min(last, first + spec.requests - measured_sent)
            result.unsent = max(0, last - first)
            break
        measured = scheduled >= t_measure
        if measured:
            measured_sent += 1
        task = asyncio.create_task(one(scheduled, measured))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.gather(*tasks)


async def run_sweep(
    call: Call, next_texts: Callable[[], list[str]], concurrencies: Sequence[int], spec: LoadSpec,
    on_step: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """One closed-loop run per concurrency level (each with its own warmup): the latency-throughput curve."""
    steps = []
    for concurrency in concurrencies:
        step_spec = LoadSpec(
            concurrency=concurrency, duration_s=spec.duration_s, requests=spec.requests, warmup_s=spec.warmup_s
        )
        steps.append(await run_load(call, next_texts, step_spec))
        if on_step is not None:
            on_step(steps[-1])
    return steps


def parse_sweep(spec: str) -> list[int]:
    """Parse ``"1,2,4,8"`` into concurrency levels."""
    try:
        levels = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise LoadTestError(f"sweep must be comma-separated concurrency levels like 1,2,4,8, got {spec!r}") from None
    if not levels or min(levels) < 1:
        raise LoadTestError(f"sweep levels must be integers >= 1, got {spec!r}")
    return levels


# ---------------------------------------------------------------------------------------------- report


def latency_summary(hist: HdrHistogram) -> dict[str, float | None]:
    """min, p50, p90, p95, p99, p99.9, max, mean and stddev in milliseconds (None without samples)."""
    keys = ["min", *(f"p{p:g}" for p in PERCENTILES), "max", "mean", "stddev"]
    if hist.get_total_count() == 0:
        return dict.fromkeys(keys)
    values = [hist.get_min_value(), *(hist.get_value_at_percentile(p) for p in PERCENTILES), hist.get_max_value()]
    values += [hist.get_mean_value(), hist.get_stddev()]
    return {key: round(value / 1000.0, 4) for key, value in zip(keys, values, strict=True)}


def run_report(run: RunResult) -> dict:
    """The JSON-ready summary of one run (the histograms go in HDR's compressed base64 form)."""
    spec = run.spec
    return {
        "mode": spec.mode,
        "concurrency": spec.concurrency,
        "rate": spec.rate,
        "duration_s": spec.duration_s,
        "requests": spec.requests,
        "warmup_s": spec.warmup_s,
        "elapsed_s": round(run.elapsed_s, 4),
        "sent": run.sent,
        "ok": run.ok,
        "errors": dict(sorted(run.errors.items())),
        "error_examples": dict(sorted(run.error_examples.items())),
        "unsent": run.unsent,
        "requests_per_s": round(run.ok / run.elapsed_s, 3),  # successful calls only
        "sent_per_s": round(run.sent / run.elapsed_s, 3),
        "texts_per_s": round(run.texts / run.elapsed_s, 3),
        "tokens_per_s": round(run.tokens / run.elapsed_s, 3) if run.tokens else None,
        "texts": run.texts,
        "tokens": run.tokens,
        "latency_ms": latency_summary(run.latency),
        "service_ms": latency_summary(run.service),
        "server_ms": {k: round(total / run.server_counts[k], 4) for k, total in run.server_sums.items()},
        "spaces": dict(sorted(run.spaces.items())),
        "client_cpu": {
            "cpu_s": round(run.cpu_s, 4),
            "wall_s": round(run.elapsed_s, 4),
            "cores": round(run.cpu_s / run.elapsed_s, 4),
        },
        "timeline": timeline(run),
        "latency_hdr": run.latency.encode().decode("ascii"),
        "service_hdr": run.service.encode().decode("ascii"),
    }


def timeline(run: RunResult) -> dict:
    """Throughput over time: OK calls and failed calls per second in each TIMELINE_STEP_S of the run.

    A replica lost in the middle of a run shows as a dip (and failures, if any reached the caller). The last
    step is usually shorter than the others, so it reads low.
    """
    last = max([*run.ok_per_step, *run.errors_per_step], default=-1)
    steps = max(math.ceil(run.elapsed_s / TIMELINE_STEP_S), last + 1)
    return {
        "step_s": TIMELINE_STEP_S,
        "ok_per_s": [round(run.ok_per_step[i] / TIMELINE_STEP_S, 3) for i in range(steps)],
        "errors_per_s": [round(run.errors_per_step[i] / TIMELINE_STEP_S, 3) for i in range(steps)],
    }


def build_report(config: dict, runs: Sequence[RunResult], sweep: bool) -> dict:
    """A whole report: ``kind`` "run" (one run, its fields at the top) or "sweep" (``steps``, one per level)."""
    report = {"format_version": REPORT_FORMAT_VERSION, "kind": "sweep" if sweep else "run", "config": config}
    if sweep:
        report["steps"] = [run_report(run) for run in runs]
    else:
        report.update(run_report(runs[0]))
    return report


def decode_histogram(encoded: str) -> HdrHistogram:
    """The histogram stored in a report's ``latency_hdr``/``service_hdr`` field."""
    return HdrHistogram.decode(encoded.encode("ascii"))
