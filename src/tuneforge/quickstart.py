"""`tuneforge quickstart`: the whole story on a laptop CPU in minutes.

Pull the bundled model, generate the support-triage data (docs/demo-task.md), measure the base
model on the held-out test tickets, fine-tune it as the shipped recipe `quickstart` says
(recipes/quickstart.yaml), measure the tuned model and what it forgot, and write the report. It ends
by checking its own targets and saying plainly which it missed; the exit code is 0 only when every
target is met. With `data_only`, it stops once the data is written, for `tuneforge train` to take
over with the recipe. Before it writes any data it checks the model against the config it will train (what
`tuneforge train` checks before any compute), so a model that cannot train the recipe is refused at once.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console

from .config import dotted, load_config
from .console import new_console, plain
from .errors import RunFailed, TuneforgeError
from .eval.evaluate import evaluate
from .eval.forgetting import measure_forgetting
from .eval.report import print_tables, report_tables, share_with_interval, write_run_report
from .fsio import atomic_file
from .methods import check_inputs
from .models import REGISTRY, load_tokenizer, pull, resolve
from .recipes import load_recipe
from .tasks import support_triage
from .tasks.general import bundled_file
from .training import train

RECIPE = "quickstart"
REPLAY_FILE = "replay.jsonl"


@dataclass(frozen=True)
class Settings:
    """What the quickstart does besides training, which the recipe holds."""

    n_train: int = 2000  # generated training tickets, more than a run sees, so it sees each at most once
    n_valid: int = 48  # validation tickets: the loss curve (cheap enough to evaluate mid-run)
    n_test: int = 300  # generated held-out tickets
    n_unlabelled: int = 1000  # tickets without answers, which the distill_triage recipe's teacher answers
    test_subset: int = 100  # of which the quickstart scores the first this many, base and tuned
    max_new_tokens: int = 40  # the answer is one JSON line of about 20 tokens
    # The base model's replay replies are cut at this many tokens: under KL a cut reply teaches no early stop,
    # and short replies leave room for more tickets in a packed row.
    replay_tokens: int = 32
    data_seed: int = 0


@dataclass(frozen=True)
class Targets:
    wall_minutes: float = 15.0
    tuned_exact: float = 0.85  # all three fields right, held-out test tickets
    base_exact: float = 0.20  # at most: the task must need the fine-tuning
    questions_retained: float = 0.95  # tuned accuracy / base accuracy on general questions
    text_loss_rise: float = 0.03  # relative rise of general-text cross-entropy, at most


def quickstart_config(
    data: dict[str, Path],
    out: Path,
    *,
    model: str | None = None,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    lora_r: int | None = None,
) -> dict:
    """The recipe's config with the data files in `data` (train, validation, replay), the run folder `out`, and
    each override given. A new LoRA rank keeps the recipe's alpha / r."""
    config = load_recipe(RECIPE)
    config["data"].update(
        train=str(data["train"]), validation=str(data["validation"]), general_replay=str(data["replay"])
    )
    config["output_dir"] = str(out)
    if model is not None:
        config["base_model"] = model
    if max_steps is not None:
        config["train"]["max_steps"] = max_steps
    if learning_rate is not None:
        config["train"]["learning_rate"] = learning_rate
    if lora_r is not None:
        lora = config["lora"]
        lora.update(r=lora_r, alpha=lora["alpha"] * lora_r / lora["r"])
    return config


class Phases:
    """Prints each phase's title with the time since the start, and keeps when each began."""

    def __init__(self, console: Console, total: int):
        self.console, self.total = console, total
        self.started = time.perf_counter()
        self.begun: dict[str, float] = {}

    def begin(self, title: str) -> None:
        self.begun[title] = time.perf_counter()
        minutes, seconds = divmod(int(self.begun[title] - self.started), 60)
        clock = f"{minutes}:{seconds:02d}"
        self.console.rule(f"[bold]{len(self.begun)}/{self.total} {title}[/]  [dim]{clock}[/]", align="left")

    def seconds(self) -> dict[str, float]:
        """Each phase's duration, the last one's until now."""
        times = [*self.begun.values(), time.perf_counter()]
        return {title: end - start for title, start, end in zip(self.begun, times, times[1:])}


