"""Methods: what is trainable and what the loss is. The training loop does not care which it runs.

Each method module exposes `prepare_model(model, cfg) -> model`, which marks the trainable
parameters (and wraps the model, for adapters). All methods here train with the SFT objective in
`sft.py`; methods with their own loss add an objective beside it.
"""

from __future__ import annotations

from . import full, lora
from .sft import SFTObjective, causal_lm

PREPARE = {"full": full.prepare_model, "lora": lora.prepare_model, "dora": lora.prepare_model}


def prepare_model(model, cfg):
    return PREPARE[cfg.method](model, cfg)


def trainable_parameters(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


__all__ = ["prepare_model", "trainable_parameters", "SFTObjective", "causal_lm"]
