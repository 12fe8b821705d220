"""The source model as one plain transformers model: a LoRA/DoRA adapter folded into its base.

PEFT's `merge_and_unload` does the folding. It is checked, not trusted: the adapter model's logits
on the probe batch are taken before the merge and compared with the merged model's after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import ModelSource, end_of_turn_token, load_model
from .probe import MERGE_BOUND, Agreement, agreement, probe_logits, require_within

SAVED_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class MergedModel:
    model: object  # a transformers PreTrainedModel, no adapter left
    logits: list[torch.Tensor]  # the merged fp32 model on the probe batch: what a written file must match
    merge: Agreement | None  # merged vs. unmerged; None when there was no adapter to merge


def merged_model(source: ModelSource, ids: list[list[int]]) -> MergedModel:
    """Load the source in fp32 and fold its adapter, if any, into the base weights."""
    model = load_model(source, dtype=torch.float32)
    unmerged = probe_logits(model, ids)
    if source.adapter is None:
        return MergedModel(model, unmerged, None)
    model = model.merge_and_unload()
    merged = probe_logits(model, ids)
    measured = agreement(unmerged, merged)
    require_within(measured, MERGE_BOUND, f"Merging the adapter {source.adapter} into its base")
    return MergedModel(model, merged, measured)


def chat_generation_config(model, tokenizer):
    """The model's generation config, with the end-of-turn token first among the EOS ids so that
    any runtime reading it stops where a chat reply ends."""
    config = model.generation_config
    end_of_turn = end_of_turn_token(tokenizer)
    recorded = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None, tokenizer.eos_token_id, *recorded]
    eos_ids = list(dict.fromkeys(i for i in ids if i is not None))
    config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def save_merged(merged: MergedModel, tokenizer, folder: Path, dtype: str) -> list[Path]:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` loads: safetensors weights in
    `dtype`, config, generation config, tokenizer and chat template."""
    model = merged.model
    model.generation_config = chat_generation_config(model, tokenizer)
    model.to(SAVED_DTYPES[dtype]).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sorted(folder.iterdir())


def load_saved(folder: Path):
    """The exported folder as a user would load it: plain transformers, upcast to fp32 to compare."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
