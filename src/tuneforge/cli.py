"""The `tuneforge` command line: thin; each command calls one public function of a stage.

Any `TuneforgeError` becomes one clear message and its exit code (2 bad input, 1 run failed),
never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from typer.core import TyperGroup

from .console import new_console, plain
from .errors import EXIT_BAD_INPUT, EXIT_RUN_FAILED, LAUNCHER_SHOWS_ERRORS, TuneforgeError
from .fsio import REFUSED_WRITE_ADVICE
from .serve_defaults import MAX_BATCH, MAX_WAITING, PREFIX_CACHE_MB


class _Interrupted(Exception):
    """Ctrl-C during a command, carried past typer to `main`."""


class _Terminated(BaseException):
    """SIGTERM (`timeout`, `kill`, a CI job cancelled, `docker stop`): raised where the main thread is, so the
    work unwinds as on Ctrl-C (half-written folders removed) and `main` says so in one line. A BaseException,
    so no `except Exception` on the way takes it for a failure of the work."""


def _terminate(signum, frame) -> NoReturn:
    raise _Terminated


class _Commands(TyperGroup):
    """tuneforge's command group. Recent typer releases turn a KeyboardInterrupt into a silent exit code 130,
    which leaves a log that stops with no word of why; this carries it to `main`, which says so."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted from None


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune open language models: check data, train, evaluate, export, serve.",
)
models_app = typer.Typer(no_args_is_help=True, help="Models that can be had offline: list, pull, info.")
data_app = typer.Typer(
    no_args_is_help=True, help="Check training data before spending compute on it; make it from stored completions."
)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

err = new_console(stderr=True)


def _print_version(asked: bool) -> None:
    if asked:
        from . import __version__

        typer.echo(f"tuneforge {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print tuneforge's version and exit."
    ),
) -> None:
    pass


# The modules of the serve extra (pyproject.toml), by their import names, with those they bring.
SERVE_EXTRA_MODULES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "multipart",
    "python_multipart",
    "jinja2",
    "sqlalchemy",
    "psycopg2",
    "prometheus_client",
    "outlines_core",
)


@contextmanager
def serve_extra(command: str) -> Iterator[None]:
    """Around a command that runs a web server or a database store: their modules come with tuneforge's
    serve extra, which a plain `pip install tuneforge` leaves out, so one missing is an install to name.
    Another module missing (one a model's code imports while serving) is no matter of the extra."""
    try:
        yield
    except ModuleNotFoundError as missing:
        if (missing.name or "").split(".")[0] not in SERVE_EXTRA_MODULES:
            raise
        raise TuneforgeError(
            f"tuneforge {command} needs the serve extra, and {missing.name} is not installed. Install it with "
            "`pip install 'tuneforge[serve]'` (from a clone: `pip install -e '.[serve]'`).",
            code="missing_dependency",
        ) from None


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config file, or a shipped recipe's name (tuneforge recipes)."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. train.learning_rate=1e-4"),
    resume: str | None = typer.Option(None, help="'latest' (or just --resume) or a checkpoint folder."),
    force: bool = typer.Option(False, help="Resume even though the config changed in a way that changes results."),
    overwrite: bool = typer.Option(
        False,
        help="Start afresh where output_dir holds an earlier run: all it wrote goes once this run passes its checks.",
    ),
    nproc: int = typer.Option(1, min=1, help="Processes on this machine (launches torchrun)."),
    nnodes: int = typer.Option(1, min=1, help="Machines: the same command on each, with its own --node-rank."),
    node_rank: int = typer.Option(0, min=0, help="This machine's number, 0 to nnodes - 1; machine 0 hosts --master."),
    master: str | None = typer.Option(None, help="ADDR:PORT of machine 0, where the machines meet (--nnodes 2+)."),
):
    """Fine-tune as CONFIG says; writes the run folder (metrics, checkpoints, final model)."""
    launches = nproc > 1 or nnodes > 1 or master is not None or node_rank > 0
    if launches and "WORLD_SIZE" not in os.environ:
        args = ["train", str(config), *(overrides or [])]
        if resume:
            args += ["--resume", resume]
        if force:
            args.append("--force")
        if overwrite:
            args.append("--overwrite")
        from .pipeline import check_launch

        check_launch(config, overrides, processes=nproc * nnodes, resume=resume, force=force, overwrite=overwrite)
        raise typer.Exit(_launch(args, nproc, nnodes=nnodes, node_rank=node_rank, master=master))
    from .pipeline import EvaluationInterrupted, interrupted_evaluating
    from .pipeline import train as run_train

    try:
        result = run_train(config, overrides, resume=resume, force=force, overwrite=overwrite)
    except KeyboardInterrupt as interrupted:
        # Stopped before the loop could save (loading, preparing data; under --nproc the launcher passes Ctrl-C
        # on to each process): one line says where the run can continue from, an earlier run's checkpoint too.
        # Stopped in the evaluation after training: the model is kept, and how to get the evaluation.
        from .config import load_config
        from .training.loop import interrupted_before_saving

        out = Path(load_config(config, overrides).output_dir)
        if isinstance(interrupted, EvaluationInterrupted):
            raise _Interrupted(interrupted_evaluating(out)) from None
        raise _Interrupted(interrupted_before_saving(out, overwrite)) from None
    raise typer.Exit(0 if result.status == "completed" else 130)


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="YAML config file, or a shipped recipe's name (tuneforge recipes)."),
    overrides: list[str] | None = typer.Argument(
        None, help="Dotted overrides every run shares, e.g. train.max_steps=200"
    ),
    # The help is rich markup: `\\[` shows a bracket that would otherwise open a markup tag and vanish.
    set_: list[str] = typer.Option(
        ...,
        "--set",
        help="KEY=V1,V2,...: the values of a key to try, e.g. train.learning_rate=1e-4,2e-4; repeatable (every "
        "combination is a run). A list goes in brackets, quoted: 'lora.target_modules=\\[q_proj,v_proj],\\[v_proj]'.",
    ),
    out: Path | None = typer.Option(
        None, help="Folder of the sweep's runs (default: the config's output_dir + -sweep)."
    ),
    metric: str | None = typer.Option(
        None,
        help="What ranks the runs, lower first: eval_loss (final validation; the default), best_eval_loss, "
        "train_loss; for method: grpo, higher first: eval_reward (final validation; its default), best_eval_reward.",
    ),
):
    """Train CONFIG once for each combination of the --set values, one run after another, each a resumable run
    folder under --out; then rank them by --metric (table, OUT/sweep.json, OUT/sweep.png). A rerun skips finished
    runs and resumes an interrupted one."""
    from .sweeps import sweep as run_sweep

    result = run_sweep(config, set_, overrides, out=out, metric=metric)
    raise typer.Exit({"completed": 0, "failed": EXIT_RUN_FAILED}.get(result.status, 130))


