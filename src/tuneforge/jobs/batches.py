"""OpenAI's Batch API on the jobs service: a JSONL file of requests to one endpoint, answered in the background
by the same route a live request takes, into an output file and an error file.

A batch is created `validating`; the server's batch runner (`BatchRunner`, a task of the API's event loop, as
it answers with the API's own inference models) claims it from the store, checks the input file (each line
`{"custom_id", "method": "POST", "url": ENDPOINT, "body": {...}}`, custom ids unique, every model one the
caller may use; a bad file fails the batch with `errors` naming the lines) and moves it `in_progress`. Each
request then goes through the live route (`routes.inference.forward`: serve's body classes, its checks and
the model's serve app), a few at a time; its answer, whatever its status, is kept in the store with the
batch's counts as it comes, so a batch whose server stops resumes on the next server without answering a
line twice. At the end (`finalizing`) the 2xx answers become the output file and the others the error file
(files of the files API, purpose `batch_output`, written whole), and the batch is `completed`. A cancelled
batch (`cancelling`) stops taking requests, and its answered lines become its files (`cancelled`).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.authentication import SimpleUser

from ..data.readers import bounded_lines
from ..errors import unreadable_json
from ..serve import ChatCompletionBody, CompletionBody, ResponsesBody
from ..web import APIError, Metadata, RequestBody, StoredText, nul_fault, unexpected
from ..web.errors import validation_error
from ..web.shapes import not_unicode
from .files import FileStorage
from .service import Service
from .store import Batch, BatchLine, StoredFile, now

log = logging.getLogger("tuneforge.jobs")

BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionBody,
    "/v1/completions": CompletionBody,
    "/v1/responses": ResponsesBody,
}
MAX_REQUESTS = 50_000  # OpenAI's limit of requests in one batch
MAX_ERRORS = 100  # of an input file's problems, listed in the batch's `errors`
IN_FLIGHT = 8  # requests of one batch answered at once (the engine decodes them together)
BUSY_RETRY_S = 1.0  # wait before asking again when the engine's queue is full (a 429)
COMPLETION_WINDOW_S = 24 * 3600


class CreateBatchBody(RequestBody):
    input_file_id: StoredText
    endpoint: str
    completion_window: str
    metadata: Metadata | None = None
    output_expires_after: dict[str, Any] | None = None  # accepted: this server keeps output files until deleted

    def check(self) -> None:
        if self.endpoint not in BODIES:
            raise APIError(
                400,
                f"endpoint {self.endpoint!r:.80} is not supported here; give one of {', '.join(BODIES)}.",
                param="endpoint",
                code="invalid_value",
            )
        if self.completion_window != "24h":
            raise APIError(
                400,
                f"completion_window {self.completion_window!r:.40} is not supported; give '24h'.",
                param="completion_window",
                code="invalid_value",
            )


def batch_body(row: Batch) -> dict:
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": {"object": "list", "data": row.errors} if row.errors else None,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": row.created_at,
        "in_progress_at": row.in_progress_at,
        "expires_at": row.created_at + COMPLETION_WINDOW_S,
        "finalizing_at": row.finalizing_at,
        "completed_at": row.completed_at,
        "failed_at": row.failed_at,
        "expired_at": None,
        "cancelling_at": row.cancelling_at,
        "cancelled_at": row.cancelled_at,
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "metadata": row.metadata_,
        "model": row.model,
        "usage": row.usage,
    }


# ---- the input file ------------------------------------------------------------------------------


class Request(BaseModel):
    index: int  # the request's place among the file's requests
    custom_id: str
    body: Any


class InvalidInput(Exception):
    def __init__(self, errors: list[dict]):
        super().__init__(errors[0]["message"])
        self.errors = errors


def read_requests(service: Service, batch: Batch) -> list[Request]:
    """The requests of the batch's input file; `InvalidInput` lists the problems, each naming its line."""
    errors: list[dict] = []

    def problem(line: int | None, code: str, message: str, param: str | None = None) -> None:
        where = f"{batch.input_file_id} line {line}: " if line else f"{batch.input_file_id}: "
        errors.append({"code": code, "message": where + message, "param": param, "line": line})

    def not_text(line: int, param: str, found: tuple[str, int, str]) -> None:
        problem(
            line,
            "invalid_value",
            f"{param} is not Unicode text: character {found[1]} ({found[2]}) is one half of a UTF-16 surrogate pair "
            "alone; a \\u escape of a character beyond U+FFFF needs both halves.",
            param,
        )

    row = service.store.get_file(batch.owner, batch.input_file_id)
    if row is None:
        raise InvalidInput(
            [
                {
                    "code": "file_not_found",
                    "message": f"The input file {batch.input_file_id} has been deleted.",
                    "param": "input_file_id",
                    "line": None,
                }
            ]
        )
    requests: list[Request] = []
    first_line: dict[str, int] = {}
    models: dict[str, APIError | None] = {}
    for number, raw in _lines(service.storage, row, service.max_body_bytes):
        if len(errors) >= MAX_ERRORS:
            break
        if raw is None:
            problem(
                number,
                "request_too_large",
                f"it is over this server's limit of {service.max_body_bytes:,} bytes on a request body, so it is "
                "not read; send a shorter request.",
            )
            continue
        try:
            request = json.loads(raw)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            what = unreadable_json(err) or f"is not a JSON object ({err})"
            problem(number, "invalid_json_line", f"it {what}; each line must be one request.")
            continue
        if not isinstance(request, dict):
            problem(number, "invalid_json_line", "it is not a JSON object; each line must be one request.")
            continue
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problem(number, "missing_required_parameter", "custom_id must be a non-empty string.", "custom_id")
        elif (found := not_unicode(custom_id)) is not None:  # the output and error files, UTF-8, echo it
            not_text(number, "custom_id", found)
        elif custom_id in first_line:
            problem(
                number,
                "duplicate_custom_id",
                f"custom_id {custom_id!r:.80} is the custom_id of line {first_line[custom_id]} too; give each "
                "request its own.",
                "custom_id",
            )
        else:
            first_line[custom_id] = number
        if request.get("method") != "POST":
            problem(number, "invalid_method", f"method must be 'POST', not {request.get('method')!r:.40}.", "method")
        if request.get("url") != batch.endpoint:
            problem(
                number,
                "invalid_url",
                f"url {request.get('url')!r:.80} is not the batch's endpoint {batch.endpoint!r}; a batch's requests "
                "all go to its endpoint.",
                "url",
            )
        body = request.get("body")
        if not isinstance(body, dict):
            problem(number, "invalid_request", "body must be the request's parameters, a JSON object.", "body")
        elif isinstance(model := body.get("model"), str) and (found := not_unicode(model)) is not None:
            not_text(number, "body.model", found)  # the batch's errors, UTF-8, echo it
        elif isinstance(model, str) and (fault := nul_fault(model)) is not None:  # no store looks a NUL up
            problem(number, "invalid_value", f"body.model holds {fault}; leave it out.", "body.model")
        elif isinstance(model, str) and not batch.in_progress_at:
            # A batch taken up again after a restart was checked when it started: a model gone since fails the
            # lines still to answer (the live route's 404), not the lines already answered with the batch.
            if model not in models:
                try:
                    service.access.for_inference(batch.owner, model)
                    models[model] = None
                except APIError as err:
                    models[model] = err
            if (refused := models[model]) is not None:
                problem(number, refused.code or "model_not_found", refused.message, "body.model")
        requests.append(Request(index=len(requests), custom_id=str(custom_id), body=body))
    if not errors and not requests:
        problem(None, "empty_file", "the file holds no requests.")
    if not errors and len(requests) > MAX_REQUESTS:
        problem(
            None,
            "too_many_tasks",
            f"the file holds {len(requests):,} requests; a batch takes at most {MAX_REQUESTS:,}.",
        )
    if errors:
        raise InvalidInput(errors)
    return requests


