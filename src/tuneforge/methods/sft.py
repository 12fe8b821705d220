"""The supervised objective: cross-entropy on trained tokens only, returned as sums.

It returns sums, never means, so that the loop can divide by the trained tokens of the whole
optimizer step (all micro-batches, all ranks): a mean of per-micro-batch means weights short
examples more than long ones and is wrong under gradient accumulation.

The output layer runs only on positions that carry a label. On chat data most positions are
prompt tokens, so this skips most of the largest matmul and never materialises full-vocabulary
logits for the whole batch.
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


class SFTObjective(nn.Module):
    """Wraps the model so that one forward returns (loss_sum, correct, n_trained) for a batch.

    `labels` are already shifted by the data pipeline: labels[i] is the target for position i.
    Wrapping (rather than calling parts of the model from the loop) keeps DDP's gradient hooks
    on the path it expects: DDP wraps this module.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None):
        lm = causal_lm(self.model)
        hidden = lm.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        trained = labels != IGNORE
        targets = labels[trained]
        logits = output_logits(lm, hidden[trained])
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        correct = (logits.detach().argmax(-1) == targets).sum()
        return loss_sum, correct, trained.sum()
