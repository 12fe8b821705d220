"""The HTTP edge that `tuneforge serve` and `tuneforge api` share.

`errors.py` answers every failure in OpenAI's error shape, never with a traceback or a server
path (an unexpected failure is logged under an error id that the client gets); `auth.py` checks
Bearer keys before anything reads a body; `limits.py` caps request bodies, and its `edge` puts
all three on an app, with `observe.py`'s metrics and request log when asked. `docs_urls` keeps the
documentation pages off unless asked for. `shapes.py` is OpenAI's request bodies, `metadata` and listings;
`listen.py` binds a server's socket (`--port 0`: a free one) and runs uvicorn on it.
Importing this package is cheap: no torch.
"""

from .auth import KEY_COOKIE, LOCAL_OWNER, Pages, caller, owner_of
from .errors import APIError, failure_id, scrub_paths, server_error, unexpected
from .limits import docs_urls, edge, form_fields
from .observe import CLIENT_LEFT, Observer, note
from .shapes import (
    MAX_FILENAME_CHARS,
    MAX_NESTING,
    Metadata,
    RequestBody,
    Shallow,
    StoredText,
    list_body,
    metadata_filter,
    nesting,
    nul_fault,
)

__all__ = [
    "CLIENT_LEFT",
    "APIError",
    "KEY_COOKIE",
    "LOCAL_OWNER",
    "MAX_FILENAME_CHARS",
    "MAX_NESTING",
    "Metadata",
    "Observer",
    "Pages",
    "RequestBody",
    "Shallow",
    "StoredText",
    "caller",
    "docs_urls",
    "edge",
    "failure_id",
    "form_fields",
    "list_body",
    "metadata_filter",
    "nesting",
    "nul_fault",
    "note",
    "owner_of",
    "scrub_paths",
    "server_error",
    "unexpected",
]
