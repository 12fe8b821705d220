"""Writing a model folder that plain transformers and PEFT load: a run's final model, a student."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..fsio import atomic_dir
from .architecture import chat_generation_config

SENTENCEPIECE_MODEL = "tokenizer.model"
"""A SentencePiece vocabulary (Gemma, Phi-3, Mistral), which llama.cpp's converter reads."""


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
"""The processor settings of a model that reads images (its image processor, the image tokens per image)."""


def save_model(model, tokenizer, base_path: Path, folder: Path, *, merge: bool = False) -> Path:
    """The adapter or full model, the tokenizer with its chat template (and the base's
    tokenizer.model, if it has one), and a generation config that stops at the end-of-turn token,
    written atomically to `folder`. An adapter records `base_path` as its base (so
    `PeftModel.from_pretrained` works offline); `merge` saves it merged into its base instead (an
    adapter whose base exists only in memory)."""
    if merge:
        model = model.merge_and_unload()
    with atomic_dir(folder, replace=True) as tmp:
        if hasattr(model, "peft_config"):
            for pc in model.peft_config.values():
                pc.base_model_name_or_path = str(base_path)
        model.save_pretrained(tmp, safe_serialization=True, **save_options(model))
        save_tokenizer(tokenizer, base_path, tmp)
        save_generation_config(model, tokenizer, tmp)
    return folder


def save_options(model) -> dict:
    """`save_pretrained`'s options for `model`: an adapter that trains the rows of added tokens by id
    (`model.add_tokens`) saves those rows alone, not the resized embeddings whole (PEFT's
    `save_embedding_layers`, on whenever the vocabulary grew): the loader resizes the base and the saved rows
    replace its new ones (`loading.adapter_token_rows`)."""
    configs = getattr(model, "peft_config", {}).values()
    return {"save_embedding_layers": False} if any(c.trainable_token_indices for c in configs) else {}


def save_generation_config(model, tokenizer, folder: Path) -> None:
    """The model's generation config with the end-of-turn token first among its EOS ids (the
    base's may list only its end-of-text), so that transformers and vLLM stop where a reply ends."""
    gen = getattr(model, "generation_config", None) or getattr(
        getattr(model, "base_model", None), "generation_config", None
    )
    if gen is not None:
        chat_generation_config(gen, tokenizer).save_pretrained(folder)


def save_tokenizer(tokenizer, base_path: Path, folder: Path) -> None:
    """The tokenizer with its chat template, and the base's tokenizer.model if it has one: transformers
    does not write it, and a GGUF export of the folder (a SentencePiece vocabulary) needs it. A model that
    reads images also gets the base's processor settings, so `AutoProcessor` loads the folder."""
    tokenizer.save_pretrained(folder)
    for name in (SENTENCEPIECE_MODEL, *PROCESSOR_FILES):
        if (Path(base_path) / name).is_file():
            shutil.copyfile(Path(base_path) / name, Path(folder) / name)
