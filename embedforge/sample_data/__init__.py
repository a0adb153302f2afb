"""The bundled sample data: graded query-document pairs about home cooking (see README.md here)."""

from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "valid", "test")


def sample_path(split: str) -> Path:
    """Path of the bundled `train`, `valid` or `test` JSONL file."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(__file__).resolve().parent / f"{split}.jsonl"
