"""Training: the loop we own (`loop.py`), its checkpoints, batching, distribution and dry run."""

from .loop import TrainResult, train

__all__ = ["train", "TrainResult"]
