"""The OpenAI-compatible HTTP API (aiohttp), on the gRPC server's event loop and `EmbeddingCore` (one batcher).

    POST /v1/embeddings   OpenAI schema: input (a string or a list of strings), model, encoding_format
                          (float | base64: little-endian float32), dimensions, user (ignored); and Cohere's
                          embedding_types (one of float, int8, uint8, binary, ubinary: the embeddings as
                          integer codes, embedforge/quantize.py; base64: their bytes)
    POST /v1/rerank       Cohere/Jina schema: query, documents, top_n, return_documents -> results best first
                          (relevance_score = cosine of the bi-encoder vectors: the Score RPC over HTTP)
    GET  /v1/models       the served model, its dim, Matryoshka sizes and limits
    GET  /health          200 {"status": "serving"}; 503 while loading or draining
    GET  /metrics         Prometheus text (the same registry as --metrics-port)

Errors are OpenAI's error JSON, {"error": {"message", "type", "param", "code"}}, with the HTTP status of the
core's status name (400 INVALID_ARGUMENT, 429 RESOURCE_EXHAUSTED + Retry-After, 503 UNAVAILABLE, ...), 401 for
a missing or wrong API key (`Authorization: Bearer KEY`, as gRPC; every path but /health needs it), 408 for a
body that did not arrive within the body timeout and 413 for a body over the limit. Bodies follow
server/admission.py: read chunk by chunk against the byte budget, their JSON items counted before they are
parsed. Each reply carries the server's split of the call in a standard `Server-Timing` header (queue,
tokenize, inference, total, in ms). Knows no onnxruntime.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import prometheus_client as prom
from aiohttp import web

from embedforge import __version__
from embedforge.server.admission import BodyTooLarge, SlowBody, Ticket
from embedforge.server.core import (
    INPUT_TYPES,
    OVERFLOWS,
    TRUNCATION_DIRECTIONS,
    CallObserver,
    Embedded,
    EmbeddingCore,
    Scored,
    Timing,
    sanitize_request_id,
    status_of,
)

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
               "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
              408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
              500: "server_error", 503: "server_error", 504: "server_error"}
OPEN_PATHS = frozenset({"/health"})  # no API key, as gRPC health checks
READ_CHUNK_BYTES = 64 * 1024
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
"""A JSON string literal (escapes included), for counting a body's items without parsing it."""
JSON_ITEMS_PER_TEXT = 2  # a document of /v1/rerank may be an object {"text": ...}
JSON_OTHER_ITEMS = 64  # the request's other fields


def parse_json(raw: bytes | bytearray, max_texts: int) -> Any:
    """The body's JSON, refused (ApiError 400) before it is parsed when it holds more items than a request may
    (its commas outside strings, counted on a copy with every string emptied), and when it nests too deeply."""
    limit = JSON_ITEMS_PER_TEXT * (max_texts + 1) + JSON_OTHER_ITEMS
    items = JSON_STRING.sub(b'""', raw).count(b",") + 1
    if items > limit:
        raise ApiError(400, f"request body holds {items} JSON items; a request may hold at most {limit} "
                       f"({max_texts} texts)")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "request body nests JSON too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


def connection_of(request: web.Request) -> str | None:
    """The client's connection ("address:port"), as admission remembers retry hints by; None when unknown."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None


class ApiError(Exception):
    """An HTTP error reply: status, message and OpenAI's optional `param` (the field) and `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 name: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.name = status, message, param, code, name


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    error = {"message": message, "type": ERROR_TYPE.get(status, "invalid_request_error"), "param": param,
             "code": code}
    return web.json_response({"error": error}, status=status)


def server_timing(timing: Timing) -> str:
    """A W3C Server-Timing header value: the server's split of the call in milliseconds."""
    return ", ".join(f"{name};dur={seconds * 1e3:.3f}" for name, seconds in
                     (("queue", timing.queue_s), ("tokenize", timing.tokenize_s),
                      ("inference", timing.inference_s), ("total", timing.total_s)))


SPACE_HEADER = "X-Embedding-Space"


def _truncation(body: dict) -> tuple[bool | None, str]:
    """`truncate` (false: a text over max_length is a 400 naming it and its tokens; unset: the server's
    --overflow) and
    `truncation_direction` ("right", the default, or "left"; any case, as TEI spells them)."""
    truncate = body.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise ApiError(400, "truncate must be true or false", "truncate")
    direction = body.get("truncation_direction") or "right"
    if not isinstance(direction, str) or direction.lower() not in TRUNCATION_DIRECTIONS:
        raise ApiError(400, f"truncation_direction must be one of {', '.join(TRUNCATION_DIRECTIONS)}, got "
                       f"{direction!r}", "truncation_direction")
    return truncate, direction.lower()