def quickstart(
    out: str | Path | None = None,
    *,
    n_train: int | None = None,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    lora_r: int | None = None,
    test_subset: int | None = None,
    model: str | None = None,
    data_only: bool = False,
    console: Console | None = None,
) -> int:
    """Run the demonstration end to end into `out` (default: the recipe's output_dir); returns 0 when every
    target is met, else 1. With `data_only`, write the data only and say how to train on it.

    Leave the keyword arguments out to get the recipe and `Settings` as they are.
    """
    console = console or new_console()
    chosen = {"n_train": n_train, "test_subset": test_subset}
    settings = replace(Settings(), **{k: v for k, v in chosen.items() if v is not None})
    recipe = load_recipe(RECIPE)
    out = Path(out or recipe["output_dir"])
    model = model or recipe["base_model"]
    phases = Phases(console, total=2 if data_only else 6)
    console.print(
        f"[bold]tuneforge quickstart[/]: fine-tune {plain(model)} on support-ticket triage, on this machine's "
        f"CPU, into {plain(out)}\n[dim]recipe {RECIPE}; settings: {plain(asdict(settings))}[/]"
    )
    phases.begin("model")
    if model in REGISTRY:
        pull(model)
    source = resolve(model)
    config = quickstart_config(
        data_paths(out / "data"), out, model=model, max_steps=max_steps, learning_rate=learning_rate, lora_r=lora_r
    )
    if not data_only:  # --data-only trains nothing: the `tuneforge train` it prints makes these checks
        check_config(config, source)
    data = prepare_data(model, out, settings, phases)
    if data_only:
        print_train_commands(config, recipe, console)
        return 0
    measured = fine_tune_and_measure(config, data, settings, phases)
    return report(config, settings, phases, measured) if measured else 1


def data_paths(folder: Path) -> dict[str, Path]:
    """Where `prepare_data` writes the ticket splits and the replay file in `folder`."""
    splits = {split: folder / name for split, name in support_triage.SPLIT_FILES.items()}
    return {**splits, "replay": folder / REPLAY_FILE}


def check_config(config: dict, source) -> None:
    """Refuse a model that cannot train `config` before any data is written or model work done: the checks
    `tuneforge train` makes before any compute (the model's positions against data.max_length, lora modules
    on the model's structure, ...), which read the config and the model folder (`source`), not the data rows.
    The rows are checked as training reads them. (The config's `eval:` section is not: the quickstart runs its
    own evaluation.)"""
    cfg, tokenizer = load_config(config), load_tokenizer(source)  # a tokenizer the model cannot embed: its own error
    try:
        check_inputs(cfg, tokenizer, source)
    except TuneforgeError as e:  # the same error, its message saying what the quickstart user can do
        e.message = (
            f"{config['base_model']} cannot train the {RECIPE} recipe (`tuneforge recipes show {RECIPE}`): {e.message} "
            "The quickstart takes the recipe as it is: choose another --model, or train the recipe with that "
            "setting changed (`tuneforge quickstart --data-only` writes its data and prints the command)."
        )
        e.args = (e.message,)
        raise


def prepare_data(model: str, out: Path, settings: Settings, phases: Phases) -> dict[str, Path]:
    """Write the ticket splits and the base model's replay replies into `out`/data."""
    phases.begin("data")
    folder = out / "data"
    data = support_triage.generate(
        folder,
        n_train=settings.n_train,
        n_valid=settings.n_valid,
        n_test=settings.n_test,
        n_unlabelled=settings.n_unlabelled,
        seed=settings.data_seed,
    )
    phases.console.print(
        f"{settings.n_train} train, {settings.n_valid} validation, {settings.n_test} test tickets "
        f"in {plain(folder)} (test tickets use phrasings training never sees); {settings.n_unlabelled} "
        "tickets without answers for distillation",
        highlight=False,
    )
    data["replay"] = write_self_replay(model, folder, settings.replay_tokens, phases.console)
    return data


def print_train_commands(config: dict, recipe: dict, console: Console) -> None:
    """How to train on the data just written with `tuneforge train` and the recipe: the keys where `config`
    differs from the recipe become overrides."""
    in_recipe = dotted(recipe)
    overrides = [f"{key}={value}" for key, value in dotted(config).items() if in_recipe.get(key) != value]
    console.print(
        "The data is ready. Train on it with the recipe:\n"
        f"  tuneforge recipes show {RECIPE} > {RECIPE}.yaml\n"
        f"  tuneforge train {plain(shlex.join([f'{RECIPE}.yaml', *overrides]))}",
        highlight=False,
        soft_wrap=True,
    )


@dataclass(frozen=True)
class Measured:
    before: dict  # the base model on the test tickets
    after: dict  # the tuned model on the test tickets
    forgetting: dict
    steps: int  # training steps taken


def fine_tune_and_measure(config: dict, data: dict[str, Path], settings: Settings, phases: Phases) -> Measured | None:
    """Phases 3 to 6: the base model scored, the fine-tuning, the tuned model scored, forgetting (None when
    training stopped early)."""
    console, out = phases.console, Path(config["output_dir"])
    evaluation = {"metric": "support_triage", "limit": settings.test_subset, "max_new_tokens": settings.max_new_tokens}
    phases.begin("base model on the test tickets")
    before = evaluate(config["base_model"], data["test"], **evaluation)
    console.print(
        f"base: all three fields right on {before['scores']['exact']:.1%} of {before['n']} tickets, "
        f"valid JSON {before['scores']['valid_json']:.1%}"
    )
    phases.begin("fine-tune with LoRA")
    result = train(config, overwrite=True)  # the quickstart's run folder is its own: a new quickstart replaces it
    if result.status != "completed":
        console.print(f"[red]training stopped early ({result.status}); nothing to evaluate.[/]")
        return None
    phases.begin("tuned model on the test tickets")
    after = evaluate(str(out), data["test"], **evaluation)
    console.print(f"tuned: all three fields right on {after['scores']['exact']:.1%} of {after['n']} tickets")
    phases.begin("forgetting: general text, prompts and questions, base vs tuned")
    return Measured(before, after, measure_forgetting(str(out)), result.steps)


