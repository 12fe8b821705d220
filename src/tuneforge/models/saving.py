"""Writing a model folder that plain transformers and PEFT load: a run's final model, a student."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import TuneforgeError
from ..fsio import atomic_dir
from .architecture import chat_generation_config

ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""The file PEFT's save_pretrained writes an adapter's weights to."""

SENTENCEPIECE_MODEL = "tokenizer.model"
"""A SentencePiece vocabulary (Gemma, Phi-3, Mistral), which llama.cpp's converter reads."""


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
"""The processor settings of a model that reads images (its image processor, the image tokens per image)."""

UNSAVED_FILES = (SENTENCEPIECE_MODEL, *PROCESSOR_FILES)
"""A model folder's files that transformers' save_pretrained of the model and tokenizer does not write: a run's
folders and every export copy them from the source."""


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
        save_weights(model, tmp)
        save_tokenizer(tokenizer, base_path, tmp)
        save_generation_config(model, tokenizer, tmp)
    return folder


def save_weights(model, folder: Path, state_dict: dict | None = None) -> None:
    """`model.save_pretrained` into `folder`; a PiSSA or OLoRA adapter (`methods.lora.keep_start`) is written as
    the adapter it is on the original base, which is what every reader of the folder loads it on."""
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict, **save_options(model))
    start = getattr(model, "adapter_start", None)
    if start:
        on_original_base(Path(folder), start)


def on_original_base(folder: Path, start: dict) -> None:
    """Rewrite the adapter in `folder`, trained on a base with its start (A0, B0) taken out, as PEFT's
    `save_pretrained(path_initial_model_for_weight_conversion=...)` does: W_res + s·BA = W + s·(BA - B0A0), so
    A' = [A; A0] and B' = [B, -B0], of rank 2r, on the original weights W (alpha doubles, or grows by sqrt 2 under
    rsLoRA, to keep s). The other weights (DoRA's magnitudes, layers trained whole, token rows) stay as saved."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / ADAPTER_WEIGHTS)
    for key, first in start.items():
        weights[key] = torch.cat(
            [weights[key], first.to(weights[key].device, weights[key].dtype)]
            if ".lora_A." in key
            else [weights[key], -first.to(weights[key].device, weights[key].dtype)],
            dim=0 if ".lora_A." in key else 1,
        )
    save_file(weights, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = LoraConfig.from_pretrained(folder)
    config.r *= 2
    config.lora_alpha *= 2**0.5 if config.use_rslora else 2
    config.init_lora_weights = True
    config.save_pretrained(folder)


def on_residual_base(weights: dict, start: dict, folder: Path) -> dict:
    """The adapter `on_original_base` wrote back as it trains (A and B of rank r, on the residual base), for a
    resume: its second halves must be this run's start again, else the start was not reproduced (another seed,
    base or library version) and the run would go on from another model than the one it saved."""
    weights = dict(weights)
    for key, first in start.items():
        dim, r = (0, first.shape[0]) if ".lora_A." in key else (1, first.shape[1])
        trained, saved_start = weights[key].split([r, weights[key].shape[dim] - r], dim=dim)
        if not torch.equal(saved_start, first if ".lora_A." in key else -first):
            raise TuneforgeError(
                f"{folder}: the adapter's start (lora.init) differs from the one this run makes again on its base "
                f"({key}): the base, the seed or the torch version changed since the checkpoint was written. "
                "Resume where the run started, or start it again."
            )
        weights[key] = trained.contiguous()
    return weights


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
    for name in UNSAVED_FILES:
        if (Path(base_path) / name).is_file():
            shutil.copyfile(Path(base_path) / name, Path(folder) / name)
