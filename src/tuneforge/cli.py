"""The `tuneforge` command line: thin; each command calls one public function of a stage.

Any `TuneforgeError` becomes one clear message and its exit code (2 bad input, 1 run failed),
never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import TuneforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune open language models: check data, train, evaluate, export, serve.")
models_app = typer.Typer(no_args_is_help=True, help="Models that can be had offline: list, pull, inspect.")
data_app = typer.Typer(no_args_is_help=True, help="Check training data before spending compute on it.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

err = Console(stderr=True)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.learning_rate=1e-4"),
    resume: Optional[str] = typer.Option(None, help="'latest' (or just --resume) or a checkpoint folder."),
    force: bool = typer.Option(False, help="Resume even though the config changed in a way that changes results."),
    nproc: int = typer.Option(1, help="Processes on this machine (launches torchrun)."),
):
    """Fine-tune as CONFIG says; writes the run folder (metrics, checkpoints, final model)."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        args = ["train", str(config), *(overrides or [])]
        if resume:
            args += ["--resume", resume]
        if force:
            args.append("--force")
        raise typer.Exit(_launch(args, nproc))
    from .training import train as run_train

    result = run_train(config, overrides or [], resume=resume, force=force)
    raise typer.Exit(0 if result.status == "completed" else 130)


def _launch(args: list[str], nproc: int) -> int:
    from .training.distributed import launch

    return launch(args, nproc)


@app.command()
def validate(
    config: Path = typer.Argument(..., help="YAML config file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides, e.g. data.max_length=512"),
):
    """Dry run: check config, model and every data row; print the plan. Exit 2 on any problem."""
    from .training.plan import validate as run_validate

    raise typer.Exit(run_validate(config, overrides or []))


@models_app.command("list")
def models_list(json_out: bool = typer.Option(False, "--json", help="Print JSON only.")):
    """Registry models: name, parameters, size, licence, cached or not."""
    from .models.commands import models_list as cmd

    raise typer.Exit(cmd(json_out=json_out))


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="Registry name, e.g. smollm2-135m-instruct.")):
    """Download a registry model and convert it once into a trainable folder in the cache."""
    from .models.commands import models_pull as cmd

    raise typer.Exit(cmd(name))


@models_app.command("info")
def models_info(
    spec: str = typer.Argument(..., help="Registry name, HF folder, .gguf file or run folder."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON only."),
):
    """Architecture, parameters, vocabulary, chat template, EOS and pad tokens."""
    from .models.commands import models_info as cmd

    raise typer.Exit(cmd(spec, json_out=json_out))


@data_app.command("check")
def data_check(
    files: List[Path] = typer.Argument(..., help="Data files (JSONL, JSON, CSV, Parquet)."),
    model: Optional[str] = typer.Option(None, help="Tokenizer to render with (default: the bundled model)."),
    show: int = typer.Option(0, help="Print N rendered examples, trained tokens highlighted."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
    format: str = typer.Option("auto", help="auto | chat | alpaca | sharegpt | prompt_completion | text | preference"),
    max_length: int = typer.Option(1024, help="Token limit per example."),
    train_on: str = typer.Option("assistant", help="assistant | last_assistant | all"),
):
    """Validate data files and report rows, errors by code and line, lengths, masks, duplicates."""
    from .data.check import check_command

    raise typer.Exit(check_command([str(f) for f in files], model=model, show=show, json_out=json_out,
                                   format=format, max_length=max_length, train_on=train_on))


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Registry name, model folder, run folder or checkpoint."),
    data: Path = typer.Argument(..., help="Chat JSONL whose last assistant message is the reference answer."),
    compare: Optional[str] = typer.Option(None, help="Also evaluate this model (e.g. the base) side by side."),
    metric: str = typer.Option("auto", help="auto | exact | contains | json_fields | support_triage"),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N examples."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON only."),
):
    """Loss, perplexity and generation metrics of MODEL on DATA."""
    from .eval.command import eval_command

    raise typer.Exit(eval_command(model, str(data), compare=compare, metric=metric, json_out=json_out, limit=limit))


@app.command()
def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), help="Run folder."),
    n_train: Optional[int] = typer.Option(None, help="Training tickets (default: the tuned setting)."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: the tuned setting)."),
):
    """The demo task end to end: pull, generate data, eval base, LoRA fine-tune, eval, forgetting, report."""
    from .quickstart import quickstart as run_quickstart

    raise typer.Exit(run_quickstart(out, n_train=n_train, max_steps=max_steps))


def _normalise_argv(argv: list[str]) -> list[str]:
    """`--resume` alone means the latest checkpoint."""
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        if a == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("-") or "=" in nxt or nxt.endswith((".yaml", ".yml")):
                out.append("latest")
    return out


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # Without standalone mode, click returns a command's exit code instead of exiting.
        sys.exit(app(args=_normalise_argv(sys.argv[1:]), prog_name="tuneforge", standalone_mode=False) or 0)
    except TuneforgeError as e:
        err.print(f"[bold red]error:[/] {e.message}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(2)
        raise
