"""Bearer API keys, checked before anything reads the request's body.

A FastAPI dependency runs only after the body is parsed, so the check is Starlette's
authentication middleware with `BearerKeys` as its backend: a request without a right key is
refused from its headers alone. Routes get the caller with the `caller` dependency: the owner of
the key (a hash of it; keys are never stored), or `local` on a server without keys. An app without
keys called from inside another keeps the caller its host checked.

Pages a browser opens (the dashboard's, under `pages`) cannot send a header, so there a GET may
carry the key in the `KEY_COOKIE` cookie instead, and one without a right key is sent to the login
page. Only GETs read the cookie, and everything that changes something takes the Bearer header, so
another site cannot make a browser act with its key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import quote, unquote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection

from .errors import APIError

LOCAL_OWNER = "local"
KEY_COOKIE = "tuneforge_key"


class Pages:
    """Where browser pages live (`prefix`), the page that asks for a key, paths under `prefix` open to all, and
    `error_page`, which answers a browser's request refused before any route (status, message) as a page."""

    def __init__(
        self,
        prefix: str,
        login: str,
        public_prefixes: Iterable[str] = (),
        error_page: Callable[[int, str], Response] | None = None,
    ):
        self.prefix, self.login, self.public_prefixes = prefix, login, tuple(public_prefixes)
        self.error_page = error_page

    def is_public(self, path: str) -> bool:
        return path == self.login or path.startswith(self.public_prefixes)

    def is_page_request(self, conn: HTTPConnection) -> bool:
        return conn.url.path.startswith(self.prefix) and conn.scope.get("method") in ("GET", "HEAD")

    def refusal(self, conn: HTTPConnection, error: APIError) -> Response:
        """`error` as a page for a browser opening a page (it accepts HTML), as the API's JSON for the rest (the
        pages' JavaScript, which reads JSON from under `prefix` too)."""
        if self.error_page and self.is_page_request(conn) and "text/html" in conn.headers.get("accept", ""):
            return self.error_page(error.status, error.message)
        return error.response()


def owner_of(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


class BearerKeys(AuthenticationBackend):
    """`Authorization: Bearer KEY` with one of `keys` on every path but `public` ones; no keys, no check."""

    def __init__(self, keys: Sequence[str], public: Iterable[str], pages: Pages | None = None):
        self.keys = [key.encode() for key in keys]
        self.public = frozenset(public)
        self.pages = pages

    async def authenticate(self, conn: HTTPConnection):
        path = conn.url.path
        if path in self.public or (self.pages and self.pages.is_public(path)):
            return None
        if not self.keys:
            # An app called from inside another (the jobs service's serve apps) answers its host's caller.
            host_caller = conn.scope.get("user")
            user = host_caller if isinstance(host_caller, SimpleUser) else SimpleUser(LOCAL_OWNER)
            return AuthCredentials(["api"]), user
        scheme, _, given = conn.headers.get("authorization", "").partition(" ")
        given = given.strip()
        if not scheme and self.pages and self.pages.is_page_request(conn):
            scheme, given = "bearer", unquote(conn.cookies.get(KEY_COOKIE, ""))
        if scheme.lower() != "bearer" or not given:
            raise AuthenticationError("No API key given: send it as `Authorization: Bearer KEY`.")
        if not any(hmac.compare_digest(given.encode(), key) for key in self.keys):
            raise AuthenticationError("Incorrect API key provided.")
        return AuthCredentials(["api"]), SimpleUser(owner_of(given))


def require_keys(app: FastAPI, keys: Sequence[str], public: Iterable[str], pages: Pages | None = None) -> None:
    def refused(conn: HTTPConnection, err: AuthenticationError):
        if pages and pages.is_page_request(conn):
            # A path holding a NUL is no page, and `limits.NoNulInURL` would refuse it as the login page's `next`.
            back = "" if "\0" in conn.url.path else f"?next={quote(conn.url.path)}"
            return RedirectResponse(pages.login + back, status_code=303)
        return APIError(401, str(err), code="invalid_api_key").response()

    app.add_middleware(AuthenticationMiddleware, backend=BearerKeys(keys, public, pages), on_error=refused)


def caller(request: Request) -> str:
    """The owner the request's key stands for (a dependency for routes)."""
    return request.user.username
