"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes.

A validation error is a 400 naming the parameter, not FastAPI's 422. Nothing a client reads holds
a traceback or a server path: an unexpected failure is logged with its traceback under an error
id, and the client gets the id.
"""

from __future__ import annotations

import logging
import re
import secrets
from http import HTTPMethod
from typing import Any, get_args

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match, Mount
from starlette.staticfiles import StaticFiles

from ..database import UnknownCursor
from ..errors import complaint, declared_bounds, json_kind, key_path, unreadable_json
from ..fsio import refused_write, refused_write_line
from ..wording import did_you_mean
from .shapes import MAX_FILENAME_CHARS, FormFields, multipart_boundary

log = logging.getLogger("tuneforge.web")

# An absolute path: a slash that does not follow a word, a URL's scheme or another slash, then its parts.
_SERVER_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;()<>]*")


class APIError(Exception):
    """An error answered in OpenAI's shape; `headers` go with it (Retry-After on a 429)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BodyReadError(StarletteHTTPException):
    """An `APIError` raised while a route reads the request body. FastAPI passes only HTTP exceptions on
    from there (any other becomes its own generic 400), so the error travels inside one."""

    def __init__(self, error: APIError):
        super().__init__(error.status, error.message, headers=error.headers)
        self.error = error


def failure_id() -> str:
    """The id a client quotes to the operator, who finds the details under it in the server's log."""
    return f"err_{secrets.token_hex(6)}"


def scrub_paths(text: str) -> str:
    """`text` with every absolute path replaced: messages written for an operator's terminal, shown to a client."""
    return _SERVER_PATH.sub("<server path>", text)


def server_error(err: BaseException, what: str = "The server failed on this request") -> APIError:
    """A 500 for an unexpected failure; the traceback goes to the log under the id the message gives."""
    error_id = failure_id()
    log.error("%s (error id %s)", what, error_id, exc_info=err)
    return APIError(
        500,
        f"{what} (error id {error_id}). Try again; if it keeps failing, give the server's operator this id.",
        type="server_error",
        code="server_error",
    )


def no_room(err: OSError) -> APIError:
    """A 507 for a write the machine refused (a full disk, a used-up quota, a file size limit): the server's
    state, which its operator mends, not a defect. The log has one line naming the path and what to do; the
    client, without the path, is told to try again later."""
    log.error("%s", refused_write_line(err))
    return APIError(
        507,
        "The server has no room to store this. Try again later; the server's operator frees space.",
        type="server_error",
        code="insufficient_storage",
    )


def unexpected(err: Exception, what: str = "The server failed on this request") -> APIError:
    """The answer to an exception no route foresaw: `no_room` for a write the machine refused, else `server_error`
    saying `what`."""
    if refused_write(err):
        return no_room(err)
    return server_error(err, what)


def install_error_handlers(app: FastAPI, forms: dict[str, FormFields]) -> None:
    """Every error as OpenAI's body: APIError, validation (400 naming the parameter; on the paths of `forms`, saying
    how to send the form), HTTP errors, the unexpected."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(UnknownCursor)
    async def unknown_cursor(request: Request, err: UnknownCursor):
        return APIError(
            400,
            f"after: {err.after!r} is not in this list; give the id of the last object of the page before.",
            param="after",
        ).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        content_type = request.headers.get("content-type")
        if (fields := forms.get(request.scope["path"])) is not None:
            return form_error(err.errors()[0], fields, content_type).response()
        route = request.scope.get("route")
        body = getattr(route, "body_field", None)
        model = body.field_info.annotation if body is not None else None
        dependant = getattr(route, "dependant", None)
        params = [*dependant.query_params, *dependant.path_params] if dependant is not None else []
        fields = {param.alias: param.field_info for param in params}
        return validation_error(err.errors()[0], content_type, model, fields).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if err.status_code >= 500:
            return server_error(err).response()
        if isinstance(err, BodyReadError):
            return err.error.response()
        if isinstance(err.__cause__, ClientDisconnect):  # FastAPI's "There was an error parsing the body"
            return cut_short(request).response()
        if (unreadable := unreadable_body(err.__cause__)) is not None:
            return unreadable.response()
        if isinstance(err.__context__, MultiPartException):  # Starlette's "Invalid multipart data." says no more
            return unreadable_form(err.__context__).response()
        if err.status_code == 405:
            return method_not_allowed(request).response()
        if err.status_code == 404 and isinstance(request.scope.get("endpoint"), StaticFiles):
            # A static mount (the dashboard's /ui/static/) has the path, and no file there has this name.
            return APIError(
                404,
                f"File not found ({request.method} {request.url.path}): no file of this server's static files has "
                "that name.",
                code="not_found",
            ).response()
        if err.status_code == 404:
            # The router's: no route has this path (routes answer a missing object with an APIError naming it).
            # Starlette's "Not Found" reads as the object named in the path being missing.
            return APIError(
                404,
                f"Invalid URL ({request.method} {request.url.path}): this server has no endpoint at that path.",
                code="unknown_url",
            ).response()
        return APIError(err.status_code, str(err.detail), headers=err.headers).response()

    app.add_middleware(AnswerUnexpected)


class AnswerUnexpected:
    """ASGI middleware: an unexpected exception becomes the answer of `unexpected` (a 500 logged once under
    its id). (Starlette's handler for `Exception` answers the client but raises again, so the server would
    log the traceback a second time, without the id.) One raised after the answer has started goes on up.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def noting_start(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, noting_start)
        except Exception as err:
            if started:
                raise
            await unexpected(err).response()(scope, receive, send)


