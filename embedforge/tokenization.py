"""Tokenizer loading shared by training, export and serving (tokenizers only, no torch).

Some model directories ship a `tokenizer.json` that pins padding and truncation (the bundled
all-MiniLM-L6-v2 pads and truncates every text to 128 tokens). That setting would pad short texts
to 128 and silently cut long ones, so it is always replaced here: no padding (callers pad each batch
to its longest text) and truncation at the model's `max_length`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_tokenizer(model_dir: str | Path, max_length: int) -> Tokenizer:
    """Load `model_dir/tokenizer.json` with padding off and truncation at `max_length`."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (a fast tokenizer file is required)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def pad_token_ids(batch: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pad token id sequences to the longest one: (input_ids, attention_mask), both int64 [B, T]."""
    lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
    width = int(lengths.max())
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
    attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return input_ids, attention_mask
