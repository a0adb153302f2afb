"""The server under hostile input and load: malformed bodies (hypothesis fuzz), admission limits, health from batch
failures, bounded shutdown, authentication and exposure settings. A real server on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2
from helpers import HookedEmbedder, ServerThread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedforge._proto import embedding_pb2 as pb
from embedforge.client import AsyncEmbedClient, EmbedClient, build_embed_request, build_score_request
from embedforge.server.app import InsecureKeyError, check_security
from embedforge.server.cli import serve_command
from embedforge.server.config import ServeConfig
from embedforge.server.core import REMEMBERED_CONNECTIONS, EmbeddingCore, Limits, Overloaded, ReadSlots
from embedforge.server.runtime import OnnxEmbedder
from embedforge.server.service import invalid_utf8_field, sanitize_request_id
from embedforge.tokenization import encode_truncated, load_tokenizer

DEFINED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.UNIMPLEMENTED}
LIMITS = {"max_texts_per_request": 8, "max_chars_per_text": 300}
IDENTITY = {"request_serializer": None, "response_deserializer": None}
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # channels to one target otherwise share a connection


@pytest.fixture(scope="module")
def embedder(tiny_export_dir) -> OnnxEmbedder:
    return OnnxEmbedder(tiny_export_dir, threads=1)


@pytest.fixture(scope="module")
def server(embedder):
    with ServerThread(embedder, **LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def raw_call(channel: grpc.Channel, method: str, body: bytes, metadata=None) -> grpc.StatusCode:
    try:
        channel.unary_unary(method, **IDENTITY)(body, timeout=10, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def health(channel: grpc.Channel) -> str:
    from grpc_health.v1 import health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


# ---- tokenization never builds what truncation throws away, and changes nothing ----

@pytest.mark.parametrize("source", ["tiny", "bundled"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=12), max_size=120),
       max_length=st.integers(4, 24))
def test_prefix_tokenization_equals_tokenizing_the_whole_text(source, tiny_model_dir, words, max_length):
    from embedforge.model import default_model_path

    directory = tiny_model_dir if source == "tiny" else default_model_path()
    tokenizer = load_tokenizer(directory, max_length)
    texts = [" ".join(words), "  ".join(words) + " tail", "x" * 500, " " * 300 + "y"]
    expected = tokenizer.encode_batch_fast(texts)
    for got, want in zip(encode_truncated(tokenizer, texts, max_length), expected, strict=True):
        assert got.ids == want.ids
        assert bool(got.overflowing) == bool(want.overflowing)


def test_a_long_text_is_tokenized_from_a_prefix(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir, 16)
    (encoding,) = encode_truncated(tokenizer, ["egg water " * 2000], 16)
    assert len(encoding.ids) == 16
    # the thrown-away pieces cover about the prefix (8 characters per token, at most doubled), not 20,000 chars
    assert sum(len(piece.ids) for piece in encoding.overflowing) < 16 * 8


# ---- malformed input: a defined status, SERVING throughout ----

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["Embed", "Score", "Info", "Nope"]), body=st.binary(max_size=300))
def test_fuzz_raw_bodies_get_a_defined_status(server, channel, method, body):
    code = raw_call(channel, f"/embedforge.v1.EmbeddingService/{method}", body)
    assert code in DEFINED
    assert code != grpc.StatusCode.UNIMPLEMENTED or method == "Nope"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=400), max_size=10), truncate=st.booleans(), normalize=st.booleans(),
       top_k=st.integers(0, 2 ** 32 - 1), score=st.booleans())
def test_fuzz_request_fields_get_a_defined_status(server, channel, texts, truncate, normalize, top_k, score):
    if score:
        request = build_score_request(texts[0] if texts else "", texts[1:], top_k=top_k, truncate=truncate)
        method = "Score"
    else:
        request = build_embed_request(texts, truncate=truncate, normalize=normalize)
        method = "Embed"
    assert raw_call(channel, f"/embedforge.v1.EmbeddingService/{method}", request.SerializeToString()) in DEFINED


def test_fuzzing_left_the_server_serving(server, channel, caplog):
    assert raw_call(channel, "/embedforge.v1.EmbeddingService/Embed", b"\xff\xff\xff") in DEFINED
    assert raw_call(channel, "/no.such.Service/Method", b"") == grpc.StatusCode.UNIMPLEMENTED
    assert health(channel) == "SERVING"
    with EmbedClient(server.target, timeout=10) as c:
        assert c.embed(["still fine"]).vectors.shape == (1, 32)


@pytest.mark.parametrize(("method", "body", "field"), [
    ("Embed", b"\n\x03egg\n\x02\xff\xfe", "texts[1] is not valid UTF-8"),
    ("Score", b"\n\x03\xe2\x82\x12\x03egg", "query is not valid UTF-8"),
    ("Score", b"\n\x03egg\x12\x03egg\x12\x01\x80", "documents[1] is not valid UTF-8"),
    ("Embed", b"\n\x09egg", "request body is not a valid embedforge.v1.EmbedRequest"),
])
def test_invalid_utf8_and_broken_bodies_name_the_field(channel, method, body, field):
    try:
        channel.unary_unary(f"/embedforge.v1.EmbeddingService/{method}", **IDENTITY)(body, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in exc.details()
    else:
        raise AssertionError("accepted")


def test_bad_input_logs_at_most_one_line_per_interval(channel, caplog):
    for _ in range(20):
        raw_call(channel, "/embedforge.v1.EmbeddingService/Score", b"\n\x01\xff")
    lines = [r for r in caplog.records if "event=invalid_request rpc=Score" in r.getMessage()]
    assert len(lines) <= 1


def test_invalid_utf8_field_walks_only_string_fields():
    assert invalid_utf8_field(b"\x10\x01\n\x01a\n\x01\xc3", pb.EmbedRequest.DESCRIPTOR) == "texts[1]"
    assert invalid_utf8_field(b"\x18\x05\n\x01a", pb.ScoreRequest.DESCRIPTOR) is None


def test_request_id_is_limited_and_sanitised():
    assert sanitize_request_id("abc-123") == "abc-123"
    assert sanitize_request_id("a\nb c\x00" + "x" * 500) == "a_b_c_" + "x" * 58
    assert len(sanitize_request_id("")) == 16


# ---- admission ----

def test_a_maximal_score_is_admitted_when_idle(embedder):
    with ServerThread(embedder, **LIMITS) as running, EmbedClient(running.target, timeout=60) as c:
        document = "egg " * 300  # 300 characters, over max_length tokens: each counts max_length in the queue
        result = c.score(document[:300], [document[:300]] * LIMITS["max_texts_per_request"])
        assert len(result.scores) == LIMITS["max_texts_per_request"]
        info = c.info()
        assert info.max_queue_tokens == 4 * (LIMITS["max_texts_per_request"] + 1) * 512


def test_a_call_over_the_byte_budget_is_refused_at_once(embedder):
    slow = HookedEmbedder(embedder, tokenize_delay_s=1.0)
    with ServerThread(slow, max_pending_bytes=4000, **LIMITS) as running:
        async def scenario():
            # retries=False: the client's retry policy would send the refused call again until it fits
            async with AsyncEmbedClient(running.target, timeout=30, retries=False) as aclient:
                holder = asyncio.ensure_future(aclient.embed(["egg " * 75] * 8))  # ~2,450 bytes, slow to tokenize
                await asyncio.sleep(0.3)
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as refused:
                    await aclient.embed(["tea " * 75] * 8)  # would take the budget over 4,000
                took = time.monotonic() - started
                # fits beside the holder; sent on another connection, since this one's next calls are refused
                # unread until the budget can take the refused body's size (the test below)
                async with grpc.aio.insecure_channel(running.target, options=OWN_CONNECTION) as other:
                    body = build_embed_request(["tea"] * 2).SerializeToString()
                    embed = other.unary_unary("/embedforge.v1.EmbeddingService/Embed", **IDENTITY)
                    smaller = pb.EmbedResponse.FromString(await embed(body, timeout=30))
                return refused.value, took, await holder, smaller

        refused, took, held, smaller = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "request bytes" in refused.details()
    assert took < 0.5
    assert held.vectors.shape == (8, 32) and smaller.count == 2


def test_a_connection_whose_last_body_cannot_fit_is_refused_unread(embedder):
    """Once a connection's body was refused for its size, its next call is refused before it is read while the
    budget still cannot take that many bytes; other connections' small calls go on."""
    slow = HookedEmbedder(embedder, tokenize_delay_s=1.5)
    large = build_embed_request(["tea " * 75] * 8).SerializeToString()  # ~2,450 bytes
    with ServerThread(slow, max_pending_bytes=4000, **LIMITS) as running:
        async def scenario():
            async with grpc.aio.insecure_channel(running.target, options=OWN_CONNECTION) as first, \
                    grpc.aio.insecure_channel(running.target, options=OWN_CONNECTION) as second, \
                    grpc.aio.insecure_channel(running.target, options=OWN_CONNECTION) as third:
                method = "/embedforge.v1.EmbeddingService/Embed"
                holder = asyncio.ensure_future(first.unary_unary(method, **IDENTITY)(large, timeout=30))
                for _ in range(100):  # until the holder is admitted (1.5 s of tokenization follows)
                    if running.server.core.pending_bytes:
                        break
                    await asyncio.sleep(0.01)
                details = []
                for _ in range(2):
                    with pytest.raises(grpc.RpcError) as refused:
                        await second.unary_unary(method, **IDENTITY)(large, timeout=10)
                    details.append(refused.value.details())
                small = await third.unary_unary(method, **IDENTITY)(build_embed_request(["tea"]).SerializeToString(),
                                                                    timeout=10)
                await holder
                after = await second.unary_unary(method, **IDENTITY)(large, timeout=30)  # the budget is free again
                return details, pb.EmbedResponse.FromString(small), pb.EmbedResponse.FromString(after)

        (read_then_refused, refused_unread), small, after = asyncio.run(scenario())
    assert f"this one has {len(large)}" in read_then_refused
    assert f"likely holds {len(large)} (its connection's last body had as many and was refused)" in refused_unread
    assert small.count == 1 and after.count == 8


