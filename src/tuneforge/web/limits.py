"""The body cap, the cap on a form's parts, the refusal of a NUL in a URL, and `edge`: what every app of both servers
puts in front of its routes."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, FastAPI, params
from fastapi.routing import APIRoute
from starlette.datastructures import QueryParams
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import Pages, require_keys
from .errors import APIError, BodyReadError, form_listing, install_error_handlers
from .observe import Observer, observe
from .shapes import FormFields, multipart_boundary, nul_fault

HEALTH_PATH = "/health"


class BodyLimit:
    """Refuses bodies beyond `max_bytes` (or `per_path`'s own limit, with its own refusal): at once by
    Content-Length, else while reading, so no more than the limit is ever read."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, per_path: dict[str, tuple[int, APIError]] | None = None):
        self.app, self.max_bytes, self.per_path = app, max_bytes, per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, refusal = self.per_path.get(scope["path"]) or (self.max_bytes, _too_large(self.max_bytes))
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            await refusal.response()(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyReadError(refusal)
            return message

        await self.app(scope, counted, send)


class PartLimit:
    """Refuses a multipart body of more parts than its route takes (`fields`: path -> its form fields), counting
    the boundary's delimiters as the body is read. Starlette keeps each part of up to 1 MiB in memory, so a body
    cut into many parts would be held whole; and a field given twice (two files, two purposes) would reach the
    route as its last one."""

    def __init__(self, app: ASGIApp, *, fields: dict[str, FormFields]):
        self.app, self.fields = app, fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fields = self.fields.get(scope["path"]) if scope["type"] == "http" else None
        content_type = dict(scope["headers"]).get(b"content-type", b"") if fields else b""
        if not (boundary := multipart_boundary(content_type.decode("latin-1"))):
            await self.app(scope, receive, send)
            return
        delimiter = b"\r\n--" + boundary.encode("latin-1")
        seen, tail = 0, b"\r\n"  # the body's first delimiter comes without a line break before it

        async def counted() -> dict:
            nonlocal seen, tail
            message = await receive()
            data = tail + message.get("body", b"")
            seen += data.count(delimiter)
            tail = data[-(len(delimiter) - 1) :]  # too short to hold a whole delimiter, so none is counted twice
            if seen > len(fields) + 1:  # one delimiter before each part, and the closing one
                raise BodyReadError(_too_many_parts(fields))
            return message

        await self.app(scope, counted, send)


def _too_many_parts(fields: FormFields) -> APIError:
    return APIError(
        400,
        f"The multipart body holds more than {len(fields)} parts; send {form_listing(fields)}, each once.",
        code="invalid_value",
    )


def form_fields(routers: Sequence[APIRouter]) -> dict[str, FormFields]:
    """The form fields (FastAPI's `Form` and `File`) of each route of `routers` that reads a form, by path: what
    `edge`'s `forms` takes."""
    return {
        route.path: {field.alias: isinstance(field.field_info, params.File) for field in route.dependant.body_params}
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute)
        and route.body_field is not None
        and isinstance(route.body_field.field_info, params.Form)
    }


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"The request body is larger than this server's limit of {limit:,} bytes.", code="request_too_large"
    )


class NoNulInURL:
    """Refuses a request whose path or query parameters hold a NUL (`%00`), naming where: no id or name a store
    keeps holds one (`shapes.py`), and PostgreSQL refuses to look one up, which would be a 500. A browser opening
    one of `pages` gets the refusal as a page."""

    def __init__(self, app: ASGIApp, pages: Pages | None = None):
        self.app, self.pages = app, pages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = _nul_in_url(scope) if scope["type"] == "http" else None
        if refusal is not None:
            response = self.pages.refusal(HTTPConnection(scope), refusal) if self.pages else refusal.response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _nul_in_url(scope: Scope) -> APIError | None:
    if (fault := nul_fault(scope["path"])) is not None:
        return APIError(
            400, f"The URL's path {scope['path']!r} holds {fault}; no id or name holds one.", code="invalid_value"
        )
    for name, value in QueryParams(scope["query_string"]).multi_items():
        for text, what in ((name, "name"), (value, "value")):
            if (fault := nul_fault(text)) is not None:
                return APIError(
                    400,
                    f"The {what} of query parameter {name!r} holds {fault}; leave it out.",
                    param=name,
                    code="invalid_value",
                )
    return None


def docs_urls(docs: bool) -> dict:
    """FastAPI's arguments for its /docs, /redoc and /openapi.json pages: none of them unless `docs`."""
    return {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}


def edge(
    app: FastAPI,
    *,
    api_keys: Sequence[str],
    max_body_bytes: int | None,
    per_path: dict[str, tuple[int, APIError]] | None = None,
    forms: dict[str, FormFields] | None = None,
    pages: Pages | None = None,
    observer: Observer | None = None,
) -> None:
    """OpenAI-shaped errors, the body cap, a form's parts capped at its fields, a NUL in the URL refused, and the key
    checked first; around them all, `observer`'s metrics and request log, and its /metrics route (`observe.py`).

    /health and the documentation pages, when the app has them (`docs_urls`), need no key; browser
    `pages` may carry it in a cookie (`auth.py`). `max_body_bytes` None puts no cap: an app that a host
    calls with a body the host has capped already. `forms` are the form fields of each path that reads a form
    (`form_fields`): a multipart body there holds at most one part for each, and a body that is not multipart is
    refused naming them.
    """
    install_error_handlers(app, forms or {})
    if forms:
        app.add_middleware(PartLimit, fields=forms)
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, max_bytes=max_body_bytes, per_path=per_path)
    app.add_middleware(NoNulInURL, pages=pages)
    documentation = [app.docs_url, app.redoc_url, app.openapi_url]
    if app.docs_url:
        documentation.append(app.swagger_ui_oauth2_redirect_url)
    require_keys(app, api_keys, [HEALTH_PATH, *filter(None, documentation)], pages)
    if observer is not None:
        observe(app, observer)
