"""`embedforge loadtest`: drive a running embedforge server over gRPC, or its HTTP API (--target http://HOST:PORT),
and report latency and throughput."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from embedforge.cli_options import ALLOW_INSECURE_KEY_HELP, client_tls_options, option
from embedforge.loadtest.engine import (
    Call,
    CallResult,
    LoadSpec,
    LoadTestError,
    RunResult,
    Workload,
    build_report,
    load_texts,
    parse_batch,
    parse_sweep,
    run_load,
    run_sweep,
    synthetic_texts,
)
from embedforge.net import InsecureKeyError, check_key_transport

DEFAULT_DURATION_S = 10.0
DEFAULT_OPEN_LOOP_IN_FLIGHT = 256
DEFAULT_TOKENS = 32


@dataclass(frozen=True)
class TlsFiles:
    """The client's TLS files: a root certificate verifies the server, a certificate + key prove the client."""

    root_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @property
    def on(self) -> bool:
        return self.root_cert is not None or self.cert is not None


def make_grpc_call(client, rpc: str, deadline_s: float | None) -> Call:
    """Adapt an ``embedforge.client.AsyncEmbedClient`` to the engine's ``call(texts) -> CallResult``.

    For ``score`` the first text is the query and the rest are the documents.
    """
    import grpc

    async def call(texts: list[str]) -> CallResult:
        try:
            if rpc == "embed":
                result = await client.embed(texts, deadline_s=deadline_s)
            else:
                result = await client.score(texts[0], texts[1:], deadline_s=deadline_s)
        except grpc.aio.AioRpcError as exc:
            return CallResult(ok=False, code=exc.code().name, message=exc.details() or "")
        timing = result.timing
        return CallResult(
            ok=True, code="OK", n_texts=len(texts), tokens=result.tokens,
            server_timing={"queue": timing.queue_ms, "tokenize": timing.tokenize_ms,
                           "inference": timing.inference_ms, "total": timing.total_ms},
            embedding_space=result.embedding_space,
        )

    return call


async def _server_info(client, target: str, wait_ready_s: float):
    """The server's Info; first wait up to ``wait_ready_s`` for its health to say SERVING."""
    import grpc

    give_up = time.monotonic() + wait_ready_s
    while True:
        try:
            if wait_ready_s > 0 and await client.health() != "SERVING":
                raise click.ClickException(f"{target} is not SERVING")
            return await client.info()
        except (grpc.aio.AioRpcError, click.ClickException) as exc:
            if time.monotonic() >= give_up:
                reason = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else exc
                raise click.ClickException(f"cannot reach an embedforge server at {target}: {reason}") from None
            await asyncio.sleep(0.2)


def parse_server_timing(header: str) -> dict[str, float]:
    """``queue;dur=0.12, inference;dur=3.4`` (a W3C Server-Timing header) -> {"queue": 0.12, "inference": 3.4}."""
    timing = {}
    for metric in header.split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                timing[name] = float(value)
    return timing


def make_http_call(session, url: str, rpc: str, model: str, deadline_s: float | None) -> Call:
    """Adapt an aiohttp ClientSession on the HTTP API to the engine's ``call(texts) -> CallResult``: embed posts
    /v1/embeddings (base64, as the OpenAI SDK asks by default), score posts /v1/rerank (the first text is the
    query). A failed call's code is ``HTTP <status>``."""
    import aiohttp

    path = "/v1/embeddings" if rpc == "embed" else "/v1/rerank"
    timeout = aiohttp.ClientTimeout(total=deadline_s)

    async def call(texts: list[str]) -> CallResult:
        if rpc == "embed":
            body = {"input": texts, "model": model, "encoding_format": "base64"}
        else:
            body = {"query": texts[0], "documents": texts[1:], "model": model}
        try:
            async with session.post(url + path, json=body, timeout=timeout) as response:
                payload = json.loads(await response.read())
                headers = response.headers
        except asyncio.TimeoutError:
            return CallResult(ok=False, code="DEADLINE_EXCEEDED", message=f"no reply within {deadline_s} s")
        except (aiohttp.ClientError, ValueError) as exc:
            return CallResult(ok=False, code="UNAVAILABLE", message=str(exc))
        if response.status != 200:
            message = payload.get("error", {}).get("message", "") if isinstance(payload, dict) else ""
            return CallResult(ok=False, code=f"HTTP {response.status}", message=message)
        return CallResult(ok=True, code="OK", n_texts=len(texts), tokens=payload["usage"]["total_tokens"],
                          server_timing=parse_server_timing(headers.get("Server-Timing", "")),
                          embedding_space=headers.get("X-Embedding-Space", ""))

    return call


