"""The ONNX Runtime session and batch padding that the server and the export's parity check share.

Torch-free: the serving side imports it, and so does `export`, so that parity is measured on exactly the
session the server runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
"""Load-time fusions a CPU session leaves out: onnxruntime's CPU SkipLayerNormalization kernel is slower than
the Add + LayerNormalization it replaces (figures in embedforge/export/optimize.py)."""


def create_session(model_path: str | Path, threads: int, providers: list[str]) -> ort.InferenceSession:
    """The serving session: `threads` intra-op threads (0 = ONNX Runtime's default), all graph optimizations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # No CPU memory arena: it keeps the largest batch's working memory for good (per session, and the server
    # holds up to four: +136 MB each after one 8 x 512-token batch of the bundled model), while without it
    # the memory goes back after the batch; batch times were the same within this host's noise.
    options.enable_cpu_mem_arena = False
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    disabled = list(CPU_DISABLED_OPTIMIZERS) if providers[0] == PROVIDERS["cpu"] else []
    return ort.InferenceSession(str(model_path), options, providers=providers, disabled_optimizers=disabled)


def pad_token_ids(batch: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pad token id sequences to the longest one: (input_ids, attention_mask), both int64 [B, T]."""
    lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
    width = int(lengths.max())
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
    attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return input_ids, attention_mask
