"""The evaluation report: the same tables in the terminal and in `eval/report.html`, plus plots.

`write_run_report(run_dir, before, after, forgetting, targets)` writes into `run_dir/eval/`:
  before.json, after.json   `evaluate` results of the base and the tuned model (samples left out)
  forgetting.json           the `measure_forgetting` result, when there is one
  samples.jsonl             one line per example: input, base answer, tuned answer, truth
  report.html               one self-contained file: plots as base64 PNG, inline CSS, no external link
A report of forgetting alone (`before` and `after` None) has no before/after files or samples.

Tables are built once as plain `Table`s and rendered twice (rich, HTML), so the terminal and the
report never disagree.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import json_value
from ..fsio import atomic_dir, atomic_file, complete_lines, write_json
from ..tasks.metrics import METRICS
from ..wording import counted
from .evaluate import mean_interval, share_interval, side_by_side

ROLLOUT_STEPS_SHOWN = 3
EXAMPLES_SHOWN = 12


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    flagged: list[bool] = field(default_factory=list)  # rows to draw attention to (a missed target)

    def to_rich(self):
        from rich.table import Table as RichTable
        from rich.text import Text

        # Text, not markup: titles name data files, headers models, cells hold user text such as "[urgent]".
        caption = Text(self.caption, style="table.caption") if self.caption else None
        table = RichTable(
            title=Text(self.title, style="table.title"), caption=caption, title_justify="left", show_lines=False
        )
        for i, column in enumerate(self.columns):
            table.add_column(Text(column), justify="left" if i == 0 else "right", overflow="fold")
        for i, row in enumerate(self.rows):
            style = "bold red" if i < len(self.flagged) and self.flagged[i] else None
            table.add_row(*(Text(cell) for cell in row), style=style)
        return table

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            f"<tr{' class=flagged' if i < len(self.flagged) and self.flagged[i] else ''}>"
            + "".join(f"<td>{html.escape(cell)}</td>" for cell in row)
            + "</tr>"
            for i, row in enumerate(self.rows)
        )
        caption = f"<p class=caption>{html.escape(self.caption)}</p>" if self.caption else ""
        return f"<h2>{html.escape(self.title)}</h2><table><tr>{head}</tr>{body}</table>{caption}"


# --- tables ----------------------------------------------------------------------------------------


def _share(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def share_with_interval(share: float, n: int) -> str:
    low, high = share_interval(share, n)
    return f"{share:.1%} (95% interval {low:.1%}-{high:.1%})"


def mean_with_interval(stats: dict, n: int) -> str:
    low, high = mean_interval(stats, n)
    return f"{stats['mean']:.3f} (95% interval {low:.3f}-{high:.3f})"


def grader_rows(results: list[dict]) -> list[tuple[str, list, object, object]]:
    """The table rows of evaluations' `grader` figures, each (name, values, show, change): the mean score,
    the pass rate, and each part's mean, with their 95% intervals."""
    first, n = results[0]["grader"], results[0]["n"]
    name = f"grader {first['name']}"

    def change(a: dict, b: dict) -> str:
        return f"{b['mean'] - a['mean']:+.3f}"

    rows = [(f"{name}: mean score", [r["grader"] for r in results], lambda v: mean_with_interval(v, n), change)]
    if "pass_rate" in first:
        rows.append(
            (
                f"{name}: passed (score >= {first['pass_threshold']:g})",
                [r["grader"]["pass_rate"] for r in results],
                lambda v: share_with_interval(v, n),
                lambda a, b: f"{(b - a) * 100:+.1f} pts",
            )
        )
    for part in first.get("parts", {}):
        rows.append(
            (
                f"{name} > {part}: mean score",
                [r["grader"]["parts"][part] for r in results],
                lambda v: mean_with_interval(v, n),
                change,
            )
        )
    return rows


def flat_scores(scores: dict) -> dict[str, float]:
    """Scores with nested per-field dicts flattened (`fields.category`) and the count left out."""
    flat = {}
    for key, value in scores.items():
        if key == "n":
            continue
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


