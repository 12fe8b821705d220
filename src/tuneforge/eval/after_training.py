"""What a training config's `eval:` section asks for, run on the final model when training ends.

- `eval.task` (a metric name: exact, contains, json_fields, support_triage, or auto): the base and
  the final model answer the prompts of the `data.validation` file, scored side by side;
  `eval/report.html` holds the tables, the loss curves and examples.
- `eval.forgetting: true`: base vs final model on the general sets no training touches (`forgetting.py`).

Both land in the run folder's `eval/`, are printed as tables, and their headline figures join the
run's final metrics (`summary.json`, `TrainResult.metrics`) as `task_*` and `forgetting_*`. The base
of an adapter is the adapter switched off; the base of a full model is `base_model`.
"""

from __future__ import annotations

from pathlib import Path

from ..fsio import write_json
from .evaluate import compare, read_eval_examples
from .forgetting import measure_forgetting
from .report import flat_scores, forgetting_table, print_tables, report_tables, write_run_report


def check_eval_inputs(cfg) -> None:
    """Before any compute: with `eval.task`, every row of the validation file is a conversation that
    ends in its reference answer (else a DataError naming file, line and field)."""
    if cfg.eval.task:
        read_eval_examples(cfg.data.validation)


def evaluate_after_training(cfg, run_dir: Path, final_dir: Path, *, progress: bool = True) -> dict:
    """Run what `cfg.eval` asks for on `final_dir`; returns the headline metrics."""
    is_adapter = (final_dir / "adapter_config.json").is_file()
    metrics: dict = {}
    forgetting = None
    if cfg.eval.forgetting:
        forgetting = measure_forgetting(str(final_dir), None if is_adapter else cfg.base_model, progress=progress)
        metrics.update(forgetting_questions_kept=forgetting["general_questions"]["retained"],
                       forgetting_text_ce_change=forgetting["general_text"]["change"],
                       forgetting_kl=forgetting["kl"]["mean"])
    if cfg.eval.task:
        result = compare(str(final_dir), cfg.base_model, cfg.data.validation, metric=cfg.eval.task, progress=progress)
        before, after = result["base"], result["tuned"]
        write_run_report(run_dir, before, after, forgetting)
        metrics.update({f"task_{name}": value for name, value in flat_scores(after["scores"]).items()})
        tables = report_tables(before, after, forgetting)
    else:
        write_json(run_dir / "eval" / "forgetting.json", forgetting)
        tables = [forgetting_table(forgetting)]
    if progress:
        print_tables(tables)
    return metrics
