"""Quantized frozen bases through bitsandbytes: 4-bit NF4 or FP4 weights (QLoRA) or 8-bit weights, on CPU
as on CUDA, with adapters training on top."""

from __future__ import annotations

import torch

from ..errors import ModelSourceError

BITS = {"nf4": 4, "fp4": 4, "int8": 8}


def quantization_config(quantize: str, *, double_quant: bool, compute_dtype: torch.dtype):
    """transformers' `BitsAndBytesConfig` for `model.quantize`, or None for `none`."""
    if quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise ModelSourceError(
            f"model.quantize: {quantize} needs bitsandbytes ({err}); install it with `pip install "
            "'bitsandbytes>=0.50,<0.51'`, or set model.quantize: none.",
            code="missing_dependency",
        ) from None
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def keep_trainable_layout(model) -> None:
    """Keeps a 4-bit base's weights in the layout bitsandbytes trains through. On a CPU with AVX512-BF16,
    bitsandbytes repacks a 4-bit layer's weight for its inference kernel the first time the layer runs in
    eval mode without gradients (a validation pass, GRPO's sampling) and keeps it so; that kernel has no
    backward, so every later training step would drop the gradient through the frozen weights."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model) -> bool:
    return getattr(model, "quantization_method", None) is not None or bool(getattr(model, "is_quantized", False))
