"""KL to the base model: a term that holds the tuned model to the base's next-token distribution.

KL(base || tuned) on trained tokens, against forgetting, in two uses that share one base forward:
- `weight` > 0 (`train.kl_to_base`): a penalty of that weight on every trained token;
- `replay` (`train.replay_loss: kl_to_base`): on replay rows (`data.general_mix`) the KL takes the
  place of the cross-entropy, so the model keeps the base's whole distribution on general text
  without learning the replay's style or sharpening on it.

The base model runs on the rows that need it only (replay rows hold replay alone: `data.pack`). For
adapters it is the same model with its adapters disabled, so no second copy sits in memory; for full
fine-tuning the term holds a frozen copy. `ce` (train_loss) stays what each trained token teaches:
its cross-entropy, or on a replay row its KL to the base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX
from ..models import causal_lm
from .sft import output_logits, reference_lm, trained_logits


class KLToBase:
    def __init__(self, *, weight: float, replay: bool, reference=None):
        self.weight, self.replay = weight, replay
        self.logged_sums = ("kl_to_base",) * bool(weight) + ("replay_kl",) * replay
        self.train_only_sums = ("replay_kl",)  # validation holds the user's data only, no replay
        self.frozen = [reference] if reference is not None else []

    def base_logits(self, model, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        """The base model's logits at the trained positions of the batch rows marked in `rows`."""
        subset = {k: v[rows] if v is not None else None for k, v in batch.items()}
        with torch.no_grad(), reference_lm(model, self.frozen) as lm:
            return trained_logits(lm, **subset)

    def add(
        self,
        out: dict,
        *,
        model,
        batch: dict,
        hidden: torch.Tensor,
        token_ce: torch.Tensor,
        is_replay: torch.Tensor | None,
    ) -> None:
        labels = batch["labels"]
        trained = labels != IGNORE_INDEX

        def per_trained_position(row_mask):  # row-major, as the trained positions' hidden states are ordered
            return row_mask[:, None].expand_as(labels)[trained]

        replay_rows = (
            is_replay
            if self.replay and is_replay is not None
            else torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        )
        compared = torch.ones_like(replay_rows) if self.weight else replay_rows  # the rows the base model runs on
        out.update({name: torch.zeros((), device=hidden.device) for name in self.logged_sums})
        if not compared.any():
            return
        on_replay = per_trained_position(replay_rows)
        base_logp = F.log_softmax(self.base_logits(model, batch, compared), -1)
        # Whole distributions on the compared positions only (replay rows, or every row with a penalty).
        tuned_logp = F.log_softmax(output_logits(causal_lm(model), hidden[per_trained_position(compared)]), -1)
        kl = F.kl_div(tuned_logp, base_logp, log_target=True, reduction="none").sum(-1)
        kl_replay = on_replay[per_trained_position(compared)]
        out["ce"] = token_ce[~on_replay].sum() + kl[kl_replay].sum()
        out["loss"] = out["ce"] + self.weight * kl[~kl_replay].sum()
        if self.replay:
            out["replay_kl"] = kl[kl_replay].sum().detach()
        if self.weight:
            out["kl_to_base"] = kl[~kl_replay].sum().detach()