def method_not_allowed(request: Request) -> APIError:
    """The 405 naming the methods the request's path takes, found by asking the app's routes about each.
    (Starlette's says "Method Not Allowed", and its Allow header names the first route's methods only,
    where several routes share a path.)"""
    # The path as the app's routes first saw it: a mount the request went into has moved its root_path.
    root_path = request.scope.get("app_root_path", request.scope.get("root_path", ""))
    asked = {"type": "http", "path": request.scope["path"], "root_path": root_path}
    allowed = [
        method.value
        for method in HTTPMethod
        if any(_takes(route, {**asked, "method": method.value}) for route in request.app.router.routes)
    ]
    return APIError(
        405,
        f"Invalid method for URL ({request.method} {request.url.path}): this server takes {', '.join(allowed)} there.",
        code="method_not_allowed",
        headers={"Allow": ", ".join(allowed)},
    )


def _takes(route: BaseRoute, scope: dict) -> bool:
    if route.matches(scope)[0] is not Match.FULL:
        return False
    # A mount matches every method and leaves the choice to its app; static files are only read.
    return not isinstance(route, Mount) or not isinstance(route.app, StaticFiles) or scope["method"] in ("GET", "HEAD")


def cut_short(request: Request) -> APIError:
    """The 400 for a body whose client stopped sending before its end (it disconnected, or a proxy passed on part
    of it): what arrived is not read as a body, so a cut form does not read as one missing a part."""
    declared = request.headers.get("content-length")
    of = f" of the {int(declared):,} bytes its Content-Length gives" if declared and declared.isdigit() else ""
    return APIError(
        400,
        f"The request body was cut short: the connection ended before all{of} arrived, and nothing of it was kept. "
        "Send the request again.",
        code="incomplete_body",
    )


def unreadable_body(cause: BaseException | None) -> APIError | None:
    """The 400 for a body Python's JSON reader gave up on: FastAPI's "There was an error parsing the body"
    says no more, so the reason comes from its cause (None for a cause this does not know)."""
    if isinstance(cause, UnicodeDecodeError):
        return not_utf8(cause)
    if (what := unreadable_json(cause)) is None:
        return None
    advice = (
        "send the parameters less deeply nested"
        if isinstance(cause, RecursionError)
        else "send numbers with fewer digits"
    )
    return APIError(400, f"The request body {what}; {advice}.", code="invalid_value")


def unreadable_form(err: MultiPartException) -> APIError:
    """The 400 for a multipart body Starlette could not read, with python-multipart's reason where it gave one
    (Starlette's own message, "Invalid multipart data.", says none). A part's header line past python-multipart's
    limit is, in practice, the Content-Disposition of a file with a very long name."""
    if "Maximum header size exceeded" in str(err.__cause__):
        return APIError(
            400,
            "A header of the multipart body is longer than this server reads, most likely because the file's "
            f"name is too long; name the file with at most {MAX_FILENAME_CHARS} characters.",
            param="file",
            code="invalid_value",
        )
    if err.message == "Missing boundary in multipart.":
        reason = "its Content-Type names no boundary"
    else:
        reason = str(err.__cause__ or err.message).rstrip(".")
    return APIError(
        400,
        f"The multipart body cannot be read: {reason}. Send it as multipart/form-data, its parts separated by the "
        'boundary its Content-Type names, each headed by Content-Disposition: form-data; name="...".',
        code="invalid_value",
    )


def form_listing(fields: FormFields) -> str:
    """A form's fields for a message: "'file' (a file) and 'purpose'"."""
    return " and ".join(f"'{name}'" + " (a file)" * takes_file for name, takes_file in fields.items())


