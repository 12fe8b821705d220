"""Direct preference optimisation: the policy learns to prefer the chosen reply of each pair.

For a pair (chosen c, rejected r) with prompt x, and the policy's and the frozen reference's
log-probabilities of each reply summed over its trained tokens (the reply and its end of turn,
never the prompt), the log-ratio margin is

    h = [log pi(c|x) - log ref(c|x)] - [log pi(r|x) - log ref(r|x)]

and the loss of the pair is

    sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (Rafailov et al.; eps is
             `label_smoothing`, the share of pairs assumed flipped: conservative DPO)
    ipo      (h - 1 / (2 beta))^2   (Azar et al.; the paper's sequence log-probabilities, not
             per-token means)

The reward of a reply is beta (log pi - log ref); `rewards/accuracies` is the share of pairs whose
chosen reply has the higher reward. At the start the policy is the reference, so h = 0 and the
sigmoid loss is log 2.

Two losses need no reference model, so none is built, held or run. With the policy's log-probability
of each reply averaged over its trained tokens, m(y) = log pi(y|x) / |y|:

    simpo    sigmoid's loss with beta h = beta m(c) - beta m(r) - gamma   (Meng et al.; gamma is
             `simpo_gamma`, the target margin; TRL's CPOTrainer with loss_type: simpo)
    orpo     -m(c) - lambda log sigmoid(o(c) - o(r)), o(y) = m(y) - log(1 - exp m(y)) the log odds
             (Hong et al.; lambda is `orpo_lambda`; TRL's ORPOTrainer): SFT on the chosen reply and
             the preference in one stage

Their reward of a reply is beta m(y) (simpo) or lambda m(y) (orpo), as TRL logs it; orpo also logs
`nll_loss` (the chosen reply's NLL per token) and `log_odds_chosen` (o(c) - o(r)), per pair.

KTO (Ethayarajh et al.; TRL's KTOTrainer) trains on single replies rated desirable or undesirable,
not pairs. With r(y) = log pi(y|x) - log ref(y|x) a reply's log-ratio and z0 the KL estimate, the
loss of a reply is

    desirable    w_d (1 - sigmoid(beta (r(y) - z0)))
    undesirable  w_u (1 - sigmoid(beta (z0 - r(y))))

(w_d, w_u are `desirable_weight`, `undesirable_weight`). z0 is TRL's estimate of KL(pi || ref): the
mean log-ratio, over the batch, of mismatched examples, each rated row's prompt with the reply of
a row before it in the data with another prompt (`kto_rows`), detached and clamped at 0; on several
processes the mean is over every process's micro-batch of the moment (TRL gathers it so). Each rated
example and its mismatched one are one item, laid end to end as a pair is, so one forward runs both
(the mismatched ones train nothing). Its metrics are TRL's: `rewards/chosen` and `rewards/rejected` (beta r(y),
averaged over the desirable and the undesirable replies), `logps/chosen` and `logps/rejected` (log
pi(y|x), likewise), and `kl` (z0).

Pairs arrive as rows (see `rows`): each pair is its chosen example then its rejected example,
packed like any examples (position ids restart at 0 where each begins), so one forward runs both
replies of every pair in the batch. The objective returns sums over pairs and `count` says how many
pairs a batch holds: the loop divides by the pairs of the whole optimizer step, so gradient
accumulation and the number of processes do not change the loss.

The reference of sigmoid and ipo: with `dpo.policy: lora` the same model with its adapter disabled (no second copy);
with `full` a frozen copy of the starting model, kept outside the module tree. A `base_model` that
is a LoRA run (an SFT run, say) is merged into its base when loaded, so the policy's fresh adapter
sits on the SFT model and the reference is the SFT model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import data as tfdata
from ..data import IGNORE_INDEX
from ..data.schema import token_array
from ..errors import ConfigError, TuneforgeError
from ..models import causal_lm, frozen_base
from ..models.quantization import is_quantized
from . import full, lora
from .sft import reference_lm, token_cross_entropy, trained_hidden

LOSSES = ("sigmoid", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


def prepare_model(model, cfg):
    return prepare_policy(model, cfg, cfg.dpo.policy)


def prepare_policy(model, cfg, policy: str):
    """Merge a starting adapter into its base (the reference is the model a run starts from), then make
    trainable what `policy` says: dpo's and grpo's policy."""
    if hasattr(model, "merge_and_unload") and is_quantized(model):
        refuse_quantized_merge(cfg)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return {"full": full.prepare_model, "lora": lora.prepare_model}[policy](model, cfg)


def check_start(cfg, source) -> None:
    """Before any data or weights: dpo and grpo start from a LoRA run (`source`: the resolved base_model) by
    merging its adapter, which a quantized base cannot hold."""
    if source.adapter is not None and cfg.model.quantize != "none":
        refuse_quantized_merge(cfg)


def refuse_quantized_merge(cfg) -> None:
    raise ConfigError(
        f"{cfg.key_at('base_model')}, {cfg.key_at('model.quantize')}: {cfg.method} from a LoRA run (base_model) "
        "merges that run's adapter into its base first, which a quantized base (model.quantize) cannot hold "
        f"exactly: export the run merged (tuneforge export RUN --format merged) and start {cfg.method} from the "
        "merged model, or set model.quantize: none."
    )


def rows(pairs: list[tuple[tfdata.Example, tfdata.Example]]) -> list[tfdata.PackedRow | tfdata.RowGroup]:
    """Each pair as one row: the chosen example, then the rejected one (packing keeps them whole). Where the
    pairs' prompts show images, each pair is a `RowGroup` instead: its chosen and rejected examples run as two
    rows of the batch, each with the prompt's images."""
    if tfdata.shows_images(pairs):
        return [tfdata.RowGroup(pair) for pair in pairs]
    return [tfdata.join(pair) for pair in pairs]


