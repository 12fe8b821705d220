"""What each request leaves behind: its count and time in the server's metrics, and a line in the request log.

An `Observer` belongs to one server. Its metrics live in a `CollectorRegistry` of its own, not
prometheus_client's global one, so several apps in one process (the tests) never collide, and
`edge` serves them at `/metrics` in Prometheus's text format. Labels stay few whatever clients
send: a request is counted under its route's template (`/v1/files/{file_id}`), never its raw path,
and under a model only once a handler has `note`d one it serves.

The request log (logger `tuneforge.requests`) gets one JSON object a request: time, method,
route, path, status, duration and owner (a hash of the key, never the key), and whatever the
handler noted (model, tokens, time to first token, a stored completion's id). A prompt's text is
noted only when the server logs prompts (`log_prompts`, `--log-prompts`).

An app called from inside another (the jobs service's serve apps) shares its host's observer,
and its middleware leaves a request its host is already observing alone, so nothing counts twice.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

METRICS_PATH = "/metrics"
OTHER_ROUTE = "other"
CLIENT_LEFT = 499  # the status logged for a request whose client left before its answer ended (nginx's)
REQUEST_LOG = logging.getLogger("tuneforge.requests")
_NOTES = "tuneforge.notes"  # the scope key of a request's notes; a host's scope passes it on to an app inside it
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Generation requests take seconds to minutes; the default buckets stop at 10 s.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Metrics = TypeVar("Metrics")


class Observer:
    """One server's metrics registry, its request metrics, and whether its log may hold prompts."""

    def __init__(self, *, log_prompts: bool = False):
        self.log_prompts = log_prompts
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tuneforge_requests",
            "HTTP requests answered, by route template, method, model and status.",
            ["route", "method", "model", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "tuneforge_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (a stream's last chunk), by route template.",
            ["route", "method"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._groups: dict[Callable, object] = {}

    def metrics(self, make: Callable[[CollectorRegistry], Metrics]) -> Metrics:
        """The metrics `make` builds on this registry, built once: the apps that share an observer share them."""
        if make not in self._groups:
            self._groups[make] = make(self.registry)
        return self._groups[make]

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def observed(self, scope: Scope, route: str, status: int, seconds: float, notes: dict) -> None:
        method = scope["method"] if scope["method"] in _METHODS else "other"
        self.requests.labels(route, method, notes.get("model", ""), str(status)).inc()
        self.duration.labels(route, method).observe(seconds)
        if REQUEST_LOG.isEnabledFor(logging.INFO):
            user = scope.get("user")
            line = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "method": scope["method"],
                "route": route,
                "path": scope["path"],
                "status": status,
                "duration_ms": round(seconds * 1000, 1),
                "owner": getattr(user, "username", None),
                **notes,
            }
            REQUEST_LOG.info(json.dumps(line, default=str))


class ObservedRequests:
    """ASGI middleware: times each HTTP request and hands it to the observer as the last piece of its answer
    goes out (or when it ends without one)."""

    def __init__(self, app: ASGIApp, observer: Observer):
        self.app, self.observer = app, observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _NOTES in scope:  # not a request, or one its host is observing
            await self.app(scope, receive, send)
            return
        notes = scope[_NOTES] = {}
        status, started, observed, client_left = 500, time.perf_counter(), False, False

        async def receiving():
            nonlocal client_left
            message = await receive()
            client_left = client_left or message["type"] == "http.disconnect"
            return message

        def observe_once() -> None:
            nonlocal observed
            if not observed:
                observed = True
                self.observer.observed(scope, route_template(scope), status, time.perf_counter() - started, notes)

        async def sending(message) -> None:
            nonlocal status, client_left
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Before the last piece goes out: a client that has its whole answer finds it counted and logged.
                observe_once()
            try:
                await send(message)
            except OSError:  # the client has gone (Starlette raises ClientDisconnect, an OSError)
                client_left = True
                raise

        try:
            await self.app(scope, receiving, sending)
        finally:
            if client_left and not observed:
                status = CLIENT_LEFT  # a stream cut short by its client: not the 200 its first piece said
            observe_once()  # an answer never finished (an error, a client gone)


def route_template(scope: Scope) -> str:
    """The path template of the route that answered (the router leaves it in the scope); `other` for a request
    refused before routing (a wrong key, a body over the cap) or one no API route has."""
    return getattr(scope.get("route"), "path", None) or OTHER_ROUTE


def note(request: Request, **fields) -> None:
    """Add `fields` to the request's log line; a `model` also labels its count. Nothing when no observer watches."""
    notes = request.scope.get(_NOTES)
    if notes is not None:
        notes.update(fields)


def observe(app, observer: Observer) -> None:
    """Put `observer`'s middleware on `app` (call it last: outermost, it sees refused requests too) and serve
    its metrics at /metrics."""
    app.add_api_route(METRICS_PATH, observer.exposition, methods=["GET"], include_in_schema=False)
    app.add_middleware(ObservedRequests, observer=observer)


def log_requests_to_stderr() -> None:
    """The request log as JSON lines on stderr (the servers' commands; uvicorn's access log is then off)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    REQUEST_LOG.addHandler(handler)
    REQUEST_LOG.setLevel(logging.INFO)
    REQUEST_LOG.propagate = False
