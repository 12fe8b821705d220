"""`tuneforge data from-completions`: stored chat completions as chat training data.

What a served model answered (chat requests made with `store: true`) becomes rows a fine-tune
trains on: the prompt's messages, then the reply as the last assistant message. So a big model's
answers train a small one, and `tuneforge eval SMALL OUT` scores the small one on the same prompts
with the big one's replies as references. Completions are picked by model, metadata and
(optionally) the API key that made them, oldest first. Each row goes through the checks of a chat
training file's rows (`data.formats.check_row`); a row that fails them (an empty reply), or whose
prompt holds a message the chat request checks refuse, is left out and reported, and so is a reply
cut at its length limit (`finish_reason: length`) unless kept. The file is written whole or not at
all (`fsio.atomic_file`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import inspect

from ..console import new_console, plain
from ..data import Problem
from ..data.formats import check_row
from ..database import connect, existing_store, opening
from ..errors import ConfigError, DataError, complaint, key_path
from ..fsio import atomic_file
from ..web import owner_of
from ..wording import counted, did_you_mean
from .bodies import training_messages
from .command import parse_pairs
from .completion_store import CompletionStore, StoredCompletion, default_store


@dataclass(frozen=True)
class TrainingRows:
    out: Path
    written: int
    truncated: int  # replies cut at their length limit, left out
    problems: list[Problem]  # one a row left out for failing the data checks


def training_row(completion: StoredCompletion) -> dict:
    # The prompt trains as the chat template saw it when it was answered: a developer message as the system
    # one, a fine-tune's recorded system prompt where the prompt brought none (as `models.system_prompt` adds it),
    # and the tools it was given. The reply keeps its reasoning_content (None
    # where it opened none: left out) and its tool_calls with their null content, as OpenAI's chat rows hold a call.
    message = completion.reply["message"]
    reply = {key: value for key, value in message.items() if value is not None or key == "content"}
    prompt = training_messages(completion.messages)
    if completion.system_prompt is not None and (not prompt or prompt[0]["role"] != "system"):
        prompt = [{"role": "system", "content": completion.system_prompt}, *prompt]
    row = {"messages": [*prompt, reply]}
    return {**row, "tools": completion.tools} if completion.tools else row


def from_completions(
    store: str,
    out: str | Path,
    *,
    model: str | None = None,
    metadata: dict[str, str] | None = None,
    api_key: str | None = None,
    keep_truncated: bool = False,
) -> TrainingRows:
    """Write the completions in `store` (a path or database URL) that match as chat JSONL at `out`."""
    if Path(out).is_dir():
        raise ConfigError(
            f"--out {out} is a folder; give the file to write, e.g. {Path(out) / 'completions.jsonl'}.",
            code="bad_option",
        )
    where = (
        f"`tuneforge serve` keeps stored completions in {default_store()} unless started with --store; "
        "`tuneforge api` in its --db (by default $TUNEFORGE_HOME/jobs/jobs.db)."
    )
    url = existing_store(store, where)
    # Read only where the completions' table is: opening a store creates its tables, which another
    # database (a typo'd path to some other SQLite file) must not get.
    with opening(url, "--store"):
        engine = connect(url)
        if not inspect(engine).has_table(StoredCompletion.__tablename__):
            raise ConfigError(
                f"--store {store}: not a completion store (it holds no {StoredCompletion.__tablename__} table). "
                + where,
                code="store_not_found",
            )
        completions = CompletionStore(engine)
    owner = owner_of(api_key) if api_key is not None else None
    selected = completions.all_matching(model, metadata or {}, owner)
    if not selected:
        unmatched = _unmatched(completions.models_and_metadata(owner), model, metadata or {}, by_key=owner is not None)
        raise DataError(
            f"No stored completions in {store} match {_describe(model, metadata, api_key)}{unmatched}. Check the "
            "filters (GET /v1/chat/completions on the server lists what is stored), or store some: chat requests "
            'with "store": true, and the "metadata" to pick them by.',
            code="empty_selection",
        )
    kept, truncated, problems = [], 0, []
    for completion in selected:
        if completion.reply["finish_reason"] == "length" and not keep_truncated:
            truncated += 1
            continue
        try:
            row = training_row(completion)
        except ValidationError as err:  # a stored message the request checks refuse: its row is left out, named
            problems.append(_refused_message(completion.id, err))
            continue
        record, row_problems = check_row(row, "chat", file=completion.id)
        if record is None:
            problems.append(next(problem for problem in row_problems if problem.is_error))
        else:
            kept.append(row)
    if not kept:
        reasons = [_cut(truncated)] if truncated else []
        reasons += [str(problem) for problem in problems[: DataError.SHOWN_PROBLEMS]]
        raise DataError(
            f"None of the {len(selected)} matching completions makes a training row:\n" + "\n".join(reasons),
            code="empty_selection",
            problems=problems,
        )
    with atomic_file(out) as f:
        for row in kept:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return TrainingRows(Path(out), len(kept), truncated, problems)


def _refused_message(completion_id: str, err: ValidationError) -> Problem:
    """The first of a stored prompt's refusals (`training_messages`), located as a training row's problems are."""
    first = err.errors()[0]
    index, *field = key_path(first["loc"])
    return Problem(
        "invalid_message", complaint(first), file=completion_id, field=".".join([f"messages[{index}]", *field])
    )


def _cut(count: int) -> str:
    """The replies cut at their length limit, counted, and how to keep them."""
    its, them = ("its", "it") if count == 1 else ("their", "them")
    return f"{counted(count, 'reply', 'replies')} cut at {its} length limit (--keep-truncated keeps {them})"


def _unmatched(
    stored: list[tuple[str, dict | None]], model: str | None, metadata: dict[str, str], *, by_key: bool
) -> str:
    """What of the filters no stored completion (`stored`: their models and metadata; `by_key`: the --api-key's
    only; with `model`, that model's) has, each with the nearest one that is stored (a typo'd key or value):
    ": ..." after the filters, or "" where each matches some."""
    none = "no completion stored with the --api-key" if by_key else "no stored completion"
    models = {stored_model for stored_model, _ in stored}
    if model is not None and model not in models:
        return f": {none} is of the model {model!r}{did_you_mean(model, models)}"
    of_model = f" of the model {model!r}" if model is not None else ""
    held = [stored_metadata or {} for stored_model, stored_metadata in stored if model in (None, stored_model)]
    said = []
    for key, value in metadata.items():
        values = {pairs[key] for pairs in held if key in pairs}
        if not values:
            keys = {stored_key for pairs in held for stored_key in pairs}
            said.append(f"{none}{of_model} holds the metadata key {key!r}{did_you_mean(key, keys)}")
        elif value not in values:
            said.append(f"none{of_model} has {key}={value}{did_you_mean(value, values)}")
    return ": " + "; ".join(said) if said else ""


def _describe(model: str | None, metadata: dict[str, str] | None, api_key: str | None) -> str:
    filters = [f"--model {model}"] if model else []
    filters += [f"--metadata {key}={value}" for key, value in (metadata or {}).items()]
    filters += ["--api-key (given)"] if api_key is not None else []
    return " ".join(filters) if filters else "(no filter)"


def from_completions_command(
    store: str | None,
    out: str,
    *,
    model: str | None,
    metadata_specs: Sequence[str],
    api_key: str | None,
    keep_truncated: bool,
) -> int:
    metadata = parse_pairs(metadata_specs, "--metadata", "KEY=VALUE", "team=support")
    result = from_completions(
        store or default_store(),
        out,
        model=model,
        metadata=metadata,
        api_key=api_key,
        keep_truncated=keep_truncated,
    )
    console = new_console(highlight=False, soft_wrap=True)
    console.print(f"{counted(result.written, 'chat row')} in {plain(result.out)}")
    if result.truncated:
        console.print(f"left out {_cut(result.truncated)}")
    if result.problems:
        console.print(f"left out {counted(len(result.problems), 'completion')} the data checks refuse:")
        for problem in result.problems[: DataError.SHOWN_PROBLEMS]:
            console.print(f"  {plain(problem)}")
    console.print(
        f"Train on it (data.train: {plain(result.out)}), or score a model on its prompts against these replies: "
        f"tuneforge eval MODEL {plain(result.out)}"
    )
    return 0
