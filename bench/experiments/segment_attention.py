"""Attention that runs each packed example on its own: causal SDPA per segment, no L x L mask.

    from experiments.segment_attention import use_segment_attention
    use_segment_attention(model)       # a transformers 5 causal LM

A packed row of 1,024 tokens holding ~6 examples is run by transformers' sdpa path as one
1,024 x 1,024 attention with a block-diagonal mask built from the position ids: it computes (and,
for backward, keeps) every query-key pair, although only the pairs inside one example count. This
attention function cuts the row where the position ids restart at 0 and calls
`scaled_dot_product_attention(is_causal=True)` on each example alone: the work drops from L_row²
to the sum of L_i², and no mask is built. Right padding (position ids running on past the last
token, as tuneforge collates it) is its own segment, so padded batches stay exact too.

Registered under the name "segment_sdpa"; transformers then builds no mask at all for it (an
attention implementation it has no mask function for). A bench experiment, not part of tuneforge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "segment_sdpa"


def segment_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
    # query [B, H, L, D], key/value [B, KV, L, D] -> out [B, L, H, D]
    b, h, length, d = query.shape
    groups = h // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device).expand(b, length)
    position_ids = position_ids.expand(b, length)
    rows = []
    for row in range(b):
        starts = (position_ids[row] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        bounds = starts + [length]
        parts = [F.scaled_dot_product_attention(query[row:row + 1, :, s:e], key[row:row + 1, :, s:e],
                                                value[row:row + 1, :, s:e], is_causal=True, scale=scaling)
                 for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if b > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_sdpa)
    return NAME


def use_segment_attention(model) -> None:
    register()
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(target, "set_attn_implementation"):
        target.set_attn_implementation(NAME)
    else:
        target.config._attn_implementation = NAME