def _lines(storage: FileStorage, row: StoredFile, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """The file's non-blank lines, numbered from 1 (json.loads reads their UTF-8, saying where it is not); None
    stands for a line over `limit` bytes, left unread: parsed whole, it would take several times its size."""
    with open(storage.path(row), "rb") as lines:
        for number, raw in enumerate(bounded_lines(lines, limit), start=1):
            if raw is None or raw.strip():
                yield number, raw


# ---- answering -----------------------------------------------------------------------------------


class Stopped(Exception):
    """The server is stopping: the batch goes back to be claimed by the next server."""


class BatchRunner:
    """Claims batches and answers their requests, on the API's event loop, until `stop`."""

    def __init__(self, service: Service, worker_id: str, *, poll_s: float = 0.5):
        self.service, self.store, self.worker_id, self.poll_s = service, service.store, worker_id, poll_s
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                batch = await asyncio.to_thread(self.store.claim_batch, self.worker_id)
                if batch is None:
                    await self._wait(self.poll_s)
                    continue
                try:
                    await self._run(batch)
                except Stopped:
                    await asyncio.to_thread(self._release, batch, "validating")
                except Exception as err:  # noqa: BLE001 - one batch's unforeseen failure fails that batch alone
                    failure = unexpected(err, f"The server failed on batch {batch.id}")
                    await asyncio.to_thread(
                        self.store.move_batch,
                        batch.id,
                        ["validating", "in_progress", "finalizing", "cancelling"],
                        held_by=self.worker_id,
                        status="failed",
                        failed_at=now(),
                        errors=[{"code": failure.code, "message": failure.message, "param": None, "line": None}],
                    )
                finally:
                    await asyncio.to_thread(self._release, batch, None)
            except Exception:  # noqa: BLE001 - the runner must outlive a database hiccup; it retries
                log.exception("batch runner %s", self.worker_id)
                await self._wait(self.poll_s * 4)

    async def _wait(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    def _release(self, batch: Batch, status: str | None) -> None:
        """Let go of the batch; a running one goes back to `status` (the next server validates it again)."""
        if status is not None:
            self.store.move_batch(
                batch.id, ["in_progress", "finalizing"], held_by=self.worker_id, status=status, worker_id=None
            )
        self.store.move_batch(batch.id, [*_ALL], held_by=self.worker_id, worker_id=None)

    async def _run(self, batch: Batch) -> None:
        if batch.status == "cancelling":
            await self._finish(batch, "cancelled")
            return
        try:
            requests = await asyncio.to_thread(read_requests, self.service, batch)
        except InvalidInput as invalid:
            await asyncio.to_thread(
                self.store.move_batch,
                batch.id,
                ["validating"],
                held_by=self.worker_id,
                status="failed",
                failed_at=now(),
                errors=invalid.errors,
            )
            return
        started = await asyncio.to_thread(
            self.store.move_batch,
            batch.id,
            ["validating"],
            held_by=self.worker_id,
            status="in_progress",
            total=len(requests),
            model=next((r.body["model"] for r in requests if isinstance(r.body.get("model"), str)), None),
            in_progress_at=batch.in_progress_at or now(),
        )
        if not started:  # cancelled meanwhile: the next claim finishes it
            return
        answered = await asyncio.to_thread(self.store.answered_indexes, batch.id)
        ended = await self._answer_all(batch, [r for r in requests if r.index not in answered])
        if ended == "stopping":
            raise Stopped
        if ended == "cancelling":
            await self._finish(batch, "cancelled")
            return
        if await asyncio.to_thread(
            self.store.move_batch,
            batch.id,
            ["in_progress"],
            held_by=self.worker_id,
            status="finalizing",
            finalizing_at=now(),
        ):
            await self._finish(batch, "completed")
        else:
            await self._finish(batch, "cancelled")

    async def _answer_all(self, batch: Batch, requests: list[Request]) -> str | None:
        """Answer the requests, `IN_FLIGHT` at a time, keeping each answer; what ended them early: 'cancelling'
        or 'stopping', else None."""
        ended: str | None = None
        hang_up = asyncio.Event()  # in-flight requests stop decoding, unanswered
        watcher = asyncio.ensure_future(self._watch(batch, hang_up))
        places = asyncio.Semaphore(IN_FLIGHT)

        async def one(request: Request) -> None:
            try:
                status, body = await self._answer(batch, request, hang_up)
                if hang_up.is_set():
                    return  # cut short: answered again by whoever runs the batch next, or not at all
                line = _output_line(request, status, body)
                await asyncio.to_thread(
                    self.store.add_batch_line,
                    self.worker_id,
                    BatchLine(batch_id=batch.id, index=request.index, ok=status < 300, line=line),
                )
            finally:
                places.release()

        tasks = []
        try:
            for request in requests:
                await places.acquire()
                if hang_up.is_set():
                    places.release()
                    break
                tasks.append(asyncio.ensure_future(one(request)))
            await asyncio.gather(*tasks)
        finally:
            watcher.cancel()
            if hang_up.is_set():
                ended = "stopping" if self._stopping.is_set() else "cancelling"
            for task in tasks:
                task.cancel()
        return ended

    async def _watch(self, batch: Batch, hang_up: asyncio.Event) -> None:
        """Hang up the batch's requests once it is cancelled or the server stops."""
        while True:
            await self._wait(self.poll_s)
            if self._stopping.is_set():
                break
            current = await asyncio.to_thread(self.store.get_batch, batch.id)
            if current is None or current.status != "in_progress" or current.worker_id != self.worker_id:
                break
        hang_up.set()

    async def _answer(self, batch: Batch, request: Request, hang_up: asyncio.Event) -> tuple[int, dict]:
        """The status and body the live route gives `request`; a full engine queue (429) is asked again."""
        from .routes.inference import forward

        while True:
            try:
                body_model = BODIES[batch.endpoint]
                body = body_model.model_validate(request.body)
                if getattr(body, "stream", None):
                    raise APIError(
                        400,
                        "stream: a batch's answers are written to its output file; leave `stream` out.",
                        param="stream",
                        code="invalid_value",
                    )
                forwarded = await forward(self.service, batch.owner, body)
                status, answer = await _called(forwarded, batch.endpoint, batch.owner, hang_up)
            except ValidationError as err:
                status, answer = 400, validation_error(err.errors()[0], model=body_model).body()
            except APIError as err:
                status, answer = err.status, err.body()
            except Exception as err:  # noqa: BLE001 - one request's unforeseen failure fails that line alone
                failure = unexpected(err, f"The server failed on request {request.custom_id!r} of {batch.id}")
                status, answer = failure.status, failure.body()
            if status != 429 or hang_up.is_set():
                return status, answer
            try:
                await asyncio.wait_for(hang_up.wait(), BUSY_RETRY_S)
            except TimeoutError:
                pass

    async def _finish(self, batch: Batch, status: str) -> None:
        """Write the answered lines into the output and error files and end the batch in `status`."""
        lines = await asyncio.to_thread(self.store.batch_lines, batch.id)
        files = await asyncio.to_thread(self._write_files, batch, lines)
        values = {"status": status, f"{status}_at": now(), "usage": _usage(lines)}
        done = await asyncio.to_thread(
            self.store.finish_batch,
            batch.id,
            self.worker_id,
            ["finalizing", "cancelling", "in_progress"],
            list(files.values()),
            output_file_id=files["output"].id if "output" in files else None,
            error_file_id=files["error"].id if "error" in files else None,
            **values,
        )
        if not done:
            for row in files.values():
                self.service.storage.delete(row)

    def _write_files(self, batch: Batch, lines: list[BatchLine]) -> dict[str, StoredFile]:
        files = {}
        for kind, ok in (("output", True), ("error", False)):
            chosen = [line.line for line in lines if line.ok == ok]
            if chosen:
                text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in chosen).encode()
                files[kind] = self.service.storage.save(
                    io.BytesIO(text),
                    owner=batch.owner,
                    filename=f"{batch.id}_{kind}.jsonl",
                    purpose="batch_output",
                    max_bytes=1 << 40,
                )
        return files


_ALL = ("validating", "in_progress", "finalizing", "cancelling", "completed", "failed", "cancelled", "expired")


def _usage(lines: list[BatchLine]) -> dict:
    """The tokens of the answered requests, as OpenAI's batch `usage` (chat and completions bodies count
    prompt and completion tokens, responses bodies input and output tokens)."""
    read = output = reasoning = 0
    for line in lines:
        body = line.line["response"]["body"] if line.ok else None
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict):
            read += usage.get("prompt_tokens", usage.get("input_tokens")) or 0
            output += usage.get("completion_tokens", usage.get("output_tokens")) or 0
            details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
            reasoning += details.get("reasoning_tokens") or 0
    return {
        "input_tokens": read,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": read + output,
    }


def _output_line(request: Request, status: int, body: dict | None) -> dict:
    return {
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": request.custom_id,
        "response": {"status_code": status, "request_id": f"req_{secrets.token_hex(12)}", "body": body},
        "error": None,
    }


async def _called(forwarded, url: str, owner: str, hang_up: asyncio.Event) -> tuple[int, dict | None]:
    """Call the forwarded request as the route's client would and read its answer; `hang_up` disconnects."""
    status, chunks = 500, []

    async def receive() -> dict:  # read after the forwarded body: the client hangs up with `hang_up`
        await hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": url,
        "raw_path": url.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": None,
        "server": None,
        "user": SimpleUser(owner),
    }
    await forwarded(scope, receive, send)
    raw = b"".join(chunks)
    try:
        return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return status, {"text": raw.decode(errors="replace")}
