"""The input formats we accept, how each is recognised, checked, and normalised to our records.

Every format becomes a `Conversation`, a `Document` or a `Preference` (see `schema.py`). Each row
is checked completely: a bad row yields every `Problem` it has, each with a code (OpenAI's
data-preparation codes where one fits), the file, the line, the field and what to do.

Formats (the names `data.format` takes):
  chat               {"messages": [{"role", "content", "weight"?, "name"?, "tool_calls"?, "reasoning_content"?,
                     ...}], "system"?, "tools"?} ("reasoning", as some exports name it, is read as "reasoning_content")
  alpaca             {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system"|"tool", "value"}], "system"?, "tools"?}
                     (LLaMA-Factory writes "tools" as JSON text of function definitions)
  prompt_completion  {"prompt", "completion"}: strings, or lists of chat messages
  text               {"text"}: trained on in full
  preference         OpenAI DPO {"input": {"messages"}, "preferred_output": [msg], "non_preferred_output": [msg]}
                     or {"prompt"?, "chosen", "rejected"}: strings, or lists of chat messages
                     (whole conversations that repeat the prompt, as UltraFeedback's, read as their last reply),
                     or Anthropic HH's {"prompt"?, "chosen", "rejected"} transcripts ("\n\nHuman: ...\n\nAssistant:"),
                     or alpaca's prompt {"instruction", "input"?, "system"?, "history"?, "chosen", "rejected"},
                     or ShareGPT's {"conversations", "system"?, "chosen": turn, "rejected": turn}
  kto                TRL's unpaired preference {"prompt", "completion", "label": true|false} (prompt and
                     completion as text, or lists of chat messages: the completion one assistant message),
                     or {"messages": [..., the rated assistant reply], "label", "tools"?}; the label rates
                     the last reply alone (desirable or undesirable), which is all a row trains
A row's images may sit in an `images` (or `image`) field beside its text, as TRL's and LLaMA-Factory's vision
rows hold them, each shown where its placeholder is: they become image parts of their user messages
(`_place_images`).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import unreadable_json
from ..wording import nearest, suggestion
from .images import column_image, column_image_path, read_image
from .readers import open_rows
from .schema import ROLES, Conversation, Document, Image, Message, Preference, Problem, Record, RowField

FORMATS = ("chat", "alpaca", "sharegpt", "prompt_completion", "text", "preference", "kto")

_MESSAGE_KEYS = ("role", "content", "weight", "name", "tool_calls", "tool_call_id", "reasoning_content", "reasoning")
_SHAREGPT_KEYS = ("from", "value", "weight")
# Roles and keys of function calling as OpenAI's legacy `functions` and LLaMA-Factory's ShareGPT write it.
_REPLY_ROLES = ("bot", "model", "ai")  # the replying side in other exports: chatbot logs, Gemini's 'model'
_FUNCTION_CALLING = ("function", "function_call")
_TOOLS_FORMAT = (
    "tool use is read in OpenAI's tools format: the call as an assistant message's 'tool_calls', "
    "its result as a 'tool' message"
)
# Each message key of one shape (OpenAI's role/content) as the other (ShareGPT's from/value) names it.
_OTHER_SHAPE_KEYS = {"role": "from", "content": "value", "from": "role", "value": "content"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}
_SHAPES = (
    'chat {"messages": [{"role": ..., "content": ...}]}; alpaca {"instruction", "output"}; '
    'sharegpt {"conversations": [{"from", "value"}]}; {"prompt", "completion"}; {"text"}; '
    'preference {"prompt", "chosen", "rejected"} or OpenAI DPO {"input", "preferred_output", "non_preferred_output"}; '
    'kto {"prompt", "completion", "label"} or {"messages", "label"}'
)
# Columns a CSV or Parquet file must have, per format (preference: either set).
_REQUIRED_COLUMNS = {
    "chat": [("messages",)],
    "alpaca": [("instruction", "output")],
    "sharegpt": [("conversations",)],
    "prompt_completion": [("prompt", "completion")],
    "text": [("text",)],
    "preference": [("chosen", "rejected"), ("input", "preferred_output", "non_preferred_output")],
    "kto": [("prompt", "completion", "label"), ("messages", "label")],
}
# Fields that hold JSON structures; in a CSV cell they are JSON text.
_STRUCTURED_FIELDS = ("messages", "tools", "conversations", "preferred_output", "non_preferred_output", "history")
# OpenAI's preference rows nest their prompt in `input` ({"messages": [...]}), a name alpaca gives to text.
_STRUCTURED_PREFERENCE_FIELDS = ("input",)
# Fields that hold text or a list of messages (TRL's prompt/chosen/rejected, prompt/completion): in a
# CSV cell, a JSON list of objects is that list of messages, anything else is the text.
_TEXT_OR_MESSAGES_FIELDS = ("prompt", "completion", "chosen", "rejected")
# Anthropic HH's transcripts ("\n\nHuman: ...\n\nAssistant: ..."): each marker opens a turn.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
# Role markers that other formats' templates write as text, found in a reply: its own speaker label at
# its start ("Assistant: ..."), Alpaca's section headers ("### Response:") anywhere, or a next turn's
# label at the start of a later line ("\nUser: ..."). A conversion that leaves them in teaches the model
# to write them.
_ROLE_MARKER = re.compile(
    r"\A\s*(?i:assistant|gpt|chatgpt|bot)[ \t]*:"
    r"|^[ \t]*#{2,}[ \t]*(?i:instruction|input|response)\b[ \t]*:?"
    r"|\n[ \t]*(?:User|USER|Human|HUMAN|Assistant|ASSISTANT)[ \t]*:",
    re.MULTILINE,
)


def detect_format(keys: Iterable[str]) -> str | None:
    """The format a row (or a table header) is in, judged by its keys; None if it fits none."""
    keys = set(keys)
    if "label" in keys and keys & {"messages", "completion"}:  # a rated reply: TRL's KTO data
        return "kto"
    if "messages" in keys:
        return "chat"
    if keys & {"preferred_output", "non_preferred_output", "chosen", "rejected"}:
        return "preference"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if keys & {"prompt", "completion"}:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def file_format(path: str | Path, format: str = "auto") -> str | None:
    """The format of a file: the one given, else that of its header or first row (None if unknown)."""
    if format != "auto":
        return format
    rows = open_rows(path)
    if rows.columns is not None:
        return detect_format(rows.columns)
    return next((detect_format(row) for _, row in rows if isinstance(row, dict)), None)


def read_conversations(path: str | Path, format: str = "auto") -> Iterator[tuple[int | None, Record | Problem]]:
    """Stream one file's rows as normalised records, or as the problems that keep them out.

    Yields `(line, record)` for each good row and `(line, problem)` for each problem; a bad row may
    yield several problems on the same line, and a good row may follow its warnings. The format is
    detected per file from the first row (or the header) unless `format` names one; a row in another
    format than the file's first row is a `mixed_formats` error. `line` is None for problems with
    the whole file.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    rows = open_rows(path)
    fixed = None if format == "auto" else format
    if rows.columns is not None:
        fixed = fixed or detect_format(rows.columns)
        header_problem = _check_columns(rows.path, rows.columns, fixed)
        if header_problem:
            yield 1, _with_format_hint(header_problem, format, detect_format(rows.columns))
            return
    first: tuple[str, int] | None = None
    for line, row in rows:
        if isinstance(row, Problem):
            yield line, row
            continue
        check = _RowCheck(rows.path, line)
        if not isinstance(row, dict):
            check.error(
                "data_type", None, f"each row must be a JSON object, got {_json_type(row)}. Accepted shapes: {_SHAPES}."
            )
            yield from ((line, p) for p in check.problems)
            continue
        row_format = fixed or detect_format(row)
        if row_format is None:
            check.error(
                "unknown_format",
                None,
                f"no known format has the keys {sorted(row)}{_closest_key(row)}. Accepted shapes: {_SHAPES}.",
            )
        elif first is None:
            first = (row_format, line)
        elif row_format != first[0]:
            check.error(
                "mixed_formats",
                None,
                f"this row is {row_format} data but the file's first row (line {first[1]}) is {first[0]}. "
                "Keep one format per file, or set data.format to read every row as one format.",
            )
        if check.problems:
            yield from ((line, p) for p in check.problems)
            continue
        if rows.kind == "csv":
            row = check.decode_json_cells(row, row_format)
        if not check.problems:
            row = _place_images(row, check, Path(rows.path).parent)
        record = _NORMALISERS[row_format](row, check) if not check.problems else None
        if check.errors and format != "auto":
            first_error = next(i for i, p in enumerate(check.problems) if p.is_error)
            check.problems[first_error] = _with_format_hint(check.problems[first_error], format, detect_format(row))
        yield from ((line, p) for p in check.problems)
        if record is not None and not check.errors:
            yield line, record


