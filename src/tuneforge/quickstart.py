"""`tuneforge quickstart`: the whole story on a laptop CPU in minutes.

Pull the bundled model, generate the support-triage data (shared/demo-task.md), measure the base
model on the held-out test tickets, fine-tune it with LoRA, measure the tuned model and what it
forgot, and write the report. It ends by checking its own targets and saying plainly which it
missed; the exit code is 0 only when every target is met.

The settings below were tuned with real runs on 2 CPU cores (the figures are in the report).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console

from .config import DEFAULT_MODEL
from .eval.evaluate import evaluate
from .eval.forgetting import measure_forgetting
from .eval.report import print_tables, report_tables, share_with_interval, write_run_report
from .models import REGISTRY, pull, resolve
from .errors import RunFailed
from .fsio import atomic_file
from .tasks import support_triage
from .tasks.general import bundled_file


@dataclass(frozen=True)
class Settings:
    # These settings, on a fresh clone's `make quickstart`: 13.6 min, 86% exact, 95.4% of the general
    # questions kept, general-text cross-entropy +0.31% (issue notes, 2026-11-29). Most figures in
    # the comments below were measured earlier: before the generator's training-only phrasings
    # (tasks/support_triage.py), which lifted exact match more than any setting here did (72% to 84%
    # at 250 steps), and on the earlier question set: the 115 questions the base model answered right
    # greedily, some by luck (eval/forgetting.py). On the current set, the questions it knows firmly,
    # the ten rank-8 and rank-16 runs of 2026-11-29 kept 95.4-97.7% and three rank-64 runs 91.9-94.8%.
    n_train: int = 2000  # generated training tickets (a run sees each at most once)
    n_valid: int = 48  # validation tickets: the loss curve (cheap enough to evaluate mid-run)
    n_test: int = 300  # generated held-out tickets
    test_subset: int = 100  # of which the quickstart scores the first this many, base and tuned
    # One packed row a step, twice the optimizer steps of two-row steps for the same tickets: at the
    # same 512-token rows and LoRA+ 4, 260 steps of one row at lr 7e-4 scored 75% exact with 92.2% of
    # the general questions kept, against 72% and 89.6% for 130 steps of two rows at lr 1e-3 (one run
    # each; issue notes, 2026-11-29). Rows of 256 tokens (520 steps) were no better (70%, 90.4%).
    # On a fresh clone 260 steps took 14.4 min (75%, 92.2%) and 250 steps 13.7 min (72%, 90.4%, within
    # one run's spread of that). Later, with the current data and question set, 250 steps took 13.2 min
    # on a fresh clone (84% exact, 96.0% kept) and 270 steps 14.7 min (86%, 96.0%; issue notes,
    # 2026-11-29): 260 keep a margin for this machine's run-to-run spread in time.
    max_steps: int = 260
    batch_size: int = 1  # packed rows per step
    # Tokens per packed row: about eight examples (tickets and short replay replies), the tickets'
    # shared system prompt held once (data.share_prefixes): 2,498 examples in 292 rows.
    max_length: int = 512
    # 3e-3 reached the same validation loss sooner but collapsed every non-task prompt into '{"{"{"'
    # (general questions kept: 9.6%). With one row a step, 1e-3 kept 88.7% of the questions, 7e-4
    # 92.2%, for the same exact match (75%).
    learning_rate: float = 7e-4
    # LoRA+: B matrices at this multiple of the learning rate. At 140 two-row steps, 4 scored 72% exact
    # against 64% for plain LoRA, both keeping 93.0% of the general questions; 8 (120 steps) scored
    # 77% but kept 87.0%. With one-row steps, 8 at lr 5e-4 scored as 4 at 7e-4 (76%, 92.2%).
    loraplus_lr_ratio: float = 4.0
    general_mix: float = 0.2  # share of training that is general replay, against forgetting
    # Replay learned as the base model's distribution (KL), not as text, on the base model's own
    # replies to general questions cut at 32 tokens: under KL a cut reply teaches no early stop, the
    # replies take about 40 s to generate (once per model), and short replay leaves room for more
    # tickets in a row. Chit-chat replay kept as many general questions but, being long, let through
    # a third fewer tickets (53% exact at 120 steps). data/replay.py has the figures.
    general_replay_tokens: int = 32
    replay_loss: str = "kl_to_base"
    lora_r: int = 16
    # NEFTune: noise on the input embeddings while training, against overfitting the training
    # tickets' phrasings (the test holds out whole templates). Four runs with it (two of them with
    # a trial version scaled by the row's length, at about 6 and 13 in this scale) against three
    # without, otherwise these settings: 75/73/76/72% exact with 93.9/93.0/90.4/93.9% of the
    # questions kept, against 75/72/72% and 92.2/90.4/90.4%. A small gain, each pair within one
    # run's spread, and no cost in time (issue notes, 2026-11-29; the last run is a fresh clone's
    # `make quickstart`, 13.4 min).
    neftune_alpha: float = 6.0
    # LoRA on the upper half of the decoder layers only: backpropagation then stops halfway down
    # (the upper quarter only was faster a step but learned less: 54% exact at 140 steps, against 63%
    # for the upper half at 120, both at lr 2e-3 with chit-chat replay).
    lora_from_layer: float = 0.5
    max_new_tokens: int = 40  # the answer is one JSON line of about 20 tokens
    seed: int = 0


@dataclass(frozen=True)
class Targets:
    wall_minutes: float = 15.0
    tuned_exact: float = 0.85  # all three fields right, held-out test tickets
    base_exact: float = 0.20  # at most: the task must need the fine-tuning
    questions_retained: float = 0.95  # tuned accuracy / base accuracy on general questions
    text_loss_rise: float = 0.03  # relative rise of general-text cross-entropy, at most


def training_config(settings: Settings, model: str, data: dict[str, Path], out: Path) -> dict:
    return {
        "base_model": model,
        "method": "lora",
        "lora": {"r": settings.lora_r, "alpha": 2 * settings.lora_r, "dropout": 0.0,
                 "target_modules": "all-linear", "from_layer": settings.lora_from_layer,
                 "loraplus_lr_ratio": settings.loraplus_lr_ratio},
        "data": {"train": str(data["train"]), "validation": str(data["validation"]),
                 "max_length": settings.max_length, "packing": True, "general_mix": settings.general_mix,
                 "general_replay": str(data["replay"])},
        "train": {"max_steps": settings.max_steps, "batch_size": settings.batch_size, "replay_loss": settings.replay_loss,
                  "learning_rate": settings.learning_rate, "warmup": 0.05, "scheduler": "cosine",
                  "neftune_alpha": settings.neftune_alpha,
                  # fp32, not auto: CPU bf16 autocast trained LoRA about 18x slower than fp32 here.
                  "precision": "fp32",
                  "eval_every": max(1, settings.max_steps // 2), "save_every": 0, "seed": settings.seed},
        "output_dir": str(out),
    }


def check_targets(targets: Targets, wall_seconds: float, before: dict, after: dict, forgetting: dict) -> list[dict]:
    text, questions = forgetting["general_text"], forgetting["general_questions"]
    kept = questions["retained"]
    # The share kept is a share of the questions (with its interval) when the base knows them all: the
    # bundled model, for which the set was chosen.
    kept_measured = share_with_interval(kept, questions["n"]) if questions["base_accuracy"] == 1 else f"{kept:.1%}"
    rows = [
        ("wall time", f"<= {targets.wall_minutes:.0f} min", f"{wall_seconds / 60:.1f} min",
         wall_seconds <= targets.wall_minutes * 60),
        ("tuned: all three fields right", f">= {targets.tuned_exact:.0%}",
         share_with_interval(after["scores"]["exact"], after["n"]), after["scores"]["exact"] >= targets.tuned_exact),
        ("base: all three fields right", f"<= {targets.base_exact:.0%}",
         share_with_interval(before["scores"]["exact"], before["n"]), before["scores"]["exact"] <= targets.base_exact),
        ("general questions kept", f">= {targets.questions_retained:.0%} of base", kept_measured,
         kept >= targets.questions_retained),
        ("general text cross-entropy rise", f"<= {targets.text_loss_rise:+.0%}", f"{text['change']:+.2%}",
         text["change"] <= targets.text_loss_rise),
    ]
    return [{"target": name, "goal": goal, "measured": measured, "met": bool(met)} for name, goal, measured, met in rows]


def quickstart(out: str | Path = "runs/quickstart", *, n_train: int | None = None, max_steps: int | None = None,
               learning_rate: float | None = None, lora_r: int | None = None, test_subset: int | None = None,
               model: str = DEFAULT_MODEL, console: Console | None = None) -> int:
    """Run the demonstration end to end into `out`; returns 0 when every target is met, else 1.

    Leave the keyword arguments out to get the tuned settings (`Settings`).
    """
    from .training import train

    console = console or Console()
    chosen = {"n_train": n_train, "max_steps": max_steps, "learning_rate": learning_rate, "lora_r": lora_r,
              "test_subset": test_subset}
    settings = replace(Settings(), **{k: v for k, v in chosen.items() if v is not None})
    out = Path(out)
    started = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(number: int, title: str) -> None:
        phases[title] = time.perf_counter()
        console.rule(f"[bold]{number}/6 {title}[/]  [dim]{_clock(started)}[/]", align="left")

    console.print(f"[bold]tuneforge quickstart[/]: fine-tune {model} on support-ticket triage, on this machine's "
                  f"CPU, into {out}\n[dim]settings: {asdict(settings)}[/]")
    phase(1, "model")
    if model in REGISTRY:
        pull(model)
    else:
        resolve(model)

    phase(2, "data")
    data = support_triage.generate(out / "data", n_train=settings.n_train, n_valid=settings.n_valid,
                                   n_test=settings.n_test, seed=settings.seed)
    console.print(f"{settings.n_train} train, {settings.n_valid} validation, {settings.n_test} test tickets "
                  f"in {out / 'data'} (test tickets use phrasings training never sees)")
    data["replay"] = write_self_replay(model, out / "data", settings.general_replay_tokens)

    evaluation = {"metric": "support_triage", "limit": settings.test_subset, "max_new_tokens": settings.max_new_tokens}
    phase(3, "base model on the test tickets")
    before = evaluate(model, data["test"], **evaluation)
    console.print(f"base: all three fields right on {before['scores']['exact']:.1%} of {before['n']} tickets, "
                  f"valid JSON {before['scores']['valid_json']:.1%}")

    phase(4, "fine-tune with LoRA")
    result = train(training_config(settings, model, data, out))
    if result.status != "completed":
        console.print(f"[red]training stopped early ({result.status}); nothing to evaluate.[/]")
        return 1

    phase(5, "tuned model on the test tickets")
    after = evaluate(str(out), data["test"], **evaluation)
    console.print(f"tuned: all three fields right on {after['scores']['exact']:.1%} of {after['n']} tickets")

    phase(6, "forgetting: general text, prompts and questions, base vs tuned")
    forgetting = measure_forgetting(str(out))

    wall = time.perf_counter() - started
    targets = check_targets(Targets(), wall, before, after, forgetting)
    names = list(phases)
    spans = [phases[b] - phases[a] for a, b in zip(names, names[1:])] + [started + wall - phases[names[-1]]]
    facts = {"model": model, "wall time": f"{wall / 60:.1f} min ({wall:.0f} s)",
             **{f"  {name}": f"{seconds:.0f} s" for name, seconds in zip(names, spans)},
             "training steps": str(result.steps), "settings": ", ".join(f"{k}={v}" for k, v in asdict(settings).items())}
    report = write_run_report(out, before, after, forgetting, targets, facts)

    console.rule("[bold]results")
    print_tables(report_tables(before, after, forgetting, targets, facts), console)
    missed = [t for t in targets if not t["met"]]
    console.print(f"wall time {wall / 60:.1f} min; report: {report}")
    if missed:
        console.print("[bold red]missed targets:[/] " + "; ".join(
            f"{t['target']}: {t['measured']}, goal {t['goal']}" for t in missed))
        return 1
    console.print("[bold green]all targets met[/]")
    return 0


def write_self_replay(model: str, folder: Path, max_new_tokens: int) -> Path:
    """The base model's own replies to the bundled general prompts, as a chat file for
    `data.general_replay` (written once; a rerun finds it complete)."""
    from .distill.teacher_data import generate_teacher_data

    answers = generate_teacher_data(model, bundled_file("replay_prompts"), folder / "replay-answers.jsonl",
                                    max_new_tokens=max_new_tokens, batch_size=64, precision="fp32")
    rows = [row for row in answers.out.read_text(encoding="utf-8").splitlines()
            if json.loads(row)["messages"][-1]["content"].strip()]  # an empty answer has nothing to replay
    if not rows:
        raise RunFailed(f"{model} answered none of the {answers.prompts} general prompts with any text, so there is "
                        f"nothing to replay against forgetting (see {answers.out}). Is it a chat model?")
    replay = folder / "replay.jsonl"
    with atomic_file(replay) as f:
        f.write("".join(row + "\n" for row in rows))
    return replay


def _clock(started: float) -> str:
    seconds = int(time.perf_counter() - started)
    return f"{seconds // 60}:{seconds % 60:02d}"
