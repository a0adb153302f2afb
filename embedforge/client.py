"""Typed Python client for the embedforge gRPC API (no torch; grpcio + numpy only).

Synchronous use:

    with EmbedClient("127.0.0.1:50051") as client:
        result = client.embed(["first text", "second text"])
        result.vectors.shape          # (2, dim), float32, L2-normalised
        client.score("query", ["doc a", "doc b"], top_k=1).top_indices

Asynchronous use (many concurrent calls from one asyncio loop, e.g. a load generator):

    async with AsyncEmbedClient("127.0.0.1:50051") as client:
        results = await asyncio.gather(*(client.embed([t]) for t in texts))

Targets: one server `HOST:PORT`, a list of replicas `HOST:PORT,HOST:PORT,...`, or any gRPC target URI such
as `dns:///name:port` (every address the name resolves to; a Kubernetes headless Service gives one per pod).
Calls are spread over the replicas with gRPC's `round_robin` policy, and the service config (RETRY_POLICY)
retries a call that failed with UNAVAILABLE (replica down or draining) or RESOURCE_EXHAUSTED (its queue is
full) on the next replica, within the call's deadline.

Failed calls raise `grpc.RpcError` (use `.code()` and `.details()`). An API key is sent only over TLS or to a
loopback address (`InsecureKeyError` otherwise, unless `allow_insecure_key`).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embedforge._proto import embedding_pb2 as pb
from embedforge._proto import embedding_pb2_grpc as pb_grpc
from embedforge.net import MAX_REPLY_BYTES, InsecureKeyError, check_key_transport  # noqa: F401 (InsecureKeyError: for callers)
from embedforge.quantize import DTYPES, OUTPUT_TYPES

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
# Embed, Score and Info are pure functions of the request, so any failed attempt may be sent again.
# UNAVAILABLE and RESOURCE_EXHAUSTED share one bound: a call is sent at most 4 times (3 retries), each retry
# after a random wait of up to 0.1 s, 0.2 s, 0.4 s (capped at 1 s), and never past the call's deadline (the
# deadline covers all attempts). round_robin sends each attempt to the next ready replica. Retry throttling
# stops retrying while more than half of a channel's recent calls fail, so an overloaded fleet is not hit
# with 4x the load. CANCELLED is retried too: a server that shuts down cancels the calls it has received
# but not yet handed to a handler (grpc/grpc#41785), and a caller's own cancellation is never retried.
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"],
}
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": RETRY_POLICY}],
    "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
}
# Client-side health checking, for replica sets (a list or a URI target): the channel watches each
# replica's grpc.health.v1 status and round robin picks only those SERVING, so a replica still loading its
# model or draining after SIGTERM gets no calls (a server without the health service counts as healthy).
# One HOST:PORT goes without it, so that a server that is not SERVING answers for itself ("model is loading").
HEALTH_CHECK_CONFIG = {"serviceName": SERVICE_NAME}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
    ("grpc.max_send_message_length", MAX_REPLY_BYTES),
    ("grpc.enable_retries", 1),
    # A replica that is down (or not started yet) is tried again at most every 2 s instead of gRPC's
    # default 120 s, so a replica that (re)starts at a listed address gets calls within about 2 s.
    ("grpc.max_reconnect_backoff_ms", 2000),
    # dns:/// targets: re-resolve at most every 5 s (gRPC's default is 30 s) when a connection closes,
    # e.g. when a server's --max-connection-age-s ends it, so new pods are found sooner.
    ("grpc.dns_min_time_between_resolutions_ms", 5000),
    # While calls are open on a connection (a replica set's health watch is one), ping it after 60 s without
    # traffic and drop it after 20 s without an answer, so that a replica that vanished without closing its
    # connections (node lost) leaves the rotation. The server accepts pings this often
    # (embedforge.server.app: grpc.http2.min_ping_interval_without_data_ms).
    ("grpc.keepalive_time_ms", 60000),
    ("grpc.keepalive_timeout_ms", 20000),
]


def is_replica_set(target: str) -> bool:
    """True for a list of targets or a URI (dns:///, ipv4:...), False for one HOST:PORT."""
    return "," in target or "://" in target or target.strip().startswith(("dns:", "ipv4:", "ipv6:"))


def channel_options(health_checked: bool, retries: bool = True) -> list[tuple[str, int | str]]:
    """CHANNEL_OPTIONS plus the service config, with client-side health checking or without; retries=False
    sends each call once (to see a server's own answer, e.g. RESOURCE_EXHAUSTED, as it is)."""
    config = {**SERVICE_CONFIG, "healthCheckConfig": HEALTH_CHECK_CONFIG} if health_checked else dict(SERVICE_CONFIG)
    if not retries:
        config["methodConfig"] = [{"name": [{"service": SERVICE_NAME}]}]
    return [*CHANNEL_OPTIONS, ("grpc.service_config", json.dumps(config))]


def channel_target(target: str) -> str:
    """The gRPC target for `target`: "HOST:PORT", "HOST:PORT,HOST:PORT,..." or a URI ("dns:///name:port").

    A comma list becomes gRPC's static `ipv4:`/`ipv6:` address list (host names are resolved once, here;
    use `dns:///name:port` for a name whose addresses change). One HOST:PORT and URIs are passed as they are.
    """
    target = target.strip()
    if "," not in target:
        if not target:
            raise ValueError("empty target; expected HOST:PORT, HOST:PORT,HOST:PORT,... or dns:///NAME:PORT")
        return target
    if "://" in target or target.startswith(("ipv4:", "ipv6:", "unix:")):
        return target  # already a gRPC address list
    by_family: dict[int, list[str]] = {socket.AF_INET: [], socket.AF_INET6: []}
    for item in target.split(","):
        host, sep, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"target list item {item.strip()!r}: expected HOST:PORT (in {target!r})")
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise ValueError(f"target list item {item.strip()!r}: cannot resolve {host!r}: {exc}") from None
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        for address in addresses:
            family = socket.AF_INET if address.version == 4 else socket.AF_INET6
            entry = f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"
            if entry not in by_family[family]:
                by_family[family].append(entry)
    # gRPC's static lists hold one address family: IPv4 when there is any (what servers bind by default).
    if by_family[socket.AF_INET]:
        return "ipv4:" + ",".join(by_family[socket.AF_INET])
    return "ipv6:" + ",".join(by_family[socket.AF_INET6])


