"""What a run folder says, read for the dashboard: its config, progress, checkpoints, data report and evaluation.

A run folder is what `training/loop.py` and `pipeline.py` write (config.yaml, metrics.jsonl,
data_report.json, checkpoints/step-N/, final/, summary.json, eval/); any of its files may be missing
(a run that has just started, one that stopped, one without evaluation) or still being written (the
last line of metrics.jsonl), and the views say so instead of failing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import yaml

from ..config import dotted, load_yaml, yaml_syntax_error
from ..data.prepare import refuses
from ..errors import ConfigError, json_value
from ..eval.report import (
    choices_table,
    examples_table,
    figures_problem,
    flat_scores,
    forgetting_table,
    learning_rate_figure,
    loss_figure,
    metrics_table,
    read_metrics,
    reward_figures,
    step_records,
    svg,
)
from ..training.run_folder import is_training
from ..training.samples import FILE as SAMPLES_FILE
from ..training.samples import read as read_samples

ACTIVE_STATUSES = ("validating_files", "queued", "running", "paused")
# A run folder without a summary whose lock cannot tell (another machine's run) and whose files changed this
# recently is taken to be training still.
RUNNING_WITHIN_S = 120.0
SAMPLES_SHOWN = 50
SAMPLE_STEPS_SHOWN = 20  # the validations whose sample answers a run's page shows, the latest open
# The figures the runs list shows, in order, with the first of the keys a run has.
HEADLINE_METRICS = (
    ("train loss", ("train_loss",)),
    ("valid loss", ("full_valid_loss", "valid_loss")),
    ("valid reward", ("full_valid_reward", "valid_reward")),  # GRPO's greedy answers to held-out prompts
    ("task score", ("task_exact", "task_contains")),  # eval.task's headline score, whichever metric scored it
)
# Keys whose value is a share of the examples: shown as a percentage with the metric's name, as report.html shows it.
SHARE_PREFIX = "task_"
# libyaml's parser where PyYAML has it: a run's whole config.yaml takes ~60 ms to parse in pure Python,
# seconds for a list of 200 runs.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# The most keys and list items a config.yaml may hold, counted as its aliases expand: a run's whole config holds a
# few hundred, and the page lists each (load_config's bound, MOST_KEYS, is ten times this).
MAX_CONFIG_VALUES = 10_000
# What a validation logs, and its name in the run's events.
VALIDATION_FIGURES = (("valid_loss", "validation loss"), ("valid_reward", "validation reward"))


@dataclass
class Event:
    at: float | None
    message: str
    level: str = "info"


@dataclass
class Checkpoint:
    step: int
    metrics: dict
    model: str | None  # the name to chat with it by, where the server can answer with it


@dataclass
class RunRow:
    """One line of the runs list."""

    id: str
    name: str
    status: str
    model: str
    method: str
    created: float
    elapsed_s: float | None = None
    step: int = 0
    total_steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what its folder's files hold that the views left out

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    @property
    def steps(self) -> str:
        """The steps column: steps done, and of how many where the run says."""
        return f"{self.step} / {self.total_steps}" if self.total_steps else str(self.step)

    def headline(self) -> list[str]:
        shown = []
        for _, keys in HEADLINE_METRICS:
            key = next((k for k in keys if k in self.metrics), "")
            value = self.metrics.get(key)
            if key.startswith(SHARE_PREFIX) and number(value) != "-":
                shown.append(f"{value:.1%} {key.removeprefix(SHARE_PREFIX)}")
            else:
                shown.append(number(value))
        return shown


@dataclass
class RunPage:
    """Everything a run's page shows."""

    row: RunRow
    folder: RunFolder
    events: list[Event]
    checkpoints: list[Checkpoint]
    hyperparameters: dict[str, str]
    data_report: dict | None
    tuned_model: str | None  # the name to chat with the run's final model by
    base_model: str | None
    error: str | None = None


