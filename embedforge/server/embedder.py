"""The narrow interface between the serving core (core.py) and a model backend (runtime.py implements it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from embedforge.quantize import Calibration


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    dim: int
    max_length: int
    pooling: str
    precision: str
    provider: str
    unnormalized: bool = True
    """run_batch returns vectors before their L2 norm; False: they come normalised (normalize=false cannot be met)."""
    matryoshka_dims: tuple[int, ...] = ()
    """Vector sizes the model was trained for (the export manifest's matryoshka_dims); empty: full vectors only."""
    embedding_space: str = ""
    """The export's embedding_space id (export/space.py): vectors of different ids are not comparable."""
    prompts: dict[str, str] = field(default_factory=dict)
    """The model's prompts by input type ("query", "document"; the export manifest's `prompts`), "" or absent:
    none of that kind."""
    calibration: Calibration | None = None
    """int8/uint8 ranges (the export manifest's `calibration`); None: those output types cannot be served."""


@dataclass(frozen=True)
class Tokenized:
    ids: list[Any]  # one payload per text, handed to run_batch (token ids)
    lengths: list[int]  # tokens per text (special tokens included, after truncation)
    truncated: list[int]  # indices of texts that were longer than max_length


class Embedder(Protocol):
    info: ModelInfo

    def tokenize(self, texts: list[str], truncation_direction: str = "right") -> Tokenized:
        """Tokenize texts (truncating at max_length, cutting the `truncation_direction` end); called from a worker
        thread, or on the event loop for small requests (core.INLINE_TOKENIZE_CHARS)."""

    def count_tokens(self, text: str) -> int:
        """Tokens of the whole text, not truncated (to say how long a refused text is)."""

    def token_windows(self, text: str, overlap: int) -> list[Any]:
        """The whole text's tokens as windows of at most max_length tokens (each with the special tokens around
        it), neighbours sharing `overlap` tokens; payloads for run_batch."""

    def run_batch(self, batch: list[Any], alone: bool = True) -> np.ndarray:
        """Embed a batch of tokenized texts: float32 [len(batch), dim], unnormalised unless info.unnormalized is
        False (the servicer L2-normalises them); called from a worker thread. alone: no other batch is running
        or waiting (the batcher's hint), so this one may use every core."""

    def release_memory(self) -> None:
        """Give memory kept from past batches back to the system; called from a worker thread once the server
        is idle (the batcher's on_idle)."""


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """v / max(||v||_2, 1e-12) per row, in place."""
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors
