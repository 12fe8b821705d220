"""Inference for base and fine-tuned models on the jobs server, through `tuneforge.serve` as it is.

A serve app (`AdapterPool` (`load_pool`) + `Engine` + `create_app`) holds one base model and the adapters on it.
Here there is one per base model folder, so every name for the same model (a registry name in
any case, a fine-tuned model, a checkpoint) shares one copy of its weights; an adapter joins its
base's app when first asked for. At most `max_bases` apps are held: beyond that the least
recently used one is closed once its last request is answered. Requests are handed on as they
are, so the bodies, streaming and errors are serve's own; the apps record into the host's observer
and store completions in the host's store, under the caller the host checked.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..serve import AdapterPool, CompletionStore, Engine, create_app, load_pool
from ..serve.bodies import DEFAULT_MAX_TOKENS
from ..serve_defaults import MAX_BATCH, MAX_WAITING, PREFIX_CACHE_MB
from ..web import Observer
from .access import InferenceTarget


@dataclass(eq=False)
class ServedBase:
    pool: AdapterPool
    engine: Engine
    app: object
    requests: int = 0
    retired: bool = False
    closed: bool = False


class InferenceModels:
    def __init__(
        self,
        max_bases: int = 2,
        max_adapters: int = 4,
        *,
        observer: Observer | None = None,
        completions: CompletionStore | None = None,
        prefix_cache_mb: int = PREFIX_CACHE_MB,
    ):
        self.max_bases, self.max_adapters = max_bases, max_adapters
        self.prefix_cache_mb = prefix_cache_mb  # each base model's engine's (`Engine`; 0: none)
        # serve's defaults, for each base model's engine and app
        self.max_batch, self.max_waiting, self.default_max_tokens = MAX_BATCH, MAX_WAITING, DEFAULT_MAX_TOKENS
        self.observer, self.completions = observer, completions
        self._served: OrderedDict[str, ServedBase] = OrderedDict()  # by base folder, least recently used first
        self._lock = asyncio.Lock()

    async def acquire(self, target: InferenceTarget, name: str) -> ServedBase:
        """The app for `target`'s base, serving its adapter (or, without one, the base) as `name`; `release` it
        when answered."""
        key = str(target.base)
        async with self._lock:
            served = self._served.get(key)
            if served is None:
                served = self._served[key] = await asyncio.to_thread(self._build, key)
                while len(self._served) > self.max_bases:
                    self._retire(self._served.popitem(last=False)[1])
            self._served.move_to_end(key)
            if target.adapter is not None:
                await asyncio.to_thread(served.pool.add_adapter, name, str(target.adapter))
            else:
                served.pool.add_base_name(name)
            served.requests += 1
            return served

    def release(self, served: ServedBase) -> None:
        served.requests -= 1
        if served.retired and served.requests == 0:
            self._close(served)

    @property
    def loaded(self) -> list[str]:
        """The base folders held, least recently used first."""
        return list(self._served)

    async def close(self) -> None:
        async with self._lock:
            for served in self._served.values():
                self._close(served)
            self._served.clear()

    def _build(self, base: str) -> ServedBase:
        pool = load_pool(base, max_loaded=self.max_adapters)
        engine = Engine(
            pool, max_batch=self.max_batch, max_waiting=self.max_waiting, prefix_cache_mb=self.prefix_cache_mb
        )
        # The host has read the body within its own cap (`--max-body-mb`); re-encoded here, it may be longer.
        app = create_app(
            engine,
            default_max_tokens=self.default_max_tokens,
            max_body_bytes=None,
            observer=self.observer,
            completions=self.completions,
        )
        return ServedBase(pool, engine, app)

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
    """Answers a request by handing it to a serve app, with the body already read."""

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
