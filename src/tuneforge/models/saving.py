"""Writing a model folder that plain transformers and PEFT load: a run's final model, a student."""

from __future__ import annotations

from pathlib import Path

from ..fsio import atomic_dir


def save_model(model, tokenizer, base_path: Path, folder: Path, *, merge: bool = False) -> Path:
    """The adapter or full model, the tokenizer with its chat template, and a generation config that
    stops at the end-of-turn token, written atomically to `folder`. An adapter records `base_path`
    as its base (so `PeftModel.from_pretrained` works offline); `merge` saves it merged into its
    base instead (an adapter whose base exists only in memory)."""
    if merge:
        model = model.merge_and_unload()
    with atomic_dir(folder, replace=True) as tmp:
        if hasattr(model, "peft_config"):
            for pc in model.peft_config.values():
                pc.base_model_name_or_path = str(base_path)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None) or getattr(
            getattr(model, "base_model", None), "generation_config", None
        )
        if gen is not None:
            gen.eos_token_id = tokenizer.eos_token_id
            gen.pad_token_id = tokenizer.pad_token_id
            gen.save_pretrained(tmp)
    return folder
