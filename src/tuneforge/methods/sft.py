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

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def causal_lm(model):
    """The transformers causal LM inside a PEFT wrapper (adapters are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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


class SFTObjective(nn.Module):
    """Wraps the model so that one forward returns sums for a batch: `loss` (what to backpropagate),
    `ce`, `correct`, `tokens` and, with a KL penalty, `kl`.

    `labels` are already shifted by the data pipeline: labels[i] is the target for position i.
    Wrapping (rather than calling parts of the model from the loop) keeps DDP's gradient hooks on
    the path it expects: DDP wraps this module.
    """

    def __init__(self, model, *, kl_to_base: float = 0.0, reference: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.kl_to_base = kl_to_base
        # A frozen reference is kept outside the module tree so DDP and the optimizer never see it.
        self._reference = [reference] if reference is not None else []

    def base_logits(self, **batch) -> torch.Tensor:
        with torch.no_grad():
            if self._reference:
                return trained_logits(causal_lm(self._reference[0]), **batch)
            with self.model.disable_adapter():
                return trained_logits(causal_lm(self.model), **batch)

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None):
        batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask)
        logits = trained_logits(causal_lm(self.model), **batch)
        targets = labels[labels != IGNORE]
        ce = F.cross_entropy(logits, targets, reduction="sum")
        out = {"ce": ce, "correct": (logits.detach().argmax(-1) == targets).sum(), "tokens": targets.numel(), "loss": ce}
        if self.kl_to_base:
            base_logp = F.log_softmax(self.base_logits(**batch), -1)
            kl = F.kl_div(F.log_softmax(logits, -1), base_logp, log_target=True, reduction="sum")
            out["kl"] = kl.detach()
            out["loss"] = ce + self.kl_to_base * kl
        return out