def kto_rows(examples: list[tfdata.Example], max_length: int) -> list[tfdata.PackedRow | tfdata.RowGroup]:
    """Each rated example as one row: the example, then its mismatched one for the KL estimate (its
    prompt with the reply of the example before it, the first taking the last's; TRL's KL data), cut
    to `max_length` by dropping the start of the prompt, as TRL's keep_end truncation does. A prompt that
    shows images keeps them and is never cut (the model needs every token of an image): its mismatched
    example loses the end of the borrowed reply instead, and the two are a `RowGroup`, each run with the images.

    Feedback often rates several replies to one prompt, side by side in the data: the reply taken is
    that of the nearest example before it with another prompt (within `KL_LOOKBACK`), so that it is a
    reply to some other prompt, as the estimate needs, and not a second answer to the same one."""
    starts = [_reply_start(e) for e in examples]
    # A prompt is its tokens and its images: the same question about another image is another prompt.
    prompts = [(e.input_ids[: s + 1], e.images) for e, s in zip(examples, starts)]
    grouped = tfdata.shows_images(examples)
    rows = []
    for i, e in enumerate(examples):
        back = range(i - 1, i - 1 - min(KL_LOOKBACK, len(examples) - 1), -1)
        j = next((j for j in back if prompts[j] != prompts[i]), i - 1)
        other, at = examples[j], starts[j]
        prompt, reply = prompts[i][0], other.input_ids[at + 1 :]
        keep = len(prompt) if e.images else max(1, min(len(prompt), max_length - len(reply)))
        mismatched = tfdata.Example(
            prompt[len(prompt) - keep :] + reply,
            token_array([IGNORE_INDEX]) * (keep - 1) + other.labels[at:],
            images=e.images,
        ).truncated(max_length)
        rows.append(tfdata.RowGroup((e, mismatched)) if grouped else tfdata.join((e, mismatched)))
    return rows


KL_LOOKBACK = 64
"""How far back `kto_rows` looks for an example with another prompt before it takes the one before."""


def _reply_start(e: tfdata.Example) -> int:
    """The position whose target is an example's first trained token: its prompt is the tokens up to it."""
    return next(t for t, label in enumerate(e.labels) if label != IGNORE_INDEX)


def kto_balance_warning(cfg, report: dict) -> str | None:
    """A warning where the weighted share of desirable to undesirable replies is outside the KTO paper's
    recommended range, [1, 4/3], with the weight that brings it inside."""
    counts, d = report.get("counts", {}), cfg.dpo
    good, bad = counts.get("train_desirable", 0), counts.get("train_undesirable", 0)
    if cfg.method != "dpo" or d.loss != "kto" or not good or not bad:
        return None
    ratio = d.desirable_weight * good / (d.undesirable_weight * bad)
    if 1 <= ratio <= 4 / 3:
        return None
    low, high = d.undesirable_weight * bad / good, 4 / 3 * d.undesirable_weight * bad / good
    return (
        f"{cfg.key_at('dpo.desirable_weight')}: the training data has {good} desirable and {bad} undesirable "
        f"replies, so desirable_weight x {good} / (undesirable_weight x {bad}) is {ratio:.2f}, outside the KTO "
        f"paper's recommended 1 to 4/3; set dpo.desirable_weight between {low:.2f} and {high:.2f} (or adjust "
        "dpo.undesirable_weight)."
    )


