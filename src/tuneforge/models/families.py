"""The model families tuneforge is tested on, and how to tell which one a model belongs to.

A family is an architecture (the config's `model_type`) together with the chat format its
template writes: SmolLM2 and Llama 3 share the Llama architecture but not their turns. Each family
here is covered by the family test matrix (tests/test_families.py): its masks, LoRA training,
loading, merged and GGUF exports and serving are checked on a tiny model built from its config class,
its special tokens and its published chat template. A model of any other family still runs, with a
warning that none of that was tested for it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    model_types: tuple[str, ...]  # the config's model_type
    marker: str  # a token the family's chat template writes and other templates of the architecture do not
    end_of_turn: tuple[str, ...]  # what closes an assistant turn (and where generation stops)


FAMILIES = (
    Family("smollm2", "SmolLM2 (Llama, ChatML)", ("llama",), "<|im_start|>", ("<|im_end|>",)),
    Family("llama3", "Llama 3", ("llama",), "<|start_header_id|>", ("<|eot_id|>", "<|eom_id|>")),
    Family("qwen2.5", "Qwen 2.5", ("qwen2",), "<|im_start|>", ("<|im_end|>",)),
    Family("qwen3", "Qwen 3", ("qwen3",), "<|im_start|>", ("<|im_end|>",)),
    Family("mistral", "Mistral", ("mistral",), "[INST]", ("</s>",)),
    Family("gemma2", "Gemma 2", ("gemma2",), "<start_of_turn>", ("<end_of_turn>",)),
    Family("gemma3", "Gemma 3", ("gemma3_text", "gemma3"), "<start_of_turn>", ("<end_of_turn>",)),
    Family("phi3", "Phi-3", ("phi3",), "<|user|>", ("<|end|>",)),
)

# The GGUF architecture llama.cpp's converter writes for a model_type, where it is not the model_type
# itself: Mistral and Idefics3's and SmolVLM2's text models are written as Llama, the text-only Gemma 3 as Gemma 3.
_GGUF_ARCHITECTURES = {
    "mistral": "llama",
    "idefics3": "llama",
    "smolvlm": "llama",
    "gemma3_text": "gemma3",
    "qwen2_vl": "qwen2vl",
    "qwen2_5_vl": "qwen2vl",
}

_warned: set[str] = set()


def family_of(model_type: str, chat_template: str | None, vocab) -> Family | None:
    """The family of a model with this architecture, chat template and vocabulary (its tokens), or None for one
    not covered. The vocabulary holds the family's end of turn: ChatML on Llama 3's vocabulary (tuneforge's
    fallback for a model without a template) ends its turns with <|eot_id|>, which the matrix does not test."""
    return next(
        (
            f
            for f in FAMILIES
            if model_type in f.model_types
            and chat_template
            and f.marker in chat_template
            and any(t in vocab for t in f.end_of_turn)
        ),
        None,
    )


def gguf_architecture(model_type: str) -> str:
    """The `general.architecture` llama.cpp's converter writes for this model_type."""
    return _GGUF_ARCHITECTURES.get(model_type, model_type)


def covered_titles() -> str:
    """The families the matrix covers, for messages: "SmolLM2 (Llama, ChatML), Llama 3, ..."."""
    return ", ".join(f.title for f in FAMILIES)


def warn_if_untested(name: str, folder: Path, model_type: str, chat_template: str | None, vocab) -> None:
    """Warn, once per model (by its folder: two models of one name are two), when its architecture, chat
    template and vocabulary are no family the matrix covers."""
    if family_of(model_type, chat_template, vocab) is not None or str(folder) in _warned:
        return
    _warned.add(str(folder))
    warnings.warn(
        f"{name} ({model_type}) is not a model family tuneforge is tested on ({covered_titles()}): its loss masks, "
        "exports and serving were not checked for it. Look at `tuneforge data check --show` before training, "
        "and rely on the figures each export checks.",
        stacklevel=3,
    )
