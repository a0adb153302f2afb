"""Torch -> ONNX: one graph from token ids to the finished sentence vector.

    (input_ids, attention_mask) -> encoder -> pooling (cls | masked mean) -> projection -> unnormalized_embedding
                                                                                        -> L2 norm -> embedding

Inputs are int64 [batch, sequence], both outputs float32 [batch, dim]; batch and sequence are dynamic.
``embedding`` is the model's vector (what parity checks and most users read); ``unnormalized_embedding``
is the same vector before the L2 norm, for servers that must honour a request for unnormalised vectors.
The graph is traced with the TorchScript exporter (``dynamo=False``) from a model loaded with the eager
attention implementation: onnxruntime's BERT attention fusion matches the eager pattern, not SDPA
(onnxruntime #21208).

token_type_ids are not a graph input. One text per row means every token type is 0, so the graph
builds them itself (``zeros_like(input_ids)``); onnxruntime's EmbedLayerNormalization fusion still
fires on that pattern, and clients send two tensors, not three.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from embedforge.model import BertVectorModel

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"
UNNORMALIZED_OUTPUT_NAME = "unnormalized_embedding"
DEFAULT_OPSET = 17
SUPPORTED_OPSETS = (14, 15, 16, 17, 18)


class EmbeddingGraph(nn.Module):
    """forward(input_ids, attention_mask) -> (embedding, unnormalized_embedding), token types folded to 0."""

    def __init__(self, model: BertVectorModel) -> None:
        super().__init__()
        self.model = model
        self.fold_token_types = "token_type_ids" in inspect.signature(model.encoder.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        token_type_ids = torch.zeros_like(input_ids) if self.fold_token_types else None
        vectors = self.model.unnormalized(input_ids, attention_mask, token_type_ids)
        return F.normalize(vectors, p=2, dim=-1), vectors


class EncoderGraph(EmbeddingGraph):
    """The encoder alone (token vectors out): the baseline that shows which fusions pooling must keep."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.fold_token_types:
            inputs["token_type_ids"] = torch.zeros_like(input_ids)
        return self.model.encoder(**inputs).last_hidden_state


def load_for_export(model_dir: str | Path) -> BertVectorModel:
    """A saved model in eval mode on CPU, with the eager attention that the ORT fusions recognise."""
    return BertVectorModel.from_pretrained(model_dir, attn_implementation="eager").eval().to("cpu")


def example_inputs(model: BertVectorModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second half padded, so the traced graph contains the masking path."""
    length = min(8, model.max_length)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.encoder.config.vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length // 2:] = 0
    return input_ids, attention_mask


def export_onnx(model: BertVectorModel, path: str | Path, opset: int = DEFAULT_OPSET,
                encoder_only: bool = False) -> Path:
    """Write the model as an ONNX graph to `path` (see the module docstring); `encoder_only` for the baseline."""
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset must be one of {SUPPORTED_OPSETS}, got {opset}")
    attention = getattr(model.encoder.config, "_attn_implementation", "eager")
    if attention != "eager":
        raise ValueError(f"load the model with attn_implementation='eager' before export (it uses {attention!r}); "
                         "onnxruntime cannot fuse the other attention graphs")
    graph = (EncoderGraph if encoder_only else EmbeddingGraph)(model).eval()
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    if encoder_only:
        output_names = ["last_hidden_state"]
        dynamic_axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    else:
        output_names = [OUTPUT_NAME, UNNORMALIZED_OUTPUT_NAME]
        dynamic_axes.update({name: {0: "batch"} for name in output_names})
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is chosen on purpose (see the module docstring): silence its
        # deprecation notice and the tracer's notes about Python values in transformers' code.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(graph, example_inputs(model), str(path), input_names=list(INPUT_NAMES),
                          output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    return path