def _launch(args: list[str], nproc: int, **machines) -> int:
    from .training.distributed import launch

    return launch(args, nproc, **machines)


@app.command()
def validate(
    config: Path = typer.Argument(..., help="YAML config file, or a shipped recipe's name (tuneforge recipes)."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. data.max_length=512"),
    nproc: int = typer.Option(
        1, min=1, help="Processes per machine the run will have: the plan shows what each holds."
    ),
    nnodes: int = typer.Option(1, min=1, help="Machines the run will span."),
):
    """Dry run: check config, model and every data row; print the plan. Exit 2 on any problem."""
    from .dry_run import validate as run_validate

    raise typer.Exit(run_validate(config, overrides, processes=nproc * nnodes, machines=nnodes))


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
    files: list[Path] = typer.Argument(
        ..., help="Data files (JSONL, JSON, CSV, each also .gz; Parquet; .txt or .md: one document each)."
    ),
    model: str | None = typer.Option(None, help="Tokenizer to render with (default: the bundled model)."),
    show: int = typer.Option(0, help="Print N rendered examples, trained tokens highlighted."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
    format: str = typer.Option(
        "auto", help="auto | chat | alpaca | sharegpt | prompt_completion | text | preference | kto"
    ),
    max_length: int = typer.Option(1024, help="Token limit per example."),
    train_on: str = typer.Option("assistant", help="assistant | last_assistant | all"),
    truncation: str = typer.Option(
        "truncate", help="A row over --max-length: truncate | drop | split (text documents: windows)."
    ),
):
    """Validate data files and report rows, errors by code and line, lengths, masks, duplicates."""
    from .data.check import check_command

    raise typer.Exit(
        check_command(
            [str(f) for f in files],
            model=model,
            show=show,
            json_out=json_out,
            format=format,
            max_length=max_length,
            train_on=train_on,
            truncation=truncation,
        )
    )


@data_app.command("prepare")
def data_prepare(
    config: Path = typer.Argument(..., help="YAML config file, or a shipped recipe's name (tuneforge recipes)."),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. data.dedup=near"),
    out: Path = typer.Option(..., help="Folder to write: train.jsonl, valid.jsonl, dropped.jsonl, summary.json."),
    force: bool = typer.Option(False, help="Replace an --out folder that is not empty."),
):
    """Run CONFIG's data pipeline and write the rows it trains and validates on, those it leaves out and why."""
    from .data.write import prepare_command

    raise typer.Exit(prepare_command(config, overrides, out=out, force=force))


@data_app.command("from-completions")
def data_from_completions(
    out: Path = typer.Option(..., help="Chat JSONL to write (whole or not at all)."),
    model: str | None = typer.Option(None, help="Only completions of this served model (as the answers name it)."),
    metadata: list[str] | None = typer.Option(
        None, help="KEY=VALUE: only completions stored with this metadata pair; repeatable (all must match)."
    ),
    store: str | None = typer.Option(
        None,
        help="The completion store: a file path or database URL (default: tuneforge serve's, under "
        "$TUNEFORGE_HOME/serve; for tuneforge api, its --db).",
    ),
    api_key: str | None = typer.Option(None, help="Only completions made with this API key."),
    keep_truncated: bool = typer.Option(False, help="Keep replies cut at their length limit (left out by default)."),
):
    """Stored chat completions (requests made with store: true) as chat training data: prompt + reply."""
    with serve_extra("data from-completions"):
        from .serve.from_completions import from_completions_command

        raise typer.Exit(
            from_completions_command(
                store,
                str(out),
                model=model,
                metadata_specs=metadata or [],
                api_key=api_key,
                keep_truncated=keep_truncated,
            )
        )


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Registry name, model folder, run folder or checkpoint."),
    data: Path = typer.Argument(
        ...,
        help="Chat JSONL whose last assistant message is the reference answer (a preference pair's: its chosen reply); "
        "with --grader also prompt rows without one, as GRPO reads them; or raw text (text rows, a .txt or .md "
        "document), scored by per-token loss, perplexity and accuracy; for a reward model, preference pairs; "
        "multiple-choice questions (MMLU, ARC, HellaSwag, PIQA layouts), scored by each choice's log-likelihood.",
    ),
    compare: str | None = typer.Option(None, help="Also evaluate this model (e.g. the base) side by side."),
    metric: str = typer.Option("auto", help="auto | exact | contains | json_fields | support_triage"),
    limit: int | None = typer.Option(None, min=1, help="Evaluate only the first N examples."),
    max_new_tokens: int | None = typer.Option(
        None,
        min=1,
        help="Longest answer scored, in tokens (default 128); a reasoning model's answer follows its reasoning.",
    ),
    grader: str | None = typer.Option(
        None,
        help="Also score each answer against its row with a grader, as grpo.grader takes it: an OpenAI grader "
        "inline ('{type: reward_model, model: runs/rm}') or in a JSON/YAML file, or reward functions as "
        "FILE.py:FUNCTION (several comma-separated, summed).",
    ),
    out: Path | None = typer.Option(
        None,
        help="A reward model as MODEL: the folder that gets each pair's two scores (scores.jsonl) and a histogram "
        "of the margins (margins.png); multiple-choice DATA: each question's results (results.jsonl).",
    ),
    num_fewshot: int = typer.Option(
        0,
        min=0,
        help="Multiple-choice DATA: solved examples before each question, as lm-evaluation-harness's few-shot "
        "prompts (MMLU's published figures are 5-shot, ARC's 25-shot); taken from --fewshot-file, else from DATA "
        "without the question itself, as the harness's task for the layout takes them (MMLU: the first N).",
    ),
    fewshot_file: Path | None = typer.Option(
        None, help="The file --num-fewshot takes its solved examples from (the benchmark's dev or train split)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON only."),
):
    """Loss, perplexity and generation metrics of MODEL on DATA, and a grader's scores (--grader); for a reward
    model, its accuracy and margins on DATA's preference pairs; on multiple-choice questions, acc and acc_norm."""
    from .eval.command import eval_command

    raise typer.Exit(
        eval_command(
            model,
            str(data),
            compare=compare,
            metric=metric,
            json_out=json_out,
            limit=limit,
            max_new_tokens=max_new_tokens,
            grader=grader,
            out=None if out is None else str(out),
            num_fewshot=num_fewshot,
            fewshot_file=None if fewshot_file is None else str(fewshot_file),
        )
    )


