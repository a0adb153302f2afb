"""The embedding space of an export: a short id of everything that decides a vector.

Vectors are comparable only when they come from the same weights through the same tokenizer, pooling,
normalisation, max length and dimensions (and prompts, once a model has them); int8 and uint8 codes also need
the same calibration ranges (embedforge/quantize.py), so the id covers those too. `embedding_space` hashes all of
these: a repeated export of the same checkpoint gets the same id, any change of them another. The precisions
of one export (fp32, fp16, int8) share it: they approximate the same model, within the parity floors that
`export` checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

SPACE_ID_CHARS = 16  # 64 bits of sha256: enough to tell apart every export a team keeps


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedding_space(weight_files: Sequence[Path], tokenizer_files: Sequence[Path], settings: Mapping) -> str:
    """sha256 over the weight and tokenizer files (name and content, in name order) and the settings that shape
    a vector (`settings`: JSON-able, e.g. dim, max_length, pooling, normalized, prompts), cut to SPACE_ID_CHARS."""
    record = {
        "weights": {path.name: file_digest(path) for path in sorted(weight_files, key=lambda p: p.name)},
        "tokenizer": {path.name: file_digest(path) for path in sorted(tokenizer_files, key=lambda p: p.name)},
        "settings": dict(settings),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:SPACE_ID_CHARS]