def number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def duration(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and not math.isfinite(seconds)):
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class RunFolder:
    """Read-only views of one run folder; nothing here trusts a file to exist or be whole. What a view finds
    in a file that is not as its writer writes it, it leaves out and describes in `problems`, which the run's
    row and page show."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.problems: list[str] = []

    def note(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def config(self) -> dict:
        path = self.path / "config.yaml"
        try:
            stat = path.stat()
        except OSError:
            return {}
        # Parsed again only when the file changes: the list reads every run's config on each load.
        config, problem = _config(str(path), stat.st_mtime_ns, stat.st_size)
        if problem is not None:
            self.note(problem)
        return dict(config)

    @cached_property
    def summary(self) -> dict | None:
        """summary.json's object, read once for the view: a run's status, its row and its page's events read it."""
        summary = self._object("summary.json", SUMMARY_SHAPE)
        if summary and (wrong := figures_problem(summary.get("metrics") or {})):
            self.note(f"summary.json is not as tuneforge writes it: in its `metrics`, {wrong}; the file is left out.")
            return None
        return summary

    def _object(self, name: str, shape: dict) -> dict | None:
        """The JSON object in the folder's file `name`, None without one; a file that holds something else, or
        an object not of its writer's `shape` (`_misshapen`), is noted and left out."""
        try:
            data = (self.path / name).read_bytes()
        except OSError:
            return None
        found, wrong = json_value(data)
        if (wrong := wrong or _unlike(found, shape)) is not None:
            self.note(f"{name} {wrong}; the file is left out.")
            return None
        return found

    def metrics(self) -> list[dict]:
        return read_metrics(self.path, self.note)

    def last_metrics(self) -> dict:
        """The last step's record, read from the end of metrics.jsonl (a long run's file is not read whole)."""
        path = self.path / "metrics.jsonl"
        try:
            with open(path, "rb") as f:
                start = max(0, f.seek(0, 2) - 8192)
                f.seek(start)
                lines = f.read().split(b"\n")
        except OSError:
            return {}
        # A read from inside the file starts mid-line; the last line is empty or still being written.
        lines = lines[1 if start else 0 : -1]
        merged: dict = {}
        where = (lambda i: f"line {len(lines) - i} from its end") if start else (lambda i: f"line {i + 1}")
        for record in step_records(lines, where, self.note):
            if record["step"] != merged.get("step"):
                merged = {}
            merged.update(record)
        return merged

    def data_report(self) -> dict | None:
        return self._object("data_report.json", DATA_REPORT_SHAPE)

    def validation_samples(self) -> list[dict]:
        """The last `SAMPLE_STEPS_SHOWN` records of the run folder's samples.jsonl (`train.eval_samples`; not
        eval/'s), newest first; a record not as training writes it is noted and left out."""
        shown = []
        for line, record in read_samples(self.path / SAMPLES_FILE, self.note)[-SAMPLE_STEPS_SHOWN:]:
            if (wrong := _unlike(record, SAMPLES_SHAPE)) is None:
                shown.append(record)
            else:
                self.note(f"{SAMPLES_FILE} line {line} {wrong}; it is left out.")
        return list(reversed(shown))

    def checkpoint_steps(self) -> list[int]:
        folders = (self.path / "checkpoints").glob("step-*")
        return sorted(int(f.name[5:]) for f in folders if f.name[5:].isdigit() and f.is_dir())

    def task_scores(self) -> dict[str, float]:
        """The final model's task scores as `task_NAME` (`task_exact`, `task_fields.category`), read from the
        run's evaluation, eval/after.json, which `tuneforge train` with eval.task and the quickstart both write
        (the quickstart's summary.json holds none); none for a run without one."""
        after = self._object("eval/after.json", AFTER_SHAPE) or {}
        scores = flat_scores(after.get("scores") or {})
        return {f"{SHARE_PREFIX}{name}": v for name, v in scores.items() if isinstance(v, (int, float))}

    def evaluation(self) -> dict[str, dict | None]:
        return {name: self._object(f"eval/{name}.json", {}) for name in ("before", "after", "forgetting")}

    def benchmarks(self) -> dict[str, dict]:
        """The multiple-choice benchmarks of the run's evaluation (`eval.benchmarks`): each file's base and tuned
        figures and their paired change, as eval/benchmark_NAME.json holds them, by file."""
        found = {f"eval/{path.name}": path for path in sorted((self.path / "eval").glob("benchmark_*.json"))}
        return {name: b for name in found if (b := self._object(name, {})) is not None}

    def samples(self) -> list[dict]:
        """eval/samples.jsonl's answers side by side; a line that is not a JSON object is noted and left out."""
        try:
            lines = (self.path / "eval" / "samples.jsonl").read_bytes().split(b"\n")
        except OSError:
            return []
        samples = []
        for i, line in enumerate(lines):
            if line.strip():
                sample, wrong = json_value(line)
                wrong = wrong or (None if isinstance(sample, dict) else "is not a JSON object")
                if wrong is None:
                    samples.append(sample)
                else:
                    self.note(f"eval/samples.jsonl line {i + 1} {wrong}; the line is left out.")
        return samples

    def changed_at(self) -> float | None:
        # data_report.json alone: a run whose data was refused.
        files = ("metrics.jsonl", "config.yaml", "data_report.json")
        times = [p.stat().st_mtime for p in (self.path / name for name in files) if p.exists()]
        return max(times) if times else None

    def data_refused(self) -> bool:
        """Whether the run stopped at its data check: a data report that refuses the data, and nothing after it."""
        if (self.path / "config.yaml").exists() or (self.path / "metrics.jsonl").exists():
            return False
        report = self.data_report() or {}
        codes = {e.get("code") for e in report.get("errors") or []} | set(
            report.get("counts", {}).get("rejected_by_code") or {}
        )
        return refuses((report.get("config") or {}).get("on_error", "strict"), codes - {None})

    def status(self) -> str:
        """completed (or what the summary says), failed (its data refused), running (a process holds its lock, or
        where the lock cannot tell, changed lately), or stopped."""
        summary = self.summary
        if summary:
            return summary.get("status", "completed")
        if self.data_refused():
            return "failed"
        training = is_training(self.path)
        if training is not None:
            return "running" if training else "stopped"
        changed = self.changed_at()
        return "running" if changed and time.time() - changed < RUNNING_WITHIN_S else "stopped"

    def is_run(self) -> bool:
        # A run whose data was refused has written its data report only.
        return any((self.path / name).is_file() for name in ("config.yaml", "metrics.jsonl", "data_report.json"))