@app.command("export")
def export_(
    run: str = typer.Argument(
        ...,
        help="Run folder, checkpoint folder, or model (registry name, HF folder, .gguf); an adapter as RUN:WEIGHT "
        "is scaled by WEIGHT (and combined with any --combine).",
    ),
    format: str = typer.Option(..., "--format", help="adapter | merged | gguf"),
    out: Path = typer.Option(..., help="Folder to write; must not exist or be empty."),
    dtype: str | None = typer.Option(
        None,
        help="merged: f32 | f16 | bf16 (default: the base's stored dtype); "
        "gguf: f16 (default) | f32 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1",
    ),
    ollama: bool = typer.Option(False, help="Also write an Ollama Modelfile (gguf only)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out folder."),
    combine: list[str] = typer.Option(
        [],
        "--combine",
        help="Another LoRA adapter on RUN's base, OTHER_RUN[:WEIGHT] (repeatable), combined with RUN[:WEIGHT] "
        "into one adapter, which is exported.",
    ),
    combination: str | None = typer.Option(
        None, help="How --combine combines: cat (default, exact) | linear | svd | ties | dare_linear | dare_ties"
    ),
    density: float | None = typer.Option(None, help="ties, dare_linear, dare_ties: the share of values kept (0-1]."),
):
    """Export RUN (or RUN combined with other adapters: --combine) as a PEFT adapter, a merged safetensors model
    or a GGUF, checked against the source."""
    from .exporting import export_run

    export_run(
        run,
        format,
        out,
        dtype=dtype,
        ollama=ollama,
        overwrite=overwrite,
        combine=combine,
        combination=combination,
        density=density,
    )


