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


# How alike (difflib's ratio) a misspelt name and a choice are for the choice to be offered: close enough for a
# dropped, doubled or swapped letter in a short name, not so loose that an unrelated name is offered.
NEAREST_CUTOFF = 0.75


def nearest(value: str, choices: Iterable[str], cutoff: float = NEAREST_CUTOFF) -> str | None:
    """The choice a misspelt `value` most likely meant, or None when none is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None


def suggestion(meant: str | None, instead_of: str | None = None) -> str:
    """The offer of the name `meant`, to follow the misspelt name it corrects: " (did you mean 'train'?)"; with
    `instead_of`, for a message that names several, which one it corrects: " (did you mean 'train' for 'trian'?)".
    Empty where nothing is close (`meant` None)."""
    if meant is None:
        return ""
    return f" (did you mean {meant!r}" + (f" for {instead_of!r}" if instead_of is not None else "") + "?)"


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """`suggestion` of the choice nearest the misspelt `value`, or empty where none is close."""
    return suggestion(nearest(value, choices))


def unknown_choice(what: str, value: str, choices: Iterable[str]) -> str:
    """The refusal of `value` for `what`: the nearest choice, if one is close, and the choices there are."""
    choices = list(choices)
    return f"unknown {what} {value!r}{did_you_mean(value, choices)}; use one of {', '.join(choices)}."


def to_utf8(name: str) -> str:
    """The command that re-saves the file `name`, text a Windows program wrote, as UTF-8. Windows-1252 gives
    Latin-1's letters the same bytes and reads 0x80-0x9f as the curly quotes, dashes and euro sign such
    exports hold, where Latin-1 would make them invisible control characters."""
    return f"`iconv -f windows-1252 -t utf-8 {name} > utf8-{name}`"