def metrics_table(results: dict[str, dict]) -> Table:
    """Loss and scores of one or more evaluations on the same data, one column each; with two
    columns (base, tuned) a change column follows. Loss, perplexity and next-token accuracy are per
    token: between models that tokenize the references differently their change is left out."""
    first = next(iter(results.values()))
    labels = list(results)
    paired = len(results) == 2
    # Per-token means over as many tokens compare as the references' whole losses do; over
    # different counts (another tokenizer) they do not.
    token_counts = [r["tokens"] for r in results.values()]
    per_token_compares = len(set(token_counts)) == 1
    rows: list[list[str]] = []

    def add(name: str, values: list, show, change=None):
        row = [name, *(show(v) for v in values)]
        if paired:
            row.append(change(*values) if change and None not in values else "")
        rows.append(row)

    def points(a, b):
        return f"{(b - a) * 100:+.1f} pts"

    def relative(a, b):
        return f"{b / a - 1:+.1%}" if a else ""

    # Data without reference answers (GRPO's prompt rows) has no loss or metric: `left_out` says why.
    measured = first.get("loss") is not None
    documents = "windows" in first  # raw text: the loss on every token, and no answers
    if measured:
        add(
            "loss per token" if documents else "loss on reference answers",
            [r["loss"] for r in results.values()],
            lambda v: f"{v:.4f}",
            per_token_compares and relative,
        )
        add(
            "perplexity",
            [r["perplexity"] for r in results.values()],
            lambda v: f"{v:.2f}",
            per_token_compares and relative,
        )
        add(
            "next-token accuracy",
            [r["mean_token_accuracy"] for r in results.values()],
            _share,
            per_token_compares and points,
        )
    flat = [flat_scores(r["scores"] or {}) for r in results.values()]
    for key in flat[0]:
        add(key, [f.get(key) for f in flat], _share, points)
    graded = all("grader" in r for r in results.values())
    if graded:
        for row in grader_rows(list(results.values())):
            add(*row)
    if not documents:
        add(
            "answers cut at max_new_tokens",
            [r["usage"]["stopped_by_length"] for r in results.values()],
            lambda v: f"{v} of {first['n']}",
        )
    in_reasoning = [r.get("usage", {}).get("stopped_in_reasoning", 0) for r in results.values()]
    if any(in_reasoning):  # a reasoning model cut off before its answer scores 0 on it
        add("cut inside the reasoning (no answer)", in_reasoning, lambda v: f"{v} of {first['n']}")
    columns = ["metric", *labels] + (["change"] if paired else [])
    if documents:
        caption = (
            f"every token of the documents a target once, in {counted(first['windows'], 'window')} of at most "
            f"{first['window']} tokens (as data.truncation: split cuts them), each read on its own"
        )
        if measured and not per_token_compares:
            caption += f"; the models tokenize the text into {' and '.join(map(str, token_counts))} tokens"
        return Table(f"loss on {counted(first['n'], 'document')} of {Path(first['data']).name}", columns, rows, caption)
    scored_by = METRICS[first["metric"]] if first["metric"] else None
    caption = (
        f"shares of all examples, 95% interval ±{_widest_interval(first['n']) * 100:.1f} pts at most; "
        f"{scored_by.headline}: {scored_by.said}"
        if scored_by
        else f"no loss, perplexity or metric: {first.get('left_out', 'no reference answers')}"
    )
    if graded:
        caption += (
            f"; grader {first['grader']['name']}: each answer scored against its row, the mean score's 95% "
            "interval Wilson's where every score is 0 or 1, else mean ± 1.96 standard errors"
        )
    if generation := first.get("generation"):  # results written by earlier versions lack it
        caption += (
            f"; answers scored: {generation['decoding']}, at most {generation['max_new_tokens']} new tokens, "
            "the chat template with the messages before the reference"
            + ("" if first["metric"] else " (the prompt, where there is none)")
        )
    if measured and not per_token_compares:
        caption += (
            f"; the models tokenize the references into {' and '.join(map(str, token_counts))} tokens, so their "
            "loss, perplexity and next-token accuracy (per token) do not compare"
        )
    scored_by = first["metric"] or f"grader {first['grader']['name']}"
    return Table(f"{scored_by} on {first['n']} examples of {Path(first['data']).name}", columns, rows, caption)


