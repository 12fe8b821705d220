"""The supervised objective: cross-entropy on trained tokens only, returned as sums; plus the pieces
every objective shares (logits at trained positions, the model to compare against).

It returns sums, never means, so that the loop can divide by the trained tokens of the whole
optimizer step (all micro-batches, all ranks): a mean of per-micro-batch means weights short
examples more than long ones and is wrong under gradient accumulation.

The output layer runs only on positions that carry a label. On chat data most positions are
prompt tokens, so this skips most of the largest matmul and never materialises full-vocabulary
logits for the whole batch. Beyond `LOGITS_AT_ONCE` logits (a big vocabulary times many trained
tokens), the output layer and the cross-entropy run in chunks, so the loss's memory stays bounded
whatever the vocabulary and the batch. Through a frozen output layer (adapters), each chunk's
gradient is taken in the forward pass and its logits freed at once: nothing is recomputed. Through a
trained one (full fine-tuning), each chunk's logits are recomputed in the backward pass.

Regularisers are terms the objective takes (`terms`, e.g. `kl_to_base.KLToBase`): after the
cross-entropy, each term sees the logits and per-token losses and adds to the sums.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from ..data import IGNORE_INDEX
from ..models import causal_lm


@contextmanager
def reference_lm(model, frozen_copy: list):
    """The model to compare against, as a causal LM: the frozen copy when there is one (full
    fine-tuning), else the same model with its adapters disabled (no second copy in memory). It runs
    in eval mode: the base model as it is, without training-time noise (NEFTune) or dropout."""
    if frozen_copy:
        yield causal_lm(frozen_copy[0])
        return
    lm = causal_lm(model)
    was_training = lm.training
    with model.disable_adapter():
        lm.eval()
        try:
            yield lm
        finally:
            lm.train(was_training)


def output_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    logits = lm.get_output_embeddings()(hidden).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def reads_3d_positions(lm) -> bool:
    """Whether the model places tokens by M-RoPE's 3-D positions (Qwen2-VL, Qwen2.5-VL)."""
    return "mrope_section" in (getattr(lm.config.get_text_config(), "rope_parameters", None) or {})


def trained_hidden(lm, input_ids, labels, position_ids=None, attention_mask=None, **images) -> torch.Tensor:
    """The decoder's last hidden states at the positions that carry a label, in order (row-major): [n_trained, d].
    A batch that shows images (`images`: `pixel_values`, `token_type_ids`) runs through the model that
    reads them (the vision encoder's features in place of the image tokens), not the text decoder alone."""
    body = lm.model if images else lm.get_decoder()
    if position_ids is not None and position_ids.ndim == 2 and reads_3d_positions(lm):
        # M-RoPE (Qwen2-VL) reads 2-D position ids as 3-D ones and then derives no per-example mask from them:
        # transformers takes text positions first, [4, rows, tokens], so packed examples stay apart.
        position_ids = position_ids.expand(4, *position_ids.shape)
    hidden = body(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **images
    ).last_hidden_state
    return hidden[labels != IGNORE_INDEX]


def trained_logits(lm, input_ids, labels, position_ids=None, attention_mask=None) -> torch.Tensor:
    """Logits at the positions that carry a label, in order (row-major): [n_trained, vocab]."""
    return output_logits(lm, trained_hidden(lm, input_ids, labels, position_ids, attention_mask))


LOGITS_AT_ONCE = 2**24
"""Logits (floats) the cross-entropy holds at once, 64 MiB in fp32: past it, it runs in chunks."""


