"""The output directory of an embed-corpus job: _job.json, Parquet shards, _manifest.json.

    OUT/_job.json              what the job is (model, options, each input's size and sha256); written first
    OUT/part-00000.parquet ... shards: id (string), vector (fixed-size list of float32), tokens (int32),
                               truncated (bool); each written to a temporary file, fsynced and renamed
    OUT/_manifest.json         written last: the job is complete

The JSON files start with "_" so that Parquet readers given the directory (pyarrow, pandas, Ray) skip them.
A run that finds OUT/_job.json equal to its own job continues after the last complete shard; another job's
shards in OUT are refused, so that one directory never mixes vectors of two models, option sets or corpora.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedforge.io import write_file_atomic, write_json_atomic
from embedforge.quantize import DTYPES

JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
SHARD_PATTERN = "part-{:05d}.parquet"


class JobMismatchError(Exception):
    """OUT holds another job's output."""


SPACE_METADATA_KEY = b"embedding_space"  # Parquet schema metadata: the export's embedding space
OUTPUT_TYPE_KEY = b"output_type"  # and the vectors' output type (embedforge/quantize.py)
CHUNK_COLUMNS = ("chunk_index", "char_start", "char_end")  # a chunked job's window of each row


def shard_schema(width: int, embedding_space: str, output_type: str = "float32", chunked: bool = False) -> pa.Schema:
    """id, vector (fixed-size list of the output type's values: float32, int8 or uint8; binary types hold
    ceil(dim / 8) packed bytes), tokens, truncated, and for a chunked job chunk_index, char_start, char_end; the
    space and output type in the schema's metadata."""
    values = pa.from_numpy_dtype(np.dtype(DTYPES[output_type]))
    fields = [("id", pa.string()), ("vector", pa.list_(values, width)), ("tokens", pa.int32()),
              ("truncated", pa.bool_())]
    if chunked:
        fields += [(name, pa.int32()) for name in CHUNK_COLUMNS]
    return pa.schema(fields, metadata={SPACE_METADATA_KEY: embedding_space.encode(),
                                       OUTPUT_TYPE_KEY: output_type.encode()})


def shard_table(ids: list[str], vectors: np.ndarray, tokens: np.ndarray, truncated: np.ndarray,
                embedding_space: str, output_type: str = "float32",
                chunks: tuple[np.ndarray, np.ndarray] | None = None) -> pa.Table:
    """One shard's rows as an Arrow table; `vectors` are float32, or the codes of `output_type`. chunks: each
    row's chunk_index and character span [start, end) in its text (a chunked job)."""
    width = vectors.shape[1]
    values = np.ascontiguousarray(vectors, dtype=DTYPES[output_type]).reshape(-1)
    flat = pa.array(values, type=pa.from_numpy_dtype(values.dtype))
    columns = [pa.array(ids, type=pa.string()), pa.FixedSizeListArray.from_arrays(flat, width),
               pa.array(tokens, type=pa.int32()), pa.array(truncated, type=pa.bool_())]
    if chunks is not None:
        index, spans = chunks
        columns += [pa.array(index, type=pa.int32()), pa.array(spans[:, 0], type=pa.int32()),
                    pa.array(spans[:, 1], type=pa.int32())]
    return pa.Table.from_arrays(columns, schema=shard_schema(width, embedding_space, output_type, chunks is not None))


def write_shard(path: Path, table: pa.Table) -> Path:
    """Write a Parquet shard atomically (temporary file, fsync, rename)."""
    return write_file_atomic(path, lambda temporary: pq.write_table(table, temporary))


def complete_shards(output: Path) -> list[Path]:
    """part-00000, part-00001, ... as long as they run without a gap (a shard exists only when complete)."""
    shards = []
    while (output / SHARD_PATTERN.format(len(shards))).is_file():
        shards.append(output / SHARD_PATTERN.format(len(shards)))
    return shards


def prepare_output(output: Path, job: dict) -> str:
    """Make OUT ready for `job`: 'new', 'resume' (same job, unfinished) or 'complete' (same job, done).

    Raises JobMismatchError when OUT holds another job's shards or files that are not an embed-corpus output.
    """
    job_path = output / JOB_FILE
    if job_path.is_file():
        previous = json.loads(job_path.read_text())
        differences = describe_differences(previous, job)
        if differences and not complete_shards(output) and not (output / MANIFEST_FILE).is_file():
            write_json_atomic(job_path, job)  # that job wrote nothing yet: nothing to mix up
            return "new"
        if differences:
            raise JobMismatchError(f"{output} holds another job ({JOB_FILE}): " + "; ".join(differences)
                                   + ". Restart with the same arguments and inputs, or use a new --output.")
        return "complete" if (output / MANIFEST_FILE).is_file() else "resume"
    if output.exists() and any(p for p in output.iterdir() if not p.name.startswith(".")):
        raise JobMismatchError(f"{output}: not empty and not an embed-corpus output (no {JOB_FILE}); "
                               "use a new or empty --output")
    write_json_atomic(job_path, job)
    return "new"


def describe_differences(previous: dict, job: dict) -> list[str]:
    """What changed between two jobs, in words (empty: the same job)."""
    differences = []
    for key in sorted(set(previous) | set(job)):
        if key == "inputs" or previous.get(key) == job.get(key):
            continue
        differences.append(f"{key} was {previous.get(key)!r}, now {job.get(key)!r}")
    before = {f["path"]: f for f in previous.get("inputs", [])}
    now = {f["path"]: f for f in job.get("inputs", [])}
    for path in before.keys() - now.keys():
        differences.append(f"input {path} is no longer given")
    for path in now.keys() - before.keys():
        differences.append(f"input {path} is new")
    for path in before.keys() & now.keys():
        if before[path] != now[path]:
            differences.append(f"input {path} changed (size or sha256)")
    if not differences and [f["path"] for f in previous.get("inputs", [])] != [f["path"] for f in job["inputs"]]:
        differences.append("the inputs are given in another order")
    return differences


def shard_stats(shards: list[Path]) -> tuple[list[dict], int, int]:
    """([{file, rows, records}], tokens, truncated) over written shards, read back from the files. records: the
    input records a shard holds (rows, less the second and later windows of chunked texts)."""
    files, tokens, truncated = [], 0, 0
    for shard in shards:
        chunked = "chunk_index" in pq.read_schema(shard).names
        table = pq.read_table(shard, columns=["tokens", "truncated", *(["chunk_index"] if chunked else [])])
        records = int(pc.sum(pc.equal(table["chunk_index"], 0).cast(pa.int64())).as_py() or 0) if chunked \
            else table.num_rows
        files.append({"file": shard.name, "rows": table.num_rows, "records": records})
        tokens += int(pc.sum(table["tokens"]).as_py() or 0)
        truncated += int(pc.sum(table["truncated"].cast(pa.int64())).as_py() or 0)
    return files, tokens, truncated
