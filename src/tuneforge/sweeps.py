"""`tuneforge sweep`: one config trained over a grid of settings, one run after another, compared.

`--set KEY=V1,V2` gives a key's values; the grid is every combination. Every point is checked before the
first run starts (its config as `load_config` refuses it, the checks `train` makes before loading weights,
its data rows), so a bad point costs seconds, not the runs before it. Each point is an ordinary run folder,
OUT/<its values>/: a rerun of the sweep skips the finished runs, resumes an interrupted one from its
latest checkpoint, and evaluates one that finished training but not its `eval:` (stopped during it). After
each run, OUT/sweep.json and OUT/sweep.png (the runs' validation losses) are written again and the table is
printed, sorted by the metric. A grpo run validates by the reward of its answers
(valid_reward, higher is better) and has no validation loss: its sweep ranks, and draws, its rewards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from .config import Config, load_config, load_yaml, parse_overrides, yaml_syntax_error
from .console import new_console, plain
from .errors import ConfigError, TuneforgeError, json_kind, json_value
from .fsio import atomic_file, write_json
from .progress import progress_bar

# What a sweep ranks its runs by: the validation loss of the final model (the full validation at the end), the
# lowest validation loss seen during the run, or the last logged training loss, lower first; for method: grpo,
# whose validation grades answers (valid_reward) and whose training loss is no measure of them, the final or the
# highest validation reward, higher first.
METRICS = {
    "eval_loss": "final validation loss",
    "best_eval_loss": "best validation loss",
    "train_loss": "last training loss",
    "eval_reward": "final validation reward",
    "best_eval_reward": "best validation reward",
}
HIGHER_FIRST = {"eval_reward", "best_eval_reward"}  # a grpo run's; the others are the other methods'


def default_metric(cfg: Config) -> str:
    return "eval_reward" if cfg.method == "grpo" else "eval_loss"


def _validation_figure(metric: str) -> str:
    return "validation reward" if metric in HIGHER_FIRST else "validation loss"


def _or_train_loss(metric: str) -> str:
    return "" if metric in HIGHER_FIRST else ", or rank by --metric train_loss"


def _check_metric(cfg: Config, metric: str) -> None:
    """A metric the run's method logs: grpo's rewards, every other method's losses."""
    grpo = cfg.method == "grpo"
    if (metric in HIGHER_FIRST) != grpo:
        choices = [m for m in METRICS if (m in HIGHER_FIRST) == grpo]
        what = (
            "grades its validation answers (valid_reward, higher is better), with no validation loss, and its "
            "training loss is no measure of its answers"
            if grpo
            else "logs losses, and no reward"
        )
        raise ConfigError(
            f"--metric {metric}: method: {cfg.method} {what}; rank by --metric {' or '.join(choices)} "
            f"(default: {default_metric(cfg)})."
        )


SWEEP_FILE, PLOT_FILE = "sweep.json", "sweep.png"


@dataclass
class SweepRun:
    name: str
    values: dict
    output_dir: Path
    status: str = "pending"  # pending | completed | interrupted | failed
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    train_loss: float | None = None
    eval_reward: float | None = None
    best_eval_reward: float | None = None
    steps: int | None = None
    seconds: float | None = None
    error: str | None = None
    # Its folder as the sweep's checks found it (`_resume_mode`): "finished", "latest" or None; read once.
    found: str | None = None

    def as_json(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "found"}, "output_dir": str(self.output_dir)}


@dataclass
class SweepResult:
    out: Path
    metric: str
    runs: list[SweepRun] = field(default_factory=list)
    best: SweepRun | None = None
    status: str = "completed"  # completed | interrupted | failed


