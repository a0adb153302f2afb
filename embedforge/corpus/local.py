"""The single-machine runner: one ONNX Runtime session, one shard per chunk of `shard_size` records.

Shard k holds records k * shard_size ... (k + 1) * shard_size - 1 of the input (bad lines skipped), in input
order. A background thread reads and tokenizes the next chunk while the session embeds the current one (the
tokenizer and the session both release the GIL). A restarted job skips the records of its complete shards and
embeds the rest exactly as an uninterrupted run would (same chunks, same batches): the same vectors, byte for
byte.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from embedforge.corpus.job import CorpusJob
from embedforge.corpus.output import (
    MANIFEST_FILE,
    SHARD_PATTERN,
    complete_shards,
    shard_stats,
    shard_table,
    write_shard,
)
from embedforge.corpus.reader import BadInputError, Problem, Record
from embedforge.corpus.vectors import CorpusEmbedder, Rows
from embedforge.io import write_json_atomic


@dataclass
class Chunk:
    records: list[Record]
    rows: Rows  # one per record, or with --overflow chunk one per window of a long record


def run_local(job: CorpusJob, identity: dict, count: int, problems: list[Problem], started: float) -> dict:
    """Embed every record not yet in a complete shard, then write _manifest.json; returns the manifest."""
    for stale in job.output.glob(".part-*"):  # the temporary file of a shard a killed run was writing
        stale.unlink()
    done_shards = complete_shards(job.output)
    done = sum(f["records"] for f in shard_stats(done_shards)[0])
    embedder = CorpusEmbedder(job.model_dir, precision=job.precision_name, provider=job.provider_key,
                              threads=job.threads, dimensions=job.dimensions, max_batch_tokens=job.max_batch_tokens,
                              max_batch_size=job.max_batch_size, input_type=job.input_type,
                              output_type=job.output_type, chunk=job.overflow == "chunk",
                              chunk_overlap=job.chunk_overlap, chunk_tokens=job.chunk_tokens)
    records = itertools.islice(job.records([]), done, None)

    def next_chunk() -> Chunk | None:
        chunk = list(itertools.islice(records, job.shard_size))
        if not chunk:
            return None
        rows = embedder.rows([r.text for r in chunk])
        if job.overflow == "error" and rows.truncated.any():
            first = chunk[int(rows.owner[np.argmax(rows.truncated)])]
            raise BadInputError(f"{first.source}: text of more than {embedder.info.max_length} tokens (the "
                                f"model's max_length) and --overflow error was given; {int(rows.truncated.sum())} "
                                "such text(s) in this chunk")
        return Chunk(chunk, rows)

    shard_index = len(done_shards)
    embed_started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="corpus-read") as reader, \
            tqdm(total=count, initial=done, unit="text", unit_scale=True, dynamic_ncols=True, smoothing=0.1,
                 disable=not job.progress, desc="embed-corpus") as bar:
        pending = reader.submit(next_chunk)
        while (chunk := pending.result()) is not None:
            pending = reader.submit(next_chunk)
            rows = chunk.rows
            vectors = np.empty((len(rows.ids), embedder.dims), dtype=np.float32)
            for batch in embedder.batches(rows.lengths):
                vectors[batch] = embedder.embed_batch([rows.ids[i] for i in batch])
                bar.update(int(np.sum(rows.chunk_index[batch] == 0)))  # records: a record's first row
            table = shard_table([chunk.records[i].id for i in rows.owner], embedder.codes(vectors), rows.lengths,
                                rows.truncated, embedder.info.embedding_space, job.output_type,
                                (rows.chunk_index, rows.spans) if job.overflow == "chunk" else None)
            write_shard(job.output / SHARD_PATTERN.format(shard_index), table)
            shard_index += 1
    manifest = job.manifest(identity, count, problems, complete_shards(job.output), started,
                            {"runner": "local", "threads": embedder.runtime.threads, "resumed_after_rows": done,
                             "embedded": count - done,
                             "embed_seconds": round(time.perf_counter() - embed_started, 3)})
    write_json_atomic(job.output / MANIFEST_FILE, manifest)
    return manifest
