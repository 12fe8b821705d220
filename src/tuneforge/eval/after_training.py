"""What a training config's `eval:` section asks for, run on the final model when training ends.

- `eval.task` (a metric name: exact, contains, json_fields, support_triage, or auto): the base and
  the final model answer the prompts of the `data.validation` file, scored side by side;
  `eval/report.html` holds the tables, the loss curves and examples. A KTO run's rows rated false are
  left out (`validation_examples`).
- `eval.grader` (with `eval.task`; a grader as `grpo.grader` takes it): the answers are scored by the
  grader too, each against its row, and the table, the report and the metrics (`grader_NAME`,
  `grader_NAME_passed`) hold its mean score for base vs tuned. A GRPO run's default is `grpo.grader`
  (weighed by `grpo.grader_weights`): the held-out score of the reward it trained on. A GRPO run's
  answers are as long as its validation's (`grpo.max_new_tokens`), so that score is its `full_valid_reward`.
  With a grader the validation file may be GRPO's prompt rows, without reference answers: `eval.task: auto`
  then leaves the loss and metric out and the grader's scores are the evaluation (`evaluate.evaluate_loaded`).
- `eval.forgetting: true`: base vs final model on the general sets no training touches (`forgetting.py`).
- `eval.benchmarks` (multiple-choice files): base vs final model scored by each choice's log-likelihood
  (`choices.py`), acc and acc_norm with the paired change; metrics `benchmark_NAME_acc`, `benchmark_NAME_acc_norm`.

Both land in the run folder's `eval/` and its `report.html` (with the loss curves), are printed as
tables, and their headline figures join the run's final metrics (`summary.json`,
`TrainResult.metrics`) as `task_*` and `forgetting_*`. The base is `base_model`, the model training
started from: for an adapter trained on a plain model, that adapter switched off; otherwise (a full
model, or a LoRA run's adapter trained further, which switched off leaves the model beneath the
LoRA run) `base_model` loaded beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..graders import load_grader
from ..models import load_model, load_tokenizer, resolve, run_tokenizer, source_context_length
from ..tasks.metrics import METRICS
from ..wording import unknown_choice
from .choices import (
    benchmark_name,
    check_scorable,
    choice_requests,
    layout_refusal,
    read_benchmark,
    score_rows,
    side_by_side,
)
from .evaluate import (
    DEFAULT_MAX_NEW_TOKENS,
    EvalExample,
    check_grader,
    choose_metric,
    evaluate_loaded,
    read_eval_examples,
    render_within_window,
)
from .forgetting import ModelPair, forgetting_loaded, positions_needed
from .report import flat_scores, print_tables, report_tables, write_run_report


def check_eval_inputs(cfg) -> None:
    """Before any compute: with `eval.task`, the metric exists, every row of the validation file
    is a conversation that ends in its reference answer that fits the base model's context, and the metric
    can score against every reference (else an error naming file, line and field), and its grader
    (`eval_grader`) can score the rows (else an error naming the grader and the row); with `eval.forgetting`,
    the general sets fit the base model's context; with `eval.benchmarks`, each file's rows are multiple-choice
    questions that fit it (else an error naming file, line and field), no two files under one metric name."""
    if cfg.eval.task:
        if cfg.eval.task != "auto" and cfg.eval.task not in METRICS:
            refused = unknown_choice("metric", cfg.eval.task, ("auto", *METRICS))
            raise ConfigError(f"{cfg.key_at('eval.task')}: {refused}")
        graded = eval_grader(cfg)
        examples = validation_examples(cfg)
        metric = choose_metric(cfg.eval.task, examples)
        if graded:
            spec, weights, key = graded
            check_grader(spec, examples, key=key, weights=weights, placed=cfg.key_at(key))
        if metric is not None:  # rows without reference answers have no loss (GRPO checks its prompts' length)
            source = cfg.base_source()
            # The final model's tokenizer, which the evaluation renders with: the base's, with the run's template.
            tokenizer = run_tokenizer(cfg, source)
            render_within_window(examples, tokenizer, source_context_length(source), cfg.data.train_on)
    names = [benchmark_name(b.file, b.num_fewshot) for b in cfg.eval.benchmarks]
    for i, (benchmark, name) in enumerate(zip(cfg.eval.benchmarks, names)):
        if names.index(name) != i:
            raise ConfigError(
                f"{cfg.key_at(f'eval.benchmarks.{i}')}: {benchmark.file} and "
                f"{cfg.eval.benchmarks[names.index(name)].file} would both report as benchmark_{name}; rename one "
                "of the files."
            )
    if cfg.eval.benchmarks:
        # One tokenizer for every file: the final model's, which the benchmarks are scored with.
        source = cfg.base_source()
        tokenizer, window = run_tokenizer(cfg, source), source_context_length(source)
        for i, benchmark in enumerate(cfg.eval.benchmarks):
            for key, path in (("", benchmark.file), (".fewshot_file", benchmark.fewshot_file)):
                if path is not None and (refusal := layout_refusal(path)):
                    raise ConfigError(f"{cfg.key_at(f'eval.benchmarks.{i}{key}')}: {refusal}")
            rows = read_benchmark(
                benchmark.file, num_fewshot=benchmark.num_fewshot, fewshot_file=benchmark.fewshot_file
            )
            check_scorable(rows, tokenizer, window)
    if cfg.eval.forgetting:
        source = cfg.base_source()
        window, needed = source_context_length(source), positions_needed(run_tokenizer(cfg, source))
        if window and needed > window:
            raise ConfigError(
                f"{cfg.key_at('eval.forgetting')}: the forgetting measure feeds the model rows of up to {needed} "
                f"tokens (general texts, and general prompts and questions with their answers), more than the "
                f"{window} positions {source.name} was built for; set eval.forgetting to false for this model."
            )


def eval_grader(cfg) -> tuple[dict | str | list, list[float] | None, str] | None:
    """(spec, weights, the key that gave it) of the grader the after-training evaluation scores with:
    `eval.grader`, else a GRPO run's `grpo.grader`; None for none."""
    if cfg.eval.grader:
        return cfg.eval.grader, None, "eval.grader"
    if cfg.method == "grpo":
        return cfg.grpo.grader, cfg.grpo.grader_weights, "grpo.grader"
    return None