IMAGE_COLUMNS = ("images", "image")
"""Where TRL's, LLaMA-Factory's and Hugging Face's vision data sets keep a row's images, beside its text."""

# `IMAGE_COLUMNS` as a JSON file's bytes hold a key (or TRL's {"type": "image"}); not `"image_url"`.
_IMAGE_COLUMN_NAME = re.compile(rb'"images?"')

IMAGE_PLACEHOLDER = "<image>"
"""LLaMA-Factory's marker of where an image of the row's `images` is shown, in a user message's text."""

# The fields whose placeholders take a row's images in turn (alpaca's in the order its messages take: history,
# instruction, input); each reply of a pair (`chosen`, `rejected`) takes them on from where those left off, and a
# pair's whole conversation (TRL's and UltraFeedback's pairs), which repeats the prompt, takes them all from the
# first.
_SHARED_IMAGE_FIELDS = ("messages", "conversations", "history", "instruction", "input", "prompt", "completion")
_REPLY_IMAGE_FIELDS = ("chosen", "rejected")
_PLACEHOLDERS = (
    f'an {IMAGE_PLACEHOLDER} in a user message\'s text (LLaMA-Factory\'s layout) or a {{"type": "image"}} content part '
    "(TRL's)"
)


def image_files(path: str | Path) -> list[Path]:
    """The image files a data file's rows name in their `images` (or `image`) fields, which the data cache's
    key hashes beside the data file."""
    rows = open_rows(path)
    if not _may_name_images(rows):
        rows.close()
        return []
    folder, files = Path(rows.path).parent, []
    with rows:
        for _, row in rows:
            for key in IMAGE_COLUMNS if isinstance(row, dict) else ():
                files += [f for entry in _image_entries(row.get(key)) if (f := column_image_path(entry, folder))]
    return list(dict.fromkeys(files))  # each file once, however many rows show it