@dataclass(frozen=True)
class Timing:
    """Server-side time spent on a call, in milliseconds."""

    queue_ms: float
    tokenize_ms: float
    inference_ms: float
    total_ms: float


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # [len(texts), dim] float32 (or the output type's codes), row i belongs to texts[i]
    tokens: int  # tokens the model processed (after truncation, no padding)
    timing: Timing
    embedding_space: str = ""  # the space the vectors belong to (ServerInfo.embedding_space)
    text_tokens: tuple[int, ...] = ()  # tokens used of each text (after truncation, prompt included)
    truncated: tuple[int, ...] = ()  # indices of the texts cut at max_length
    output_type: str = "float32"  # or int8, uint8, binary, ubinary (embedforge/quantize.py)
    vector_dim: int = 0  # dimensions per vector (binary rows pack 8 to a byte); 0: vectors.shape[1]

    @property
    def dim(self) -> int:
        return self.vector_dim or int(self.vectors.shape[1])


@dataclass(frozen=True)
class ScoreResult:
    scores: np.ndarray  # float32 [len(documents)], cosine similarity, document order
    top_indices: list[int]  # best first, at most top_k
    tokens: int
    timing: Timing
    embedding_space: str = ""
    document_tokens: tuple[int, ...] = ()  # tokens used of each document (the query's: query_tokens)
    truncated_documents: tuple[int, ...] = ()  # indices of the documents cut at max_length
    query_tokens: int = 0
    query_truncated: bool = False


