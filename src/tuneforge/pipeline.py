"""A config's whole run, as `tuneforge train` does it: check what its `eval:` section needs, train,
then run that evaluation on the final model (`eval.after_training`).

Training and evaluation stay separate stages: `tuneforge.training.train` trains and nothing else;
this module, the CLI, the quickstart and the jobs service put the two together.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import load_config
from .eval.after_training import check_eval_inputs, evaluate_after_training
from .fsio import write_json
from .progress import library_bars
from .training import TrainResult
from .training import train as train_only
from .training.loop import check_before_launch, launched_world, resume_command


def train(
    config,
    overrides=(),
    *,
    resume: str | bool | None = None,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune as `config` (a YAML path, a shipped recipe's name, a dict or a Config) says, with
    `overrides` (dotted KEY=VALUE strings, one or a list), then evaluate as its `eval:` asks; returns a
    `TrainResult` (output_dir, final_dir, steps, status "completed" or "interrupted", metrics). The
    evaluation's headline figures join the result's metrics and the run's `summary.json`.

    The CLI's options, by the same names: `resume` is "latest" (or True) or a checkpoint folder to
    continue from; `force` resumes with a config that changes results; `overwrite` starts afresh where
    output_dir holds an earlier run, deleting all that run wrote once this run's data, model and plan pass
    their checks.
    `progress=False` leaves out the progress line, the closing table of metrics and transformers' bars."""
    cfg = load_config(config, overrides)
    with library_bars(progress):
        # The evaluation's checks come after training's check of the data files: they read the validation file
        # and the base model's tokenizer.
        result = train_only(
            cfg, resume=resume, force=force, overwrite=overwrite, progress=progress, checks=check_eval_inputs
        )
        if result.final_dir is None or not cfg.eval.asked:
            return result  # interrupted, or a process other than rank 0, or nothing asked
        try:
            evaluate_run(cfg, result.metrics, progress=progress)
        except KeyboardInterrupt:
            raise EvaluationInterrupted from None
    return result


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C during the evaluation `train` runs once training completed: the run's model is whole in final/."""


def interrupted_evaluating(out: Path) -> str:
    """What `tuneforge train` says when Ctrl-C stops the evaluation after training: the model is kept, and the
    run's --resume, which finds training complete, runs the evaluation."""
    return (
        f"interrupted during the evaluation after training; the trained model is in {out / 'final'}. "
        f"{resume_command(out, launched_world())} runs the evaluation."
    )


def evaluation_missing(cfg) -> bool:
    """Whether cfg's completed run lacks the evaluation its `eval:` asks for: one stopped while it ran left no
    eval/report.html, which it writes last (after summary.json's metrics), with its folder whole."""
    return cfg.eval.asked and not (Path(cfg.output_dir) / "eval" / "report.html").is_file()


def evaluate_run(cfg, metrics: dict | None = None, *, progress: bool = True) -> dict:
    """The evaluation cfg's `eval:` asks for, on its completed run's final model; its headline figures join
    `metrics` (default: summary.json's) and summary.json's. Returns them all."""
    out = Path(cfg.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary.get("metrics", {}) if metrics is None else metrics
    with library_bars(progress):
        evaluation = evaluate_after_training(cfg, out, out / "final", progress=progress)
    metrics.update(evaluation.metrics)
    # The metrics before the report: a run stopped between the two has no report.html, so `evaluation_missing`
    # has the evaluation run again, and a report never shows figures summary.json lacks.
    write_json(out / "summary.json", {**summary, "metrics": metrics})
    evaluation.write_report(out, progress=progress)
    return metrics


def check_launch(
    config, overrides=(), *, processes: int, resume: str | bool | None = None, force: bool = False, overwrite=False
) -> None:
    """What `train` checks before any process group, data or model weights, for `tuneforge train --nproc N`
    (or --nnodes) to run in the launching process before torchrun starts the `processes`: a refused config
    is refused in seconds, once, with the message and exit code one process gives. The processes check
    it again as they start."""
    cfg = load_config(config, overrides)
    if check_before_launch(cfg, processes, resume=resume, force=force, overwrite=overwrite) is not None:
        check_eval_inputs(cfg)  # it reads the base model's tokenizer: only one already at hand