def _may_name_images(rows) -> bool:
    """Whether a file's rows may have an `images` field: a table's header names it, a JSON file's bytes hold
    the name, found without parsing the rows (a data set without that field, text or OpenAI's rows with their
    images as data URLs, costs its cache key no second read of them)."""
    if rows.columns is not None:
        return bool(set(IMAGE_COLUMNS) & set(rows.columns))
    if rows.kind not in ("json", "jsonl"):
        return False
    if str(rows.path).endswith(".gz"):
        return True
    if Path(rows.path).stat().st_size == 0:
        return False
    with open(rows.path, "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _IMAGE_COLUMN_NAME.search(data) is not None


def _image_entries(value: Any) -> list:
    """The entries of an `images` field: a list, or one image; a CSV cell holds the list as JSON text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
    if value is None or value == "":
        return []
    return value if isinstance(value, list) else [value]


def _place_images(row: dict, check: _RowCheck, folder: Path) -> dict:
    """The row with the images of its `images` (or `image`) field, read from the data file's `folder`, in place
    of their placeholders (`_PLACEHOLDERS`) in order: each an image part of its user message, as OpenAI's
    layout holds it. An empty field counts too: its row's placeholders show no image."""
    given = [key for key in IMAGE_COLUMNS if _image_entries(row.get(key))]
    if len(given) > 1:
        check.error("image_column", "image", "the row has both 'images' and 'image'; keep its images in one of them.")
        return row
    key = given[0] if given else next((key for key in IMAGE_COLUMNS if key in row), None)
    if key is None:
        return row
    images = []
    for i, entry in enumerate(_image_entries(row[key])):
        at = f"{key}[{i}]" if isinstance(row[key], list) else key
        image = column_image(entry, folder)
        if isinstance(image, str):
            check.error("bad_image", at, image)
        else:
            images.append(replace(image, field=at))
    if check.errors:
        return row
    placed, shared = dict(row), 0
    for field in _SHARED_IMAGE_FIELDS:
        if field in row:
            placed[field], shared = _place_in(row[field], field, images, shared, check)
    shown, whole = [], False
    for field in _REPLY_IMAGE_FIELDS:
        if field in row:
            conversation = isinstance(row[field], list) and len(row[field]) > 1  # as `_trl_preference` reads it
            placed[field], end = _place_in(row[field], field, images, 0 if conversation else shared, check)
            shown.append((f"'{field}' shows" if conversation else f"its prompt and '{field}' show", end))
            whole |= conversation
    if not shown or (whole and set(_SHARED_IMAGE_FIELDS) & row.keys()):
        shown.insert(0, ("its prompt shows" if shown else "its messages show", shared))
    wrong = next(((said, end) for said, end in shown if end != len(images)), None)
    if wrong is not None:
        check.error(
            "image_count",
            key,
            f"'{key}' holds {len(images)} image(s) but {wrong[0]} {wrong[1]}: each image is shown where its "
            f"placeholder is, {_PLACEHOLDERS}, the images in order. Put one placeholder where each image is shown.",
        )
    return placed


def _place_in(value: Any, field: str, images: list[Image], start: int, check: _RowCheck) -> tuple[Any, int]:
    """A field's messages (a list, one ShareGPT turn, or a prompt's text) with the `images` from `start` on in
    place of their placeholders, and where the next placeholder's image is; a field of another type comes back
    as it is, for the normaliser to refuse."""
    if isinstance(value, str) and field in ("prompt", "completion", *_REPLY_IMAGE_FIELDS):
        # A prompt's text is one user message (its parts, which `_turns` reads); a completion's or a reply's, an
        # assistant's.
        parts, end = _place_in_content(value, images, start)
        if end > start and field != "prompt":
            check.error(
                "unsupported_content",
                field,
                f"'{field}' is a reply, and images are shown in user messages only; move the placeholder to the "
                "prompt.",
            )
        return (parts if end > start else value), end
    if isinstance(value, str) and field in ("instruction", "input"):  # alpaca's user message, in two fields
        parts, end = _place_in_content(value, images, start)
        return (parts if end > start else value), end
    if field == "history":
        return _place_in_history(value, images, start, check)
    if not isinstance(value, list | dict):
        return value, start
    turns = value if isinstance(value, list) else [value]
    placed, end = [], start
    for i, turn in enumerate(turns):
        at = f"{field}[{i}]" if isinstance(value, list) else field
        content_key = "value" if isinstance(turn, dict) and "from" in turn else "content"
        if not isinstance(turn, dict) or content_key not in turn:
            placed.append(turn)  # the normaliser says what is wrong with it
            continue
        role = _SHAREGPT_ROLES.get(str(turn["from"])) if content_key == "value" else turn.get("role")
        content, next_image = _place_in_content(turn[content_key], images, end)
        if next_image > end and role != "user":
            check.error(
                "unsupported_content",
                f"{at}.{content_key}",
                f"an image placeholder is in {_a_message_of(role)}, and images are shown in user messages "
                "only; move it to the user message that shows the image.",
            )
        placed.append({**turn, content_key: content})
        end = next_image
    return (placed if isinstance(value, list) else placed[0]), end


def _a_message_of(role: Any) -> str:
    """A message of `role` as a sentence names it: an assistant message, a tool message, a roleless message."""
    named = f"{role} message" if role else "roleless message"
    return f"{'an' if named[0] in 'aeiou' else 'a'} {named}"


def _place_in_history(value: Any, images: list[Image], start: int, check: _RowCheck) -> tuple[Any, int]:
    """An alpaca row's `history` ([[user, assistant], ...]) with the `images` from `start` on in place of its user
    turns' placeholders, and where the next placeholder's image is; a malformed turn comes back as it is, for the
    normaliser to refuse."""
    if not isinstance(value, list):
        return value, start
    placed, end = [], start
    for i, turn in enumerate(value):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            placed.append(turn)
            continue
        user, end = _place_in_content(turn[0], images, end)
        reply, next_image = _place_in_content(turn[1], images, end)
        if next_image > end:
            check.error(
                "unsupported_content",
                f"history[{i}][1]",
                "an image placeholder is in an assistant turn, and images are shown in user messages only; move it "
                "to the user turn that shows the image.",
            )
        placed.append([user, reply])
        end = next_image
    return placed, end


def _place_in_content(content: Any, images: list[Image], start: int) -> tuple[Any, int]:
    """A message's content with `images` from `start` on in place of its placeholders (as content parts), and
    where the next placeholder's image is; content without placeholders comes back as it is."""
    end = start
    if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
        parts = []
        for k, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
            if k:
                parts.append(images[end] if end < len(images) else {"type": "image"})
                end += 1
            if text:
                parts.append({"type": "text", "text": text})
        return parts, end
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image" for p in content):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                part = images[end] if end < len(images) else part
                end += 1
            parts.append(part)
        return parts, end
    return content, end


def json_rows(path: str | Path, format: str = "auto") -> Iterator[tuple[int | None, dict | Problem]]:
    """Stream one file's rows as the JSON objects they are, for writing to a JSONL file that reads back as
    the same rows: a CSV row with the JSON structures its cells hold (message lists and such) parsed, as
    `read_conversations` parses them; a JSONL, JSON or Parquet row as it is. A row that cannot be read
    comes as its `Problem` (not a dict)."""
    rows = open_rows(path)
    fixed = None if format == "auto" else format
    for line, row in rows:
        if rows.kind == "csv" and isinstance(row, dict):
            row = _RowCheck(rows.path, line).decode_json_cells(row, fixed or detect_format(row))
        yield line, row


def record_row(record: Record) -> dict:
    """A record as the row of its canonical format, which `read_conversations` reads back as the same
    record: a `Conversation` as OpenAI chat (`messages`, `tools`), a `Preference` as OpenAI's preference
    format (`input` with `messages` and `tools`, `preferred_output`, `non_preferred_output`), a `Document`
    as `{"text"}`. Rows of files in different formats written to one file this way read as one format."""
    if isinstance(record, Document):
        return {"text": record.text}
    if isinstance(record, Preference):
        source = {"messages": [_message_row(m) for m in record.prompt]}
        if record.tools is not None:
            source["tools"] = record.tools
        return {
            "input": source,
            "preferred_output": [_message_row(record.chosen)],
            "non_preferred_output": [_message_row(record.rejected)],
        }
    row = {"messages": [_message_row(m) for m in record.messages]}
    if record.tools is not None:
        row["tools"] = record.tools
    if record.label is not None:  # a KTO row: OpenAI chat with its rating
        row["label"] = record.label
    return row


def _message_row(message: Message) -> dict:
    """A message as OpenAI's chat data holds it: its tool calls as read (arguments as JSON text, where so)."""
    row = {"role": message.role, "content": message.content}
    if message.parts is not None:
        row["content"] = [
            {"type": "image_url", "image_url": {"url": p.url}} if isinstance(p, Image) else {"type": "text", "text": p}
            for p in message.parts
        ]
    for key in ("weight", "name", "tool_calls", "tool_call_id", "reasoning_content"):
        value = getattr(message, key)
        if value is not None:
            row[key] = value
    return row


def normalise_messages(
    messages: Any, *, file: str = "", line: int | None = None
) -> tuple[list[Message] | None, list[Problem]]:
    """Check a list of OpenAI-style message dicts (as used outside files, e.g. by evaluation)."""
    check = _RowCheck(file, line)
    return check.messages(messages, "messages"), check.problems


def check_row(
    row: dict, format: str, *, file: str = "", line: int | None = None
) -> tuple[Record | None, list[Problem]]:
    """One row in `format` checked as a file's row is (rows made in memory, e.g. before they are written to
    a training file); the record is None when the row has an error."""
    check = _RowCheck(file, line)
    record = _NORMALISERS[format](row, check)
    return (None if check.errors else record), check.problems


def prompt_conversation(
    row: dict, *, file: str = "", line: int | None = None, csv: bool = False, images: bool = False
) -> tuple[Conversation | None, list[Problem]]:
    """The messages and tools of an unlabelled row, checked as a file's row is: a chat row's `messages`, or a
    prompt/completion row's `prompt` (text, or a list of messages), its completion ignored, and its `tools`
    (OpenAI's format, which the prompt is rendered with as the server renders a request's). A `csv`
    row's cells are text: the ones that hold JSON structures are parsed first. The images of an `images` field
    take their placeholders' places, read from `file`'s folder, as a training row's (`_place_images`). Such a
    row is answered by generation; a teacher reads text prompts only, so images are refused unless `images`
    (GRPO and evaluation, which generate with them)."""
    check = _RowCheck(file, line)
    if csv:
        row = check.decode_json_cells(row)
    if not check.errors:
        row = _place_images(row, check, Path(file).parent)
    if check.errors:
        return None, check.problems
    key = "messages" if "messages" in row else "prompt"
    messages = _row_messages(check, row, key) if key == "messages" else _turns(check, row, key, "user")
    fields = _turn_fields(row, key, len(messages or ()))
    shows = next((i for i, m in enumerate(messages or ()) if m.images), None)
    if shows is not None and not images:
        check.error(
            "images_in_prompt",
            fields[shows].of("content"),
            "the prompt holds images, and the teacher answers text prompts only (its answers would be made "
            "without the images). Train rows with images with method: lora, dora, full, dpo or grpo; remove them "
            "here.",
        )
    tools = check.tools(row)
    return (None if check.errors else Conversation(messages, tools=tools, fields=fields)), check.problems


def tool_definitions(
    value: Any, *, file: str = "", known_keys_only: bool = False
) -> tuple[list[dict] | None, list[Problem]]:
    """A list of tool definitions (a file of them, as `tuneforge chat --tools` reads it) checked as a row's
    `tools` are, in the order of keys the server gives a request's tools to the chat template; None (an empty
    list too: no tools) and the problems, each naming its field (`tools[1].function.name`). `known_keys_only`
    refuses a key OpenAI's tool definitions do not have (`params` for `parameters`), as the server does."""
    check = _RowCheck(file, None)
    tools = check.tools({"tools": value}, known_keys_only=known_keys_only)
    return (None if check.errors else tools), check.problems


def _with_format_hint(problem: Problem, given: str, detected: str | None) -> Problem:
    """A problem of a row read in the format the config gives, where the row itself is of another
    format: the cause is the format setting (which applies to every file), not the row."""
    if given == "auto" or detected is None or detected == given:
        return problem
    return replace(
        problem,
        message=f"{problem.message} This file's rows are {detected} data, but the format is set to {given} "
        f"(data.format, or --format), which reads every file as {given}: set it to auto to read each file "
        "in its own format.",
    )


def _check_columns(path: str, columns: list[str], fmt: str | None) -> Problem | None:
    if fmt is None:
        return Problem(
            "unknown_format",
            f"no known format has the columns {columns}. Accepted shapes: {_SHAPES}.",
            file=path,
            line=1,
        )
    options = _REQUIRED_COLUMNS[fmt]
    if any(all(c in columns for c in needed) for needed in options):
        return None
    needed = min(options, key=lambda cols: sum(c not in columns for c in cols))
    missing = [c for c in needed if c not in columns]
    return Problem(
        "missing_column",
        f"the header has columns {columns} but {fmt} data needs {list(needed)}. "
        f"Add the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} (or rename one that holds it).",
        file=path,
        line=1,
        field=missing[0],
    )


def _absent(row: dict, key: str) -> str:
    """How a required field without a value is absent: written as JSON null (an export's empty cell) or not at all."""
    return "is null" if key in row else "is missing"


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _closest_key(keys: Iterable[str], known: Iterable[str] | None = None) -> str:
    known = list(
        known
        or (
            "messages",
            "conversations",
            "instruction",
            "output",
            "prompt",
            "completion",
            "text",
            "chosen",
            "rejected",
            "preferred_output",
        )
    )
    # A looser cutoff than other names': a format's keys are few, and OpenAI's are long compounds that a row may
    # shorten (`preferred` for `preferred_output`).
    for key in keys:
        if (close := nearest(str(key), known, cutoff=0.7)) is not None:
            return suggestion(close, instead_of=str(key))
    return ""


def _message_key_hint(key: str, field: str, sharegpt: bool, allowed: tuple[str, ...]) -> str:
    """What to do about a message key: the nearest allowed key, for a key of the other message shape
    (role/content in ShareGPT turns, from/value in OpenAI messages) its name here, and for a legacy
    function call the tools format."""
    if key in _FUNCTION_CALLING:
        return f" ({_TOOLS_FORMAT})"
    ours = _OTHER_SHAPE_KEYS.get(key)
    if ours not in allowed:
        return _closest_key([key], allowed)
    if sharegpt:
        shape, other = 'ShareGPT turns take "from" and "value"', "messages"
    else:
        shape, other = 'OpenAI messages take "role" and "content"', "conversations"
    moved = f", or rename the row's '{field}' to '{other}'" if field in ("messages", "conversations") else ""
    return f" ({shape}: rename '{key}' to '{ours}'{moved})"


class _RowCheck:
    """Checks the fields of one row, collecting every problem instead of stopping at the first."""

    def __init__(self, file: str, line: int | None):
        self.file, self.line = file, line
        self.problems: list[Problem] = []
        self.errors = 0

    def error(self, code: str, field: str | None, message: str) -> None:
        self.problems.append(Problem(code, message, file=self.file, line=self.line, field=field))
        self.errors += 1

    def warn(self, code: str, field: str | None, message: str) -> None:
        self.problems.append(Problem(code, message, file=self.file, line=self.line, field=field, severity="warning"))

    def reply_text(self, text: str, field: str) -> None:
        """Warn of role markers written as text in an assistant reply (see `_ROLE_MARKER`)."""
        found = _ROLE_MARKER.search(text)
        if found:
            self.warn(
                "role_marker_in_reply",
                field,
                f"the reply holds the role marker {found.group().strip()!r} as text (left by a conversion from "
                "another chat format), and the model would learn to write it. Remove the marker from the reply.",
            )

    def decode_json_cells(self, row: dict, format: str | None = None) -> dict:
        """CSV cells are text: parse the ones that hold JSON structures (message lists and such) in a
        row of `format`."""
        row = dict(row)
        for key in _TEXT_OR_MESSAGES_FIELDS:
            cell = row.get(key)
            if isinstance(cell, str) and cell.lstrip().startswith("["):
                with contextlib.suppress(json.JSONDecodeError):
                    value = json.loads(cell)
                    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
                        row[key] = value
        label = row.get("label")
        if format == "kto" and isinstance(label, str) and label.strip().lower() in ("true", "false"):
            row["label"] = label.strip().lower() == "true"  # a CSV cell's true / false
        margin = row.get("margin")
        if format == "preference" and isinstance(margin, str):  # a CSV cell's number, or empty: no margin
            with contextlib.suppress(ValueError):
                row["margin"] = float(margin) if margin.strip() else None
        openai_preference = format == "preference" and _is_openai_preference(row)
        structured = _STRUCTURED_FIELDS + (_STRUCTURED_PREFERENCE_FIELDS if openai_preference else ())
        for key in structured:
            cell = row.get(key)
            if isinstance(cell, str) and cell.strip():
                try:
                    row[key] = json.loads(cell)
                except json.JSONDecodeError as e:
                    self.error(
                        "invalid_json",
                        key,
                        f"the cell must hold JSON ({e.msg} at character {e.pos + 1}). "
                        'Quote the cell and double its inner quotes ("").',
                    )
        return row

    def text(self, row: dict, key: str, *, required: bool = True) -> str | None:
        """A string field. Optional fields may be absent, null or blank (an export's "" or " " for none)."""
        value = row.get(key)
        if value is None or (not required and isinstance(value, str) and not value.strip()):
            if required:
                self.error("missing_field", key, f"'{key}' {_absent(row, key)}: give it a non-empty string.")
            return None
        if not isinstance(value, str):
            self.error("data_type", key, f"'{key}' must be a string, got {_json_type(value)}.")
            return None
        if required and not value.strip():
            self.error("missing_content", key, f"'{key}' is empty: give it text, or remove the row.")
            return None
        return value

    def tools(self, row: dict, *, known_keys_only: bool = False) -> list[dict] | None:
        if row.get("functions") is not None:
            # Left unread, the row would train without its function definitions, as if it had no tools.
            self.error(
                "data_type",
                "functions",
                f"'functions' is OpenAI's legacy way to give the functions ({_TOOLS_FORMAT}): give them as "
                '\'tools\': [{"type": "function", "function": <each function>}].',
            )
        value = row.get("tools")
        if value is not None and not isinstance(value, list):
            self.error(
                "data_type", "tools", f"'tools' must be a list of tool definitions (objects), got {_json_type(value)}."
            )
            return None
        for i, tool in enumerate(value or []):
            if not isinstance(tool, dict):
                self.error(
                    "data_type",
                    f"tools[{i}]",
                    f'a tool definition is an object, {{"type": "function", "function": {{"name": ...}}}}, got '
                    f"{_json_type(tool)}.",
                )
                return None
        if not value:  # an empty list offers no tools: rendered as none, as the server renders a request's
            return None
        if known_keys_only:
            for i, tool in enumerate(value):
                self._unknown_tool_keys(tool, f"tools[{i}]")
            if self.errors:
                return None
        tools = [self._tool(tool, f"tools[{i}]") for i, tool in enumerate(value)]
        return None if None in tools else tools

    def _unknown_tool_keys(self, tool: dict, at: str) -> None:
        """An error for each key of `tool` (OpenAI's {"type", "function": {...}}, or the flat form) that OpenAI's
        tool definitions do not have, named where it is written. Another type's tool (OpenAI's "custom") is left
        to `_tool`, which refuses its type."""
        if tool.get("type", "function") != "function":
            return
        function = tool.get("function")
        nested = isinstance(function, dict)
        known = _TOOL_KEYS if "function" in tool else ("type", *_FUNCTION_KEYS)
        keys = [(f"{at}.{key}", key, known) for key in tool if key not in known]
        keys += [
            (f"{at}.function.{key}", key, _FUNCTION_KEYS)
            for key in (function if nested else ())
            if key not in _FUNCTION_KEYS
        ]
        for field, key, allowed in keys:
            self.error(
                "unknown_key",
                field,
                f"unknown key{_closest_key([key], allowed)}: a tool definition is "
                '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}, '
                '"strict": ...}}; rename or remove it.',
            )

    def _tool(self, tool: dict, at: str) -> dict | None:
        """A tool definition as OpenAI's clients send it at inference and chat templates read it:
        {"type": "function", "function": {"name", ...}}. A bare function definition ({"name", "description",
        "parameters"}, as LLaMA-Factory and some chat data write them) and the Responses API's flat one
        ({"type": "function", "name", ...}) become that; None (an error) for any other."""
        if "function" not in tool and tool.get("type", "function") == "function":
            tool = {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
        if tool.get("type") != "function":
            self.error(
                "data_type",
                f"{at}.type",
                f'a tool\'s type must be "function" (the tools chat templates write), got '
                f"{json.dumps(tool.get('type'))}; leave other tools out.",
            )
            return None
        function = tool["function"]
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"].strip()):
            self.error(
                "data_type",
                f"{at}.function.name",
                'a tool is {"type": "function", "function": {"name": ..., "description": ..., "parameters": '
                "{...}}}: give its function a name, the one the replies' tool_calls call it by.",
            )
            return None
        return _in_openai_order(tool)

    def messages(
        self, value: Any, field: str, *, sharegpt: bool = False, absent: str = "is missing"
    ) -> list[Message] | None:
        """A list of chat messages (OpenAI keys, or ShareGPT's from/value); None if any is bad. `absent`: how a
        None `value` is absent from its row (`_absent`)."""
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        allowed = _SHAREGPT_KEYS if sharegpt else _MESSAGE_KEYS
        one = '{"from": "human", "value": ...}' if sharegpt else '{"role": "user", "content": ...}'
        example = f"[{one}, ...]"
        if value is None or value == []:
            what = absent if value is None else "is empty"
            self.error("missing_messages_list", field, f"'{field}' {what}: give it a list of messages like {example}.")
            return None
        if not isinstance(value, list):
            self.error(
                "missing_messages_list",
                field,
                f"'{field}' must be a list of messages like {example}, got {_json_type(value)}.",
            )
            return None
        errors_before = self.errors
        out = []
        for i, raw in enumerate(value):
            at = f"{field}[{i}]"
            if not isinstance(raw, dict):
                self.error("data_type", at, f"each message must be an object like {one}, got {_json_type(raw)}.")
                continue
            for key, key_value in raw.items():
                if key not in allowed and key_value is not None:  # Parquet gives every row every struct field
                    self.error(
                        "message_unrecognized_key",
                        f"{at}.{key}",
                        f"unknown message key '{key}'{_message_key_hint(key, field, sharegpt, allowed)}. A message "
                        f"may have {', '.join(allowed)}; remove or rename this key.",
                    )
            role = self._role(raw, at, role_key, sharegpt)
            tool_calls = self._tool_calls(raw, at, role)
            content, parts = self._content(raw, at, content_key, role, tool_calls)
            weight = self._weight(raw, at, role)
            name = self._optional_string(raw, at, "name") if "name" in raw else None
            tool_call_id = self._optional_string(raw, at, "tool_call_id") if "tool_call_id" in raw else None
            reasoning = None if sharegpt else self._reasoning(raw, at, role)
            if role is not None and content is not None:
                out.append(
                    Message(
                        role,
                        content,
                        weight=weight,
                        name=name,
                        tool_calls=tool_calls,
                        tool_call_id=tool_call_id,
                        reasoning_content=reasoning,
                        parts=parts,
                    )
                )
        return out if self.errors == errors_before else None

    def _role(self, raw: dict, at: str, role_key: str, sharegpt: bool) -> str | None:
        if role_key not in raw:
            self.error(
                "message_missing_key",
                f"{at}.{role_key}",
                f"the message has no '{role_key}': add one of {', '.join(_SHAREGPT_ROLES if sharegpt else ROLES)}.",
            )
            return None
        role = raw[role_key]
        if not isinstance(role, str):
            self.error(
                "data_type",
                f"{at}.{role_key}",
                f"'{role_key}' must be a string, one of {', '.join(_SHAREGPT_ROLES if sharegpt else ROLES)}; got "
                f"{_json_type(role)}.",
            )
            return None
        mapped = _SHAREGPT_ROLES.get(role) if sharegpt else role
        if mapped not in ROLES:
            hint = f" (ShareGPT's '{role}' is '{_SHAREGPT_ROLES[role]}' here)" if role in _SHAREGPT_ROLES else ""
            hint = f" ('{role}' is '{'gpt' if sharegpt else 'assistant'}' here)" if role in _REPLY_ROLES else hint
            hint = f" ({_TOOLS_FORMAT})" if role in _FUNCTION_CALLING else hint
            self.error(
                "unrecognized_role",
                f"{at}.{role_key}",
                f"role {role!r} is not one of {', '.join(_SHAREGPT_ROLES if sharegpt else ROLES)}{hint}.",
            )
            return None
        return mapped

    def _content(
        self, raw: dict, at: str, key: str, role: str | None, tool_calls: list | None
    ) -> tuple[str | None, tuple | None]:
        """The message's text, and its parts in order where it holds images (else None)."""
        value = raw.get(key)
        parts = None
        if isinstance(value, list):  # OpenAI content parts: text, and images in user messages
            parts = self._parts(value, f"{at}.{key}", role)
            if parts is None:
                return None, None
            value = "".join(p for p in parts if isinstance(p, str))
            if any(isinstance(p, Image) for p in parts):
                return value, parts  # an image alone is content enough
            parts = None
        if value is None and role == "assistant" and tool_calls:
            return "", None
        if value is None:
            self.error("missing_content", f"{at}.{key}", f"'{key}' {_absent(raw, key)}: give the message text.")
            return None, None
        if not isinstance(value, str):
            self.error(
                "data_type",
                f"{at}.{key}",
                f"'{key}' must be a string, got {_json_type(value)}: write it as text (quote it).",
            )
            return None, None
        if not value.strip() and not tool_calls:
            self.error("missing_content", f"{at}.{key}", f"'{key}' is empty: give the message text, or remove it.")
            return None, None
        if role == "assistant":
            self.reply_text(value, f"{at}.{key}")
        return value, parts

    def _parts(self, value: list, at: str, role: str | None) -> tuple | None:
        """OpenAI content parts as text and `Image`s, in order; None if any is bad (each error by its index)."""
        out, errors_before = [], self.errors
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(part, Image):  # an image of the row's `images` field, read and checked there
                kind = "image_url"
            if kind == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif kind == "image_url" and role == "user":
                holder = None if isinstance(part, Image) else part.get("image_url")
                url = holder.get("url") if isinstance(holder, dict) else None
                image = part if isinstance(part, Image) else read_image(url)
                if isinstance(image, str) and column_image_path(url, Path()) is not None:
                    # A file path: the `images` field reads it (and the data cache's key sees it); an image_url part
                    # takes what OpenAI's takes, so a file in OpenAI's layout stays one.
                    image = (
                        f"{url[:80]!r} is a file path, and an image_url part takes a data URL, as OpenAI's data does: "
                        "name the file in the row's 'images' field and put {\"type\": \"image\"} in this part's "
                        "place (see README, Images), or embed the image as a data URL."
                    )
                if isinstance(image, str):
                    self.error("bad_image", f"{at}[{j}].image_url.url", image)
                else:
                    out.append(image)
            elif kind == "image_url":
                self.error(
                    "unsupported_content",
                    f"{at}[{j}]",
                    f"images are read in user messages only, not in {role or 'this'} messages; "
                    "move it to a user message.",
                )
            elif kind == "image":
                self.error(
                    "image_count",
                    f"{at}[{j}]",
                    'a {"type": "image"} part shows an image of the row\'s \'images\' field, and the row has none: '
                    "give the row its images there (file paths from the data file's folder), or put the image in the "
                    'part as {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}.',
                )
            else:
                self.error(
                    "unsupported_content",
                    f"{at}[{j}]",
                    'a content part is {"type": "text", "text": ...} or, in a user message, {"type": "image_url", '
                    '"image_url": {"url": "data:image/png;base64,..."}}; remove the others.',
                )
        return tuple(out) if self.errors == errors_before else None

    def _weight(self, raw: dict, at: str, role: str | None) -> int | None:
        weight = raw.get("weight")
        if weight is None:
            return None
        if isinstance(weight, bool) or weight not in (0, 1):
            self.error("invalid_weight", f"{at}.weight", f"weight must be 0 or 1, got {weight!r}.")
            return None
        if role != "assistant":
            self.error("invalid_weight", f"{at}.weight", "only assistant messages take a weight; remove it here.")
            return None
        return int(weight)

    def _tool_calls(self, raw: dict, at: str, role: str | None) -> list[dict] | None:
        calls = raw.get("tool_calls")
        if calls is None:
            return None
        well_formed = isinstance(calls, list) and all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
            for c in calls
        )
        if not well_formed:
            self.error(
                "data_type",
                f"{at}.tool_calls",
                'tool_calls must be a list like [{"id": ..., "type": "function", "function": {"name": ..., '
                '"arguments": ...}}].',
            )
            return None
        if role != "assistant":
            self.error("data_type", f"{at}.tool_calls", "only assistant messages make tool calls; remove them here.")
            return None
        for i, call in enumerate(calls):  # a call with bad arguments makes its row an error
            self._check_arguments(call["function"].get("arguments"), f"{at}.tool_calls[{i}]")
        return calls

    def _reasoning(self, raw: dict, at: str, role: str | None) -> str | None:
        """An assistant reply's reasoning: 'reasoning_content' (DeepSeek's and Qwen's name) or 'reasoning'."""
        given = [key for key in ("reasoning_content", "reasoning") if raw.get(key) is not None]
        if len(given) > 1:
            self.error(
                "data_type", f"{at}.reasoning", "the message has both 'reasoning_content' and 'reasoning'; keep one."
            )
            return None
        value = self._optional_string(raw, at, given[0]) if given else None
        if value is not None and role != "assistant":
            self.error("data_type", f"{at}.{given[0]}", "only assistant messages have reasoning; remove it here.")
            return None
        return value

    def _check_arguments(self, arguments: Any, at: str) -> None:
        """A call's arguments are a JSON object (as JSON text, OpenAI's way, or as the object): the template
        writes anything else as it is, and the model would learn to call with it."""
        said = None
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError as e:
                said = f"the text is not JSON ({e.msg} at character {e.pos + 1})"
            except (RecursionError, ValueError) as e:  # well-formed JSON that Python's reader gives up on
                said = f"the text {unreadable_json(e)}"
            else:
                said = None if isinstance(parsed, dict) else f"the text holds {_json_type(parsed)}"
        elif not isinstance(arguments, dict):
            said = "it is missing" if arguments is None else f"got {_json_type(arguments)}"
        if said is not None:
            self.error(
                "data_type",
                f"{at}.function.arguments",
                f"a call's arguments must be a JSON object, written as JSON text like "
                f'"{{\\"city\\": \\"Paris\\"}}" (or as the object itself); {said}. Write them so, '
                'with "{}" for a call without arguments.',
            )

    def _optional_string(self, raw: dict, at: str, key: str) -> str | None:
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            self.error("data_type", f"{at}.{key}", f"'{key}' must be a string, got {_json_type(value)}.")
            return None
        return value

    def require_assistant(self, messages: list[Message] | None, field: str) -> None:
        if messages is not None and not any(m.role == "assistant" for m in messages):
            self.error(
                "example_missing_assistant_message",
                field,
                "no assistant message: add the reply the model should learn to give.",
            )


# --- one normaliser per format -------------------------------------------------------------------


def _chat(row: dict, check: _RowCheck) -> Conversation | None:
    messages = _with_system(row, _row_messages(check, row, "messages"), check, "messages")
    check.require_assistant(messages, "messages")
    tools = check.tools(row)
    return (
        Conversation(messages, tools=tools, fields=_turn_fields(row, "messages", len(messages))) if messages else None
    )


def _alpaca(row: dict, check: _RowCheck) -> Conversation | None:
    prompt, output = _alpaca_prompt(row, check), check.text(row, "output")
    if prompt is None or output is None:
        return None
    check.reply_text(output, "output")
    fields = [*_alpaca_fields(row), RowField("output", holds_text=True)]
    return Conversation(prompt + [Message("assistant", output)], fields=fields)


def _alpaca_prompt(row: dict, check: _RowCheck) -> list[Message] | None:
    """The messages before an alpaca row's reply: its system prompt, its `history`, then the
    instruction with its input; None if a field is bad."""
    instruction = _user_text(check, row, "instruction")
    extra = _user_text(check, row, "input", required=False)
    system = check.text(row, "system", required=False)
    if instruction is None:
        return None
    history = _alpaca_history(row, check)
    if history is None:
        return None
    prompt = (*instruction, "\n\n", *extra) if extra else instruction
    return ([Message("system", system)] if system else []) + history + [_user_message(prompt)]


def _alpaca_fields(row: dict) -> list[RowField]:
    """Where each message of a good alpaca row's prompt (`_alpaca_prompt`) sits: its system prompt, its history's
    turns, and its instruction with its input, which make one message."""

    def given(key: str) -> bool:  # as `_alpaca_prompt` reads an optional field: blank text is none
        value = row.get(key)
        return bool(value.strip()) if isinstance(value, str) else value is not None

    turns = [f"history[{i}][{j}]" for i in range(len(row.get("history") or [])) for j in (0, 1)]
    asked = "instruction (with its input)" if given("input") else "instruction"
    paths = ["system"] * given("system") + turns + [asked]
    return [RowField(path, holds_text=True) for path in paths]


def _user_text(check: _RowCheck, row: dict, field: str, *, required: bool = True) -> tuple | None:
    """A user message's text field as its parts: the text alone, or the text and the images `_place_images` put in
    place of its placeholders; None if the field is bad (or, not `required`, absent or empty)."""
    if _placed(row.get(field)):
        return check._parts(row[field], field, "user")
    text = check.text(row, field, required=required)
    return None if text is None else (text,)


def _placed(value: Any) -> bool:
    """Whether a text field's value is its text with images put in place of its placeholders (`_place_images`)."""
    return isinstance(value, list) and any(isinstance(p, Image) for p in value)


def _user_message(parts: tuple) -> Message:
    """A user message of text and images (`_user_text`'s parts, joined): its text parts next to each other as one."""
    merged: list = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        elif part != "":
            merged.append(part)
    text = "".join(p for p in merged if isinstance(p, str))
    return Message("user", text, parts=tuple(merged) if any(isinstance(p, Image) for p in merged) else None)


def _alpaca_history(row: dict, check: _RowCheck) -> list[Message] | None:
    """The earlier turns of an alpaca row (LLaMA-Factory's `history`: [[user, assistant], ...]), as
    messages before the instruction; None if the field is malformed."""
    history = row.get("history") or []
    if not isinstance(history, list):
        check.error(
            "data_type", "history", f"'history' must be a list of [user, assistant] pairs, got {_json_type(history)}."
        )
        return None
    messages = []
    for i, turn in enumerate(history):
        placed = isinstance(turn, list) and len(turn) == 2 and _placed(turn[0]) and isinstance(turn[1], str)
        user = check._parts(turn[0], f"history[{i}][0]", "user") if placed and turn[1].strip() else None
        if user is None and not (
            isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) and t.strip() for t in turn)
        ):
            check.error(
                "data_type",
                f"history[{i}]",
                "each turn of 'history' must be a [user, assistant] pair of non-empty strings, "
                f"got {json.dumps(turn, default=str)[:80]}.",
            )
            return None
        messages += [_user_message(user or (turn[0],)), Message("assistant", turn[1])]
    return messages