def report(config: dict, settings: Settings, phases: Phases, measured: Measured) -> int:
    """Judge the targets, write and print the report; 0 when every target is met."""
    console, before, after, forgetting = phases.console, measured.before, measured.after, measured.forgetting
    wall = time.perf_counter() - phases.started
    targets = check_targets(Targets(), wall, before, after, forgetting)
    facts = {
        "model": config["base_model"],
        "wall time": f"{wall / 60:.1f} min ({wall:.0f} s)",
        **{f"  {title}": f"{seconds:.0f} s" for title, seconds in phases.seconds().items()},
        "training steps": str(measured.steps),
        "recipe": RECIPE,
        "settings": ", ".join(f"{k}={v}" for k, v in asdict(settings).items()),
    }
    path = write_run_report(config["output_dir"], before, after, forgetting, targets, facts)
    console.rule("[bold]results")
    print_tables(report_tables(before, after, forgetting, targets, facts), console)
    missed = [t for t in targets if not t["met"]]
    console.print(f"wall time {wall / 60:.1f} min; report: {plain(path)}")
    if missed:
        console.print(
            "[bold red]missed targets:[/] "
            + "; ".join(f"{t['target']}: {t['measured']}, goal {t['goal']}" for t in missed)
        )
        return 1
    console.print("[bold green]all targets met[/]")
    return 0


def check_targets(targets: Targets, wall_seconds: float, before: dict, after: dict, forgetting: dict) -> list[dict]:
    text, questions = forgetting["general_text"], forgetting["general_questions"]
    kept = questions["retained"]
    # The share kept is a share of the questions (with its interval) when the base knows them all: the
    # bundled model, for which the set was chosen.
    if kept is None:
        kept_measured = "the base knows none"
    elif questions["base_accuracy"] == 1:
        kept_measured = share_with_interval(kept, questions["n"])
    else:
        kept_measured = f"{kept:.1%}"
    rows = [
        (
            "wall time",
            f"<= {targets.wall_minutes:.0f} min",
            f"{wall_seconds / 60:.1f} min",
            wall_seconds <= targets.wall_minutes * 60,
        ),
        (
            "tuned: all three fields right",
            f">= {targets.tuned_exact:.0%}",
            share_with_interval(after["scores"]["exact"], after["n"]),
            after["scores"]["exact"] >= targets.tuned_exact,
        ),
        (
            "base: all three fields right",
            f"<= {targets.base_exact:.0%}",
            share_with_interval(before["scores"]["exact"], before["n"]),
            before["scores"]["exact"] <= targets.base_exact,
        ),
        (
            "general questions kept",
            f">= {targets.questions_retained:.0%} of base",
            kept_measured,
            kept is None or kept >= targets.questions_retained,
        ),
        (
            "general text cross-entropy rise",
            f"<= {targets.text_loss_rise:+.0%}",
            f"{text['change']:+.2%}",
            text["change"] <= targets.text_loss_rise,
        ),
    ]
    return [
        {"target": name, "goal": goal, "measured": measured, "met": bool(met)} for name, goal, measured, met in rows
    ]


def write_self_replay(model: str, folder: Path, max_new_tokens: int, console: Console | None = None) -> Path:
    """The base model's own replies to the bundled general prompts, as a chat file for
    `data.general_replay` (written once; a rerun with the same model finds it complete, one with another
    model or reply length writes them anew, saying so on `console`)."""
    from .distill.teacher_data import TeacherData, generate_teacher_data

    answers_file = folder / "replay-answers.jsonl"

    def answer() -> TeacherData:
        return generate_teacher_data(
            model,
            bundled_file("replay_prompts"),
            answers_file,
            max_new_tokens=max_new_tokens,
            batch_size=64,
            precision="fp32",
        )

    try:
        answers = answer()
    except TuneforgeError as e:
        if e.code != "output_mismatch":
            raise
        # The quickstart's folder is its own, as its run is: replies another model (or reply length) wrote
        # are replaced, not refused.
        if console is not None:
            console.print(
                plain(f"{answers_file} does not hold {model}'s replies to the general prompts: writing them anew"),
                highlight=False,
            )
        answers_file.unlink()
        answers = answer()
    rows = [
        row
        for row in answers.out.read_text(encoding="utf-8").splitlines()
        if json.loads(row)["messages"][-1]["content"].strip()
    ]  # an empty answer has nothing to replay
    if not rows:
        raise RunFailed(
            f"{model} answered none of the {answers.prompts} general prompts with any text, so there is "
            f"nothing to replay against forgetting (see {answers.out}). Is it a chat model?"
        )
    replay = folder / REPLAY_FILE
    with atomic_file(replay) as f:
        f.write("".join(row + "\n" for row in rows))
    return replay