def test_refused_body_sizes_are_remembered_for_a_bounded_number_of_connections():
    core = EmbeddingCore(Limits(8, 300, max_pending_bytes=100))
    held = core.admit(60)
    for i in range(REMEMBERED_CONNECTIONS + 10):
        core.remember_refused(f"peer-{i}", 50)
    last = f"peer-{REMEMBERED_CONNECTIONS + 9}"
    assert core.expected_body("peer-0") == (0, 0)  # forgotten: the oldest went first
    assert core.expected_body(last) == (50, 0)
    with pytest.raises(Overloaded, match="likely holds 50"):
        core.check_room(core.expected_body(last)[0], "its last body")
    held.release()
    core.check_room(core.expected_body(last)[0], "its last body")  # the budget can take it again
    core.forget_refused(last)
    assert core.expected_body(last) == (0, 0)
    for i in range(REMEMBERED_CONNECTIONS + 1):
        core.record_body(f"peer-{i}", 10 ** 6)
    assert core.likely_body_bytes("peer-0") == core.limits.max_receive_bytes  # forgotten: taken as large
    assert core.likely_body_bytes(f"peer-{REMEMBERED_CONNECTIONS}") == 10 ** 6
    core.close()


def test_a_call_whose_last_request_found_no_queue_room_is_refused_unread():
    """A request refused for queue room leaves its token count with its connection: the next call is refused
    before its body is read while the queue still has no room for that many tokens."""
    from embedforge.server.batcher import Batcher, QueueFull

    core = EmbeddingCore(Limits(8, 300))
    core.batcher = Batcher(lambda batch, alone: None, max_batch_tokens=20, min_batch_tokens=1, max_wait_ms=0,
                           max_queue_tokens=100, max_request_tokens=30)
    core.batcher._queued_tokens = 70  # 10 under the limit for large requests (100 - 20 kept for small ones)
    core.remember_refused("big", 2000, tokens=30)
    core.remember_refused("small", 40, tokens=15)
    with pytest.raises(QueueFull, match="likely needs 30"):
        core.check_room(*core.expected_body("big")[:1], "its last body", core.expected_body("big")[1])
    core.check_room(core.expected_body("small")[0], "its last body", core.expected_body("small")[1])
    core.batcher._queued_tokens = 50
    core.check_room(core.expected_body("big")[0], "its last body", core.expected_body("big")[1])  # room again
    core.close()


