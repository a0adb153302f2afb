"""The training forward pass without padding tokens.

A batch of short texts padded to its longest one is mostly real tokens, but not all: on STS-B
(length-grouped batches of 16 pairs) 17% of the [2B, T] positions are padding. The linear layers,
GELU, LayerNorm and dropout treat every position alike, so this forward keeps the hidden states
*packed*, as [N, H] rows for the N real tokens only, and re-pads just around attention:

    h      = embeddings(input_ids)[real]                                 # [N, H]
    q,k,v  = h W_qkv + b_qkv                                              # one [H, 3H] product
    ctx    = SDPA(repad(q), repad(k), repad(v), key mask)[real]           # attention on [B, heads, T, d]
    a      = LayerNorm(h + dropout(ctx W_o + b_o))
    h      = LayerNorm(a + dropout(GELU(a W_1 + b_1) W_2 + b_2))

It is the same computation as the transformers module (the same weights and submodules; outputs at
real tokens agree to float rounding), only the work on padding is skipped. The last hidden states are
re-padded with zeros, so pooling is unchanged. Only the BERT layer layout is supported (BERT, RoBERTa,
XLM-R with absolute positions; transformers 4.45 to 5.x lay it out alike); other encoders, or a transformers
release that lays the modules out otherwise, train through their own forward (:func:`choose_packing` logs why).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
# The submodules of each encoder layer that the packed forward calls, and how it calls them.
LAYER_MODULES = ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output", "intermediate", "output")
QKV_MODULES = LAYER_MODULES[:3]

logger = logging.getLogger(__name__)


def packing_unsupported(encoder: nn.Module) -> str | None:
    """Why the packed forward cannot stand in for `encoder`'s own forward; None when it can."""
    config = encoder.config
    if config.model_type not in PACKABLE_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(PACKABLE_MODEL_TYPES)}"
    if config.is_decoder or getattr(config, "add_cross_attention", False):
        return "the encoder is configured as a decoder"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.position_embedding_type!r} is not absolute"
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(getattr(encoder, "embeddings", None), nn.Module) or not layers:
        return f"{type(encoder).__name__} has no embeddings and encoder.layer modules"
    for index, layer in enumerate(layers):
        for name in LAYER_MODULES:
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                return f"encoder layer {index} has no {name} module"
            if name in QKV_MODULES and not (isinstance(module, nn.Linear) and module.bias is not None
                                            and module.out_features == config.hidden_size):
                return f"encoder layer {index}: {name} is not a Linear layer with bias of width {config.hidden_size}"
    return None


def supports_packing(encoder: nn.Module) -> bool:
    """True when `encoder` has the BERT layer layout this forward reimplements."""
    return packing_unsupported(encoder) is None


def choose_packing(encoder: nn.Module, requested: bool) -> bool:
    """Whether to train `encoder` with the packed forward; logs one line when it was asked for but cannot run."""
    reason = packing_unsupported(encoder) if requested else None
    if reason is not None:
        logger.warning("packed training forward off (%s): training through the transformers forward", reason)
    return requested and reason is None


def packed_hidden_states(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states [B, T, H], computed on real tokens only; zeros at padding."""
    batch, length = input_ids.shape
    config = encoder.config
    width, heads = config.hidden_size, config.num_attention_heads
    real = attention_mask.reshape(-1).nonzero().squeeze(1)
    hidden = encoder.embeddings(input_ids=input_ids).reshape(batch * length, width).index_select(0, real)
    key_mask = attention_mask.bool()[:, None, None, :]
    attention_dropout = config.attention_probs_dropout_prob if encoder.training else 0.0
    for layer in encoder.encoder.layer:
        attention = layer.attention.self
        qkv_weight = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight])
        qkv_bias = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias])
        qkv = F.linear(hidden, qkv_weight, qkv_bias)
        padded = qkv.new_zeros(batch * length, 3 * width).index_copy(0, real, qkv)
        query, key, value = padded.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, dropout_p=attention_dropout)
        context = context.transpose(1, 2).reshape(batch * length, width).index_select(0, real)
        attended = layer.attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attended), attended)
    return hidden.new_zeros(batch * length, width).index_copy(0, real, hidden).view(batch, length, width)