@app.command()
def chat(
    model: str = typer.Argument(..., help="Registry name, model folder, run folder, checkpoint or .gguf file."),
    system: str | None = typer.Option(None, help="System message (change it later with /system TEXT)."),
    max_tokens: int = typer.Option(512, min=1, help="Most tokens in one reply."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy: the same answer every time."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling, in (0, 1] (with temperature > 0)."),
    precision: str = typer.Option(
        "auto", help="Weights for decoding: auto (bf16 where native, else fp32) | bf16 | fp32 (exact)."
    ),
    tools: Path | None = typer.Option(
        None,
        help="JSON or YAML file of OpenAI tool definitions the model may call, rendered as serve renders a "
        "request's; answer a call with /tool NAME_OR_ID RESULT.",
    ),
):
    """Chat with MODEL in the terminal, replies streamed; /system TEXT, /show, /reset, /image PATH (a model that
    reads images), /tool NAME_OR_ID RESULT (with --tools), /exit, /help."""
    from .chat import chat_command

    raise typer.Exit(
        chat_command(
            model,
            system=system,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            precision=precision,
            tools=tools,
        )
    )


PORT_HELP = "Port to listen on (0: a free one the OS picks; the address is printed at start)."


API_KEYS_ENV = "TUNEFORGE_API_KEYS"


def _sendable_keys(keys: list[str] | None) -> list[str] | None:
    """The --api-key values, refused where no client can send one: empty (`--api-key "$KEY"` with KEY unset) or
    with a space at either end (HTTP drops it from the header), so the server would refuse every request. The
    environment's keys set to none (`TUNEFORGE_API_KEYS="$KEY"` with KEY unset), which click reads as no option,
    are refused too: the server would serve anyone, where its operator meant it to require a key."""
    if not keys and (environment := os.environ.get(API_KEYS_ENV)) is not None and not environment.split():
        raise typer.BadParameter(
            f"{API_KEYS_ENV} is set but holds no key, so the server would serve anyone who reaches it without one. "
            f"Set it to the keys, space-separated (is the variable you set it from, such as $KEY, set?), or unset "
            f"{API_KEYS_ENV} to serve without a key."
        )
    for key in keys or []:
        if not key or key != key.strip():
            what = "an empty key" if not key.strip() else f"a key with a space at either end ({key!r})"
            raise typer.BadParameter(
                f"{what}, which no client can send, so every request would be refused. Give the key itself "
                "(is the variable you pass, such as $KEY, set?), or leave --api-key out to serve without one."
            )
    return keys


STORE_MAX_AGE_HELP = "Delete stored chat completions older than this many days (default: keep them)."
STORE_MAX_COUNT_HELP = (
    "Keep at most this many stored chat completions, all keys together; the oldest go first (default: no bound)."
)
LOG_PROMPTS_HELP = "Put prompts' text in the request log (JSON lines on stderr); left out by default."
PREFIX_CACHE_HELP = (
    "Memory, in MiB, for the keys and values of prompts seen before, so a prompt starting as one did (a system "
    "prompt, a conversation's earlier turns) runs only the rest; 0 turns it off."
)


