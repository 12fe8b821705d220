"""`tuneforge data check FILE...`: check data files and show what training would see.

Prints a summary (rows, formats, errors by code, token lengths, share of trained tokens,
duplicates, truncation, rows shared between files), or the same report as JSON with `--json`.
`--show N` prints N rendered examples with trained tokens in bold green and masked ones dimmed.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..config import DEFAULT_MODEL, DataConfig
from ..console import new_console, plain
from ..errors import EXIT_BAD_INPUT, ConfigError, DataError, TuneforgeError, complaint, key_path, refuse_options
from ..wording import counted
from .dedup import content_hash
from .formats import read_conversations
from .prepare import check_data, cut_to_length, describe_files, split_documents, told_warnings
from .readers import not_a_file
from .render import render_examples, render_preference
from .schema import IGNORE_INDEX, Document, Example, Preference, Problem

TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"
# Around trained text where the output has no colour to show TRAINED_STYLE (piped, a log file).
TRAINED_MARKS = ("⟦", "⟧")
_LISTED_ERRORS = 20


def check_command(
    files: list[str],
    model: str | None = None,
    show: int = 0,
    json_out: bool = False,
    format: str = "auto",
    max_length: int = 1024,
    train_on: str = "assistant",
    truncation: str = "truncate",
) -> int:
    """Check data files with a model's tokenizer and chat template; 2 if any row has an error, else 0."""
    console = new_console(highlight=False, soft_wrap=True)
    try:
        options = {"format": format, "max_length": max_length, "train_on": train_on, "truncation": truncation}
        report, tokenizer = _files_report(files, model, options, progress=True)
    except TuneforgeError as e:  # a refused option: each complaint on a line of its own
        errors_console = new_console(highlight=False, soft_wrap=True, stderr=True)
        for line in e.message.splitlines():
            errors_console.print(f"[red]error:[/red] {plain(line)}")
        return e.exit_code
    if json_out:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_summary(console, report, model or DEFAULT_MODEL)
        if show:
            show_examples(
                console,
                files,
                tokenizer,
                show,
                max_length=max_length,
                format=format,
                train_on=train_on,
                split=truncation == "split",
            )
    return EXIT_BAD_INPUT if report["errors_total"] else 0


def check(
    config_or_data,
    overrides: str | list[str] = (),
    *,
    model: str | None = None,
    format: str | None = None,
    max_length: int | None = None,
    train_on: str | None = None,
    truncation: str | None = None,
    progress: bool = True,
) -> dict:
    """The report `tuneforge data check --json` prints, as a dict: rows, errors (`errors`, each with its file,
    line and code), lengths, trained share, duplicates, warnings. `config_or_data` is data files (a path or any
    iterable of them), checked with `model`'s tokenizer and chat template (default: the bundled model) and the
    options `tuneforge data check` takes; or a training config (a YAML file's path, a shipped recipe's name, a
    dict or a Config, with `overrides`), whose `data:` section is checked with its model's tokenizer as training
    renders it. A row's problem is in the report; an option or file that cannot be checked at all (a data file
    that is not there) raises a `TuneforgeError`."""
    given = {"model": model, "format": format, "max_length": max_length, "train_on": train_on, "truncation": truncation}
    if not _is_config(config_or_data):
        refuse_options("data files have no config to override", {"overrides": bool(overrides)}, " (or pass a config)")
        # One file, or a list, tuple, set, generator, ... of them; anything else is one odd value, refused below.
        one = isinstance(config_or_data, (str, Path, bytes, bytearray)) or not isinstance(config_or_data, Iterable)
        files = [config_or_data] if one else list(config_or_data)
        odd = [f for f in files if not isinstance(f, (str, Path))]
        if odd or not files:
            got = f"{odd[0]!r:.80}" if odd else f"an empty {type(config_or_data).__name__}"
            raise ConfigError(
                "files: give a data file's path or a list of them (or a training config: a YAML file's path, a "
                f"shipped recipe's name, a dict or a Config), got {got}.",
                code="bad_option",
            )
        options = {name: value for name, value in given.items() if name != "model" and value is not None}
        return _files_report([str(f) for f in files], model, options, progress=progress)[0]
    from ..config import load_config
    from ..models.loading import run_tokenizer

    refuse_options(
        "a config's data: section sets how its rows are read, with the tokenizer of its base_model",
        {name: value is not None for name, value in given.items()},
        " (the config sets them, or overrides such as data.max_length=512)",
    )
    cfg = load_config(config_or_data, overrides)
    cfg.check_data_files()
    tokenizer = run_tokenizer(cfg, cfg.base_model)
    data, _ = check_data(cfg.data, tokenizer, progress=progress, keep_examples=False)
    return data.report


