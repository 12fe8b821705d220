"""Which number format a run computes in, by what the hardware does natively (detected, never assumed)."""

from __future__ import annotations

import torch

from ..errors import TuneforgeError


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Without AVX512-BF16/AMX, CPU bf16 matmuls are emulated and slower than fp32.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where the device has it natively, fp32 elsewhere; bf16 on a device without it is an error."""
    if precision not in ("auto", "bf16", "fp32"):
        raise TuneforgeError(f"precision {precision!r}: choose auto, bf16 or fp32.")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise TuneforgeError(
            f"precision bf16, but this {device.type} has no native bf16 (it would be emulated and slow). "
            "Use precision: auto or fp32."
        )
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32
