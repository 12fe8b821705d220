"""Evaluation: what a model learned (loss and task metrics on chat data), what it forgot (general
data no training touched), and the run report with plots.

    from tuneforge.eval import evaluate, compare, measure_forgetting, write_run_report
    before = evaluate("smollm2-135m-instruct", "data/test.jsonl")
    after = evaluate("runs/my-run", "data/test.jsonl")
    write_run_report("runs/my-run", before, after, measure_forgetting("runs/my-run"))

Modules: `evaluate` (data, loss, generation metrics), `choices` (multiple-choice benchmarks by
log-likelihood), `forgetting`, `report` (tables, plots, files),
`command` (the `tuneforge eval` command), `after_training` (a training config's `eval:` section, run
when training ends).
"""

from .command import eval_command
from .evaluate import compare, evaluate, read_eval_examples, token_loss
from .forgetting import measure_forgetting
from .report import report_tables, write_run_report

__all__ = [
    "compare",
    "eval_command",
    "evaluate",
    "measure_forgetting",
    "read_eval_examples",
    "report_tables",
    "token_loss",
    "write_run_report",
]