def _is_config(value) -> bool:
    """Whether `check`'s `config_or_data` is a training config: a dict, a Config, a YAML file's path or a shipped
    recipe's name."""
    from ..config import Config
    from ..recipes import config_file

    return isinstance(value, (dict, Config)) or (
        isinstance(value, (str, Path)) and config_file(value).suffix.lower() in (".yaml", ".yml")
    )


def _refuse_configs(files: list[str]) -> None:
    """A YAML file among the data files, before any tokenizer loads: it is no data format, but a training config,
    whose data `tuneforge validate` checks."""
    for path in files:
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            raise ConfigError(
                f"{path} is a YAML file, which tuneforge data check does not read as data: a training config's data "
                f"is checked, every row with its base_model's tokenizer as training reads it, by `tuneforge validate "
                f"{path}`; give data check the data files themselves.",
                code="bad_option",
            )


def _files_report(files, model, options: dict, *, progress) -> tuple[dict, object]:
    """`check`'s report of data files read with `options` (format, max_length, train_on, truncation; one left out
    takes data:'s default), and the tokenizer it rendered them with."""
    _refuse_configs(files)
    try:
        cfg = DataConfig(train=list(files), validation=None, dedup="exact", on_error="skip", **options)
    except ValidationError as e:  # the config rejected an option: each complaint, named by its option
        complaints = []
        for error in e.errors():
            # A mistake in how options go together names its option (`config.KeysError`'s keys).
            loc = error["loc"] or getattr(error.get("ctx", {}).get("error"), "keys", ())[:1]
            option = "--" + "-".join(key_path(loc)).replace("_", "-") if loc else "files"
            option = "files" if option.startswith("--train") else option
            complaints.append(f"{option}: {complaint(error)}")
        raise ConfigError("\n".join(complaints), code="bad_option") from None
    if missing := [problem for f in files if (problem := not_a_file(f)) is not None]:
        raise DataError.listing(f"{counted(len(missing), 'data file')} cannot be checked", missing)
    from ..models import load_tokenizer  # here, not at the top: the models stage pulls in heavy imports

    tokenizer = load_tokenizer(model or DEFAULT_MODEL)
    _check_max_length(model or DEFAULT_MODEL, cfg.max_length)
    data, _ = check_data(cfg, tokenizer, progress=progress, keep_examples=False)  # the report is all it shows
    return data.report, tokenizer


def _check_max_length(spec: str, max_length: int) -> None:
    """--max-length within the model's context, as training requires of data.max_length."""
    from ..models import source_context_length

    window = source_context_length(spec)
    if window and max_length > window:
        raise TuneforgeError(
            f"--max-length {max_length} is more than the {window} positions {spec} was built for, and training "
            f"refuses such a data.max_length; check with --max-length {window} or less.",
            code="bad_option",
        )


