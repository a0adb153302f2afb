"""`embedforge embed-corpus`: embed every text of a corpus into Parquet shards, on one machine or with Ray."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from embedforge.cli_options import option
from embedforge.corpus import INPUT_TYPES, MAX_BATCH_TOKENS

if TYPE_CHECKING:
    from embedforge.corpus.job import CorpusJob

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
@option("no_truncate", is_flag=True, help="Stop on a text longer than the model's max_length instead of "
        "truncating it.")
@option("precision", type=click.Choice(["auto", "fp32", "int8", "fp16"]), default="auto",
        help="Which exported model; auto = fp16 on CUDA, else fp32.")
@option("provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
        help="ONNX Runtime execution provider; auto = CUDA when available.")
@option("threads", type=click.IntRange(1), default=None, show_default=False,
        help="Intra-op threads of the session (single-machine run) [default: all cores].")
@option("dimensions", type=click.IntRange(1), default=None, show_default=False,
        help="Write the first N dimensions, renormalised (Matryoshka; only for exports that declare "
        "matryoshka_dims) [default: the model's dim].")
@option("shard_size", type=click.IntRange(1), default=4096,
        help="Texts per Parquet shard; also the chunk sorted by length, and what a restart may redo.")
@option("max_batch_tokens", type=click.IntRange(1), default=MAX_BATCH_TOKENS,
        help="Padded tokens per model batch (texts x longest text).")
@option("max_batch_size", type=click.IntRange(1), default=128, help="Texts per model batch.")
@option("ray", "ray_address", default=None, show_default=False, metavar="auto|ADDRESS",
        help="Run with Ray Data: auto = RAY_ADDRESS or a running local instance, else a new local one; or a "
        "cluster address (head:6379, ray://head:10001).")
@option("ray_actors", type=click.IntRange(1), default=None, show_default=False,
        help="Embedding actors (one ONNX Runtime session each) [default: cluster CPUs / --ray-actor-threads].")
@option("ray_actor_threads", type=click.IntRange(1), default=1, help="Intra-op threads of each actor's session.")
@option("input_type", type=click.Choice(INPUT_TYPES), default=None, show_default=False,
        help="What the texts are: each gets the model's prompt for that input type (manifest.json `prompts`, "
        "set by `train --query-prompt/--document-prompt`), which counts towards max_length [default: no prompt].")
@option("no_progress", is_flag=True, help="No progress bar (it shows texts/s and the ETA).")
def embed_corpus_command(model_dir: Path, inputs: tuple[str, ...], output: Path, text_field: str,
                         id_field: str | None, input_format: str, skip_bad: bool, no_truncate: bool, precision: str,
                         provider: str, threads: int | None, dimensions: int | None, shard_size: int,
                         max_batch_tokens: int, max_batch_size: int, ray_address: str | None,
                         ray_actors: int | None, ray_actor_threads: int, input_type: str | None,
                         no_progress: bool) -> None:
    """Embed a corpus (JSONL or plain-text files) into Parquet shards with an exported model."""
    from embedforge.corpus.job import CorpusJob
    from embedforge.corpus.output import JobMismatchError, prepare_output
    from embedforge.corpus.reader import BadInputError, resolve_inputs
    from embedforge.server.runtime import RuntimeConfigError

    if ray_address is None and ray_actors is not None:
        raise click.UsageError("--ray-actors needs --ray")
    if ray_address is not None and threads is not None:
        raise click.UsageError("with --ray, set each actor's threads with --ray-actor-threads")
    started = time.time()
    try:
        job = CorpusJob(model_dir=model_dir, inputs=resolve_inputs(list(inputs)), output=output,
                        text_field=text_field, id_field=id_field, input_format=input_format, skip_bad=skip_bad,
                        truncate=not no_truncate, precision=precision, provider=provider, threads=threads,
                        dimensions=dimensions, shard_size=shard_size, max_batch_tokens=max_batch_tokens,
                        max_batch_size=max_batch_size, progress=not no_progress, input_type=input_type)
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