def _sharegpt(row: dict, check: _RowCheck) -> Conversation | None:
    messages = _sharegpt_turns(row, check)
    check.require_assistant(messages, "conversations")
    tools = _sharegpt_tools(row, check)
    if not messages:
        return None
    return Conversation(messages, tools=tools, fields=_turn_fields(row, "conversations", len(messages), ".value"))


# The order of a tool definition's keys as the server gives a request's tools to the chat template (its
# request body's fields, as vLLM's): templates write the definitions with `tojson` or key by key, so a row
# whose keys come in another order would train on a prompt that serving never shows.
_TOOL_KEYS = ("type", "function")
_FUNCTION_KEYS = ("name", "description", "parameters", "strict")


def _in_openai_order(tool: dict) -> dict:
    """`tool` with its keys, and its function's, in OpenAI's order (`_TOOL_KEYS`, `_FUNCTION_KEYS`); any
    other key after them, as written."""
    function = tool.get("function")
    if isinstance(function, dict):
        tool = {**tool, "function": {**{k: function[k] for k in _FUNCTION_KEYS if k in function}, **function}}
    return {**{k: tool[k] for k in _TOOL_KEYS if k in tool}, **tool}


def _sharegpt_tools(row: dict, check: _RowCheck) -> list[dict] | None:
    """A ShareGPT row's `tools` in OpenAI's tools format. LLaMA-Factory writes them as JSON text of bare
    function definitions, which `_RowCheck.tools` wraps as OpenAI's."""
    value = row.get("tools")
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            check.error(
                "invalid_json",
                "tools",
                f"'tools' must be a list of tool definitions, or JSON text of one ({e.msg} at character "
                f"{e.pos + 1}); fix the JSON.",
            )
            return None
    return check.tools({"tools": value})