def print_summary(console: Console, report: dict, model: str) -> None:
    counts, tokens = report["counts"], report["tokens"]
    files = ", ".join(f"{Path(f['path']).name} ({f['format'] or 'unknown format'})" for f in report["files"])
    console.print(f"[bold]Data check[/bold]: {plain(files)}; tokenizer and template of [bold]{plain(model)}[/bold]")

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    length = tokens["length"]
    rows = [
        (
            "rows",
            f"{counts['read']} read, {counts['valid']} valid, {counts['rejected']} rejected"
            + (f", {counted(counts['blank_lines'], 'blank line')} skipped" if counts["blank_lines"] else "")
            + (
                f"; {counts['unchecked']} not checked: the check stopped at a problem of the chat template or the "
                "setup, not of one row (the error below)"
                if counts.get("unchecked")
                else ""
            ),
        ),
        (
            "examples",
            f"{counts['train']}"
            + (f" (+{counts['validation']} validation)" if counts["validation"] else "")
            + (f": {split_documents(counts)}" if "train_documents" in counts else ""),
        ),
        *(
            [("rated (kto)", f"{counts['train_desirable']} desirable, {counts['train_undesirable']} undesirable")]
            if "train_desirable" in counts
            else []
        ),
        ("tokens per example", f"p50 {length['p50']}, p90 {length['p90']}, p99 {length['p99']}, max {length['max']}"),
        ("trained tokens", f"{tokens['trained']} of {tokens['total']} ({tokens['trained_share']:.1%})"),
        (
            "over max_length",
            f"{counted(tokens['over_max_length'], 'row')} over {tokens['max_length']} "
            f"({counts['truncated']} truncated, {counts['dropped_too_long']} dropped"
            + (f", {counts['split']} split into windows)" if counts.get("split") else ")"),
        ),
        *describe_files(report),
        ("system prompt", describe_system_prompt(report)),
        ("secrets, personal data", describe_pii(report["pii"])),
        ("duplicates", f"{counts['duplicates_exact']} exact removed"),
        (
            "validation leak",
            f"{counted(counts['shared_between_files'], 'row')} "
            f"{'appears' if counts['shared_between_files'] == 1 else 'appear'} in more than one file"
            + (" (a leak if one of them is for validation)" if counts["shared_between_files"] else ""),
        ),
    ]
    for name, value in rows:
        table.add_row(name, plain(value))
    console.print(table)

    for warning in told_warnings(report):
        text = f"[{warning['code']}] {warning['message']}"
        # A secret in a reply is what the model would learn to give away: said louder than the rest.
        style = "bold red" if warning["code"] == "secret_in_reply" else "yellow"
        console.print(f"[{style}]warning[/{style}] {plain(text)}")
    if not report["errors_total"]:
        console.print("[green]no errors[/green]: the data is ready to train on.")
        return
    by_code = Table("code", "count", "first at", title=counted(report["errors_total"], "error"), title_justify="left")
    first_by_code: dict[str, dict] = {}
    for error in report["errors"]:
        first_by_code.setdefault(error["code"], error)
    for code, n in counts["rejected_by_code"].items():
        first = first_by_code.get(code)
        by_code.add_row(code, str(n), plain(Problem(**first).where()) if first else "")
    console.print(by_code)
    for error in report["errors"][:_LISTED_ERRORS]:
        console.print(f"[red]error[/red] {plain(Problem(**error))}")
    if report["errors_total"] > _LISTED_ERRORS:
        console.print(f"... and {report['errors_total'] - _LISTED_ERRORS} more (use --json for all of them)")


def describe_pii(pii: dict) -> str:
    """What the report's `pii` says: how many of each kind, in replies and in prompts; one line."""
    if pii["mode"] == "off":
        return "not looked for (data.pii: off)"
    if not pii["kinds"]:
        return "none found"
    kinds = ", ".join(f"{n} {kind}" for kind, n in pii["kinds"].items())
    done = " (replaced by placeholders: data.pii: redact)" if pii["mode"] == "redact" else ""
    where = f"{pii['in_replies']} in replies, {pii['in_prompts']} in prompts"
    return f"{kinds} in {counted(pii['rows'], 'row')}: {where}{done}"


def describe_system_prompt(report: dict) -> str:
    """What the report's `system_prompt` means for the model a run trains: one line. It counts the rows kept, so
    where none is kept it tells nothing of the rows rejected (for a system message the template refuses)."""
    system_prompt, counts = report["system_prompt"], report["counts"]
    shared, distinct, without = system_prompt["shared"], system_prompt["distinct"], system_prompt["rows_without"]
    if not counts["train"] + counts["validation"]:
        return "none known: no row is kept (see the errors)"
    if shared is not None:
        shown = shared if len(shared) <= 80 else shared[:77] + "..."
        return f"every row has {shown!r}: saved with the model, for requests that bring none"
    if not distinct:
        return "no row has one (the chat template's own default, if it has one, applies)"
    mixed = f"{distinct} different ones" if distinct > 1 else "one in some rows"
    return (
        mixed + (f", {counted(without, 'row')} without one" if without else "") + ": none is saved with the model, so "
        "requests must bring their own"
    )


