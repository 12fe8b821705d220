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

With `distill.positions: all` the divergence is taken at every position of a row up to its last
trained one (the prompt too), summed like the trained tokens' (so it weighs more against the
cross-entropy); the cross-entropy stays on the trained tokens.

With `distill.teacher_top_k: k` the teacher runs once, before the first step: its k largest logits
and their token ids at every compared position are kept (`TeacherTopK`, cached on disk under
`tuneforge_home()/teacher-cache/`), the teacher is freed, and each step compares the student with
the teacher's distribution over those k tokens. With k the whole vocabulary that is the online loss
exactly; forward KL is the divergence it supports (reverse KL and JSD need the teacher's
probability of every token the student proposes). That step takes both terms from the student's
logits chunk by chunk, with their gradient in closed form (`_TopKDistillation`).
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..data import IGNORE_INDEX, collate
from ..errors import ConfigError, TuneforgeError
from ..fsio import atomic_file, tuneforge_home
from ..models import causal_lm, load_frozen_model, resolve
from ..models.attention import segments
from ..progress import progress_bar
from . import full, lora
from .sft import label_sums, trained_logits

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

LOGITS_PER_CHUNK = 2**21
"""Logits (floats) the top-k loss takes at once, 8 MiB in fp32: a chunk stays in cache across its
passes, which makes the loss on 1,000 positions of a 49k vocabulary twice as fast as in larger chunks."""


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

    def __init__(
        self,
        model,
        teacher: nn.Module,
        *,
        alpha: float,
        temperature: float,
        kind: str,
        beta: float = 0.5,
        teacher_name: str = "",
        top_k: int | None = None,
        positions: str = "answers",
    ):
        super().__init__()
        if kind not in DIVERGENCES:
            raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")
        if top_k is not None and kind != "forward_kl":
            raise ValueError(f"teacher_top_k compares distributions by forward KL, not {kind}")
        self.model = model
        self.alpha, self.temperature, self.kind, self.beta = alpha, temperature, kind, beta
        self.teacher_name, self.teacher_top_k, self.positions = teacher_name, top_k, positions
        self.cached_teacher: TeacherTopK | None = None  # set by `cache_teacher`
        # Models of one tokenizer may pad their output layers to different widths (Qwen 2.5 7B has 152,064
        # columns, 0.5B 151,936); the columns both have hold every token, and the two are compared there.
        self.vocab = min(output_width(m) for m in (model, teacher))
        if top_k is not None and top_k > self.vocab:
            # A run's config is refused so before its models load (`check_teacher`); this tells a Python caller.
            raise ValueError(
                f"teacher_top_k {top_k} is more than the {self.vocab} tokens the teacher and student compare"
            )
        # Outside the module tree: .train() never flips it, and DDP, the optimizer and state_dict never see it.
        self.frozen = [teacher.eval().requires_grad_(False)]

    @property
    def teacher(self) -> nn.Module:
        return self.frozen[0]

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, is_replay=None):
        # Replay rows (data.general_mix) learn from the labels and the teacher like any others.
        batch = dict(input_ids=input_ids, labels=labels, position_ids=position_ids, attention_mask=attention_mask)
        compared = {**batch, "labels": compared_labels(labels, self.positions, position_ids)}
        compared_logits = trained_logits(causal_lm(self.model), **compared)[:, : self.vocab]
        trained = labels[compared["labels"] != IGNORE_INDEX] != IGNORE_INDEX  # which compared positions train
        targets = labels[labels != IGNORE_INDEX]
        t = self.temperature
        if self.cached_teacher is not None:
            ids, values = self.cached_teacher.lookup(compared)
            ids, values = ids.to(compared_logits.device), values.to(compared_logits.device)
            token_ce, soft = _TopKDistillation.apply(
                compared_logits, trained, targets, ids, F.log_softmax(values / t, -1), t
            )
            teacher_top1 = ids[trained, 0]
        else:
            token_ce = F.cross_entropy(compared_logits[trained], targets, reduction="none")
            with torch.no_grad():
                teacher_logits = trained_logits(causal_lm(self.teacher), **compared)[:, : self.vocab]
            student_logp = F.log_softmax(compared_logits / t, -1)
            soft = divergence(F.log_softmax(teacher_logits / t, -1), student_logp, self.kind, self.beta)
            teacher_top1 = teacher_logits[trained].argmax(-1)
        # Indexed before the argmax: with `positions: all` the trained rows are a fraction of the compared ones.
        student_top1 = compared_logits.detach()[trained].argmax(-1)
        out = label_sums(token_ce, (student_top1 == targets).sum(), targets)
        out["loss"] = self.alpha * out["ce"] + (1 - self.alpha) * t * t * soft
        out["divergence"] = soft.detach()
        out["teacher_agreement"] = (student_top1 == teacher_top1).sum()
        return out

    def cache_teacher(
        self, rows, pad_id: int, device: torch.device, *, batch_rows: int, progress: bool = True, log=print
    ) -> None:
        """With `teacher_top_k`: the teacher's top-k logits at every compared position of `rows`, read
        from the cache or computed now, in the caller's precision and attention; then the teacher is
        freed. Without it, nothing: the teacher runs at every step. `log` says when a cache entry is
        damaged and computed again."""
        if self.teacher_top_k is None:
            return
        batches = []
        for start in range(0, len(rows), batch_rows):
            batch = collate(rows[start : start + batch_rows], pad_id)
            batches.append({**batch, "labels": compared_labels(batch["labels"], self.positions, batch["position_ids"])})
        self.cached_teacher = TeacherTopK.load_or_compute(
            self.teacher, self.teacher_name, self.teacher_top_k, self.vocab, batches, device, progress, log
        )
        self.frozen.clear()


