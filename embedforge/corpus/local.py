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
from embedforge.corpus.vectors import CorpusEmbedder
from embedforge.io import write_json_atomic


@dataclass
class Chunk:
    records: list[Record]
    ids: list[np.ndarray]
    lengths: np.ndarray
    truncated: np.ndarray


def run_local(job: CorpusJob, identity: dict, count: int, problems: list[Problem], started: float) -> dict:
    """Embed every record not yet in a complete shard, then write _manifest.json; returns the manifest."""
    for stale in job.output.glob(".part-*"):  # the temporary file of a shard a killed run was writing
        stale.unlink()
    done_shards = complete_shards(job.output)
    done = sum(f["rows"] for f in shard_stats(done_shards)[0])
    embedder = CorpusEmbedder(job.model_dir, precision=job.precision_name, provider=job.provider_key,
                              threads=job.threads, dimensions=job.dimensions, max_batch_tokens=job.max_batch_tokens,
                              max_batch_size=job.max_batch_size, input_type=job.input_type,
                              output_type=job.output_type)
    records = itertools.islice(job.records([]), done, None)

    def next_chunk() -> Chunk | None:
        chunk = list(itertools.islice(records, job.shard_size))
        if not chunk:
            return None
        ids, lengths, truncated = embedder.tokenize([r.text for r in chunk])
        if not job.truncate and truncated.any():
            first = chunk[int(np.argmax(truncated))]
            raise BadInputError(f"{first.source}: text of more than {embedder.info.max_length} tokens (the "
                                f"model's max_length) and --no-truncate was given; {int(truncated.sum())} such "
                                "text(s) in this chunk")
        return Chunk(chunk, ids, lengths, truncated)

    shard_index = len(done_shards)
    embed_started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="corpus-read") as reader, \
            tqdm(total=count, initial=done, unit="text", unit_scale=True, dynamic_ncols=True, smoothing=0.1,
                 disable=not job.progress, desc="embed-corpus") as bar:
        pending = reader.submit(next_chunk)
        while (chunk := pending.result()) is not None:
            pending = reader.submit(next_chunk)
            vectors = np.empty((len(chunk.records), embedder.dims), dtype=np.float32)
            for batch in embedder.batches(chunk.lengths):
                vectors[batch] = embedder.embed_batch([chunk.ids[i] for i in batch])
                bar.update(len(batch))
            table = shard_table([r.id for r in chunk.records], embedder.codes(vectors), chunk.lengths,
                                chunk.truncated, embedder.info.embedding_space, job.output_type)
            write_shard(job.output / SHARD_PATTERN.format(shard_index), table)
            shard_index += 1
    manifest = job.manifest(identity, count, problems, complete_shards(job.output), started,
                            {"runner": "local", "threads": embedder.runtime.threads, "resumed_after_rows": done,
                             "embedded": count - done,
                             "embed_seconds": round(time.perf_counter() - embed_started, 3)})
    write_json_atomic(job.output / MANIFEST_FILE, manifest)
    return manifest