def choices_table(results: dict[str, dict], difference: dict | None = None) -> Table:
    """`acc` and `acc_norm` of one or two evaluations with their 95% intervals; with two, the paired change."""
    first = next(iter(results.values()))
    n = first["n"]
    rows = []
    for key in ("acc", "acc_norm"):
        row = [key, *(share_with_interval(r["scores"][key], n) for r in results.values())]
        if difference:
            d = difference[key]
            low, high = d["interval"]
            row.append(
                f"{d['change'] * 100:+.1f} pts ({low * 100:+.1f} to {high * 100:+.1f}); "
                f"{d['gained']} gained, {d['lost']} lost"
            )
        rows.append(row)
    columns = ["metric", *results] + (["change (paired)"] if difference else [])
    caption = (
        "log-likelihood of each choice after the question (raw text, as lm-evaluation-harness scores it); acc: "
        "the most likely choice is right; acc_norm: the same, each log-likelihood over the choice's length in "
        "characters; 95% intervals Wilson's"
        + ("; change: tuned minus base on the same rows, mean ± 1.96 standard errors" if difference else "")
    )
    shots = f", {first['num_fewshot']}-shot," if first.get("num_fewshot") else ""
    title = f"multiple choice{shots} on {counted(n, 'question')} of {Path(first['data']).name}"
    return Table(title, columns, rows, caption)


def _widest_interval(n: int) -> float:
    """Half the width of the 95% interval of a share of `n` examples at 50%, where it is widest."""
    low, high = share_interval(0.5, n)
    return (high - low) / 2


def forgetting_table(forgetting: dict) -> Table:
    text, kl, questions = forgetting["general_text"], forgetting["kl"], forgetting["general_questions"]
    # The questions are those the bundled model knows firmly: any other base may not know them.
    known_by = questions.get("known_by", "the bundled model")  # forgetting.json of earlier versions lacks it
    rows = [
        [
            "general text cross-entropy",
            f"{text['base_loss']:.4f}",
            f"{text['tuned_loss']:.4f}",
            f"{text['change']:+.2%}",
        ],
        [
            f"general questions right (of the {questions['n']} {known_by} knows)",
            _share(questions["base_accuracy"]),
            share_with_interval(questions["tuned_accuracy"], questions["n"]),
            f"{_share(questions['retained'])} kept",
        ],
        ["KL(base || tuned) per answer token", "", f"{kl['mean']:.3g}", ""],  # small KLs keep their digits
    ]
    return Table(
        "Forgetting: general data the training never saw",
        ["measure", "base", "tuned", "change"],
        rows,
        caption=f"{text['texts']} prose paragraphs ({text['tokens']} tokens); KL over {kl['tokens']} tokens "
        f"of the base model's answers to {kl['prompts']} chat prompts",
    )


def targets_table(targets: list[dict]) -> Table:
    """`targets`: [{"target": what, "goal": str, "measured": str, "met": bool}]."""
    rows = [[t["target"], t["goal"], t["measured"], "met" if t["met"] else "MISSED"] for t in targets]
    missed = sum(not t["met"] for t in targets)
    return Table(
        "Targets",
        ["target", "goal", "measured", ""],
        rows,
        flagged=[not t["met"] for t in targets],
        caption="all targets met" if not missed else f"{missed} of {len(targets)} targets missed",
    )


def examples_table(
    samples: list[dict],
    n: int = EXAMPLES_SHOWN,
    answers: tuple[tuple[str, str, str], ...] = (("base", "base", "base_correct"), ("tuned", "tuned", "tuned_correct")),
) -> Table:
    """The first `n` samples (file order, not picked): input, each answer marked right or wrong (and its
    grader's score, where a grader scored it), truth.

    `answers` names the answer columns: (column title, sample key of the answer, key of its verdict).
    """

    def shown(sample: dict, answer: str, verdict: str) -> str:
        grade = sample.get(verdict.replace("correct", "grade"))
        mark = "" if sample[verdict] is None else f" {'✓' if sample[verdict] else '✗'}"  # None: no metric
        return f"{sample[answer].strip()}{mark}" + (f" (grade {grade:.3g})" if grade is not None else "")

    rows = [
        [
            s["input"],
            *(shown(s, answer, verdict) for _, answer, verdict in answers),
            "(none)" if s["reference"] is None else s["reference"],
        ]
        for s in samples[:n]
    ]
    return Table(
        f"Examples (the first {len(rows)} of {len(samples)})",
        ["input", *(title for title, _, _ in answers), "truth"],
        rows,
    )


