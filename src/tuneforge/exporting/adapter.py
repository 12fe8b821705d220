"""The PEFT adapter alone, with the tokenizer it was trained with: small, and loaded on top of the
base by plain `peft.PeftModel.from_pretrained`."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from ..models.loading import classifier_folder

# What PEFT's save_pretrained writes for an adapter; a checkpoint folder also holds optimizer and
# RNG state, which a user of the adapter does not need.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def save_adapter(adapter: Path, tokenizer, folder: Path, processor: Sequence[Path] = ()) -> list[Path]:
    """The adapter's files and its tokenizer, with the `processor` settings of a model that reads images
    (`merge.beside_the_weights`), so that `AutoProcessor` loads the folder beside its base."""
    for name in ADAPTER_FILES:
        if (adapter / name).is_file():
            shutil.copyfile(adapter / name, folder / name)
    tokenizer.save_pretrained(folder)
    for settings in processor:
        shutil.copyfile(settings, folder / settings.name)
    return sorted(folder.iterdir())


def load_saved(base: Path, folder: Path, rope_scaling: dict | None = None):
    """The exported adapter as a user would load it: plain transformers base + plain PEFT; an adapter
    trained with added tokens on the base resized to its tokenizer first, as PEFT's documentation does.
    `rope_scaling`: the rotary scaling the adapter trained with, set on the base's config as its user sets
    it (an adapter's files have no place for it)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..methods.lora import gate_up_pattern_warning_unsaid
    from ..models.loading import base_config, generating_class

    config = base_config(str(base), rope_scaling)
    if classifier_folder(folder):  # a reward model's adapter: its base as a classifier with one score
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_pretrained(base, config=config, dtype=torch.float32)
    else:
        model = generating_class(config).from_pretrained(base, config=config, dtype=torch.float32)
    tokens = len(AutoTokenizer.from_pretrained(folder))
    if tokens > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(tokens, mean_resizing=False)  # the adapter's rows replace the new ones
    # PEFT's false warning on a mixture-of-experts adapter's rank_pattern is left out, as in `load_model`.
    with gate_up_pattern_warning_unsaid():
        return PeftModel.from_pretrained(model, folder)
