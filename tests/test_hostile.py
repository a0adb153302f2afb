"""The server under hostile input and load: malformed bodies (hypothesis fuzz), admission limits, health from batch
failures, bounded shutdown, authentication and exposure settings. A real server on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
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
from embedforge.server.admission import Admission, AdmissionLimits, Overloaded
from embedforge.server.app import InsecureKeyError, check_security
from embedforge.server.cli import serve_command
from embedforge.server.config import ServeConfig
from embedforge.server.core import InvalidRequest, sanitize_request_id
from embedforge.server.runtime import OnnxEmbedder
from embedforge.server.service import RateLimitedLog, invalid_utf8_field
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


def test_bad_input_logs_one_line_per_interval(embedder, caplog):
    with ServerThread(embedder) as running, grpc.insecure_channel(running.target) as fresh:  # nothing logged yet
        for _ in range(20):
            assert raw_call(fresh, "/embedforge.v1.EmbeddingService/Score", b"\n\x01\xff") == \
                grpc.StatusCode.INVALID_ARGUMENT
    lines = [r for r in caplog.records if "event=invalid_request rpc=Score" in r.getMessage()]
    assert len(lines) == 1


def test_the_rate_limited_log_counts_what_it_left_out(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    rate_limited = RateLimitedLog(logging.getLogger("test.rate_limited"), every_s=10)
    with caplog.at_level(logging.WARNING, logger="test.rate_limited"):
        for _ in range(5):
            rate_limited.warning("bad", "event=bad n=%d", 1)
        rate_limited.warning("other", "event=other n=%d", 2)
        clock[0] += 10
        rate_limited.warning("bad", "event=bad n=%d", 3)
    assert [r.getMessage() for r in caplog.records] == [
        "event=bad n=1 suppressed_since_last=0", "event=other n=2 suppressed_since_last=0",
        "event=bad n=3 suppressed_since_last=4"]


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


EMBED = "/embedforge.v1.EmbeddingService/Embed"


async def stalled_call(channel: grpc.aio.Channel, started: asyncio.Event | None = None) -> grpc.StatusCode:
    """An Embed call whose request message never comes: its headers are sent, its body never is."""
    async def nothing():
        if started is not None:
            started.set()
        await asyncio.sleep(3600)
        yield b""  # pragma: no cover

    try:
        await channel.stream_unary(EMBED, **IDENTITY)(nothing(), timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_stalled_bodies_are_dropped_and_hold_no_one_up(embedder):
    """Calls whose bodies never come (more of them than there used to be read slots) neither refuse nor slow
    the calls beside them, and are dropped after the body timeout with what they held given back."""
    with ServerThread(embedder, body_timeout_s=1.0, **LIMITS) as running:
        async def scenario():
            async with grpc.aio.insecure_channel(running.target, options=OWN_CONNECTION) as slow, \
                    AsyncEmbedClient(running.target, timeout=10, retries=False) as aclient:
                stalled = [asyncio.ensure_future(stalled_call(slow)) for _ in range(4)]
                await asyncio.sleep(0.3)
                answers = [await aclient.embed([f"tea {i}"]) for i in range(5)]  # each sent once
                held = running.server.core.admission.budget.taken
                return answers, held, await asyncio.gather(*stalled)

        answers, held, stalled = asyncio.run(scenario())
    assert all(answer.vectors.shape == (1, 32) for answer in answers)
    assert held == 4 * running.server.config.max_receive_bytes  # the largest body, until theirs arrives
    assert stalled == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4
    assert running.server.core.admission.budget.taken == 0


def test_a_call_is_refused_at_once_only_when_the_byte_budget_is_spent(embedder):
    """gRPC bodies count at the largest size until they arrive: with room for two, a third stalled call is
    refused at once (retry in 1 s); once they are dropped and the hint has passed, calls are admitted again."""
    largest = ServeConfig(**LIMITS).max_receive_bytes
    with ServerThread(embedder, body_timeout_s=1.0, max_pending_bytes=2 * largest, **LIMITS) as running:
        async def scenario():
            async with grpc.aio.insecure_channel(running.target, options=OWN_CONNECTION) as slow, \
                    AsyncEmbedClient(running.target, timeout=10, retries=False) as aclient:
                stalled = [asyncio.ensure_future(stalled_call(slow)) for _ in range(2)]
                await asyncio.sleep(0.3)
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as refused:
                    await aclient.embed(["tea"])
                # refused at once: the stalled bodies still hold the budget (nothing was waited for)
                held_at_refusal = running.server.core.admission.budget.taken
                await asyncio.gather(*stalled)
                await asyncio.sleep(max(0.0, started + 1.05 - time.monotonic()))  # as the hint said
                return refused.value, held_at_refusal, await aclient.embed(["tea"])

        refused, held_at_refusal, after = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "request bodies in memory" in refused.details()
    assert dict(refused.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
    assert held_at_refusal == 2 * largest and after.vectors.shape == (1, 32)


def test_items_are_counted_on_the_wire_before_parsing():
    """A body of many tiny texts is refused by its count before any of them becomes a Python object."""
    from embedforge.server.service import parse_request

    body = build_embed_request(["ab"] * 100_000).SerializeToString()
    with pytest.raises(InvalidRequest, match="texts has more than 8 items"):
        parse_request(body, pb.EmbedRequest, 8)
    assert list(parse_request(build_embed_request(["ab"] * 8).SerializeToString(), pb.EmbedRequest, 8).texts) == \
        ["ab"] * 8


def test_a_call_whose_deadline_cannot_be_met_is_refused_at_once_with_a_hint(embedder):
    """Behind queued work the server estimates a call's wait; a call that could not finish before its deadline
    is refused at once (with grpc-retry-pushback-ms) instead of waiting for its deadline to lapse, before its
    texts are tokenized (their tokens estimated from their characters), while a call with time enough is admitted
    and finishes in time."""
    hooked = HookedEmbedder(embedder, delay_s=0.05)
    with ServerThread(hooked, **LIMITS) as running, EmbedClient(running.target, timeout=30, retries=False) as c:
        c.embed(["warm up the throughput estimate " * 8] * 4)  # a batch over min_batch_tokens is timed
        long = ["egg water salt " * 20] * 8
        hooked.hang.set()
        queued = [c._stub.Embed.future(build_embed_request(long), timeout=30) for _ in range(3)]
        time.sleep(0.3)
        wait = running.server.batcher.estimated_wait_s(8 * 60)
        hopeless = ["salt water egg " * 20] * 8
        code, details = status_of(lambda: c.embed(hopeless, deadline_s=wait / 2))
        batches_at_refusal = hooked.hang.is_set()  # refused while the queued work still hung: at once
        again, again_details = status_of(lambda: c.embed(["tea"]))  # the same connection, before the hint passed
        hooked.release.set()
        hooked.hang.clear()
        assert all(len(call.result().vectors) for call in queued)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "deadline" in details
    assert batches_at_refusal  # (a call that had waited would have ended DEADLINE_EXCEEDED at wait / 2)
    assert again == grpc.StatusCode.RESOURCE_EXHAUSTED and "asked to retry" in again_details
    assert hopeless[0] not in hooked.tokenized and long[0] in hooked.tokenized


def test_a_retry_hint_holds_for_its_connection_until_it_passes():
    admission = Admission(AdmissionLimits(max_body_bytes=100, max_pending_bytes=1000, body_timeout_s=1.0,
                                          default_deadline_s=5.0))
    assert admission.refused("ipv4:127.0.0.1:1000", Overloaded("busy", retry_after_s=0.3)) == 0.3
    with pytest.raises(Overloaded, match="asked to retry") as refused:
        admission.open(None, reserve=100, connection="ipv4:127.0.0.1:1000")
    assert 0 < refused.value.retry_after_s <= 0.3 and admission.budget.taken == 0
    admission.open(None, reserve=100, connection="ipv4:127.0.0.1:1001").close()  # other connections are not held
    time.sleep(0.3)
    admission.open(None, reserve=100, connection="ipv4:127.0.0.1:1000").close()


def test_health_and_info_are_never_refused_for_load(embedder):
    """However many calls are in progress, health and Info answer (Kubernetes restarts pods whose probes fail)."""
    hooked = HookedEmbedder(embedder)
    hooked.hang.set()
    with ServerThread(hooked) as running:
        async def scenario():
            async with AsyncEmbedClient(running.target, timeout=30) as aclient:
                held = [asyncio.ensure_future(aclient.embed([f"egg {i}"])) for i in range(80)]
                await asyncio.sleep(0.5)
                answers = await aclient.health(), (await aclient.info()).dim
                hooked.release.set()
                await asyncio.gather(*held)
                return answers

        assert asyncio.run(scenario()) == ("SERVING", 32)


@pytest.mark.parametrize("body", [b"\xff" * 900, b"\x0a\x05" + b"a" * 900])  # no message; truncated field
def test_a_body_that_does_not_parse_gives_its_bytes_back(embedder, channel, body):
    """Malformed bodies are counted against the byte budget while parsed and released when refused: after
    many of them the budget is whole and a valid call is admitted."""
    with ServerThread(embedder, max_pending_bytes=1000, **LIMITS) as running, \
            grpc.insecure_channel(running.target) as own:
        for _ in range(5):
            assert raw_call(own, "/embedforge.v1.EmbeddingService/Embed", body) == grpc.StatusCode.INVALID_ARGUMENT
        assert running.server.core.admission.budget.taken == 0
        ok = raw_call(own, "/embedforge.v1.EmbeddingService/Embed", build_embed_request(["tea"]).SerializeToString())
    assert ok == grpc.StatusCode.OK


@pytest.mark.parametrize("release", [True, False])
def test_texts_are_released_once_tokenized(embedder, release):
    hooked = HookedEmbedder(embedder)
    hooked.hang.set()
    with ServerThread(hooked) as running:
        texts, documents = ["egg water"] * 3, ["tea"] * 2
        core = running.server.core
        calls = [asyncio.run_coroutine_threadsafe(
                     core.embed(texts, ticket=core.admission.open(30), release_texts=release), running.loop),
                 asyncio.run_coroutine_threadsafe(
                     core.score("q", documents, ticket=core.admission.open(30), release_texts=release), running.loop)]
        time.sleep(0.5)  # both tokenized, their batches hang
        waiting = list(texts), list(documents)
        hooked.release.set()
        results = [call.result(30) for call in calls]
    assert waiting == (([], []) if release else (["egg water"] * 3, ["tea"] * 2))
    assert results[0].vectors.shape == (3, 32) and len(results[1].scores) == 2


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
    with ServerThread(embedder, http_port=0, tls_cert=server_cert, tls_key=server_key,
                      tls_client_ca=client_cert) as running:
        with_cert = grpc.ssl_channel_credentials(server_cert.read_bytes(), client_key.read_bytes(),
                                                 client_cert.read_bytes())
        with grpc.secure_channel(running.target, with_cert) as ch:
            assert raw_call(ch, "/embedforge.v1.EmbeddingService/Info", b"") == grpc.StatusCode.OK
        with EmbedClient(running.target, timeout=3, tls_root_cert=server_cert) as no_cert:
            assert status_of(no_cert.info)[0] == grpc.StatusCode.UNAVAILABLE
        health = f"https://127.0.0.1:{running.server.http.port}/health"  # HTTPS asks for the certificate too
        context = ssl.create_default_context(cafile=server_cert)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(health, timeout=5, context=context).read()
        context.load_cert_chain(client_cert, client_key)
        assert urllib.request.urlopen(health, timeout=5, context=context).status == 200


def test_serve_cli_accepts_the_new_flags(tiny_export_dir, monkeypatch):
    import embedforge.server.app

    handed = []
    monkeypatch.setattr(embedforge.server.app, "run_server", lambda make, config: handed.append(config) or True)
    monkeypatch.delenv("EMBEDFORGE_API_KEY", raising=False)
    result = CliRunner().invoke(serve_command, [
        "--model-dir", str(tiny_export_dir), "--provider", "cpu", "--body-timeout-s", "9",
        "--max-pending-bytes", "1000", "--tokenizer-threads", "3", "--max-failures", "7", "--no-reflection",
        "--metrics_host", "0.0.0.0", "--default_deadline_s", "12"])
    assert result.exit_code == 0, result.output
    config = handed[0]
    assert (config.body_timeout_s, config.max_pending_bytes, config.tokenizer_threads) == (9, 1000, 3)
    assert config.default_deadline_s == 12 and config.max_receive_bytes == 1000
    assert (config.max_failures, config.reflection, config.metrics_host, config.api_key) == (7, False, "0.0.0.0", None)
    assert os.environ.get("EMBEDFORGE_API_KEY") is None


def test_the_api_key_stays_out_of_the_configs_repr():
    config = ServeConfig(api_key="s3cret-key")
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)


def test_bound_malloc_applies_where_the_c_library_is_glibc():
    import platform

    from embedforge.server.memory import bound_malloc

    assert bound_malloc() is (platform.libc_ver()[0] == "glibc")


def test_release_memory_gives_a_large_batchs_arena_back(tiny_export_dir):
    """Batches keep their working memory (the next batch reuses it); release_memory, which the batcher calls once
    idle, returns it: the process shrinks by most of what the large batch added."""
    import ctypes

    import numpy as np

    from embedforge.server.runtime import OnnxEmbedder

    def rss() -> int:
        ctypes.CDLL(None).malloc_trim(0)  # what the allocator still caches is not the arena's doing
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    runtime = OnnxEmbedder(tiny_export_dir, threads=1)
    runtime.warmup()
    runtime.release_memory()
    before = rss()
    batch = runtime.tokenize(["word " * 200] * 256).ids
    vectors = runtime.run_batch(batch)
    kept = rss() - before
    runtime.release_memory()
    released = kept - (rss() - before)
    assert kept > 20e6, kept  # the arena holds the batch's working memory
    assert released > 0.8 * kept, (kept, released)
    np.testing.assert_allclose(runtime.run_batch(batch), vectors, rtol=1e-5, atol=1e-6)


def test_a_call_that_would_make_a_queued_call_late_is_refused_with_that_calls_wait_as_the_hint():
    class Queue:  # the batcher's answers, fixed: a newcomer over 100 tokens would make a queued call late
        def estimated_wait_s(self, tokens):
            return 0.1

        def delays_past_deadline(self, tokens, safety):
            return 2.5 if tokens > 100 else None

    admission = Admission(AdmissionLimits(max_body_bytes=100, max_pending_bytes=1000, body_timeout_s=1.0,
                                          default_deadline_s=5.0))
    admission.queue = Queue()
    ticket = admission.open(10.0)
    admission.check_wait(ticket, 50)
    with pytest.raises(Overloaded, match="miss its deadline") as refused:
        admission.check_wait(ticket, 500)
    assert refused.value.retry_after_s == 2.5