async def _http_server_info(session, url: str, wait_ready_s: float) -> dict:
    """The served model from /v1/models; first wait up to ``wait_ready_s`` for /health to answer 200."""
    import aiohttp

    give_up = time.monotonic() + wait_ready_s
    while True:
        try:
            if wait_ready_s > 0:
                async with session.get(url + "/health") as response:
                    if response.status != 200:
                        raise click.ClickException(f"{url}/health answers {response.status}")
            async with session.get(url + "/v1/models") as response:
                payload = json.loads(await response.read())
                if response.status != 200:
                    raise click.ClickException(f"{url}/v1/models answers {response.status}: "
                                               f"{payload.get('error', {}).get('message', '')}")
                return payload["data"][0]
        except (aiohttp.ClientError, ValueError, KeyError, click.ClickException) as exc:
            if time.monotonic() >= give_up:
                raise click.ClickException(f"cannot reach an embedforge HTTP API at {url}: {exc}") from None
            await asyncio.sleep(0.2)


async def _drive(call: Call, workload: Workload, spec: LoadSpec, sweep: list[int] | None) -> list[RunResult]:
    """One run, or one closed-loop run per --sweep level (progress on stderr)."""
    if sweep is None:
        return [await run_load(call, workload.next_texts, spec)]

    def progress(step: RunResult) -> None:
        p99 = step.latency.get_value_at_percentile(99) / 1000 if step.ok else float("nan")
        click.echo(f"  concurrency {step.spec.concurrency}: {step.ok / step.elapsed_s:.1f} calls/s, "
                   f"p99 {p99:.2f} ms, {sum(step.errors.values())} errors", err=True)

    return await run_sweep(call, workload.next_texts, sweep, spec, on_step=progress)


async def _run_grpc(target: str, rpc: str, deadline_s: float | None, api_key: str | None, tls: TlsFiles,
                    wait_ready_s: float, workload: Workload, spec: LoadSpec,
                    sweep: list[int] | None) -> tuple[dict, list[RunResult]]:
    from embedforge.client import AsyncEmbedClient

    # timeout: the deadline of the Info/health calls; every load call carries --deadline-ms instead.
    # The command has checked where the key may go (allow_insecure_key stands for that check).
    # pin_space=False: the load test counts the replies of each embedding space (report["spaces"]).
    async with AsyncEmbedClient(target, timeout=5.0, api_key=api_key, tls_root_cert=tls.root_cert,
                                tls_cert=tls.cert, tls_key=tls.key, allow_insecure_key=True,
                                pin_space=False) as client:
        info = await _server_info(client, target, wait_ready_s)
        runs = await _drive(make_grpc_call(client, rpc, deadline_s), workload, spec, sweep)
    server = {"model_name": info.model_name, "dim": info.dim, "max_length": info.max_length,
              "precision": info.precision, "provider": info.provider, "server_version": info.server_version}
    return server, runs


