"""The OpenAI-compatible HTTP API (aiohttp), on the gRPC server's event loop and `EmbeddingCore` (one batcher).

    POST /v1/embeddings   OpenAI schema: input (a string or a list of strings), model, encoding_format
                          (float | base64: little-endian float32), dimensions, user (ignored)
    POST /v1/rerank       Cohere/Jina schema: query, documents, top_n, return_documents -> results best first
                          (relevance_score = cosine of the bi-encoder vectors: the Score RPC over HTTP)
    GET  /v1/models       the served model, its dim, Matryoshka sizes and limits
    GET  /health          200 {"status": "serving"}; 503 while loading or draining
    GET  /metrics         Prometheus text (the same registry as --metrics-port)

Errors are OpenAI's error JSON, {"error": {"message", "type", "param", "code"}}, with the HTTP status of the
core's status name (400 INVALID_ARGUMENT, 429 RESOURCE_EXHAUSTED + Retry-After, 503 UNAVAILABLE, ...), 401 for
a missing or wrong API key (`Authorization: Bearer KEY`, as gRPC) and 413 for a body over the limit: bodies are
size-limited while they are read, before they are parsed. Each reply carries the server's split of the call
in a standard `Server-Timing` header (queue, tokenize, inference, total, in ms). Knows no onnxruntime.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import prometheus_client as prom
from aiohttp import web

from embedforge import __version__
from embedforge.server.core import CallObserver, EmbeddingCore, Held, Timing, status_of

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
               "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
              413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
              504: "server_error"}
RETRY_AFTER_S = 1
OPEN_PATHS = frozenset({"/health", "/metrics"})  # no API key, as gRPC health checks


class ApiError(Exception):
    """An HTTP error reply: status, message and OpenAI's optional `param` (the field) and `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 name: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.name = status, message, param, code, name


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    error = {"message": message, "type": ERROR_TYPE.get(status, "invalid_request_error"), "param": param,
             "code": code}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return web.json_response({"error": error}, status=status, headers=headers)


def server_timing(timing: Timing) -> str:
    """A W3C Server-Timing header value: the server's split of the call in milliseconds."""
    return ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in
                     (("queue", timing.queue_s), ("tokenize", timing.tokenize_s),
                      ("inference", timing.inference_s), ("total", timing.total_s)))