def _sharegpt_turns(row: dict, check: _RowCheck) -> list[Message] | None:
    """A ShareGPT row's `conversations` as messages, its `system` field first; None if any is bad."""
    return _with_system(row, _row_messages(check, row, "conversations", sharegpt=True), check, "conversations")


def _row_messages(
    check: _RowCheck, row: dict, key: str, field: str | None = None, *, sharegpt: bool = False
) -> list[Message] | None:
    """The messages of the row's `key` (named `field`, by default `key`), said to be null or missing where it has
    none."""
    return check.messages(row.get(key), field or key, sharegpt=sharegpt, absent=_absent(row, key))


def _with_system(row: dict, messages: list[Message] | None, check: _RowCheck, key: str) -> list[Message] | None:
    """`messages` (the row's `key`) with the row's `system` field, where it has one, as their system prompt
    first, as ShareGPT and LLaMA-Factory exports keep it beside the turns; None if any is bad."""
    system = check.text(row, "system", required=False)
    if messages and system:
        if messages[0].role != "system":
            messages.insert(0, Message("system", system))
        elif messages[0].content.strip() != system.strip():  # the same prompt with a stray newline agrees
            check.error(
                "conflicting_system",
                "system",
                f"the row has a 'system' field and {key}[0] is a system turn with other text "
                f"({messages[0].content[:60]!r}); only one can be the system prompt. Keep one of them.",
            )
            return None
    return messages


