"""The source model as one plain transformers model: a LoRA/DoRA adapter folded into its base.

PEFT's `merge_and_unload` does the folding. It is checked, not trusted: the adapter model's logits
on the probe batch are taken before the merge and compared with the merged model's after it.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import ModelSource, load_model
from ..models.architecture import chat_generation_config
from ..models.loading import classifier_folder
from ..models.saving import UNSAVED_FILES
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
    _untie_adapted_weights(model)
    model = model.merge_and_unload()
    merged = probe_logits(model, ids)
    measured = agreement(unmerged, merged)
    require_within(measured, MERGE_BOUND, f"Merging the adapter {source.adapter} into its base")
    return MergedModel(model, merged, measured)


def _untie_adapted_weights(model) -> None:
    """Gives an adapted layer whose weight another layer shares (the output layer and the input
    embeddings of a model with tied embeddings) a copy of its own: the merge folds the adapter into that
    weight, and folded into the shared one it would change the other layer too. The merged model then
    keeps the two apart, and its config says they are no longer tied."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    uses = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    untied = False
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            # An adapter on a parameter (a mixture-of-experts model's fused expert weights) sits on a module with
            # no weight of its own.
            layer = module.get_base_layer()
            if isinstance(getattr(layer, "weight", None), torch.nn.Parameter) and uses[layer.weight.data_ptr()] > 1:
                layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
                untied = True
    if untied:
        config = model.get_base_model().config
        for part in (config, config.get_text_config()):
            part.tie_word_embeddings = False


def beside_the_weights(source: ModelSource) -> list[Path]:
    """The source's files that save_pretrained does not write: its tokenizer.model (llama.cpp's converter reads
    it) and, for a model that reads images, its processor's settings (`AutoProcessor` and tuneforge read them)."""
    from .llama_cpp import source_file

    return [path for name in UNSAVED_FILES if (path := source_file(source, name))]


def save_merged(merged: MergedModel, tokenizer, folder: Path, dtype: str, beside: list[Path]) -> list[Path]:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` (a reward model's:
    `AutoModelForSequenceClassification`; one that reads images with no causal LM class, Qwen2-VL's:
    `AutoModelForImageTextToText`) loads: safetensors weights in `dtype`, config, generation config,
    tokenizer and chat template, and the source's files `beside` them (`beside_the_weights`)."""
    model = merged.model
    if model.can_generate():  # a reward model (a sequence classifier) writes no text
        model.generation_config = chat_generation_config(model.generation_config, tokenizer)
    model.to(SAVED_DTYPES[dtype]).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    for path in beside:
        shutil.copyfile(path, folder / path.name)
    return sorted(folder.iterdir())


def load_saved(folder: Path):
    """The exported folder as a user would load it: plain transformers (a reward model as the sequence classifier
    it is), upcast to fp32 to compare."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ..models.loading import generating_class

    if classifier_folder(folder):
        return AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    return generating_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder, dtype=torch.float32)