def parse_grid(sets: str | Iterable[str]) -> dict[str, list]:
    """`--set train.learning_rate=1e-4,2e-4` -> {"train.learning_rate": [1e-4, 2e-4]}: the values are one YAML
    flow list, so a value that is itself a list is written in brackets (`lora.target_modules=[q_proj],[v_proj]`)."""
    if isinstance(sets, str):  # one key's values as a string alone: iterating over it would take each character
        sets = [sets]
    if not isinstance(sets, Iterable):
        raise ConfigError(
            f"a sweep's grid is a dict of each key's values ({{'train.learning_rate': [1e-4, 2e-4]}}) or KEY=V1,V2,... "
            f"strings, not {type(sets).__name__}."
        )
    grid: dict[str, list] = {}
    for given in sets:
        if not isinstance(given, str):
            raise ConfigError(f"--set {given!r} is {type(given).__name__}: give KEY=V1,V2,... as a string.")
        if "=" not in given:
            raise ConfigError(
                f"--set '{given}': expected KEY=V1,V2,..., for example --set train.learning_rate=1e-4,2e-4"
            )
        key, raw = (part.strip() for part in given.split("=", 1))
        try:
            values = load_yaml(f"[{raw}]", f"--set '{given}'")
        except yaml.YAMLError as e:
            if (mark := getattr(e, "problem_mark", None)) is not None:  # its column in the values, not in "[...]"
                mark.column = min(max(mark.column - 1, 0), len(raw))
            raise ConfigError(
                yaml_syntax_error(
                    f"--set '{given}'", e, f"the values of {key} are no comma-separated YAML list", one_line=True
                )
            ) from None
        # YAML's flow list takes a trailing comma as no item: `1e-4,` would sweep one value, not the two meant.
        if not values or any(v is None for v in values) or raw.endswith(","):
            raise ConfigError(f"--set '{given}': give {key} one or more values, comma-separated, none of them empty.")
        if len({json.dumps(v, sort_keys=True) for v in values}) < len(values):
            raise ConfigError(f"--set '{given}': a value of {key} is given twice; give each once.")
        if key in grid:
            raise ConfigError(f"--set '{given}': {key} is already swept; give all its values in one --set.")
        if key == "output_dir":
            raise ConfigError("--set output_dir: each run of a sweep has its own folder under --out; sweep other keys.")
        grid[key] = values
    if not grid:
        raise ConfigError(
            "a sweep needs at least one --set KEY=V1,V2,..., for example --set train.learning_rate=1e-4,2e-4"
        )
    return grid


def _override(key: str, value) -> str:
    # JSON is YAML: the override reads back as the value the --set list gave.
    return f"{key}={json.dumps(value)}"


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# The longest a value takes in a run's folder name: a file system refuses a name over 255 bytes, and a value
# can be a chat template written out.
NAME_VALUE_CHARS = 40


def _name_value(value) -> str:
    """A value as a folder name shows it: a path by its file name, a long value cut short with a hash of it
    whole (the same on every rerun, so a resumed sweep finds its folder)."""
    shown = _shown(value)
    if isinstance(value, str) and "/" in value.rstrip("/"):
        shown = Path(value).name
    shown = re.sub(r"[^A-Za-z0-9._+-]+", "-", shown)
    if len(shown) > NAME_VALUE_CHARS:
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
        shown = f"{shown[: NAME_VALUE_CHARS - 9]}-{digest}"
    return shown


def run_name(values: dict, grid: dict[str, list]) -> str:
    """A run's folder name from its values, `learning_rate-0.0001_r-8`: each key by its last part (its whole
    dotted name where two swept keys share a last part), characters other than letters, digits, `._+-` as `-`.
    No `=`: `tuneforge train CONFIG --resume PATH` would take a path with one for an override."""
    leaves = [key.rsplit(".", 1)[-1] for key in grid]
    parts = []
    for key, value in values.items():
        label = key.rsplit(".", 1)[-1] if leaves.count(key.rsplit(".", 1)[-1]) == 1 else key
        parts.append(f"{re.sub(r'[^A-Za-z0-9._+-]+', '-', label)}-{_name_value(value)}")
    return "_".join(parts)


