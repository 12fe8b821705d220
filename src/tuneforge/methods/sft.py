"""The supervised objective: cross-entropy on trained tokens only, returned as sums.

It returns sums, never means, so that the loop can divide by the trained tokens of the whole
optimizer step (all micro-batches, all ranks): a mean of per-micro-batch means weights short
examples more than long ones and is wrong under gradient accumulation.

The output layer runs only on positions that carry a label. On chat data most positions are
prompt tokens, so this skips most of the largest matmul and never materialises full-vocabulary
logits for the whole batch.

With `kl_to_base` > 0 the objective adds a penalty KL(base || tuned) on the trained positions, a
mitigation for forgetting. With `replay_kl` the rows marked `general` (general replay examples,
`train.replay_loss: kl_to_base`) learn KL(base || tuned) instead of their text: the tuned model is
held to the base's whole next-token distribution on general conversations, which keeps general
behaviour without teaching the replay's style or sharpening the model on it. The base model runs
on those rows only. For adapters the base is the same model with its adapters disabled, so no
second copy sits in memory; for full fine-tuning the loop passes a frozen copy.
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


def label_sums(logits: torch.Tensor, targets: torch.Tensor, learned: torch.Tensor | None = None) -> dict:
    """Summed cross-entropy on the labels, correct top-1 predictions and the token count; `loss` is the
    CE of the positions marked in `learned` (all of them by default)."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    return {"ce": ce.sum(), "correct": (logits.detach().argmax(-1) == targets).sum(), "tokens": targets.numel(),
            "loss": ce.sum() if learned is None else ce[learned].sum()}


class SFTObjective(nn.Module):
    """Wraps the model so that one forward returns sums for a batch: `loss` (what to backpropagate),
    `ce`, `correct`, `tokens` and, with a KL penalty or KL replay, `kl_to_base` and `replay_kl`.

    `logged_sums` names the sums beyond the CE and accuracy that the loop logs per trained token.
    `ce` (train_loss) is what each trained token teaches: its cross-entropy, or on a KL replay row
    its KL to the base, since the replay's text is no target there.

    `labels` are already shifted by the data pipeline: labels[i] is the target for position i.
    Wrapping (rather than calling parts of the model from the loop) keeps DDP's gradient hooks on
    the path it expects: DDP wraps this module.
    """

    def __init__(self, model, *, kl_to_base: float = 0.0, replay_kl: bool = False, reference: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.kl_to_base = kl_to_base
        self.logged_sums = ("kl_to_base",) * bool(kl_to_base) + ("replay_kl",) * replay_kl
        # A frozen reference is kept outside the module tree so DDP and the optimizer never see it.
        self.frozen = [reference] if reference is not None else []

    def base_logits(self, **batch) -> torch.Tensor:
        with torch.no_grad(), reference_lm(self.model, self.frozen) as lm:
            return trained_logits(lm, **batch)

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, general=None):
        batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask)
        trained = labels != IGNORE
        replay = general if general is not None else torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        on_replay = replay[:, None].expand_as(labels)[trained]  # per trained position, row-major like the logits
        logits = trained_logits(causal_lm(self.model), **batch)
        out = label_sums(logits, labels[trained], learned=~on_replay)
        out.update({name: torch.zeros((), device=logits.device) for name in self.logged_sums})
        compared = torch.ones_like(replay) if self.kl_to_base else replay  # the rows the base model runs on
        if not compared.any():
            return out
        on_compared = compared[:, None].expand_as(labels)[trained]
        base_logp = F.log_softmax(self.base_logits(**{k: v[compared] if v is not None else None for k, v in batch.items()}), -1)
        kl = F.kl_div(F.log_softmax(logits[on_compared], -1), base_logp, log_target=True, reduction="none").sum(-1)
        kl_replay = on_replay[on_compared]
        out["ce"] = out["loss"] + kl[kl_replay].sum()
        out["loss"] = out["ce"] + self.kl_to_base * kl[~kl_replay].sum()
        if "replay_kl" in out:
            out["replay_kl"] = kl[kl_replay].sum().detach()
        if self.kl_to_base:
            out["kl_to_base"] = kl[~kl_replay].sum().detach()
        return out