def facts_table(facts: dict[str, str]) -> Table:
    return Table("Run", ["", ""], [[k, str(v)] for k, v in facts.items()])


def report_tables(
    before: dict | None,
    after: dict | None,
    forgetting: dict | None = None,
    targets: list[dict] | None = None,
    facts: dict[str, str] | None = None,
    *,
    benchmarks: list[dict] | None = None,
) -> list[Table]:
    """Every table of the report, in order; the terminal prints the same list. `benchmarks`: multiple-choice
    evaluations, base vs tuned (`choices.side_by_side`, with the benchmark's `name`)."""
    tables = [facts_table(facts)] if facts else []
    if targets:
        tables.append(targets_table(targets))
    if before:
        tables.append(metrics_table({"base": before, "tuned": after}))
    if forgetting:
        tables.append(forgetting_table(forgetting))
    for b in benchmarks or []:
        tables.append(choices_table({"base": b["base"], "tuned": b["tuned"]}, b["difference"]))
    if before:
        tables.append(examples_table(side_by_side(before, after)))
    return tables


def print_tables(tables: list[Table], console=None) -> None:
    from ..console import new_console

    console = console or new_console()
    for table in tables:
        console.print(table.to_rich())
        console.print()


# --- plots -----------------------------------------------------------------------------------------


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def svg(figure) -> str:
    """The figure as an `<svg>` element to put inside an HTML page: text kept as text, no XML prologue."""
    from matplotlib import rc_context

    buffer = io.StringIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "tuneforge"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _line(axes, xs, ys, **style):
    """A curve through (xs, ys); one logged step shows as a dot, where a line through one point draws nothing."""
    return axes.plot(xs, ys, marker="o" if len(xs) == 1 else None, **style)[0]


def _figure(title: str):
    # The object API, not pyplot: no global backend or figure state in a library.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 3.6))
    axes = figure.subplots()
    # The x-axis counts steps, whole numbers: a short run gets no tick at step 0.96 or 2.5.
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return figure, axes


def read_metrics(run_dir: Path, note: Callable[[str], None] | None = None) -> list[dict]:
    """The step records of a run's metrics.jsonl; a last line still being written (no newline yet) is left out,
    and so is a line that is not a step's record (`step_record`), said to `note` (by default, a warning)."""
    return step_records(complete_lines(Path(run_dir) / "metrics.jsonl"), lambda i: f"line {i + 1}", note)


def step_records(lines: list[bytes], where: Callable[[int], str], note: Callable[[str], None] | None = None):
    """The step records of metrics.jsonl's `lines`; a line that is not one is said to `note` (by default, a
    warning), naming it by `where(i)`."""
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        record, wrong = step_record(line)
        if wrong is None:
            records.append(record)
        else:
            said = f"metrics.jsonl {where(i)} is not a step's record: {wrong}. The curves and figures leave it out."
            if note is None:
                warnings.warn(said, stacklevel=3)
            else:
                note(said)
    return records


def step_record(line: bytes) -> tuple[dict | None, str | None]:
    """A line of metrics.jsonl as the training loop writes it (a JSON object with an integer `step` and figures
    that are numbers or null), or why it is not one."""
    record, wrong = json_value(line)
    if wrong is not None:
        return None, f"it {wrong}"
    if not isinstance(record, dict):
        return None, "it is not a JSON object"
    if not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        return None, "its `step` is not an integer"
    wrong = figures_problem(record)
    return (None, f"its {wrong}") if wrong else (record, None)


def figures_problem(record: dict) -> str | None:
    """Which of a step's figures is not a number or null, in words; None when all are."""
    for key, value in record.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"`{key}` is not a number"
    return None


