"""`embedforge serve` (gRPC server over an ONNX export), `embedforge embed` and `embedforge health` (clients)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from embedforge.cli_options import ALLOW_INSECURE_KEY_HELP, client_tls_options, option
from embedforge.quantize import OUTPUT_TYPES
from embedforge.server.config import (
    MAX_BATCH_TOKENS_CPU,
    MAX_BATCH_TOKENS_CUDA,
    MAX_CPU_WORKERS,
    MIN_BATCH_TOKENS_CPU,
    MIN_BATCH_TOKENS_CUDA,
    PENDING_BODIES,
    QUEUE_REQUESTS,
    TOKENIZE_SLICE_TEXTS,
    ServeConfig,
)

DEFAULTS = ServeConfig()
SERVE_EPILOG = """Example: embedforge serve --save-path ./output/vector_model --port 50051 --http-port 8080
--metrics-port 9100"""


def _resolve_model_dir(model_dir: Path | None, save_path: Path | None) -> Path:
    if (model_dir is None) == (save_path is None):
        raise click.UsageError("give exactly one of --model-dir EXPORT_DIR or --save-path DIR")
    if model_dir is None:
        model_dir = save_path / "export"
        if not (model_dir / "manifest.json").is_file():
            raise click.ClickException(f"{model_dir}: no export found; run `embedforge export --save-path "
                                       f"{save_path}` first")
    elif not (model_dir / "manifest.json").is_file():
        raise click.ClickException(f"{model_dir}: no manifest.json; --model-dir must be the output of "
                                   "`embedforge export`")
    return model_dir


@click.command(name="serve", epilog=SERVE_EPILOG)
@option("model_dir", type=click.Path(path_type=Path, file_okay=False),
        help="Export directory (manifest.json + model.onnx + tokenizer).")
@option("save_path", type=click.Path(path_type=Path, file_okay=False),
        help="Training output directory; serves its export (<save-path>/export).")
@option("host", default=DEFAULTS.host, help="Address to bind.")
@option("port", default=DEFAULTS.port, type=click.IntRange(0, 65535), help="gRPC port.")
@option("http_port", type=click.IntRange(0, 65535), default=DEFAULTS.http_port,
        help="Also serve the OpenAI-compatible HTTP API (/v1/embeddings, /v1/rerank, /v1/models, /health, "
        "/metrics) on this port, same host, TLS and API key [default: off].")
@option("allow_any_dimensions", is_flag=True, default=DEFAULTS.allow_any_dimensions,
        help="Accept `dimensions` (truncated, renormalised vectors) for a model whose export records no "
        "matryoshka_dims. Lossy: a model not trained for it ranks worse on truncated vectors.")
@option("precision", type=click.Choice(["auto", "fp32", "int8", "fp16"]), default=DEFAULTS.precision,
        help="Which exported model; auto = fp16 on CUDA, else fp32.")
@option("provider", type=click.Choice(["auto", "cpu", "cuda"]), default=DEFAULTS.provider,
        help="ONNX Runtime execution provider; auto = CUDA when available.")
@option("threads", type=click.IntRange(1), default=DEFAULTS.threads,
        help="Intra-op threads of a batch that runs alone [default: all cores]; batches that overlap "
        "use threads / workers each.")
@option("workers", type=click.IntRange(1), default=DEFAULTS.workers,
        help=f"Model batches that may run at once [default: 1 on CUDA, else min(cores, {MAX_CPU_WORKERS})].")
@option("max_batch_tokens", type=click.IntRange(1), default=DEFAULTS.max_batch_tokens,
        help="Token budget of one model batch (batch size x longest text); its working memory grows with it "
        f"[default: {MAX_BATCH_TOKENS_CPU} on CPU, {MAX_BATCH_TOKENS_CUDA} on CUDA].")
@option("min_batch_tokens", type=click.IntRange(1), default=DEFAULTS.min_batch_tokens,
        help="A batch with this many real tokens is closed rather than padded wider by a longer text "
        "(lower: less padding; higher: fewer, larger batches) "
        f"[default: {MIN_BATCH_TOKENS_CPU} on CPU, {MIN_BATCH_TOKENS_CUDA} on CUDA].")
@option("max_wait_ms", type=click.FloatRange(0), default=DEFAULTS.max_wait_ms,
        help="Longest wait to fill a batch while busy (no wait when idle).")
@option("max_queue_tokens", type=click.IntRange(1), default=DEFAULTS.max_queue_tokens,
        help=f"Queued tokens before RESOURCE_EXHAUSTED [default: {QUEUE_REQUESTS} maximal requests, "
        "(max-texts-per-request + 1) x max_length each; one request holds at most one such share].")
@option("overflow", type=click.Choice(["truncate", "error", "chunk"]), default=DEFAULTS.overflow,
        help="A text over max_length, when its call names no policy: cut it, refuse it, or embed it in windows of "
        "max_length tokens (the mean of their vectors).")
@option("chunk_overlap", type=click.IntRange(0), default=DEFAULTS.chunk_overlap,
        help="Tokens shared by neighbouring windows of a chunked text.")
@option("max_texts_per_request", type=click.IntRange(1), default=DEFAULTS.max_texts_per_request)
@option("max_chars_per_text", type=click.IntRange(1), default=DEFAULTS.max_chars_per_text)
@option("max_request_bytes", type=click.IntRange(1), default=DEFAULTS.max_request_bytes,
        help="Largest request body over either protocol (gRPC RESOURCE_EXHAUSTED, HTTP 413 beyond it).")
@option("max_pending_bytes", type=click.IntRange(1), default=DEFAULTS.max_pending_bytes,
        help="Bytes of request bodies held until their texts are tokens (a gRPC body counts at the largest size "
        "until it has arrived); a call beyond it gets RESOURCE_EXHAUSTED / 429 at once "
        f"[default: {PENDING_BODIES} of the largest bodies].")
@option("body_timeout_s", type=click.FloatRange(0, min_open=True), default=DEFAULTS.body_timeout_s,
        help="A request body must arrive within this; a stalled one is dropped (gRPC DEADLINE_EXCEEDED, HTTP 408).")
@option("default_deadline_s", type=click.FloatRange(0, min_open=True), default=DEFAULTS.default_deadline_s,
        help="Deadline of a call that brings none (HTTP, gRPC without a timeout): a call whose deadline cannot be "
        "met behind the queued work is refused at once with a retry hint.")
@option("tokenizer_threads", type=click.IntRange(1), default=DEFAULTS.tokenizer_threads,
        help=f"Threads tokenizing large requests (in slices of {TOKENIZE_SLICE_TEXTS} texts).")
@option("max_failures", type=click.IntRange(1), default=DEFAULTS.max_failures,
        help="Failed model batches in a row before health reports NOT_SERVING (SERVING again after a success).")
@option("metrics_host", default=DEFAULTS.metrics_host, help="Address of the metrics endpoint.")
@option("metrics_port", type=click.IntRange(0, 65535), default=DEFAULTS.metrics_port,
        help="Serve Prometheus metrics on this port (of --metrics-host).")
@option("no_reflection", is_flag=True, help="Do not serve gRPC server reflection.")
@option("grace_s", type=click.FloatRange(0), default=DEFAULTS.grace_s,
        help="On SIGTERM/SIGINT, time given to in-flight calls; the stop takes about this long at most, even if "
        "a batch hangs (then the exit status is 1).")
@option("max_connection_age_s", type=click.FloatRange(0, min_open=True), default=DEFAULTS.max_connection_age_s,
        help="Close each client connection after this long (clients reconnect and spread over replicas added "
        "since) [default: never].")
@option("max_connection_age_grace_s", type=click.FloatRange(0), default=DEFAULTS.max_connection_age_grace_s,
        help="Time calls on a connection closed for age get to finish.")
@option("keepalive_time_s", type=click.FloatRange(0, min_open=True), default=DEFAULTS.keepalive_time_s,
        help="Ping a client connection after this long without traffic.")
@option("keepalive_timeout_s", type=click.FloatRange(0, min_open=True), default=DEFAULTS.keepalive_timeout_s,
        help="Close a connection whose ping is not answered within this.")
@option("tls_cert", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=DEFAULTS.tls_cert)
@option("tls_key", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=DEFAULTS.tls_key)
@option("tls_client_ca", type=click.Path(path_type=Path, dir_okay=False, exists=True),
        default=DEFAULTS.tls_client_ca, help="Mutual TLS: require client certificates signed by this CA (PEM).")
@option("api_key_env", default=None, show_default=False,
        help=f"Environment variable holding the API key; calls without it are UNAUTHENTICATED. Given, the "
        f"variable must be set and non-empty (unless --no-auth). Not given: {DEFAULTS.api_key_env} if set.")
@option("no_auth", is_flag=True, help="Serve without an API key, whatever the environment holds.")
@option("allow_insecure_key", is_flag=True,
        help="Allow an API key without TLS on a non-loopback address (the key travels in clear text).")
@option("log_level", type=click.Choice(["debug", "info", "warning", "error"]), default=DEFAULTS.log_level)
def serve_command(model_dir: Path | None, save_path: Path | None, api_key_env: str | None, no_auth: bool,
                  no_reflection: bool, **settings: Any) -> None:
    """Serve an exported model over gRPC (Embed, Score, Info, health, reflection) and, with --http-port, the
    OpenAI-compatible HTTP API."""
    from embedforge.server.app import check_security, run_server
    from embedforge.server.memory import bound_malloc
    from embedforge.server.runtime import PROVIDERS, OnnxEmbedder, RuntimeConfigError, choose_provider, read_manifest

    config = ServeConfig(api_key_env=api_key_env or DEFAULTS.api_key_env,
                         api_key=_api_key(api_key_env, no_auth), reflection=not no_reflection, **settings)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    directory = _resolve_model_dir(model_dir, save_path)
    try:
        check_security(config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        max_length = int(read_manifest(directory)["max_length"])
        config = config.resolved(on_cuda=choose_provider(config.provider) == PROVIDERS["cuda"], max_length=max_length)
    except RuntimeConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if config.max_batch_tokens < max_length:
        raise click.UsageError(f"--max-batch-tokens {config.max_batch_tokens} is below the model's max_length "
                               f"{max_length}; one long text would not fit in a batch")
    bound_malloc()
    try:
        finished = run_server(lambda: OnnxEmbedder(directory, precision=config.precision, provider=config.provider,
                                                   threads=config.threads, workers=config.workers), config)
    except RuntimeConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if finished is False:
        click.echo(f"error: a model batch still ran {config.grace_s} s after SIGTERM; exiting without it", err=True)
        sys.stderr.flush()
        os._exit(1)  # the hung batch's thread would keep a normal exit waiting forever


def _api_key(api_key_env: str | None, no_auth: bool) -> str | None:
    """The API key to require (stripped), or None. A variable named with --api-key-env must hold one."""
    if no_auth:
        return None
    key = os.environ.get(api_key_env or DEFAULTS.api_key_env, "").strip()
    if api_key_env is not None and not key:
        raise click.UsageError(f"--api-key-env {api_key_env}: the variable is unset or empty; set it, or give "
                               "--no-auth to serve without authentication")
    return key or None


TARGET_HELP = "Server HOST:PORT, replicas HOST:PORT,HOST:PORT,... (round robin, failover) or dns:///NAME:PORT."


@click.command(name="embed")
@option("target", default=f"{DEFAULTS.host}:{DEFAULTS.port}", help=TARGET_HELP)
@click.argument("texts", nargs=-1, required=True)
@option("json", "as_json", is_flag=True, help="Print one JSON object instead of one vector per line.")
@option("no_truncate", is_flag=True, help="Fail on texts longer than the model's max_length.")
@option("no_normalize", is_flag=True,
        help="Return vectors without L2 normalisation (the pooled, projected model output).")
@option("dimensions", type=click.IntRange(1), default=None,
        help="Only the first N values of each vector, renormalised (a model trained for it: see Info).")
@option("input_type", type=click.Choice(["query", "document"]), default=None, show_default=False,
        help="What the texts are: the model's prompt of that kind is prefixed (a model trained with prompts).")
@option("output_type", type=click.Choice(OUTPUT_TYPES), default="float32",
        help="float32 vectors, or codes: int8/uint8 (calibrated at export), binary/ubinary (packed sign bits).")
@option("timeout", type=click.FloatRange(0, min_open=True), default=30.0)
@option("api_key_env", default=DEFAULTS.api_key_env, help="Environment variable holding the API key to send, if set.")
@client_tls_options
@option("allow_insecure_key", is_flag=True, help=ALLOW_INSECURE_KEY_HELP)
@option("wait_ready", type=click.FloatRange(0), default=0.0,
        help="Seconds to wait for the server's health to report SERVING first.")
def embed_command(target: str, texts: tuple[str, ...], as_json: bool, no_truncate: bool, no_normalize: bool,
                  dimensions: int | None, input_type: str | None, output_type: str, timeout: float, api_key_env: str,
                  tls_root_cert: Path | None, tls_cert: Path | None, tls_key: Path | None, allow_insecure_key: bool,
                  wait_ready: float) -> None:
    """Embed TEXTS with a running server; prints one vector per line (space-separated floats)."""
    import grpc

    from embedforge.client import EmbedClient

    try:
        with EmbedClient(target, timeout=timeout, api_key=os.environ.get(api_key_env) or None,
                         tls_root_cert=tls_root_cert, tls_cert=tls_cert, tls_key=tls_key,
                         allow_insecure_key=allow_insecure_key) as client:
            if wait_ready > 0:
                client.wait_until_serving(wait_ready)
            result = client.embed(list(texts), truncate=not no_truncate, normalize=not no_normalize,
                                  dimensions=dimensions, input_type=input_type, output_type=output_type)
    except grpc.RpcError as exc:
        raise click.ClickException(f"{target}: {exc.code().name}: {exc.details()}") from exc
    except (TimeoutError, ValueError) as exc:
        raise click.ClickException(f"{target}: {exc}") from exc
    if as_json:
        click.echo(json.dumps({"dim": result.dim, "tokens": result.tokens, "embedding_space": result.embedding_space,
                               "output_type": result.output_type, "vectors": result.vectors.tolist()}))
    else:
        click.echo(f"embedding_space {result.embedding_space}", err=True)
        for vector in result.vectors:
            click.echo(" ".join(f"{x:.6g}" if output_type == "float32" else str(x) for x in vector.tolist()))


@click.command(name="health", epilog="Example: embedforge health --target 127.0.0.1:50051 && echo ready")
@option("target", default=f"{DEFAULTS.host}:{DEFAULTS.port}",
        help="Server HOST:PORT; with a list HOST:PORT,HOST:PORT,... every one of them is asked.")
@option("service", default="", show_default=False, help="Service to ask about [default: the whole server].")
@option("timeout", type=click.FloatRange(0, min_open=True), default=3.0, help="Deadline of each check in seconds.")
@client_tls_options
def health_command(target: str, service: str, timeout: float, tls_root_cert: Path | None, tls_cert: Path | None,
                   tls_key: Path | None) -> None:
    """Ask the gRPC health service; exit 0 only when every server asked reports SERVING, else 1.

    Meant for container health checks and scripts: prints "TARGET STATUS" per server.
    """
    import grpc

    from embedforge.client import EmbedClient

    # Replicas are asked one by one: a round-robin channel would answer for whichever replica it picked.
    targets = [t.strip() for t in target.split(",")] if "://" not in target else [target]
    healthy = True
    for one in targets:
        try:
            with EmbedClient(one, timeout=timeout, tls_root_cert=tls_root_cert, tls_cert=tls_cert,
                             tls_key=tls_key) as client:
                status = client.health(service)
        except grpc.RpcError as exc:
            status = f"{exc.code().name}: {exc.details()}"
        except ValueError as exc:  # a bad target, or a client certificate without its key
            raise click.UsageError(str(exc)) from exc
        click.echo(f"{one} {status}")
        healthy = healthy and status == "SERVING"
    if not healthy:
        sys.exit(1)