def test_a_body_expected_to_be_large_does_not_wait_for_a_read_slot():
    async def scenario():
        core = EmbeddingCore(Limits(8, 300, max_concurrent_reads=1))
        waited = {}
        async with core.read_slot():
            for name, expected in (("large", 10 ** 6), ("small", 100)):
                started = time.monotonic()
                with pytest.raises(Overloaded, match="being read already"):
                    async with core.read_slot(expected):
                        pass
                waited[name] = time.monotonic() - started
        async with core.read_slot(10 ** 6):  # a free slot is taken whatever the size
            pass
        core.close()
        return waited

    waited = asyncio.run(scenario())
    assert waited["large"] < 0.01 and waited["small"] >= 0.045


def test_a_large_body_never_takes_the_last_free_read_slot():
    async def scenario():
        slots = ReadSlots(2)
        await slots.acquire(large=True)  # two free: a large body may take one
        with pytest.raises(Overloaded):
            await slots.acquire(large=True)  # the last one is kept
        await slots.acquire()  # a body not known to be large takes it
        waiter = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0.01)
        slots.release()  # handed to the waiter, not returned to the pool
        await waiter
        assert slots.free == 0
        slots.release()
        slots.release()
        return slots.free

    assert asyncio.run(scenario()) == 2


def test_a_call_is_refused_unread_while_the_byte_budget_is_spent(embedder):
    slow = HookedEmbedder(embedder, tokenize_delay_s=1.0)
    texts = ["egg " * 75] * 8
    budget = len(build_embed_request(texts).SerializeToString())  # the holder takes all of it
    with ServerThread(slow, max_pending_bytes=budget, **LIMITS) as running:
        async def scenario():
            async with AsyncEmbedClient(running.target, timeout=30) as aclient:
                holder = asyncio.ensure_future(aclient.embed(texts))
                for _ in range(100):  # until the holder is admitted (1 s of tokenization follows)
                    if running.server.core.pending_bytes == budget:
                        break
                    await asyncio.sleep(0.01)
                started = time.monotonic()
                async with grpc.aio.insecure_channel(running.target) as channel:  # no client retries
                    embed = channel.unary_unary("/embedforge.v1.EmbeddingService/Embed", **IDENTITY)
                    with pytest.raises(grpc.RpcError) as refused:
                        await embed(build_embed_request(["tea"]).SerializeToString(), timeout=10)
                return refused.value, time.monotonic() - started, await holder

        refused, took, held = asyncio.run(scenario())
    # Refused before its body was read: the message does not know its size (a read one says "this one has").
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"wait for tokenization; the limit is {budget}" in refused.details()
    assert took < 0.5 and held.vectors.shape == (8, 32)