class _TopKDistillation(torch.autograd.Function):
    """The cross-entropy at the trained positions [n_trained] and the summed forward KL from the
    teacher's distribution over its top k tokens, from the student's logits at the compared
    positions, chunk by chunk, in the forward pass and again in the backward pass.

    With `positions: all` the logits span nearly every token and the whole vocabulary; autograd's
    version of the same terms (a log-softmax at T, another inside the cross-entropy, a gather, an
    indexed copy, and each one's backward) makes many more passes over them and materialises a
    full-size tensor for each. Here each row keeps two numbers (its log-normaliser at T, and at 1
    where it trains) and the gradient is the closed form

        d/dz [ce_weight * CE + kl_weight * KL] = ce_weight * (softmax(z) - onehot(target))
                                                + kl_weight / T * (softmax(z / T) - p_teacher)

    (the teacher's top-k probabilities sum to 1), with p_teacher zero outside its k tokens."""

    @staticmethod
    def forward(ctx, logits, trained, targets, teacher_ids, teacher_logp, t):
        per_chunk = max(1, LOGITS_PER_CHUNK // logits.shape[-1])
        trained_at = torch.full((len(logits),), -1, dtype=torch.long, device=logits.device)
        trained_at[trained] = targets
        soft, token_ce, lse_t, lse_1 = logits.new_zeros((), dtype=torch.float32), [], [], []
        for start in range(0, len(logits), per_chunk):
            rows = slice(start, start + per_chunk)
            z = logits[rows].float()
            at = trained_at[rows]
            logp_t = F.log_softmax(z / t, -1)
            soft = soft + (teacher_logp[rows].exp() * (teacher_logp[rows] - logp_t.gather(1, teacher_ids[rows]))).sum()
            z_trained = z[at >= 0]
            logp_1 = logp_t[at >= 0] if t == 1 else F.log_softmax(z_trained, -1)
            token_ce.append(-logp_1.gather(1, at[at >= 0, None]).squeeze(1))
            # Each row's log-normalisers, for the backward pass: any column's logit less its log-probability.
            lse_t.append(z[:, 0] / t - logp_t[:, 0])
            lse_1.append(torch.zeros_like(z[:, 0]).index_put_((at >= 0,), z_trained[:, 0] - logp_1[:, 0]))
        ctx.save_for_backward(logits, trained_at, teacher_ids, teacher_logp, torch.cat(lse_t), torch.cat(lse_1))
        ctx.t, ctx.per_chunk = t, per_chunk
        return torch.cat(token_ce), soft

    @staticmethod
    def backward(ctx, grad_token_ce, grad_soft):
        logits, trained_at, teacher_ids, teacher_logp, lse_t, lse_1 = ctx.saved_tensors
        t, per_chunk = ctx.t, ctx.per_chunk
        grad = torch.empty_like(logits)
        ce_weight = torch.zeros(len(logits), device=logits.device)
        ce_weight[trained_at >= 0] = grad_token_ce.float()
        kl_weight = grad_soft.float() / t
        for start in range(0, len(logits), per_chunk):
            rows = slice(start, start + per_chunk)
            z, at, weight = logits[rows].float(), trained_at[rows], ce_weight[rows]
            trained_here = (at >= 0).nonzero().squeeze(1)
            if t == 1:
                g = (z - lse_t[rows, None]).exp_().mul_((kl_weight + weight)[:, None])
            else:
                g = (z / t).sub_(lse_t[rows, None]).exp_().mul_(kl_weight)
                softmax_1 = z[trained_here].sub_(lse_1[rows][trained_here, None]).exp_()
                g.index_add_(0, trained_here, softmax_1.mul_(weight[trained_here, None]))
            g.scatter_add_(1, teacher_ids[rows], teacher_logp[rows].exp().mul_(-kl_weight))
            g.index_put_((trained_here, at[trained_here]), -weight[trained_here], accumulate=True)
            grad[rows] = g
        return grad, None, None, None, None, None


def compared_labels(labels: torch.Tensor, positions: str, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Labels that mark the positions where student and teacher are compared: the trained ones
    (`answers`), or (`all`) every position of each example up to its last trained one, prompt
    included. The examples of a packed row are read from its position ids (`segments`), so what
    follows an example's reply in the row (its last position, where the next example begins) is
    compared as little as when the example runs alone; without position ids a row is one example."""
    if positions == "answers":
        return labels
    trained = labels != IGNORE_INDEX
    rows = position_ids.tolist() if position_ids is not None else [list(range(labels.shape[1]))] * len(labels)
    up_to_last = torch.zeros_like(trained)
    for b, row in enumerate(rows):
        for start, end, _, _ in segments(row):
            at = trained[b, start:end].nonzero()
            if len(at):
                up_to_last[b, start : start + int(at[-1]) + 1] = True
    return torch.where(up_to_last & ~trained, torch.zeros_like(labels), labels)


class TeacherTopK:
    """The teacher's k largest logits (fp32, largest first) and their token ids at the compared
    positions of rows, by row key (`row_keys`): what a distillation step needs of the teacher."""

    def __init__(self, by_row: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.by_row = by_row

    def lookup(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids and logits [n, k] at the positions a batch's labels mark (the compared ones), row-major."""
        try:
            found = [self.by_row[key] for key in row_keys(batch)]
        except KeyError:
            raise TuneforgeError(
                "distill.teacher_top_k: a batch holds a row the teacher's top-k logits were not computed for; "
                "the rows changed after the teacher ran. Run again (the cache is keyed by the rows)."
            ) from None
        return torch.cat([ids for ids, _ in found]).long(), torch.cat([values for _, values in found])

    @classmethod
    def load_or_compute(cls, teacher, teacher_name, k, vocab, batches, device, progress, log) -> TeacherTopK:
        """From `tuneforge_home()/teacher-cache/<key>.safetensors`, keyed by the teacher's files, k, the
        columns compared (`vocab`), the dtype it runs in and every row's key; else computed batch by
        batch and written there (atomically) for the next run on the same rows: another seed, or
        other student settings. An entry that cannot be used (`_read_entry`) is computed again and
        replaced, and `log` says so."""
        keys = [key for batch in batches for key in row_keys(batch)]
        lengths = torch.tensor([n for batch in batches for n in trained_per_row(batch)])
        dtype = str(next(teacher.parameters()).dtype)
        if torch.is_autocast_enabled(device.type):
            dtype += f" autocast {torch.get_autocast_dtype(device.type)}"
        path = cache_dir() / f"{cache_key(teacher_name, k, vocab, dtype, keys)}.safetensors"
        if path.is_file():
            try:
                return cls(_split(*_read_entry(path, lengths, k, vocab), lengths, keys))
            except (OSError, SafetensorError, ValueError) as error:
                # A cache entry cut short, damaged or edited after it was written is only lost time.
                log(
                    f"distill: warning: the teacher's top-{k} logits cached in {path} cannot be used ({error}); "
                    "computing them again"
                )
        ids, values = compute_top_k(teacher, batches, k, vocab, device, progress)
        stored = {"ids": ids, "values": values, "lengths": lengths}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            f.write(save(stored))
        return cls(_split(stored["ids"], stored["values"], lengths, keys))


def compute_top_k(
    teacher, batches: list[dict], k: int, vocab: int, device, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's k largest logits (largest first) among its first `vocab` and their ids at the
    positions the batches' labels mark."""
    lm, ids, values = causal_lm(teacher), [], []
    rows = sum(len(batch["input_ids"]) for batch in batches)
    with torch.no_grad(), progress_bar(f"teacher: top-{k} logits", rows, progress) as advance:
        for batch in batches:
            batch = {name: value.to(device) for name, value in batch.items() if name != "is_replay"}
            top = trained_logits(lm, **batch)[:, :vocab].topk(k, -1)
            ids.append(top.indices.to(torch.int32).cpu())
            values.append(top.values.float().cpu())
            advance(len(batch["input_ids"]))
    return torch.cat(ids), torch.cat(values)


def _read_entry(path: Path, lengths: torch.Tensor, k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache entry's ids and logits, where they fit the rows they are read for: `lengths` compared positions
    a row, `k` tokens each, ids among the `vocab` compared columns, logits that are numbers (else ValueError,
    saying what does not fit)."""
    stored = load_file(path)
    if set(stored) != {"ids", "values", "lengths"}:
        raise ValueError(f"it holds the tensors {sorted(stored)}, not ids, values and lengths")
    ids, values = stored["ids"], stored["values"]
    if stored["lengths"].tolist() != lengths.tolist():
        raise ValueError("its compared positions per row are not those of the rows")
    shape = (int(lengths.sum()), k)
    if ids.shape != shape or values.shape != shape or ids.dtype != torch.int32 or values.dtype != torch.float32:
        raise ValueError(f"its ids and logits are not int32 and float32 of {shape[0]} positions by {k} tokens")
    if len(ids) and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
        raise ValueError(f"it holds token ids outside the {vocab} compared")
    if values.isnan().any():
        raise ValueError("it holds logits that are no number")
    return ids, values


def _split(ids, values, lengths, keys) -> dict:
    bounds = lengths.tolist()
    return dict(zip(keys, zip(ids.split(bounds), values.split(bounds))))


def output_width(model) -> int:
    """The columns of a model's output layer: its vocabulary, padded or not."""
    return causal_lm(model).config.get_text_config().vocab_size


def trained_per_row(batch: dict) -> list[int]:
    return (batch["labels"] != IGNORE_INDEX).sum(1).tolist()


def row_keys(batch: dict) -> list[str]:
    """A key per row of a collated batch: a hash of its tokens, positions and labels up to its last
    trained position. The teacher's logits there depend on nothing else (attention is causal, and
    padding only follows), so rows with equal keys get equal teacher logits however they are batched."""
    keys = []
    for b, labels in enumerate(batch["labels"]):
        trained = (labels != IGNORE_INDEX).nonzero()
        end = int(trained[-1]) + 1 if len(trained) else 0
        h = hashlib.sha256()
        for name in ("input_ids", "position_ids", "labels"):
            if batch.get(name) is not None:
                h.update(batch[name][b, :end].to(torch.int64).numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


def cache_dir() -> Path:
    return tuneforge_home() / "teacher-cache"


def teacher_files(teacher_name: str) -> list[tuple[str, int, int]]:
    """The teacher's files, its base's and its adapter's, as (path, size, modification time): a
    teacher retrained or replaced in place is another teacher."""
    return source_files(resolve(teacher_name))


def source_files(source) -> list[tuple[str, int, int]]:
    """A resolved model's files, its base's and its adapter's, as (path, size, modification time)."""
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p, _ in _model_files(source)]


def _model_files(source) -> list[tuple[Path, str]]:
    """A resolved model's files, its base's then its adapter's, each with its name in the model: `0/NAME` in the
    base's folder, `1/NAME` in the adapter's."""
    # An adapter model (a LoRA run) is its base and its adapter: a retrained adapter is another model.
    roots = [Path(source.path)] + ([Path(source.adapter)] if source.adapter else [])
    return [
        (p, f"{i}/{p.relative_to(root)}")
        for i, root in enumerate(roots)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def same_model(a, b) -> str | None:
    """How two resolved models are one: "the same folder", "the same weights" (files of the same names and
    bytes, a copy), or None. Files of other sizes are told apart without reading them."""
    folders = [[Path(s.path).resolve(), Path(s.adapter).resolve() if s.adapter else None] for s in (a, b)]
    if folders[0] == folders[1]:
        return "the same folder"

    def weights(source) -> list[tuple[Path, str, int]]:
        return [(p, name, p.stat().st_size) for p, name in _model_files(source) if p.name.endswith(WEIGHT_SUFFIXES)]

    mine, theirs = weights(a), weights(b)
    if not mine or [w[1:] for w in mine] != [w[1:] for w in theirs]:
        return None
    if all(filecmp.cmp(p, q, shallow=False) for (p, _, _), (q, _, _) in zip(mine, theirs)):
        return "the same weights"
    return None


def cache_key(teacher_name: str, k: int, vocab: int, dtype: str, keys: list[str]) -> str:
    """A hash of the teacher's files (`teacher_files`), k, the columns compared, the dtypes the teacher
    is held and computes in, and the rows: a changed teacher or data set gets a new entry."""
    described = {"teacher": teacher_files(teacher_name), "k": k, "vocab": vocab, "dtype": dtype}
    h = hashlib.sha256(json.dumps(described).encode())
    for key in keys:
        h.update(key.encode())
    return h.hexdigest()[:32]


def build_objective(model, cfg, *, dtype: torch.dtype, device: torch.device) -> DistillObjective:
    d = cfg.distill
    return DistillObjective(
        model,
        load_frozen_model(d.teacher, "train", where=cfg.key_at("distill.teacher"), dtype=dtype, device=device),
        alpha=d.alpha,
        temperature=d.temperature,
        kind=d.divergence,
        beta=d.jsd_beta,
        teacher_name=d.teacher,
        top_k=d.teacher_top_k,
        positions=d.positions,
    )


def check_teacher(cfg, student_tokenizer, student_source) -> None:
    """Token-level distillation compares distributions over the same token ids: the teacher needs the
    student's vocabulary, token for token (its output layer may be padded to another width), and runs on
    the student's rows, so its window holds data.max_length. Reads configs and tokenizers only, so it fails
    before any data is prepared or weights are loaded. `student_source`: the resolved base_model; a teacher that is
    the student (its folder, or a copy of its weights) is warned of."""
    from transformers import AutoConfig

    from ..models import load_tokenizer, resolve_at, source_context_length

    teacher_source = resolve_at(cfg.distill.teacher, cfg.key_at("distill.teacher"))
    window = source_context_length(teacher_source)
    if window and cfg.data.max_length > window:
        raise ConfigError(
            f"{cfg.key_at('distill.teacher')}, {cfg.key_at('data.max_length')}: rows of up to {cfg.data.max_length} "
            f"tokens are more than the {window} positions the teacher {teacher_source.name} was built for; set "
            f"data.max_length to {window} or less, or give a teacher with a longer context."
        )
    if (same := same_model(teacher_source, student_source)) is not None:
        warnings.warn(
            f"{cfg.key_at('distill.teacher')}: the teacher {teacher_source.name} is the student's own model "
            f"(base_model {cfg.base_model!r}: {same}), whose distributions the student already has. Distillation "
            "needs a teacher that knows more than the student (a larger model, or one trained on the task); give "
            "one, or to keep a student near where it starts, train method: lora or full with train.kl_to_base.",
            stacklevel=2,
        )
    teacher_size, student_size = (
        AutoConfig.from_pretrained(source.path).get_text_config().vocab_size
        for source in (teacher_source, student_source)
    )
    if load_tokenizer(teacher_source).get_vocab() == student_tokenizer.get_vocab():
        compared = min(teacher_size, student_size)  # the columns `DistillObjective` compares
        k = cfg.distill.teacher_top_k
        if k is not None and k > compared:
            raise ConfigError(
                f"{cfg.key_at('distill.teacher_top_k')}: {k} is more than the {compared} tokens the teacher and "
                f"student compare; give {compared} or less ({compared} keeps the teacher's whole distribution)."
            )
        return
    if teacher_size != student_size:
        problem = f"the teacher's output layer has {teacher_size} tokens, the student's {student_size}"
    else:
        problem = "the teacher's tokenizer maps text to other token ids than the student's"
    raise TuneforgeError(
        f"distill.teacher {cfg.distill.teacher!r} cannot teach base_model {cfg.base_model!r} token by token: "
        f"{problem}. Use a teacher and student of one model family (one tokenizer), or distill at the sequence "
        "level: write the teacher's answers with `tuneforge distill generate --teacher TEACHER --prompts FILE "
        "--out data.jsonl` and train the student on them with method: full or lora.",
        code="vocabulary_mismatch",
    )