def form_error(first: dict, fields: FormFields, content_type: str | None) -> APIError:
    """The 400 for pydantic's first complaint about a form: a body that is not multipart is said to be, and a
    file sent as a text field; any other complaint as `validation_error` says it."""
    if multipart_boundary(content_type) is None:
        sent = f"as Content-Type {content_type!r}" if content_type else "without a Content-Type"
        return APIError(
            400,
            f"The request body was sent {sent}, not as multipart/form-data: send {form_listing(fields)} as the "
            "parts of a multipart/form-data body.",
            code="invalid_value",
        )
    name = first.get("loc", (None, None))[-1]
    if fields.get(name) and isinstance(first.get("input"), str):
        return APIError(
            400,
            f"'{name}' was sent as a text field: send it as a file, a part whose Content-Disposition gives its "
            f'filename (form-data; name="{name}"; filename="...").',
            param=name,
            code="invalid_value",
        )
    return validation_error(first, content_type)


def not_utf8(err: UnicodeDecodeError) -> APIError:
    return APIError(
        400,
        f"The request body is not UTF-8: byte {err.object[err.start]:#04x} at position {err.start} cannot be "
        "decoded. Send the JSON encoded as UTF-8.",
        code="invalid_value",
    )


def validation_error(
    first: dict, content_type: str | None = None, model: Any = None, params: dict[str, FieldInfo] | None = None
) -> APIError:
    """The 400 for pydantic's first complaint about a request, naming the parameter it is about
    (`content_type` is the request's, said when the body was not read as JSON; `model`, the body's model, gives
    the name a misspelt argument most likely meant; it and `params`, the route's query and path parameters by
    name, give every bound of a number out of them)."""
    loc = list(first.get("loc", ()))
    source = loc[0] if loc and loc[0] in ("body", "query", "path", "header") else None
    if source is not None:  # where it came from, not its name
        loc = loc[1:]
    loc = key_path(loc)
    param = ".".join(map(str, loc)) or None
    kind = first.get("type")
    if kind == "missing" and param is None:
        message = "The request has no body: send the parameters as a JSON object."
    elif param is None and isinstance(first.get("input"), bytes):  # FastAPI reads JSON only when the type says so
        message = (
            f"The request body was sent as Content-Type {content_type!r}, not as JSON: send the parameters "
            "as a JSON object with Content-Type: application/json."
        )
    elif param is None and not isinstance(first.get("input"), dict):
        message = f"The request body is {json_kind(first.get('input'))}: send the parameters as a JSON object."
    elif kind == "extra_forbidden":
        meant = did_you_mean(str(loc[-1]), _arguments_at(model, loc[:-1]))
        message = f"Unrecognized request argument supplied: {param}{meant}"
    elif kind == "missing":
        message = f"Missing required parameter: '{param}'."
    elif kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", "it cannot be parsed")
        message, param = f"The request body is not valid JSON: {reason}", None
    elif kind == "not_unicode":  # the body's check of its text (`RequestBody`) says where the text is
        message, param = complaint(first), first["ctx"]["path"]
    else:
        field = (params or {}).get(param) if source in ("query", "path") else _field_at(model, loc)
        said = complaint(first, declared_bounds(field.metadata) if field is not None else None)
        message = f"Invalid value for '{param}': {said}" if param else said or "Invalid request"
    return APIError(400, message, param=param, code="invalid_value")


def _field_at(model: Any, loc: list) -> FieldInfo | None:
    """The field of the body model `model` at `loc` (its last key); None where `loc` leads to no one field (an
    empty `loc`: a check of the whole body)."""
    if not loc:
        return None
    fields = [found.model_fields[loc[-1]] for found in _models_at(model, loc[:-1]) if loc[-1] in found.model_fields]
    return fields[0] if len(fields) == 1 else None


def _arguments_at(model: Any, loc: list) -> list[str]:
    """The argument names the body model `model` takes at `loc` (its keys); none where `loc` leads to no one
    model."""
    models = _models_at(model, loc)
    return list(models[0].model_fields) if len(models) == 1 else []


def _models_at(model: Any, loc: list) -> list[type[BaseModel]]:
    """The models the body model `model` holds at `loc` (a list's indexes are passed over, and a union's member is
    the one pydantic names by its tag or class)."""
    models = _models_in(model)  # a route's body may be no model (a dict), or a union of several
    for part in loc:
        if part.isdigit():
            continue
        if any(part in found.model_fields for found in models):
            fields = [found.model_fields[part].annotation for found in models if part in found.model_fields]
            models = [inner for annotation in fields for inner in _models_in(annotation)]
        else:  # a union's member, named before its keys (`source.file_content.contnet`)
            models = [found for found in models if part in (found.__name__, *_tags(found))]
    return models


def _tags(model: type[BaseModel]) -> tuple:
    """The values of the model's `type` (a discriminated union's tag), if it has one."""
    field = model.model_fields.get("type")
    return get_args(field.annotation) if field is not None else ()


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation holds (`Method | None`, `list[Integration]`, `Annotated[A | B, ...]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [found for arg in get_args(annotation) for found in _models_in(arg)]
