"""gRPC servicer for embedforge.v1.EmbeddingService.

Knows gRPC, never onnxruntime: each RPC is translated into a call of the protocol-neutral `EmbeddingCore`
(validate -> tokenize -> Batcher.submit, merged with concurrent calls of both protocols) and its exceptions
into status codes. Vectors go out as one packed little-endian float32 `bytes` field (see the .proto).
Until a model is attached every call gets UNAVAILABLE.

The handlers take the raw request body: its bytes count against the core's pending-bytes budget (a call over
it gets RESOURCE_EXHAUSTED at once) before it is parsed; a body that does not parse, or a string field with
invalid UTF-8, gets INVALID_ARGUMENT naming the field, with at most one log line per kind per 10 s. (The gRPC
server refuses calls beyond max_concurrent_requests before reading them: see app.py.)
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from embedforge import __version__
from embedforge._proto import embedding_pb2 as pb
from embedforge._proto import embedding_pb2_grpc as pb_grpc
from embedforge.server.batcher import QueueFull
from embedforge.server.core import (
    CallObserver,
    EmbeddingCore,
    Held,
    InvalidRequest,
    Overloaded,
    Timing,
    status_of,
)

log = logging.getLogger("embedforge.server.service")

REQUEST_ID_MAX_CHARS = 64
REQUEST_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:/-]")
LOG_EVERY_S = 10.0  # one log line per kind of bad input per 10 s (with the count of those not logged)


class RateLimitedLog:
    """At most one warning per key every `every_s` seconds; the next one says how many were left out."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self._log = logger
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._every_s) < self._every_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        self._log.warning(message + " suppressed_since_last=%d", *args, skipped)