def _texts(value: Any, field: str) -> list[str]:
    """A string or a list of strings, as a list; token arrays (allowed by OpenAI) are refused."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ApiError(400, f"{field} must be a string or a list of strings", field)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            hint = " (token arrays are not supported: send text)" if isinstance(item, (int, list)) else ""
            raise ApiError(400, f"{field}[{i}] must be a string{hint}", field)
    return value


def _optional_int(body: dict, field: str) -> int | None:
    value = body.get(field)
    if value is not None and type(value) is not int:
        raise ApiError(400, f"{field} must be an integer, got {value!r}", field)
    return value


class HttpApi:
    """The aiohttp application and its listening site; `start` binds, `drain` refuses new calls and stops."""

    def __init__(self, core: EmbeddingCore, *, api_key: str | None, max_request_bytes: int,
                 registry: prom.CollectorRegistry, on_call: CallObserver | None = None) -> None:
        self.core = core
        self._key = api_key.encode() if api_key else None
        self._max_request_bytes = max_request_bytes
        self._registry = registry
        self._on_call = on_call
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._created = int(time.time())
        self.app = web.Application(client_max_size=max_request_bytes, middlewares=[self._middleware])
        self.app.router.add_post("/v1/embeddings", self._embeddings)
        self.app.router.add_post("/v1/rerank", self._rerank)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None) -> int:
        """Listen on host:port (0: any free port), with TLS when a certificate and key are given; returns the port."""
        ssl_context = None
        if tls_cert is not None:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(tls_cert, tls_key)
        # handler_cancellation: a client that hangs up cancels its call, so the batcher drops its texts.
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, reuse_port=False)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def drain(self, grace_s: float) -> None:
        """Let calls in flight finish within grace_s (new ones get 503 from the core), then close."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except asyncio.TimeoutError:
            pass
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- plumbing ----

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        """API key check, and aiohttp's own errors (404, 405, 413) as OpenAI error JSON."""
        if self._key is not None and request.path not in OPEN_PATHS and not self._authorized(request):
            return error_response(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                  code="invalid_api_key")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.status, f"{request.method} {request.path}: {exc.reason}")

    def _authorized(self, request: web.Request) -> bool:
        sent = request.headers.get("X-Api-Key", "")
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            sent = auth[7:].strip()
        return hmac.compare_digest(sent.encode(), self._key)

    async def _call(self, rpc: str, request: web.Request,
                    handler: Callable[[dict, str], Awaitable[web.Response]]) -> web.Response:
        """Read and parse the body, run the handler, map errors, report (protocol, rpc, status, seconds)."""
        started = time.monotonic()
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
        name, body, held = "OK", {}, None
        self._in_flight += 1
        self._idle.clear()
        try:
            if request.method == "POST":
                held, body = await self._json(request)
            response = await handler(body, request_id)
        except ApiError as exc:
            name = exc.name
            response = error_response(exc.status, exc.message, exc.param, exc.code)
        except asyncio.CancelledError:
            name = "CANCELLED"
            raise
        except Exception as exc:  # every failure becomes a status; status_of logs the unexpected ones
            name, message = status_of(exc, request_id)
            field = re.match(r"\w+", message)  # the core's messages start with the field they name
            param = field.group() if field and field.group() in body else None
            response = error_response(HTTP_STATUS[name], message, param)
        finally:
            if held is not None:
                held.release()
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
            if self._on_call is not None:
                self._on_call("http", rpc, name, time.monotonic() - started)
        response.headers["X-Request-Id"] = request_id
        return response

    async def _json(self, request: web.Request) -> tuple[Held, dict]:
        """The body as a JSON object, its bytes counted against the pending-bytes budget (released by the caller
        when the call ends, or earlier once its texts are tokenized). Read on one of the core's read slots;
        aiohttp stops reading at client_max_size (HTTP 413) before it is parsed."""
        too_large = ApiError(413, f"request body too large: the limit is {self._max_request_bytes} bytes",
                             code="request_too_large")
        if (request.content_length or 0) > self._max_request_bytes:
            raise too_large

        async def read() -> bytes:
            try:
                return await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise too_large from None

        held, raw = await self.core.read_body(read, content_length=request.content_length)
        try:
            body = await self.core.parse_body(held, json.loads, raw)
        except (ValueError, UnicodeDecodeError) as exc:  # parse_body gave the bytes back
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            held.release()
            raise ApiError(400, "request body must be a JSON object")
        return held, body

    def _check_model(self, body: dict) -> str:
        """The served model's id; a request naming another model gets 404 model_not_found, as OpenAI's API does."""
        model_id = self.core.check_ready().model_name
        asked = body.get("model")
        if asked not in (None, "", model_id):
            raise ApiError(404, f"model {asked!r} is not served here; this server serves {model_id!r}", "model",
                           "model_not_found", name="NOT_FOUND")
        return model_id

    # ---- endpoints ----

    async def _embeddings(self, request: web.Request) -> web.Response:
        return await self._call("Embed", request, self._embed)

    async def _embed(self, body: dict, request_id: str) -> web.Response:
        model_id = self._check_model(body)
        if "input" not in body:
            raise ApiError(400, "input is required: a string or a list of strings", "input")
        texts = _texts(body["input"], "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format")
        dimensions = _optional_int(body, "dimensions")
        done = await self.core.embed(texts, dimensions=dimensions, request_id=request_id, field="input")
        vectors = done.vectors.astype("<f4", copy=False)
        if encoding == "base64":
            encoded = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
        else:
            encoded = vectors.tolist()
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        payload = {"object": "list", "data": data, "model": model_id,
                   "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens}}
        return web.json_response(payload, headers={"Server-Timing": server_timing(done.timing)})

    async def _rerank(self, request: web.Request) -> web.Response:
        return await self._call("Score", request, self._score)

    async def _score(self, body: dict, request_id: str) -> web.Response:
        model_id = self._check_model(body)
        query = body.get("query")
        if not isinstance(query, str):
            raise ApiError(400, "query is required: a string", "query")
        raw = body.get("documents")
        if not isinstance(raw, list):
            raise ApiError(400, "documents is required: a list of strings (or of {\"text\": ...} objects)",
                           "documents")
        documents = [item["text"] if isinstance(item, dict) and "text" in item else item for item in raw]
        documents = _texts(documents, "documents")
        top_n = _optional_int(body, "top_n")
        if top_n is not None and top_n < 1:
            raise ApiError(400, f"top_n must be >= 1, got {top_n}", "top_n")
        return_documents = body.get("return_documents", False)
        if not isinstance(return_documents, bool):
            raise ApiError(400, "return_documents must be true or false", "return_documents")
        done = await self.core.score(query, documents, top_k=top_n or 0, request_id=request_id)
        results = []
        for i in done.ranking:
            result = {"index": i, "relevance_score": float(done.scores[i])}
            if return_documents:
                result["document"] = {"text": documents[i]}
            results.append(result)
        payload = {"id": request_id, "model": model_id, "results": results,
                   "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens}}
        return web.json_response(payload, headers={"Server-Timing": server_timing(done.timing)})

    async def _models(self, request: web.Request) -> web.Response:
        return await self._call("Info", request, self._list_models)

    async def _list_models(self, body: dict, request_id: str) -> web.Response:
        info = self.core.check_ready()
        batcher, limits = self.core.batcher, self.core.limits
        model = {"id": info.model_name, "object": "model", "created": self._created, "owned_by": "embedforge",
                 "dim": info.dim, "max_length": info.max_length, "matryoshka_dims": list(info.matryoshka_dims),
                 "any_dimensions": self.core.allow_any_dimensions, "pooling": info.pooling,
                 "precision": info.precision, "provider": info.provider, "server_version": __version__,
                 "limits": {"max_texts_per_request": limits.max_texts_per_request,
                            "max_chars_per_text": limits.max_chars_per_text,
                            "max_batch_tokens": batcher.max_batch_tokens,
                            "max_queue_tokens": batcher.max_queue_tokens,
                            "max_wait_ms": batcher.max_wait_s * 1000.0,
                            "min_batch_tokens": batcher.min_batch_tokens}}
        return web.json_response({"object": "list", "data": [model]})

    async def _health(self, request: web.Request) -> web.Response:
        state = self.core.state
        return web.json_response({"status": state}, status=200 if state == "serving" else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=prom.generate_latest(self._registry),
                            headers={"Content-Type": prom.CONTENT_TYPE_LATEST})