async def _run_http(url: str, rpc: str, deadline_s: float | None, api_key: str | None, tls: TlsFiles,
                    wait_ready_s: float, workload: Workload, spec: LoadSpec,
                    sweep: list[int] | None) -> tuple[dict, list[RunResult]]:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ssl_context = None
    if tls.root_cert is not None or tls.cert is not None:
        ssl_context = ssl.create_default_context(cafile=tls.root_cert)
        if tls.cert is not None:
            ssl_context.load_cert_chain(tls.cert, tls.key)
    # One connection per concurrent caller, as each gRPC caller has its own stream.
    connector = aiohttp.TCPConnector(limit=spec.concurrency, ssl=ssl_context if ssl_context else True)
    async with aiohttp.ClientSession(headers=headers, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=5.0)) as session:
        model = await _http_server_info(session, url, wait_ready_s)
        runs = await _drive(make_http_call(session, url, rpc, model["id"], deadline_s), workload, spec, sweep)
    server = {"model_name": model["id"], "dim": model.get("dim"), "max_length": model.get("max_length"),
              "precision": model.get("precision"), "provider": model.get("provider"),
              "server_version": model.get("server_version")}
    return server, runs


def _credentials(target: str, api_key_env: str | None, tls: TlsFiles,
                 allow_insecure_key: bool) -> tuple[str | None, TlsFiles]:
    """The API key to send (from --api-key-env) and the TLS files, once checked: a key goes in clear text only
    to loopback, unless allowed."""
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise click.UsageError(f"--api-key-env: environment variable {api_key_env} is not set or empty")
    if (tls.cert is None) != (tls.key is None):
        raise click.UsageError("a client certificate needs both --tls-cert and --tls-key")
    try:
        check_key_transport(target, bool(api_key), tls.on or target.startswith("https://"), allow_insecure_key)
    except InsecureKeyError as exc:
        raise click.UsageError(str(exc)) from None
    return api_key, tls


@click.command(name="loadtest")
@option("target", metavar="HOST:PORT", help="Address of a running `embedforge serve`: HOST:PORT (gRPC), "
        "replicas HOST:PORT,HOST:PORT,... or dns:///NAME:PORT (gRPC round robin, failed calls retried on another), "
        "or http(s)://HOST:PORT (its HTTP API, `serve --http-port`).")
@option("rpc", type=click.Choice(["embed", "score"]), default="embed",
        help="Call Embed (texts) or Score (one query + --batch documents).")
@option("concurrency", type=click.IntRange(min=1), default=None,
        help="Closed loop: number of concurrent callers [default: 1]. "
             f"With --rate: most calls in flight [default: {DEFAULT_OPEN_LOOP_IN_FLIGHT}].")
@option("rate", type=click.FloatRange(min=0, min_open=True), default=None,
        help="Open loop: calls per second, sent on schedule; latency is measured from the scheduled time.")
@option("duration", type=click.FloatRange(min=0, min_open=True), default=None,
        help=f"Seconds to measure (after warmup) [default: {DEFAULT_DURATION_S:g} unless --requests].")
@option("requests", type=click.IntRange(min=1), default=None,
        help="Measured calls to send (stops at whichever of --duration/--requests comes first).")
@option("warmup", type=click.FloatRange(min=0), default=1.0,
        help="Seconds of load before measuring starts.")
@option("batch", default="1", help="Texts per call: a number (8) or a range (1-16).")
@option("data", type=click.Path(exists=True, dir_okay=False), default=None,
        help="Texts from a pair file (.json/.jsonl) or a text file with one text per line.")
@option("tokens", type=click.IntRange(min=3), default=None,
        help=f"Synthetic texts of exactly this many tokens [default without --data: {DEFAULT_TOKENS}].")
@option("deadline_ms", type=click.FloatRange(min=0, min_open=True), default=10000.0,
        help="Deadline of each call.")
@option("api_key_env", metavar="NAME", default=None,
        help="Environment variable holding the server's API key.")
@client_tls_options
@option("allow_insecure_key", is_flag=True, help=ALLOW_INSECURE_KEY_HELP)
@option("wait_ready", type=click.FloatRange(min=0), default=0.0,
        help="Seconds to wait for the server's health to report SERVING before starting.")
@option("sweep", metavar="C1,C2,...", default=None,
        help="Closed-loop concurrency levels, one measured step each: the latency-throughput curve.")