@dataclass(frozen=True)
class ServerInfo:
    model_name: str
    dim: int
    max_length: int
    precision: str
    provider: str
    pooling: str
    max_texts_per_request: int
    max_chars_per_text: int
    max_batch_tokens: int
    max_queue_tokens: int
    max_wait_ms: float
    min_batch_tokens: int
    server_version: str
    matryoshka_dims: tuple[int, ...]  # vector sizes the model was trained for; empty: full vectors only
    any_dimensions: bool  # the server accepts any `dimensions` (lossy for a model not trained for it)
    embedding_space: str = ""  # id of what decides a vector: equal ids give comparable vectors
    prompts: dict[str, str] | None = None  # the model's prompts by input type ("query", "document")


# ---- building requests and decoding responses (shared by the sync and async clients) ----

INPUT_TYPES = {None: pb.INPUT_TYPE_UNSPECIFIED, "query": pb.QUERY, "document": pb.DOCUMENT}
DIRECTIONS = {"right": pb.RIGHT, "left": pb.LEFT}
OVERFLOWS = {None: pb.OVERFLOW_UNSPECIFIED, "truncate": pb.TRUNCATE, "error": pb.ERROR, "chunk": pb.CHUNK}


def _direction(truncation_direction: str) -> int:
    if truncation_direction not in DIRECTIONS:
        raise ValueError(f"truncation_direction must be 'right' or 'left', got {truncation_direction!r}")
    return DIRECTIONS[truncation_direction]


