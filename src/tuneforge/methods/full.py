"""Full fine-tuning: every weight trains (embeddings optionally frozen)."""

from __future__ import annotations

from ..models.loading import grow_embeddings


def prepare_model(model, cfg, token_ids=()):
    """`token_ids`: the ids of `model.add_tokens`, which the embeddings grow to hold."""
    if hasattr(model, "merge_and_unload"):  # base_model is a LoRA run: its adapter merged, every weight trains
        model = model.merge_and_unload()
    if token_ids:
        grow_embeddings(model, max(token_ids) + 1)
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.train.freeze_embeddings:
        # Tied embeddings share one tensor with the output layer: freezing one freezes both.
        model.get_input_embeddings().weight.requires_grad_(False)
    return model