def loss_chart(runs: dict[str, list[dict]]) -> str:
    """The loss curves of one or more runs as inline SVG; empty when no run has logged a step yet."""
    if not any(m.get("train_loss") is not None for metrics in runs.values() for m in metrics):
        return ""
    return svg(loss_figure(runs))


def learning_rate_chart(metrics: list[dict]) -> str:
    return svg(learning_rate_figure(metrics)) if any("lr" in m for m in metrics) else ""


def reward_chart(metrics: list[dict]) -> str:
    """A reinforcement fine-tuning run's reward curves as inline SVG; empty for other runs."""
    return "".join(svg(figure) for _, figure in reward_figures(metrics))


def _holds_key(value, key) -> bool:
    """Whether `key` names a figure of `value` (a file's JSON) or of an object anywhere inside it."""
    if isinstance(value, dict):
        return key in value or any(_holds_key(v, key) for v in value.values())
    return isinstance(value, list) and any(_holds_key(v, key) for v in value)


def evaluation_tables(folder: RunFolder) -> list:
    """The report's tables (base vs tuned, forgetting, multiple-choice benchmarks, answers side by side), as
    eval/report.py builds them."""
    found = folder.evaluation()
    tables = []

    def add(files: dict[str, object], table) -> None:
        """The table drawn by `table` from `files` (each eval file's name and what it holds), or a note on them."""
        try:
            tables.append(table())
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, StopIteration) as error:
            # A figure is missing or of another type than `tuneforge eval` writes (a file edited, or another
            # program's): the page shows the rest. A missing figure is named, with the files that lack it.
            named, what = list(files), "the figures `tuneforge eval` writes"
            if isinstance(error, KeyError) and error.args:
                field = error.args[0]
                named = [name for name, held in files.items() if not _holds_key(held, field)] or named
                what = f"`{field}`, a figure `tuneforge eval` writes"
            verb, their = ("does", "its") if len(named) == 1 else ("do", "their")
            folder.note(f"{' and '.join(named)} {verb} not hold {what}; {their} table is left out.")

    if found["before"] and found["after"]:
        add(
            {"eval/before.json": found["before"], "eval/after.json": found["after"]},
            lambda: metrics_table({"base": found["before"], "tuned": found["after"]}),
        )
    if found["forgetting"]:
        add({"eval/forgetting.json": found["forgetting"]}, lambda: forgetting_table(found["forgetting"]))
    for name, b in folder.benchmarks().items():
        add({name: b}, lambda b=b: choices_table({"base": b["base"], "tuned": b["tuned"]}, b["difference"]))
    samples = folder.samples()
    if samples:
        add({"eval/samples.jsonl": samples}, lambda: examples_table(samples, n=SAMPLES_SHOWN))
    return tables


