"""Tokenizer loading shared by training, export and serving (tokenizers only, no torch).

Some model directories ship a `tokenizer.json` that pins padding and truncation (the bundled
all-MiniLM-L6-v2 pads and truncates every text to 128 tokens). That setting would pad short texts
to 128 and silently cut long ones, so it is always replaced here: no padding (callers pad each batch
to its longest text) and truncation at the model's `max_length`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(model_dir: str | Path, max_length: int) -> Tokenizer:
    """Load `model_dir/tokenizer.json` with padding off and truncation at `max_length`."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (a fast tokenizer file is required)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer
