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
    # The CPU memory arena serves a run's many intermediate tensors without malloc/free (one thread, 4 texts of
    # 256-640 tokens: 5.2 texts/s with it, 4.4 without); a run with `shrinking_run` returns its unused memory,
    # so the largest batch's working memory does not stay for good (RSS after 48 such batches: 354 MB against
    # 477 MB without shrinking, 337 MB without an arena); the server does so once idle (runtime.release_memory).
    options.enable_cpu_mem_arena = True
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    disabled = list(CPU_DISABLED_OPTIMIZERS) if providers[0] == PROVIDERS["cpu"] else []
    return ort.InferenceSession(str(model_path), options, providers=providers, disabled_optimizers=disabled)


def shrinking_run() -> ort.RunOptions:
    """Run options that give the CPU arena's unused memory back when the run ends."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def pad_token_ids(batch: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pad token id sequences to the longest one: (input_ids, attention_mask), both int64 [B, T]."""
    lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
    width = int(lengths.max())
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
    attention_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return input_ids, attention_mask