def _turn_fields(row: dict, key: str, count: int, text: str = "") -> list[RowField]:
    """Where each of the `count` messages read from the row's `key` sits: the field itself where it is text (one
    message, or an HH transcript's turns); else its turns (one turn, or a list's items), each by its `text` field
    where that holds the turn's text (ShareGPT's `.value`), after the row's `system` field where `_with_system`
    put that first."""
    value = row.get(key)
    if not isinstance(value, list | dict) or _placed(value):
        return [RowField(key, holds_text=True)] * count
    turns = [key] if isinstance(value, dict) else [f"{key}[{i}]" for i in range(len(value))]
    fields = [RowField(turn + text, holds_text=bool(text)) for turn in turns]
    return [RowField("system", holds_text=True)] * (count - len(fields)) + fields


def _turns(check: _RowCheck, row: dict, key: str, role: str) -> list[Message] | None:
    """A field that is either plain text (one message of `role`) or a list of chat messages."""
    value = row.get(key)
    if _placed(value):  # a prompt's text with its images in place (`_place_images`): one user message
        parts = check._parts(value, key, role)
        return None if parts is None else [_user_message(parts)]
    if isinstance(value, list):
        return check.messages(value, key)
    text = check.text(row, key)
    if text is not None and role == "assistant":
        check.reply_text(text, key)
    return [Message(role, text)] if text is not None else None


