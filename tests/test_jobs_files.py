"""`POST /v1/files` with hostile multipart bodies, in-process (FastAPI's TestClient): each is a 4xx in OpenAI's
shape that names what to send, and none leaves a file behind or holds the body in memory."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import io
import json
import lzma
import zipfile
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tuneforge.jobs.api import create_api
from tuneforge.jobs.store import Store

pytest.importorskip("sqlalchemy")
KEY = "key-alice"
BOUNDARY = "b0undary"
ROW = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


@pytest.fixture
def http(tmp_path) -> Iterator[TestClient]:
    app = create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=[KEY], workers=0, dashboard=False)
    with TestClient(app) as client:
        yield client


def field(name: str, value: bytes, filename: str | None = None) -> bytes:
    named = f'; filename="{filename}"' if filename is not None else ""
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"{named}\r\n\r\n'.encode() + value + b"\r\n"


def zip_of(content: bytes | None) -> bytes:
    """A zip archive holding `content` as train.jsonl; None: an archive holding nothing."""
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as archive:
        if content is not None:
            archive.writestr("train.jsonl", content)
    return packed.getvalue()


PURPOSE = field("purpose", b"fine-tune")
FILE = field("file", ROW, "train.jsonl")
END = f"--{BOUNDARY}--\r\n".encode()


def post(http: TestClient, body, content_type: str | None = f"multipart/form-data; boundary={BOUNDARY}"):
    headers = {"Authorization": f"Bearer {KEY}"} | ({"Content-Type": content_type} if content_type else {})
    return http.post("/v1/files", content=body, headers=headers)


def refusal(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


def test_a_file_over_the_upload_limit_is_refused_naming_the_limit_set_and_what_to_do(tmp_path):
    """Whether the body's Content-Length is past the limit and what multipart adds, or the file is found past it
    while it is stored, the refusal names the file's limit as --max-upload-mb set it, not the body's."""
    app = create_api(
        tmp_path,
        Store(f"sqlite:///{tmp_path / 'jobs.db'}"),
        api_keys=[KEY],
        workers=0,
        dashboard=False,
        max_upload_bytes=1 << 16,
    )
    with TestClient(app) as http:
        for rows in (1 + (1 << 16) // len(ROW), 4 * (1 << 16) // len(ROW)):
            error = refusal(post(http, PURPOSE + field("file", ROW * rows, "train.jsonl") + END), 413)
            assert (error["param"], error["code"]) == ("file", "file_too_large"), error
            assert "limit of 65,536 bytes (0.0625 MiB) on an uploaded file" in error["message"], error
            assert "--max-upload-mb" in error["message"], error


@pytest.mark.parametrize(
    "parts",
    [
        [PURPOSE, FILE, field("file", ROW, "other.jsonl")],
        [PURPOSE, field("purpose", b"batch"), FILE],
        [PURPOSE, FILE, field("notes", b"mine")],
    ],
    ids=["two files", "two purposes", "a third field"],
)
def test_an_upload_of_more_parts_than_file_and_purpose_is_refused_naming_them(http, tmp_path, parts):
    error = refusal(post(http, b"".join(parts) + END))
    assert (
        "holds more than 2 parts" in error["message"] and "'file' (a file) and 'purpose', each once" in error["message"]
    )
    assert http.get("/v1/files", headers={"Authorization": f"Bearer {KEY}"}).json()["data"] == []


def test_an_upload_cut_into_many_parts_is_refused_before_it_is_read_whole(tmp_path):
    """Starlette keeps each part of up to 1 MiB in memory: a body of many parts would be held whole. The app is
    called as the server calls it, one chunk of the body at a time, to see how many it reads."""
    chunks = [PURPOSE] + [field("file", b"x" * (1 << 16), "train.jsonl") for _ in range(64)] + [END]
    read = []

    async def receive() -> dict:
        read.append(chunks[len(read)])
        return {"type": "http.request", "body": read[-1], "more_body": len(read) < len(chunks)}

    answer = upload_as_served(tmp_path, receive)
    assert answer[0]["status"] == 400 and b"holds more than 2 parts" in answer[1]["body"]
    assert len(read) == 4


@pytest.mark.parametrize(
    "cut", [len(PURPOSE) // 2, len(PURPOSE) + 80, len(PURPOSE) + 5000], ids=["in purpose", "in file's head", "in file"]
)
def test_an_upload_the_client_stops_sending_midway_is_refused_saying_it_was_cut_short(http, tmp_path, cut):
    """A client that disconnects mid-upload (or a proxy that passes on part of the body) is told the body was cut
    short and to send it again, not that a part is missing or the body unparsable; nothing of it is stored."""
    body = PURPOSE + field("file", ROW * 100, "train.jsonl") + END
    messages = [{"type": "http.request", "body": body[:cut], "more_body": True}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    answer = upload_as_served(tmp_path, receive, content_length=len(body))
    error = json.loads(answer[1]["body"])["error"]
    assert answer[0]["status"] == 400 and error["code"] == "incomplete_body", error
    assert "cut short" in error["message"] and "Send the request again" in error["message"], error["message"]
    assert list((tmp_path / "files").iterdir()) == []
    assert http.get("/v1/files", headers={"Authorization": f"Bearer {KEY}"}).json()["data"] == []


def upload_as_served(tmp_path, receive, content_length: int | None = None) -> list[dict]:
    """The messages the app sends for a POST /v1/files whose body `receive` gives, called as the server calls it:
    one chunk of the body at a time."""
    app = create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=[KEY], workers=0, dashboard=False)
    answer = []

    async def send(message: dict) -> None:
        answer.append(message)

    headers = [
        (b"authorization", f"Bearer {KEY}".encode()),
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
    ]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "http_version": "1.1", "scheme": "http", "method": "POST", "root_path": ""}
    scope |= {"path": "/v1/files", "raw_path": b"/v1/files", "query_string": b"", "headers": headers}
    asyncio.run(app(scope, receive, send))
    return answer


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b'{"purpose": "fine-tune", "file": "train.jsonl"}', "application/json"),
        (ROW, "text/plain"),
        (b"purpose=fine-tune&file=train.jsonl", "application/x-www-form-urlencoded"),
        (ROW, None),
    ],
    ids=["json", "text", "urlencoded", "no content type"],
)
def test_an_upload_that_is_not_multipart_is_refused_saying_how_to_send_it(http, body, content_type):
    error = refusal(post(http, body, content_type))
    sent = f"as Content-Type {content_type!r}" if content_type else "without a Content-Type"
    assert error["message"] == (
        f"The request body was sent {sent}, not as multipart/form-data: send 'file' (a file) and 'purpose' as the "
        "parts of a multipart/form-data body."
    )


def test_a_file_sent_as_a_text_field_is_refused_saying_to_send_a_file(http):
    error = refusal(post(http, PURPOSE + field("file", ROW) + END))
    assert error["param"] == "file"
    assert "'file' was sent as a text field: send it as a file" in error["message"], error["message"]


@pytest.mark.parametrize(
    "body, content_type, said",
    [
        (PURPOSE + FILE + END, "multipart/form-data; boundary=other", "Expected boundary character"),
        (PURPOSE + FILE + END, "multipart/form-data", "its Content-Type names no boundary"),
        (PURPOSE + b"--" + BOUNDARY.encode() + b"\r\nno colon here\r\n\r\nx\r\n" + END, None, "invalid character"),
        (PURPOSE + b"--" + BOUNDARY.encode() + b"\r\nContent-Type: text/plain\r\n\r\nx\r\n" + END, None, '"name"'),
    ],
    ids=["wrong boundary", "no boundary", "header without a colon", "part without a name"],
)
def test_a_multipart_body_that_cannot_be_read_is_refused_saying_why_and_what_to_send(http, body, content_type, said):
    error = refusal(post(http, body, content_type or f"multipart/form-data; boundary={BOUNDARY}"))
    assert said in error["message"] and "multipart/form-data" in error["message"], error["message"]
    assert error["message"].startswith("The multipart body cannot be read"), error["message"]


# zstd and 7z as their magic numbers start them (the standard library writes neither): what the check reads.
PACKED_UPLOADS = {
    "gzip": (gzip.compress(ROW), "gzip-compressed"),
    "zip": (zip_of(ROW), "a zip archive"),
    "empty zip": (zip_of(None), "a zip archive"),
    "xz": (lzma.compress(ROW), "xz-compressed"),
    "bzip2": (bz2.compress(ROW), "bzip2-compressed"),
    "zstd": (b"\x28\xb5\x2f\xfd" + ROW, "zstd-compressed"),
    "7z": (b"7z\xbc\xaf\x27\x1c" + ROW, "a 7z archive"),
}


@pytest.mark.parametrize("content, said", PACKED_UPLOADS.values(), ids=list(PACKED_UPLOADS))
def test_a_compressed_upload_is_refused_saying_to_upload_the_text(http, tmp_path, content, said):
    """No reader of an upload decompresses it (its name ends .jsonl): a job would fail saying to rename a file the
    client cannot rename, and an eval run that line 1 is not UTF-8."""
    error = refusal(post(http, PURPOSE + field("file", content, "train.jsonl") + END))
    assert error["param"] == "file" and error["code"] == "invalid_file_format"
    assert f"'train.jsonl' is {said}" in error["message"] and "decompressed" in error["message"], error["message"]
    assert list((tmp_path / "files").iterdir()) == []


@pytest.mark.parametrize(
    "character, kind",
    [("\x1b", "control"), ("\t", "control"), ("\x7f", "control"), ("\x85", "control")]
    + [("\u202e", "format"), ("\u200b", "format")],
)
def test_a_file_name_holding_a_control_or_format_character_is_refused_naming_it(http, character, kind):
    """A name is echoed to whoever lists the files: a terminal escape in it would act on their terminal, and a
    right-to-left override or an invisible character makes it look like another name.
    (httpx and browsers send some as %XX; a client writing the header by hand sends them raw.)"""
    name = f"train{character}[31m.jsonl"
    error = refusal(post(http, PURPOSE + field("file", ROW, name) + END))
    assert error["param"] == "file" and f"{kind} character {character!r} at character 5" in error["message"]
    assert http.get("/v1/files", headers={"Authorization": f"Bearer {KEY}"}).json()["data"] == []


@pytest.mark.parametrize("name", ["می‌خواهم.jsonl", "team-👩‍💻.jsonl"])
def test_a_file_name_whose_letters_need_a_joiner_is_taken(http, name):
    """The zero-width non-joiner shapes Persian words and the joiner builds emoji sequences: format characters a
    name's own letters need, not ones that disguise it."""
    answer = post(http, PURPOSE + field("file", ROW, name) + END)
    assert answer.status_code == 200, answer.text
    assert answer.json()["filename"] == name


