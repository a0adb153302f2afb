"""gRPC servicer for embedforge.v1.EmbeddingService.

Knows gRPC, never onnxruntime: each RPC is translated into a call of the protocol-neutral `EmbeddingCore`
(validate -> tokenize -> Batcher.submit, merged with concurrent calls of both protocols) and its exceptions
into status codes. Vectors go out as one packed little-endian float32 `bytes` field (see the .proto).
Until a model is attached every call gets UNAVAILABLE.

The handlers take the raw request body and follow server/admission.py: admitted before it is read, read within
the body timeout, its repeated fields counted on the wire before it is parsed; a body that does not parse, or
a string field with invalid UTF-8, gets INVALID_ARGUMENT naming the field, with at most one log line per kind
per 10 s. A refusal for load carries the retry hint as `grpc-retry-pushback-ms` trailing metadata, which gRPC
clients' retry policies honour.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from embedforge import __version__
from embedforge._proto import embedding_pb2 as pb
from embedforge._proto import embedding_pb2_grpc as pb_grpc
from embedforge.server.admission import Ticket
from embedforge.server.core import CallObserver, EmbeddingCore, InvalidRequest, Timing, sanitize_request_id, status_of

log = logging.getLogger("embedforge.server.service")

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


def _wire_fields(raw: bytes) -> Iterator[tuple[int, memoryview | None]]:
    """The top-level fields of a protobuf message as (field number, value of a length-delimited field or None);
    DecodeError where the wire format breaks off."""
    view, pos = memoryview(raw), 0
    while pos < len(raw):
        key, pos = _varint(raw, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _varint(raw, pos)
            yield key >> 3, None
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            yield key >> 3, None
        elif wire_type == 2:
            size, pos = _varint(raw, pos)
            if pos + size > len(raw):
                raise DecodeError("truncated field")
            yield key >> 3, view[pos:pos + size]
            pos += size
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")


def check_item_count(raw: bytes, descriptor: Descriptor, limit: int) -> None:
    """InvalidRequest when a repeated field of the message in `raw` has more than `limit` items, found on the
    wire before any of them becomes a Python object (a body of millions of tiny texts costs nothing to refuse)."""
    counts: dict[int, int] = {}
    try:
        for number, _ in _wire_fields(raw):
            counts[number] = counts.get(number, 0) + 1
            if counts[number] > limit:
                field = descriptor.fields_by_number.get(number)
                name = f"field {number}" if field is None else field.name
                raise InvalidRequest(f"{name} has more than {limit} items; the limit is {limit} per request")
    except DecodeError:
        return  # the parser names what is wrong with it


def invalid_utf8_field(raw: bytes, descriptor: Descriptor) -> str | None:
    """The first top-level string field of `raw` holding invalid UTF-8 ("texts[3]", "query"); None if none
    (or if the wire format breaks off before one is found)."""
    seen: dict[int, int] = {}
    try:
        for number, value in _wire_fields(raw):
            field = descriptor.fields_by_number.get(number)
            if value is None or field is None or field.type != FieldDescriptor.TYPE_STRING:
                continue
            index = seen[number] = seen.get(number, -1) + 1
            try:
                str(value, "utf-8")
            except UnicodeDecodeError:
                return f"{field.name}[{index}]" if field.is_repeated else field.name
    except DecodeError:
        return None
    return None


def parse_request(raw: bytes, message_type: type[Message], max_items: int) -> Message:
    """Parse a request body whose repeated fields hold at most max_items items; InvalidRequest names the field
    holding invalid UTF-8 or too many items, or says the body is bad."""
    check_item_count(raw, message_type.DESCRIPTOR, max_items)
    try:
        return message_type.FromString(raw)
    except DecodeError:
        field = invalid_utf8_field(raw, message_type.DESCRIPTOR)
        if field is not None:
            raise InvalidRequest(f"{field} is not valid UTF-8") from None
        raise InvalidRequest(f"request body is not a valid {message_type.DESCRIPTOR.full_name} "
                             f"({len(raw)} bytes)") from None


INPUT_TYPE_NAMES = {pb.QUERY: "query", pb.DOCUMENT: "document"}  # INPUT_TYPE_UNSPECIFIED: no prompt
OUTPUT_TYPE_NAMES = {pb.FLOAT32: "float32", pb.INT8: "int8", pb.UINT8: "uint8", pb.BINARY: "binary",
                     pb.UBINARY: "ubinary"}
DIRECTION_NAMES = {pb.RIGHT: "right", pb.LEFT: "left"}
OVERFLOW_NAMES = {pb.TRUNCATE: "truncate", pb.ERROR: "error", pb.CHUNK: "chunk"}  # unspecified: None


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
                return await self._call(rpc, handler, context, request_type)
            return handle

        service = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
        return grpc.method_handlers_generic_handler(service, {
            rpc: grpc.stream_unary_rpc_method_handler(body_handler(rpc, handler, request_type),
                                                      response_serializer=response_type.SerializeToString)
            for rpc, (handler, request_type, response_type) in rpcs.items()})

    # ---- implementations ----

    async def _embed_rpc(self, box: _Once, ticket: Ticket, request_id: str) -> pb.EmbedResponse:
        request: pb.EmbedRequest = box.take()
        texts = list(request.texts)
        options = {"truncate": request.truncate if request.HasField("truncate") else None,
                   "overflow": OVERFLOW_NAMES.get(request.overflow),
                   "chunk_overlap": request.chunk_overlap if request.HasField("chunk_overlap") else None,
                   "normalize": request.normalize if request.HasField("normalize") else True,
                   "dimensions": request.dimensions if request.HasField("dimensions") else None,
                   "input_type": INPUT_TYPE_NAMES.get(request.input_type),
                   "truncation_direction": DIRECTION_NAMES.get(request.truncation_direction, "right"),
                   "output_type": OUTPUT_TYPE_NAMES.get(request.output_type, f"enum value {request.output_type}")}
        del request  # the message's memory goes now; the core empties texts once they are tokens
        done = await self.core.embed(texts, **options, release_texts=True, ticket=ticket, request_id=request_id)
        vectors = done.vectors
        if done.output_type == "float32":
            vectors = vectors.astype("<f4", copy=False)
        return pb.EmbedResponse(vectors=vectors.tobytes(), dim=done.dim, count=vectors.shape[0],
                                usage=pb.Usage(tokens=done.tokens), timing=timing_message(done.timing),
                                embedding_space=done.embedding_space, text_tokens=done.text_tokens,
                                truncated=done.truncated, output_type=done.output_type.upper(),
                                row_bytes=vectors.itemsize * vectors.shape[1])

    async def _score_rpc(self, box: _Once, ticket: Ticket, request_id: str) -> pb.ScoreResponse:
        request: pb.ScoreRequest = box.take()
        query, documents, top_k = request.query, list(request.documents), request.top_k
        truncate = request.truncate if request.HasField("truncate") else True
        direction = DIRECTION_NAMES.get(request.truncation_direction, "right")
        del request
        done = await self.core.score(query, documents, top_k=top_k, truncate=truncate, release_texts=True,
                                     ticket=ticket, request_id=request_id, truncation_direction=direction)
        return pb.ScoreResponse(scores=done.scores.tolist(), top_indices=done.ranking if top_k else [],
                                usage=pb.Usage(tokens=done.tokens), timing=timing_message(done.timing),
                                embedding_space=done.embedding_space, query_tokens=done.text_tokens[0],
                                document_tokens=done.text_tokens[1:], query_truncated=0 in done.truncated,
                                truncated_documents=[i - 1 for i in done.truncated if i > 0])

    async def _info_rpc(self, box: _Once, ticket: Ticket, request_id: str) -> pb.InfoResponse:
        return info_message(self.core)

    async def _call(self, rpc: str, handler: Callable[..., Awaitable[Message]], context: grpc.aio.ServicerContext,
                    request_type: type[Message]) -> Message:
        """Run one RPC: admit the call (Info is never refused for load), read and parse its body, run the
        handler; map errors to status codes and report (protocol, rpc, code, seconds) to the observer."""
        started = time.monotonic()
        code = "OK"
        metadata = dict(context.invocation_metadata() or ())
        request_id = sanitize_request_id(metadata.get("x-request-id"))
        ticket: Ticket | None = None
        trailers: tuple = ()
        try:
            self.core.check_ready()
            admission = self.core.admission
            if rpc == "Info":
                ticket = admission.exempt(context.time_remaining())
            else:  # the body's size is known only once gRPC has all of it: the largest is held until then
                ticket = admission.open(context.time_remaining(), reserve=admission.limits.max_body_bytes,
                                        connection=context.peer())
            raw = await admission.read_message(ticket, self._reader(context))
            request = await self.core.parse(parse_request, raw, request_type, self.core.limits.max_texts_per_request)
            del raw
            box, request = _Once(request), None  # the handler takes it: nothing here keeps it alive
            return await handler(box, ticket, request_id)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # every failure becomes a status; status_of logs the unexpected ones
            code, message = status_of(exc, request_id)
            if code == "RESOURCE_EXHAUSTED":
                hint = self.core.admission.refused(context.peer(), exc)
                trailers = (("grpc-retry-pushback-ms", str(round(hint * 1000))),)
            if code == "INVALID_ARGUMENT":
                self.bad_input_log.warning(f"invalid:{rpc}", "event=invalid_request rpc=%s request_id=%s error=%r",
                                           rpc, request_id, message[:200])
        finally:
            if ticket is not None:
                ticket.close()
            if self._on_call is not None:
                self._on_call("grpc", rpc, code, time.monotonic() - started)
        await context.abort(grpc.StatusCode[code], message, trailing_metadata=trailers)

    @staticmethod
    def _reader(context: grpc.aio.ServicerContext) -> Callable[[], Awaitable[bytes]]:
        async def read() -> bytes:
            raw = await context.read()
            if raw is grpc.aio.EOF:
                raise InvalidRequest("the call carries no request message")
            return raw
        return read


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
                           any_dimensions=core.allow_any_dimensions, embedding_space=info.embedding_space,
                           prompts=info.prompts)