def show_examples(
    console: Console,
    files: list[str],
    tokenizer,
    count: int,
    *,
    max_length: int,
    format: str = "auto",
    train_on: str = "assistant",
    split: bool = False,
) -> None:
    """Print the first `count` good rows as the model will see them (cut to `max_length`, or with `split` a
    document in its windows, as training cuts them), trained tokens highlighted."""
    console.print(legend(console))
    rows = _rendered_rows(files, tokenizer, format, train_on, max_length, split)
    for path, line, examples in itertools.islice(rows, count):
        for which, example, trained in examples:
            cut = (
                f" (cut to max_length {max_length} of its {len(example)} tokens)"
                if len(example) > max_length and not which.startswith(" (window")
                else ""
            )
            console.print(f"[bold]--- {plain(f'{path}:{line}{which}{cut}')}[/]")
            console.print(highlight(trained, tokenizer, console))


def _rendered_rows(files, tokenizer, format: str, train_on: str, max_length: int, split: bool = False):
    """(file, line, [(which example, example, the example as training cuts it)]) for each row that renders
    and that training keeps: not a duplicate of an earlier row (`check_command` removes exact ones), and
    not refused as too_long (its cut leaves nothing to train)."""
    seen: set[int] = set()
    for path in files:
        for line, record in read_conversations(path, format):
            if isinstance(record, Problem) or (key := content_hash(record)) in seen:
                continue
            seen.add(key)
            try:
                if isinstance(record, Preference):
                    examples = list(zip((" (chosen)", " (rejected)"), render_preference(record, tokenizer)))
                elif getattr(record, "label", None) is not None:  # a rated reply (KTO): it alone trains
                    rating = "desirable" if record.label else "undesirable"
                    examples = [(f" ({rating})", e) for e in render_examples(record, tokenizer, "last_assistant")]
                else:
                    # A template that rewrites earlier turns trains each of them as an example of its own.
                    rendered = render_examples(record, tokenizer, train_on)
                    n = len(rendered)
                    examples = [
                        (f" (example {i} of {n}, one per turn)" if n > 1 else "", e) for i, e in enumerate(rendered, 1)
                    ]
            except TuneforgeError:
                continue
            if split and isinstance(record, Document):  # a document in its windows (data.truncation: split)
                windows = examples[0][1].windows(max_length)
                n = len(windows)
                yield path, line, [(f" (window {i} of {n})" if n > 1 else "", w, w) for i, w in enumerate(windows, 1)]
                continue
            pair = isinstance(record, Preference)
            if cut_to_length(tuple(e for _, e in examples), max_length, pair=pair) is None:
                continue
            cuts = [e.truncated(max_length) for _, e in examples]
            yield path, line, [(which, e, cut) for (which, e), cut in zip(examples, cuts) if cut.trained_tokens]


def legend(console: Console) -> Text:
    """What tells trained text from the rest in `highlight`'s output on `console`: its styles, and where the
    console shows no colour (piped, a log file) the marks around trained text."""
    trained = "trained" if console.color_system else f"{TRAINED_MARKS[0]}trained{TRAINED_MARKS[1]}"
    return Text.assemble("legend: ", (trained, TRAINED_STYLE), " / ", ("not trained", MASKED_STYLE))


def highlight(example: Example, tokenizer, console: Console | None = None) -> Text:
    """The example's text, each token styled by whether it is trained (a target of the loss); for a `console`
    that shows no colour, each run of trained text also sits between TRAINED_MARKS."""
    marked = console is not None and not console.color_system
    is_target = [False] + [label != IGNORE_INDEX for label in example.labels[:-1]]
    text, shown, end = Text(), "", 0
    # Each run of tokens is what decoding up to its end adds to decoding up to its start: that keeps
    # multi-byte characters whole, and a space SentencePiece writes as part of a run's first token.
    for trained, run in itertools.groupby(is_target):
        end += len(list(run))
        decoded = tokenizer.decode(example.input_ids[:end])
        piece = decoded[len(shown) :]
        if trained and marked:
            piece = f"{TRAINED_MARKS[0]}{piece}{TRAINED_MARKS[1]}"
        text.append(piece, style=TRAINED_STYLE if trained else MASKED_STYLE)
        shown = decoded
    return text
