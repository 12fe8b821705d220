"""`/v1/files`: upload, list, get, content, delete, each on the caller's own files only."""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from ...web import MAX_FILENAME_CHARS, APIError, caller, list_body, nul_fault
from ..files import CHUNK_BYTES, FilePacked, FileTooLarge
from ..service import Service, service_of
from ..store import StoredFile

UPLOAD_PATH = "/v1/files"
router = APIRouter(prefix="/v1/files", dependencies=[Depends(caller)])


def upload_too_large(max_bytes: int) -> APIError:
    """The refusal of a file past the server's upload limit (`--max-upload-mb`), saying what to do."""
    return APIError(
        413,
        f"The file is larger than this server's limit of {max_bytes:,} bytes ({max_bytes / (1 << 20):g} MiB) on an "
        "uploaded file: upload a smaller file, or ask the server's operator to raise it (tuneforge api "
        "--max-upload-mb).",
        param="file",
        code="file_too_large",
    )


# What a client may upload, and what such a file holds (for the messages about a file that holds nothing).
PURPOSES = {"fine-tune": "fine-tuning examples", "evals": "an eval run's items", "batch": "a batch's requests"}


def own_file(
    service: Service, owner: str, file_id: str, param: str = "file_id", purpose: str | None = None
) -> StoredFile:
    """The caller's file; a 404 (a 400 naming `param` in another request's body) for any other id, and a 400
    naming `param` for a file uploaded with another purpose than `purpose` (when given)."""
    row = service.store.get_file(owner, file_id)
    if row is None:
        raise no_such_file(file_id, param)
    if purpose is not None and row.purpose != purpose:
        raise APIError(
            400,
            f"{row.id} was uploaded with purpose '{row.purpose}'; upload {PURPOSES[purpose]} with purpose '{purpose}'.",
            param=param,
            code="invalid_file_purpose",
        )
    return row


def no_such_file(file_id: str, param: str = "file_id") -> APIError:
    """The answer for a file the caller has none of, or whose bytes were deleted after its row was read: a 404
    (a 400 naming `param` in another request's body)."""
    return APIError(
        404 if param == "file_id" else 400, f"No such File object: {file_id}", param=param, code="file_not_found"
    )


# The Unicode categories of characters a file's name may not hold, and what each does to a listed name: a control
# character (Cc, a terminal escape) acts on a terminal; a format one (Cf: a right-to-left override, a zero-width
# space) hides or reorders what is shown.
_HIDDEN_HARM = {
    "Cc": ("control character", "which would act on the terminal of whoever lists the files"),
    "Cf": ("format character", "which makes the name look like another where the files are listed"),
}
# The format characters that a name's own letters need: the zero-width non-joiner and joiner shape Persian and
# Indic words and join emoji sequences.
_JOINERS = {"\u200c", "\u200d"}


def _hidden_harm(ch: str) -> tuple[str, str] | None:
    """What `ch` does to a listed name, where it is a character a name may not hold (`_HIDDEN_HARM`)."""
    return None if ch in _JOINERS else _HIDDEN_HARM.get(unicodedata.category(ch))


@router.post("")
def upload_file(
    file: UploadFile = File(...),
    purpose: str = Form(...),
    owner: str = Depends(caller),
    service: Service = Depends(service_of),
):
    if purpose not in PURPOSES:
        raise APIError(
            400,
            f"purpose {purpose!r:.80} is not supported here; upload training data with purpose 'fine-tune', the "
            "items of an eval run with purpose 'evals', and the requests of a batch with purpose 'batch'.",
            param="purpose",
            code="invalid_value",
        )
    if len(name := Path(file.filename or "").name) > MAX_FILENAME_CHARS:
        raise APIError(
            400,
            f"The file's name is {len(name):,} characters long; name it with at most {MAX_FILENAME_CHARS} characters.",
            param="file",
            code="invalid_value",
        )
    if (fault := nul_fault(name)) is not None:
        raise APIError(
            400,
            f"The file's name {name!r} holds {fault}; name the file without it.",
            param="file",
            code="invalid_value",
        )
    if (odd := next((ch for ch in name if _hidden_harm(ch)), None)) is not None:
        kind, harm = _hidden_harm(odd)
        raise APIError(
            400,
            f"The file's name {name!r} holds the {kind} {odd!r} at character {name.index(odd)}, {harm}; name the "
            "file without it.",
            param="file",
            code="invalid_value",
        )
    if not (file.filename or "").lower().endswith(".jsonl"):
        raise APIError(
            400,
            f"'{file.filename}' is not a .jsonl file; {PURPOSES[purpose]} are JSON Lines, one JSON object a line.",
            param="file",
            code="invalid_file_format",
        )
    try:
        row = service.storage.save(
            file.file, owner=owner, filename=file.filename, purpose=purpose, max_bytes=service.max_upload_bytes
        )
    except FileTooLarge as err:
        raise upload_too_large(service.max_upload_bytes) from err
    except FilePacked as err:
        raise APIError(400, str(err), param="file", code="invalid_file_format") from err
    if row.bytes == 0:
        service.storage.delete(row)
        raise APIError(
            400,
            f"'{row.filename}' is empty; upload {PURPOSES[purpose]}, one JSON object a line.",
            param="file",
            code="invalid_file_format",
        )
    try:
        service.store.add(row)
    except BaseException:
        # The commit may have gone through before the store failed to answer it (its connection lost): the bytes
        # go only once no row is found to list or delete them by. A store that cannot say keeps them, since a
        # listed file without its bytes is worse than bytes no row names.
        if not _row_may_exist(service, owner, row.id):
            service.storage.delete(row)
        raise
    return row.to_api()