def test_a_call_finding_no_read_slot_is_refused_within_the_slot_wait(embedder):
    """One slot, held by a call whose body never comes: the next call of a connection known to send small
    bodies is refused after READ_SLOT_WAIT_S, not parked; a new connection's call is refused at once (it may
    send the largest body); once the holder is gone its slot serves the next call."""
    big = LIMITS | {"max_chars_per_text": 20000}  # bodies up to ~700 KB: a new connection's may be large
    with ServerThread(embedder, max_concurrent_reads=1, metrics_port=0, **big) as running:
        async def scenario():
            async with grpc.aio.insecure_channel(running.target, options=OWN_CONNECTION) as channel, \
                    grpc.aio.insecure_channel(running.target, options=OWN_CONNECTION) as fresh:
                method = "/embedforge.v1.EmbeddingService/Embed"
                body = build_embed_request(["tea"]).SerializeToString()
                await channel.unary_unary(method, **IDENTITY)(body, timeout=10)  # this connection sends small ones
                never_sent = asyncio.Event()

                async def no_body():  # headers only: the server's read waits for a body that never comes
                    await never_sent.wait()
                    yield b""

                holder = channel.stream_unary(method, **IDENTITY)(no_body(), timeout=30)
                for _ in range(100):  # until the holder's handler is waiting on its read
                    if running.server.core.read_slots.busy:
                        break
                    await asyncio.sleep(0.01)
                embed = channel.unary_unary(method, **IDENTITY)
                took = {}
                for name, call in (("known", embed), ("fresh", fresh.unary_unary(method, **IDENTITY))):
                    started = time.monotonic()
                    with pytest.raises(grpc.RpcError) as refused:
                        await call(body, timeout=10)
                    took[name] = time.monotonic() - started
                    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "being read already" in refused.value.details()
                holder.cancel()
                await asyncio.sleep(0.2)
                answer = pb.EmbedResponse.FromString(await embed(body, timeout=10))
                return took, answer

        took, answer = asyncio.run(scenario())
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics", timeout=5).read()
    assert 'embedforge_refused_seconds_bucket{le="0.256",protocol="grpc"} 2.0' in metrics.decode()
    assert 0.045 <= took["known"] < 0.5 and took["fresh"] < 0.045
    assert answer.count == 1


