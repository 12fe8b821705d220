"""Attention for training rows: each packed example attends to itself alone, computed example by example.

A packed row of 1,024 tokens holding six chats goes through transformers' sdpa path as one
1,024 x 1,024 attention with a block-diagonal mask built from the position ids: every query-key
pair is computed (and kept for backward), although only pairs inside one example count. Here the
row is cut where the position ids restart and each example runs through
`scaled_dot_product_attention(is_causal=True)` on its own: the work drops from L_row² to the sum
of L_i², no mask is built, and the causal kernel skips the upper triangle, which makes a LoRA step
on packed rows faster (BENCHMARKS.md: tuneforge against `tuneforge_model_attention`).

Rows with a shared prefix (`data.pack(share_prefixes=True)`: chats that open with the same system
prompt) hold the prefix once. An example whose position ids start at p > 0 continues the first p
tokens of the last example that started at 0: its queries attend to those p keys and causally to
its own, so its logits and gradients are those of the whole example run alone, for less work.

Right padding is exact as well: `data.collate` restarts the position ids of the padding at 0, so
padding is an example of its own that no real token attends to.

Only the training loop's forward passes use it (`per_example_attention(model)`): they carry no
KV cache and no padding mask. Generation (left padding, a cache) keeps the model's own attention:
generation inside the loop's block (its sample answers) runs within `own_attention`.
A model whose attention is not plain causal softmax attention over the whole example (a sliding
window shorter than the rows, soft-capped attention logits) keeps its own attention too.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

NAME = "tuneforge_per_example"


def segments(positions: list[int]) -> list[tuple[int, int, int, int]]:
    """[(start, end, first position id, start of the prefix it continues)] of one row.

    An example starts where the position ids do not go up by one. One that starts at 0 stands alone;
    one that starts at p > 0 continues the first p tokens of the last example that started at 0
    (`pack` with `share_prefixes`).
    """
    found, owner, owner_length, start = [], 0, 0, 0
    for t in range(1, len(positions) + 1):
        if t < len(positions) and positions[t] == positions[t - 1] + 1:
            continue
        first = positions[start]
        if first == 0:
            owner, owner_length = start, t - start
        elif first > owner_length:
            raise RuntimeError(
                f"position ids at {start} continue a prefix of {first} tokens that the row does not hold"
            )
        found.append((start, t, first, owner))
        start = t
    return found


def per_example_sdpa(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, position_ids=None, **kwargs
):
    """transformers attention-function signature: query [B, H, L, D], key/value [B, KV, L, D] -> [B, L, H, D]."""
    batch, _, length, _ = query.shape
    if attention_mask is not None or key.shape[2] != length:
        raise RuntimeError("per-example attention serves training rows only (no KV cache, no padding mask)")
    if position_ids is None:
        position_ids = torch.zeros(1, length, dtype=torch.long)
    dropout = dropout if module.training else 0.0
    gqa = key.shape[1] != query.shape[1]
    rows = []
    for b, row_segments in enumerate(_batch_segments(position_ids, batch, length)):
        parts = []
        for start, end, first, owner in row_segments:
            q, k, v = query[b : b + 1, :, start:end], key[b : b + 1, :, start:end], value[b : b + 1, :, start:end]
            if first == 0:
                parts.append(
                    F.scaled_dot_product_attention(
                        q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa
                    )
                )
                continue
            # A continuation of a shared prefix: all of the prefix, then causal over itself.
            k = torch.cat([key[b : b + 1, :, owner : owner + first], k], dim=2)
            v = torch.cat([value[b : b + 1, :, owner : owner + first], v], dim=2)
            mask = torch.ones(end - start, first + end - start, dtype=torch.bool, device=query.device).tril(first)
            parts.append(
                F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
                )
            )
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if batch > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


_last_segments: tuple[weakref.ref, int | None, list] | None = None
"""The position ids `_batch_segments` last read, their version (an in-place change moves it; None for an
inference tensor, which has none), and their rows' segments."""


def _batch_segments(position_ids: torch.Tensor, batch: int, length: int) -> list[list[tuple[int, int, int, int]]]:
    """Each row's `segments`. Every layer of a forward pass (and its recomputation under gradient
    checkpointing) gets the same position-id tensor, so its segments are read once: reading them moves the
    ids to the host, and on a GPU each such read waits for all the work queued before it."""
    global _last_segments
    # A tensor made under torch.inference_mode (evaluation's forward passes) has no version counter, and is
    # not changed in place while the passes that read it run: it is known by its identity alone.
    current = None if position_ids.is_inference() else position_ids._version
    if _last_segments is not None:
        read, version, found = _last_segments
        if read() is position_ids and version == current:
            return found
    found = [segments(row) for row in position_ids.expand(batch, length).tolist()]
    _last_segments = (weakref.ref(position_ids), current, found)
    return found


def supports_per_example_attention(config, max_length: int) -> bool:
    """Whether the model's attention is plain causal attention over rows of `max_length` tokens."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window is not None and getattr(text, "use_sliding_window", True) and window < max_length:
        return False
    return not getattr(text, "attn_logit_softcapping", None)


@contextmanager
def per_example_attention(*lms) -> Iterator[None]:
    """Run each of `lms` (transformers causal LMs) with per-example attention inside the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, per_example_sdpa)
    before = [lm.config._attn_implementation for lm in lms]
    for lm, implementation in zip(lms, before):
        _own[lm] = implementation
        lm.set_attn_implementation(NAME)
    try:
        yield
    finally:
        for lm, implementation in zip(lms, before):
            lm.set_attn_implementation(implementation)
            _own.pop(lm, None)


_own: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Each causal LM inside `per_example_attention`, and the attention implementation it had before."""


@contextmanager
def own_attention(*lms) -> Iterator[None]:
    """Inside `per_example_attention`, run each of `lms` with its own attention again (generation, which
    needs a KV cache); an LM outside it is left as it is."""
    inside = [lm for lm in lms if lm in _own]
    for lm in inside:
        lm.set_attn_implementation(_own[lm])
    try:
        yield
    finally:
        for lm in inside:
            lm.set_attn_implementation(NAME)