def build_embed_request(texts: Sequence[str], truncate: bool | None = None, normalize: bool = True,
                        dimensions: int | None = None, input_type: str | None = None,
                        truncation_direction: str = "right", overflow: str | None = None,
                        chunk_overlap: int | None = None, output_type: str = "float32") -> pb.EmbedRequest:
    """input_type "query" or "document": the server prefixes the model's prompt of that kind (None: none);
    truncation_direction: which end of a text over max_length is cut ("right" keeps the start); overflow
    "truncate", "error" or "chunk" (windows of max_length tokens overlapping by chunk_overlap) overrides
    truncate; output_type: float32, int8, uint8, binary or ubinary (embedforge/quantize.py)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type must be 'query', 'document' or None, got {input_type!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be 'truncate', 'error', 'chunk' or None, got {overflow!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    return pb.EmbedRequest(texts=list(texts), truncate=truncate, normalize=normalize, dimensions=dimensions,
                           input_type=INPUT_TYPES[input_type], truncation_direction=_direction(truncation_direction),
                           overflow=OVERFLOWS[overflow], chunk_overlap=chunk_overlap, output_type=output_type.upper())


def build_score_request(query: str, documents: Sequence[str], top_k: int = 0, truncate: bool = True,
                        truncation_direction: str = "right") -> pb.ScoreRequest:
    if isinstance(documents, str):
        raise TypeError("documents must be a sequence of strings, not one string")
    return pb.ScoreRequest(query=query, documents=list(documents), top_k=top_k, truncate=truncate,
                           truncation_direction=_direction(truncation_direction))


def decode_vectors(response: pb.EmbedResponse) -> np.ndarray:
    """The response's vectors as [count, dim] float32 (or int8 / uint8 codes; binary: [count, ceil(dim / 8)]
    packed bytes), a zero-copy view of the little-endian bytes."""
    output_type = pb.OutputType.Name(response.output_type).lower()
    dtype = np.dtype(DTYPES[output_type]).newbyteorder("<")
    width = response.row_bytes // dtype.itemsize if response.row_bytes else response.dim  # 0: an older server
    return np.frombuffer(response.vectors, dtype=dtype).reshape(response.count, width)


def decode_timing(timing: pb.Timing) -> Timing:
    return Timing(timing.queue_ms, timing.tokenize_ms, timing.inference_ms, timing.total_ms)


def decode_embed_response(response: pb.EmbedResponse) -> EmbedResult:
    return EmbedResult(decode_vectors(response), response.usage.tokens, decode_timing(response.timing),
                       response.embedding_space, tuple(response.text_tokens), tuple(response.truncated),
                       pb.OutputType.Name(response.output_type).lower(), response.dim)


def decode_score_response(response: pb.ScoreResponse) -> ScoreResult:
    return ScoreResult(np.asarray(response.scores, dtype=np.float32), list(response.top_indices),
                       response.usage.tokens, decode_timing(response.timing), response.embedding_space,
                       tuple(response.document_tokens), tuple(response.truncated_documents), response.query_tokens,
                       response.query_truncated)


def decode_info_response(r: pb.InfoResponse) -> ServerInfo:
    lim = r.limits
    return ServerInfo(r.model_name, r.dim, r.max_length, r.precision, r.provider, r.pooling,
                      lim.max_texts_per_request, lim.max_chars_per_text, lim.max_batch_tokens,
                      lim.max_queue_tokens, lim.max_wait_ms, lim.min_batch_tokens, r.server_version,
                      tuple(r.matryoshka_dims), r.any_dimensions, r.embedding_space, dict(r.prompts))


# ---- channels ----

def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


PemSource = str | Path | bytes  # a PEM file's path, or its bytes


def _pem(source: PemSource) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def channel_credentials(tls_root_cert: PemSource | None = None, tls_cert: PemSource | None = None,
                        tls_key: PemSource | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext. TLS is on when a root certificate (to verify the server; without
    it, the system's roots) or a client certificate is given; tls_cert + tls_key present the client's own
    certificate to a server that requires one (mutual TLS)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    if tls_root_cert is None and tls_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=None if tls_root_cert is None else _pem(tls_root_cert),
        private_key=None if tls_key is None else _pem(tls_key),
        certificate_chain=None if tls_cert is None else _pem(tls_cert))


def create_channel(target: str, credentials: grpc.ChannelCredentials | None = None,
                   health_checked: bool | None = None, retries: bool = True) -> grpc.Channel:
    """A blocking channel (round robin + retries, see `channel_target` for `target`); TLS with `credentials`
    (see `channel_credentials`). health_checked None: for replica sets only."""
    options = channel_options(is_replica_set(target) if health_checked is None else health_checked, retries)
    target = channel_target(target)
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def create_aio_channel(target: str, credentials: grpc.ChannelCredentials | None = None,
                       health_checked: bool | None = None, retries: bool = True) -> grpc.aio.Channel:
    """An asyncio channel like `create_channel`'s (create it inside the running event loop)."""
    options = channel_options(is_replica_set(target) if health_checked is None else health_checked, retries)
    target = channel_target(target)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def create_stub(channel: grpc.Channel | grpc.aio.Channel) -> pb_grpc.EmbeddingServiceStub:
    return pb_grpc.EmbeddingServiceStub(channel)


# ---- one embedding space per client ----

SPACE_ATTEMPTS = 8  # sends of one call, at most, looking for a replica of the pinned space (or one per replica)


class SpaceMismatchError(RuntimeError):
    """No replica of the client's embedding space answered: the ones left serve another model."""


class SpacePin:
    """The embedding space a client keeps to: the one given, else that of its first Embed/Score reply.

    Vectors of two spaces are not comparable, so a reply from another space (a replica of the other model,
    during a rolling update) is not returned: the call is sent again, and round robin takes it to the next
    replica, up to `attempts` times in all; then SpaceMismatchError names both spaces."""

    def __init__(self, target: str, space: str | None, enabled: bool) -> None:
        self.target, self.space, self.enabled = target, space, enabled
        self.attempts = max(SPACE_ATTEMPTS, len(target.split(","))) if enabled else 1

    def accepts(self, space: str) -> bool:
        if not self.enabled:
            return True
        if self.space is None:
            self.space = space
        return space == self.space

    def mismatch(self, seen: set[str]) -> SpaceMismatchError:
        return SpaceMismatchError(
            f"{self.target}: no replica of embedding space {self.space!r} answered in {self.attempts} attempts "
            f"(replies came from {', '.join(sorted(repr(s) for s in seen))}); the replicas left serve another "
            "model: its vectors are not comparable with this client's")