def _setting(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value.model_dump() if hasattr(value, "model_dump") else value


def _points(grid: dict[str, list]) -> list[dict]:
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def _resume_mode(out: Path) -> str | None:
    """ "finished", "latest" (a checkpoint to continue from) or None (start afresh) for a run folder. A final
    model's summary.json that is no JSON object is refused as damaged: a run writes it whole, as an object."""
    from .training import checkpoint

    summary = out / "summary.json"
    if summary.is_file() and (out / "final").is_dir():
        value, unreadable = json_value(summary.read_bytes())
        if unreadable is None and not isinstance(value, dict):
            unreadable = f"holds {json_kind(value)}, not the object a run writes"
        if unreadable is not None:
            raise ConfigError(
                f"{summary} {unreadable}: the run's summary is damaged. Delete {out} to train the run again."
            )
        if value.get("status") == "completed":
            return "finished"
    return "latest" if checkpoint.latest(out / "checkpoints") is not None else None


def _check_earlier_run(cfg: Config, out: Path, name: str, sweep_out: Path, finished: bool) -> None:
    """A run folder of this point is kept (finished) or resumed (interrupted) only where its config is the one
    this sweep would train: another (the base config or overrides edited since) would rank, or continue, a
    run of other settings as this point's."""
    try:
        earlier = load_config(out / "config.yaml")
    except TuneforgeError:
        return
    if earlier.results_hash() == cfg.results_hash():
        return
    changes = ", ".join(earlier.changed_results_settings(cfg)) or "settings that change results"
    if finished:
        raise ConfigError(
            f"{out} holds a finished run of another config ({changes}): this sweep would compare it as {name}. "
            f"Sweep into another --out, or delete {out} (or all of {sweep_out}) to train it again."
        )
    raise ConfigError(
        f"{out} holds an interrupted run of another config ({changes}): this sweep would continue it as {name}. "
        f"Give the sweep the settings it started with to resume it, sweep into another --out, or delete {out} "
        "to train it afresh."
    )


def check_points(
    config, overrides, grid: dict[str, list], out: Path, metric: str, *, progress: bool = False
) -> list[tuple[SweepRun, Config]]:
    """Every point's config, checked before any run starts: each swept value alone against the config (so an
    error names its key and value), then each combination, then what `train` checks before loading weights
    (with `progress`, shown point by point: a grid of hundreds takes seconds), then each distinct data
    setting's rows, which must hold validation rows where the metric needs them."""
    from .eval.after_training import check_eval_inputs
    from .methods import batch_items, prepare_items, trainable_checked_once
    from .models import resolve, run_tokenizer
    from .pipeline import evaluation_missing
    from .training.loop import check_before_launch

    blocking = next((folder for folder in (out, *out.parents) if folder.exists() and not folder.is_dir()), None)
    if blocking is not None:
        raise ConfigError(
            f"--out {out}: {blocking} is a file, not a folder, and the sweep writes each run's folder under {out}; "
            "give --out a folder's path, or move the file."
        )
    base = list(parse_overrides(overrides))
    if any(key == "output_dir" for key, _ in base):
        raise ConfigError(
            "override output_dir: each run of a sweep has its own folder under --out; give --out instead."
        )
    for key, _ in base:
        if key in grid:
            raise ConfigError(f"{key} is both overridden and swept (--set); give it in one place.")
    base_strings = [_override(key, value) for key, value in base]
    load_config(config, base_strings)
    # Each value alone, where a point sets more than it: with one key swept, each point is its value alone,
    # loaded once below.
    for key, values in grid.items() if len(grid) > 1 else ():
        for value in values:
            try:
                load_config(config, [*base_strings, _override(key, value)])
            except ConfigError as e:
                raise ConfigError(f"--set {key}={_shown(value)}: {e.message}") from None
    points: list[tuple[SweepRun, Config]] = []
    combinations = _points(grid)
    with (
        progress_bar("sweep: checking points", len(combinations), enabled=progress) as advance,
        trainable_checked_once(),
    ):
        for values in combinations:
            # Values whose names differ only in the characters a folder name leaves out (`a b`, `a-b`) get folders
            # of their own: in one, the second would take the first's finished run for its own.
            name = named = run_name(values, grid)
            taken = {run.name for run, _ in points}
            for n in itertools.count(2):
                if name not in taken:
                    break
                name = f"{named}-{n}"
            run_dir = out / name
            point = [
                *base_strings,
                f"output_dir={json.dumps(str(run_dir))}",
                *(_override(k, v) for k, v in values.items()),
            ]
            said = ", ".join(f"{k}={_shown(v)}" for k, v in values.items())
            try:
                cfg = load_config(config, point)
            except ConfigError as e:
                if len(grid) == 1:  # the value alone, named as the checks of each value above name theirs
                    raise ConfigError(f"--set {said}: {e.message}") from None
                raise ConfigError(f"sweep run {name} ({said}): {e.message}", code=e.code) from None
            try:
                _check_metric(cfg, metric)
                if metric != "train_loss" and cfg.data.validation in (None, 0, 0.0):
                    raise ConfigError(
                        f"--metric {metric} ranks the runs by their {_validation_figure(metric)}, and "
                        f"data.validation is {'unset' if cfg.data.validation is None else cfg.data.validation}: no "
                        "validation rows. Set data.validation to a share of the training rows (0.1) or a validation "
                        "file"
                        f"{_or_train_loss(metric)}."
                    )
                mode = _resume_mode(run_dir)
                if mode is not None:
                    _check_earlier_run(cfg, run_dir, name, out, finished=mode == "finished")
                if mode != "finished" or evaluation_missing(cfg):
                    check_eval_inputs(cfg)
                if mode != "finished":
                    check_before_launch(cfg, 1, resume=mode)
            except TuneforgeError as e:
                raise type(e)(f"sweep run {name} ({said}): {e.message}", code=e.code) from None
            # The values as the config holds them (1e-4 written on the command line is the number 0.0001).
            typed = {k: _setting(cfg, k) for k in values}
            for run, _ in points:
                if run.values == typed:
                    raise ConfigError(
                        f"sweep runs {run.name} and {name} train the same settings ({said}): a value is given twice in "
                        "two spellings (1e-4 and 0.0001). Give each value once."
                    )
            points.append((SweepRun(name, typed, run_dir, found=mode), cfg))
            advance(1)
    # The data rows, once for each data setting the points train on: a bad row or no validation rows is found now,
    # and a kept or resumed run whose data files changed since it trained.
    data_keys: dict[str, str | None] = {}  # each data setting's prepared data's cache key
    for run, cfg in points:
        key = json.dumps(
            [cfg.base_model, cfg.method, cfg.model.model_dump(), cfg.data.model_dump(), cfg.grpo.model_dump()],
            sort_keys=True,
            default=str,
        )
        if key in data_keys:
            _check_earlier_data(run, data_keys[key], out)
            continue
        try:
            tokenizer = run_tokenizer(cfg, resolve(cfg.base_model))
            prepared = prepare_items(cfg, tokenizer, log=lambda *a, **k: None)
            train_items, valid_items = batch_items(prepared, cfg)
        except TuneforgeError as e:
            raise type(e)(f"sweep run {run.name}: {e.message}", code=e.code) from None
        if not train_items:
            raise TuneforgeError(f"sweep run {run.name}: {', '.join(cfg.data.train_files)}: no usable training rows.")
        if metric != "train_loss" and not valid_items:
            raise ConfigError(
                f"sweep run {run.name}: --metric {metric} ranks the runs by their {_validation_figure(metric)}, and "
                f"data.validation ({cfg.data.validation!r}) leaves no validation rows. Give a validation file or a "
                f"larger share{_or_train_loss(metric)}."
            )
        data_keys[key] = prepared.report.get("cache", {}).get("key")
        _check_earlier_data(run, data_keys[key], out)
    return points


def _check_earlier_data(run: SweepRun, data_key: str | None, sweep_out: Path) -> None:
    """A run folder of this point is kept (finished) or resumed (interrupted) only where it trained on the data as
    it is now (`data_key`, the prepared data's cache key, as its data_report.json records it): a run on data
    edited since would rank, or continue, as a run on today's."""
    mode = run.found
    if mode is None or data_key is None:
        return
    try:
        earlier = json.loads((run.output_dir / "data_report.json").read_text())["cache"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if earlier == data_key:
        return
    finished = mode == "finished"
    raise ConfigError(
        f"{run.output_dir} holds {'a finished' if finished else 'an interrupted'} run on other data (the contents of "
        "data.train, data.validation or the replay file, or the base model's tokenizer, changed since it trained): "
        f"this sweep would {'compare' if finished else 'continue'} it as {run.name}. Sweep into another --out, or "
        f"delete {run.output_dir} (or all of {sweep_out}) to train it on the data as it is now."
    )


def read_run(run: SweepRun) -> None:
    """The run's figures from its folder: metrics.jsonl, and summary.json where it finished."""
    from .eval.report import curve, read_metrics

    metrics = read_metrics(run.output_dir)
    # A validation loss that is no number (a run diverging at its end) is no figure to rank by, nor the best.
    valid = [v for _, v in curve(metrics, "valid_loss") + curve(metrics, "full_valid_loss") if math.isfinite(v)]
    final = curve(metrics, "full_valid_loss")
    train = curve(metrics, "train_loss")
    run.eval_loss = final[-1][1] if final else None
    run.best_eval_loss = min(valid) if valid else None
    run.train_loss = train[-1][1] if train else None
    rewards = [v for _, v in curve(metrics, "valid_reward") + curve(metrics, "full_valid_reward") if math.isfinite(v)]
    final_reward = curve(metrics, "full_valid_reward")
    run.eval_reward = final_reward[-1][1] if final_reward else None
    run.best_eval_reward = max(rewards) if rewards else None
    run.steps = max((m["step"] for m in metrics), default=None)
    summary = run.output_dir / "summary.json"
    if summary.is_file():
        try:
            run.steps = json.loads(summary.read_text()).get("steps", run.steps)
        except json.JSONDecodeError:
            pass


def _figure(run: SweepRun, metric: str) -> float | None:
    """The run's `metric`, where it is a number (a diverged run's NaN loss is none: it would sort anywhere)."""
    value = getattr(run, metric)
    return value if value is not None and math.isfinite(value) else None


def _ranked(runs: list[SweepRun], metric: str) -> list[SweepRun]:
    # Runs without the figure (pending, failed early, diverged) go last, in grid order.
    sign = -1.0 if metric in HIGHER_FIRST else 1.0
    return sorted(runs, key=lambda r: (_figure(r, metric) is None, sign * (_figure(r, metric) or 0.0)))


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def sweep_table(result: SweepResult, grid: dict[str, list]) -> Table:
    order = "higher" if result.metric in HIGHER_FIRST else "lower"
    table = Table(title=f"sweep {plain(result.out)} (by {METRICS[result.metric]}, {order} first)")
    figure = "reward" if result.metric in HIGHER_FIRST else "loss"
    # The folder's name whole, to copy: the other columns give way first.
    table.add_column("run (folder)", no_wrap=True, min_width=max((len(run.name) for run in result.runs), default=3))
    for key in grid:
        table.add_column(key, justify="right", overflow="fold")
    for name in (f"valid {figure} (final)", f"valid {figure} (best)", "train loss", "steps", "time"):
        table.add_column(name, justify="right")
    table.add_column("status", no_wrap=True)
    for run in _ranked(result.runs, result.metric):
        table.add_row(
            f"[bold]{plain(run.name)}[/]" if run is result.best else plain(run.name),
            *(plain(_shown(run.values[key])) for key in grid),
            _loss(getattr(run, f"eval_{figure}")),
            _loss(getattr(run, f"best_eval_{figure}")),
            _loss(run.train_loss),
            "-" if run.steps is None else str(run.steps),
            "-" if run.seconds is None else f"{run.seconds:.0f} s",
            run.status,
        )
    return table


def print_table(console: Console, result: SweepResult, grid: dict[str, list]) -> None:
    """The table on a terminal at its width; into a log file or a pipe, which have no width to fit (rich takes
    80 columns there, and cut every figure to "0…"), at the table's own width: each run one line, figures whole."""
    table = sweep_table(result, grid)
    if console.is_terminal:
        console.print(table)
        return
    # print(width=) only narrows a console: a console of the table's width writes it.
    width = Measurement.get(console, console.options.update_width(100_000), table).maximum
    new_console(file=console.file, width=max(width, console.width)).print(table)


def _typed_values(runs: list[SweepRun], key: str) -> list:
    """`key`'s swept values as the runs' configs hold them, in grid order."""
    return list({json.dumps(run.values[key], sort_keys=True): run.values[key] for run in runs}.values())


def write_outputs(result: SweepResult, grid: dict[str, list], config) -> None:
    """OUT/sweep.json (written whole, atomically) and OUT/sweep.png: each run's validation losses (a grpo
    sweep's: rewards) on one chart."""
    from .eval.report import loss_figure, read_metrics

    ranked = _ranked(result.runs, result.metric)
    done = [r for r in ranked if r.status == "completed" and _figure(r, result.metric) is not None]
    result.best = done[0] if done else None
    write_json(
        result.out / SWEEP_FILE,
        {
            "config": str(config) if isinstance(config, (str, Path)) else None,
            "metric": result.metric,
            "grid": {key: _typed_values(result.runs, key) for key in grid},
            "status": result.status,
            "best": None
            if result.best is None
            else {
                "name": result.best.name,
                "output_dir": str(result.best.output_dir),
                "config": str(result.best.output_dir / "config.yaml"),
            },
            "runs": [run.as_json() for run in ranked],
        },
    )
    # Validation alone: each run's training loss beside them would hide the comparison in a grid of several.
    curves = {
        run.name: [{k: v for k, v in m.items() if k != "train_loss"} for m in read_metrics(run.output_dir)]
        for run in ranked
    }
    measure = "reward" if result.metric in HIGHER_FIRST else "loss"
    curves = {
        name: m for name, m in curves.items() if any(f"valid_{measure}" in r or f"full_valid_{measure}" in r for r in m)
    }
    if curves:
        figure = loss_figure(curves, measure)
        figure.axes[0].set_title(_validation_figure(result.metric))
        with atomic_file(result.out / PLOT_FILE, "wb") as f:
            figure.savefig(f, format="png", dpi=110, bbox_inches="tight")


def _earlier_seconds(out: Path) -> dict[str, float]:
    """Each run's training time as an earlier sweep into `out` recorded it: a resumed run's time adds to it."""
    try:
        runs = json.loads((out / SWEEP_FILE).read_text())["runs"]
        return {r["name"]: r["seconds"] for r in runs if r.get("seconds") is not None}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def sweep(
    config,
    grid: dict[str, list] | str | Iterable[str],
    overrides=(),
    *,
    out: str | Path | None = None,
    metric: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Train `config` (a YAML path, a shipped recipe's name, a dict or a Config) with `overrides` once for each
    combination of `grid`'s values ({"train.learning_rate": [1e-4, 2e-4], "lora.r": [8, 16]}, or the CLI's
    "KEY=V1,V2" strings, or one such string), one run after another, each into its own run folder under `out`
    (default: the config's output_dir with "-sweep"); returns the runs ranked by `metric` (eval_loss,
    best_eval_loss or train_loss, lower first; for method: grpo eval_reward or best_eval_reward, higher first;
    default: eval_loss, grpo's eval_reward) and the best. A rerun skips finished runs and resumes an interrupted
    one."""
    from .pipeline import evaluate_run, evaluation_missing, train

    base = load_config(config, overrides) if metric is None or out is None else None
    if metric is None:
        metric = default_metric(base)
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric}: unknown; choose one of {', '.join(METRICS)}.")
    if not isinstance(grid, dict):
        grid = parse_grid(grid)
    else:
        if not grid:
            raise ConfigError(
                "a sweep's grid is empty: give it a key and its values, {'train.learning_rate': [1e-4, 2e-4]}."
            )
        for key, values in grid.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(
                    f"the sweep's grid gives {key} {values!r}: give it a list of one or more values to try, "
                    f"{{{key!r}: [{values!r}, ...]}}."
                )
        grid = {key: list(values) for key, values in grid.items()}
    out = Path(out) if out is not None else Path(f"{base.output_dir}-sweep")
    console = new_console()
    points = check_points(config, overrides, grid, out, metric, progress=progress)
    sizes = " x ".join(f"{len(v)} {k}" for k, v in grid.items())
    console.print(f"sweep: {len(points)} runs ({sizes}), each checked; into {plain(out)}")
    result = SweepResult(out, metric, [run for run, _ in points])
    earlier = _earlier_seconds(out)
    for run in result.runs:
        run.seconds = earlier.get(run.name)
        if run.found == "finished":
            run.status = "completed"
            read_run(run)
    table_shown = False  # whether the table as it stands is on screen
    for run, cfg in points:
        # A run that finished training but was stopped during its `eval:` has that evaluation run now.
        unevaluated = run.status == "completed" and evaluation_missing(cfg)
        if run.status == "completed" and not unevaluated:
            console.print(f"sweep: {plain(run.name)} finished earlier; kept")
            continue
        mode = run.found
        console.rule(
            f"sweep run {plain(run.name)}" + (" (its evaluation)" if unevaluated else " (resumed)" if mode else "")
        )
        started, table_shown = time.perf_counter() - (run.seconds or 0.0), True
        try:
            if unevaluated:
                evaluate_run(cfg, progress=progress)
            else:
                run.status = train(cfg, resume=mode, progress=progress).status
        except TuneforgeError as e:
            run.status, run.error, result.status = "failed", e.message, "failed"
            console.print(f"[red]sweep run {plain(run.name)} failed:[/] {plain(e.message)}", highlight=False)
        except BaseException:
            # Ctrl-C or SIGTERM outside training's own handling: what is done so far is kept and shown.
            run.status, result.status = "interrupted", "interrupted"
            run.seconds = time.perf_counter() - started
            read_run(run)
            write_outputs(result, grid, config)
            raise
        run.seconds = time.perf_counter() - started
        read_run(run)
        if run.status == "interrupted":
            result.status = "interrupted"
        write_outputs(result, grid, config)
        print_table(console, result, grid)
        if result.status == "interrupted":
            console.print("sweep: interrupted; run the same command again to resume it (finished runs are kept).")
            return result
    write_outputs(result, grid, config)
    if not table_shown:
        print_table(console, result, grid)
    if result.best is not None:
        console.print(
            f"best ({METRICS[metric]} {getattr(result.best, metric):.4f}): {plain(result.best.name)}; "
            f"its config is {plain(result.best.output_dir / 'config.yaml')}"
        )
    console.print(
        plain(f"wrote {out / SWEEP_FILE}" + (f" and {out / PLOT_FILE}" if (out / PLOT_FILE).is_file() else ""))
    )
    return result
