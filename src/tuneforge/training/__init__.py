"""Training: the loop we own (`loop.py`), its run folder (`run_folder.py`), checkpoints, batching and distribution."""

from .loop import (
    StepPlan,
    TrainResult,
    make_plan,
    plan_warnings,
    rows_made,
    shares_prefixes,
    to_rows,
    train,
)
from .run_folder import check_output_dir, earlier_run

__all__ = [
    "StepPlan",
    "TrainResult",
    "check_output_dir",
    "earlier_run",
    "make_plan",
    "plan_warnings",
    "rows_made",
    "shares_prefixes",
    "to_rows",
    "train",
]
