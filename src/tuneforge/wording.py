"""How user-facing messages word what they count ("1 row", "2 rows") and a value that is none of its choices.

Imports nothing of tuneforge's or beyond the standard library, so data, training and jobs code can all
use it without pulling in heavy modules.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def counted(count: int, noun: str, plural: str | None = None, *, thousands: bool = False) -> str:
    """`count` and `noun`, the noun plural (`plural`, or `noun` + "s") unless the count is exactly 1;
    `thousands` writes the count with comma separators ("1,024 rows")."""
    number = f"{count:,}" if thousands else f"{count}"
    return f"{number} {noun if count == 1 else plural or noun + 's'}"


def first_places(places: list[str], total: int | None = None) -> str:
    """The first three places of a list of `total` (its length, if None), then ", ..." if there are more."""
    more = (len(places) if total is None else total) > 3
    return ", ".join(places[:3]) + (", ..." if more else "")


def nearest(value: str, choices: Iterable[str]) -> str | None:
    """The choice a misspelt `value` most likely meant, or None when none is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_choice(what: str, value: str, choices: Iterable[str]) -> str:
    """The refusal of `value` for `what`: the nearest choice, if one is close, and the choices there are."""
    choices = list(choices)
    close = nearest(value, choices)
    hint = f"did you mean {close!r}? Use" if close else "use"
    return f"unknown {what} {value!r}; {hint} one of {', '.join(choices)}."


def to_utf8(name: str) -> str:
    """The command that re-saves the file `name`, text a Windows program wrote, as UTF-8. Windows-1252 gives
    Latin-1's letters the same bytes and reads 0x80-0x9f as the curly quotes, dashes and euro sign such
    exports hold, where Latin-1 would make them invisible control characters."""
    return f"`iconv -f windows-1252 -t utf-8 {name} > utf8-{name}`"
