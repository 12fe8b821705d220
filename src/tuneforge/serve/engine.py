"""The request queue and the one worker thread that owns the model.

Requests wait in arrival order. The worker decodes one `generate.Batch` at a time, all of it for
one model name (the base or one adapter): requests for that name join the running batch between
steps, as long as the oldest waiting request is for it too; once a request for another name is
the oldest, the batch takes no one new, drains, and the worker switches. So every request is
served in bounded time and an adapter switch happens only between batches.

Handlers live on the event loop: `submit` returns a `Generation` whose pieces arrive through an
asyncio queue fed from the worker thread. At most `max_waiting` requests wait; past that `submit`
refuses with a 429. A request that cannot join a batch (its own sampling options fail) fails alone.

`unload` stops taking requests for an adapter at once and deletes it between steps, once the
requests it took already (waiting or running) are answered: it never breaks one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import replace

from ..errors import TuneforgeError
from ..generate import MAX_SEED, Batch, Completion, Piece, Row, Sampling, TokenLogprob
from ..kv_cache import PrefixCache
from ..serve_defaults import MAX_BATCH, MAX_WAITING, PREFIX_CACHE_MB
from ..web import scrub_paths, server_error
from .adapters import AdapterPool

log = logging.getLogger("tuneforge.serve")


RETRY_AFTER_S = 1  # what a refused client is told to wait before it tries again


class EngineError(Exception):
    """A request the engine could not finish; `status` and `code` go into the OpenAI error body."""

    def __init__(self, message: str, *, status: int = 500, code: str = "server_error", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param

    @classmethod
    def from_failure(cls, err: Exception) -> EngineError:
        """A failure as the client may see it: a user error's message without server paths, else an error id."""
        if isinstance(err, TuneforgeError):  # an adapter that cannot be loaded, say: no traceback
            log.error(err.message)
            return cls(scrub_paths(err.message))
        return cls(server_error(err, "Generation failed").message)


class Generation:
    """One request's choices as the worker produces them: `async for piece in generation.pieces(index)`.

    A request for `n` choices decodes them as `n` rows of one batch (their shared prompt is prefilled once,
    `Batch._prefill`); choice i samples with `choice_sampling(sampling, i)`.
    """

    def __init__(
        self,
        model: str,
        prompt_ids: list[int],
        sampling: Sampling,
        loop: asyncio.AbstractEventLoop,
        n: int = 1,
        images: tuple[bytes, ...] = (),
    ):
        self.model, self.prompt_ids, self.sampling, self.n = model, prompt_ids, sampling, n
        self.images = images  # the image files the prompt's image tokens show (`Batch.add`)
        self.completions: list[Completion | None] = [None] * n
        # Where the sampling asks for log probabilities: each choice's, as they came with its pieces so far.
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        # Where the sampling asks for the prompt's (echo): each choice's, set with the prefill, before any piece.
        self.prompt_logprobs: list[tuple[TokenLogprob, ...] | None] = [None] * n
        self.cancelled = False
        self._loop = loop
        self._events: list[asyncio.Queue] = [asyncio.Queue() for _ in range(n)]
        self._queued_at = time.monotonic()
        self._first_output_at: float | None = None  # the first piece's arrival, or the completion's if it has none

    @property
    def completion(self) -> Completion | None:
        """The first choice's completion (the only one, for n=1)."""
        return self.completions[0]

    def cancel(self) -> None:
        """Nobody wants the rest (the client went away): the worker drops the rows at its next step."""
        self.cancelled = True

    async def pieces(self, index: int = 0):
        """Choice `index`'s text as it is generated; `completions[index]` is set once this ends, and
        `logprobs[index]` holds the log probabilities of the tokens of the text yielded so far (where asked).

        Raises `EngineError`."""
        while True:
            event = await self._events[index].get()
            if self._first_output_at is None:
                self._first_output_at = time.monotonic()
            if isinstance(event, str):
                yield event
            elif isinstance(event, Piece):
                self.logprobs[index].extend(event.logprobs)
                yield event.text
            elif isinstance(event, Completion):
                self.completions[index] = event
                return
            else:
                raise event

    @property
    def per_prompt(self) -> int:
        """Choices of each prompt (this one's all)."""
        return self.n

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens, once however many choices answer it (they share its prefill); once answered."""
        return self.completions[0].prompt_tokens

    @property
    def time_to_first_token(self) -> float:
        """Seconds from joining the queue to the first text (to the answer, for an empty one)."""
        return (self._first_output_at or time.monotonic()) - self._queued_at

    async def result(self) -> list[Completion]:
        """Every choice's completion, in order."""
        for index in range(self.n):
            async for _ in self.pieces(index):
                pass
        return list(self.completions)

    def _send(self, event: str | Piece | Completion | EngineError, index: int | None = None) -> None:
        """From the worker thread, to choice `index` (None: to every choice); a loop already closed (server
        stopping) has no one left to tell."""
        for queue in self._events if index is None else [self._events[index]]:
            try:
                self._loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:
                pass