def remaining_s(give_up: float | None) -> float | None:
    """Seconds left before `give_up` (time.monotonic), at least 1 ms (gRPC then answers DEADLINE_EXCEEDED)."""
    return None if give_up is None else max(0.001, give_up - time.monotonic())


# ---- clients ----

class EmbedClient:
    """Blocking client of one server or of replicas (`target`: see the module docstring).

    `timeout` (seconds) is the default deadline of each call (all its attempts); `api_key` is sent as
    "authorization: Bearer KEY"; `tls_root_cert` (path or PEM bytes) switches the channel to TLS, and
    `tls_cert` + `tls_key` present a client certificate (mutual TLS); `retries=False` sends each call once
    (RETRY_POLICY is off). An API key is never sent in clear text beyond loopback: without TLS to another
    host the constructor raises InsecureKeyError, before any connection, unless `allow_insecure_key`.
    Embed and Score keep to one embedding space (SpacePin): `space`, else that of the first reply;
    `pin_space=False` takes replies of any space."""

    def __init__(self, target: str, timeout: float | None = None, api_key: str | None = None,
                 tls_root_cert: PemSource | None = None, retries: bool = True, *,
                 tls_cert: PemSource | None = None, tls_key: PemSource | None = None,
                 allow_insecure_key: bool = False, space: str | None = None, pin_space: bool = True) -> None:
        self.target = target
        self.pin = SpacePin(target, space, pin_space)
        self.timeout = timeout
        credentials = channel_credentials(tls_root_cert, tls_cert, tls_key)
        check_key_transport(target, bool(api_key), credentials is not None, allow_insecure_key)
        self._metadata = call_metadata(api_key)
        self._channel = create_channel(target, credentials, retries=retries)
        self._stub = create_stub(self._channel)
        # Health questions go on a channel without health checking, which would not ask a replica that
        # is not SERVING (one HOST:PORT: the same channel).
        self._health_channel = (create_channel(target, credentials, health_checked=False)
                                if is_replica_set(target) else self._channel)
        self._health = health_pb2_grpc.HealthStub(self._health_channel)

    def _deadline(self, deadline_s: float | None) -> float | None:
        return self.timeout if deadline_s is None else deadline_s

    def embed(self, texts: Sequence[str], truncate: bool | None = None, normalize: bool = True,
              deadline_s: float | None = None, dimensions: int | None = None,
              input_type: str | None = None, truncation_direction: str = "right", overflow: str | None = None,
              chunk_overlap: int | None = None, output_type: str = "float32") -> EmbedResult:
        """dimensions: the first d values of each vector, renormalised (for a model trained for it); input_type:
        "query" or "document", for a model trained with prompts (ServerInfo.prompts); output_type: float32,
        int8, uint8, binary or ubinary (embedforge/quantize.py)."""
        request = build_embed_request(texts, truncate, normalize, dimensions, input_type, truncation_direction,
                                      overflow, chunk_overlap, output_type)
        return decode_embed_response(self._pinned(self._stub.Embed, request, deadline_s))

    def score(self, query: str, documents: Sequence[str], top_k: int = 0, truncate: bool = True,
              deadline_s: float | None = None, truncation_direction: str = "right") -> ScoreResult:
        request = build_score_request(query, documents, top_k, truncate, truncation_direction)
        return decode_score_response(self._pinned(self._stub.Score, request, deadline_s))

    def _pinned(self, method, request, deadline_s: float | None):
        """The reply of `method` from a replica of the pinned space, all attempts within the call's deadline."""
        deadline = self._deadline(deadline_s)
        give_up = None if deadline is None else time.monotonic() + deadline
        seen = set()
        for _ in range(self.pin.attempts):
            response = method(request, timeout=remaining_s(give_up), metadata=self._metadata)
            if self.pin.accepts(response.embedding_space):
                return response
            seen.add(response.embedding_space)
        raise self.pin.mismatch(seen)

    def info(self) -> ServerInfo:
        return decode_info_response(self._stub.Info(pb.InfoRequest(), timeout=self.timeout,
                                                    metadata=self._metadata))

    def health(self, service: str = "") -> str:
        """Health status name: "SERVING", "NOT_SERVING", ... ("" = the whole server)."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout_s: float, poll_s: float = 0.2) -> None:
        """Block until health says SERVING; raise the last RpcError (or TimeoutError) after `timeout_s`."""
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                if self.health() == "SERVING":
                    return
                failure: Exception = TimeoutError(f"not SERVING after {timeout_s:g} s")
            except grpc.RpcError as error:
                failure = error
            if time.monotonic() >= give_up:
                raise failure
            time.sleep(poll_s)

    def close(self) -> None:
        self._channel.close()
        if self._health_channel is not self._channel:
            self._health_channel.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEmbedClient:
    """asyncio client with the same methods and arguments as EmbedClient (all `async`); create it inside the
    event loop."""

    def __init__(self, target: str, timeout: float | None = None, api_key: str | None = None,
                 tls_root_cert: PemSource | None = None, retries: bool = True, *,
                 tls_cert: PemSource | None = None, tls_key: PemSource | None = None,
                 allow_insecure_key: bool = False, space: str | None = None, pin_space: bool = True) -> None:
        self.target = target
        self.pin = SpacePin(target, space, pin_space)
        self.timeout = timeout
        credentials = channel_credentials(tls_root_cert, tls_cert, tls_key)
        check_key_transport(target, bool(api_key), credentials is not None, allow_insecure_key)
        self._metadata = call_metadata(api_key)
        self._channel = create_aio_channel(target, credentials, retries=retries)
        self._stub = create_stub(self._channel)
        self._health_channel = (create_aio_channel(target, credentials, health_checked=False)
                                if is_replica_set(target) else self._channel)
        self._health = health_pb2_grpc.HealthStub(self._health_channel)

    def _deadline(self, deadline_s: float | None) -> float | None:
        return self.timeout if deadline_s is None else deadline_s

    async def embed(self, texts: Sequence[str], truncate: bool | None = None, normalize: bool = True,
                    deadline_s: float | None = None, dimensions: int | None = None,
                    input_type: str | None = None, truncation_direction: str = "right",
                    overflow: str | None = None, chunk_overlap: int | None = None,
                    output_type: str = "float32") -> EmbedResult:
        request = build_embed_request(texts, truncate, normalize, dimensions, input_type, truncation_direction,
                                      overflow, chunk_overlap, output_type)
        return decode_embed_response(await self._pinned(self._stub.Embed, request, deadline_s))

    async def score(self, query: str, documents: Sequence[str], top_k: int = 0, truncate: bool = True,
                    deadline_s: float | None = None, truncation_direction: str = "right") -> ScoreResult:
        request = build_score_request(query, documents, top_k, truncate, truncation_direction)
        return decode_score_response(await self._pinned(self._stub.Score, request, deadline_s))

    async def _pinned(self, method, request, deadline_s: float | None):
        """As EmbedClient._pinned."""
        deadline = self._deadline(deadline_s)
        give_up = None if deadline is None else time.monotonic() + deadline
        seen = set()
        for _ in range(self.pin.attempts):
            response = await method(request, timeout=remaining_s(give_up), metadata=self._metadata)
            if self.pin.accepts(response.embedding_space):
                return response
            seen.add(response.embedding_space)
        raise self.pin.mismatch(seen)

    async def info(self) -> ServerInfo:
        return decode_info_response(await self._stub.Info(pb.InfoRequest(), timeout=self.timeout,
                                                          metadata=self._metadata))

    async def health(self, service: str = "") -> str:
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self._channel.close()
        if self._health_channel is not self._channel:
            await self._health_channel.close()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
