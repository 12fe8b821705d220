"""Methods: what is trainable and what the loss is. The training loop does not care which it runs.

Each method module exposes `prepare_model(model, cfg) -> model`, which marks the trainable
parameters (and wraps the model, for adapters). `build_objective` picks the loss: the SFT objective
in `sft.py` for full, LoRA and DoRA, the distillation objective in `distill.py` for distill (whose
student trains as `distill.student` says), the preference objective in `dpo.py` for dpo (its policy
trains as `dpo.policy` says). `check_inputs` runs the checks a method makes before any compute
(preference data for dpo and only for dpo; distill: the teacher's vocabulary is the student's).

An objective returns sums. What they are sums over is its `count` of a batch (trained tokens
unless it says otherwise; DPO counts pairs), and the loop divides by the count of the whole
optimizer step. `reported_sums` names the sums the loop logs as train_/valid_ metrics, and
`logged_sums` the method's own sums, logged per count beside them; `train_only_sums` those of them
that validation leaves out.
"""

from __future__ import annotations

import torch

from . import distill, dpo, full, lora
from .distill import DistillObjective
from .dpo import DPOObjective
from .sft import IGNORE, SFTObjective, causal_lm

PREPARE = {"full": full.prepare_model, "lora": lora.prepare_model, "dora": lora.prepare_model,
           "distill": distill.prepare_model, "dpo": dpo.prepare_model}

TOKEN_SUMS = {"loss": "ce", "mean_token_accuracy": "correct"}
"""The loop's metric names (train_loss, valid_mean_token_accuracy, ...) and the sums they are, for
objectives that train on tokens."""


def prepare_model(model, cfg):
    return PREPARE[cfg.method](model, cfg)


def check_inputs(cfg, tokenizer) -> None:
    """Fail early, with a clear error, on inputs the method cannot use."""
    dpo.check_data_kind(cfg)
    if cfg.method == "distill":
        distill.check_teacher(cfg, tokenizer)


def build_objective(model, cfg, *, dtype: torch.dtype, device: torch.device, reference=None):
    """The module the loop calls on each micro-batch; it returns sums (see `SFTObjective`).
    `reference` is the frozen base copy for `kl_to_base` or KL replay with full fine-tuning."""
    if cfg.method == "distill":
        return distill.build_objective(model, cfg, dtype=dtype, device=device)
    if cfg.method == "dpo":
        return dpo.build_objective(model, cfg, dtype=dtype, device=device)
    return SFTObjective(model, kl_to_base=cfg.train.kl_to_base, replay_kl=cfg.train.replay_loss == "kl_to_base",
                        reference=reference, neftune_alpha=cfg.train.neftune_alpha)


def batch_items(prepared, cfg) -> tuple[list, list]:
    """What the loop makes rows of, for training and validation: the examples, or for dpo one item
    per pair (its chosen and rejected examples end to end, so they always share a forward)."""
    if cfg.method == "dpo":
        return dpo.rows(prepared.train_pairs), dpo.rows(prepared.valid_pairs)
    return prepared.train, prepared.valid


def trained_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE).sum())


def loss_count(objective):
    """The function that counts what an objective's sums are sums over in a batch (its loss denominator)."""
    return getattr(objective, "count", trained_tokens)


def reported_sums(objective) -> dict[str, str]:
    """Metric name (logged as train_NAME and valid_NAME) -> the objective's sum it is, per count."""
    return getattr(objective, "reported_sums", TOKEN_SUMS)


def adapter_on_merged_base(cfg, source) -> bool:
    """Whether the trained adapter sits on a base that exists only in memory: dpo merges a LoRA
    `base_model` before its LoRA policy trains, so that final model is saved merged. (lora and dora
    train such an adapter on; full merges it and trains every weight.)"""
    return source.adapter is not None and cfg.method == "dpo" and cfg.dpo.policy == "lora"


def trainable_parameters(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


__all__ = ["adapter_on_merged_base", "prepare_model", "check_inputs", "build_objective", "batch_items", "loss_count", "reported_sums",
           "trainable_parameters", "SFTObjective", "DistillObjective", "DPOObjective", "causal_lm"]
