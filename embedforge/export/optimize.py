"""Graph optimization and lower precisions for an exported BERT-family graph (onnx + onnxruntime only).

- :func:`optimize_fp32`: onnxruntime's transformer optimizer (``model_type="bert"``) fuses attention
  (``Attention``), LayerNorm (``LayerNormalization``), the embeddings (``EmbedLayerNormalization``) and
  GELU (``BiasGelu``/``FastGelu``/``Gelu``); the fused op counts say which fusions fired. For CUDA it also
  fuses each residual add into its LayerNorm (``SkipLayerNormalization``); for CPU it does not, because
  onnxruntime's CPU ``SkipLayerNormalization`` kernel is slower than the ``Add`` + ``LayerNormalization``
  it replaces: 55 ms against 16 ms per 32 x 128 batch of the bundled model (the whole graph: 430 ms against
  382 ms fp32, 242 ms against 191 ms int8; onnxruntime 1.32, profiled per op). The serving session keeps
  onnxruntime from redoing that fusion at load time
  (``embedforge.server.runtime.CPU_DISABLED_OPTIMIZERS``).
- :func:`optimize_unpadded`: a CPU graph for batches without padding. onnxruntime runs its CPU flash
  attention only for ``MultiHeadAttention`` without a padding mask, so this graph fuses attention into
  ``MultiHeadAttention`` and drops the mask from it (pooling still reads ``attention_mask``). It is wrong
  for padded batches; the runtime uses it only for batches whose texts all have the same, long length
  (PyTorch does the same: transformers drops an all-ones mask and runs flash SDPA). Bundled model, 8 x 512
  tokens, one run: fp32 1.09x PyTorch against 1.04x for the masked graph, int8 1.79x against 1.57x; at
  32 x 128 it is slower (0.96x against 1.05x fp32), hence the length threshold.
- :func:`quantize_int8`: dynamic quantization of the optimized graph for CPU. Weights int8 with one scale
  per output channel (per-tensor scales move the bundled model's vectors to 0.957 mean cosine, per-channel
  keeps 0.993 at the same speed); activations are quantized on the fly, per batch.
- :func:`convert_fp16`: half precision for CUDA. Inputs and outputs stay int64/float32; LayerNorm built
  from primitive ops and the pooling/normalisation reductions stay float32 (fp16 sums over many tokens
  or a wide variance overflow, onnxruntime #15021). The fused LayerNorm kernels accumulate in float32.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

FUSED_OP_TYPES = (
    "Attention", "MultiHeadAttention", "QAttention",
    "EmbedLayerNormalization", "QEmbedLayerNormalization",
    "SkipLayerNormalization", "LayerNormalization",
    "Gelu", "FastGelu", "BiasGelu",
    "MatMulInteger", "DynamicQuantizeMatMul",
)
TARGETS = ("cpu", "cuda")
MHA_KEY_PADDING_MASK_INPUT = 4  # MultiHeadAttention inputs: query, key, value, bias, key_padding_mask, ...
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "QAttention")
GELU_OPS = ("Gelu", "FastGelu", "BiasGelu")
FP16_KEEP_FP32_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "ReduceMean", "Pow", "Sqrt",
                      "ReduceSum", "ReduceL2")


def count_fused_ops(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """How many nodes of each fused/quantized op type the graph holds (types that occur only)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    counts = Counter(node.op_type for node in model.graph.node)
    return {op: counts[op] for op in FUSED_OP_TYPES if counts[op]}


def fusion_complete(fused_ops: dict[str, int], num_layers: int) -> bool:
    """True when every layer got fused attention, GELU and two LayerNorm ops, and the embeddings fused.

    A layer's LayerNorms count whether or not their residual add was fused in (SkipLayerNormalization).
    """
    attention = sum(fused_ops.get(op, 0) for op in ATTENTION_OPS)
    gelu = sum(fused_ops.get(op, 0) for op in GELU_OPS)
    layer_norms = fused_ops.get("SkipLayerNormalization", 0) + fused_ops.get("LayerNormalization", 0)
    embeddings = fused_ops.get("EmbedLayerNormalization", 0) + fused_ops.get("QEmbedLayerNormalization", 0)
    return attention == num_layers and gelu == num_layers and layer_norms == 2 * num_layers and embeddings == 1


def optimize_fp32(source: str | Path, target: str | Path, num_heads: int, hidden_size: int,
                  device: str = "cpu") -> dict[str, int]:
    """Run the transformer optimizer on `source` for `device` (cpu|cuda), write `target`; returns the op counts."""
    if device not in TARGETS:
        raise ValueError(f"device must be one of {TARGETS}, got {device!r}")
    optimizer = _optimize(source, num_heads, hidden_size, fuse_residual_adds=device == "cuda")
    optimizer.save_model_to_file(str(target))
    return count_fused_ops(optimizer.model)


def optimize_unpadded(source: str | Path, target: str | Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """CPU graph for unpadded batches (see the module docstring), written to `target`; returns the op counts."""
    optimizer = _optimize(source, num_heads, hidden_size, fuse_residual_adds=False, multi_head_attention=True)
    graph = optimizer.model.graph
    inputs = list(graph.input)
    for node in graph.node:
        if node.op_type == "MultiHeadAttention":
            del node.input[MHA_KEY_PADDING_MASK_INPUT:]  # the mask and the (unused) inputs after it
    optimizer.prune_graph()  # drops the mask's now unused nodes, and with cls pooling the mask input too:
    del graph.input[:]  # keep the inputs of the padded graph, so that callers feed both graphs alike
    graph.input.extend(inputs)
    optimizer.save_model_to_file(str(target))
    return count_fused_ops(optimizer.model)


def _optimize(source: str | Path, num_heads: int, hidden_size: int, fuse_residual_adds: bool,
              multi_head_attention: bool = False):
    """onnxruntime's BERT optimizer on `source`; returns its OnnxModel (not yet saved)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = fuse_residual_adds
    options.use_multi_head_attention = multi_head_attention
    return optimize_model(str(source), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                          optimization_options=options)


def quantize_int8(source: str | Path, target: str | Path) -> dict[str, int]:
    """Dynamic int8 quantization of the (optimized) graph `source`, per-channel weights; returns op counts."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8,
                         # The fused contrib ops are unknown to ONNX shape inference: their float
                         # outputs need this default type, or the quantizer stops at the first one.
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return count_fused_ops(target)


def convert_fp16(source: str | Path, target: str | Path) -> dict[str, int]:
    """Half-precision copy of the optimized graph `source` (float32 I/O kept); returns the fused op counts."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(source)))
    model.convert_float_to_float16(keep_io_types=True,
                                   op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32_OPS])
    model.save_model_to_file(str(target))
    return count_fused_ops(model.model)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizer logs advice ("consider pre-processing") on the root logger: keep only errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
