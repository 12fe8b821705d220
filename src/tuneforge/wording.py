"""How user-facing messages word what they count: "1 row", "2 rows".

Imports nothing of tuneforge's or beyond the standard library, so data, training and jobs code can all
use it without pulling in heavy modules.
"""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None, *, thousands: bool = False) -> str:
    """`count` and `noun`, the noun plural (`plural`, or `noun` + "s") unless the count is exactly 1;
    `thousands` writes the count with comma separators ("1,024 rows")."""
    number = f"{count:,}" if thousands else f"{count}"
    return f"{number} {noun if count == 1 else plural or noun + 's'}"
