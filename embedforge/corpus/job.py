"""An embed-corpus job: its options, its identity (_job.json), the input scan and the manifest.

Both runners (local.py, ray_runner.py) share these: the same job writes the same _job.json, refuses the same
bad input before any text is embedded, and ends with the same kind of manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from embedforge.corpus import MAX_BATCH_SIZE, MAX_BATCH_TOKENS
from embedforge.corpus.output import shard_stats
from embedforge.corpus.reader import Problem, describe_file, file_sha256, read_records
from embedforge.corpus.vectors import CHUNK_OVERLAP, check_corpus_output_type, input_prompt, output_dims
from embedforge.onnxrt import PROVIDERS
from embedforge.server.runtime import choose_precision, choose_provider, model_file_name, read_manifest


@dataclass
class CorpusJob:
    model_dir: Path
    inputs: list[Path]
    output: Path
    text_field: str = "document"
    id_field: str | None = None
    input_format: str = "auto"
    skip_bad: bool = False
    overflow: str = "truncate"  # a text over max_length: "truncate", "error" (stop) or "chunk" (a row per window)
    chunk_overlap: int = CHUNK_OVERLAP  # tokens shared by neighbouring windows of a chunked text
    chunk_tokens: int | None = None  # a chunked text's window size (special tokens included); None: max_length
    precision: str = "auto"
    provider: str = "auto"
    threads: int | None = None
    dimensions: int | None = None
    shard_size: int = 4096  # texts per Parquet shard: also the chunk sorted by length, and what a restart redoes
    max_batch_tokens: int = MAX_BATCH_TOKENS
    max_batch_size: int = MAX_BATCH_SIZE
    progress: bool = True
    input_type: str | None = None  # "query" or "document": the export's prompt of that name is prefixed
    output_type: str = "float32"  # or int8, uint8, binary, ubinary codes (embedforge/quantize.py)
    model_manifest: dict = field(init=False)

    def __post_init__(self) -> None:
        self.model_manifest = read_manifest(self.model_dir)
        self.dims = output_dims(self.model_manifest, self.dimensions)
        self.prompt = input_prompt(self.model_manifest, self.model_dir, self.input_type)
        check_corpus_output_type(self.output_type, self.model_manifest, self.model_dir, self.dims)
        self.provider_name = choose_provider(self.provider)
        self.provider_key = next(key for key, name in PROVIDERS.items() if name == self.provider_name)
        self.precision_name = choose_precision(self.precision, list(self.model_manifest["models"]),
                                               self.provider_name)

    def identity(self, runner: str) -> dict:
        """Everything that decides the output's bytes: a restart must match it (_job.json)."""
        model_file = self.model_dir / model_file_name(self.model_manifest, self.model_dir / "manifest.json",
                                                      self.precision_name)
        return {
            "runner": runner,
            "model_dir": str(self.model_dir.resolve()),
            "model_sha256": file_sha256(model_file),
            "embedding_space": self.model_manifest["embedding_space"],
            "precision": self.precision_name,
            "provider": self.provider_name,
            "dims": self.dims,
            "input_type": self.input_type,
            "prompt": self.prompt,
            "output_type": self.output_type,
            "text_field": self.text_field,
            "id_field": self.id_field,
            "input_format": self.input_format,
            "skip_bad": self.skip_bad,
            "overflow": self.overflow,
            "chunk_overlap": self.chunk_overlap if self.overflow == "chunk" else None,
            "chunk_tokens": self.chunk_tokens if self.overflow == "chunk" else None,
            "shard_size": self.shard_size,
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_size": self.max_batch_size,
            "inputs": [describe_file(path) for path in self.inputs],
        }

    def scan(self) -> tuple[int, list[Problem]]:
        """Read every input once before embedding: (records to embed, skipped lines).

        Bad input stops the job here (BadInputError), before any compute is spent, unless skip_bad."""
        problems: list[Problem] = []
        count = sum(1 for _ in self.records(problems))
        return count, problems

    def records(self, problems: list[Problem]):
        return read_records(self.inputs, self.input_format, self.text_field, self.id_field, self.skip_bad, problems)

    def manifest(self, identity: dict, count: int, problems: list[Problem], shards: list[Path], started: float,
                 extra: dict) -> dict:
        """_manifest.json: the model, the vectors, the inputs, the shards, the skipped lines and the time taken."""
        files, tokens, truncated = shard_stats(shards)
        written = sum(f["records"] for f in files)
        if written != count:
            raise RuntimeError(f"{self.output}: the shards hold {written} records, the inputs {count}")
        seconds = time.time() - started
        return {
            "model": {"dir": identity["model_dir"], "name": str(self.model_manifest.get("base_model") or ""),
                      "file": self.model_manifest["models"][self.precision_name]["file"],
                      "sha256": identity["model_sha256"], "max_length": int(self.model_manifest["max_length"])},
            "embedding_space": identity["embedding_space"],
            "dim": self.dims,
            "model_dim": int(self.model_manifest["dim"]),
            "normalized": True,
            "input_type": self.input_type,
            "prompt": self.prompt,
            "output_type": self.output_type,
            "precision": self.precision_name,
            "provider": self.provider_name,
            "count": count,
            "rows": sum(f["rows"] for f in files),
            "overflow": self.overflow,
            "tokens": tokens,
            "truncated": truncated,
            "skipped": {"count": len(problems), "lines": [p.to_json() for p in problems]},
            "inputs": identity["inputs"],
            "text_field": self.text_field,
            "id_field": self.id_field,
            "shards": files,
            "schema": {"id": "string", "vector": f"fixed_size_list<float32>[{self.dims}]", "tokens": "int32",
                       "truncated": "bool"},
            "seconds": round(seconds, 3),
            "texts_per_s": round(extra.get("embedded", count) / seconds, 1) if seconds > 0 else None,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "embedforge": package_version(),
            **extra,
        }


def package_version() -> str:
    try:
        return version("embedforge")
    except PackageNotFoundError:
        return "unknown"
