"""Server lifecycle: grpc.aio server (+ the HTTP API), health, reflection, API key, TLS, metrics, graceful drain.

    server = EmbeddingServer(embedder, ServeConfig(port=0))
    port = await server.start()      # listen() + load(): returns once the model is warmed up and SERVING
    ...
    await server.drain()             # NOT_SERVING, refuse new calls, finish in-flight ones within grace_s

or, to answer health checks while a slow model loads:

    server = EmbeddingServer(None, config)
    port = await server.listen()     # bound: health NOT_SERVING, Embed/Score/Info UNAVAILABLE "model is loading"
    await server.load(make_embedder) # builds the model in a worker thread, warms it up, then SERVING

`run_server` does the latter for the command line and drains on SIGTERM/SIGINT.

With `http_port` set, the OpenAI-compatible HTTP API (server/http.py) listens too, on the same event loop and
the same `EmbeddingCore` (so the same batcher, queue, limits and metrics) as gRPC.

Health tells the truth: NOT_SERVING while loading, after `max_failures` failed batches in a row (SERVING again
after a success) and while draining. Exposure: reflection can be off, metrics bind `metrics_host` (loopback by
default), an API key is checked (and a call without it counted) before the request body is parsed, an API key
without TLS beyond loopback needs `allow_insecure_key`, and `tls_client_ca` requires client certificates.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import prometheus_client as prom
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedforge._proto import embedding_pb2 as pb
from embedforge.net import MAX_REPLY_BYTES, InsecureKeyError, is_loopback
from embedforge.server.admission import Admission, AdmissionLimits
from embedforge.server.batcher import Batcher, BatchStats
from embedforge.server.config import QUEUE_REQUESTS, ServeConfig
from embedforge.server.core import CallObserver, EmbeddingCore, Limits
from embedforge.server.embedder import Embedder, ModelInfo
from embedforge.server.http import HttpApi
from embedforge.server.service import EmbeddingServicer, RateLimitedLog

log = logging.getLogger("embedforge.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
HEALTH_PREFIX = "/grpc.health.v1.Health/"
STOP_MARGIN_S = 0.5  # after grace_s, time given to the batcher's last batch before it is abandoned


def server_options(config: ServeConfig) -> list[tuple[str, int]]:
    """gRPC options: a request body may be as large as the limits allow (max_receive_bytes), no larger. No BDP
    probing: it widens each stream's flow-control window, so gRPC would buffer megabytes of every body that
    no handler reads yet (calls waiting for admission); with it off a stream buffers 64 KB until it is read."""
    return [("grpc.max_receive_message_length", config.max_receive_bytes),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.max_send_message_length", MAX_REPLY_BYTES),
            ("grpc.so_reuseport", 0)]


# Clients may ping as often as every 10 s (embedforge.client pings after 60 s without traffic); more
# often than that is answered with GOAWAY "too_many_pings".
MIN_CLIENT_PING_INTERVAL_MS = 10000


def connection_options(cfg: ServeConfig) -> list[tuple[str, int]]:
    """gRPC server options for connection age and keepalive (see ServeConfig)."""
    options = [
        ("grpc.keepalive_time_ms", round(cfg.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(cfg.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
    ]
    if cfg.max_connection_age_s is not None:
        options += [("grpc.max_connection_age_ms", round(cfg.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", round(cfg.max_connection_age_grace_s * 1000))]
    return options


class Metrics:
    """Prometheus metrics in a registry of their own (several servers may live in one test process)."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("embedforge_requests", "Finished calls (code: the gRPC status name, also "
                                     "for HTTP)", ["protocol", "rpc", "code"], registry=r)
        self.latency = prom.Histogram("embedforge_request_seconds", "Call latency", ["protocol", "rpc"], registry=r,
                                      buckets=(.001, .002, .004, .008, .016, .032, .064, .128, .256, .512, 1, 2, 4, 8))
        self.refused = prom.Histogram("embedforge_refused_seconds", "Time to refuse a call with RESOURCE_EXHAUSTED "
                                      "(admission or deadline)",
                                      ["protocol"], registry=r, buckets=(.001, .004, .016, .064, .1, .256, 1, 4))
        self.stage = prom.Histogram("embedforge_stage_seconds", "Time per call in each stage", ["stage"], registry=r,
                                    buckets=(.0001, .0005, .001, .002, .004, .008, .016, .032, .064, .128, .256, 1, 4))
        self.batch_size = prom.Histogram("embedforge_batch_size", "Texts per model batch", registry=r,
                                         buckets=tuple(2 ** i for i in range(11)))
        self.batch_tokens = prom.Histogram("embedforge_batch_tokens", "Padded tokens per model batch",
                                           registry=r, buckets=tuple(2 ** i for i in range(4, 18)))
        self.batch_seconds = prom.Histogram("embedforge_batch_seconds", "Model time per batch", registry=r,
                                            buckets=(.001, .002, .004, .008, .016, .032, .064, .128, .256, .512, 1, 2))
        self.truncated = prom.Counter("embedforge_truncated_texts", "Texts cut at max_length (either protocol)",
                                      registry=r)

    def describe_model(self, info: ModelInfo) -> None:
        """embedforge_model_info: the served model and its embedding space, as labels (value 1)."""
        model = prom.Info("embedforge_model", "The served model and its embedding space", registry=self.registry)
        model.info({"model_name": info.model_name, "embedding_space": info.embedding_space,
                    "precision": info.precision, "dim": str(info.dim)})

    def watch_queue(self, batcher: Batcher) -> None:
        r = self.registry
        queue_tokens = prom.Gauge("embedforge_queue_tokens", "Tokens waiting for a batch", registry=r)
        queue_tokens.set_function(lambda: batcher.queued_tokens)
        queue_texts = prom.Gauge("embedforge_queue_texts", "Texts waiting for a batch", registry=r)
        queue_texts.set_function(lambda: batcher.queued_texts)

    def on_call(self, protocol: str, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(protocol, rpc, code).inc()
        self.latency.labels(protocol, rpc).observe(seconds)
        if code == "RESOURCE_EXHAUSTED":
            self.refused.labels(protocol).observe(seconds)

    def on_timing(self, queue_s: float, tokenize_s: float, inference_s: float) -> None:
        self.stage.labels("queue").observe(queue_s)
        self.stage.labels("tokenize").observe(tokenize_s)
        self.stage.labels("inference").observe(inference_s)

    def on_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_tokens.observe(stats.padded_tokens)
        self.batch_seconds.observe(stats.seconds)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Require "authorization: Bearer KEY" or "x-api-key: KEY" on every call except health checks.

    A call without the key is refused before its body is parsed (the refusing handler takes raw bytes) and
    reported to `on_call` as UNAUTHENTICATED. Both keys are compared without surrounding whitespace."""

    def __init__(self, api_key: str, on_call: CallObserver | None = None) -> None:
        self._key = api_key.strip().encode()
        if not self._key:
            raise ValueError("empty API key")
        self._on_call = on_call

    def _allowed(self, metadata: tuple) -> bool:
        values = dict(metadata or ())
        sent = values.get("x-api-key") or ""
        auth = values.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            sent = auth[7:].strip()
        return hmac.compare_digest(sent.encode(), self._key)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX) or self._allowed(details.invocation_metadata):
            return handler
        if self._on_call is not None:
            self._on_call("grpc", details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED", 0.0)

        async def deny(request, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key "
                                "(send metadata 'authorization: Bearer KEY')")

        async def deny_stream(request_iterator, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
            yield  # pragma: no cover (makes this an async generator)

        # No request deserializer: the body stays bytes, never parsed.
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, None, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, None, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, None, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(deny_stream, None, handler.response_serializer)


class UnknownMethodHandler(grpc.GenericRpcHandler):
    """Registered last: any method no other handler knows gets UNIMPLEMENTED and one rate-limited log line."""

    def __init__(self, bad_input_log: RateLimitedLog) -> None:
        self._log = bad_input_log

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        async def unimplemented(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self._log.warning("unknown_method", "event=unknown_method method=%r", method[:100])
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "unknown method")

        return grpc.unary_unary_rpc_method_handler(unimplemented)


class EmbeddingServer:
    """One gRPC server around one Embedder (given here, or built later by `load`)."""

    def __init__(self, embedder: Embedder | None, config: ServeConfig) -> None:
        self.embedder = embedder
        self.config = config
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http: HttpApi | None = None
        self.batcher: Batcher | None = None
        self._metrics_http = None
        self._draining = False

    async def start(self) -> int:
        """`listen`, then `load` the embedder given to the constructor; returns the port once SERVING."""
        port = await self.listen()
        await self.load()
        return port

    async def listen(self) -> int:
        """Bind and start serving health (NOT_SERVING), reflection and metrics; returns the port.

        Until `load` is done, Embed/Score/Info answer UNAVAILABLE ("model is loading").
        """
        cfg = self.config.resolved(on_cuda=False)  # only the byte limits are read here; they do not depend on it
        check_security(self.config)
        self.metrics = Metrics()
        admission = Admission(AdmissionLimits(max_body_bytes=cfg.max_receive_bytes,
                                              max_pending_bytes=cfg.max_pending_bytes,
                                              body_timeout_s=cfg.body_timeout_s,
                                              default_deadline_s=cfg.default_deadline_s))
        self.core = EmbeddingCore(Limits(cfg.max_texts_per_request, cfg.max_chars_per_text), admission,
                                  allow_any_dimensions=cfg.allow_any_dimensions, on_timing=self.metrics.on_timing,
                                  on_truncated=self.metrics.truncated.inc, overflow=cfg.overflow,
                                  chunk_overlap=cfg.chunk_overlap,
                                  tokenizer_threads=cfg.tokenizer_threads)
        self.servicer = EmbeddingServicer(self.core, on_call=self.metrics.on_call)
        self.health = health.aio.HealthServicer()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        api_key = (cfg.api_key or "").strip()
        interceptors = [ApiKeyInterceptor(api_key, self.metrics.on_call)] if api_key else []
        # No cap on concurrent calls: admission bounds bodies by bytes and time, and health is never refused.
        self.server = grpc.aio.server(interceptors=interceptors, options=server_options(cfg) + connection_options(cfg))
        self.server.add_generic_rpc_handlers((self.servicer.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if cfg.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                                self.server)
        self.server.add_generic_rpc_handlers((UnknownMethodHandler(self.servicer.bad_input_log),))
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert is not None:
            client_ca = None if cfg.tls_client_ca is None else Path(cfg.tls_client_ca).read_bytes()
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                                                root_certificates=client_ca, require_client_auth=client_ca is not None)
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind {address}")
        if not is_loopback(cfg.host) and cfg.tls_cert is None and not api_key:
            log.warning("event=insecure_bind host=%s detail=\"listening beyond localhost without TLS or API key\"",
                        cfg.host)
        if cfg.metrics_port is not None:
            self._metrics_http, _ = prom.start_http_server(cfg.metrics_port, addr=cfg.metrics_host,
                                                           registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        if cfg.http_port is not None:
            self.http = HttpApi(self.core, api_key=api_key or None, registry=self.metrics.registry,
                                on_call=self.metrics.on_call)
            await self.http.start(cfg.host, cfg.http_port, cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        await self.server.start()
        log.info("event=listening address=%s:%d tls=%s client_certs=%s api_key=%s reflection=%s metrics=%s:%s "
                 "http_port=%s", cfg.host, self.port, cfg.tls_cert is not None, cfg.tls_client_ca is not None,
                 bool(api_key), cfg.reflection, cfg.metrics_host, self.metrics_port,
                 self.http.port if self.http is not None else None)
        return self.port

    async def load(self, make_embedder: Callable[[], Embedder] | None = None) -> None:
        """Build the embedder with `make_embedder` (None: the one given to the constructor), warm it up, SERVING.

        Loading and warm-up run in a worker thread, so health checks are answered meanwhile. If `drain`
        was called in the meantime, the model is dropped and nothing starts.
        """
        loop = asyncio.get_running_loop()
        if make_embedder is not None:
            log.info("event=loading")
            self.embedder = await loop.run_in_executor(None, make_embedder)
        if self.embedder is None:
            raise ValueError("no embedder: pass make_embedder or give one to the constructor")
        warmup = getattr(self.embedder, "warmup", None)
        warmup_batch = None if warmup is None else await loop.run_in_executor(None, warmup)  # (tokens, seconds)
        if self._draining:
            log.info("event=load_discarded detail=\"stopped while loading\"")
            return
        info = self.embedder.info
        # Settings left automatic (None) follow the provider the model really runs on (ModelInfo.provider
        # holds ONNX Runtime's name for it); the command line has chosen them already.
        cfg = self.config.resolved(on_cuda=info.provider == "CUDAExecutionProvider", max_length=info.max_length)
        self.batcher = Batcher(self.embedder.run_batch, max_batch_tokens=cfg.max_batch_tokens,
                               min_batch_tokens=cfg.min_batch_tokens, workers=cfg.workers,
                               max_wait_ms=cfg.max_wait_ms, max_queue_tokens=cfg.max_queue_tokens,
                               max_request_tokens=cfg.queue_tokens_for(info.max_length) // QUEUE_REQUESTS,
                               max_failures=cfg.max_failures, on_batch=self.metrics.on_batch,
                               on_health=self._on_batch_health, on_idle=self.embedder.release_memory)
        if warmup_batch:
            self.batcher.record_batch(*warmup_batch)
        self.metrics.watch_queue(self.batcher)
        self.metrics.describe_model(info)
        self.batcher.start()
        self.core.attach(self.embedder, self.batcher)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("event=serving address=%s:%d model=%s precision=%s provider=%s unnormalized_output=%s "
                 "matryoshka_dims=%s", cfg.host, self.port, info.model_name, info.precision, info.provider,
                 info.unnormalized, ",".join(map(str, info.matryoshka_dims)) or "none")

    def _on_batch_health(self, healthy: bool) -> None:
        """The batcher's verdict (max_failures failed batches in a row, or a success after them) -> health."""
        if self._draining:
            return
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            asyncio.get_running_loop().create_task(self.health.set(name, status))

    async def drain(self, grace_s: float | None = None) -> bool:
        """NOT_SERVING, refuse new calls, let in-flight calls finish within grace_s, then stop everything.

        The whole drain takes about grace_s even if a batch hangs; returns False in that case (a batch was
        still running: its thread is abandoned, so the process should exit without waiting for it)."""
        grace = self.config.grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        self._draining = True
        log.info("event=draining grace_s=%s queued_texts=%d", grace,
                 self.batcher.queued_texts if self.batcher is not None else 0)
        await self.health.enter_graceful_shutdown()
        self.core.draining = True
        await asyncio.gather(self.server.stop(grace), *([self.http.drain(grace)] if self.http is not None else []))
        finished = True
        if self.batcher is not None:
            finished = await self.batcher.stop(timeout=max(0.0, deadline - time.monotonic()) + STOP_MARGIN_S)
        self.core.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if finished:
            log.info("event=stopped")
        else:
            log.error("event=stopped_with_hung_batch grace_s=%s detail=\"a model batch was still running\"", grace)
        return finished


def check_security(config: ServeConfig) -> None:
    """Refuse settings that would leak the key or half-configure TLS (ValueError, InsecureKeyError)."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("TLS needs both a certificate and a key")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("client certificates (tls_client_ca) need TLS (tls_cert and tls_key)")
    key = (config.api_key or "").strip()
    if key and config.tls_cert is None and not is_loopback(config.host) and not config.allow_insecure_key:
        raise InsecureKeyError(f"an API key without TLS on {config.host} would travel in clear text; give a TLS "
                               "certificate and key, bind 127.0.0.1, or allow it explicitly (--allow-insecure-key)")


def run_server(make_embedder: Callable[[], Embedder], config: ServeConfig) -> bool:
    """Listen, load the model, serve until SIGTERM/SIGINT, then drain; a failed load raises.

    Returns False if a model batch still hung when the drain's time was up: the caller should exit non-zero
    at once (os._exit), since the hung thread would keep the interpreter from ending."""
    return asyncio.run(_serve_until_signal(make_embedder, config))


async def _serve_until_signal(make_embedder: Callable[[], Embedder], config: ServeConfig) -> bool:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = EmbeddingServer(None, config)
    await server.listen()
    loading = asyncio.create_task(server.load(make_embedder))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait((loading, stopping), return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # raises if the model failed to load
            await stopping
    finally:
        finished = await server.drain()
        stopping.cancel()
        # A model still loading cannot be interrupted: wait for its thread, so that nothing is left
        # running; load() then sees the drain and drops the model.
        await loading
    return finished
