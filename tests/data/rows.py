"""Helpers shared by the data tests: writing small data files and reading masks back as text."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.data import IGNORE_INDEX, Example

GOOD_ROW = {
    "messages": [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "The answer is four."},
    ]
}


def chat(user: str, assistant: str, system: str | None = None, **extra) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]
    return {"messages": messages, **extra}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_text(example: Example, tokenizer) -> str:
    """The tokens that receive loss, decoded (labels are shifted: label i is token i + 1)."""
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def trained_runs(example: Example, tokenizer) -> list[str]:
    """Each maximal run of trained tokens, decoded."""
    runs, current = [], []
    for label in [*example.labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


# Bad input files: name -> (file name, content, expected code, expected line).
_GOOD = json.dumps(GOOD_ROW).encode()
BAD_INPUTS = {
    "invalid_json": ("bad.jsonl", _GOOD + b'\n{"messages": [{"role": "user"\n', "invalid_json", 2),
    "invalid_utf8": (
        "bad.jsonl",
        _GOOD + b"\n" + _GOOD.replace(b"two plus", b"tw\xff plus") + b"\n",
        "invalid_utf8",
        2,
    ),
    "lone_surrogate": (  # valid JSON, but half of an emoji: no tokenizer can encode it
        "bad.jsonl",
        _GOOD + b"\n" + _GOOD.replace(b"four.", b"four \\ud83d.") + b"\n" + _GOOD + b"\n",
        "invalid_unicode",
        2,
    ),
    "empty_file": ("empty.jsonl", b"", "empty_file", None),
    "content_number": (
        "bad.jsonl",
        _GOOD + b'\n{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "hi"}]}\n',
        "data_type",
        2,
    ),
    "messages_string": ("bad.jsonl", b'{"messages": "hello"}\n' + _GOOD + b"\n", "missing_messages_list", 1),
    "unknown_role": (
        "bad.jsonl",
        _GOOD + b"\n" + _GOOD + b'\n{"messages": [{"role": "human", "content": "hi"}, '
        b'{"role": "assistant", "content": "hello"}]}\n',
        "unrecognized_role",
        3,
    ),
    "no_assistant": (
        "bad.jsonl",
        _GOOD + b'\n{"messages": [{"role": "user", "content": "hi"}]}\n',
        "example_missing_assistant_message",
        2,
    ),
    "huge_line": (
        "bad.jsonl",
        _GOOD + b'\n{"messages": [{"role": "user", "content": "' + b"x" * 10_000_000 + b'"}]}\n' + _GOOD + b"\n",
        "row_too_large",
        2,
    ),
    "mixed_formats": ("bad.jsonl", _GOOD + b'\n{"instruction": "Say hi", "output": "hi"}\n', "mixed_formats", 2),
    "huge_csv_row": (
        "bad.csv",
        b"prompt,completion\nSay hi,hi\n" + b"x" * 10_000_000 + b",hi\nSay hi,hi\n",
        "row_too_large",
        3,
    ),
    "csv_missing_column": ("bad.csv", b"instruction,input\nSay hi,now\n", "missing_column", 1),
}


def write_bad_input(folder: Path, name: str) -> tuple[Path, str, int | None]:
    filename, content, code, line = BAD_INPUTS[name]
    path = folder / filename
    path.write_bytes(content)
    return path, code, line