def validation_examples(cfg) -> list[EvalExample]:
    """The rows of the validation file `eval.task` scores, its prompts too with a grader (`eval_grader`). A KTO
    run's rows rated false, the replies its validation loss needs as replies not to give, are left out, as a
    preference pair's rejected reply is: the rows rated true are the reference answers."""
    return read_eval_examples(cfg.data.validation, prompts=bool(eval_grader(cfg)), rated_true_only=True)


@dataclass
class Evaluation:
    """What `evaluate_after_training` measured: the headline `metrics`, and the results its report shows."""

    metrics: dict
    base: dict | None
    tuned: dict | None
    forgetting: dict | None
    benchmarks: list[dict]  # each multiple-choice file's base and tuned scores (`eval.benchmarks`)

    def write_report(self, run_dir: Path, *, progress: bool = True) -> Path:
        """The run folder's `eval/` (report.html last), and the tables printed; returns report.html."""
        report = write_run_report(run_dir, self.base, self.tuned, self.forgetting, benchmarks=self.benchmarks)
        if progress:
            # The tables, then where their plots (loss curves, base vs tuned scores) are.
            print_tables(report_tables(self.base, self.tuned, self.forgetting, benchmarks=self.benchmarks))
            print(f"report with plots: {report}")
        return report


def evaluate_after_training(cfg, run_dir: Path, final_dir: Path, *, progress: bool = True) -> Evaluation:
    """Run what `cfg.eval` asks for on `final_dir`; returns its headline metrics and results, whose report
    (`Evaluation.write_report`) the caller writes once it has kept the metrics.

    The final model is loaded once; where `base_model` is a plain model and the final model an
    adapter on it, the base is that adapter switched off, so no second copy is loaded."""
    source = resolve(str(final_dir))
    tokenizer = load_tokenizer(source)
    tuned = load_model(source)
    start = cfg.base_source()
    adapter_on_start = hasattr(tuned, "disable_adapter") and start.adapter is None
    pair = ModelPair(tuned, None if adapter_on_start else load_model(start))
    names = {"base": cfg.base_model, "tuned": source.name}
    specs = {"base": cfg.base_model, "tuned": str(final_dir)}  # what `tuneforge eval` would be given
    metrics: dict = {}
    forgetting = None
    if cfg.eval.forgetting:
        forgetting = {
            "model": names["tuned"],
            "base": names["base"],
            **forgetting_loaded(pair, tokenizer, progress=progress),
        }
        metrics.update(
            forgetting_questions_kept=forgetting["general_questions"]["retained"],
            forgetting_text_ce_change=forgetting["general_text"]["change"],
            forgetting_kl=forgetting["kl"]["mean"],
        )
    results = {"base": None, "tuned": None}
    if cfg.eval.task:
        graded = eval_grader(cfg)
        examples = validation_examples(cfg)
        grader = load_grader(*graded[:2], key=graded[2], placed=cfg.key_at(graded[2])) if graded else None
        # A GRPO run's answers are as long as it sampled and validated them: cut shorter, they would score
        # otherwise than its valid_reward.
        max_new_tokens = cfg.grpo.max_new_tokens if cfg.method == "grpo" else DEFAULT_MAX_NEW_TOKENS
        for side in results:
            with getattr(pair, side)() as model:
                results[side] = {
                    "model": names[side],
                    "spec": specs[side],
                    "data": str(cfg.data.validation),
                    **evaluate_loaded(
                        model,
                        tokenizer,
                        examples,
                        metric=cfg.eval.task,
                        max_new_tokens=max_new_tokens,
                        progress=progress,
                        train_on=cfg.data.train_on,
                        grader=grader,
                    ),
                }
        scores = results["tuned"]["scores"] or {}  # none for data without reference answers
        metrics.update({f"task_{name}": value for name, value in flat_scores(scores).items()})
        if grader is not None:
            figures = results["tuned"]["grader"]
            metrics[f"grader_{figures['name']}"] = figures["mean"]
            if "pass_rate" in figures:
                metrics[f"grader_{figures['name']}_passed"] = figures["pass_rate"]
    benchmarks = []
    for benchmark in cfg.eval.benchmarks:
        path, name = benchmark.file, benchmark_name(benchmark.file, benchmark.num_fewshot)
        rows = read_benchmark(path, num_fewshot=benchmark.num_fewshot, fewshot_file=benchmark.fewshot_file)
        encoded = [choice_requests(tokenizer, row) for row in rows]  # once, for both sides
        sides = {}
        for side in ("base", "tuned"):
            with getattr(pair, side)() as model:
                sides[side] = {
                    "model": names[side],
                    "spec": specs[side],
                    "data": str(path),
                    "num_fewshot": benchmark.num_fewshot,
                    **score_rows(model, tokenizer, rows, encoded, progress=progress),
                }
        benchmarks.append({"name": name, **side_by_side(sides["base"], sides["tuned"])})
        for score, value in sides["tuned"]["scores"].items():
            metrics[f"benchmark_{name}_{score}"] = value
    return Evaluation(metrics, results["base"], results["tuned"], forgetting, benchmarks)