def curve(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in each record of a run's metrics that has it."""
    return [(m["step"], m[key]) for m in metrics if key in m]


def loss_figure(runs: dict[str, list[dict]], measure: str = "loss"):
    """The loss curves of one run, or of several on one chart to compare them: training loss as a line,
    validation loss as points on it, the full validation at the end as a square. `measure="reward"`: a
    grpo run's validation rewards (valid_reward, full_valid_reward) instead, higher is better, and no
    training loss (a policy-gradient loss, no measure of the answers).

    `runs` maps a run's name to its metrics; with one run the name is left out of the legend. Each
    line's SVG group id is `train-curve`, `valid-curve` or `final-valid` (suffixed `-N` for the N-th
    run of several), so a page can find what was drawn."""
    figure, axes = _figure(measure)
    several = len(runs) > 1
    for i, (name, metrics) in enumerate(runs.items()):
        suffix, label = (f"-{i}", f"{name}: ") if several else ("", "")
        colour = f"C{i}" if several else None
        train = curve(metrics, "train_loss") if measure == "loss" else []
        valid, final = curve(metrics, f"valid_{measure}"), curve(metrics, f"full_valid_{measure}")
        if train:
            line = _line(axes, *zip(*train), label=f"{label}train", linewidth=1, color=colour or "C0")
            line.set_gid(f"train-curve{suffix}")
        if valid:
            line = axes.plot(*zip(*valid), "o--", label=f"{label}validation", color=colour or "C1")[0]
            line.set_gid(f"valid-curve{suffix}")
        if final:
            line = axes.plot(*zip(*final), "s", color=colour or "black", label=f"{label}full validation (end)")[0]
            line.set_gid(f"final-valid{suffix}")
    axes.set_xlabel("step")
    axes.set_ylabel(loss_label(runs) if measure == "loss" else "grader score per answer (higher is better)")
    if axes.lines:
        # Beside the chart when several runs' entries would cover their curves.
        place = {"loc": "upper left", "bbox_to_anchor": (1.01, 1)} if several else {}
        axes.legend(fontsize="small", **place)
    return figure


# What a method's training loss is, told by a figure only its objective logs.
_LOSS_LABELS = (
    ("reward", "policy-gradient loss per token (GRPO)"),
    ("rewards/margins", "DPO loss per pair"),
    ("divergence", "distillation loss per trained token"),
)


def loss_label(runs: dict[str, list[dict]]) -> str:
    """The loss axis's label: the runs' objective when they share one, else plain "training loss"."""
    labels = set()
    for metrics in runs.values():
        logged = set().union(*(row.keys() for row in metrics)) if metrics else set()
        labels.add(next((label for key, label in _LOSS_LABELS if key in logged), "cross-entropy per trained token"))
    return labels.pop() if len(labels) == 1 else "training loss"


def learning_rate_figure(metrics: list[dict]):
    figure, axes = _figure("learning rate")
    _line(axes, *zip(*curve(metrics, "lr")))
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate (no unit)")
    axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    # From zero: a warmup whose first step has a third of the peak reads as such, not as a climb from
    # nothing at the chart's lower edge.
    axes.set_ylim(bottom=0)
    return figure


def training_plots(metrics: list[dict]) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for the loss curves and the learning rate of a run's metrics.jsonl."""
    if not curve(metrics, "train_loss"):
        return []
    return [
        ("Training and validation loss", _png(loss_figure({"run": metrics}))),
        ("Learning rate", _png(learning_rate_figure(metrics))),
        *((caption, _png(figure)) for caption, figure in reward_figures(metrics)),
    ]


def reward_figures(metrics: list[dict]) -> list[tuple[str, object]]:
    """(caption, figure) for the rewards and the KL of a reinforcement fine-tuning run; none for other runs."""
    rewarded = [m for m in metrics if "reward" in m]
    if not rewarded:
        return []
    steps = [m["step"] for m in rewarded]
    rewards, axes = _figure("reward")
    _line(axes, steps, [m["reward"] for m in rewarded], label="reward (mean)", linewidth=1.5)
    for part in sorted({k for m in rewarded for k in m if k.startswith("reward/")}):
        _line(axes, steps, [m.get(part) for m in rewarded], label=part, linewidth=1, alpha=0.7)
    _line(axes, steps, [m["reward_std"] for m in rewarded], linestyle=":", label="std within groups")
    validated = [(m["step"], m.get("valid_reward", m.get("full_valid_reward"))) for m in metrics]
    validated = [(step, reward) for step, reward in validated if reward is not None]
    if validated:
        axes.plot(*zip(*validated), "o-", label="validation prompts (greedy)", linewidth=1.5)
    axes.set_xlabel("step")
    axes.set_ylabel("grader score per answer")
    axes.legend()
    kl, axes = _figure("KL to the reference")
    _line(axes, steps, [m["kl"] for m in rewarded])
    axes.set_xlabel("step")
    axes.set_ylabel("per token")
    return [("Reward of the sampled answers (reinforcement fine-tuning)", rewards), ("KL to the reference", kl)]


def rollouts_table(run_dir: Path, steps: int = ROLLOUT_STEPS_SHOWN) -> Table | None:
    """The sampled answers of the last `steps` steps' first prompts, with their rewards (grpo runs)."""
    path = Path(run_dir) / "rollouts.jsonl"
    if not path.is_file():
        return None
    # One record a step: a resumed run cuts the file at its checkpoint before it samples the later steps again.
    records = []
    for i, line in enumerate(complete_lines(path)):
        if not line.strip():
            continue
        record, wrong = json_value(line)
        wrong = f"it {wrong}" if wrong else rollout_problem(record)
        if wrong:
            warnings.warn(
                f"rollouts.jsonl line {i + 1} is not a step's sampled answers: {wrong}. The report's table leaves "
                "it out.",
                stacklevel=2,
            )
        else:
            records.append(record)
    records = records[-steps:]
    rows = [
        [
            str(record["step"]),
            record["prompt"],
            answer["text"].strip(),
            f"{answer['reward']:.3f}",
            f"{answer['advantage']:+.2f}",
        ]
        for record in records
        for answer in record["answers"]
    ]
    return Table(
        f"Sampled answers and their rewards (the last {len(records)} steps)",
        ["step", "prompt", "answer", "reward", "advantage"],
        rows,
    )


def rollout_problem(record) -> str | None:
    """Why a line of rollouts.jsonl is not a step's record as GRPO writes it (an integer `step`, the `prompt`'s
    text, `answers` each with its text, reward and advantage), in words; None where it is one."""
    if not isinstance(record, dict):
        return "it is not a JSON object"
    if not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        return "its `step` is not an integer"
    if not isinstance(record.get("prompt"), str):
        return "its `prompt` is not text"
    answers = record.get("answers")
    if not isinstance(answers, list) or not all(
        isinstance(a, dict)
        and isinstance(a.get("text"), str)
        and all(isinstance(a.get(k), int | float) and not isinstance(a[k], bool) for k in ("reward", "advantage"))
        for a in answers
    ):
        return "its `answers` are not a list of {text, reward, advantage}"
    return None


def scores_plot(before: dict, after: dict) -> tuple[str, str]:
    if before["scores"] is None:  # data without reference answers: the grader alone scored
        caption = f"Grader {after['grader']['name']}, base vs tuned (mean score per answer; error bars: 95% intervals)"
        return caption, _png(grader_figure(before, after))
    caption = f"Scores, base vs tuned (share of {_scored(after)}'s examples; error bars: 95% intervals)"
    return caption, _png(scores_figure(before, after))


def grader_figure(before: dict, after: dict):
    """The grader's figures of the base and the tuned model side by side (the mean score, the pass rate,
    each part's mean), each with its 95% interval as the table gives it."""
    n, first = after["n"], after["grader"]
    keys = ["mean score", *(["passed"] if "pass_rate" in first else []), *first.get("parts", {})]

    def figures(grader: dict) -> list[tuple[float, float, float]]:
        spans = [(grader["mean"], *mean_interval(grader, n))]
        if "pass_rate" in grader:
            spans.append((grader["pass_rate"], *share_interval(grader["pass_rate"], n)))
        spans += [(part["mean"], *mean_interval(part, n)) for part in grader.get("parts", {}).values()]
        return spans

    figure, axes = _figure(f"grader {first['name']}: base vs tuned")
    for offset, result, label in ((-0.2, before, "base"), (0.2, after, "tuned")):
        spans = figures(result["grader"])
        below_above = [[max(0.0, v - low) for v, low, _ in spans], [max(0.0, high - v) for v, _, high in spans]]
        axes.bar(
            [p + offset for p in range(len(keys))],
            [v for v, _, _ in spans],
            width=0.4,
            label=label,
            yerr=below_above,
            capsize=3,
        )
    axes.set_xticks(list(range(len(keys))), keys, rotation=30, ha="right")
    axes.set_ylabel("grader score per answer")
    axes.legend()
    return figure


def _scored(result: dict) -> str:
    """The name of the file an evaluation scored (after training the validation file, in the quickstart the test
    file), for the plot to say what its shares are of."""
    return Path(result["data"]).name


def scores_figure(before: dict, after: dict):
    """Each score of the base and the tuned model side by side: a share of the scored file's examples, 0 to 1,
    with its 95% interval as an error bar (as the table gives it), so bars a few points apart read as
    the same model's noise where their intervals overlap."""
    base, tuned = flat_scores(before["scores"]), flat_scores(after["scores"])
    keys = list(base)
    figure, axes = _figure(f"{after['metric']}: base vs tuned")
    positions = range(len(keys))

    def bars(offset: float, shares: list[float], label: str) -> None:
        spans = [share_interval(share, after["scores"]["n"]) for share in shares]
        # Distances below and above each share; at 0% or 100% an end is the share itself, give or take rounding.
        below_above = [
            [max(0.0, s - low) for s, (low, _) in zip(shares, spans)],
            [max(0.0, high - s) for s, (_, high) in zip(shares, spans)],
        ]
        axes.bar([p + offset for p in positions], shares, width=0.4, label=label, yerr=below_above, capsize=3)

    bars(-0.2, [base[k] for k in keys], "base")
    bars(0.2, [tuned.get(k, 0) for k in keys], "tuned")
    axes.set_xticks(list(positions), keys, rotation=30, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel(f"share of {_scored(after)}'s examples (0 to 1)")
    axes.legend()
    return figure


# --- files -----------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}tr.flagged td{color:#b00;font-weight:bold}
td:not(:first-child){font-family:ui-monospace,Menlo,Consolas,monospace}
.caption{color:#666;font-size:.85em;margin:0}
figure{display:inline-block;margin:.5em 1em .5em 0}figcaption{color:#555;font-size:.9em}
"""


def render_html(title: str, tables: list[Table], plots: list[tuple[str, str]]) -> str:
    figures = "".join(
        f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{png}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, png in plots
    )
    made = datetime.datetime.now().isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=caption>written {made} by tuneforge</p>"
        + tables[0].to_html()
        + f"<h2>Plots</h2>{figures}"
        + "".join(t.to_html() for t in tables[1:])
        + "</body></html>"
    )


def _without_samples(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "samples"}


def write_run_report(
    run_dir: str | Path,
    before: dict | None,
    after: dict | None,
    forgetting: dict | None = None,
    targets: list[dict] | None = None,
    facts: dict[str, str] | None = None,
    *,
    benchmarks: list[dict] | None = None,
) -> Path:
    """Write the evaluation files and report of a run (see the module doc); returns report.html. Each of
    `benchmarks` (multiple choice, base vs tuned) writes `benchmark_NAME.json` (figures and paired change) and
    `benchmark_NAME.jsonl` (each question's results)."""
    run_dir = Path(run_dir)
    plots = training_plots(read_metrics(run_dir))
    tables = report_tables(before, after, forgetting, targets, facts, benchmarks=benchmarks)
    if (rollouts := rollouts_table(run_dir)) is not None:
        tables.append(rollouts)
    # The folder is replaced whole: an evaluation killed midway, or one that measures less, leaves none
    # of its files beside an earlier one's (a forgetting.json the new report does not show).
    with atomic_dir(run_dir / "eval", replace=True) as out:
        if before:
            write_json(out / "before.json", _without_samples(before))
            write_json(out / "after.json", _without_samples(after))
            with atomic_file(out / "samples.jsonl") as f:
                for sample in side_by_side(before, after):
                    f.write(json.dumps(sample, ensure_ascii=False) + "\n")
            plots.append(scores_plot(before, after))
        if forgetting:
            write_json(out / "forgetting.json", forgetting)
        for b in benchmarks or []:
            name = b["name"]
            figures = {side: _without_samples(b[side]) for side in ("base", "tuned")}
            write_json(out / f"benchmark_{name}.json", {**figures, "difference": b["difference"]})
            with atomic_file(out / f"benchmark_{name}.jsonl") as f:
                f.writelines(json.dumps(sample, ensure_ascii=False) + "\n" for sample in b["samples"])
        with atomic_file(out / "report.html") as f:
            f.write(render_html(f"tuneforge report: {run_dir.name}", tables, plots))
    return run_dir / "eval" / "report.html"