@app.command()
def serve(
    model: str | None = typer.Option(
        None, help="Base model (default: the first adapter's base, else the bundled model)."
    ),
    adapter: list[str] | None = typer.Option(None, help="NAME=PATH of a LoRA adapter or run folder; repeatable."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for every one)."),
    port: int = typer.Option(8000, min=0, max=65535, help=PORT_HELP),
    api_key: list[str] | None = typer.Option(
        None,
        envvar=API_KEYS_ENV,
        callback=_sendable_keys,
        help="Require this Bearer key; repeatable (env: TUNEFORGE_API_KEYS, space-separated).",
    ),
    max_adapters: int = typer.Option(4, min=1, help="Adapters held in memory; the least recently used go beyond it."),
    max_batch: int = typer.Option(
        MAX_BATCH, min=1, help="Most rows decoded together; a request takes one per choice (n)."
    ),
    max_waiting: int = typer.Option(MAX_WAITING, min=1, help="Most requests waiting for a place; beyond it a 429."),
    prefix_cache_mb: int = typer.Option(PREFIX_CACHE_MB, min=0, help=PREFIX_CACHE_HELP),
    max_tokens: int = typer.Option(
        1024,
        min=1,
        help="Reply length limit, in tokens, for chat requests that set none (completions: 16, as OpenAI's); "
        "within the context window either way.",
    ),
    max_body_mb: int = typer.Option(4, min=1, help="Largest request body accepted, in MiB."),
    docs: bool = typer.Option(False, help="Serve /docs and /openapi.json (without a key)."),
    precision: str = typer.Option(
        "auto", help="Weights for decoding: auto (bf16 where native, else fp32) | bf16 | fp32 (exact)."
    ),
    store: str | None = typer.Option(
        None,
        help="Where store: true keeps chat completions: a file path or database URL (default: SQLite under "
        "$TUNEFORGE_HOME/serve).",
    ),
    store_max_age_days: float | None = typer.Option(None, help=STORE_MAX_AGE_HELP),
    store_max_count: int | None = typer.Option(None, help=STORE_MAX_COUNT_HELP),
    log_prompts: bool = typer.Option(False, help=LOG_PROMPTS_HELP),
    allow_adapter_updates: bool = typer.Option(
        False,
        help="Let clients with a key load and unload adapters while the server runs (vLLM's /v1/load_lora_adapter "
        "and /v1/unload_lora_adapter); a restart serves the --adapter ones only.",
    ),
):
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/responses, /v1/models, /metrics) for a
    base and its adapters; stores chat completions asked to."""
    with serve_extra("serve"):
        from .serve import Retention
        from .serve.command import serve_command

        raise typer.Exit(
            serve_command(
                model,
                adapter or [],
                host=host,
                port=port,
                api_keys=api_key or [],
                max_adapters=max_adapters,
                max_batch=max_batch,
                max_waiting=max_waiting,
                prefix_cache_mb=prefix_cache_mb,
                default_max_tokens=max_tokens,
                max_body_mb=max_body_mb,
                docs=docs,
                precision=precision,
                store=store,
                retention=Retention(store_max_age_days, store_max_count),
                log_prompts=log_prompts,
                allow_adapter_updates=allow_adapter_updates,
            )
        )


@app.command()
def api(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for every one)."),
    port: int = typer.Option(8000, min=0, max=65535, help=PORT_HELP),
    db: str | None = typer.Option(
        None,
        envvar="TUNEFORGE_DB",
        help="Job store: a SQLite file's path or a database URL, e.g. postgresql://user@host/db (default: SQLite "
        "under $TUNEFORGE_HOME/jobs).",
    ),
    workers: int = typer.Option(
        1,
        min=0,
        help="Jobs this server trains at once, each in its own process (0: none here; `tuneforge worker` on the same "
        "store trains them).",
    ),
    api_key: list[str] | None = typer.Option(
        None,
        envvar=API_KEYS_ENV,
        callback=_sendable_keys,
        help="Require this Bearer key; repeatable (env: TUNEFORGE_API_KEYS, space-separated); each key sees only "
        "its own files, jobs and models.",
    ),
    max_upload_mb: int = typer.Option(512, min=1, help="Largest file POST /v1/files accepts, in MiB."),
    max_body_mb: int = typer.Option(4, min=1, help="Largest request body accepted on other routes, in MiB."),
    allow_model: list[str] | None = typer.Option(
        None,
        help="A model clients may fine-tune and query besides the registry's and their own fine-tuned ones "
        "(a local folder, .gguf file or hub id, named by clients as written here); repeatable.",
    ),
    max_models: int = typer.Option(
        2, min=1, help="Base models held in memory for inference; the least recently used go beyond it."
    ),
    prefix_cache_mb: int = typer.Option(
        PREFIX_CACHE_MB, min=0, help=PREFIX_CACHE_HELP + " Each base model held has its own."
    ),
    docs: bool = typer.Option(False, help="Serve /docs and /openapi.json (without a key)."),
    allow_python_graders: bool = typer.Option(
        False,
        help="Accept reinforcement jobs whose grader runs the client's Python code on this machine (in a process "
        "with time and memory limits and no sockets; a guard against mistakes, not a sandbox).",
    ),
    store_max_age_days: float | None = typer.Option(None, help=STORE_MAX_AGE_HELP),
    store_max_count: int | None = typer.Option(None, help=STORE_MAX_COUNT_HELP),
    log_prompts: bool = typer.Option(False, help=LOG_PROMPTS_HELP),
):
    """OpenAI-compatible fine-tuning service: files, jobs, events, checkpoints, evals, batches, inference for the
    models made, stored chat completions and /metrics."""
    with serve_extra("api"):
        from .jobs.command import api_command

        raise typer.Exit(
            api_command(
                host=host,
                port=port,
                db=db,
                workers=workers,
                api_keys=api_key or [],
                max_upload_mb=max_upload_mb,
                max_body_mb=max_body_mb,
                allowed_models=allow_model or [],
                max_models=max_models,
                prefix_cache_mb=prefix_cache_mb,
                docs=docs,
                allow_python_graders=allow_python_graders,
                store_max_age_days=store_max_age_days,
                store_max_count=store_max_count,
                log_prompts=log_prompts,
            )
        )


@app.command()
def ui(
    directory: Path = typer.Argument(Path("runs"), help="The folder your run folders are in (or one run folder)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for every one: no key is asked)."),
    port: int = typer.Option(8600, min=0, max=65535, help=PORT_HELP),
    max_models: int = typer.Option(1, min=1, help="Base models the playground holds in memory at once."),
):
    """Web dashboard of the runs under DIRECTORY: live curves, reports, checkpoints, comparison, chat."""
    with serve_extra("ui"):
        from .dashboard.command import ui_command

        raise typer.Exit(ui_command(directory, host=host, port=port, max_models=max_models))


@app.command()
def worker(
    db: str = typer.Option(
        ...,
        "--store",
        "--db",
        envvar="TUNEFORGE_DB",
        help="The shared job store: a database URL, e.g. postgresql://user@host/db, or a SQLite file's path.",
    ),
    workers: int = typer.Option(1, min=1, help="Jobs this machine trains at once, each in its own process."),
):
    """Job workers for a `tuneforge api` elsewhere: claim queued jobs from the shared store and train them.

    $TUNEFORGE_HOME must be the same shared folder the API server uses (uploaded files, run folders)."""
    with serve_extra("worker"):
        from .jobs.command import worker_command

        raise typer.Exit(worker_command(db=db, workers=workers))


@app.command()
def quickstart(
    out: Path | None = typer.Option(None, help="Run folder (default: the recipe's output_dir, runs/quickstart)."),
    n_train: int | None = typer.Option(None, help="Training tickets (default: the tuned setting)."),
    max_steps: int | None = typer.Option(None, help="Optimizer steps (default: the recipe's)."),
    model: str | None = typer.Option(
        None, help="Base model (default: the recipe's, smollm2-135m-instruct), e.g. gemma3-270m."
    ),
    data_only: bool = typer.Option(
        False,
        help="Only write the data (tickets, replay replies) into OUT/data and "
        "print the `tuneforge train` command that trains on it.",
    ),
):
    """The demo task end to end: pull, generate data, eval base, LoRA fine-tune (recipe quickstart), eval,
    forgetting, report."""
    from .quickstart import quickstart as run_quickstart

    raise typer.Exit(run_quickstart(out, n_train=n_train, max_steps=max_steps, model=model, data_only=data_only))


recipes_app = typer.Typer(help="Shipped recipes: complete configs for `tuneforge train`.")
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes(ctx: typer.Context):
    """List the shipped recipes: name, description, model, method and measured results."""
    if ctx.invoked_subcommand is None:
        recipes_list()


@recipes_app.command("list")
def recipes_list():
    """List the shipped recipes: name, description, model, method and results (as plain `tuneforge recipes`)."""
    from .recipes import recipes_command

    raise typer.Exit(recipes_command())


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Recipe name, e.g. quickstart.")):
    """Print the recipe's YAML (save it to a file to edit it, then `tuneforge train FILE`)."""
    from .recipes import show_command

    raise typer.Exit(show_command(name))