def _ce_and_correct(lm, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = output_logits(lm, hidden)
    return F.cross_entropy(logits, targets, reduction="none"), (logits.detach().argmax(-1) == targets).sum()


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Each position's cross-entropy through a frozen output layer, chunk by chunk, with the gradient
    with respect to the hidden states taken in the forward pass. A position's loss depends on its own
    hidden state alone, so the backward pass is that gradient scaled row by row by the incoming one:
    one chunk of logits lives at a time, and none is kept or recomputed."""

    @staticmethod
    def forward(ctx, hidden, lm, targets, per_chunk):
        losses, grads, correct = [], [], 0
        for start in range(0, len(targets), per_chunk):
            chunk = hidden[start : start + per_chunk].detach().requires_grad_()
            with torch.enable_grad():
                ce, right = _ce_and_correct(lm, chunk, targets[start : start + per_chunk])
                (grad,) = torch.autograd.grad(ce.sum(), chunk)
            losses.append(ce.detach())
            grads.append(grad)
            correct = correct + right
        ctx.save_for_backward(torch.cat(grads))
        ctx.mark_non_differentiable(correct)
        return torch.cat(losses), correct

    @staticmethod
    def backward(ctx, grad_losses, _grad_correct):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses.unsqueeze(1).to(grad_hidden.dtype), None, None, None


def token_cross_entropy(lm, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trained position's cross-entropy [n] and the count of correct top-1 predictions, from the hidden
    states at those positions. Up to `LOGITS_AT_ONCE` logits in one go; beyond, chunk by chunk: through
    a frozen output layer with the gradient taken as each chunk runs, through a trained one (or a
    sharded one, whose hooks expect the usual backward pass) with each chunk's logits recomputed in the
    backward pass instead of kept."""
    weight = lm.get_output_embeddings().weight
    per_chunk = max(1, LOGITS_AT_ONCE // weight.shape[0])
    if len(targets) <= per_chunk:
        return _ce_and_correct(lm, hidden, targets)
    frozen_head = not weight.requires_grad and not isinstance(weight, DTensor)
    if frozen_head and torch.is_grad_enabled() and hidden.requires_grad:
        return _FrozenHeadCrossEntropy.apply(hidden, lm, targets, per_chunk)
    chunks = [
        checkpoint(
            _ce_and_correct,
            lm,
            hidden[start : start + per_chunk],
            targets[start : start + per_chunk],
            use_reentrant=False,
        )
        for start in range(0, len(targets), per_chunk)
    ]
    return torch.cat([ce for ce, _ in chunks]), sum(correct for _, correct in chunks)


def label_sums(token_ce: torch.Tensor, correct: torch.Tensor, targets: torch.Tensor) -> dict:
    """From each trained position's cross-entropy (`token_ce`) and the correct top-1 predictions: the
    summed cross-entropy (`ce`, and `loss` to backpropagate), `correct` and the token count."""
    return {"loss": token_ce.sum(), "ce": token_ce.sum(), "correct": correct, "tokens": targets.numel()}


class SFTObjective(nn.Module):
    """Wraps the model so that one forward returns sums for a batch: `loss` (what to backpropagate),
    `ce`, `correct` and `tokens`, and whatever its terms add.

    `logged_sums` names the sums beyond the CE and accuracy that the loop logs per trained token,
    `train_only_sums` those that validation leaves out. `labels` are already shifted by the data
    pipeline: labels[i] is the target for position i. Wrapping (rather than calling parts of the
    model from the loop) keeps DDP's gradient hooks on the path it expects: DDP wraps this module.
    """

    def __init__(self, model, terms: tuple = ()):
        super().__init__()
        self.model = model
        self.terms = terms
        self.logged_sums = tuple(name for term in terms for name in term.logged_sums)
        self.train_only_sums = tuple(name for term in terms for name in term.train_only_sums)
        # A term's frozen reference copy, kept outside the module tree so DDP and the optimizer never see it.
        self.frozen = [copy for term in terms for copy in term.frozen]

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, is_replay=None, **images):
        batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask)
        lm = causal_lm(self.model)
        hidden = trained_hidden(lm, **batch, **images)
        targets = labels[labels != IGNORE_INDEX]
        token_ce, correct = token_cross_entropy(lm, hidden, targets)
        out = label_sums(token_ce, correct, targets)
        for term in self.terms:
            term.add(out, model=self.model, batch=batch, hidden=hidden, token_ce=token_ce, is_replay=is_replay)
        return out