def _row_may_exist(service: Service, owner: str, file_id: str) -> bool:
    """Whether the store holds `file_id`'s row, or cannot say so now."""
    try:
        return service.store.get_file(owner, file_id) is not None
    except Exception:  # noqa: BLE001 - the upload's own failure is the one told
        return True


@router.get("")
def list_files(
    after: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
    owner: str = Depends(caller),
    service: Service = Depends(service_of),
):
    page = service.store.list_files(owner, purpose=purpose, after=after, limit=limit, newest_first=order == "desc")
    return list_body(page, page.has_more)


@router.get("/{file_id}")
def get_file(file_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    return own_file(service, owner, file_id).to_api()


@router.get("/{file_id}/content")
def file_content(file_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    """The file's bytes, opened here: a deletion after this point leaves the open file readable to its end (POSIX
    keeps an unlinked file's bytes while it is open), so the answer is the whole file its Content-Length promises;
    one before it is the 404. No Range is offered, as OpenAI's API offers none."""
    row = own_file(service, owner, file_id)
    try:
        opened = open(service.storage.path(row), "rb")
    except FileNotFoundError:  # deleted after its row was read
        raise no_such_file(row.id) from None
    # A name of plain characters as `filename="..."`, which every client reads (`curl -OJ` reads no other); one of
    # any other characters percent-encoded as `filename*` (RFC 6266).
    named = (
        f'filename="{row.filename}"'
        if quote(row.filename) == row.filename
        else f"filename*=utf-8''{quote(row.filename)}"
    )
    headers = {"Content-Length": str(os.fstat(opened.fileno()).st_size), "Content-Disposition": f"attachment; {named}"}
    return _OpenedFileResponse(opened, headers)


class _OpenedFileResponse(StreamingResponse):
    """The bytes of a file the route opened, a chunk at a time, its handle closed when the answer ends: sent
    whole, or dropped by a client gone before the end (which leaves the chunks' iterator unfinished)."""

    def __init__(self, opened: BinaryIO, headers: dict[str, str]):
        super().__init__(_chunks(opened), media_type="application/octet-stream", headers=headers)
        self.opened = opened

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.opened.close()


def _chunks(opened: BinaryIO) -> Iterator[bytes]:
    while chunk := opened.read(CHUNK_BYTES):
        yield chunk


@router.delete("/{file_id}")
def delete_file(file_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    row = own_file(service, owner, file_id)
    # OpenAI's reference does not say what deleting a file a job still reads does: here it is refused, so nothing
    # fails later for want of its file.
    readers = (
        ("fine-tuning job", service.store.file_in_use),
        ("batch", service.store.file_in_batch),
        ("eval run", service.store.file_in_eval_run),
    )
    for what, reader_of in readers:
        if (reader := reader_of(file_id)) is not None:
            raise APIError(
                409,
                f"{file_id} is read by {what} {reader.id} ({reader.status}); cancel the {what} or wait until it "
                "finishes, then delete the file.",
                param="file_id",
                code="file_in_use",
            )
    service.store.delete_file(owner, file_id)
    service.storage.delete(row)
    return {"id": file_id, "object": "file", "deleted": True}