@pytest.mark.parametrize("body", [b"\xff" * 900, b"\x0a\x05" + b"a" * 900])  # no message; truncated field
def test_a_body_that_does_not_parse_gives_its_bytes_back(embedder, channel, body):
    """Malformed bodies are counted against the byte budget while parsed and released when refused: after
    many of them the budget is whole and a valid call is admitted."""
    with ServerThread(embedder, max_pending_bytes=1000, **LIMITS) as running, \
            grpc.insecure_channel(running.target) as own:
        for _ in range(5):
            assert raw_call(own, "/embedforge.v1.EmbeddingService/Embed", body) == grpc.StatusCode.INVALID_ARGUMENT
        assert running.server.core.pending_bytes == 0
        ok = raw_call(own, "/embedforge.v1.EmbeddingService/Embed", build_embed_request(["tea"]).SerializeToString())
    assert ok == grpc.StatusCode.OK


@pytest.mark.parametrize("release", [True, False])
def test_texts_are_released_once_tokenized(embedder, release):
    hooked = HookedEmbedder(embedder)
    hooked.hang.set()
    with ServerThread(hooked) as running:
        texts, documents = ["egg water"] * 3, ["tea"] * 2
        calls = [asyncio.run_coroutine_threadsafe(running.server.core.embed(texts, release_texts=release),
                                                  running.loop),
                 asyncio.run_coroutine_threadsafe(running.server.core.score("q", documents, release_texts=release),
                                                  running.loop)]
        time.sleep(0.5)  # both tokenized, their batches hang
        waiting = list(texts), list(documents)
        hooked.release.set()
        results = [call.result(30) for call in calls]
    assert waiting == (([], []) if release else (["egg water"] * 3, ["tea"] * 2))
    assert results[0].vectors.shape == (3, 32) and len(results[1].scores) == 2


def test_calls_beyond_max_concurrent_requests_are_refused(embedder):
    hooked = HookedEmbedder(embedder)
    hooked.hang.set()
    with ServerThread(hooked, max_concurrent_requests=2) as running:
        async def scenario():
            async with AsyncEmbedClient(running.target, timeout=30) as aclient:
                held = [asyncio.ensure_future(aclient.embed([f"egg {i}"])) for i in range(2)]
                await asyncio.sleep(0.3)
                with pytest.raises(grpc.RpcError) as refused:
                    await aclient.embed(["tea"])
                hooked.release.set()
                return refused.value, await asyncio.gather(*held)

        refused, held = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in refused.details()
    assert len(held) == 2


