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
XLM-R with absolute positions); other encoders train through their own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKABLE_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


def supports_packing(encoder: nn.Module) -> bool:
    """True when `encoder` has the BERT layer layout this forward reimplements."""
    config = encoder.config
    return (config.model_type in PACKABLE_MODEL_TYPES and not config.is_decoder
            and getattr(config, "position_embedding_type", "absolute") == "absolute")


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
