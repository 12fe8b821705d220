"""Inference for base and fine-tuned models on the jobs server, through `tuneforge.serve` as it is.

A serve app (`AdapterPool` + `Engine` + `create_app`) holds one base model and a fixed set of
adapters. Here there is one per base model, holding every fine-tuned model on it; a request for a
fine-tuned model the app does not hold yet (a job that just finished, a checkpoint) builds a new
app with it, and the old one is closed once its last request is answered. Requests are handed on
as they are, so the bodies, streaming and errors are serve's own.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..serve import AdapterPool, Engine, create_app


@dataclass(eq=False)
class ServedBase:
    base: str
    adapters: frozenset[str]
    pool: AdapterPool
    engine: Engine
    app: object
    requests: int = 0
    retired: bool = False
    closed: bool = False


class InferenceModels:
    def __init__(self, max_adapters: int = 4):
        self.max_adapters = max_adapters
        self._served: dict[str, ServedBase] = {}
        self._lock = asyncio.Lock()

    async def acquire(self, base: str, adapters: dict[str, str], wanted: str) -> ServedBase:
        """The app for `base` that serves `wanted` (the base itself or one of `adapters`: name -> folder)."""
        async with self._lock:
            served = self._served.get(base)
            if served is None or (wanted != base and wanted not in served.adapters):
                fresh = await asyncio.to_thread(self._build, base, adapters)
                if served is not None:
                    self._retire(served)
                served = self._served[base] = fresh
            served.requests += 1
            return served

    def release(self, served: ServedBase) -> None:
        served.requests -= 1
        if served.retired and served.requests == 0:
            self._close(served)

    async def close(self) -> None:
        async with self._lock:
            for served in self._served.values():
                self._close(served)
            self._served.clear()

    def _build(self, base: str, adapters: dict[str, str]) -> ServedBase:
        pool = AdapterPool(base, adapters, max_loaded=self.max_adapters)
        engine = Engine(pool)
        return ServedBase(base, frozenset(adapters), pool, engine, create_app(engine))

    def _retire(self, served: ServedBase) -> None:
        served.retired = True
        if served.requests == 0:
            self._close(served)

    @staticmethod
    def _close(served: ServedBase) -> None:
        if not served.closed:
            served.closed = True
            served.engine.close()


class ForwardedResponse(Response):
    """Answers a request by handing it to a serve app, with the body already read (and the model renamed)."""

    def __init__(self, models: InferenceModels, served: ServedBase, body: dict):
        super().__init__()
        self.models, self.served = models, served
        self.payload = json.dumps(body).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if delivered:
                return await receive()  # later reads wait for the client to disconnect
            delivered = True
            return {"type": "http.request", "body": self.payload, "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"authorization")]
        headers.append((b"content-length", str(len(self.payload)).encode()))
        try:
            await self.served.app({**scope, "headers": headers}, replay, send)
        finally:
            self.models.release(self.served)
