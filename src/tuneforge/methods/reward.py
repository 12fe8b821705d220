"""Reward models: a sequence classifier with one output learns to score the chosen reply of each pair
above the rejected one (TRL's RewardTrainer, LLaMA-Factory's `stage: rm`).

The base loads as transformers' `AutoModelForSequenceClassification` with `num_labels=1` (its `score`
head new), the tokenizer's pad token set as its pad token. The reward r(y) of a reply is the score at
the example's last token that is not the pad token, the token transformers' classifier pools at, so
the saved model scores a rendered conversation as training scored it. For a pair (chosen c, rejected r)
the loss is Bradley-Terry's

    -log sigmoid(r(c) - r(r) - m)   [+ center_rewards_coefficient (r(c) + r(r))^2, TRL's centring term]

where m is the row's `margin` (Llama 2's margin loss, TRL's RewardTrainer `margin` column), 0 where the row
gives none
and the metrics are TRL's: `accuracy`, the share of pairs whose chosen reply scores higher, and
`margin`, the mean r(c) - r(r). The data are DPO's preference pairs, rendered as DPO renders them
and laid out as its rows (`dpo.rows`: each pair its chosen example then its rejected one, position ids
restarting where each begins), so one forward scores both replies of every pair; `count` is the pairs.

With `reward.trains: lora` or `dora` the adapter trains over the frozen base and PEFT's task type
SEQ_CLS trains and saves the score head whole (modules_to_save); with `full` every weight trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..models import causal_lm
from .dpo import count_pairs, prepare_policy


def prepare_model(model, cfg):
    return prepare_policy(model, cfg, "full" if cfg.reward.trains == "full" else "lora")


def last_token_positions(input_ids, labels, position_ids, pad_id: int) -> torch.Tensor:
    """For each example of the batch with trained tokens (row-major, as `dpo.example_ids` counts them), the
    flat index of its last token that is not `pad_id`: where transformers' sequence classifier takes its
    score. An example starts where its position ids restart at 0 (and at each row's start)."""
    starts = torch.zeros_like(labels, dtype=torch.bool) if position_ids is None else position_ids == 0
    starts[:, 0] = True
    segment = starts.flatten().cumsum(0)
    examples = torch.unique(segment[labels.flatten() != IGNORE_INDEX])
    index = torch.arange(segment.numel(), device=segment.device)
    kept = input_ids.flatten() != pad_id
    last = torch.full((int(segment[-1]) + 1,), -1, dtype=torch.long, device=segment.device)
    last = last.scatter_reduce(0, segment[kept], index[kept], reduce="amax")
    return last[examples]


def example_rewards(model, input_ids, labels, position_ids=None, attention_mask=None, *, pad_id: int):
    """The reward of each example of the batch with trained tokens, in order: [examples]."""
    classifier = causal_lm(model)
    hidden = classifier.get_decoder()(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    at = last_token_positions(input_ids, labels, position_ids, pad_id)
    return classifier.score(hidden.flatten(0, 1)[at]).squeeze(-1).float()


def pair_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    center_rewards_coefficient: float | None = None,
    margin: torch.Tensor | None = None,
):
    """Bradley-Terry's loss of each pair from its two rewards, less each pair's `margin` where the rows give
    one (Llama 2's margin loss, as TRL's RewardTrainer computes it), with TRL's centring term where asked."""
    difference = chosen - rejected
    losses = -F.logsigmoid(difference if margin is None else difference - margin.to(difference))
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


class RewardObjective(nn.Module):
    """One forward returns sums over the batch's pairs: `loss`, and for the logs `accuracy` (pairs ranked
    right) and `margin` (r(c) - r(r))."""

    logged_sums = ("accuracy", "margin")
    train_only_sums = ()
    reported_sums = {"loss": "loss"}
    count = staticmethod(count_pairs)

    def __init__(self, model, *, pad_id: int, center_rewards_coefficient: float | None = None):
        super().__init__()
        self.model, self.pad_id = model, pad_id
        self.center_rewards_coefficient = center_rewards_coefficient
        self.frozen = []

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, margin=None):
        rewards = example_rewards(self.model, input_ids, labels, position_ids, attention_mask, pad_id=self.pad_id)
        if rewards.numel() % 2:
            raise ValueError(
                f"a reward model's batch holds whole (chosen, rejected) pairs, but this one has {rewards.numel()} "
                "examples; build its rows with methods.dpo.rows"
            )
        chosen, rejected = rewards[0::2], rewards[1::2]
        if margin is not None and margin.numel() != chosen.numel():
            raise ValueError(
                f"a reward model's batch has {chosen.numel()} pairs but {margin.numel()} margins; collate rows "
                "that hold whole pairs (methods.dpo.rows)"
            )
        difference = (chosen - rejected).detach()
        return {
            "loss": pair_losses(chosen, rejected, self.center_rewards_coefficient, margin).sum(),
            "accuracy": (difference > 0).sum(),
            "margin": difference.sum(),
        }


def build_objective(model, cfg, tokenizer) -> RewardObjective:
    # The classifier reads its pad token to find the last token of a padded row; a base that has none (Llama
    # 3's config) takes the tokenizer's, which the saved model then keeps.
    causal_lm(model).config.pad_token_id = tokenizer.pad_token_id
    return RewardObjective(
        model, pad_id=tokenizer.pad_token_id, center_rewards_coefficient=cfg.reward.center_rewards_coefficient
    )