@option("seed", type=int, default=0, help="Seed of the text and batch-size draws.")
@option("output", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@option("plot", type=click.Path(dir_okay=False), default=None, help="Draw the report as PNG.")
@option("compare", nargs=2, type=click.Path(exists=True, dir_okay=False), default=None,
        metavar="A.json B.json", help="Print two JSON reports side by side with ratios (no load is sent).")
def loadtest_command(target: str | None, rpc: str, concurrency: int | None, rate: float | None,
                     duration: float | None, requests: int | None, warmup: float, batch: str, data: str | None,
                     tokens: int | None, deadline_ms: float, api_key_env: str | None, tls_root_cert: Path | None,
                     tls_cert: Path | None, tls_key: Path | None, allow_insecure_key: bool, wait_ready: float,
                     sweep: str | None, seed: int, output: str | None, plot: str | None,
                     compare: tuple[str, str] | None) -> None:
    """Load-test a running embedforge server over gRPC or HTTP: closed loop (--concurrency), open loop (--rate)
    or a --sweep.

    Example: embedforge loadtest --target 127.0.0.1:50051 --rate 50 --batch 1-16 --duration 10 --plot lt.png
    """
    from embedforge.client import channel_target
    from embedforge.loadtest import report as report_io

    try:
        if compare is not None:
            a, b = (report_io.read_json(path) for path in compare)
            click.echo(report_io.format_compare(a, b, compare[0], compare[1]))
            return
        if not target:
            raise click.UsageError("--target HOST:PORT is required (or --compare A.json B.json)")
        try:
            channel_target(target)
        except ValueError as exc:
            raise click.UsageError(f"--target: {exc}") from None
        if sweep is not None and (rate is not None or concurrency is not None):
            raise click.UsageError("--sweep sets the concurrency of each step; drop --rate/--concurrency")
        if data is not None and tokens is not None:
            raise click.UsageError("use --data or --tokens, not both")
        levels = parse_sweep(sweep) if sweep is not None else None
        if concurrency is None:
            concurrency = DEFAULT_OPEN_LOOP_IN_FLIGHT if rate is not None else 1
        if duration is None and requests is None:
            duration = DEFAULT_DURATION_S
        spec = LoadSpec(concurrency=concurrency, rate=rate, duration_s=duration, requests=requests, warmup_s=warmup)
        batch_range = parse_batch(batch)
        if data is not None:
            texts = load_texts(data)
            texts_desc = f"{data} ({len(texts)} distinct)"
        else:
            tokens = tokens or DEFAULT_TOKENS
            texts = synthetic_texts(tokens, seed=seed)
            texts_desc = f"synthetic, {tokens} tokens each"
        workload = Workload(texts, batch_range, rpc, seed=seed)
    except LoadTestError as exc:
        raise click.ClickException(str(exc)) from None

    api_key, tls = _credentials(target, api_key_env, TlsFiles(tls_root_cert, tls_cert, tls_key), allow_insecure_key)

    protocol = "http" if target.startswith(("http://", "https://")) else "grpc"
    config = {
        "target": target, "protocol": protocol, "rpc": rpc, "batch": batch, "texts": texts_desc,
        "deadline_ms": deadline_ms,
        "seed": seed, "tls": tls.on or target.startswith("https://"), "client_cert": tls.cert is not None,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "client_cpus": os.cpu_count(), "python": sys.version.split()[0],
    }
    run = _run_http if protocol == "http" else _run_grpc
    server, runs = asyncio.run(run(target.rstrip("/"), rpc, deadline_ms / 1000.0, api_key, tls, wait_ready,
                                   workload, spec, levels))
    config["server"] = server
    report = build_report(config, runs, sweep=levels is not None)
    click.echo(report_io.format_report(report))
    if output:
        report_io.write_json(report, output)
        click.echo(f"report: {Path(output)}", err=True)
    if plot:
        report_io.write_plot(report, plot)
        click.echo(f"plot: {Path(plot)}", err=True)
    if not any(run.ok for run in runs):
        raise click.ClickException("no call succeeded (see the errors above)")
