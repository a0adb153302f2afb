"""`embedforge embed-corpus`: embed every text of a corpus into Parquet shards, on one machine or with Ray."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from embedforge.cli_options import ALLOW_INSECURE_KEY_HELP, client_tls_options, option
from embedforge.corpus import INPUT_TYPES
from embedforge.corpus.job import CorpusJob
from embedforge.corpus.vectors import CHUNK_OVERLAP, OVERFLOWS
from embedforge.quantize import OUTPUT_TYPES

EPILOG = """Examples:

\b
  embedforge embed-corpus --model-dir ./output/vector_model/export --input docs.jsonl --output ./vectors
  embedforge embed-corpus --model-dir EXPORT --input 'corpus/*.jsonl' --id-field doc_id --output ./vectors
  embedforge embed-corpus --model-dir EXPORT --input docs.jsonl --input-type document --output ./vectors
  embedforge embed-corpus --model-dir EXPORT --input 'corpus/*.txt' --output ./vectors --ray auto --ray-actors 8
"""


@click.command(name="embed-corpus", epilog=EPILOG)
@option("model_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
        help="Export directory (embedforge export).")
@option("input", "inputs", multiple=True, required=True, metavar="PATH",
        help="Input file or quoted glob ('docs/*.jsonl', '**' works); repeat for several.")
@option("output", type=click.Path(path_type=Path, file_okay=False), required=True,
        help="Output directory: part-NNNNN.parquet shards and _manifest.json. Rerun with the same arguments to "
        "continue a killed job.")
@option("text_field", default="document", help="JSONL field holding the text.")
@option("id_field", default=None, show_default=False,
        help="JSONL field holding the record's id (string or integer) [default: <file name>:<line>].")
@option("format", "input_format", type=click.Choice(["auto", "jsonl", "text"]), default="auto",
        help="auto: .jsonl/.ndjson/.json files are JSONL, others plain text (one text a line).")
@option("skip_bad", is_flag=True, help="Leave out lines that are not JSON, lack a field or hold an empty text "
        "(counted and listed in the manifest) instead of stopping.")
@option("overflow", type=click.Choice(OVERFLOWS), default="truncate",
        help="A text longer than the model's max_length: truncate it, stop the job (error), or chunk it into "
        "windows of max_length tokens, one row each, with its chunk_index and its characters [char_start, "
        "char_end) in the text.")
@option("chunk_overlap", type=click.IntRange(0), default=CHUNK_OVERLAP, help="--overflow chunk: tokens shared by "
        "neighbouring windows.")
@option("chunk_tokens", type=click.IntRange(1), default=None, show_default=False,
        help="--overflow chunk: tokens per window, special tokens included; texts longer than this are chunked. "
        "Smaller windows let one passage stand out (see docs/corpus.md) [default: the model's max_length].")
@option("no_truncate", is_flag=True, help="The same as --overflow error.")
@option("precision", type=click.Choice(["auto", "fp32", "int8", "fp16"]), default="auto",
        help="Which exported model; auto = fp16 on CUDA, else fp32.")
@option("provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
        help="ONNX Runtime execution provider; auto = CUDA when available.")
@option("threads", type=click.IntRange(1), default=None, show_default=False,
        help="Intra-op threads of the session (single-machine run) [default: all cores].")
@option("dimensions", type=click.IntRange(1), default=None, show_default=False,
        help="Write the first N dimensions, renormalised (Matryoshka; only for exports that declare "
        "matryoshka_dims) [default: the model's dim].")
@option("shard_size", type=click.IntRange(1), default=CorpusJob.shard_size,
        help="Texts per Parquet shard; also the chunk sorted by length, and what a restart may redo.")
@option("max_batch_tokens", type=click.IntRange(1), default=CorpusJob.max_batch_tokens,
        help="Padded tokens per model batch (texts x longest text).")
@option("max_batch_size", type=click.IntRange(1), default=CorpusJob.max_batch_size, help="Texts per model batch.")
@option("ray", "ray_address", default=None, show_default=False, metavar="auto|ADDRESS",
        help="Run with Ray Data: auto = RAY_ADDRESS or a running local instance, else a new local one; or a "
        "cluster address (head:6379, ray://head:10001).")
@option("ray_actors", type=click.IntRange(1), default=None, show_default=False,
        help="Embedding actors (one ONNX Runtime session each) [default: cluster CPUs / --ray-actor-threads].")
@option("ray_actor_threads", type=click.IntRange(1), default=1, help="Intra-op threads of each actor's session.")
@option("input_type", type=click.Choice(INPUT_TYPES), default=None, show_default=False,
        help="What the texts are: each gets the model's prompt for that input type (manifest.json `prompts`, "
        "set by `train --query-prompt/--document-prompt`), which counts towards max_length [default: no prompt].")
@option("output_type", type=click.Choice(OUTPUT_TYPES), default="float32",
        help="The vector column's type: float32, or codes of the normalised vectors: int8/uint8 (per-dimension "
        "ranges calibrated at export; full dimensions), binary/ubinary (sign bits, 8 per byte).")
@option("no_progress", is_flag=True, help="No progress bar (it shows texts/s and the ETA).")
def embed_corpus_command(model_dir: Path, inputs: tuple[str, ...], output: Path, text_field: str,
                         id_field: str | None, input_format: str, skip_bad: bool, overflow: str, chunk_overlap: int,
                         chunk_tokens: int | None,
                         no_truncate: bool, precision: str,
                         provider: str, threads: int | None, dimensions: int | None, shard_size: int,
                         max_batch_tokens: int, max_batch_size: int, ray_address: str | None,
                         ray_actors: int | None, ray_actor_threads: int, input_type: str | None,
                         output_type: str, no_progress: bool) -> None:
    """Embed a corpus (JSONL or plain-text files) into Parquet shards with an exported model."""
    from embedforge.corpus.job import CorpusJob
    from embedforge.corpus.output import JobMismatchError, prepare_output
    from embedforge.corpus.reader import BadInputError, resolve_inputs
    from embedforge.server.runtime import RuntimeConfigError

    if no_truncate and overflow == "chunk":
        raise click.UsageError(f"--no-truncate contradicts --overflow {overflow}")
    overflow = "error" if no_truncate else overflow
    if ray_address is None and ray_actors is not None:
        raise click.UsageError("--ray-actors needs --ray")
    if ray_address is not None and threads is not None:
        raise click.UsageError("with --ray, set each actor's threads with --ray-actor-threads")
    started = time.time()
    try:
        job = CorpusJob(model_dir=model_dir, inputs=resolve_inputs(list(inputs)), output=output,
                        text_field=text_field, id_field=id_field, input_format=input_format, skip_bad=skip_bad,
                        overflow=overflow, chunk_overlap=chunk_overlap, chunk_tokens=chunk_tokens, precision=precision,
                        provider=provider,
                        threads=threads,
                        dimensions=dimensions, shard_size=shard_size, max_batch_tokens=max_batch_tokens,
                        max_batch_size=max_batch_size, progress=not no_progress, input_type=input_type,
                        output_type=output_type)
        _warn_without_input_type(job)
        identity = job.identity("local" if ray_address is None else "ray")
        state = prepare_output(output, identity)
        if state == "complete":
            click.echo(f"{output}: this job is already complete (_manifest.json); nothing to do")
            return
        count, problems = job.scan()
        click.echo(f"{count} texts in {len(job.inputs)} file(s)" + (f", {len(problems)} bad line(s) skipped"
                                                                    if problems else "")
                   + (" (continuing a killed run)" if state == "resume" else ""), err=True)
        if ray_address is None:
            from embedforge.corpus.local import run_local

            manifest = run_local(job, identity, count, problems, started)
        else:
            from embedforge.corpus.ray_runner import run_ray

            manifest = run_ray(job, identity, count, problems, started, ray_address, ray_actors, ray_actor_threads)
    except (BadInputError, JobMismatchError, RuntimeConfigError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"embedded {manifest['count']} texts ({manifest['skipped']['count']} skipped, "
               f"{manifest['truncated']} truncated) into {len(manifest['shards'])} shard(s) in {output} "
               f"({manifest['seconds']:.1f} s, {manifest['texts_per_s']} texts/s)")


def _warn_without_input_type(job: CorpusJob) -> None:
    """A model trained with prompts embeds a corpus as it was trained only with --input-type: say so."""
    prompts = {name: text for name, text in (job.model_manifest.get("prompts") or {}).items() if text}
    if job.input_type is None and prompts:
        named = ", ".join(f"{name} {text!r}" for name, text in prompts.items())
        click.echo(f"warning: this model was trained with prompts ({named}); without --input-type the texts are "
                   "embedded without one (a corpus of documents wants --input-type document)", err=True)


@click.command(name="check-space", epilog="Example: embedforge check-space --corpus ./vectors --target 127.0.0.1:50051")
@option("corpus", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
        help="An embed-corpus output directory (its _manifest.json).")
@option("target", required=True, help="The server to query the corpus with: HOST:PORT, a replica list or dns:///.")
@option("timeout", type=click.FloatRange(0, min_open=True), default=10.0, help="Deadline of the Info call.")
@option("api_key_env", default="EMBEDFORGE_API_KEY", help="Environment variable holding the API key to send, if set.")
@client_tls_options
@option("allow_insecure_key", is_flag=True, help=ALLOW_INSECURE_KEY_HELP)
def check_space_command(corpus: Path, target: str, timeout: float, api_key_env: str, tls_root_cert: Path | None,
                        tls_cert: Path | None, tls_key: Path | None, allow_insecure_key: bool) -> None:
    """Exit 0 when the corpus and the server are in one embedding space (their vectors compare), else 1."""
    import grpc

    from embedforge.client import EmbedClient
    from embedforge.corpus.output import MANIFEST_FILE

    manifest_path = corpus / MANIFEST_FILE
    if not manifest_path.is_file():
        raise click.ClickException(f"{manifest_path}: not found; is {corpus} a complete embed-corpus output?")
    manifest = json.loads(manifest_path.read_text())
    corpus_space = manifest.get("embedding_space")
    if not corpus_space:
        raise click.ClickException(f"{manifest_path}: records no embedding_space (written before embedforge kept "
                                   "it): re-embed the corpus to check it")
    try:
        with EmbedClient(target, timeout=timeout, api_key=os.environ.get(api_key_env) or None,
                         tls_root_cert=tls_root_cert, tls_cert=tls_cert, tls_key=tls_key,
                         allow_insecure_key=allow_insecure_key) as client:
            info = client.info()
    except grpc.RpcError as exc:
        raise click.ClickException(f"{target}: {exc.code().name}: {exc.details()}") from exc
    except ValueError as exc:
        raise click.ClickException(f"{target}: {exc}") from exc
    if info.embedding_space != corpus_space:
        click.echo(f"MISMATCH: corpus {corpus} is in embedding space {corpus_space}, server {target} serves "
                   f"{info.embedding_space} ({info.model_name}): its query vectors do not compare with the corpus; "
                   "re-embed the corpus or serve its export", err=True)
        sys.exit(1)
    dims = f"; the corpus holds {manifest['dim']} dimensions: query with dimensions={manifest['dim']}" \
        if manifest.get("dim") not in (None, info.dim) else ""
    click.echo(f"ok: corpus {corpus} and server {target} are both in embedding space {corpus_space}{dims}")
