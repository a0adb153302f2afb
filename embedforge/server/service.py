"""gRPC servicer for embedforge.v1.EmbeddingService.

Knows gRPC, never onnxruntime: each RPC is translated into a call of the protocol-neutral `EmbeddingCore`
(validate -> tokenize -> Batcher.submit, merged with concurrent calls of both protocols) and its exceptions
into status codes. Vectors go out as one packed little-endian float32 `bytes` field (see the .proto).
Until a model is attached every call gets UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import Message

from embedforge import __version__
from embedforge._proto import embedding_pb2 as pb
from embedforge._proto import embedding_pb2_grpc as pb_grpc
from embedforge.server.core import CallObserver, EmbeddingCore, Timing, status_of


def timing_message(timing: Timing) -> pb.Timing:
    return pb.Timing(queue_ms=timing.queue_s * 1e3, tokenize_ms=timing.tokenize_s * 1e3,
                     inference_ms=timing.inference_s * 1e3, total_ms=timing.total_s * 1e3)


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, core: EmbeddingCore, on_call: CallObserver | None = None) -> None:
        self.core = core
        self._on_call = on_call

    # ---- RPCs ----

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await self._call("Embed", self._embed_rpc, request, context)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return await self._call("Score", self._score_rpc, request, context)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return await self._call("Info", self._info_rpc, request, context)

    # ---- implementations ----

    async def _embed_rpc(self, request: pb.EmbedRequest, deadline: float | None,
                         request_id: str) -> pb.EmbedResponse:
        done = await self.core.embed(
            list(request.texts), truncate=request.truncate if request.HasField("truncate") else True,
            normalize=request.normalize if request.HasField("normalize") else True,
            dimensions=request.dimensions if request.HasField("dimensions") else None,
            deadline=deadline, request_id=request_id)
        vectors = done.vectors
        return pb.EmbedResponse(vectors=vectors.astype("<f4", copy=False).tobytes(), dim=vectors.shape[1],
                                count=vectors.shape[0], usage=pb.Usage(tokens=done.tokens),
                                timing=timing_message(done.timing))

    async def _score_rpc(self, request: pb.ScoreRequest, deadline: float | None,
                         request_id: str) -> pb.ScoreResponse:
        done = await self.core.score(request.query, list(request.documents), top_k=request.top_k,
                                     truncate=request.truncate if request.HasField("truncate") else True,
                                     deadline=deadline, request_id=request_id)
        return pb.ScoreResponse(scores=done.scores.tolist(), top_indices=done.ranking if request.top_k else [],
                                usage=pb.Usage(tokens=done.tokens), timing=timing_message(done.timing))

    async def _info_rpc(self, request: pb.InfoRequest, deadline: float | None,
                        request_id: str) -> pb.InfoResponse:
        return info_message(self.core)

    async def _call(self, rpc: str, handler: Callable[..., Awaitable[Message]], request: Message,
                    context: grpc.aio.ServicerContext) -> Message:
        """Run one RPC: map errors to status codes, report (protocol, rpc, code, seconds) to the observer."""
        started = time.monotonic()
        code = "OK"
        metadata = dict(context.invocation_metadata() or ())
        request_id = metadata.get("x-request-id") or uuid.uuid4().hex[:16]
        remaining = context.time_remaining()
        deadline = None if remaining is None else started + remaining
        try:
            return await handler(request, deadline, request_id)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # every failure becomes a status; status_of logs the unexpected ones
            code, message = status_of(exc, request_id)
        finally:
            if self._on_call is not None:
                self._on_call("grpc", rpc, code, time.monotonic() - started)
        await context.abort(grpc.StatusCode[code], message)


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
