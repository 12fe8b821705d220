"""The supervised objective: cross-entropy on trained tokens only, returned as sums.

It returns sums, never means, so that the loop can divide by the trained tokens of the whole
optimizer step (all micro-batches, all ranks): a mean of per-micro-batch means weights short
examples more than long ones and is wrong under gradient accumulation.

The output layer runs only on positions that carry a label. On chat data most positions are
prompt tokens, so this skips most of the largest matmul and never materialises full-vocabulary
logits for the whole batch.

With `kl_to_base` > 0 the objective adds a penalty KL(base || tuned) on the trained positions, a
mitigation for forgetting. For adapters the base is the same model with its adapters disabled, so
no second copy sits in memory; for full fine-tuning the loop passes a frozen copy.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def causal_lm(model):
    """The transformers causal LM inside a PEFT wrapper (adapters are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def reference_lm(model, frozen_copy: list):
    """The model to compare against, as a causal LM: the frozen copy when there is one (full
    fine-tuning), else the same model with its adapters disabled (no second copy in memory)."""
    if frozen_copy:
        yield causal_lm(frozen_copy[0])
        return
    with model.disable_adapter():
        yield causal_lm(model)


def output_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    logits = lm.get_output_embeddings()(hidden).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def trained_logits(lm, input_ids, labels, position_ids=None, attention_mask=None) -> torch.Tensor:
    """Logits at the positions that carry a label, in order: [n_trained, vocab]."""
    hidden = lm.get_decoder()(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    return output_logits(lm, hidden[labels != IGNORE])


def label_sums(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Summed cross-entropy on the labels, correct top-1 predictions and the token count; `loss` is the CE."""
    ce = F.cross_entropy(logits, targets, reduction="sum")
    return {"ce": ce, "correct": (logits.detach().argmax(-1) == targets).sum(), "tokens": targets.numel(), "loss": ce}


class SFTObjective(nn.Module):
    """Wraps the model so that one forward returns sums for a batch: `loss` (what to backpropagate),
    `ce`, `correct`, `tokens` and, with a KL penalty, `kl_to_base`.

    `logged_sums` names the sums beyond the CE and accuracy that the loop logs per trained token.

    `labels` are already shifted by the data pipeline: labels[i] is the target for position i.
    Wrapping (rather than calling parts of the model from the loop) keeps DDP's gradient hooks on
    the path it expects: DDP wraps this module.
    """

    def __init__(self, model, *, kl_to_base: float = 0.0, reference: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.kl_to_base = kl_to_base
        self.logged_sums = ("kl_to_base",) if kl_to_base else ()
        # A frozen reference is kept outside the module tree so DDP and the optimizer never see it.
        self.frozen = [reference] if reference is not None else []

    def base_logits(self, **batch) -> torch.Tensor:
        with torch.no_grad(), reference_lm(self.model, self.frozen) as lm:
            return trained_logits(lm, **batch)

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None):
        batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask)
        logits = trained_logits(causal_lm(self.model), **batch)
        out = label_sums(logits, labels[labels != IGNORE])
        if self.kl_to_base:
            base_logp = F.log_softmax(self.base_logits(**batch), -1)
            kl = F.kl_div(F.log_softmax(logits, -1), base_logp, log_target=True, reduction="sum")
            out["kl_to_base"] = kl.detach()
            out["loss"] = out["ce"] + self.kl_to_base * kl
        return out