def _prompt_completion(row: dict, check: _RowCheck) -> Conversation | None:
    prompt, completion = _turns(check, row, "prompt", "user"), _turns(check, row, "completion", "assistant")
    check.require_assistant(completion, "completion")
    if not prompt or not completion or check.errors:
        return None
    fields = _turn_fields(row, "prompt", len(prompt)) + _turn_fields(row, "completion", len(completion))
    return Conversation(prompt + completion, fields=fields)


def _text(row: dict, check: _RowCheck) -> Document | None:
    text = check.text(row, "text")
    return Document(text) if text is not None else None


def _is_openai_preference(row: dict) -> bool:
    """Whether a preference row is OpenAI's shape; alpaca's preference rows (LLaMA-Factory's) have an
    `input` too, a text beside their chosen and rejected replies."""
    openai_keys = "preferred_output" in row or "non_preferred_output" in row
    return openai_keys or ("input" in row and not {"chosen", "rejected", "instruction"} & row.keys())


def _preference(row: dict, check: _RowCheck) -> Preference | None:
    if _is_openai_preference(row):
        prompt, chosen, rejected, tools = _openai_preference(row, check)
    else:
        prompt, chosen, rejected = _trl_preference(row, check)
        tools = _sharegpt_tools(row, check) if "conversations" in row else check.tools(row)
    errors = check.errors
    margin = _margin(row, check)
    if prompt is None or chosen is None or rejected is None or check.errors > errors:
        return None
    if chosen.to_template() == rejected.to_template():
        check.warn(
            "identical_preference",
            None,
            "the chosen and rejected replies are the same, so the pair teaches nothing; fix or remove it.",
        )
    return Preference(prompt, chosen, rejected, tools=tools, fields=_preference_fields(row, len(prompt)), margin=margin)


def _margin(row: dict, check: _RowCheck) -> float | None:
    """A preference row's optional `margin` (Llama 2's margin loss; TRL's RewardTrainer reads a `margin`
    column): a finite number, which `method: reward` subtracts from the pair's reward difference."""
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        check.error(
            "data_type",
            "margin",
            f"'margin' must be a finite number (how far the chosen reply's reward should exceed the rejected's), "
            f"got {json.dumps(value)[:40] if not isinstance(value, float) else value}; give a JSON number or leave "
            "the field out.",
        )
        return None
    return float(value)


def _preference_fields(row: dict, n_prompt: int) -> tuple[list[RowField], list[RowField]]:
    """Where each message of the pair's two conversations (the prompt, then the reply) sits in the row."""
    if _is_openai_preference(row):
        prompt = [RowField(f"input.messages[{i}]") for i in range(n_prompt)]
        return prompt + [RowField("preferred_output[0]")], prompt + [RowField("non_preferred_output[0]")]
    if "conversations" in row:  # LLaMA-Factory's ShareGPT pairs
        prompt = _turn_fields(row, "conversations", n_prompt, ".value")
        return prompt + _turn_fields(row, "chosen", 1, ".value"), prompt + _turn_fields(row, "rejected", 1, ".value")
    if "instruction" in row:
        prompt = _alpaca_fields(row)
    elif "prompt" not in row or _is_hh_pair(row) or (isinstance(row["chosen"], list) and len(row["chosen"]) > 1):
        # whole conversations, which hold the prompt given beside them
        chosen = _turn_fields(row, "chosen", n_prompt + 1)
        return chosen, chosen[:n_prompt] + _turn_fields(row, "rejected", n_prompt + 1)[n_prompt:]
    else:
        prompt = _turn_fields(row, "prompt", n_prompt)
    return prompt + _turn_fields(row, "chosen", 1), prompt + _turn_fields(row, "rejected", 1)


