"""What one training step holds beyond the weights: the activations a micro-batch keeps for the backward
and the logits the loss holds at once. `tuneforge validate` adds them to its memory plan; both it and
`tuneforge train` warn from them where a CPU process's allocator will hold much more than that.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from ..data import IGNORE_INDEX
from ..methods.sft import LOGITS_AT_ONCE

# A step's activations and logits from which glibc's malloc, holding what a step frees in fragments it does not
# give back, puts a CPU process's peak well over the memory plan (docs/LOG.md, "jemalloc against glibc's malloc").
FRAGMENTING_STEP_BYTES = 2**28

# Allocators that give freed memory back, found by name among the libraries a process has mapped.
RETURNING_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def step_shape(cfg, rows: list, micro_batch_rows: int) -> tuple[int, int, float]:
    """The rows a micro-batch's forward runs, the longest row's tokens and the share of tokens that train, for
    `rows` made into `micro_batch_rows`-row micro-batches: grpo trains each prompt as `group_size` sampled
    answers of up to `max_new_tokens` each. The share sizes distillation's logits alone (`step_bytes`), so it is
    counted, a pass over every token, for distillation only."""
    longest = max(len(r) for r in rows)
    trained_share = 1.0
    if cfg.method == "distill":
        trained_share = sum(len(r.labels) - r.labels.count(IGNORE_INDEX) for r in rows) / sum(len(r) for r in rows)
    if cfg.method == "grpo":
        return micro_batch_rows * cfg.grpo.group_size, longest + cfg.grpo.max_new_tokens, trained_share
    return micro_batch_rows, longest, trained_share


def step_bytes(config, cfg, tokens: int, precision: str, trained_share: float = 1.0) -> dict:
    """Bytes of a micro-batch of `tokens` tokens: the activations it keeps (per layer, or only at layer
    boundaries with gradient checkpointing) and the logits the loss holds at once (`trained_share` of the
    tokens train). Sized by the text model's settings (a model that also reads images keeps them in
    `text_config`)."""
    config = config.get_text_config()
    per_token_layer = config.hidden_size * (2 if precision == "bf16" else 4)
    kept = 2 if cfg.train.gradient_checkpointing else layer_activations(config, cfg)
    activations = tokens * config.num_hidden_layers * per_token_layer * kept
    logits = min(tokens * config.vocab_size, LOGITS_AT_ONCE) * 4 * 2  # the logits and their gradient
    if cfg.method == "distill":
        logits = distill_logits_bytes(cfg, tokens, tokens * trained_share, config.vocab_size)
    if cfg.method == "reward":  # one score per reply, no vocabulary logits
        logits = 0
    return {"activations": activations, "logits": logits}


def layer_activations(config, cfg) -> float:
    """Hidden-sized tensors a decoder layer keeps per token for the backward, without gradient
    checkpointing: about 10 (norm inputs and outputs, queries, keys, values, attention output) and 4
    intermediate-sized ones of the MLP (gate, up, activation, product), so wide MLPs (Qwen, Gemma)
    keep more. Adapter dropout keeps a dropped-out copy of each adapted linear layer's input and its
    mask (all-linear: about 7 hidden-sized and 1 intermediate-sized). Measured with autograd's saved-tensor
    hooks."""
    mlp = (getattr(config, "intermediate_size", None) or 4 * config.hidden_size) / config.hidden_size
    dropout = cfg.trains_adapters and cfg.lora.dropout > 0
    return 10 + 4 * mlp + (7 + mlp if dropout else 0)


def distill_logits_bytes(cfg, tokens: float, trained: float, vocab: int) -> float:
    """Distillation compares whole distributions, unchunked: at every compared position (every token
    before a row's last trained one with `positions: all`, else the trained ones) it holds the
    student's logits, their log-softmax and their gradient, and online the teacher's log-softmax too;
    at each trained position the cross-entropy and the divergence's terms hold a few more. Counts of
    vocabulary-wide fp32 tensors, measured with autograd's saved-tensor hooks (and one for the gradient)."""
    compared = tokens if cfg.distill.positions == "all" else trained
    per_compared, per_trained = (2, 4) if cfg.distill.teacher_top_k is not None else (3, 6)
    return (compared * per_compared + trained * per_trained) * vocab * 4


def allocator_warning(device: torch.device, step_bytes: float) -> str | None:
    """What to do where glibc's malloc will hold a CPU process's freed activations (`step_bytes` a step): its
    freed large blocks raise the size from which it maps a block on its own, so a step's tensors come from
    the heap, where a small block still in use above them keeps the span resident after they are freed. None
    on a GPU, for small steps, under another C library, or with an allocator preloaded that returns memory."""
    if device.type != "cpu" or step_bytes < FRAGMENTING_STEP_BYTES or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mapped = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    if any(name in mapped for name in RETURNING_ALLOCATORS):
        return None
    return (
        f"a step's activations and logits ({step_bytes / 2**30:.2f} GiB) on this CPU: glibc's malloc keeps what a "
        "step frees in fragments it does not give back, so the process can peak at twice the memory plan "
        "or more; preload jemalloc to avoid it (Debian/Ubuntu: apt-get install libjemalloc2, then "
        f"LD_PRELOAD=/usr/lib/{platform.machine()}-linux-gnu/libjemalloc.so.2 tuneforge train ...)"
    )