def reply_headers(done: Embedded | Scored) -> dict[str, str]:
    """Server-Timing, and the embedding space the reply's vectors or scores belong to."""
    return {"Server-Timing": server_timing(done.timing), SPACE_HEADER: done.embedding_space}


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


HTTP_TYPES = {"float32": "float", "int8": "int8", "uint8": "uint8", "binary": "binary", "ubinary": "ubinary"}


def _output_type(body: dict) -> str:
    """Cohere's `embedding_types`: a list of one type name (float when absent); several at once are refused."""
    types = body.get("embedding_types")
    if types is None:
        return "float32"
    names = {http: ours for ours, http in HTTP_TYPES.items()}
    if not (isinstance(types, list) and len(types) == 1 and types[0] in names):
        raise ApiError(400, f"embedding_types must be a list of one of {', '.join(names)} (one type per request), "
                       f"got {types!r}", "embedding_types")
    return names[types[0]]


def _optional_int(body: dict, field: str) -> int | None:
    value = body.get(field)
    if value is not None and type(value) is not int:
        raise ApiError(400, f"{field} must be an integer, got {value!r}", field)
    return value


class HttpApi:
    """The aiohttp application and its listening site; `start` binds, `drain` refuses new calls and stops."""

    def __init__(self, core: EmbeddingCore, *, api_key: str | None, registry: prom.CollectorRegistry,
                 on_call: CallObserver | None = None) -> None:
        self.core = core
        self._key = api_key.encode() if api_key else None
        self._registry = registry
        self._on_call = on_call
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._created = int(time.time())
        self.app = web.Application(client_max_size=core.admission.limits.max_body_bytes,
                                   middlewares=[self._middleware])
        self.app.router.add_post("/v1/embeddings", self._embeddings)
        self.app.router.add_post("/v1/rerank", self._rerank)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None,
                    tls_client_ca: Path | None = None) -> int:
        """Listen on host:port (0: any free port), with TLS when a certificate and key are given, requiring client
        certificates signed by tls_client_ca when it is given (as gRPC does); returns the port."""
        ssl_context = None
        if tls_cert is not None:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(tls_cert, tls_key)
            if tls_client_ca is not None:
                ssl_context.load_verify_locations(cafile=tls_client_ca)
                ssl_context.verify_mode = ssl.CERT_REQUIRED
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
                    handler: Callable[[dict, Ticket | None, str], Awaitable[web.Response]]) -> web.Response:
        """Admit the call and read its JSON body (POST), run the handler, map errors, report (protocol, rpc,
        status, seconds)."""
        started = time.monotonic()
        request_id = sanitize_request_id(request.headers.get("X-Request-Id"))
        name, body, ticket = "OK", {}, None
        self._in_flight += 1
        self._idle.clear()
        try:
            if request.method == "POST":
                self.core.check_ready()
                ticket = self.core.admission.open(None, connection=connection_of(request))
                body = await self._json(request, ticket)
            response = await handler(body, ticket, request_id)
        except ApiError as exc:
            name = exc.name
            response = error_response(exc.status, exc.message, exc.param, exc.code)
            if exc.status in (408, 413):
                response.force_close()  # the rest of the body would arrive on a connection nobody reads
        except asyncio.CancelledError:
            name = "CANCELLED"
            raise
        except Exception as exc:  # every failure becomes a status; status_of logs the unexpected ones
            name, message = status_of(exc, request_id)
            field = re.match(r"\w+", message)  # the core's messages start with the field they name
            param = field.group() if field and field.group() in body else None
            response = error_response(HTTP_STATUS[name], message, param)
            if name == "RESOURCE_EXHAUSTED":
                hint = self.core.admission.refused(connection_of(request), exc)
                response.headers["Retry-After"] = str(max(1, math.ceil(hint)))
        finally:
            if ticket is not None:
                ticket.close()
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
            if self._on_call is not None:
                self._on_call("http", rpc, name, time.monotonic() - started)
        if name == "UNAVAILABLE":
            response.headers["Retry-After"] = "1"
        response.headers["X-Request-Id"] = request_id
        return response

    async def _json(self, request: web.Request, ticket: Ticket) -> dict:
        """The body as a JSON object: read chunk by chunk within the body timeout, each chunk held against the
        byte budget (given back when the texts are tokens, or when the call ends), its items counted before it
        is parsed (off the event loop when large)."""
        admission = self.core.admission
        try:
            raw = await admission.read_chunks(ticket, request.content.iter_chunked(READ_CHUNK_BYTES),
                                              request.content_length)
        except BodyTooLarge as exc:
            raise ApiError(413, str(exc), code="request_too_large") from None
        except SlowBody as exc:
            raise ApiError(408, str(exc), code="request_timeout", name="DEADLINE_EXCEEDED") from None
        except ConnectionError:  # the client closed the connection mid-body: no one to answer, nothing to log
            raise ApiError(400, "the connection closed before the body arrived", name="CANCELLED") from None
        body = await self.core.parse(parse_json, raw, self.core.limits.max_texts_per_request)
        del raw
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

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

    async def _embed(self, body: dict, ticket: Ticket, request_id: str) -> web.Response:
        model_id = self._check_model(body)
        if "input" not in body:
            raise ApiError(400, "input is required: a string or a list of strings", "input")
        texts = _texts(body["input"], "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format")
        dimensions = _optional_int(body, "dimensions")
        input_type = body.get("input_type")
        if input_type is not None and input_type not in INPUT_TYPES:
            raise ApiError(400, f"input_type must be one of {', '.join(INPUT_TYPES)}, got {input_type!r}",
                           "input_type")
        truncate, direction = _truncation(body)
        overflow = body.get("overflow")
        if overflow is not None and overflow not in OVERFLOWS:
            raise ApiError(400, f"overflow must be one of {', '.join(OVERFLOWS)}, got {overflow!r}", "overflow")
        output_type = _output_type(body)
        done = await self.core.embed(texts, dimensions=dimensions, ticket=ticket, request_id=request_id,
                                     field="input", input_type=input_type, truncate=truncate,
                                     truncation_direction=direction, overflow=overflow,
                                     chunk_overlap=_optional_int(body, "chunk_overlap"), output_type=output_type)
        vectors = done.vectors.astype("<f4", copy=False) if output_type == "float32" else done.vectors
        if encoding == "base64":
            encoded = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
        else:
            encoded = vectors.tolist()
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        payload = {"object": "list", "data": data, "model": model_id,
                   "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens},
                   "input_tokens": done.text_tokens, "truncated": done.truncated,
                   "embedding_space": done.embedding_space, "embedding_type": HTTP_TYPES[output_type]}
        return web.json_response(payload, headers=reply_headers(done))

    async def _rerank(self, request: web.Request) -> web.Response:
        return await self._call("Score", request, self._score)

    async def _score(self, body: dict, ticket: Ticket, request_id: str) -> web.Response:
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
        truncate, direction = _truncation(body)
        done = await self.core.score(query, documents, top_k=top_n or 0, ticket=ticket, request_id=request_id,
                                     truncate=truncate, truncation_direction=direction)
        results = []
        for i in done.ranking:
            result = {"index": i, "relevance_score": float(done.scores[i])}
            if return_documents:
                result["document"] = {"text": documents[i]}
            results.append(result)
        payload = {"id": request_id, "model": model_id, "results": results,
                   "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens},
                   "query_tokens": done.text_tokens[0], "document_tokens": done.text_tokens[1:],
                   "query_truncated": 0 in done.truncated, "truncated_documents": [i - 1 for i in done.truncated if i],
                   "embedding_space": done.embedding_space}
        return web.json_response(payload, headers=reply_headers(done))

    async def _models(self, request: web.Request) -> web.Response:
        return await self._call("Info", request, self._list_models)

    async def _list_models(self, body: dict, ticket: Ticket | None, request_id: str) -> web.Response:
        info = self.core.check_ready()
        batcher, limits = self.core.batcher, self.core.limits
        model = {"id": info.model_name, "object": "model", "created": self._created, "owned_by": "embedforge",
                 "dim": info.dim, "max_length": info.max_length, "matryoshka_dims": list(info.matryoshka_dims),
                 "any_dimensions": self.core.allow_any_dimensions, "pooling": info.pooling,
                 "precision": info.precision, "provider": info.provider, "server_version": __version__,
                 "embedding_space": info.embedding_space, "prompts": info.prompts,
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