def test_work_whose_deadline_passes_during_tokenization_is_never_queued(embedder):
    slow = HookedEmbedder(embedder, tokenize_delay_s=0.4)
    with ServerThread(slow) as running, EmbedClient(running.target) as c:
        code, details = status_of(lambda: c.embed(["egg water " * 200], deadline_s=0.2))
        time.sleep(0.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert slow.computed == []


# ---- health and shutdown ----

def test_health_flips_after_failures_in_a_row_and_back_after_a_success(embedder):
    hooked = HookedEmbedder(embedder)
    with ServerThread(hooked, max_failures=2) as running, EmbedClient(running.target, timeout=10) as c:
        hooked.fail_all = True
        assert status_of(lambda: c.embed(["egg"]))[0] == grpc.StatusCode.INTERNAL
        assert c.health() == "SERVING"
        assert status_of(lambda: c.embed(["egg"]))[0] == grpc.StatusCode.INTERNAL
        time.sleep(0.1)
        assert c.health() == "NOT_SERVING"
        hooked.fail_all = False
        assert c.embed(["egg"]).vectors.shape == (1, 32)
        time.sleep(0.1)
        assert c.health() == "SERVING"


def test_drain_is_bounded_when_a_batch_hangs(embedder):
    hooked = HookedEmbedder(embedder)
    hooked.hang.set()
    running = ServerThread(hooked).__enter__()
    try:
        with EmbedClient(running.target, timeout=30) as c:
            stuck = c._stub.Embed.future(build_embed_request(["egg"]), timeout=30)
            time.sleep(0.3)
            started = time.monotonic()
            finished = running.call(running.server.drain(0.5))
            took = time.monotonic() - started
            assert stuck.exception(10) is not None
    finally:
        hooked.release.set()
        running.loop.call_soon_threadsafe(running.loop.stop)
        running.thread.join(10)
    assert finished is False and took < 2.0


@pytest.mark.slow
def test_sigterm_with_a_hanging_batch_exits_non_zero_within_grace(tiny_export_dir):
    script = textwrap.dedent(f"""
        import logging, os, sys, time
        from embedforge.server.app import run_server
        from embedforge.server.config import ServeConfig
        from embedforge.server.runtime import OnnxEmbedder

        class Hanging(OnnxEmbedder):
            def run_batch(self, batch, alone=True):
                print("hanging", flush=True)
                time.sleep(600)

        logging.basicConfig(level="INFO", stream=sys.stderr)
        finished = run_server(lambda: Hanging({str(tiny_export_dir)!r}, threads=1), ServeConfig(port=0, grace_s=1))
        os._exit(0 if finished else 1)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if "event=serving" in line:
                port = int(line.split("address=")[1].split()[0].rsplit(":", 1)[1])
        assert port is not None
        with EmbedClient(f"127.0.0.1:{port}", timeout=30) as c:
            in_flight = c._stub.Embed.future(build_embed_request(["egg"]), timeout=30)  # kept: not cancelled
            assert process.stdout.readline().strip() == "hanging"
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(15)
        assert code == 1 and time.monotonic() - sent < 5
        assert in_flight.exception(10) is not None
        assert "event=stopped_with_hung_batch" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---- authentication and exposure ----

def test_api_key_env_must_name_a_set_variable_unless_no_auth(tiny_export_dir, monkeypatch):
    import embedforge.server.app

    handed = []
    monkeypatch.setattr(embedforge.server.app, "run_server", lambda make, config: handed.append(config) or True)
    monkeypatch.delenv("UNSET_KEY_VAR", raising=False)
    monkeypatch.setenv("EMPTY_KEY_VAR", "  \n")
    monkeypatch.setenv("KEY_VAR", "s3cret\n")
    base = ["--model-dir", str(tiny_export_dir), "--provider", "cpu"]
    for name in ("UNSET_KEY_VAR", "EMPTY_KEY_VAR"):
        result = CliRunner().invoke(serve_command, [*base, "--api-key-env", name])
        assert result.exit_code == 2 and f"--api-key-env {name}" in result.output and "--no-auth" in result.output
    assert CliRunner().invoke(serve_command, [*base, "--api-key-env", "UNSET_KEY_VAR", "--no-auth"]).exit_code == 0
    assert CliRunner().invoke(serve_command, [*base, "--api-key-env", "KEY_VAR"]).exit_code == 0
    assert [c.api_key for c in handed] == [None, "s3cret"]  # stripped like the presented key


def test_a_key_without_tls_beyond_loopback_is_refused_unless_allowed(tiny_export_dir, monkeypatch):
    monkeypatch.setenv("KEY_VAR", "s3cret")
    result = CliRunner().invoke(serve_command, ["--model-dir", str(tiny_export_dir), "--host", "0.0.0.0",
                                                "--api-key-env", "KEY_VAR"])
    assert result.exit_code == 2 and "--allow-insecure-key" in result.output
    with pytest.raises(InsecureKeyError):
        check_security(ServeConfig(host="10.1.2.3", api_key="k"))
    check_security(ServeConfig(host="10.1.2.3", api_key="k", allow_insecure_key=True))
    check_security(ServeConfig(host="127.0.0.1", api_key="k"))
    with pytest.raises(ValueError, match="need TLS"):
        check_security(ServeConfig(tls_client_ca="ca.pem"))


def test_unauthenticated_calls_are_refused_before_parsing_and_counted(embedder):
    with ServerThread(embedder, api_key="s3cret\n", metrics_port=0) as running:
        with grpc.insecure_channel(running.target) as ch:
            # a body that does not parse: refused for the key, not for the body
            assert raw_call(ch, "/embedforge.v1.EmbeddingService/Embed", b"\xff\xff") == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", "Bearer s3cret"),)
            assert raw_call(ch, "/embedforge.v1.EmbeddingService/Embed", b"\xff\xff", good) == \
                grpc.StatusCode.INVALID_ARGUMENT
            assert raw_call(ch, "/embedforge.v1.EmbeddingService/Info", b"", good) == grpc.StatusCode.OK
        body = urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics", timeout=5).read()
    assert any('code="UNAUTHENTICATED"' in line and 'rpc="Embed"' in line and line.endswith(' 1.0')
               for line in body.decode().splitlines())


def test_no_reflection_and_metrics_on_loopback(embedder):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert ServeConfig().metrics_host == "127.0.0.1"
    with ServerThread(embedder, reflection=False, metrics_port=0) as running:
        with grpc.insecure_channel(running.target) as ch, pytest.raises(grpc.RpcError) as info:
            ProtoReflectionDescriptorDatabase(ch).get_services()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert running.server._metrics_http.server_address[0] == "127.0.0.1"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls_requires_a_client_certificate(embedder, tmp_path):
    def self_signed(name: str) -> tuple:
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key),
                        "-out", str(cert)], check=True, capture_output=True)
        return cert, key

    server_cert, server_key = self_signed("localhost")
    client_cert, client_key = self_signed("client")
    with ServerThread(embedder, tls_cert=server_cert, tls_key=server_key, tls_client_ca=client_cert) as running:
        with_cert = grpc.ssl_channel_credentials(server_cert.read_bytes(), client_key.read_bytes(),
                                                 client_cert.read_bytes())
        with grpc.secure_channel(running.target, with_cert) as ch:
            assert raw_call(ch, "/embedforge.v1.EmbeddingService/Info", b"") == grpc.StatusCode.OK
        with EmbedClient(running.target, timeout=3, tls_root_cert=server_cert) as no_cert:
            assert status_of(no_cert.info)[0] == grpc.StatusCode.UNAVAILABLE


def test_serve_cli_accepts_the_new_flags(tiny_export_dir, monkeypatch):
    import embedforge.server.app

    handed = []
    monkeypatch.setattr(embedforge.server.app, "run_server", lambda make, config: handed.append(config) or True)
    monkeypatch.delenv("EMBEDFORGE_API_KEY", raising=False)
    result = CliRunner().invoke(serve_command, [
        "--model-dir", str(tiny_export_dir), "--provider", "cpu", "--max_concurrent_requests", "9",
        "--max-pending-bytes", "1000", "--tokenizer-threads", "3", "--max-failures", "7", "--no-reflection",
        "--metrics_host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    config = handed[0]
    assert (config.max_concurrent_requests, config.max_pending_bytes, config.tokenizer_threads) == (9, 1000, 3)
    assert (config.max_failures, config.reflection, config.metrics_host, config.api_key) == (7, False, "0.0.0.0", None)
    assert os.environ.get("EMBEDFORGE_API_KEY") is None


def test_bound_malloc_applies_where_the_c_library_is_glibc():
    import platform

    from embedforge.server.memory import bound_malloc

    assert bound_malloc() is (platform.libc_ver()[0] == "glibc")
