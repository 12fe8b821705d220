"""OpenAI's shapes that both servers' objects share: `metadata` and listings.

`metadata` is string pairs on an object (a job, a stored completion), within OpenAI's limits: at
most 16 pairs, keys of at most 64 characters, values of at most 512. Listings filter by it with
query parameters `metadata[KEY]=VALUE` (as the SDKs send it), and answer one page in OpenAI's
envelope, `list_body`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Request
from pydantic import AfterValidator

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def _within_limits(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA_PAIRS:
        raise ValueError(f"{len(metadata)} pairs given; keep at most {MAX_METADATA_PAIRS}")
    for key, value in metadata.items():
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