distill_app = typer.Typer(
    no_args_is_help=True, help="Distillation: build a smaller student, write a teacher's answers."
)
app.add_typer(distill_app, name="distill")


@distill_app.command("init")
def distill_init(
    teacher: str = typer.Option(..., help="Teacher model: registry name, HF folder, .gguf, run or adapter folder."),
    out: Path = typer.Option(..., help="Folder to write the student to; must not exist."),
    keep_layers: str | None = typer.Option(None, help="Teacher layers to keep, e.g. 0,6,12,18,24,29."),
    every: int | None = typer.Option(
        None, help="Keep every K-th layer (default 2: about half); first and last always."
    ),
    most_influential: int | None = typer.Option(
        None, help="Keep the N layers that turn the hidden state most on --data (block influence)."
    ),
    data: Path | None = typer.Option(None, help="Training data whose first 64 rows rank the layers."),
):
    """A smaller student from a subset of the teacher's decoder layers (DistilBERT-style); prints parameter counts."""
    from .distill.commands import distill_init as cmd

    raise typer.Exit(
        cmd(
            teacher,
            str(out),
            keep_layers=keep_layers,
            every=every,
            most_influential=most_influential,
            data=str(data) if data is not None else None,
        )
    )


@distill_app.command("generate")
def distill_generate(
    teacher: str = typer.Option(..., help="Teacher model: registry name, HF folder, .gguf, run or adapter folder."),
    prompts: Path = typer.Option(..., help="Chat JSONL (a last assistant turn is dropped) or prompt/completion rows."),
    out: Path = typer.Option(
        ..., help="Chat JSONL to write (DPO pairs with --keep pairs); a rerun continues where it stopped."
    ),
    max_new_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    batch_size: int = typer.Option(
        16, help="Prompts generated together (and written together); with --samples, answers decoded together."
    ),
    limit: int | None = typer.Option(None, min=1, help="Stop after the first N prompts; rerun without it to finish."),
    precision: str = typer.Option("auto", help="auto (bf16 where the hardware has it natively), bf16 or fp32."),
    samples: int | None = typer.Option(
        None, help="Best-of-N: sample N answers a prompt and keep what --grader scores best (with --grader)."
    ),
    temperature: float = typer.Option(1.0, help="Best-of-N: the sampling temperature (above 0)."),
    seed: int = typer.Option(0, help="Best-of-N: the seed; each answer is sampled from it and its place."),
    grader: str | None = typer.Option(
        None,
        help="Best-of-N: what scores the answers, as grpo.grader takes it: a grader inline (a reward model: "
        "'{type: reward_model, model: RUN}') or in a JSON/YAML file, or reward functions as FILE.py:FUNCTION "
        "(several comma-separated, summed).",
    ),
    keep: str = typer.Option(
        "best",
        help="Best-of-N: best (the best answer a prompt, as chat rows for SFT) or pairs (the best against the "
        "worst, as DPO rows; prompts whose answers tie are left out).",
    ),
):
    """The teacher's answers to PROMPTS as chat data for SFT (sequence-level distillation) or for
    general replay (data.general_replay); resumable. With --samples and --grader: the best of N sampled
    answers (rejection sampling) or best-vs-worst DPO pairs from the model's own answers."""
    from .distill.commands import distill_generate as cmd

    raise typer.Exit(
        cmd(
            teacher,
            str(prompts),
            str(out),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            limit=limit,
            precision=precision,
            samples=samples,
            temperature=temperature,
            seed=seed,
            grader=grader,
            keep=keep,
        )
    )


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


