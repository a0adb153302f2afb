"""`ServeConfig`: the one source of every serving default (the `serve` command, `EmbeddingServer`, the Batcher).

A field left at None is chosen by `resolved` for the execution provider and this machine's cores, the same
way for the command line and for code that builds an `EmbeddingServer` itself.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

# On CPU, padding costs more than small batches do (STS-B, 16 callers x 8 texts: 15% padded tokens at 256,
# 4% at 128, under 1% at 64; but one thread embeds a text in 2.76 ms in batches of 4 against 2.42 ms in
# batches of 16): 128 served the most texts/s.
MIN_BATCH_TOKENS_CPU = 128
MIN_BATCH_TOKENS_CUDA = 256
MAX_CPU_WORKERS = 4  # default workers on CPU: min(cores, 4)
QUEUE_BATCHES = 32  # default max_queue_tokens = 32 x max_batch_tokens: room for max_texts_per_request x max_length
MAX_REQUEST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (EmbeddingServer.start() returns it)
    http_port: int | None = None  # the OpenAI-compatible HTTP API; None: off, 0: any free port
    precision: str = "auto"  # auto: fp16 on CUDA, else fp32
    provider: str = "auto"  # auto: CUDA when available
    threads: int | None = None  # intra-op threads of a batch that runs alone; None: all cores
    workers: int | None = None  # model batches run at once; None: 1 on CUDA, else min(cores, MAX_CPU_WORKERS)
    max_batch_tokens: int = 16384  # token budget of one model batch (batch size x longest text)
    min_batch_tokens: int | None = None  # None: MIN_BATCH_TOKENS_CPU or MIN_BATCH_TOKENS_CUDA
    max_wait_ms: float = 2.0  # longest wait to fill a batch while busy
    max_queue_tokens: int | None = None  # None: QUEUE_BATCHES x max_batch_tokens
    max_texts_per_request: int = 1024
    max_chars_per_text: int = 20000
    max_request_bytes: int = MAX_REQUEST_BYTES  # largest gRPC message or HTTP body (HTTP 413 beyond it)
    allow_any_dimensions: bool = False  # accept `dimensions` for a model not trained for it (lossy)
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    grace_s: float = 10.0  # on drain, time given to in-flight calls
    tls_cert: Path | None = None
    tls_key: Path | None = None
    api_key_env: str = "EMBEDFORGE_API_KEY"  # where the command line reads api_key from
    api_key: str | None = None  # None: no authentication
    log_level: str = "info"

    def resolved(self, on_cuda: bool, cores: int | None = None) -> ServeConfig:
        """A copy with every None (automatic) setting chosen for the provider and `cores` (default: this machine's)."""
        cores = cores or os.cpu_count() or 1
        return dataclasses.replace(
            self,
            threads=self.threads or cores,
            workers=self.workers or (1 if on_cuda else min(cores, MAX_CPU_WORKERS)),
            min_batch_tokens=self.min_batch_tokens or (MIN_BATCH_TOKENS_CUDA if on_cuda else MIN_BATCH_TOKENS_CPU),
            max_queue_tokens=self.max_queue_tokens or QUEUE_BATCHES * self.max_batch_tokens,
        )
