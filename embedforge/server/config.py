"""`ServeConfig`: the one source of every serving default (the `serve` command, `EmbeddingServer`, the Batcher).

A field left at None is chosen by `resolved` for the execution provider and this machine's cores, the same
way for the command line and for code that builds an `EmbeddingServer` itself.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

# On CPU, padding costs more than small batches save: a batch is closed at fewer real tokens than on CUDA
# (chosen with benchmarks/serve_throughput.py on short STS-B texts).
MIN_BATCH_TOKENS_CPU = 128
MIN_BATCH_TOKENS_CUDA = 256
# A batch's working memory grows with its tokens and, through attention, with batch x length^2; a CPU runs
# `workers` batches at once, so it gets the smaller budget (8 x 512 tokens: faster per text than wider batches,
# in a fraction of the memory; benchmarks/batch_memory.py).
MAX_BATCH_TOKENS_CPU = 4096
MAX_BATCH_TOKENS_CUDA = 16384
MAX_CPU_WORKERS = 4  # default workers on CPU: min(cores, 4)
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # as gRPC's own default receive limit; a larger request is refused: send parts
PENDING_BODIES = 64  # default max_pending_bytes: this many of the largest bodies
QUEUE_BATCHES = 32  # default max_queue_tokens without a known max_length: 32 x max_batch_tokens
QUEUE_REQUESTS = 4  # default max_queue_tokens = 4 maximal requests, so one request holds at most a quarter of it
UTF8_MAX_BYTES = 4  # bytes of one character in UTF-8, at most
FIELD_OVERHEAD_BYTES = 16  # protobuf tag + length of one string field, with room to spare
MESSAGE_OVERHEAD_BYTES = 1024  # the request's other (small) fields
TOKENIZE_SLICE_TEXTS = 32  # a large request is tokenized this many texts at a time (a few ms), so that other
# requests' slices run in between


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (EmbeddingServer.start() returns it)
    http_port: int | None = None  # the OpenAI-compatible HTTP API; None: off, 0: any free port
    precision: str = "auto"  # auto: fp16 on CUDA, else fp32
    provider: str = "auto"  # auto: CUDA when available
    threads: int | None = None  # intra-op threads of a batch that runs alone; None: all cores
    workers: int | None = None  # model batches run at once; None: 1 on CUDA, else min(cores, MAX_CPU_WORKERS)
    max_batch_tokens: int | None = None  # token budget of one model batch (batch size x longest text); None:
    # MAX_BATCH_TOKENS_CPU or MAX_BATCH_TOKENS_CUDA
    min_batch_tokens: int | None = None  # None: MIN_BATCH_TOKENS_CPU or MIN_BATCH_TOKENS_CUDA
    max_wait_ms: float = 2.0  # longest wait to fill a batch while busy
    max_queue_tokens: int | None = None  # None: QUEUE_REQUESTS maximal requests (see queue_tokens_for)
    max_texts_per_request: int = 1024
    max_chars_per_text: int = 20000
    max_request_bytes: int = MAX_REQUEST_BYTES  # largest gRPC message or HTTP body (see max_receive_bytes)
    allow_any_dimensions: bool = False  # accept `dimensions` for a model not trained for it (lossy)
    overflow: str = "truncate"  # a text over max_length that names no policy: truncate, error or chunk
    chunk_overlap: int = 64  # tokens shared by neighbouring windows of a chunked text
    # Bytes of request bodies held until their texts are tokens (server/admission.py); None: PENDING_BODIES
    # of the largest bodies.
    max_pending_bytes: int | None = None
    body_timeout_s: float = 5.0  # a request body must arrive within this, or the call is dropped
    default_deadline_s: float = 30.0  # deadline of a call that brings none (HTTP calls, gRPC without one)
    tokenizer_threads: int = 2  # so that one huge request never holds up the others
    max_failures: int = 5  # batch failures in a row before health reports NOT_SERVING (back after a success)
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    reflection: bool = True
    grace_s: float = 10.0  # on drain, time given to in-flight calls; the whole stop is bounded by it
    # Connections (client-side load balancing relies on them): after max_connection_age_s a connection is
    # closed (GOAWAY; its calls get max_connection_age_grace_s to finish) and the client reconnects, possibly
    # to a replica added since. None: connections live as long as the client keeps them.
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 10.0
    keepalive_time_s: float = 60.0  # ping a client after this long without traffic ...
    keepalive_timeout_s: float = 20.0  # ... and close the connection when no answer comes within this
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: require client certificates signed by this CA
    api_key_env: str = "EMBEDFORGE_API_KEY"  # where the command line reads api_key from
    api_key: str | None = field(default=None, repr=False)  # None: no authentication; compared stripped
    allow_insecure_key: bool = False  # allow an API key without TLS on a non-loopback address
    log_level: str = "info"

    @property
    def max_receive_bytes(self) -> int:
        """The largest request body accepted over either protocol: the largest within the limits (a Score:
        query + max_texts_per_request documents of max_chars_per_text 4-byte characters), at most
        max_request_bytes, and at most max_pending_bytes (a body the byte budget could never take)."""
        per_text = self.max_chars_per_text * UTF8_MAX_BYTES + FIELD_OVERHEAD_BYTES
        largest = min(self.max_request_bytes, (self.max_texts_per_request + 1) * per_text + MESSAGE_OVERHEAD_BYTES)
        return largest if self.max_pending_bytes is None else min(largest, self.max_pending_bytes)

    def queue_tokens_for(self, max_length: int) -> int:
        """Default queue: QUEUE_REQUESTS maximal requests (max_texts_per_request + 1 texts of max_length)."""
        return QUEUE_REQUESTS * (self.max_texts_per_request + 1) * max_length

    def resolved(self, on_cuda: bool, cores: int | None = None, max_length: int | None = None) -> ServeConfig:
        """A copy with every None (automatic) setting chosen for the provider, `cores` (default: this machine's)
        and the model's max_length (None: unknown, the queue holds QUEUE_BATCHES full batches)."""
        cores = cores or os.cpu_count() or 1
        batch_tokens = self.max_batch_tokens or (MAX_BATCH_TOKENS_CUDA if on_cuda else MAX_BATCH_TOKENS_CPU)
        queue = QUEUE_BATCHES * batch_tokens if max_length is None else self.queue_tokens_for(max_length)
        workers = self.workers or (1 if on_cuda else min(cores, MAX_CPU_WORKERS))
        return dataclasses.replace(
            self,
            threads=self.threads or cores,
            workers=workers,
            max_batch_tokens=batch_tokens,
            min_batch_tokens=self.min_batch_tokens or (MIN_BATCH_TOKENS_CUDA if on_cuda else MIN_BATCH_TOKENS_CPU),
            max_queue_tokens=self.max_queue_tokens or queue,
            max_pending_bytes=self.max_pending_bytes or PENDING_BODIES * self.max_receive_bytes,
        )