class Generations:
    """Several prompts' generations answered as one request, read as one `Generation`: choice k is prompt
    k // per_prompt's choice k % per_prompt, as OpenAI orders a list of prompts' choices."""

    def __init__(self, parts: list[Generation]):
        self.parts = parts
        self.per_prompt = parts[0].n
        self.n = self.per_prompt * len(parts)
        self.sampling = parts[0].sampling  # what the prompts share: all but each one's max_new_tokens
        self.logprobs = [received for part in parts for received in part.logprobs]

    def _part(self, index: int) -> tuple[Generation, int]:
        return self.parts[index // self.per_prompt], index % self.per_prompt

    @property
    def completions(self) -> list[Completion | None]:
        return [completion for part in self.parts for completion in part.completions]

    @property
    def prompt_logprobs(self) -> list[tuple[TokenLogprob, ...] | None]:
        return [entries for part in self.parts for entries in part.prompt_logprobs]

    @property
    def prompt_tokens(self) -> int:
        """The prompts' tokens, each prompt once however many choices answer it."""
        return sum(part.prompt_tokens for part in self.parts)

    @property
    def time_to_first_token(self) -> float:
        return min(part.time_to_first_token for part in self.parts)

    def cancel(self) -> None:
        for part in self.parts:
            part.cancel()

    def pieces(self, index: int = 0):
        part, choice = self._part(index)
        return part.pieces(choice)

    async def result(self) -> list[Completion]:
        for part in self.parts:
            await part.result()
        return self.completions


def _worker_stopped() -> EngineError:
    return EngineError(
        "The server's generation worker stopped on an unexpected error, so it answers no more requests; restart the "
        "server (its log holds the error).",
        status=503,
        code="engine_stopped",
    )


def choice_sampling(sampling: Sampling, index: int) -> Sampling:
    """Choice `index`'s options: with a seed, its own random stream, seeded `(seed + index) mod 2**63`, so
    choice i of a request with seed s samples as a single request with seed s + i does (choice 0 as before)."""
    if sampling.seed is None or index == 0:
        return sampling
    return replace(sampling, seed=(sampling.seed + index) % (MAX_SEED + 1))


class Engine:
    """Owns `pool`'s model in one worker thread; at most `max_batch` rows decode together and at most
    `max_waiting` requests wait for a place. A prompt starts from the keys and values of the longest prefix
    seen before on the same model (`kv_cache.PrefixCache`, at most `prefix_cache_mb` MiB; 0: none kept)."""

    def __init__(
        self,
        pool: AdapterPool,
        *,
        max_batch: int = MAX_BATCH,
        max_waiting: int = MAX_WAITING,
        prefix_cache_mb: int = PREFIX_CACHE_MB,
    ):
        if max_batch < 1 or max_waiting < 1:
            raise ValueError(f"max_batch and max_waiting must be at least 1, got {max_batch} and {max_waiting}")
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be at least 0 (0: no prefix cache), got {prefix_cache_mb}")
        self.pool, self.max_batch, self.max_waiting = pool, max_batch, max_waiting
        self.prefix_cache = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb else None
        self._waiting: deque[Generation] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._unloading: dict[str, Future] = {}  # adapters retired, each done once deleted
        self._running = 0
        self._largest_batch = 0
        self._stopped = False  # whether the worker ended on an unexpected error
        self._thread = threading.Thread(target=self._work, name="tuneforge-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, model: str, prompt_ids: list[int], sampling: Sampling, n: int = 1) -> Generation:
        """Queue a request for `n` choices (at most `max_batch`: they decode together); call from a running
        event loop (a request handler)."""
        [generation] = self.submit_all(model, [(prompt_ids, sampling)], n).parts
        return generation

    def submit_all(
        self, model: str, prompts: list[tuple[list[int], Sampling]], n: int = 1, images: tuple[bytes, ...] = ()
    ) -> Generations:
        """Queue several prompts of one request, each with its sampling and `n` choices, as requests of their own
        (so they join the running batch as `submit`'s do), all of them or none; call from a running event loop.
        `images` are those of a single prompt (a chat request's)."""
        if images and len(prompts) != 1:
            raise ValueError(f"images are given for one prompt, and there are {len(prompts)}")
        if not 1 <= n <= self.max_batch:
            raise EngineError(
                f"n={n} asks for more choices than this server decodes together ({self.max_batch}, its batch "
                f"size): ask for at most {self.max_batch} and send more requests for the rest.",
                status=400,
                code="invalid_value",
                param="n",
            )
        if len(prompts) > self.max_waiting:
            raise EngineError(
                f"prompt is a list of {len(prompts)} prompts, and this server queues at most {self.max_waiting} "
                f"requests (each prompt waits as one): send at most {self.max_waiting} prompts a request.",
                status=400,
                code="invalid_value",
                param="prompt",
            )
        loop = asyncio.get_running_loop()
        generations = Generations([Generation(model, ids, sampling, loop, n, images) for ids, sampling in prompts])
        with self._wake:
            self._refuse_when_ended()
            if not self.pool.serves(model):  # unloaded since the request was checked
                raise EngineError(
                    f"The model `{model}` does not exist. Served here: {', '.join(self.pool.names)}.",
                    status=404,
                    code="model_not_found",
                    param="model",
                )
            if len(self._waiting) + len(prompts) > self.max_waiting:
                raise EngineError(
                    f"The server is busy: {len(self._waiting)} requests are waiting already. Try "
                    f"again in {RETRY_AFTER_S} s.",
                    status=429,
                    code="server_busy",
                )
            self._waiting.extend(generations.parts)
            self._wake.notify()
        return generations

    def unload(self, name: str) -> Future:
        """Stop serving the adapter `name` now; the future is done once its requests are answered and it is
        deleted. Call from any thread; `AdapterPool.retire`'s error if `name` is not an adapter served, a 503
        `EngineError` once the worker is closing or stopped (none is left to delete it)."""
        with self._wake:
            self._refuse_when_ended()
            if name not in self._unloading:
                self.pool.retire(name)
                self._unloading[name] = Future()
                self._wake.notify()
            return self._unloading[name]

    def _refuse_when_ended(self) -> None:
        """A 503 once the worker is closing or stopped, for work it would never take up (call with the lock held)."""
        if self._closing:
            raise EngineError("The server is shutting down.", status=503, code="server_shutting_down")
        if self._stopped:
            raise _worker_stopped()

    def stats(self) -> dict:
        with self._wake:
            return {
                "alive": self._thread.is_alive(),
                "waiting": len(self._waiting),
                "running": self._running,
                "largest_batch": self._largest_batch,
                "prefix_cache_hits": self.prefix_cache.hits if self.prefix_cache else 0,
                "prefix_cache_misses": self.prefix_cache.misses if self.prefix_cache else 0,
                "prefix_cache_bytes": self.prefix_cache.size_bytes if self.prefix_cache else 0,
            }

    def close(self) -> None:
        """Stop the worker; requests still waiting or running get a 503."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    # ---- the worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        rows: dict[Row, tuple[Generation, int]] = {}  # the running batch's rows, whom they answer and which choice
        joining: list[Generation] = []  # requests taken from the queue, not rows yet
        try:
            self._decode(rows, joining)
        except BaseException:  # what a step's `except Exception` lets through ends the worker: no request may hang
            log.critical("The engine's worker stopped on an unexpected error", exc_info=True)
            stopped = _worker_stopped()
            with self._wake:
                self._stopped = True
                for generation in {*self._waiting, *joining, *(generation for generation, _ in rows.values())}:
                    generation._send(stopped)
                self._waiting.clear()
                for unloaded in self._unloading.values():
                    unloaded.set_exception(stopped)
                self._running = 0

    def _decode(self, rows: dict[Row, tuple[Generation, int]], joining: list[Generation]) -> None:
        """The worker's loop until the engine closes: take waiting requests into the batch and decode it a step
        at a time; `rows` and `joining` are the requests it holds, for `_work` to answer should it stop."""
        batch: Batch | None = None
        name = ""  # the model name the running batch decodes for
        while True:
            with self._wake:
                self._drop_cancelled()
                self._remove_unloaded(name if rows else None)
                while not self._waiting and not rows and not self._closing:
                    self._wake.wait()
                    self._drop_cancelled()
                    self._remove_unloaded(None)
                if self._closing:
                    stopping = EngineError("The server is shutting down.", status=503, code="server_shutting_down")
                    for generation in {*self._waiting, *(generation for generation, _ in rows.values())}:
                        generation._send(stopping)
                    self._waiting.clear()
                    for unloaded in self._unloading.values():
                        unloaded.set_result(None)
                    return
                if not rows:
                    name = self._waiting[0].model
                joining[:] = self._take_waiting(name, self.max_batch - len(rows))
                # Taken requests are running from now on, through their prefill, not only after it.
                self._running = len(rows) + sum(generation.n for generation in joining)
            try:
                if not rows:
                    batch = self._batch(name)
                self._step(batch, rows, joining)
            except Exception as err:  # noqa: BLE001 - one bad batch must not take the server down
                failure = EngineError.from_failure(err)
                for generation in {generation for generation, _ in rows.values()} | set(joining):
                    generation._send(failure)
                rows.clear()
                joining.clear()
            with self._wake:
                self._running = len(rows)

    def _batch(self, name: str) -> Batch:
        """A batch decoding for `name`, with the prefix cache of what the model runs as now; the cache first
        forgets what models no longer in memory (an adapter unloaded or evicted) computed."""
        model = self.pool.activate(name)
        if self.prefix_cache is None:
            return Batch(model, self.pool.tokenizer(name))
        self.prefix_cache.forget(self.pool.cache_models().__contains__)
        return Batch(model, self.pool.tokenizer(name), self.prefix_cache, self.pool.cache_model(name))

    def _step(self, batch: Batch, rows: dict[Row, tuple[Generation, int]], joining: list[Generation]) -> None:
        """Add the joining requests (a row per choice), decode one step, hand out the pieces and the finished
        completions."""
        for generation in joining:
            try:
                added = []
                for index in range(generation.n):
                    sampling = choice_sampling(generation.sampling, index)
                    generator = sampling.generator(batch.model.device)
                    added.append(batch.add(generation.prompt_ids, sampling, generator, generation.images))
            except Exception as err:  # noqa: BLE001 - a request whose options fail fails alone
                for row in added:
                    row.cancelled = True
                generation._send(EngineError.from_failure(err))
                continue
            rows.update((row, (generation, index)) for index, row in enumerate(added))
        joining.clear()  # every one is a row now or answered: a failing step below must not answer them again
        for row, (generation, _) in rows.items():
            row.cancelled = generation.cancelled
        with self._wake:
            self._largest_batch = max(self._largest_batch, len(rows))
        produced = batch.step()
        for row, (generation, index) in rows.items():
            if row.prompt_logprobs is not None:
                generation.prompt_logprobs[index] = row.prompt_logprobs
        for row, piece in produced:
            if piece and not row.cancelled:
                generation, index = rows[row]
                generation._send(row.with_logprobs(piece), index)
        for row in [row for row in rows if row.done]:
            generation, index = rows.pop(row)
            if not row.cancelled:
                generation._send(row.completion(), index)

    def _take_waiting(self, name: str, room: int) -> list[Generation]:
        """Waiting requests for `name` that may join now, in order while their rows (one per choice) fit in
        `room` (call with the lock held)."""
        if not self._waiting or self._waiting[0].model != name or room <= 0:
            return []
        joining = []
        for generation in (g for g in self._waiting if g.model == name):
            if generation.n > room:
                break
            joining.append(generation)
            room -= generation.n
        for generation in joining:
            self._waiting.remove(generation)
        return joining

    def _remove_unloaded(self, running: str | None) -> None:
        """Delete the unloaded adapters no request needs any more: none waits for one, and `running` (the name
        the running batch decodes for) is not one (call with the lock held)."""
        for name in list(self._unloading):
            if name != running and all(generation.model != name for generation in self._waiting):
                try:
                    self.pool.remove(name)
                except Exception as err:  # noqa: BLE001 - a failed delete must not stop the worker
                    self._unloading.pop(name).set_exception(err)
                else:
                    if self.prefix_cache is not None:  # its keys and values go with its weights
                        self.prefix_cache.forget(self.pool.cache_models().__contains__)
                    self._unloading.pop(name).set_result(None)

    def _drop_cancelled(self) -> None:
        for generation in [g for g in self._waiting if g.cancelled]:
            self._waiting.remove(generation)
