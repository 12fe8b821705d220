"""Bearer API keys, checked before anything reads the request's body.

A FastAPI dependency runs only after the body is parsed, so the check is Starlette's
authentication middleware with `BearerKeys` as its backend: a request without a right key is
refused from its headers alone. Routes get the caller with the `caller` dependency: the owner of
the key (a hash of it; keys are never stored), or `local` on a server without keys.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

from fastapi import FastAPI, Request
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection

from .errors import APIError

LOCAL_OWNER = "local"


def owner_of(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


class BearerKeys(AuthenticationBackend):
    """`Authorization: Bearer KEY` with one of `keys` on every path but `public` ones; no keys, no check."""

    def __init__(self, keys: Sequence[str], public: Iterable[str]):
        self.keys = [key.encode() for key in keys]
        self.public = frozenset(public)

    async def authenticate(self, conn: HTTPConnection):
        if conn.url.path in self.public:
            return None
        if not self.keys:
            return AuthCredentials(["api"]), SimpleUser(LOCAL_OWNER)
        scheme, _, given = conn.headers.get("authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise AuthenticationError("No API key given: send it as `Authorization: Bearer KEY`.")
        if not any(hmac.compare_digest(given.encode(), key) for key in self.keys):
            raise AuthenticationError("Incorrect API key provided.")
        return AuthCredentials(["api"]), SimpleUser(owner_of(given))


def require_keys(app: FastAPI, keys: Sequence[str], public: Iterable[str]) -> None:
    app.add_middleware(AuthenticationMiddleware, backend=BearerKeys(keys, public), on_error=_refused)


def caller(request: Request) -> str:
    """The owner the request's key stands for (a dependency for routes)."""
    return request.user.username


def _refused(conn: HTTPConnection, err: AuthenticationError):
    return APIError(401, str(err), code="invalid_api_key").response()
