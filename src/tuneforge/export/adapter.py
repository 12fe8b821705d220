"""The PEFT adapter alone, with the tokenizer it was trained with: small, and loaded on top of the
base by plain `peft.PeftModel.from_pretrained`."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..models.loading import classifier_folder

# What PEFT's save_pretrained writes for an adapter; a checkpoint folder also holds optimizer and
# RNG state, which a user of the adapter does not need.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def save_adapter(adapter: Path, tokenizer, folder: Path) -> list[Path]:
    for name in ADAPTER_FILES:
        if (adapter / name).is_file():
            shutil.copyfile(adapter / name, folder / name)
    tokenizer.save_pretrained(folder)
    return sorted(folder.iterdir())


def load_saved(base: Path, folder: Path):
    """The exported adapter as a user would load it: plain transformers base + plain PEFT; an adapter
    trained with added tokens on the base resized to its tokenizer first, as PEFT's documentation does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if classifier_folder(folder):  # a reward model's adapter: its base as a classifier with one score
        model = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32, num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokens = len(AutoTokenizer.from_pretrained(folder))
    if tokens > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(tokens, mean_resizing=False)  # the adapter's rows replace the new ones
    return PeftModel.from_pretrained(model, folder)