def leave(code: int) -> NoReturn:
    """Exit with `code`. A process of a multi-process run leaves at once, without finalizing the
    interpreter. Finalizing can block on the communication threads of a process group whose other
    processes are gone or stuck (torchrun stops the others only once one has exited); and after a
    finished run, a gloo thread still freeing its last collective's tensors needs the GIL, which a
    finalizing interpreter refuses by ending the thread: the process aborts (SIGABRT) and torchrun
    reports the run failed. FSDP keeps the process group alive past `destroy_process_group`, so
    those threads are still there at exit."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _launcher_speaks_for_another_process() -> bool:
    """Whether this is a process of `tuneforge train --nproc N` other than its machine's local rank 0, which
    says what every process would (a refusal, an interruption) once for the machine."""
    return bool(os.environ.get(LAUNCHER_SHOWS_ERRORS)) and os.environ.get("LOCAL_RANK", "0") != "0"


def _show_error(message: str) -> None:
    """Print `message` as this command's error. A process of a multi-process run ignores SIGTERM from
    here on: torchrun stops the other processes as soon as one exits, and the signal would cut the
    message short with a traceback. Under `tuneforge train --nproc N` the message also goes to
    torchrun's error file for the launcher, and only local rank 0 prints it (`LAUNCHER_SHOWS_ERRORS`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(LAUNCHER_SHOWS_ERRORS) and error_file:
        try:
            Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
        except OSError:
            pass  # the launcher cannot show it: this process prints it itself
        else:
            if _launcher_speaks_for_another_process():
                return
    err.print(f"[bold red]error:[/] {plain(message)}", highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print a UserWarning (what tuneforge warns with, such as model.add_tokens naming a token the vocabulary
    holds) as `warning: TEXT`, as the CLI's own warnings read: Python's form would add the file, line and
    source of the code that raised it, which say nothing to a user. Other kinds keep Python's form."""
    if category is not UserWarning:
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    err.print(f"warning: {plain(message)}", highlight=False, soft_wrap=True)


def _click_exceptions(name: str = "ClickException") -> tuple[type[Exception], ...]:
    """Click's exception class `name` (its usage errors by default): that of the click package, and that of
    the copy of click that recent typer releases carry inside them (`typer._click`), which typer raises
    instead and which click's classes do not cover. A release without the class (click before 8.2 has no
    NoArgsIsHelpError) adds none."""
    import click.exceptions

    modules = [click.exceptions]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        modules.append(vendored)
    return tuple(found for module in modules if (found := getattr(module, name, None)) is not None)


def _dashed_override(error: Exception, argv: list[str]) -> str | None:
    """For an override written as an option (`--train.max_steps=3`, as Axolotl takes them), which click
    refuses as no such option: how tuneforge writes it. None for any other usage error."""
    name, ctx = getattr(error, "option_name", None) or "", getattr(error, "ctx", None)
    key = name.lstrip("-")
    takes_overrides = ctx is not None and any(p.name == "overrides" for p in ctx.command.params)
    if type(error).__name__ != "NoSuchOption" or not takes_overrides or "." not in key:
        return None
    at = next((i for i, a in enumerate(argv) if a == name or a.startswith(f"{name}=")), None)
    value = "VALUE"
    if at is not None and "=" in argv[at]:
        value = argv[at].split("=", 1)[1]
    elif at is not None and at + 1 < len(argv) and not argv[at + 1].startswith("-"):
        value = argv[at + 1]
    return f"{name}: no such option; an override is KEY=VALUE without dashes, after the config: write it {key}={value}"


_PATH_ERROR_ADVICE = {
    errno.EEXIST: "Something of that name is in the way (a file where a folder goes?): move it, or use another path.",
    errno.ENOTDIR: "A part of the path is a file, not a folder: choose another path.",
    errno.EISDIR: "It is a folder: give a file's path.",
    errno.ENOENT: "Check the path.",
    errno.EACCES: "This user may not use it: choose another path, or change its permissions.",
    errno.EPERM: "This user may not use it: choose another path, or change its permissions.",
    **REFUSED_WRITE_ADVICE,
    errno.EROFS: "It is on a read-only file system: write somewhere else.",
}


def main() -> None:
    """The `tuneforge` command. Called in a process that goes on afterwards (a test, a notebook, a script
    that runs several commands), it leaves that process's SIGINT and SIGTERM handlers and warning display as
    it found them: its own (`_terminate`, a worker's stop) would otherwise act on a later signal in whatever
    that process is doing then."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    show_warning = warnings.showwarning
    try:
        _run_command()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        warnings.showwarning = show_warning


def _run_command() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' own bar for each weight load: seconds long, and noise between our progress lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The CLI draws its own bars (rich); a library's tqdm bar (transformers reading a GGUF back to check an
    # export) would stand between them, with carriage returns in a log. tqdm reads this when imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Python's default for SIGTERM ends the process at once: no cleanup, no word. Commands with their own
    # handling (training checkpoints and stops; the servers shut down) put theirs in place while they run.
    signal.signal(signal.SIGTERM, _terminate)
    warnings.showwarning = _show_warning
    try:
        # Without standalone mode, click returns a command's exit code instead of exiting.
        code = app(args=_normalise_argv(sys.argv[1:]), prog_name="tuneforge", standalone_mode=False) or 0
    except TuneforgeError as e:
        _show_error(e.message)
        leave(e.exit_code)
    except OSError as e:
        if e.filename is None:  # not about a path the user can look at: a defect, with its traceback
            raise
        # A path that cannot be written or read (a file where a folder goes, no space, no permission) is
        # the machine's state, which the user fixes; its traceback would only hide the one line that matters.
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        _show_error(f"{where}: {e.strerror or e}. {_PATH_ERROR_ADVICE.get(e.errno, '')}".rstrip())
        leave(EXIT_RUN_FAILED)
    except typer.Exit as e:
        leave(e.exit_code)
    except (typer.Abort, KeyboardInterrupt, _Interrupted) as interrupted:
        if not _launcher_speaks_for_another_process():
            said = str(interrupted) if isinstance(interrupted, _Interrupted) and str(interrupted) else "interrupted"
            err.print(said, highlight=False, soft_wrap=True)
        leave(130)
    except _Terminated:
        err.print("terminated (SIGTERM)")
        leave(128 + signal.SIGTERM)
    except Exception as e:  # click usage errors
        if isinstance(e, _click_exceptions()):
            if dashed := _dashed_override(e, sys.argv[1:]):
                _show_error(dashed)
                leave(EXIT_BAD_INPUT)
            # A group given no command: its help is the message.
            if isinstance(e, _click_exceptions("NoArgsIsHelpError")):
                e.show()
                sys.exit(2)
            # The command's usage and where its help is, as click gives them, then the error in tuneforge's form.
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                lines = [ctx.get_usage()]
                if ctx.command.get_help_option(ctx) is not None:
                    lines.append(f"Try '{ctx.command_path} --help' for help.")
                err.print(plain("\n".join(lines) + "\n"), highlight=False, soft_wrap=True)
            _show_error(e.format_message())
            sys.exit(2)
        raise
    leave(code)
