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

With `neftune_alpha` > 0 (NEFTune, Jain et al. 2023) training forwards add uniform noise to the
input embeddings, scaled by each example's own length even when examples are packed in one row;
validation and generation see clean embeddings.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..data.pack import segments

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


def trained_logits(lm, input_ids, labels, position_ids=None, attention_mask=None, embedding_noise=None) -> torch.Tensor:
    """Logits at the positions that carry a label, in order: [n_trained, vocab]. `embedding_noise`
    (the shape of the input embeddings) is added to them first (NEFTune)."""
    tokens = {"input_ids": input_ids}
    if embedding_noise is not None:
        tokens = {"inputs_embeds": lm.get_input_embeddings()(input_ids) + embedding_noise}
    hidden = lm.get_decoder()(
        **tokens, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    return output_logits(lm, hidden[labels != IGNORE])


def example_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """For every position of a batch, the length of the example it belongs to: [batch, seq].

    A packed example that continues a shared prefix counts the prefix (`data.segments`), so its
    length is its last position id + 1, as it is for an example that stands alone."""
    lengths = torch.empty_like(position_ids)
    for b, row in enumerate(position_ids.tolist()):  # one host sync a step; attention makes one a layer
        for start, end, first, _ in segments(row):
            lengths[b, start:end] = first + end - start
    return lengths


def neftune_noise(alpha: float, position_ids: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """NEFTune's noise for the input embeddings: uniform in ±alpha / sqrt(L · d) per position, L the
    length of the position's own example (so packing gives each example the noise it would get alone;
    a packed row's length would shrink it for every example in the row) and d the hidden size."""
    scale = alpha / (example_lengths(position_ids).to(dtype) * hidden_size).sqrt()
    noise = torch.empty(*position_ids.shape, hidden_size, dtype=dtype, device=position_ids.device).uniform_(-1, 1)
    return noise * scale[..., None]


def label_sums(logits: torch.Tensor, targets: torch.Tensor, learned: torch.Tensor | None = None) -> dict:
    """Summed cross-entropy on the labels, correct top-1 predictions and the token count; `loss` is the
    CE of the positions marked in `learned` (all of them by default)."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    return {"ce": ce.sum(), "correct": (logits.detach().argmax(-1) == targets).sum(), "tokens": targets.numel(),
            "loss": ce.sum() if learned is None else ce[learned].sum()}


def shared_depth(model) -> int:
    """How many decoder layers the model and its base compute alike: those below the first layer
    that trains (LoRA `from_layer`), unless the embeddings train. The base forward of a KL term then
    starts from the hidden state the model's own forward had there, instead of from the tokens."""
    lm = causal_lm(model)
    decoder = lm.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "norm") or any(p.requires_grad for p in lm.get_input_embeddings().parameters()):
        return 0
    return next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())), 0)


def rows_of(value, rows: torch.Tensor):
    """A layer input for the batch rows marked in `rows`: tensors with a batch dimension are indexed."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == len(rows):
        return value[rows]
    if isinstance(value, tuple):
        return tuple(rows_of(v, rows) for v in value)
    return value


class SFTObjective(nn.Module):
    """Wraps the model so that one forward returns sums for a batch: `loss` (what to backpropagate),
    `ce`, `correct`, `tokens` and, with a KL penalty or KL replay, `kl_to_base` and `replay_kl`.

    `logged_sums` names the sums beyond the CE and accuracy that the loop logs per trained token,
    `train_only_sums` those that validation leaves out. `ce` (train_loss) is what each trained token
    teaches: its cross-entropy, or on a KL replay row its KL to the base, since the replay's text is
    no target there.

    `labels` are already shifted by the data pipeline: labels[i] is the target for position i.
    Wrapping (rather than calling parts of the model from the loop) keeps DDP's gradient hooks on
    the path it expects: DDP wraps this module.
    """

    def __init__(self, model, *, kl_to_base: float = 0.0, replay_kl: bool = False, reference: nn.Module | None = None,
                 neftune_alpha: float = 0.0):
        super().__init__()
        self.model = model
        self.kl_to_base = kl_to_base
        self.neftune_alpha = neftune_alpha
        self.logged_sums = ("kl_to_base",) * bool(kl_to_base) + ("replay_kl",) * replay_kl
        self.train_only_sums = ("replay_kl",)  # validation holds the user's data only, no replay
        # A frozen reference is kept outside the module tree so DDP and the optimizer never see it.
        self.frozen = [reference] if reference is not None else []
        self.shared_depth = 0 if self.frozen else shared_depth(model)

    def base_logits(self, batch: dict, rows: torch.Tensor, layer_input: dict) -> torch.Tensor:
        """The base model's logits at the trained positions of the batch rows marked in `rows`; from
        `layer_input` (what the first trained layer received in the model's own forward) when there is one."""
        subset = {k: v[rows] if v is not None else None for k, v in batch.items()}
        with torch.no_grad(), reference_lm(self.model, self.frozen) as lm:
            if not layer_input:
                return trained_logits(lm, **subset)
            decoder = lm.get_decoder()
            hidden, *args = rows_of(layer_input["args"], rows)
            kwargs = {k: rows_of(v, rows) for k, v in layer_input["kwargs"].items()}
            for layer in decoder.layers[self.shared_depth:]:
                hidden = layer(hidden, *args, **kwargs)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            return output_logits(lm, decoder.norm(hidden)[subset["labels"] != IGNORE])

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, general=None):
        lm = causal_lm(self.model)
        noise = None
        if self.neftune_alpha and self.training:
            # The base model of a KL term sees the same noisy embeddings: the KL then measures what
            # the training changed, not the noise.
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            embedding = lm.get_input_embeddings().weight
            noise = neftune_noise(self.neftune_alpha, position_ids, embedding.shape[1], embedding.dtype)
        batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask,
                     embedding_noise=noise)
        trained = labels != IGNORE

        def per_trained_position(row_mask):  # row-major, as trained_logits orders the logits
            return row_mask[:, None].expand_as(labels)[trained]

        replay = general if general is not None else torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        on_replay = per_trained_position(replay)
        compared = torch.ones_like(replay) if self.kl_to_base else replay  # the rows the base model runs on
        layer_input: dict = {}
        hook = None
        if compared.any() and self.shared_depth:
            hook = lm.get_decoder().layers[self.shared_depth].register_forward_pre_hook(
                lambda module, args, kwargs: layer_input.update(args=args, kwargs=kwargs), with_kwargs=True)
        try:
            logits = trained_logits(lm, **batch)
        finally:
            if hook is not None:
                hook.remove()
        out = label_sums(logits, labels[trained], learned=~on_replay)
        out.update({name: torch.zeros((), device=logits.device) for name in self.logged_sums})
        if not compared.any():
            return out
        on_compared = per_trained_position(compared)
        base_logp = F.log_softmax(self.base_logits(batch, compared, layer_input), -1)
        kl = F.kl_div(F.log_softmax(logits[on_compared], -1), base_logp, log_target=True, reduction="none").sum(-1)
        kl_replay = on_replay[on_compared]
        out["ce"] = out["loss"] + kl[kl_replay].sum()
        out["loss"] = out["ce"] + self.kl_to_base * kl[~kl_replay].sum()
        if "replay_kl" in out:
            out["replay_kl"] = kl[kl_replay].sum().detach()
        if self.kl_to_base:
            out["kl_to_base"] = kl[~kl_replay].sum().detach()
        return out