def flat_config(config: dict) -> dict[str, str]:
    """A nested config as `section.key: value` lines."""
    return {
        key: json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
        for key, value in dotted(config).items()
    }


def metric_events(metrics: list[dict], checkpoint_steps: list[int], summary: dict | None) -> list[Event]:
    """What happened in a run folder, newest first: validations, checkpoints, the end."""
    found = [(step, f"Checkpoint step-{step} saved") for step in checkpoint_steps]
    for m in metrics:
        for key, words in VALIDATION_FIGURES:
            if key in m:
                found.append((m["step"], f"Step {m['step']}: {words} {number(m[key])}"))
            if f"full_{key}" in m:
                found.append((m["step"], f"Full {words} {number(m[f'full_{key}'])}"))
    if summary:
        found.append((math.inf, f"Run {summary.get('status', 'completed')} after {summary.get('steps', '?')} steps"))
    return [Event(None, message) for _, message in sorted(found, key=lambda event: event[0], reverse=True)]


# What the dashboard reads of summary.json, samples.jsonl and data_report.json, in the shapes their writers give
# it: a type, an object's keys with their shapes, or a list of items of one shape. A key may be missing or null.
SUMMARY_SHAPE = {"status": str, "steps": int, "metrics": dict}
SAMPLES_SHAPE = {"step": int, "samples": [dict]}  # a record of samples.jsonl (`training/samples.py`)
AFTER_SHAPE = {"scores": dict}  # eval/after.json, as far as the runs list reads it
DATA_REPORT_SHAPE = {
    "counts": {"rejected_by_code": dict},
    "tokens": dict,
    "config": {"on_error": str},
    "files": [dict],
    "warnings": [dict],
    "errors": [{"code": str}],
}
_KINDS = {dict: "an object", list: "a list", str: "a text", int: "an integer"}


def _unlike(found, shape: dict) -> str | None:
    """How a JSON value read from a file is not an object of `shape`, as the end of a sentence about the file;
    None where it is one."""
    if not isinstance(found, dict):
        return "is not a JSON object"
    wrong = _misshapen(found, shape)
    return wrong and f"is not as tuneforge writes it: its {wrong}"


def _misshapen(value, shape, where: str = "") -> str | None:
    """Where `value` is not of `shape` (see SUMMARY_SHAPE), in words (`errors.0.code` is not a text); None where
    it is."""
    kind = dict if isinstance(shape, dict) else list if isinstance(shape, list) else shape
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        return f"`{where}` is not {_KINDS[kind]}"
    if isinstance(shape, dict):
        inner = [(key, value.get(key), item_shape) for key, item_shape in shape.items()]
    else:
        inner = [(i, item, shape[0]) for i, item in enumerate(value)] if isinstance(shape, list) else []
    for key, item, item_shape in inner:
        if item is not None and (wrong := _misshapen(item, item_shape, f"{where}.{key}" if where else str(key))):
            return wrong
    return None


@lru_cache(maxsize=1024)
def _config(path: str, mtime_ns: int, size: int) -> tuple[dict, str | None]:
    """config.yaml's settings and None, or {} and why it has none."""
    unused = "the run's settings are not shown"
    try:
        text = Path(path).read_text(encoding="utf-8")
        loaded = load_yaml(text, "config.yaml", loader=_YAML_LOADER, most=MAX_CONFIG_VALUES)
    except OSError:
        return {}, None
    except UnicodeDecodeError as err:
        return {}, f"config.yaml is not UTF-8 (byte {err.start + 1}); {unused}."
    except ConfigError as err:  # nested too deep, an integer too long, aliases that expand past the bound
        return {}, f"{err.message} {unused.capitalize()}."
    except yaml.YAMLError as err:
        return {}, f"{yaml_syntax_error('config.yaml', err, 'not YAML')} {unused.capitalize()}."
    if not isinstance(loaded, dict):
        return {}, f"config.yaml is not a mapping of settings; {unused}."
    return loaded, None
