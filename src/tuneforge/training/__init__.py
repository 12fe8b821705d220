"""Training: the loop we own (`loop.py`), its checkpoints, batching and distribution."""

from .loop import (
    StepPlan,
    TrainResult,
    check_output_dir,
    earlier_run,
    make_plan,
    plan_warnings,
    rows_made,
    shares_prefixes,
    to_rows,
    train,
)

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
