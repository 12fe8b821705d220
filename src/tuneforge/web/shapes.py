"""OpenAI's shapes that both servers' objects share: request bodies, `metadata` and listings.

A request body (`RequestBody`) refuses an argument it does not know, naming it, as OpenAI does; a
value of the wrong JSON type (`"max_tokens": "5"`, `"stream": "yes"`, `true` for a count), where
pydantic's lax mode would convert it; and text that is not Unicode: JSON's `\\u` escapes can spell
one half of a UTF-16 surrogate pair alone, which Python's JSON reader accepts but no tokenizer,
database or UTF-8 response can hold. A field a body takes as free-form JSON (a tool's parameters, a chat
template's variables) is annotated `Shallow`: nested more than `MAX_NESTING` deep, it is refused naming it.

`metadata` is string pairs on an object (a job, a stored completion), within OpenAI's limits: at
most 16 pairs, keys of at most 64 characters, values of at most 512. Neither it nor other text a store keeps
as text or looks a row up by (an eval's name, a file's id or a model's name, annotated `StoredText`; an upload's
file name) may hold a NUL character: PostgreSQL keeps and compares none in a text column, and its JSON operators
(a listing's `metadata[KEY]` filter) fail on a `\\u0000` they read out, where SQLite takes both; such text is a
400 naming it on either database. Other JSON a store keeps (a stored completion's messages) may hold one:
PostgreSQL's `json` type (not `jsonb`) keeps the escape as written, and no query reads it out. Listings filter
by metadata with query parameters `metadata[KEY]=VALUE` (as the SDKs send it), and answer one page in OpenAI's
envelope, `list_body`. A route that takes a form (an upload) has its `FormFields`, sent as multipart/form-data.
"""

from __future__ import annotations

from email.message import Message
from typing import Annotated, Any

from fastapi import Request
from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from ..lone_surrogates import lone_surrogate

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_FILENAME_CHARS = 255
"""The longest name an uploaded file may have (its name alone, without a folder)."""
MAX_NESTING = 64
"""The most arrays and objects one inside another (the value's own counted) that a JSON value a request gives in
free form may hold (a tool's parameters, a chat template's variables, an eval's item): chat templates walk such
values by recursion, and stores serialize them so (pydantic's serializer stops at about 250)."""


def nul_fault(text: str) -> str | None:
    """Where `text` holds a NUL character, which no stored text may (see above), said for a message; None: none."""
    at = text.find("\0")
    if at < 0:
        return None
    return f"a NUL (\\u0000) at character {at}, which stored text may not hold (PostgreSQL keeps none)"


def _storable(text: str) -> str:
    if (fault := nul_fault(text)) is not None:
        raise ValueError(f"it holds {fault}; leave it out")
    return text


StoredText = Annotated[str, AfterValidator(_storable)]
"""Annotates a body's text that a store keeps as text (an eval's name) or looks a row up by (a file's id, a model's
name): holding a NUL, it is a 400 naming it."""


def _within_limits(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ValueError(f"{len(metadata)} pairs given; keep at most {MAX_METADATA_PAIRS}")
    for key, value in metadata.items():
        for text, what in ((key, f"the key {key!r}"), (value, f"the value of {key!r}")):
            if (fault := nul_fault(text)) is not None:
                raise ValueError(f"{what} holds {fault}; leave it out")
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise ValueError(
                f"the key '{key[:20]}...' has {len(key)} characters; keep keys to {MAX_METADATA_KEY_CHARS}"
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise ValueError(
                f"the value of '{key}' has {len(value)} characters; keep values to {MAX_METADATA_VALUE_CHARS}"
            )
    return metadata


Metadata = Annotated[dict[str, str], AfterValidator(_within_limits)]


def nesting(value: Any) -> int:
    """How many arrays and objects `value` holds one inside another, its own counted, walked without recursion
    (which a deep value would run out of)."""
    deepest, unseen = 0, [(value, 1)]
    while unseen:
        value, depth = unseen.pop()
        inside = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if inside is not None:
            deepest = max(deepest, depth)
            unseen.extend((child, depth + 1) for child in inside)
    return deepest


def _shallow(value: Any) -> Any:
    if (depth := nesting(value)) > MAX_NESTING:
        raise ValueError(
            f"it nests arrays or objects {depth} deep; send at most {MAX_NESTING} (its own object counted)"
        )
    return value


Shallow = AfterValidator(_shallow)
"""Annotates a body's field of free-form JSON (`Annotated[dict | None, Shallow]`): nested more than `MAX_NESTING`
deep, the request is a 400 naming the field."""


class RequestBody(BaseModel):
    """A JSON request body: unknown arguments, values of the wrong type and text that is not Unicode are 400s
    that name them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        found = not_unicode(data)
        if found is not None:
            path, position, character = found
            raise PydanticCustomError(
                "not_unicode",
                "'{path}' is not Unicode text: character {position} ({character}) is one half of a UTF-16 "
                "surrogate pair alone. Send the text as UTF-8; a \\u escape of a character beyond U+FFFF "
                "needs both halves.",
                {"path": path or "body", "position": position, "character": character},
            )
        return data


def not_unicode(value: Any) -> tuple[str, int, str] | None:
    """The first text in parsed JSON that is not Unicode (one half of a UTF-16 surrogate pair alone, which JSON's
    `\\u` escapes can spell): where it is (`messages.0.content`, a key that is not Unicode escaped in it), the
    position of the character in the text and the character as an escape; None where all text is Unicode."""
    found = lone_surrogate(value)
    if found is None:
        return None
    path = ".".join(str(key) for key in found.keys)
    return path.encode("utf-8", "backslashreplace").decode(), found.position, ascii(found.character)


def multipart_boundary(content_type: str | None) -> str | None:
    """The boundary a multipart/form-data Content-Type names ('' where it names none); None for any other type."""
    header = Message()
    header["content-type"] = content_type or ""
    if header.get_content_type() != "multipart/form-data":
        return None
    return header.get_boundary() or ""


FormFields = dict[str, bool]
"""A route's form fields (FastAPI's `Form` and `File`): each name, and whether it takes a file."""


def metadata_filter(request: Request) -> dict[str, str]:
    """The `metadata[KEY]=VALUE` query parameters of a listing, as {KEY: VALUE}."""
    return {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }


def list_body(rows, has_more: bool) -> dict:
    """OpenAI's envelope of one page of a listing (rows are dicts, or objects with `to_api`)."""
    data = [row if isinstance(row, dict) else row.to_api() for row in rows]
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
