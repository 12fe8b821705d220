"""Early stopping and the best checkpoint (`train.early_stopping_patience`, `early_stopping_threshold`,
`keep_best`): each validation is judged by its valid_loss against the best so far.

What the judging keeps (the best loss, its step, the validations since it, and why the run stopped)
lives in the loop state a checkpoint carries, so a resumed run stops where the uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..wording import counted


def judging(train: TrainConfig) -> bool:
    """Whether validations are judged at all."""
    return bool(train.early_stopping_patience or train.keep_best)


def judge(state: dict, valid_loss: float, step: int, train: TrainConfig) -> bool:
    """Record the validation at `step` in the loop `state`; whether it is the new best: the first, or a
    valid_loss below the best by more than `train.early_stopping_threshold`."""
    best = state.setdefault("best", {"valid_loss": None, "step": None, "since": 0})
    improved = best["valid_loss"] is None or valid_loss < best["valid_loss"] - train.early_stopping_threshold
    if improved:
        best.update(valid_loss=valid_loss, step=step, since=0)
    else:
        best["since"] += 1
    return improved


def stop_reason(state: dict, train: TrainConfig) -> str | None:
    """Why the run stops early, in words, once `train.early_stopping_patience` validations in a row
    were no better than the best; else None."""
    patience, best = train.early_stopping_patience, state.get("best")
    if not (patience and best and best["since"] >= patience):
        return None
    by = f" by more than {train.early_stopping_threshold:g}" if train.early_stopping_threshold else ""
    return (
        f"valid_loss has not fallen{by} below its best, {best['valid_loss']:.4f} at step {best['step']}, in "
        f"{counted(patience, 'validation')} since (train.early_stopping_patience)"
    )


def best_checkpoint(state: dict, train: TrainConfig, root: Path) -> Path | None:
    """The checkpoint of the best validation, which `train.keep_best` keeps; None without keep_best or
    before any validation."""
    step = state.get("best", {}).get("step")
    if not train.keep_best or step is None:
        return None
    return Path(root) / f"step-{step}"


def summary(state: dict, last_step: int, total_steps: int) -> dict:
    """What summary.json says of the judging: the best validation, and where and why the run stopped early."""
    said = {}
    best = state.get("best")
    if best and best["step"] is not None:
        said["best"] = {"step": best["step"], "valid_loss": best["valid_loss"]}
    if state.get("stopped_early"):
        said["stopped_early"] = {"step": last_step, "of": total_steps, "reason": state["stopped_early"]}
    return said
