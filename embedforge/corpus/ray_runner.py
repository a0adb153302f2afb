"""The Ray runner: the same job on a Ray cluster (or a local Ray instance) with Ray Data.

    input files --(read tasks, PART_LINES lines each)--> records --map_batches over an actor pool--> vectors
    --> Parquet

Each actor holds one CorpusEmbedder (one ONNX Runtime session with `actor_threads` threads) and embeds each
batch of records the way the local runner embeds a shard: length-sorted model batches, the same vectors up to
the batch composition (cosine >= 0.99999 to the local run). Ray writes the Parquet files into a hidden
directory under OUT; they are moved into place as part-NNNNN.parquet only when the whole dataset is written,
so a failed run leaves no shard behind (a restart runs the job again from the start). On a multi-node cluster
OUT, the inputs and the export directory must be paths that every node sees (a shared filesystem).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedforge.corpus.job import CorpusJob
from embedforge.corpus.output import MANIFEST_FILE, SHARD_PATTERN, shard_table
from embedforge.corpus.reader import BadInputError, Problem, read_file, split_lines
from embedforge.corpus.vectors import CHUNK_OVERLAP, CorpusEmbedder
from embedforge.io import write_json_atomic

PART_LINES = 512
"""Lines per read task, and at most the texts per actor call: small enough to spread one file over many actors."""


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError("--ray needs Ray Data: pip install 'embedforge[cluster]' (or pip install 'ray[data]')") \
            from exc
    return ray


def read_part(batch: dict[str, np.ndarray], input_format: str, text_field: str, id_field: str | None,
              skip_bad: bool) -> dict[str, list[str]]:
    """Ray Data map_batches function: one part of an input file -> its (id, text, source) rows."""
    path, part = Path(str(batch["path"][0])), tuple(int(x) for x in batch["part"][0])
    records = list(read_file(path, input_format, text_field, id_field, skip_bad, [], part))
    return {"id": [r.id for r in records], "text": [r.text for r in records], "source": [r.source for r in records]}


class EmbedActor:
    """Ray Data callable class: one ONNX Runtime session per actor, built once."""

    def __init__(self, model_dir: str, precision: str, provider: str, threads: int, dimensions: int | None,
                 max_batch_tokens: int, max_batch_size: int, overflow: str, input_type: str | None = None,
                 output_type: str = "float32", chunk_overlap: int = CHUNK_OVERLAP,
                 chunk_tokens: int | None = None) -> None:
        self.embedder = CorpusEmbedder(model_dir, precision=precision, provider=provider, threads=threads,
                                       dimensions=dimensions, max_batch_tokens=max_batch_tokens,
                                       max_batch_size=max_batch_size, input_type=input_type, output_type=output_type,
                                       chunk=overflow == "chunk", chunk_overlap=chunk_overlap,
                                       chunk_tokens=chunk_tokens)
        self.overflow = overflow

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = self.embedder.rows(table.column("text").to_pylist())
        if self.overflow == "error" and rows.truncated.any():
            source = table.column("source")[int(rows.owner[np.argmax(rows.truncated)])].as_py()
            raise BadInputError(f"{source}: text of more than {self.embedder.info.max_length} tokens (the model's "
                                "max_length) and --overflow error was given")
        vectors = self.embedder.embed_ids(rows.ids, rows.lengths)
        ids = table.column("id").to_pylist()
        return shard_table([ids[i] for i in rows.owner], self.embedder.codes(vectors), rows.lengths, rows.truncated,
                           self.embedder.info.embedding_space, self.embedder.output_type,
                           (rows.chunk_index, rows.spans) if self.overflow == "chunk" else None)


def run_ray(job: CorpusJob, identity: dict, count: int, problems: list[Problem], started: float, address: str,
            actors: int | None, actor_threads: int) -> dict:
    """Run the job with Ray Data on the cluster at `address` ("auto": RAY_ADDRESS, a running local instance, or
    a new local one); returns the manifest."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=None if address == "auto" else address, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = actors or max(1, cpus // actor_threads)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = job.progress
        for stale in job.output.glob(".ray-*"):  # a failed earlier run's partial write
            shutil.rmtree(stale, ignore_errors=True)
        for stale in job.output.glob("part-*.parquet"):  # an earlier run that died while moving its shards
            stale.unlink()
        staging = Path(tempfile.mkdtemp(prefix=".ray-", dir=job.output))
        parts = [{"path": str(path.resolve()), "part": list(part)} for path in job.inputs
                 for part in split_lines(path, PART_LINES)]
        dataset = ray.data.from_items(parts, override_num_blocks=len(parts))
        # Reading and writing take no CPU reservation: the actors hold the cores, and a read or write task that
        # waited for a free CPU would wait for ever (the actors live until the dataset is written).
        dataset = dataset.map_batches(read_part, batch_size=1, num_cpus=0,
                                      fn_kwargs={"input_format": job.input_format, "text_field": job.text_field,
                                                 "id_field": job.id_field, "skip_bad": job.skip_bad})
        dataset = dataset.map_batches(
            EmbedActor, batch_size=min(job.shard_size, PART_LINES), batch_format="pyarrow", num_cpus=actor_threads,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"model_dir": str(job.model_dir.resolve()), "precision": job.precision_name,
                                   "provider": job.provider_key, "threads": actor_threads,
                                   "dimensions": job.dimensions, "max_batch_tokens": job.max_batch_tokens,
                                   "max_batch_size": job.max_batch_size, "overflow": job.overflow,
                                   "chunk_overlap": job.chunk_overlap, "chunk_tokens": job.chunk_tokens,
                                   "input_type": job.input_type, "output_type": job.output_type})
        embed_started = time.perf_counter()
        try:
            dataset.write_parquet(str(staging), min_rows_per_file=job.shard_size, ray_remote_args={"num_cpus": 0})
            written = sorted(staging.glob("*.parquet"))
            shards = [job.output / SHARD_PATTERN.format(i) for i in range(len(written))]
            for source, target in zip(written, shards, strict=True):
                os.replace(source, target)
        except Exception as exc:
            bad = _bad_input(exc)
            if bad is not None:
                raise BadInputError(str(bad)) from None
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if started_here:
            ray.shutdown()
    manifest = job.manifest(identity, count, problems, shards, started,
                            {"runner": "ray", "ray_actors": actors, "ray_actor_threads": actor_threads,
                             "ray_cluster_cpus": cpus, "embedded": count,
                             "embed_seconds": round(time.perf_counter() - embed_started, 3)})
    write_json_atomic(job.output / MANIFEST_FILE, manifest)
    return manifest


def _bad_input(exc: BaseException) -> BadInputError | None:
    """The BadInputError a read task or an actor raised, from Ray's wrapping of it (the original exception
    object does not always survive the trip back: then its message is read from the remote traceback)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BadInputError):
            return exc
        found = re.search(r"BadInputError: (.+)", str(exc))
        if found:
            return BadInputError(found.group(1).strip())
        seen.add(id(exc))
        exc = exc.__cause__ or getattr(exc, "cause", None) or exc.__context__
    return None