def example_ids(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """For each trained position of the batch (row-major, as `trained_logits` orders them), the
    index of the example it belongs to, counting only examples that have trained positions.

    An example starts where its position ids restart at 0 (and at each row's start); padding is an
    example of its own with no trained positions, so it takes no index."""
    starts = torch.zeros_like(labels, dtype=torch.bool) if position_ids is None else position_ids == 0
    starts[:, 0] = True
    segment = starts.flatten().cumsum(0)[labels.flatten() != IGNORE_INDEX]
    return torch.unique_consecutive(segment, return_inverse=True)[1]


def count_pairs(batch: dict) -> int:
    """The pairs in a batch: the unit of the loss denominator."""
    ids = example_ids(batch["labels"], batch.get("position_ids"))
    return (int(ids[-1]) + 1) // 2 if ids.numel() else 0


def sequence_logps(
    lm, input_ids, labels, position_ids=None, attention_mask=None, *, average=False, **images
) -> torch.Tensor:
    """Log-probability of each example's trained tokens, summed per example (or, with `average`, their
    mean per token): [examples]. A batch that shows images runs with them (`images`: the batch's
    `pixel_values` and the model's other image inputs)."""
    hidden = trained_hidden(lm, input_ids, labels, position_ids, attention_mask, **images)
    token_logps = -token_cross_entropy(lm, hidden, labels[labels != IGNORE_INDEX])[0]
    ids = example_ids(labels, position_ids)
    n = int(ids[-1]) + 1 if ids.numel() else 0
    sums = token_logps.new_zeros(n).index_add(0, ids, token_logps)
    return sums / torch.bincount(ids, minlength=n) if average else sums


def pair_losses(
    chosen_logratio: torch.Tensor,
    rejected_logratio: torch.Tensor,
    *,
    beta: float,
    kind: str,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
    orpo_lambda: float = 0.0,
) -> torch.Tensor:
    """The loss of each pair (see the module doc): from its policy-to-reference log-ratios (sigmoid,
    ipo), or from the policy's per-token mean log-probabilities (simpo, orpo)."""
    margin = chosen_logratio - rejected_logratio
    if kind == "simpo":
        margin = margin - simpo_gamma / beta
    if kind in ("sigmoid", "simpo"):
        return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    if kind == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    if kind == "orpo":
        return -chosen_logratio - orpo_lambda * F.logsigmoid(log_odds(chosen_logratio) - log_odds(rejected_logratio))
    raise ValueError(f"unknown DPO loss {kind!r}; expected one of {', '.join(LOSSES)}")


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(mean_logp), through expm1 for p near 1; a reply of probability 1 per
    token (a mean log-probability of 0 in floating point) has the largest finite log odds."""
    return mean_logp - torch.log(-torch.expm1(mean_logp.clamp(max=-torch.finfo(mean_logp.dtype).tiny)))


def kto_losses(
    logratio: torch.Tensor,
    kl: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """The KTO loss of each rated reply (see the module doc) from its log-ratio to the reference and the
    batch's KL estimate `kl` (z0)."""
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, chosen, rejected)