def _openai_preference(row: dict, check: _RowCheck):
    source = row.get("input")
    if not isinstance(source, dict):
        check.error(
            "data_type",
            "input",
            f"'input' must be an object like {{\"messages\": [...]}}, got "
            f"{_json_type(source) if source is not None else 'nothing'}.",
        )
        prompt, tools = None, None
    else:
        prompt, tools = _row_messages(check, source, "messages", "input.messages"), check.tools(source)
    chosen, rejected = (
        _single_reply(check, _row_messages(check, row, k), k) for k in ("preferred_output", "non_preferred_output")
    )
    return prompt, chosen, rejected, tools


def _trl_preference(row: dict, check: _RowCheck):
    if "conversations" in row:  # LLaMA-Factory's ShareGPT pairs: the prompt's turns, then one turn each
        return _sharegpt_turns(row, check), *(_sharegpt_reply(row, check, k) for k in ("chosen", "rejected"))
    # HH transcripts hold their prompt; one given beside them is checked against it below, as UltraFeedback's is.
    if _is_hh_pair(row):
        chosen_turns, rejected_turns = _hh_turns(check, row, "chosen"), _hh_turns(check, row, "rejected")
    else:
        chosen_turns = _turns(check, row, "chosen", "assistant")
        rejected_turns = _turns(check, row, "rejected", "assistant")
    whole = chosen_turns is not None and rejected_turns is not None and len(chosen_turns) > 1
    if ("prompt" in row and not whole) or "instruction" in row:
        prompt = _turns(check, row, "prompt", "user") if "prompt" in row else _alpaca_prompt(row, check)
        return prompt, _single_reply(check, chosen_turns, "chosen"), _single_reply(check, rejected_turns, "rejected")
    # No prompt, or a prompt beside whole conversations that repeat it (UltraFeedback's shape, which TRL
    # reads too): chosen and rejected are conversations that differ only in their last reply.
    if chosen_turns is None or rejected_turns is None:
        return None, None, None
    if "prompt" in row:
        prompt = _turns(check, row, "prompt", "user")
        shared = [m.to_template() for m in chosen_turns[:-1]]
        if prompt is not None and shared[-len(prompt) :] != [m.to_template() for m in prompt]:
            check.error(
                "invalid_preference",
                "prompt",
                "'prompt' is not the conversation that 'chosen' repeats before its reply; make 'chosen' and "
                "'rejected' one assistant message each, or make 'prompt' the turns they repeat.",
            )
            return None, None, None
    shared = [m.to_template() for m in chosen_turns[:-1]] == [m.to_template() for m in rejected_turns[:-1]]
    if not shared and "prompt" in row:  # 'chosen' repeats the prompt (checked above): 'rejected' differs
        check.error(
            "invalid_preference",
            "rejected",
            "'chosen' and 'rejected' are whole conversations that differ before their last message; make 'rejected' "
            "repeat the turns 'chosen' does, or make each one assistant message beside 'prompt'.",
        )
        return None, None, None
    if not shared or len(chosen_turns) < 2:
        check.error(
            "invalid_preference",
            "chosen",
            "without a 'prompt', chosen and rejected must be conversations "
            "that share every message but the last; add a 'prompt' field or fix the messages.",
        )
        return None, None, None
    chosen = _single_reply(check, chosen_turns[-1:], "chosen")
    return chosen_turns[:-1], chosen, _single_reply(check, rejected_turns[-1:], "rejected")


def _is_hh(value) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def _is_hh_pair(row: dict) -> bool:
    """Whether a pair's chosen and rejected are Anthropic HH transcripts, each its whole conversation."""
    return "instruction" not in row and all(_is_hh(row.get(k)) for k in ("chosen", "rejected"))


def _hh_turns(check: _RowCheck, row: dict, field: str) -> list[Message] | None:
    """An Anthropic HH transcript as chat messages: each "Human:" turn a user message, each
    "Assistant:" turn an assistant message."""
    parts = _HH_TURN.split("\n\n" + row[field].lstrip())[1:]
    turns = [
        Message("user" if who == "Human" else "assistant", text.strip()) for who, text in zip(parts[::2], parts[1::2])
    ]
    for i, turn in enumerate(turns):
        if not turn.content:
            check.error(
                "missing_content",
                field,
                f"turn {i + 1} of the '{field}' transcript ({'Human' if turn.role == 'user' else 'Assistant'}:) is "
                "empty: give it text, or remove the row.",
            )
            return None
    return turns


def _sharegpt_reply(row: dict, check: _RowCheck, field: str) -> Message | None:
    """One reply of a ShareGPT pair: a turn ({"from": "gpt", "value": ...}), or a list holding it."""
    value = row.get(field)
    return _single_reply(
        check,
        check.messages([value] if isinstance(value, dict) else value, field, sharegpt=True, absent=_absent(row, field)),
        field,
    )


def _single_reply(check: _RowCheck, messages: list[Message] | None, field: str) -> Message | None:
    if messages is None:
        return None
    if len(messages) != 1 or messages[0].role != "assistant":
        check.error(
            "invalid_preference",
            field,
            f"'{field}' must be exactly one assistant message "
            f"(got {len(messages)} message(s), roles {[m.role for m in messages]}).",
        )
        return None
    if messages[0].weight == 0:
        check.error(
            "invalid_weight",
            field,
            f"the '{field}' reply has weight 0, which would leave it untrained, but a preference pair "
            "trains exactly its two replies; remove the weight.",
        )
        return None
    return messages[0]


def _kto(row: dict, check: _RowCheck) -> Conversation | None:
    """A rated reply (KTO): its prompt's messages, the reply, and `label`. Only the reply trains: an
    assistant message of the prompt (an earlier turn) is rendered untrained."""
    label = row.get("label")
    if not isinstance(label, bool):
        check.error(
            "data_type",
            "label",
            f"'label' must be true (the reply is desirable) or false (undesirable), got "
            f"{json.dumps(label)[:40] if label is not None else 'nothing'}; give each row a JSON true or false.",
        )
    if "messages" in row:
        messages = _row_messages(check, row, "messages")
        tools = check.tools(row)
        if not messages:
            return None
        prompt, reply, field = messages[:-1], messages[-1:], f"messages[{len(messages) - 1}]"
    else:
        prompt, reply = _turns(check, row, "prompt", "user"), _turns(check, row, "completion", "assistant")
        field = "completion"
        tools = check.tools(row)
    if reply is not None and not (len(reply) == 1 and reply[0].role == "assistant"):
        check.error(
            "invalid_kto",
            field,
            "the rated reply must be one assistant message"
            + (", the last of 'messages'" if field != "completion" else "")
            + f" (got roles {[m.role for m in reply]}); end the row with the assistant reply its label rates.",
        )
    elif reply is not None and reply[0].weight == 0:
        check.error(
            "invalid_weight",
            field,
            "the rated reply has weight 0, which would leave it untrained, but a KTO row trains exactly its "
            "rated reply; remove the weight.",
        )
    elif not prompt and reply is not None and field != "completion":
        check.error("invalid_kto", "messages", "the row has a reply but no prompt: put the user's message before it.")
    if not prompt or not reply or check.errors:
        return None
    prompt = [replace(m, weight=0) if m.role == "assistant" else m for m in prompt]
    if "messages" in row:
        fields = _turn_fields(row, "messages", len(prompt) + 1)
    else:
        fields = _turn_fields(row, "prompt", len(prompt)) + _turn_fields(row, "completion", 1)
    return Conversation(prompt + reply, tools=tools, label=label, fields=fields)


_NORMALISERS = {
    "chat": _chat,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
    "text": _text,
    "preference": _preference,
    "kto": _kto,
}
