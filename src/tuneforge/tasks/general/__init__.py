"""General sets for measuring forgetting: data that no training set of ours touches.

- `general_questions()`: short questions with accepted short answers, scored with the `contains`
  metric; the evaluation keeps those the base model knows firmly (eval/forgetting.py), so a drop
  means forgetting.
- `general_text()`: plain English paragraphs, for cross-entropy of base vs tuned model.
- `general_prompts()`: short chat prompts, for the KL divergence of next-token distributions.
- `general_conversations()`: everyday chit-chat conversations, chat-formatted, from an MIT data set.
- `replay_prompts.jsonl`: prompts a model answers to make its own replay file (`tuneforge distill generate`,
  then `data.general_replay: FILE`), never measured.

The files are package data beside this module; `SOURCES` says where each comes from.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ...errors import damaged_install, json_value

SOURCES = {
    "questions": {
        "file": "questions.jsonl",
        "description": "Easy general-knowledge questions (capitals, languages, currencies, arithmetic, colours, "
        "animals, opposites, plurals, days and months, simple science), each with its accepted short answers.",
        "licence": "Apache-2.0, written for tuneforge",
    },
    "text": {
        "file": "text.jsonl",
        "description": "Short paragraphs of plain English prose on everyday topics.",
        "licence": "Apache-2.0, written for tuneforge",
    },
    "prompts": {
        "file": "prompts.jsonl",
        "description": "Short, varied chat prompts (how-to, explanations, small creative tasks).",
        "licence": "Apache-2.0, written for tuneforge",
    },
    "replay_prompts": {
        "file": "replay_prompts.jsonl",
        "description": "200 everyday chat prompts (questions on topics the questions set leaves out, short "
        "explanations, how-to, small creative and reasoning tasks, conversation openers) for self-replay "
        "(the quickstart's replay file); disjoint from the three sets above.",
        "licence": "Apache-2.0, written for tuneforge",
    },
    "chitchat": {
        "file": "chitchat.jsonl",
        "description": "100 conversations from chitchat-dataset 0.9.0 (PyPI wheel, dataset.json; BYU PCC lab): "
        "those with two speakers who strictly alternate and at least 6 turns, the 100 with the highest "
        "sum of ratings (ties by conversation id), each cut to its first 8 turns, a turn's messages "
        "joined with a space, the first speaker as 'user'.",
        "licence": "MIT, Copyright (c) 2019 Perception, Control and Cognition Lab; full text in chitchat-LICENSE.txt",
    },
}


BUNDLED_REPLAY = ("chitchat",)
"""The sets `data.general_replay` can name instead of a file."""


def bundled_file(source: str) -> Path:
    """The path of a bundled set's file (package data beside this module)."""
    return Path(str(resources.files(__name__).joinpath(SOURCES[source]["file"])))


# The keys each bundled set's rows hold, and their types: a row without them is a damaged install.
_ROW_KEYS = {
    "questions": {"question": str, "answers": list},
    "text": {"text": str},
    "prompts": {"prompt": str},
    "replay_prompts": {"prompt": str},
    "chitchat": {"messages": list},
}


def _read_jsonl(source: str) -> list[dict]:
    """A bundled set's rows; a file that cannot be read, or a row not of its set's shape, is refused as a
    damaged install."""
    path, what = bundled_file(source), f"the general {source} set"
    try:
        data = path.read_bytes()
    except OSError as error:
        raise damaged_install(path, what, f"cannot be read ({error.strerror or error})") from None
    keys, rows = _ROW_KEYS[source], []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        row, unreadable = json_value(line)
        if unreadable is None and not (
            isinstance(row, dict) and all(isinstance(row.get(key), kind) for key, kind in keys.items())
        ):
            unreadable = f"holds no {' and '.join(keys)}"
        if unreadable is not None:
            raise damaged_install(path, what, f"has a line {number} that {unreadable}")
        rows.append(row)
    return rows


def general_questions() -> list[dict]:
    """[{"question": str, "answers": [accepted short answers]}]."""
    return _read_jsonl("questions")


def general_text() -> list[str]:
    return [row["text"] for row in _read_jsonl("text")]


def general_prompts() -> list[str]:
    return [row["prompt"] for row in _read_jsonl("prompts")]


def replay_prompts() -> list[str]:
    return [row["prompt"] for row in _read_jsonl("replay_prompts")]


def general_conversations() -> list[list[dict]]:
    """Conversations as chat messages ([{"role": "user" | "assistant", "content": str}, ...])."""
    return [row["messages"] for row in _read_jsonl("chitchat")]
