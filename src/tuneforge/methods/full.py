"""Full fine-tuning: every weight trains (embeddings optionally frozen)."""

from __future__ import annotations


def prepare_model(model, cfg):
    if hasattr(model, "merge_and_unload"):  # base_model is a LoRA run: its adapter merged, every weight trains
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.train.freeze_embeddings:
        # Tied embeddings share one tensor with the output layer: freezing one freezes both.
        model.get_input_embeddings().weight.requires_grad_(False)
    return model
