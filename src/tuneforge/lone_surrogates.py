"""Text in parsed JSON that is not Unicode: one half of a UTF-16 surrogate pair alone, which JSON's `\\u` escapes
can spell (`"\\ud83d"`, an emoji cut in two). No tokenizer encodes it and no UTF-8 file or reply holds it.

Imports nothing of tuneforge's or beyond the standard library: data files (`data.readers`, `messages[1].content`)
and request bodies (`web.shapes`, `messages.1.content`) find it with one walk, each writing the place in its own
style.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoneSurrogate:
    """Where the first lone surrogate is: `keys`, the object keys (str) and array indices (int) from the top
    down to the text (the last one is the key itself where the key is the text), `in_key` whether it is,
    `position` the character's index in the text and `character` the character."""

    keys: tuple[str | int, ...]
    in_key: bool
    position: int
    character: str


def lone_surrogate(value: Any) -> LoneSurrogate | None:
    """The first lone surrogate in parsed JSON, object keys included; None where all text is Unicode."""
    for keys, in_key, text in _strings(value, ()):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return LoneSurrogate(keys, in_key, err.start, text[err.start])
    return None


def _strings(value: Any, keys: tuple) -> Iterator[tuple[tuple, bool, str]]:
    """Every string in parsed JSON, each key before its value, with the keys down to it and whether it is a key."""
    if isinstance(value, str):
        yield keys, False, value
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                yield (*keys, key), True, key
            yield from _strings(item, (*keys, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*keys, i))
