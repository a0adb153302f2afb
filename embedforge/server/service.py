"""gRPC servicer for embedforge.v1.EmbeddingService.

Knows gRPC and the Embedder interface (tokenize + run_batch), never onnxruntime. Each call:
validate -> tokenize (in a worker thread, or inline for small requests) -> Batcher.submit (merged with
concurrent calls) -> reply.
Vectors go out as one packed little-endian float32 `bytes` field (see the .proto).
Until a model is attached (`attach`, once it is loaded and warmed up) every call gets UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import Message

from embedforge import __version__
from embedforge._proto import embedding_pb2 as pb
from embedforge._proto import embedding_pb2_grpc as pb_grpc
from embedforge.server.batcher import (
    Batcher,
    BatcherStopped,
    BatchFailed,
    DeadlineExceeded,
    QueueFull,
    TooLarge,
)
from embedforge.server.embedder import Embedder, l2_normalize

log = logging.getLogger("embedforge.server.service")

INLINE_TOKENIZE_CHARS = 1024
"""Requests up to this many characters are tokenized on the event loop (the Rust tokenizer takes tens of
microseconds for them, less than handing them to a thread: single-text p50 latency drops by about 0.15 ms);
larger ones go to the tokenizer thread so that the loop never stalls."""

CallObserver = Callable[[str, grpc.StatusCode, float], None]
"""(rpc name, status code, seconds) for every finished call, e.g. to update metrics."""
TimingObserver = Callable[[float, float, float], None]
"""(queue_s, tokenize_s, inference_s) for every successful Embed/Score call."""


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_chars_per_text: int


class InvalidRequest(Exception):
    """Bad input; the message names the offending field or item."""


@dataclass(frozen=True)
class _Embedded:
    vectors: np.ndarray
    tokens: int
    timing: pb.Timing


class EmbeddingServicer(pb_grpc.EmbeddingServiceServicer):
    def __init__(self, limits: Limits, on_call: CallObserver | None = None,
                 on_timing: TimingObserver | None = None) -> None:
        self._embedder: Embedder | None = None
        self._batcher: Batcher | None = None
        self.limits = limits
        self._on_call = on_call
        self._on_timing = on_timing
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedforge-tokenize")
        self.draining = False

    def attach(self, embedder: Embedder, batcher: Batcher) -> None:
        """Serve calls with this (loaded, warmed-up) model and its running batcher."""
        self._embedder = embedder
        self._batcher = batcher

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False)

    # ---- RPCs ----

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await self._call("Embed", self._embed_rpc, request, context)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return await self._call("Score", self._score_rpc, request, context)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return await self._call("Info", self._info_rpc, request, context)

    # ---- implementations ----

    async def _embed_rpc(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext,
                         request_id: str) -> pb.EmbedResponse:
        texts = list(request.texts)
        self._check_texts(texts, "texts")
        truncate = request.truncate if request.HasField("truncate") else True
        normalize = request.normalize if request.HasField("normalize") else True
        if not normalize and not self._embedder.info.unnormalized:
            raise InvalidRequest("normalize=false: this export has no unnormalized output; re-export with "
                                 "`embedforge export`")
        done = await self._embed(texts, ["texts"] * len(texts), list(range(len(texts))), truncate, context,
                                 request_id)
        vectors = l2_normalize(done.vectors) if normalize else done.vectors
        return pb.EmbedResponse(vectors=vectors.astype("<f4", copy=False).tobytes(), dim=vectors.shape[1],
                                count=vectors.shape[0], usage=pb.Usage(tokens=done.tokens), timing=done.timing)

    async def _score_rpc(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext,
                         request_id: str) -> pb.ScoreResponse:
        self._check_texts([request.query], "query", indexed=False)
        documents = list(request.documents)
        self._check_texts(documents, "documents")
        truncate = request.truncate if request.HasField("truncate") else True
        done = await self._embed([request.query, *documents], ["query"] + ["documents"] * len(documents),
                                 [0, *range(len(documents))], truncate, context, request_id)
        vectors = l2_normalize(done.vectors)
        scores = vectors[1:] @ vectors[0]
        top = np.argsort(-scores, kind="stable")[: request.top_k] if request.top_k else []
        return pb.ScoreResponse(scores=scores.tolist(), top_indices=[int(i) for i in top],
                                usage=pb.Usage(tokens=done.tokens), timing=done.timing)

    async def _info_rpc(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext,
                        request_id: str) -> pb.InfoResponse:
        info = self._embedder.info
        batcher = self._batcher
        limits = pb.Limits(max_texts_per_request=self.limits.max_texts_per_request,
                           max_chars_per_text=self.limits.max_chars_per_text,
                           max_batch_tokens=batcher.max_batch_tokens, max_queue_tokens=batcher.max_queue_tokens,
                           max_wait_ms=batcher.max_wait_s * 1000.0, min_batch_tokens=batcher.min_batch_tokens)
        return pb.InfoResponse(model_name=info.model_name, dim=info.dim, max_length=info.max_length,
                               precision=info.precision, provider=info.provider, pooling=info.pooling,
                               limits=limits, server_version=__version__)

    def _check_texts(self, texts: list[str], field: str, indexed: bool = True) -> None:
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

    async def _embed(self, texts: list[str], fields: list[str], indices: list[int], truncate: bool,
                     context: grpc.aio.ServicerContext, request_id: str) -> _Embedded:
        """Tokenize and run texts through the batcher; fields/indices name each text in error messages."""
        arrived = time.monotonic()
        if self._batcher.queued_tokens >= self._batcher.max_queue_tokens:  # refuse before paying for tokenization
            raise QueueFull(f"queue full: {self._batcher.queued_tokens} tokens queued")
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
            tokenized = self._embedder.tokenize(texts)  # tens of microseconds: cheaper than a thread hop
        else:
            tokenized = await asyncio.get_running_loop().run_in_executor(self._tokenize_pool,
                                                                         self._embedder.tokenize, texts)
        tokenize_s = time.monotonic() - arrived
        if not truncate and tokenized.truncated:
            i = tokenized.truncated[0]
            raise InvalidRequest(f"{fields[i]}[{indices[i]}] is longer than max_length="
                                 f"{self._embedder.info.max_length} tokens and truncate is false")
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        result = await self._batcher.submit(tokenized.ids, tokenized.lengths, deadline, request_id)
        total_s = time.monotonic() - arrived
        if self._on_timing is not None:
            self._on_timing(result.queue_s, tokenize_s, result.inference_s)
        timing = pb.Timing(queue_ms=result.queue_s * 1e3, tokenize_ms=tokenize_s * 1e3,
                           inference_ms=result.inference_s * 1e3, total_ms=total_s * 1e3)
        return _Embedded(result.vectors, int(sum(tokenized.lengths)), timing)

    async def _call(self, rpc: str, handler: Callable[..., Awaitable[Message]], request: Message,
                    context: grpc.aio.ServicerContext) -> Message:
        """Run one RPC: map errors to status codes, report (rpc, code, seconds) to the observer."""
        started = time.monotonic()
        code, message = grpc.StatusCode.OK, ""
        metadata = dict(context.invocation_metadata() or ())
        request_id = metadata.get("x-request-id") or uuid.uuid4().hex[:16]
        try:
            if self.draining:
                code, message = grpc.StatusCode.UNAVAILABLE, "server is shutting down"
            elif self._embedder is None:
                code, message = grpc.StatusCode.UNAVAILABLE, "model is loading; retry when health reports SERVING"
            else:
                return await handler(request, context, request_id)
        except (InvalidRequest, TooLarge) as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except QueueFull as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later"
        except DeadlineExceeded as exc:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
        except BatcherStopped as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except BatchFailed as exc:
            code, message = grpc.StatusCode.INTERNAL, f"{exc} (request id {request_id})"
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("event=rpc_failed rpc=%s request_id=%s", rpc, request_id)
            code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
        finally:
            if self._on_call is not None:
                self._on_call(rpc, code, time.monotonic() - started)
        await context.abort(code, message)