def test_an_unknown_purpose_is_refused_echoing_no_more_than_its_start(http):
    error = refusal(post(http, field("purpose", b"x" * 100_000) + FILE + END))
    assert error["param"] == "purpose" and error["message"].startswith("purpose 'xxxx"), error["message"]
    assert "is not supported here" in error["message"] and len(error["message"]) < 400, len(error["message"])


def test_a_file_of_another_purpose_is_refused_by_every_route_saying_which_purpose_to_upload_with(http):
    headers = {"Authorization": f"Bearer {KEY}"}

    def upload(purpose: str) -> str:
        form = field("purpose", purpose.encode()) + FILE + END
        return post(http, form).json()["id"]

    batch, training = upload("batch"), upload("fine-tune")
    job = http.post("/v1/fine_tuning/jobs", headers=headers, json={"model": "m", "training_file": batch})
    error = refusal(job)
    assert error["param"] == "training_file" and error["code"] == "invalid_file_purpose"
    assert error["message"] == (
        f"{batch} was uploaded with purpose 'batch'; upload fine-tuning examples with purpose 'fine-tune'."
    )
    request = {"input_file_id": training, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    error = refusal(http.post("/v1/batches", headers=headers, json=request))
    assert error["param"] == "input_file_id" and error["code"] == "invalid_file_purpose"
    assert error["message"] == (
        f"{training} was uploaded with purpose 'fine-tune'; upload a batch's requests with purpose 'batch'."
    )


def test_an_upload_whose_row_the_store_has_no_room_for_leaves_no_file_behind(http, tmp_path, monkeypatch):
    """The bytes are stored before the file's row: a store that refuses the row (its disk full) is a 507, and the
    stored bytes go with it rather than stay in the folder with no row to list or delete them by."""
    import errno
    import os

    def full(*_):  # as the store tells a full disk (`database._full_disk_naming`)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "jobs.db"))

    monkeypatch.setattr(Store, "add", full)
    answer = post(http, PURPOSE + FILE + END)
    assert answer.status_code == 507 and answer.json()["error"]["code"] == "insufficient_storage", answer.text
    assert list((tmp_path / "files").iterdir()) == []


def test_an_upload_whose_row_was_written_before_the_store_lost_its_connection_keeps_its_bytes(
    http, tmp_path, monkeypatch
):
    """The store's connection drops after the row's commit, before the store answers it: the row is there, so its
    bytes stay with it, rather than a listed file whose content is gone."""
    from sqlalchemy.exc import OperationalError

    added = Store.add

    def dropped_after_commit(store, row):
        added(store, row)
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"), True)

    monkeypatch.setattr(Store, "add", dropped_after_commit)
    assert post(http, PURPOSE + FILE + END).status_code == 500
    monkeypatch.undo()
    headers = {"Authorization": f"Bearer {KEY}"}
    (listed,) = http.get("/v1/files", headers=headers).json()["data"]
    assert http.get(f"/v1/files/{listed['id']}/content", headers=headers).content == ROW


def test_the_content_of_a_file_whose_bytes_go_after_its_row_was_read_is_a_404_naming_it(http, tmp_path, monkeypatch):
    """The file's bytes gone between the content route's look-up of its row and its reading (a deletion racing the
    download): the answer is the 404 for a file the caller has none of, not a 500."""
    looked_up = Store.get_file

    def then_deleted(store, owner, file_id):  # the deletion's unlink lands just after the look-up
        row = looked_up(store, owner, file_id)
        (tmp_path / "files" / f"{file_id}.jsonl").unlink()
        return row

    file_id = post(http, PURPOSE + FILE + END).json()["id"]
    headers = {"Authorization": f"Bearer {KEY}"}
    assert http.get(f"/v1/files/{file_id}/content", headers=headers).content == ROW
    monkeypatch.setattr(Store, "get_file", then_deleted)
    error = refusal(http.get(f"/v1/files/{file_id}/content", headers=headers), 404)
    assert error == {
        "message": f"No such File object: {file_id}",
        "type": "invalid_request_error",
        "param": "file_id",
        "code": "file_not_found",
    }


def test_the_content_of_a_file_deleted_as_it_is_sent_comes_whole_with_its_length(http, tmp_path):
    """A deletion that lands once the answer's headers are sent (a DELETE racing the download): the bytes already
    opened are sent whole, as many as Content-Length says, not a 200 cut off after its headers. No range of the
    file is offered, as OpenAI's API offers none."""
    file_id = post(http, PURPOSE + FILE + END).json()["id"]
    answer, requests = [], [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict:  # the request, then a client that waits for the whole answer
        if requests:
            return requests.pop()
        await asyncio.Event().wait()

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            (tmp_path / "files" / f"{file_id}.jsonl").unlink()
        answer.append(message)

    path = f"/v1/files/{file_id}/content"
    scope = {"type": "http", "http_version": "1.1", "scheme": "http", "method": "GET", "root_path": ""}
    scope |= {"path": path, "raw_path": path.encode(), "query_string": b""}
    scope["headers"] = [(b"authorization", f"Bearer {KEY}".encode())]
    asyncio.run(http.app(scope, receive, send))
    headers = dict(answer[0]["headers"])
    assert answer[0]["status"] == 200 and headers[b"content-length"] == str(len(ROW)).encode()
    assert b"accept-ranges" not in headers
    assert b"".join(message["body"] for message in answer[1:]) == ROW and not answer[-1]["more_body"]


@pytest.mark.parametrize("drops_at", ["http.response.start", "http.response.body"])
def test_the_content_of_a_file_a_client_drops_mid_download_has_its_handle_closed(http, monkeypatch, drops_at):
    """A client that goes away before the first chunk or after it: the handle the route opened is closed when the
    answer ends, not left to the garbage collector (a deleted file's disk space is held while it is open)."""
    from tuneforge.jobs.routes import files

    file_id = post(http, PURPOSE + field("file", ROW * 30_000, "train.jsonl") + END).json()["id"]
    opened = []

    def opening(*args):
        opened.append(open(*args))
        return opened[-1]

    monkeypatch.setattr(files, "open", opening, raising=False)
    gone, requests = asyncio.Event(), [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict:  # the request, then the client's disconnect once it has what it waits for
        if requests:
            return requests.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == drops_at:
            gone.set()
            await asyncio.sleep(0.2)

    async def download() -> bool:
        path = f"/v1/files/{file_id}/content"
        scope = {"type": "http", "http_version": "1.1", "scheme": "http", "method": "GET", "root_path": ""}
        scope |= {"path": path, "raw_path": path.encode(), "query_string": b""}
        scope["headers"] = [(b"authorization", f"Bearer {KEY}".encode())]
        await http.app(scope, receive, send)
        return opened[0].closed

    assert asyncio.run(download())


@pytest.mark.parametrize(
    ("filename", "disposition"),
    [
        ("train.jsonl", 'attachment; filename="train.jsonl"'),
        ("träin é.jsonl", "attachment; filename*=utf-8''tr%C3%A4in%20%C3%A9.jsonl"),
    ],
)
def test_the_content_of_a_file_is_named_by_its_filename(http, filename, disposition):
    """A name of plain characters is sent as `filename="..."`, which every client reads (`curl -OJ` reads no
    other), and one of any other characters percent-encoded as `filename*`."""
    file_id = post(http, PURPOSE + field("file", ROW, filename) + END).json()["id"]
    answer = http.get(f"/v1/files/{file_id}/content", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.headers["content-disposition"] == disposition
