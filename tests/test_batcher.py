"""Batcher unit tests: no model, no gRPC. run_batch is a fake that records every batch it gets."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
import pytest

from embedforge.server.batcher import (
    Batcher,
    BatcherStopped,
    BatchFailed,
    DeadlineExceeded,
    QueuedRequest,
    QueuedText,
    QueueFull,
    TooLarge,
    cut_chunk,
    fill_window,
    service_order,
)


class Recorder:
    """run_batch fake: payloads are ints; vector of payload p is [p, -p]. Optionally blocks on a gate."""

    def __init__(self, gated: bool = False, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.alone: list[bool] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not gated:
            self.gate.set()
        self.fail_on = fail_on

    def __call__(self, payloads: list[int], alone: bool) -> np.ndarray:
        self.batches.append(list(payloads))
        self.alone.append(alone)
        self.entered.set()
        self.gate.wait(10)
        if self.fail_on in payloads:
            raise RuntimeError("boom")
        return np.array([[p, -p] for p in payloads], dtype=np.float32)

    @property
    def computed(self) -> set[int]:
        return {p for batch in self.batches for p in batch}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


LIMITS = {"max_batch_tokens": 16384, "min_batch_tokens": 256, "max_wait_ms": 2.0, "max_queue_tokens": 524288,
          "max_failures": 5}


async def started(recorder: Recorder, **kwargs) -> Batcher:
    batcher = Batcher(recorder, **(LIMITS | kwargs))
    batcher.start()
    return batcher


async def wait_entered(recorder: Recorder) -> None:
    """Wait (without blocking the loop) until run_batch has been entered."""
    while not recorder.entered.is_set():
        await asyncio.sleep(0.001)


def test_single_request_keeps_order_and_reports_timing():
    async def main():
        recorder = Recorder()
        batcher = await started(recorder)
        result = await batcher.submit([5, 1, 3], [7, 2, 4])
        await batcher.stop()
        return recorder, result

    recorder, result = run(main())
    np.testing.assert_array_equal(result.vectors[:, 0], [5, 1, 3])
    assert recorder.batches == [[1, 3, 5]]  # sorted by length inside the batch
    assert result.queue_s >= 0 and result.inference_s > 0


def test_concurrent_requests_merge_into_one_batch():
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder, max_wait_ms=0)
        first = asyncio.create_task(batcher.submit([0], [3]))
        await wait_entered(recorder)  # batch 1 is running; the next requests queue up behind it
        others = [asyncio.create_task(batcher.submit([10 * i + 1, 10 * i + 2], [3, 5])) for i in range(1, 20)]
        await asyncio.sleep(0.05)
        recorder.gate.set()
        results = await asyncio.gather(first, *others)
        await batcher.stop()
        return recorder, results

    recorder, results = run(main())
    assert len(recorder.batches) == 2
    assert len(recorder.batches[1]) == 38
    for i, result in enumerate(results[1:], start=1):
        np.testing.assert_array_equal(result.vectors[:, 0], [10 * i + 1, 10 * i + 2])


def test_token_budget_splits_large_request_and_reassembles_in_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=200).tolist()

    async def main():
        recorder = Recorder()
        batcher = await started(recorder, max_batch_tokens=256)
        result = await batcher.submit(list(range(200)), lengths)
        await batcher.stop()
        return recorder, result

    recorder, result = run(main())
    np.testing.assert_array_equal(result.vectors[:, 0], np.arange(200))
    assert len(recorder.batches) > 1
    for batch in recorder.batches:
        batch_lengths = [lengths[p] for p in batch]
        assert len(batch) * max(batch_lengths) <= 256
        assert batch_lengths == sorted(batch_lengths)
    padded = sum(len(b) * max(lengths[p] for p in b) for b in recorder.batches)
    assert padded < 1.25 * sum(lengths)  # length sorting keeps padding small (unsorted: ~1.9x here)


def test_no_wait_when_idle():
    async def main():
        batcher = await started(Recorder(), max_wait_ms=5000)
        t0 = time.monotonic()
        await batcher.submit([1], [4])
        elapsed = time.monotonic() - t0
        await batcher.stop()
        return elapsed

    assert run(main()) < 1.0


def test_waits_up_to_max_wait_to_fill_a_batch_when_busy():
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder, max_wait_ms=400)
        first = asyncio.create_task(batcher.submit([0], [3]))
        await wait_entered(recorder)
        second = asyncio.create_task(batcher.submit([1], [3]))  # an idle worker prepares it as the next batch
        await asyncio.sleep(0.01)
        third = asyncio.create_task(batcher.submit([2], [3]))
        await asyncio.sleep(0.01)
        recorder.gate.set()  # batch [0] ends; [2] is young, so its worker waits for more
        await asyncio.sleep(0.05)
        fourth = asyncio.create_task(batcher.submit([3], [3]))
        await asyncio.gather(first, second, third, fourth)
        await batcher.stop()
        return recorder

    recorder = run(main())
    assert recorder.batches == [[0], [1, 2, 3]]


def test_several_workers_run_batches_at_once():
    running, peak, lock = [0], [0], threading.Lock()

    def run_batch(payloads, alone):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return np.array([[p, -p] for p in payloads], dtype=np.float32)

    async def main():
        batcher = Batcher(run_batch, **(LIMITS | {"workers": 2, "min_batch_tokens": 1}))
        batcher.start()
        results = await asyncio.gather(*(batcher.submit([i], [i + 1]) for i in range(6)))  # one batch each
        await batcher.stop()
        return results

    results = run(main())
    assert [r.vectors[0, 0] for r in results] == list(range(6))
    assert peak[0] == 2


def test_on_idle_runs_once_per_idle_spell_and_never_between_busy_batches(monkeypatch):
    monkeypatch.setattr("embedforge.server.batcher.IDLE_RELEASE_S", 0.2)
    idle_calls: list[int] = []

    async def main():
        recorder = Recorder()
        batcher = Batcher(recorder, **LIMITS, on_idle=lambda: idle_calls.append(len(recorder.batches)))
        batcher.start()
        await asyncio.sleep(0.3)  # after start: the warm-up's memory goes back
        assert idle_calls == [0]
        for i in range(10):  # busy: a batch every 50 ms, never idle for 0.2 s
            await batcher.submit([i], [4])
            await asyncio.sleep(0.05)
        assert idle_calls == [0]
        await asyncio.sleep(0.4)
        assert idle_calls == [0, 10]  # once, after the last batch
        await asyncio.sleep(0.4)
        assert idle_calls == [0, 10]  # no batch since: nothing to give back
        await batcher.stop()

    run(main())


def test_queue_full_is_refused_at_once_for_single_texts_too():
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder, max_queue_tokens=100)
        first = asyncio.create_task(batcher.submit([0], [10]))
        await wait_entered(recorder)
        queued = asyncio.create_task(batcher.submit([1, 2, 3], [30, 30, 30]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit([4], [11])
        batches_at_refusal = list(recorder.batches)  # the gate is shut: refused without waiting for a batch
        recorder.gate.set()
        await asyncio.gather(first, queued)
        after = await batcher.submit([5], [11])  # room again once the queue drained
        await batcher.stop()
        return batches_at_refusal, after

    batches_at_refusal, after = run(main())
    assert batches_at_refusal == [[0]]
    assert after.vectors[0, 0] == 5


def test_the_wait_estimate_shares_the_throughput_as_least_attained_service_does():
    """estimated_wait_s(n) = (n + sum of min(queued_r, n)) / tokens_per_s (+ one batch's time while batches run):
    every queued request gets up to n tokens of service before a new request of n tokens is done."""
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder, max_batch_tokens=64, min_batch_tokens=100, workers=1)
        assert batcher.estimated_wait_s(10) is None  # no batch timed yet
        batcher.record_batch(tokens=300, seconds=0.5, running=2)  # 600 tokens/s per batch x 2 batches at once
        batcher.record_batch(tokens=300, seconds=3.0, running=1)  # 100 tokens/s: the average moves a fifth of the way
        batcher.record_batch(tokens=10, seconds=1.0)  # under min_batch_tokens: mostly fixed cost, not counted
        rate = 1200 + 0.2 * (100 - 1200)
        assert batcher.tokens_per_s == pytest.approx(rate)
        first = asyncio.create_task(batcher.submit([0], [3]))  # runs: not queued
        await wait_entered(recorder)
        queued = [asyncio.create_task(batcher.submit([i] * 5, [40] * 5)) for i in (1, 2)]  # 200 tokens each
        small = asyncio.create_task(batcher.submit([3], [4]))
        await asyncio.sleep(0)
        batch_s = 0.5 + 0.2 * (3.0 - 0.5)
        estimates = (batcher.estimated_wait_s(10), batcher.estimated_wait_s(1000))
        recorder.gate.set()
        await asyncio.gather(first, *queued, small)
        await batcher.stop()
        return estimates, rate, batch_s

    (short, long), rate, batch_s = run(main())
    assert short == pytest.approx((10 + 10 + 10 + 4) / rate + batch_s)
    assert long == pytest.approx((1000 + 200 + 200 + 4) / rate + batch_s)


def test_a_newcomer_that_would_make_a_queued_request_late_is_named():
    """Least attained service lets a newcomer of n tokens overtake queued request r by min(n, F_r) tokens;
    delays_past_deadline says so when that pushes r's wait (times the safety factor) past its deadline, and not
    for a short newcomer, a request without a deadline, or one that would be late anyway."""
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder, max_batch_tokens=64, min_batch_tokens=100, workers=1)
        batcher.record_batch(tokens=300, seconds=3.0)  # 100 tokens/s, 3 s per batch
        running = asyncio.create_task(batcher.submit([0], [3]))
        await wait_entered(recorder)  # one batch in flight: 3 s more before anything queued runs
        now = time.monotonic()
        tight = asyncio.create_task(batcher.submit([1] * 5, [40] * 5, deadline=now + 8.0))  # waits 2 + 3 = 5 s
        await asyncio.sleep(0)
        verdicts = {"100 tokens": batcher.delays_past_deadline(100, 1.5),  # (5 + 1) x 1.5 = 9 > 8: late
                    "10 tokens": batcher.delays_past_deadline(10, 1.5)}  # (5 + 0.1) x 1.5 = 7.65: in time
        tight.cancel()
        for deadline, label in ((None, "no deadline"), (now + 6.0, "late anyway")):  # 5 x 1.5 = 7.5 > 6
            other = asyncio.create_task(batcher.submit([2] * 5, [40] * 5, deadline=deadline))
            await asyncio.sleep(0)
            verdicts[label] = batcher.delays_past_deadline(100, 1.5)
            other.cancel()
            await asyncio.sleep(0)
        recorder.gate.set()
        await running
        await batcher.stop()
        return verdicts

    verdicts = run(main())
    assert verdicts["100 tokens"] == pytest.approx(5.0, abs=0.05)
    assert verdicts["10 tokens"] is None
    assert verdicts["no deadline"] is None and verdicts["late anyway"] is None


def test_cancelled_and_expired_work_is_never_computed():
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder)
        first = asyncio.create_task(batcher.submit([0], [3]))
        await wait_entered(recorder)
        cancelled = asyncio.create_task(batcher.submit([1, 2], [3, 3]))
        expiring = asyncio.create_task(batcher.submit([3], [3], deadline=time.monotonic() + 0.05))
        kept = asyncio.create_task(batcher.submit([4], [3]))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(DeadlineExceeded):
            await expiring
        recorder.gate.set()
        await asyncio.gather(first, kept)
        await batcher.stop()
        return recorder, cancelled

    recorder, cancelled = run(main())
    assert cancelled.cancelled()
    assert recorder.computed == {0, 4}


def test_failing_batch_fails_only_its_requests(caplog):
    async def main():
        batcher = await started(Recorder(fail_on=13))
        with pytest.raises(BatchFailed, match="boom"):
            await batcher.submit([13, 14], [2, 2], request_id="req-bad")
        good = await batcher.submit([15], [2])
        await batcher.stop()
        return good

    with caplog.at_level(logging.ERROR, logger="embedforge.server.batcher"):
        good = run(main())
    assert good.vectors[0, 0] == 15
    assert "req-bad" in caplog.text


def test_stop_finishes_taken_batches_fails_queued_work_and_refuses_new():
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder)  # one thread, and one spare worker that takes the next batch early
        running = asyncio.create_task(batcher.submit([0], [3]))
        await wait_entered(recorder)
        taken = asyncio.create_task(batcher.submit([1], [3]))
        await asyncio.sleep(0)  # [1] is queued now
        while batcher.queued_texts:  # until the spare worker has taken [1]; it waits for the thread
            await asyncio.sleep(0.001)
        queued = asyncio.create_task(batcher.submit([2], [3]))
        await asyncio.sleep(0.01)
        assert batcher.queued_texts == 1  # no worker is free: [2] stays in the queue
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0)
        with pytest.raises(BatcherStopped):
            await batcher.submit([3], [3])
        recorder.gate.set()
        await stopping
        with pytest.raises(BatcherStopped):
            await queued
        return recorder, await running, await taken

    recorder, running, taken = run(main())
    assert recorder.batches == [[0], [1]]
    assert running.vectors[0, 0] == 0 and taken.vectors[0, 0] == 1


def test_rejects_requests_that_can_never_fit():
    async def main():
        batcher = await started(Recorder(), max_batch_tokens=8, max_queue_tokens=20)
        with pytest.raises(TooLarge, match="max_batch_tokens"):
            await batcher.submit([1], [9])
        with pytest.raises(TooLarge, match="more than one request may queue"):
            await batcher.submit([1, 2, 3], [8, 8, 8])
        await batcher.stop()

    run(main())


def test_min_batch_tokens_closes_a_batch_before_it_widens():
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder, min_batch_tokens=8)
        first = asyncio.create_task(batcher.submit([0], [1]))
        await wait_entered(recorder)
        lengths = [1, 5, 1, 1, 5, 1, 1, 5, 1, 1, 5, 1]  # eight texts of 1 token, four of 5; the oldest is short
        queued = asyncio.create_task(batcher.submit(list(range(1, 13)), lengths))
        await asyncio.sleep(0.01)
        recorder.gate.set()
        result = await queued
        await first
        await batcher.stop()
        return recorder, result

    recorder, result = run(main())
    np.testing.assert_array_equal(result.vectors[:, 0], np.arange(1, 13))
    assert recorder.batches == [[0], [1, 3, 4, 6, 7, 9, 10, 12], [2, 5, 8, 11]]


def test_batches_are_told_whether_they_run_alone():
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder, workers=2, min_batch_tokens=1)
        first = asyncio.create_task(batcher.submit([1], [3]))
        await wait_entered(recorder)  # runs by itself: alone
        second = asyncio.create_task(batcher.submit([2], [3]))
        while len(recorder.batches) < 2:  # starts beside the first one: not alone
            await asyncio.sleep(0.001)
        recorder.gate.set()
        await asyncio.gather(first, second)
        await batcher.submit([3], [3])  # the server is idle again: alone
        await batcher.stop()
        return recorder

    recorder = run(main())
    assert recorder.batches == [[1], [2], [3]]
    assert recorder.alone == [True, False, True]


# ---- fairness, health, bounded stop ----


def test_a_new_short_request_goes_before_queued_long_work_and_in_a_batch_of_its_own():
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder, max_batch_tokens=1024, min_batch_tokens=128)
        running = asyncio.create_task(batcher.submit([0], [512]))
        await wait_entered(recorder)
        # Two clients queue 4 full batches of long texts each, then a short request arrives.
        floods = [asyncio.create_task(batcher.submit(list(range(base, base + 8)), [512] * 8))
                  for base in (100, 200)]
        await asyncio.sleep(0.01)
        short = asyncio.create_task(batcher.submit([7], [9]))
        await asyncio.sleep(0.01)
        recorder.gate.set()
        await asyncio.gather(running, short, *floods)
        await batcher.stop()
        return recorder

    batches = run(main()).batches
    assert batches[1] == [7]  # right after the running batch, not padded to 512 and not behind the floods
    assert sorted(p for b in batches[2:] for p in b) == list(range(100, 108)) + list(range(200, 208))
    # the two flooding requests take turns (every 4th batch goes to the oldest): both are served early
    owners = [b[0] // 100 for b in batches[2:]]
    assert set(owners[:3]) == {1, 2}


def test_ageing_serves_the_oldest_request_even_under_a_stream_of_new_ones():
    async def main():
        recorder = Recorder(gated=True)
        batcher = await started(recorder, max_batch_tokens=512, min_batch_tokens=1, max_wait_ms=0)
        running = asyncio.create_task(batcher.submit([0], [512]))
        await wait_entered(recorder)
        old = asyncio.create_task(batcher.submit([1, 2], [512, 512]))  # two batches' worth, served once first
        await asyncio.sleep(0.01)
        news = [asyncio.create_task(batcher.submit([10 + i], [8])) for i in range(12)]
        await asyncio.sleep(0.01)
        recorder.gate.set()
        await asyncio.gather(running, old, *news)
        await batcher.stop()
        return recorder

    batches = run(main()).batches
    position = next(i for i, b in enumerate(batches) if 2 in b or 1 in b)
    assert position <= 4  # not after all 12 newer requests


def test_one_request_may_hold_only_its_share_of_the_queue():
    async def main():
        batcher = await started(Recorder(), max_queue_tokens=1000, max_request_tokens=250)
        with pytest.raises(TooLarge, match="more than one request may queue"):
            await batcher.submit([1, 2, 3], [100, 100, 100])
        result = await batcher.submit([1, 2], [100, 100])
        await batcher.stop()
        return result

    assert run(main()).vectors.shape == (2, 2)


def test_health_turns_false_after_failures_in_a_row_and_back_after_a_success():
    reports: list[bool] = []

    async def main():
        batcher = await started(Recorder(fail_on=0), max_failures=3, on_health=reports.append)
        for _ in range(2):
            with pytest.raises(BatchFailed):
                await batcher.submit([0], [1])
        assert batcher.healthy and reports == []
        with pytest.raises(BatchFailed):
            await batcher.submit([0], [1])
        assert not batcher.healthy
        await batcher.submit([5], [1])
        assert batcher.healthy
        await batcher.stop()

    run(main())
    assert reports == [False, True]


def test_a_worker_that_dies_is_logged_and_replaced(caplog):
    calls = []

    def on_batch(stats):
        calls.append(stats)
        if len(calls) == 1:
            raise RuntimeError("observer bug")

    async def main():
        batcher = await started(Recorder(), workers=1, on_batch=on_batch)
        first = await batcher.submit([1], [1])
        await asyncio.sleep(0.01)
        second = await batcher.submit([2], [1])  # served by the replacement worker
        await batcher.stop()
        return first, second

    first, second = run(main())
    assert second.vectors[0, 0] == 2 and len(calls) == 2
    assert "event=worker_died" in caplog.text and "observer bug" in caplog.text


def test_stop_gives_up_on_a_hanging_batch_within_its_timeout():
    hang = threading.Event()

    def run_batch(payloads, alone):
        hang.wait(5)
        return np.zeros((len(payloads), 2), dtype=np.float32)

    async def main():
        batcher = Batcher(run_batch, **LIMITS)
        batcher.start()
        stuck = asyncio.create_task(batcher.submit([1], [1]))
        await asyncio.sleep(0.05)
        started_at = time.monotonic()
        finished = await batcher.stop(timeout=0.2)
        took = time.monotonic() - started_at
        stuck.cancel()
        return finished, took

    try:
        finished, took = run(main())
    finally:
        hang.set()
    assert finished is False and took < 1.0


# ---- the four steps of choosing a batch, one by one ----

def queued(name: str, lengths: list[int], served: int = 0) -> QueuedRequest:
    request = QueuedRequest(None, None, name, len(lengths))
    request.queue = [QueuedText(request, i, length, f"{name}{i}") for i, length in enumerate(sorted(lengths))]
    request.queued_tokens, request.served = sum(lengths), served
    return request


def test_service_order_is_least_attained_service_then_fewest_left_then_oldest():
    old, short, served, tie = queued("old", [50]), queued("short", [5]), queued("served", [1], 99), queued("tie", [5])
    requests = [old, short, served, tie]
    assert service_order(requests, oldest_first=False) == [short, tie, old, served]
    assert service_order(requests, oldest_first=True) == requests


def test_fill_window_takes_texts_in_service_order_up_to_its_limit():
    a, b = queued("a", [4, 6]), queued("b", [3, 20])
    assert [it.payload for it in fill_window([a, b], 13)] == ["a0", "a1", "b0"]  # b1 (20) would pass 13
    assert [it.payload for it in fill_window([b, a], 100)] == ["b0", "b1", "a0", "a1"]
    assert [it.payload for it in fill_window([queued("big", [900])], 10)] == ["big0"]  # the first always


def test_cut_chunk_returns_the_chunk_holding_the_first_text():
    request = queued("r", [2, 2, 3, 3, 40, 40])
    window = request.queue
    # budget 12: [2,2,3,3] pads to 4 x 3 = 12; 40 is over 4 x 3 (WIDEN_LIMIT) and starts its own chunk
    assert [it.length for it in cut_chunk(window, window[0], 12, 1000)] == [2, 2, 3, 3]
    assert [it.length for it in cut_chunk(window, window[4], 100, 1000)] == [40, 40]
    # a chunk holding min_batch_tokens real tokens is closed before a longer text would widen its padding
    assert [it.length for it in cut_chunk(window, window[0], 1000, 4)] == [2, 2]
    assert [it.length for it in cut_chunk(window, window[2], 1000, 4)] == [3, 3]
    # the budget counts padding: 3 texts of 40 are 120 tokens
    three = queued("t", [40, 40, 40]).queue
    assert len(cut_chunk(three, three[0], 100, 1)) == 2
