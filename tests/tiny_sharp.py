"""A tiny model whose greedy answers tell prompts apart, for the chat and serve tests.

The plain tiny model (tiny.py) answers almost every prompt with the same run of newlines, so an
answer that came from the wrong prompt, history or adapter would pass unnoticed. Scaling its
random weights sharpens the next-token distributions: greedy answers differ from prompt to prompt,
and no near-ties let batched and lone decoding part ways.
"""

from __future__ import annotations

from pathlib import Path

from tiny import save_tiny_model


def save_sharp_tiny_model(folder: str | Path, scale: float = 3.0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for weight in model.parameters():
            weight.mul_(scale)
    model.save_pretrained(folder)
    return folder
