"""Full fine-tuning: every weight trains (embeddings optionally frozen)."""

from __future__ import annotations

from ..models.loading import grow_embeddings


def prepare_model(model, cfg, token_ids=(), new_ids=()):
    """`token_ids`: the ids of `model.add_tokens`, which the embeddings grow to hold; `new_ids`: those of
    them the tokenizer did not hold, whose rows start at the mean."""
    if hasattr(model, "merge_and_unload"):  # base_model is a LoRA run: its adapter merged, every weight trains
        model = model.merge_and_unload()
    grow_embeddings(model, new_ids)
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.train.freeze_embeddings:
        # Tied embeddings share one tensor with the output layer: freezing one freezes both.
        model.get_input_embeddings().weight.requires_grad_(False)
    return model