class DPOObjective(nn.Module):
    """One forward returns sums over the batch's pairs: `loss` (what to backpropagate) and, for the
    logs, `rewards/chosen`, `rewards/rejected`, `rewards/margins` and `rewards/accuracies` (and, for
    orpo, `nll_loss` and `log_odds_chosen`).

    `reported_sums` maps the loop's metric names (train_loss, valid_loss) to these sums, and
    `count` says what they are sums over (pairs)."""

    logged_sums = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    orpo_sums = ("nll_loss", "log_odds_chosen")
    kto_sums = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl")
    # KTO's per-reply metrics are means over the desirable or the undesirable replies, not over every item:
    # the loop divides them by these sums (`methods.per_count`), which it does not log.
    kto_denominators = {
        "rewards/chosen": "_desirable",
        "logps/chosen": "_desirable",
        "rewards/rejected": "_undesirable",
        "logps/rejected": "_undesirable",
    }
    denominators: dict[str, str] = {}
    train_only_sums = ()
    reported_sums = {"loss": "loss"}

    def __init__(
        self,
        model,
        *,
        beta: float,
        loss: str,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.0,
        orpo_lambda: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        reference: nn.Module | None = None,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown DPO loss {loss!r}; expected one of {', '.join(LOSSES)}")
        if loss in REFERENCE_FREE and reference is not None:
            raise ValueError(f"DPO loss {loss} compares with no reference model; build it without one")
        self.model = model
        self.beta, self.loss, self.label_smoothing = beta, loss, label_smoothing
        self.simpo_gamma, self.orpo_lambda = simpo_gamma, orpo_lambda
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        if loss == "orpo":
            self.logged_sums = DPOObjective.logged_sums + self.orpo_sums
        if loss == "kto":
            self.logged_sums = self.kto_sums + ("_desirable", "_undesirable")
            self.denominators = self.kto_denominators
        # Outside the module tree: .train() never flips it, and DDP, the optimizer and state_dict never see it.
        self.frozen = [reference.eval().requires_grad_(False)] if reference is not None else []

    count = staticmethod(count_pairs)

    def reference_logps(self, **batch) -> torch.Tensor:
        with torch.no_grad(), reference_lm(self.model, self.frozen) as lm:
            return sequence_logps(lm, **batch)

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, desirable=None, margin=None, **images):
        # `margin` (a pair's, from its row) is the reward model's (methods.reward); DPO's losses read none, as
        # TRL's DPOTrainer reads no margin column. `images`: the pixels (and image inputs) of rows that show
        # images, which the policy and the reference both read.
        batch = dict(
            input_ids=input_ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask, **images
        )
        if self.loss == "kto":
            return self._kto(batch, desirable)
        free = self.loss in REFERENCE_FREE
        policy = sequence_logps(causal_lm(self.model), **batch, average=free)
        if policy.numel() % 2:
            raise ValueError(
                f"a DPO batch holds whole (chosen, rejected) pairs, but this one has {policy.numel()} "
                "examples; build its rows with methods.dpo.rows"
            )
        # sigmoid, ipo: log-ratios to the reference; simpo, orpo: the policy's per-token means alone.
        logratio = policy if free else policy - self.reference_logps(**batch)
        chosen, rejected = logratio[0::2], logratio[1::2]
        losses = pair_losses(
            chosen,
            rejected,
            beta=self.beta,
            kind=self.loss,
            label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma,
            orpo_lambda=self.orpo_lambda,
        )
        scale = self.orpo_lambda if self.loss == "orpo" else self.beta
        chosen_reward, rejected_reward = scale * chosen.detach(), scale * rejected.detach()
        out = {
            "loss": losses.sum(),
            "rewards/chosen": chosen_reward.sum(),
            "rewards/rejected": rejected_reward.sum(),
            "rewards/margins": (chosen_reward - rejected_reward).sum(),
            "rewards/accuracies": (chosen_reward > rejected_reward).sum(),
        }
        if self.loss == "orpo":
            chosen, rejected = chosen.detach(), rejected.detach()
            out["nll_loss"] = -chosen.sum()
            out["log_odds_chosen"] = (log_odds(chosen) - log_odds(rejected)).sum()
        return out

    def kl_estimate(self, mismatched: torch.Tensor) -> torch.Tensor:
        """KTO's z0 from the mismatched replies' log-ratios: their mean, clamped at 0. In training on several
        processes the mean is over the micro-batch every process runs at once (each runs as many a step), as
        TRL's KTOTrainer gathers it, so N processes estimate it from the rows one process with N times their
        micro-batch would. Validation, where the processes run different numbers of batches, takes each
        batch's own."""
        total = torch.stack([mismatched.sum(), mismatched.new_tensor(float(mismatched.numel()))])
        if self.training and dist.is_available() and dist.is_initialized():
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return (total[0] / total[1]).clamp(min=0)

    def _kto(self, batch: dict, desirable: torch.Tensor | None) -> dict:
        policy = sequence_logps(causal_lm(self.model), **batch)
        if desirable is None or policy.numel() != 2 * desirable.numel():
            raise ValueError(
                f"a KTO batch holds (rated, mismatched) examples with one rating each, but this one has "
                f"{policy.numel()} examples and {0 if desirable is None else desirable.numel()} ratings; build its "
                "rows with methods.dpo.kto_rows"
            )
        logratio = policy - self.reference_logps(**batch)
        rated, mismatched = logratio[0::2], logratio[1::2].detach()
        # z0: detached, so it only shifts the point each reply's reward is measured from.
        kl = self.kl_estimate(mismatched)
        losses = kto_losses(
            rated,
            kl,
            desirable,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        rewards, logps, good = self.beta * rated.detach(), policy[0::2].detach(), desirable.to(rated.dtype)
        return {
            "loss": losses.sum(),
            "rewards/chosen": (rewards * good).sum(),
            "rewards/rejected": (rewards * (1 - good)).sum(),
            "logps/chosen": (logps * good).sum(),
            "logps/rejected": (logps * (1 - good)).sum(),
            "kl": kl * rated.numel(),
            "_desirable": good.sum(),
            "_undesirable": (1 - good).sum(),
        }


def build_objective(model, cfg, *, dtype: torch.dtype, device: torch.device) -> DPOObjective:
    d = cfg.dpo
    # Full fine-tuning changes every weight: the reference is a frozen copy of the starting model
    # (merged, as a LoRA teacher is for distillation). A LoRA policy's reference is its disabled adapter.
    # simpo and orpo have none.
    reference = frozen_base(cfg, dtype=dtype, device=device) if d.policy == "full" and d.has_reference else None
    return DPOObjective(
        model,
        beta=d.beta,
        loss=d.loss,
        label_smoothing=d.label_smoothing,
        simpo_gamma=d.simpo_gamma,
        orpo_lambda=d.orpo_lambda,
        desirable_weight=d.desirable_weight,
        undesirable_weight=d.undesirable_weight,
        reference=reference,
    )


def check_data_kind(cfg) -> None:
    """Preference pairs train with method: dpo or reward, rated replies (KTO data) with dpo.loss: kto, and those
    methods train on one of them only. Reads the first row of each data file, so a mismatch fails before any data is
    prepared."""
    from ..data.formats import file_format
    from ..data.readers import open_rows

    files = cfg.data.train_files + ([cfg.data.validation] if isinstance(cfg.data.validation, str) else [])
    kto = cfg.method == "dpo" and cfg.dpo.loss == "kto"
    on_pairs = cfg.method == "reward" or (cfg.method == "dpo" and not kto)
    for path in files:
        if not Path(path).is_file():
            continue  # data preparation reports a missing file with its own error
        found = file_format(path, cfg.data.format)
        if found is None and not any(isinstance(row, dict) for _, row in open_rows(path)):
            continue  # a file without rows (empty, or each row unreadable): data preparation names its problems
        pairs, rated = found == "preference", found == "kto"
        if kto and not rated:
            reason = (
                f"data.format: {cfg.data.format} reads this file's rows as another format; set data.format to "
                "kto, or leave it out (auto)."
                if cfg.data.format != "auto"
                else "this file holds preference pairs: train them with another dpo.loss (sigmoid, the default), "
                'or give each reply as a row of its own, {"prompt", "completion", "label": true} for the chosen '
                "and false for the rejected."
                if pairs
                else 'this file has no rated replies. Give rows with {"prompt", "completion", "label": true|false} '
                'or {"messages": [..., the rated assistant reply], "label": true|false}.'
            )
            raise TuneforgeError(
                f"{path}: dpo.loss: kto trains on replies rated desirable or undesirable, but {reason}",
                code="not_kto_data",
            )
        if on_pairs and not pairs:
            reason = (
                f"data.format: {cfg.data.format} reads this file's rows as another format; set data.format to "
                "preference, or leave it out (auto)."
                if cfg.data.format != "auto"
                else "this file holds replies rated desirable or undesirable (a 'label' per row, KTO data), not "
                "pairs; train them with method: dpo and dpo.loss: kto, or give each prompt's chosen and rejected "
                'replies as one row, {"prompt", "chosen", "rejected"}.'
                if rated and cfg.method == "reward"
                else "this file holds replies rated desirable or undesirable (a 'label' per row, KTO data), not "
                "pairs; set dpo.loss: kto to train on them."
                if rated
                else 'this file is not preference data. Give rows with {"prompt", "chosen", "rejected"} or '
                'OpenAI\'s {"input", "preferred_output", "non_preferred_output"}, or train these rows with '
                "method: lora, dora or full."
            )
            raise TuneforgeError(
                f"{path}: method: {cfg.method} trains on preference pairs, but {reason}", code="not_preference_data"
            )
        if cfg.method not in ("dpo", "reward") and pairs:
            raise TuneforgeError(
                f"{path}: this file holds preference pairs (a chosen and a rejected reply per prompt), which "
                f"method: {cfg.method} cannot train on. Use method: dpo (with a dpo section) or method: reward (a "
                "reward model), or give conversations with a single reply.",
                code="preference_data",
            )
        # grpo's rows are prompts with any fields its grader reads, so a row's 'label' is a field like another.
        if cfg.method not in ("dpo", "grpo") and rated:
            raise TuneforgeError(
                f"{path}: this file holds replies rated desirable or undesirable (a 'label' per row: KTO data), "
                f"which method: {cfg.method} cannot train on. Use method: dpo with dpo.loss: kto, or give the "
                "desirable rows alone, without their 'label', to train on them as conversations.",
                code="kto_data",
            )
