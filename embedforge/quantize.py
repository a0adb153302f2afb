"""Compact output types: float32 vectors as int8, uint8, binary or ubinary codes (the names and layouts of
sentence-transformers' `quantize_embeddings` and Cohere's `embedding_types`).

- int8 / uint8: each dimension d mapped linearly from its calibrated range [low_d, high_d] onto 256 steps,

      uint8_d = clip(round((v_d - low_d) / step_d), 0, 255),   step_d = (high_d - low_d) / 255
      int8_d  = uint8_d - 128

  The ranges are measured once, at export time, on the validation texts' L2-normalised vectors and stored in
  the export's manifest, so every replica (and embed-corpus) produces the same codes for the same text.
- binary / ubinary: one bit per dimension, 1 where v_d > 0, packed 8 to a byte (numpy.packbits, big-endian
  bit order); ubinary as uint8 bytes, binary as the same bytes shifted to int8 (byte - 128). A vector of dim
  D takes ceil(D / 8) bytes.

A store compares codes directly: int8 and uint8 by the cosine of the centred codes (uint8 - 128 = int8),
binary by Hamming distance (1 - 2 * hamming / D is the cosine of the +-1 vectors). `scoring_vectors` gives the
float vectors whose cosine is that similarity, for `evaluate`. Numpy only: serving imports it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

OUTPUT_TYPES = ("float32", "int8", "uint8", "binary", "ubinary")
CALIBRATED_TYPES = ("int8", "uint8")
DTYPES = {"float32": np.float32, "int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}


class QuantizeError(ValueError):
    """An output type that cannot be produced: unknown, or int8/uint8 without a calibration."""


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class Calibration:
    """Per-dimension ranges of L2-normalised vectors: low[d] and high[d] over the calibration texts."""

    low: np.ndarray  # float32 [dim]
    high: np.ndarray  # float32 [dim]
    texts: int  # how many texts they were measured on

    @classmethod
    def measure(cls, vectors: np.ndarray) -> Calibration:
        """The ranges of `vectors` [n, dim] (n >= 2: one text gives no range)."""
        if vectors.ndim != 2 or len(vectors) < 2:
            raise QuantizeError(f"calibration needs at least 2 vectors, got {len(vectors)}")
        return cls(vectors.min(axis=0).astype(np.float32), vectors.max(axis=0).astype(np.float32), len(vectors))

    @classmethod
    def from_manifest(cls, record: dict) -> Calibration:
        low, high = (np.asarray(record[key], dtype=np.float32) for key in ("low", "high"))
        if low.shape != high.shape or low.ndim != 1 or not np.all(high >= low):
            raise QuantizeError("manifest calibration: low and high must be equal-length lists with high >= low")
        return cls(low, high, int(record.get("texts", 0)))

    def to_manifest(self) -> dict:
        return {"low": [float(x) for x in self.low], "high": [float(x) for x in self.high], "texts": self.texts}

    def digest(self) -> str:
        """A short id of the ranges (codes of two calibrations are not comparable; the export's embedding_space
        includes it)."""
        return hashlib.sha256(self.low.tobytes() + self.high.tobytes()).hexdigest()[:16]


def unknown_type(output_type: str) -> QuantizeError:
    return QuantizeError(f"unknown output type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")


def check_output_type(output_type: str, calibration: Calibration | None, dims: int, dim: int) -> None:
    """Raise QuantizeError unless `output_type` can be made for vectors of `dims` of the model's `dim` values."""
    if output_type not in OUTPUT_TYPES:
        raise unknown_type(output_type)
    if output_type in CALIBRATED_TYPES:
        if calibration is None:
            raise QuantizeError(f"{output_type} needs the calibration ranges that `embedforge export` writes into "
                                "manifest.json; this export has none (re-export it)")
        if dims != dim:
            raise QuantizeError(f"{output_type} is calibrated for the full {dim}-dimension vectors; omit dimensions "
                                f"(got {dims}) or ask for binary")


def quantize(vectors: np.ndarray, output_type: str, calibration: Calibration | None = None) -> np.ndarray:
    """`vectors` [n, dim] (L2-normalised float32) as `output_type` codes: [n, dim] for float32, int8 and uint8,
    [n, ceil(dim / 8)] for binary and ubinary."""
    if output_type == "float32":
        return np.ascontiguousarray(vectors, dtype=np.float32)
    if output_type in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return packed if output_type == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    if output_type not in CALIBRATED_TYPES:
        raise unknown_type(output_type)
    if calibration is None:
        raise QuantizeError(f"{output_type} needs a calibration")
    step = np.maximum(calibration.high - calibration.low, 1e-12) / 255
    codes = np.clip(np.rint((vectors - calibration.low) / step), 0, 255).astype(np.uint8)
    return codes if output_type == "uint8" else (codes.astype(np.int16) - 128).astype(np.int8)


def scoring_vectors(codes: np.ndarray, output_type: str, dim: int) -> np.ndarray:
    """float32 vectors whose cosine is the similarity a store computes on `codes` (see the module docstring)."""
    if output_type in ("float32", "int8"):
        return codes.astype(np.float32)
    if output_type == "uint8":
        return codes.astype(np.float32) - 128
    if output_type in ("binary", "ubinary"):
        packed = codes if output_type == "ubinary" else (codes.astype(np.int16) + 128).astype(np.uint8)
        bits = np.unpackbits(packed, axis=-1)[:, :dim]
        return bits.astype(np.float32) * 2 - 1
    raise unknown_type(output_type)