def sanitize_request_id(value: str | None) -> str:
    """The client's x-request-id, safe to log: at most 64 characters of [A-Za-z0-9._:/-] (others become "_");
    a fresh id when it is missing or empty."""
    if not value:
        return uuid.uuid4().hex[:16]
    return REQUEST_ID_UNSAFE.sub("_", value[:REQUEST_ID_MAX_CHARS])


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise DecodeError("truncated varint")
        byte = raw[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def invalid_utf8_field(raw: bytes, descriptor: Descriptor) -> str | None:
    """The first top-level string field of `raw` holding invalid UTF-8 ("texts[3]", "query"); None if none
    (or if the wire format breaks off before one is found)."""
    pos, seen = 0, {}
    try:
        while pos < len(raw):
            key, pos = _varint(raw, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(raw, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, pos = _varint(raw, pos)
                value, pos = raw[pos:pos + size], pos + size
                field = descriptor.fields_by_number.get(number)
                if field is None or field.type != FieldDescriptor.TYPE_STRING:
                    continue
                index = seen[number] = seen.get(number, -1) + 1
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{field.name}[{index}]" if field.is_repeated else field.name
            else:
                return None
    except DecodeError:
        return None
    return None


def parse_request(raw: bytes, message_type: type[Message]) -> Message:
    """Parse a request body; InvalidRequest names the field holding invalid UTF-8, or says the body is bad."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        field = invalid_utf8_field(raw, message_type.DESCRIPTOR)
        if field is not None:
            raise InvalidRequest(f"{field} is not valid UTF-8") from None
        raise InvalidRequest(f"request body is not a valid {message_type.DESCRIPTOR.full_name} "
                             f"({len(raw)} bytes)") from None


def timing_message(timing: Timing) -> pb.Timing:
    return pb.Timing(queue_ms=timing.queue_s * 1e3, tokenize_ms=timing.tokenize_s * 1e3,
                     inference_ms=timing.inference_s * 1e3, total_ms=timing.total_s * 1e3)


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, core: EmbeddingCore, on_call: CallObserver | None = None) -> None:
        self.core = core
        self._on_call = on_call
        self.bad_input_log = RateLimitedLog(log)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Handlers that read the request body themselves (registered instead of the generated typed handlers).

        Registered as stream-unary, which is the same on the wire as unary: gRPC then hands over the call before
        its body is read, so that a call is refused before its body is read when the byte budget is spent, the
        body is dropped as soon as it is parsed (a unary handler's caller would hold it until the call ends), and
        a body that does not parse is answered, not a traceback."""
        rpcs = {"Embed": (self._embed_rpc, pb.EmbedRequest, pb.EmbedResponse),
                "Score": (self._score_rpc, pb.ScoreRequest, pb.ScoreResponse),
                "Info": (self._info_rpc, pb.InfoRequest, pb.InfoResponse)}

        def body_handler(rpc: str, handler: Callable[..., Awaitable[Message]], request_type: type[Message]):
            async def handle(requests: object, context: grpc.aio.ServicerContext) -> Message:
                return await self._call(rpc, handler, None, context, request_type)
            return handle

        service = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
        return grpc.method_handlers_generic_handler(service, {
            rpc: grpc.stream_unary_rpc_method_handler(body_handler(rpc, handler, request_type),
                                                      response_serializer=response_type.SerializeToString)
            for rpc, (handler, request_type, response_type) in rpcs.items()})

    # ---- RPCs ----

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await self._call("Embed", self._embed_rpc, request, context)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return await self._call("Score", self._score_rpc, request, context)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return await self._call("Info", self._info_rpc, request, context)

    # ---- implementations ----

    async def _embed_rpc(self, box: _Once, deadline: float | None, request_id: str) -> pb.EmbedResponse:
        request: pb.EmbedRequest = box.take()
        texts = list(request.texts)
        options = {"truncate": request.truncate if request.HasField("truncate") else True,
                   "normalize": request.normalize if request.HasField("normalize") else True,
                   "dimensions": request.dimensions if request.HasField("dimensions") else None}
        del request  # the message's memory goes now; the core empties texts once they are tokens
        done = await self.core.embed(texts, **options, release_texts=True, deadline=deadline, request_id=request_id)
        vectors = done.vectors
        return pb.EmbedResponse(vectors=vectors.astype("<f4", copy=False).tobytes(), dim=vectors.shape[1],
                                count=vectors.shape[0], usage=pb.Usage(tokens=done.tokens),
                                timing=timing_message(done.timing))

    async def _score_rpc(self, box: _Once, deadline: float | None, request_id: str) -> pb.ScoreResponse:
        request: pb.ScoreRequest = box.take()
        query, documents, top_k = request.query, list(request.documents), request.top_k
        truncate = request.truncate if request.HasField("truncate") else True
        del request
        done = await self.core.score(query, documents, top_k=top_k, truncate=truncate, release_texts=True,
                                     deadline=deadline, request_id=request_id)
        return pb.ScoreResponse(scores=done.scores.tolist(), top_indices=done.ranking if top_k else [],
                                usage=pb.Usage(tokens=done.tokens), timing=timing_message(done.timing))

    async def _info_rpc(self, box: _Once, deadline: float | None, request_id: str) -> pb.InfoResponse:
        return info_message(self.core)

    async def _call(self, rpc: str, handler: Callable[..., Awaitable[Message]], request: Message | None,
                    context: grpc.aio.ServicerContext, request_type: type[Message] | None = None) -> Message:
        """Run one RPC: for request None, admit, read and parse the body (request_type), then map errors to
        status codes and report (protocol, rpc, code, seconds) to the observer."""
        started = time.monotonic()
        code = "OK"
        metadata = dict(context.invocation_metadata() or ())
        request_id = sanitize_request_id(metadata.get("x-request-id"))
        remaining = context.time_remaining()
        deadline = None if remaining is None else started + remaining
        held: Held | None = None
        try:
            if request is None:
                held, request = await self._read(context, request_type)
            box, request = _Once(request), None  # the handler takes it: nothing here keeps it alive
            return await handler(box, deadline, request_id)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # every failure becomes a status; status_of logs the unexpected ones
            if isinstance(exc, (Overloaded, QueueFull)) and held is not None:  # read, then refused for room
                self.core.remember_refused(context.peer(), held.body_bytes, getattr(exc, "tokens", 0))
            code, message = status_of(exc, request_id)
            if code == "INVALID_ARGUMENT":
                self.bad_input_log.warning(f"invalid:{rpc}", "event=invalid_request rpc=%s request_id=%s error=%r",
                                           rpc, request_id, message[:200])
        finally:
            if held is not None:
                held.release()
            if self._on_call is not None:
                self._on_call("grpc", rpc, code, time.monotonic() - started)
        await context.abort(grpc.StatusCode[code], message)

    async def _read(self, context: grpc.aio.ServicerContext, request_type: type[Message]) -> tuple[Held, Message]:
        """Admit, read and parse one request body. Refused before reading while the byte budget or the queue is
        full, or while it cannot take as many bytes as the connection's last body, which it refused; after
        reading, its size is counted against the budget before it is parsed (refused if over)."""
        self.core.check_ready()

        async def read() -> bytes:
            raw = await context.read()
            if raw is grpc.aio.EOF:
                raise InvalidRequest("the call carries no request message")
            return raw

        held, raw = await self.core.read_body(read, connection=context.peer())
        return held, await self.core.parse_body(held, parse_request, raw, request_type)


class _Once:
    """A parsed request handed to an RPC implementation, which takes it out (`take`) so that nothing else keeps
    the message, and the request bytes it holds, alive while the call waits for its batch."""

    def __init__(self, message: Message) -> None:
        self._message: Message | None = message

    def take(self) -> Message:
        message, self._message = self._message, None
        return message


def info_message(core: EmbeddingCore) -> pb.InfoResponse:
    """The InfoResponse of the served model (Unavailable while loading or draining)."""
    info = core.check_ready()
    batcher = core.batcher
    limits = pb.Limits(max_texts_per_request=core.limits.max_texts_per_request,
                       max_chars_per_text=core.limits.max_chars_per_text,
                       max_batch_tokens=batcher.max_batch_tokens, max_queue_tokens=batcher.max_queue_tokens,
                       max_wait_ms=batcher.max_wait_s * 1000.0, min_batch_tokens=batcher.min_batch_tokens)
    return pb.InfoResponse(model_name=info.model_name, dim=info.dim, max_length=info.max_length,
                           precision=info.precision, provider=info.provider, pooling=info.pooling,
                           limits=limits, server_version=__version__, matryoshka_dims=info.matryoshka_dims,
                           any_dimensions=core.allow_any_dimensions)
