"""Checkpoints: everything an exact resume needs, written atomically, the last K kept.

A checkpoint folder is also a model folder: it holds the PEFT adapter (or the full HF model) and
the tokenizer, so `tuneforge eval runs/x/checkpoints/step-40` works like on any model.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import RunFailed
from ..fsio import atomic_dir, write_json

STATE = "trainer_state.json"


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def step_folders(root: Path) -> list[Path]:
    folders = [p for p in Path(root).glob("step-*") if p.is_dir() and (p / STATE).is_file()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[1]))


def latest(root: Path) -> Path | None:
    folders = step_folders(root)
    return folders[-1] if folders else None


def save(root: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int) -> Path:
    final = Path(root) / f"step-{step}"
    for stale in Path(root).glob(".tmp-step-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(final, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(_rng_states(), tmp / "rng.pt")
        write_json(tmp / STATE, state)
    for old in step_folders(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _restore_weights(model, folder: Path) -> None:
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
    else:
        result = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
        unexpected = list(result.unexpected_keys)
        # save_pretrained drops tied copies (lm_head == embed_tokens); anything else missing is real.
        tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")}
        missing = [k for k in result.missing_keys if k not in tied]
        if missing:
            raise RunFailed(
                f"{folder}: checkpoint lacks weights {missing[:3]}...; it was written by another model or method."
            )
    if unexpected:
        raise RunFailed(
            f"{folder}: checkpoint has weights this model lacks ({unexpected[:3]}...); "
            "was it written by another method?"
        )


def load(folder: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; return the saved loop state."""
    folder = Path(folder)
    state = json.loads((folder / STATE).read_text())
    _restore_weights(model, folder)
    opt = torch.load(folder / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    _set_rng_states(torch.load(folder / "rng.pt", weights_only=False))
    return state
