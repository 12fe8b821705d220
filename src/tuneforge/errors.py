"""User-facing errors.

Every error a user can cause is a `TuneforgeError`: the CLI prints its message on one line block
(no traceback) and exits with its code. Exit codes follow the design: 2 bad input or config,
1 a run that failed.
"""

from __future__ import annotations

import json
import numbers
import re
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1

# Set by `tuneforge train --nproc N` for the processes it starts: each hands its error message to the
# launcher (in torchrun's error file) and only a machine's local rank 0 prints it, so a refusal that
# every process raises reads once; the launcher shows the messages that differ from it.
LAUNCHER_SHOWS_ERRORS = "TUNEFORGE_LAUNCHER_SHOWS_ERRORS"


# What pydantic puts in an error's location for a member of a union rather than a key: `str`,
# `list[str]`, `constrained-str`, `function-after[...]`, `literal['a']`.
_TYPE_TAG = re.compile(r"str|int|float|bool|none|constrained-[a-z]+|[a-z-]+\[.*\]")


def unreadable_json(cause: BaseException | None) -> str | None:
    """What made Python's JSON reader give up on well-formed JSON (a request body's, an uploaded file line's, a tool
    call's arguments), as the end of a sentence about it: nesting too deep for its recursion, or an integer of more
    digits than it converts (None for another cause)."""
    if isinstance(cause, RecursionError):
        return "nests arrays or objects too deeply to be read"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"has an integer of more than {sys.get_int_max_str_digits():,} digits, more than Python reads"
    return None


def json_value(data: bytes):
    """The JSON value in `data` and None, or None and why it cannot be read (the end of a sentence about it)."""
    try:
        return json.loads(data.decode("utf-8")), None
    except UnicodeDecodeError as err:
        return None, f"is not UTF-8 (byte {err.start + 1})"
    except (ValueError, RecursionError) as err:
        return None, unreadable_json(err) or f"is not JSON ({err})"


def json_kind(value) -> str:
    """What a parsed JSON value that is no object is, in JSON's words: 'an array', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {list: "an array", str: "a string"}.get(type(value), "a number")


def key_path(loc: Sequence) -> list[str]:
    """A pydantic error's location as the keys it names. A value that fits none of a union's types gets a
    complaint per type, each located under the type's name (`data.train.list[str]`, `logprobs.bool`)."""
    return [str(part) for part in loc if not _TYPE_TAG.fullmatch(str(part))]


OUT_OF_BOUNDS = {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}
"""pydantic's error types of a number out of its bounds."""

BOUNDS = {"ge": "at least", "gt": "more than", "le": "at most", "lt": "less than"}
"""How a bound of each kind (annotated_types' name for it, as `Field(ge=1)` sets it) is said."""


def within(bounds: dict) -> str:
    """`bounds` (a kind of BOUNDS: its bound) in words: "at least 1 and at most 1024"."""
    return " and ".join(
        f"{BOUNDS[kind]} {bound:g}" if isinstance(bound, float) else f"{BOUNDS[kind]} {bound}"
        for kind, bound in bounds.items()
    )


def out_of_bounds(bounds: dict, got) -> str:
    """A number out of `bounds` (a kind of BOUNDS: its bound), as every front end says it:
    "must be at least 1 and at most 1024 (got 0)"."""
    return f"must be {within(bounds)} (got {got!r})"


def declared_bounds(metadata) -> dict:
    """The bounds among a field's `metadata` (a kind of BOUNDS: its bound), as `Field(ge=1, le=64)` declares them."""
    return {kind: bound for limit in metadata for kind in BOUNDS if (bound := getattr(limit, kind, None)) is not None}


def complaint(error: dict, bounds: dict | None = None) -> str:
    """What a pydantic error says: our validators' own words without the "Value error, " pydantic puts
    before them, a number out of its bounds as `out_of_bounds` says it, or pydantic's message. pydantic's error
    names the one bound the number missed; `bounds` are all of its field's (`declared_bounds`), where the
    caller knows the field."""
    bounds = bounds or {kind: bound for kind, bound in error.get("ctx", {}).items() if kind in BOUNDS}
    if error.get("type") in OUT_OF_BOUNDS and bounds:
        return out_of_bounds(bounds, error.get("input"))
    said = error.get("ctx", {}).get("error") if error.get("type") == "value_error" else None
    return str(said) if said is not None else error.get("msg", "")


class TuneforgeError(Exception):
    """A problem the user can fix; `message` says what is wrong and what to do."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, code: str = "error"):
        super().__init__(message)
        self.message = message
        self.code = code


def damaged_install(path, what: str, unreadable: str) -> TuneforgeError:
    """The error of a file installed with tuneforge (`path`, holding `what`) that `unreadable` (the end of a
    sentence about it): the install is damaged. Reinstalling mends it; in a clone installed with `pip install -e .`
    git restores the file (reinstalling from the registry would replace the clone's install)."""
    path = Path(str(path))
    return TuneforgeError(
        f"{path}: {what}, installed with tuneforge, {unreadable}: the install is damaged. Reinstall tuneforge "
        f"(pip install --force-reinstall tuneforge; from a clone: git -C {path.parent} checkout -- {path.name}).",
        code="damaged_install",
    )


class ConfigError(TuneforgeError):
    """The YAML config or a CLI override is wrong."""


class ModelSourceError(TuneforgeError):
    """A model could not be resolved, fetched or converted."""


class DataError(TuneforgeError):
    """Training or evaluation data has problems; `problems` lists them all."""

    SHOWN_PROBLEMS = 10  # problems a listing prints; `problems` keeps them all

    def __init__(self, message: str, *, code: str = "data_error", problems: list | None = None):
        super().__init__(message, code=code)
        self.problems = problems or []

    @classmethod
    def listing(cls, headline: str, problems: list) -> DataError:
        """`headline:` then the first problems one a line, and how many more; coded as the first."""
        shown = "\n".join(str(p) for p in problems[: cls.SHOWN_PROBLEMS])
        more = f"\n... and {len(problems) - cls.SHOWN_PROBLEMS} more" if len(problems) > cls.SHOWN_PROBLEMS else ""
        return cls(f"{headline}:\n{shown}{more}", code=problems[0].code, problems=problems)


class RunFailed(TuneforgeError):
    """Training started but could not go on (NaN loss, a crashed worker, ...)."""

    exit_code = EXIT_RUN_FAILED


def check_counts(counts: dict[str, tuple[object, int]]) -> None:
    """Refuse, naming it, each count of `counts` (its name: its value and least) given as anything but a whole
    number of at least its least; None is a count left out. The CLI's option bounds, for a Python caller's values
    (a NumPy integer among them, which is a whole number)."""
    for name, (value, least) in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least):
            raise ConfigError(
                f"{name} takes a whole number of at least {least}, got {value!r}; give one, or leave it out.",
                code="bad_option",
            )


def refuse_options(why: str, given: dict[str, bool], aside: str = "") -> None:
    """Refuse, naming each, the options of `given` (name: whether it was set) that `why` says do not apply;
    `aside` ends the message (what to do instead)."""
    refused = [name for name, set_ in given.items() if set_]
    if refused:
        one = len(refused) == 1
        raise ConfigError(
            f"{why}, so {', '.join(refused)} {'does' if one else 'do'} not apply; leave {'it' if one else 'them'} "
            f"out{aside}."
        )
