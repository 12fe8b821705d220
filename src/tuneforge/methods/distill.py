"""Knowledge distillation: the student learns from a frozen teacher's next-token distributions.

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * D(teacher_T, student_T)

over the trained tokens only, where `x_T` is the distribution at temperature T. The T^2 factor
keeps the divergence's gradients on the same scale as the cross-entropy's whatever T is (soft
targets' gradients shrink as 1/T^2). Like `SFTObjective`, the objective returns sums over the
trained tokens, and the loop divides by the trained tokens of the whole optimizer step.

Divergences, with p the teacher's distribution and q the student's:
  forward_kl  KL(p || q): mass-covering, the usual choice (Hinton et al.)
  reverse_kl  KL(q || p): mode-seeking, the student commits to the teacher's likeliest tokens
  jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (generalised JSD).
              Divided by beta it tends to forward KL as beta -> 0, divided by 1 - beta to reverse
              KL as beta -> 1; beta = 0.5 is the symmetric Jensen-Shannon divergence.

The student's trainable parameters come from `distill.student` (full, or LoRA with the `lora`
section). The teacher is frozen, in eval mode, kept outside the module tree (so DDP, the optimizer
and checkpoints never see it), and runs in the run's precision: bf16 only where the hardware has
native bf16, else fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..errors import TuneforgeError
from ..models import causal_lm, load_frozen_model
from . import full, lora
from .sft import label_sums, trained_logits

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def prepare_model(model, cfg):
    """The student trains what `distill.student` says: every weight, or LoRA adapters."""
    return {"full": full.prepare_model, "lora": lora.prepare_model}[cfg.distill.student](model, cfg)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Summed KL(p || q) over rows of log-probabilities."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """The divergence between the teacher's and the student's distributions, summed over rows.

    Both are log-probabilities of shape [tokens, vocab]."""
    if kind == "forward_kl":
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return _kl(student_logp, teacher_logp)
    if kind == "jsd":
        mixture = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), 0)
        return beta * _kl(teacher_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")


class DistillObjective(nn.Module):
    """One forward returns sums for a batch: `loss` (what to backpropagate), `ce`, `correct`,
    `tokens`, and for the logs `divergence` and `teacher_agreement` (trained tokens where the
    student's top-1 token is the teacher's)."""

    logged_sums = ("divergence", "teacher_agreement")
    train_only_sums = ()

    def __init__(self, model, teacher: nn.Module, *, alpha: float, temperature: float, kind: str, beta: float = 0.5):
        super().__init__()
        if kind not in DIVERGENCES:
            raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")
        self.model = model
        self.alpha, self.temperature, self.kind, self.beta = alpha, temperature, kind, beta
        # Outside the module tree: .train() never flips it, and DDP, the optimizer and state_dict never see it.
        self.frozen = [teacher.eval().requires_grad_(False)]

    @property
    def teacher(self) -> nn.Module:
        return self.frozen[0]

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, is_replay=None):
        # Replay rows (data.general_mix) learn from the labels and the teacher like any others.
        batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask)
        logits = trained_logits(causal_lm(self.model), **batch)
        with torch.no_grad():
            teacher_logits = trained_logits(causal_lm(self.teacher), **batch)
        targets = labels[labels != IGNORE_INDEX]
        correct = (logits.detach().argmax(-1) == targets).sum()
        out = label_sums(F.cross_entropy(logits, targets, reduction="none"), correct, targets)
        t = self.temperature
        soft = divergence(F.log_softmax(teacher_logits / t, -1), F.log_softmax(logits / t, -1), self.kind, self.beta)
        out["loss"] = self.alpha * out["ce"] + (1 - self.alpha) * t * t * soft
        out["divergence"] = soft.detach()
        out["teacher_agreement"] = (logits.detach().argmax(-1) == teacher_logits.argmax(-1)).sum()
        return out


def build_objective(model, cfg, *, dtype: torch.dtype, device: torch.device) -> DistillObjective:
    d = cfg.distill
    return DistillObjective(
        model,
        load_frozen_model(d.teacher, dtype=dtype, device=device),
        alpha=d.alpha,
        temperature=d.temperature,
        kind=d.divergence,
        beta=d.jsd_beta,
    )


def check_teacher(cfg, student_tokenizer) -> None:
    """Token-level distillation compares distributions over the same token ids: the teacher needs the
    student's vocabulary, token for token. Reads configs and tokenizers only, so it fails before
    any data is prepared or weights are loaded."""
    from transformers import AutoConfig

    from ..models import load_tokenizer, resolve

    teacher_source = resolve(cfg.distill.teacher)
    teacher_size, student_size = (
        AutoConfig.from_pretrained(source.path).get_text_config().vocab_size
        for source in (teacher_source, resolve(cfg.base_model))
    )
    if teacher_size != student_size:
        problem = f"the teacher's output layer has {teacher_size} tokens, the student's {student_size}"
    elif load_tokenizer(teacher_source).get_vocab() != student_tokenizer.get_vocab():
        problem = "the teacher's tokenizer maps text to other token ids than the student's"
    else:
        return
    raise TuneforgeError(
        f"distill.teacher {cfg.distill.teacher!r} cannot teach base_model {cfg.base_model!r} token by token: "
        f"{problem}. Use a teacher and student of one model family (one tokenizer), or distill at the sequence "
        "level: write the teacher's answers with `tuneforge distill generate --teacher TEACHER --prompts FILE "
        "--out data.jsonl` and train the student on them with method: full or lora.",
        code="vocabulary_mismatch",
    )
