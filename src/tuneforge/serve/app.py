"""OpenAI-compatible routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/v1/responses`,
`/health`, `/metrics`; vLLM's `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` where the server
allows adapter updates.

Bodies and errors are shaped as OpenAI's, so the official clients work unchanged (errors through
`tuneforge.web`). Sampling defaults are OpenAI's (temperature 1, top_p 1); `max_tokens` defaults
to 16 for completions, as OpenAI's does, and for chat to the server's `default_max_tokens`, within
the context window either way. Every value is checked here, before the engine sees it; a prompt is
encoded off the event loop; a client that hangs up stops its generation, streamed or not. A chat
message's images (base64 data URLs) are read as training reads an image row's, for a model that reads
images; a text model refuses them.

An answered request leaves its figures in the metrics (`metrics.py`) and its request log line, and
a chat request with `store: true` its prompt and answer in the completion store
(`completion_store.py`; a stream's once its last piece is sent), which `completion_routes.py` lists.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from jinja2 import TemplateError

from .. import reasoning
from ..constrain import ConstraintError, json_index
from ..data.images import read_shown_image
from ..data.render import renderer_for
from ..errors import ConfigError, TuneforgeError
from ..generate import Completion, TokenLogprob, encode_prompts
from ..models import model_context_length
from ..models.images import VISION_MODELS
from ..models.loading import image_inputs
from ..models.system_prompt import recorded_system_prompt
from ..tool_calls import HeldStream, ParsedReply, ToolCallParser, reply_finish_reason, tool_call_parser
from ..web import CLIENT_LEFT, MAX_NESTING, APIError, Observer, RequestBody, caller, docs_urls, edge, nesting, note
from . import completion_routes
from .bodies import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_TOKENS,
    ChatCompletionBody,
    CompletionBody,
    GenerationBody,
    ResponsesBody,
    SampledBody,
)
from .completion_store import CompletionStore
from .engine import RETRY_AFTER_S, Engine, EngineError, Generation, Generations
from .metrics import GenerationMetrics


def engine_error(err: EngineError) -> APIError:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 429 else None
    return APIError(
        err.status,
        err.message,
        param=err.param,
        code=err.code,
        headers=headers,
        type="server_error" if err.status >= 500 else "invalid_request_error",
    )


@dataclass(frozen=True)
class _Reply:
    """The envelope of one answer, whole or as stream chunks; chat and completions differ only in the choice."""

    chat: bool
    model: str
    id: str
    created: int
    reasoning: bool | None = None  # a reasoning model's reply: whether its prompt opened the reasoning (reasoning.py)
    tools: ToolCallParser | None = None  # parses a chat reply's tool calls; None: the reply is text
    parallel_tool_calls: bool = True  # false: the first call only, as OpenAI's API makes at most one then
    # A completion's echo: each choice's prompt text, which its text and log probabilities start with.
    echo: tuple[str, ...] | None = None
    # The system prompt the model's template adds to a conversation that brings none (a fine-tune's recorded one),
    # as it was when the prompt was rendered: a stored completion keeps it.
    system_prompt: str | None = None
    # The reply's calls once parsed: the answer sent and the one stored give each call the same id.
    _parsed: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def start(
        cls,
        chat: bool,
        model: str,
        reasoning: bool | None = None,
        tools: ToolCallParser | None = None,
        parallel_tool_calls: bool | None = None,
        system_prompt: str | None = None,
    ) -> _Reply:
        reply_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        return cls(
            chat,
            model,
            reply_id,
            int(time.time()),
            reasoning,
            tools,
            parallel_tool_calls is not False,
            system_prompt=system_prompt,
        )

    def parsed(self, answer: str) -> ParsedReply | None:
        """The tool calls of the reply's answer (what follows a reasoning model's reasoning), if it is parsed
        for them and makes some."""
        if answer not in self._parsed:
            parsed = self.tools.parse(answer) if self.tools is not None else None
            if parsed is not None and not self.parallel_tool_calls:
                parsed = ParsedReply(parsed.content, parsed.tool_calls[:1])
            self._parsed[answer] = parsed
        return self._parsed[answer]

    def whole(self, generation: Generation | Generations) -> dict:
        """The answer of a generation whose choices are all complete."""
        choices = [self._choice(index, completion) for index, completion in enumerate(generation.completions)]
        usage = _usage(generation)
        return self._envelope("chat.completion" if self.chat else "text_completion", choices, usage=usage)

    def echoed(self, index: int) -> str | None:
        """The prompt text that choice `index` starts with (None: no echo)."""
        return None if self.echo is None else self.echo[index]

    def _choice(self, index: int, completion: Completion) -> dict:
        finish_reason = completion.finish_reason
        answer = {"text": completion.text}
        logprobs = self.logprobs(completion.logprobs, index=index)
        if self.echo is not None:
            answer = {"text": self.echoed(index) + completion.text}
            logprobs = self.logprobs(completion.logprobs, prompt=completion.prompt_logprobs, index=index)
        if self.chat:
            message, finish_reason = reasoning.assistant_reply(
                completion.text, finish_reason, self.reasoning, self.parsed
            )
            answer = {"message": message}
        return {
            "index": index,
            **answer,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }

    def logprobs(
        self, entries: Sequence[TokenLogprob] | None, prompt: Sequence[TokenLogprob] | None = None, index: int = 0
    ) -> dict | None:
        """The `logprobs` of a choice, or of a chunk, with these tokens': chat's `{"content": [...]}`, or the
        completions' `tokens`, `token_logprobs`, `top_logprobs` and `text_offset`; None where none were asked
        for (or a chunk adds no token). With `echo`, generated tokens' offsets count from the prompt's text's
        start, and `prompt`'s entries come first (the first token's log probability and top_logprobs null,
        as OpenAI gives them); `index` is the choice's, whose prompt's text is echoed."""
        if entries is None:
            return None
        if self.echo is not None and not self.chat:
            shift = len(self.echoed(index))
            entries = [*(prompt or ()), *(replace(entry, offset=entry.offset + shift) for entry in entries)]
        if self.chat:
            return {"content": _logprob_entries(entries), "refusal": None}
        # OpenAI's legacy shape: the most likely tokens and the one picked, by their text.
        return {
            "tokens": [entry.token for entry in entries],
            "token_logprobs": [_logprob(entry.logprob) for entry in entries],
            "top_logprobs": [
                None
                if entry.logprob is None
                else {top.token: _logprob(top.logprob) for top in entry.top}
                | ({} if any(top.token == entry.token for top in entry.top) else {entry.token: _logprob(entry.logprob)})
                for entry in entries
            ],
            "text_offset": [entry.offset for entry in entries],
        }

    def events(self, server: Served, request: Request, body: GenerationBody, generation: Generation | Generations):
        """The answer as a stream of chunks (`_events`)."""
        return _events(server, request, body, self, generation)

    def tool_calls_chunk(self, calls: list[dict], index: int = 0) -> dict:
        delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
        return self._envelope(
            self._chunk_object, [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]
        )

    def chunk(
        self,
        text: str = "",
        finish_reason: str | None = None,
        *,
        opening: bool = False,
        field: str = "content",
        index: int = 0,
        logprobs: Sequence[TokenLogprob] = (),
        prompt: Sequence[TokenLogprob] | None = None,
    ) -> dict:
        if self.chat:
            answer = {"delta": {"role": "assistant", "content": ""} if opening else {field: text} if text else {}}
        else:
            answer = {"text": text}
        return self._envelope(
            self._chunk_object,
            [
                {
                    "index": index,
                    **answer,
                    "logprobs": self.logprobs(() if prompt else logprobs or None, prompt, index),
                    "finish_reason": finish_reason,
                }
            ],
        )

    def usage_chunk(self, generation: Generation | Generations) -> dict:
        return self._envelope(self._chunk_object, [], usage=_usage(generation))

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _envelope(self, object_name: str, choices: list[dict], **extra) -> dict:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
            **extra,
        }


LOWEST_LOGPROB = -9999.0  # what a log probability of -inf is sent as (JSON has no infinity), as vLLM sends it


def _logprob(value: float | None) -> float | None:
    return None if value is None else max(value, LOWEST_LOGPROB)


def _token_logprob(entry: TokenLogprob) -> dict:
    return {"token": entry.token, "logprob": _logprob(entry.logprob), "bytes": list(entry.bytes)}


def _logprob_entries(entries: Sequence[TokenLogprob]) -> list[dict]:
    """Tokens' log probabilities as chat's `logprobs.content` and a response's `output_text.logprobs` give them."""
    return [_token_logprob(entry) | {"top_logprobs": [_token_logprob(top) for top in entry.top]} for entry in entries]


class _Unsent:
    """The log probabilities received (a `Generation`'s, of one choice) that no streamed chunk has carried yet:
    each chunk carries those of the tokens that came since the one before."""

    def __init__(self, received: list[TokenLogprob]):
        self.received, self.sent = received, 0

    def __call__(self) -> list[TokenLogprob]:
        start, self.sent = self.sent, len(self.received)
        return self.received[start:]


def _usage(generation: Generation | Generations) -> dict:
    """Token counts as OpenAI gives them, of a generation whose choices are all complete: each prompt once
    however many choices answer it (as the generation counts them), the tokens of every choice."""
    prompt_tokens = generation.prompt_tokens
    completion_tokens = sum(completion.completion_tokens for completion in generation.completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # The prompt tokens whose keys and values the prefix cache held (each prompt once, as prompt_tokens).
        "prompt_tokens_details": {
            "cached_tokens": sum(c.cached_tokens for c in generation.completions[:: generation.per_prompt])
        },
    }


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class _ResponseReply:
    """One answer of /v1/responses as OpenAI's `response` object, whole or as its stream of events.

    Its `output` holds a `message` item with the answer as one `output_text` part; a reasoning model's
    reasoning (what the chat route gives as `reasoning_content`) comes before it as a `reasoning` item with a
    `reasoning_text` part, so the SDK's `output_text` is the answer alone. Where `include` asks for them, the
    `output_text` part's `logprobs` are those of the answer's tokens, in chat's entries' shape.
    """

    body: ResponsesBody
    id: str
    created_at: int
    reasoning: bool | None  # as `_Reply.reasoning`
    count_tokens: Any  # the served model's tokenizer's count of a text's tokens: the reasoning's share of usage
    sequence_number: int = 0

    @classmethod
    def start(cls, body: ResponsesBody, reasoning: bool | None, tokenizer) -> _ResponseReply:
        def count_tokens(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0

        return cls(body, f"resp_{uuid.uuid4().hex}", int(time.time()), reasoning, count_tokens)

    @property
    def model(self) -> str:
        return self.body.model

    def whole(self, generation: Generation) -> dict:
        [completion] = generation.completions
        parts = reasoning.assistant_message(completion.text, self.reasoning)
        return self.response(completion, parts.get(reasoning.REASONING), parts[reasoning.CONTENT])

    def response(self, completion: Completion | None, thought: str | None = None, answer: str = "") -> dict:
        """The `response` object: in progress (no completion yet, no output), or finished with its output."""
        incomplete = completion is not None and completion.finish_reason == "length"
        status = "in_progress" if completion is None else "incomplete" if incomplete else "completed"
        output = []
        if completion is not None:
            if thought:  # empty reasoning (Qwen 3's <think></think> without thinking) streams nothing: no item
                output.append(self._reasoning_item(thought, status))
            logprobs = _answer_logprobs(completion.logprobs or [], completion.text, answer)
            output.append(self._message_item(answer, status, logprobs))
        text_format = self.body.text.format if self.body.text is not None else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": self.body.instructions,
            "max_output_tokens": self.body.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": self.body.temperature,
            "text": {
                "format": text_format.model_dump(exclude_none=True, by_alias=True) if text_format else {"type": "text"}
            },
            "tool_choice": "none",
            "tools": [],
            "top_logprobs": self.body.top_logprobs,
            "top_p": self.body.top_p,
            "truncation": "disabled",
            "usage": self._usage(completion, thought) if completion is not None else None,
            "metadata": self.body.metadata or {},
        }

    def _usage(self, completion: Completion, thought: str | None) -> dict:
        return {
            "input_tokens": completion.prompt_tokens,
            "input_tokens_details": {"cached_tokens": completion.cached_tokens},
            "output_tokens": completion.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": self.count_tokens(thought or "")},
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        }

    @property
    def _message_id(self) -> str:
        return f"msg_{self.id.removeprefix('resp_')}"

    @property
    def _reasoning_id(self) -> str:
        return f"rs_{self.id.removeprefix('resp_')}"

    def _message_item(self, answer: str | None, status: str, logprobs: Sequence[TokenLogprob] = ()) -> dict:
        content = [] if answer is None else [self._text_part(answer, logprobs)]
        return {"type": "message", "id": self._message_id, "status": status, "role": "assistant", "content": content}

    def _reasoning_item(self, thought: str | None, status: str) -> dict:
        content = [] if thought is None else [{"type": "reasoning_text", "text": thought}]
        return {"type": "reasoning", "id": self._reasoning_id, "summary": [], "content": content, "status": status}

    @staticmethod
    def _text_part(text: str, logprobs: Sequence[TokenLogprob] = ()) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": _logprob_entries(logprobs)}

    def event(self, kind: str, **fields) -> str:
        self.sequence_number += 1
        return f"event: {kind}\n" + _sse({"type": kind, "sequence_number": self.sequence_number - 1, **fields})

    async def events(self, server: Served, request: Request, body: ResponsesBody, generation: Generation):
        """The SSE stream as OpenAI's: the response created, each output item added, its text's deltas, the
        item done, and the response completed (or incomplete); a reasoning item, if any, before the message."""
        texts: dict[str, str] = {}  # each item's text so far, by field (reasoning.REASONING or CONTENT)
        # A text delta carries the log probabilities (where asked) of the answer's tokens that came since the last
        # delta; those of the reasoning's go unsent, as reasoning text has none.
        fresh, reply = _Unsent(generation.logprobs[0]), []  # reply: the pieces received, the reply's text so far

        async def received():
            async for piece in generation.pieces():
                reply.append(piece)
                yield piece

        try:
            yield self.event("response.created", response=self.response(None))
            yield self.event("response.in_progress", response=self.response(None))
            async for part, text in reasoning.deltas(received(), self.reasoning):
                if part not in texts:
                    for event in self._item_events(texts, part):
                        yield event
                texts[part] += text
                where = {"item_id": self._item_id(part), "output_index": len(texts) - 1, "content_index": 0}
                kind = "response.reasoning_text.delta" if part == reasoning.REASONING else "response.output_text.delta"
                logprobs = _logprob_entries(_answer_logprobs(fresh(), "".join(reply), texts[part]))
                yield self.event(
                    kind, **where, delta=text, **({} if part == reasoning.REASONING else {"logprobs": logprobs})
                )
            answer = texts.get(reasoning.CONTENT, "")
            finished = self.response(generation.completion, texts.get(reasoning.REASONING), answer)
            completion = generation.completion
            logprobs = _answer_logprobs(completion.logprobs or [], completion.text, answer)
            for event in self._item_events(texts, None, finished["status"], logprobs):
                yield event
            await server.answered(request, body, self, generation)
            kind = "response.incomplete" if finished["status"] == "incomplete" else "response.completed"
            yield self.event(kind, response=finished)
        except EngineError as err:
            error = engine_error(err)
            yield self.event("error", code=error.code, message=error.message, param=error.param)
        finally:
            generation.cancel()  # a client that disconnected mid-stream ends up here too

    def _item_id(self, part: str) -> str:
        return self._reasoning_id if part == reasoning.REASONING else self._message_id

    def _item_events(
        self,
        texts: dict[str, str],
        opening: str | None,
        status: str = "completed",
        logprobs: Sequence[TokenLogprob] = (),
    ):
        """The events that end the open item (the last of `texts`, with `status`, and the answer's `logprobs`) and
        open `opening`'s (None: the stream ends, with the message item, opened first where the reply had no
        answer)."""
        if opening is None and reasoning.CONTENT not in texts:
            yield from self._item_events(texts, reasoning.CONTENT)
        if texts:
            part, text = list(texts.items())[-1]
            where = {"item_id": self._item_id(part), "output_index": len(texts) - 1}
            if part == reasoning.REASONING:
                yield self.event("response.reasoning_text.done", **where, content_index=0, text=text)
                yield self.event(
                    "response.output_item.done",
                    output_index=where["output_index"],
                    item=self._reasoning_item(text, status),
                )
            else:
                entries = _logprob_entries(logprobs)
                yield self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=entries)
                part = self._text_part(text, logprobs)
                yield self.event("response.content_part.done", **where, content_index=0, part=part)
                yield self.event(
                    "response.output_item.done",
                    output_index=where["output_index"],
                    item=self._message_item(text, status, logprobs),
                )
        if opening is not None:
            texts[opening] = ""
            item = (
                self._reasoning_item(None, "in_progress")
                if opening == reasoning.REASONING
                else self._message_item(None, "in_progress")
            )
            yield self.event("response.output_item.added", output_index=len(texts) - 1, item=item)
            if opening == reasoning.CONTENT:
                where = {"item_id": self._message_id, "output_index": len(texts) - 1}
                yield self.event("response.content_part.added", **where, content_index=0, part=self._text_part(""))


def _answer_logprobs(entries: Sequence[TokenLogprob], text: str, answer: str) -> list[TokenLogprob]:
    """Of `entries` (tokens of the reply `text`, whole or so far, in order), those of the tokens that write
    `answer`: all, or where the reply is a reasoning model's, those from its answer on (the answer, stripped as
    `reasoning.message` and the streamed deltas part it, ends the text but for whitespace)."""
    if answer == text:
        return list(entries)
    if not answer:  # a reply cut while reasoning: its last token is the reasoning's
        return []
    start = len(text.rstrip()) - len(answer)
    ends = [entry.offset for entry in entries[1:]] + [len(text) + 1]
    return [entry for entry, end in zip(entries, ends) if end > start]


# ---- the app ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """What the routes answer from: the engine (which the caller starts and closes), its pool's context window,
    what records answers (the observer's metrics and log) and where completions are stored, if anywhere."""

    engine: Engine
    window: int | None
    default_max_tokens: int
    observer: Observer
    metrics: GenerationMetrics
    completions: CompletionStore | None
    adapter_updates: bool = False
    updating: asyncio.Lock = field(default_factory=asyncio.Lock)  # one load or unload at a time

    @property
    def pool(self):
        return self.engine.pool

    def model_card(self, name: str) -> dict:
        base = self.pool.base_name
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "tuneforge" if name == base else f"tuneforge (adapter on {base})",
        }

    def known_model(self, name: str) -> str:
        if not self.pool.serves(name):
            raise APIError(
                404,
                f"The model `{name}` does not exist. Served here: {', '.join(self.pool.names)}.",
                param="model",
                code="model_not_found",
            )
        return name

    def tokenizer(self, name: str):
        """`name`'s tokenizer; a 404 for a name unloaded since `known_model` passed it."""
        try:
            return self.pool.tokenizer(name)
        except KeyError:
            raise APIError(404, f"The model `{name}` was unloaded.", param="model", code="model_not_found") from None

    async def answered(
        self, request: Request, body: SampledBody, reply: _Reply | _ResponseReply, generation: Generation | Generations
    ) -> None:
        """What an answer leaves behind: its metrics, its log line's figures, and its stored completion if asked."""
        completions = generation.completions
        self.metrics.answered(reply.model, generation)
        usage = _usage(generation)
        finish_reasons = [completion.finish_reason for completion in completions]
        note(
            request,
            id=reply.id,
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            finish_reason=finish_reasons[0] if len(finish_reasons) == 1 else finish_reasons,
            time_to_first_token_s=round(generation.time_to_first_token, 4),
        )
        if isinstance(body, ChatCompletionBody) and body.store:
            sent = [message.model_dump(exclude_none=True) for message in body.messages]
            await asyncio.to_thread(
                self.completions.save,
                caller(request),
                sent,
                reply.whole(generation),
                body.metadata,
                body.template_tools(),
                reply.system_prompt,
            )


def served(request: Request) -> Served:
    return request.app.state.served


v1 = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


async def named_model(request: Request, server: Served = Depends(served)) -> None:
    """Label a generation request's count with the served model its body names, before any check refuses it, so a
    400 counts under that model too; a name nobody serves stays unlabelled, keeping the labels bounded."""
    try:
        body = await request.json()  # the body FastAPI has read and parsed already
    except ValueError:  # not JSON: its route refuses it
        return
    named = body.get("model") if isinstance(body, dict) else None
    if isinstance(named, str) and server.pool.serves(named):
        note(request, model=named)


@v1.get("/models")
def list_models(server: Served = Depends(served)):
    return {"object": "list", "data": [server.model_card(name) for name in server.pool.names]}


@v1.get("/models/{name:path}")
def get_model(name: str, server: Served = Depends(served)):
    return server.model_card(server.known_model(name))


@v1.post("/chat/completions", dependencies=[Depends(named_model)])
async def chat_completions(body: ChatCompletionBody, request: Request, server: Served = Depends(served)):
    if body.store and server.completions is None:
        raise APIError(
            400, "This server does not store completions: leave `store` out.", param="store", code="unsupported_value"
        )
    body.check_supported()  # once, before the checks of its tools, format and images
    tools = await asyncio.to_thread(_tool_parser, server, body)
    # Building a schema's index takes up to seconds: off the event loop, and before the request queues.
    constraint = await asyncio.to_thread(_constraint, server, body)
    # The parser's markers stay in the reply's text: where a call starts after some text (Llama 3.1's
    # <|python_tag|>), decoding would drop them and the call would stay text.
    tokenizer = server.tokenizer(server.known_model(body.model))
    images = await asyncio.to_thread(_image_files, server, body)
    generation = await submit(
        server,
        request,
        body,
        [body.template_messages()],
        server.default_max_tokens,
        "messages",
        body.template_tools(),
        tools.markers if tools is not None else (),
        constraint,
        images,
    )
    opened = reasoning.reasoning_opened(tokenizer, generation.prompt_ids)
    return await answer(
        server,
        request,
        body,
        _Reply.start(True, body.model, opened, tools, body.parallel_tool_calls, recorded_system_prompt(tokenizer)),
        generation,
    )


def _image_files(server: Served, body: ChatCompletionBody | ResponsesBody) -> tuple[bytes, ...]:
    """The image files the messages show, in order, each checked as training checks an image row's (a base64 data
    URL of a PNG, JPEG, GIF or WEBP within 10 MB); a 400 for a bad one, or for any where the model reads none."""
    images = body.images_sent()
    if not images:
        return ()
    name = server.known_model(body.model)
    side = image_inputs(server.tokenizer(name))
    if side is None:
        first = images[0]
        raise APIError(
            400,
            f"part {first.index} is of type {first.type!r}, and `{name}` is a text model (it has no image processor): "
            f"send the content as a string or text parts, or ask a model that reads images ({VISION_MODELS}).",
            param=first.content_param,
            code="invalid_value",
        )
    files = []
    for sent in images:
        image = read_shown_image(sent.url, side)
        if isinstance(image, str):
            raise APIError(400, f"{sent.url_param}: {image}", param=sent.url_param, code="invalid_value")
        files.append(image)
    return tuple(files)


def _tool_parser(server: Served, body: ChatCompletionBody) -> ToolCallParser | None:
    """What parses the reply's tool calls (None: the reply is text), once the model's chat template can take them
    and the calls the conversation holds."""
    name = server.known_model(body.model)
    called = next((i for i, message in enumerate(body.messages) if message.tool_calls), None)
    if called is not None and not renderer_for(server.tokenizer(name)).writes_tools:
        # The template would write the message's content alone: the tool's answer would answer nothing it shows.
        param = f"messages.{called}.tool_calls"
        raise APIError(
            400,
            f"{param}: the chat template of `{name}` does not write tool calls, so the model would never see this "
            "one. Send the conversation without tool calls, or ask a model whose chat template takes tools (Qwen "
            "2.5 and 3, Llama 3.1, Mistral, ...).",
            param=param,
            code="unsupported_value",
        )
    if not body.tools:
        return None
    try:
        return tool_call_parser(
            server.tokenizer(name),
            f"`{name}`",
            "tools",
            parses=body.calls_tools,
            as_text=', or send tool_choice "none" to get the reply as text',
        )
    except ConfigError as err:
        raise APIError(400, err.message, param="tools", code=err.code) from None


def _constraint(server: Served, body: ChatCompletionBody | ResponsesBody):
    """The index a JSON reply is decoded along (`constrain.json_index`); None for a text reply."""
    kind, schema = body.output_format()
    if kind == "text":
        return None
    # outlines-core reads the schema as JSON text, which it refuses past 128 levels as "not a valid JSON string".
    if schema is not None and (depth := nesting(schema)) > MAX_NESTING:
        param = body.SCHEMA_PARAM
        raise APIError(
            400,
            f"{param}: the schema nests arrays or objects {depth} deep; send a schema nested at most {MAX_NESTING} "
            "deep (its own object counted).",
            param=param,
            code="invalid_value",
        )
    name = server.known_model(body.model)
    try:
        return json_index(server.tokenizer(name), schema)
    except ConstraintError as err:
        if err.code != "invalid_schema":  # this model's tokenizer, or no outlines-core
            raise APIError(
                400, f"{body.FORMAT_PARAM} {kind}: {err.message}.", param=body.FORMAT_PARAM, code="unsupported_value"
            ) from err
        param = body.SCHEMA_PARAM
        raise APIError(400, f"{param}: {err.message}.", param=param, code="invalid_value") from err


@v1.post("/responses", dependencies=[Depends(named_model)])
async def responses(body: ResponsesBody, request: Request, server: Served = Depends(served)):
    """OpenAI's Responses API, stateless: `instructions` and `input` as a chat request's messages, on the
    same checks and engine."""
    body.check_supported()
    constraint = await asyncio.to_thread(_constraint, server, body)
    tokenizer = server.tokenizer(server.known_model(body.model))
    images = await asyncio.to_thread(_image_files, server, body)
    generation = await submit(
        server,
        request,
        body,
        [body.template_messages()],
        server.default_max_tokens,
        "input",
        constraint=constraint,
        images=images,
    )
    opened = reasoning.reasoning_opened(tokenizer, generation.prompt_ids)
    return await answer(server, request, body, _ResponseReply.start(body, opened, tokenizer), generation)


@v1.post("/completions", dependencies=[Depends(named_model)])
async def completions(body: CompletionBody, request: Request, server: Served = Depends(served)):
    """One prompt or a list of them (`CompletionBody.prompt_inputs`), each queued as a request of its own, so their
    rows decode together; prompt i's choices are i * n to i * n + n - 1, as OpenAI orders them."""
    body.check_supported()
    prompts = body.prompt_inputs()
    tokenizer = server.tokenizer(server.known_model(body.model))
    images = image_inputs(tokenizer)
    image_token = tokenizer.convert_ids_to_tokens(images.image_token_id) if images is not None else None
    for number, prompt in enumerate(prompts):
        if isinstance(prompt, tuple) and (outside := [t for t in prompt if not 0 <= t < len(tokenizer)]):
            raise APIError(
                400,
                ("prompt" if len(prompts) == 1 else f"prompt {number}")
                + f" has token ids outside this model's vocabulary (0 to {len(tokenizer) - 1}): {outside[:5]}. "
                "Send ids from this model's tokenizer.",
                param="prompt",
                code="invalid_value",
            )
        # An image's soft tokens stand for its pixels, which only a chat message's image part brings; a text
        # prompt is encoded with the tokenizer's special tokens, so the token's text there is the token.
        if images is not None and (images.image_token_id if isinstance(prompt, tuple) else image_token) in prompt:
            raise APIError(
                400,
                ("prompt" if len(prompts) == 1 else f"prompt {number}")
                + f" holds the image token (id {images.image_token_id}, {image_token!r} in text), which stands for an "
                "image's pixels, and /v1/completions takes no images. Send the image as an image_url part of a "
                "/v1/chat/completions message.",
                param="prompt",
                code="invalid_value",
            )
    generation = await submit(server, request, body, prompts, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
    reply = _Reply.start(False, body.model)
    if body.echo:
        # The prompts as sent; token ids as they decode (special tokens' text left out, as in their entries); each
        # prompt's choices in a row, as the generation orders them.
        echo = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        reply = replace(reply, echo=tuple(text for text in echo for _ in range(generation.per_prompt)))
    return await answer(server, request, body, reply, generation)


class LoadAdapterBody(RequestBody):
    """vLLM's `/v1/load_lora_adapter` body."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadAdapterBody(RequestBody):
    """vLLM's `/v1/unload_lora_adapter` body (`lora_int_id`, vLLM's own number for an adapter, is not used)."""

    lora_name: str
    lora_int_id: int | None = None


def _updates_allowed(server: Served) -> None:
    if not server.adapter_updates:
        raise APIError(
            404,
            "This server does not load or unload adapters while it runs. Its operator allows it with "
            "`tuneforge serve --allow-adapter-updates`; without it, serve adapters with --adapter NAME=PATH.",
            code="adapter_updates_off",
        )


@v1.post("/load_lora_adapter")
async def load_adapter(body: LoadAdapterBody, request: Request, server: Served = Depends(served)):
    """Serve the adapter at `lora_path` as `lora_name` from now on, checked as `--adapter` checks one at start-up
    (its weights load on its first request); a name served already is refused, as vLLM refuses it."""
    _updates_allowed(server)
    name, path = body.lora_name.strip(), body.lora_path.strip()
    note(request, lora_name=name, lora_path=path)
    if body.load_inplace:
        raise APIError(
            400,
            "load_inplace: this server does not replace an adapter in place; unload it "
            "(/v1/unload_lora_adapter), then load the new one.",
            param="load_inplace",
            code="unsupported_value",
        )
    if not name or not path:
        field_name = "lora_name" if not name else "lora_path"
        raise APIError(400, f"{field_name} must not be empty.", param=field_name, code="invalid_value")
    async with server.updating:
        if name in server.pool.retiring:
            raise APIError(
                409,
                f"lora_name: the adapter '{name}' is being unloaded, once the requests it took are answered; "
                "load it again when its unload has answered.",
                param="lora_name",
                code="adapter_unloading",
            )
        if server.pool.serves(name) or name == server.pool.base_name:
            raise APIError(
                400,
                f"lora_name: the adapter '{name}' has already been loaded"
                + (" (it is the base model's name)" if name == server.pool.base_name else "")
                + ". Pick another name, or unload it first (/v1/unload_lora_adapter).",
                param="lora_name",
                code="invalid_value",
            )
        # A client names a folder on this machine: nothing is downloaded or converted for it (a hub id, a
        # registry model, a GGUF file, an adapter's base missing here), and a path that is not there is refused
        # without the listing of its parent folder that `models.resolve` gives a user at the command line.
        if not Path(path).expanduser().exists():
            raise APIError(
                400,
                f"lora_path {path}: no such file or folder on this server. Give the folder of a LoRA adapter or a "
                "tuneforge run on the served base, as a path on the server.",
                param="lora_path",
                code="model_not_found",
            )
        try:
            await asyncio.to_thread(server.pool.add_adapter, name, path, pull_missing=False)
        except TuneforgeError as err:
            raise APIError(400, f"lora_path {path}: {err.message}", param="lora_path", code=err.code) from err
    server.metrics.adapter_updated(server.pool.base_name, name, "load")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@v1.post("/unload_lora_adapter")
async def unload_adapter(body: UnloadAdapterBody, request: Request, server: Served = Depends(served)):
    """Stop serving the adapter `lora_name`: new requests for it are refused at once; the answer comes once
    the requests it has taken already are answered and its weights are deleted."""
    _updates_allowed(server)
    name = body.lora_name.strip()
    note(request, lora_name=name)
    if name == server.pool.base_name or (server.pool.serves(name) and name not in server.pool.names):
        raise APIError(
            400,
            f"lora_name: '{name}' is the base model, which is not an adapter and cannot be unloaded.",
            param="lora_name",
            code="invalid_value",
        )
    try:  # an EngineError: the worker closing or stopped, before or while it deletes the adapter
        async with server.updating:
            if not server.pool.serves(name):
                raise APIError(
                    404,
                    f"lora_name: the adapter '{name}' cannot be found. "
                    f"Loaded: {', '.join(server.pool.names[1:]) or 'none'}.",
                    param="lora_name",
                    code="model_not_found",
                )
            unloaded = server.engine.unload(name)
        await asyncio.wrap_future(unloaded)  # loads and unloads of other adapters go on meanwhile
    except EngineError as err:
        raise engine_error(err) from err
    server.metrics.adapter_updated(server.pool.base_name, name, "unload")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def health(request: Request):
    server = served(request)
    stats, pool = server.engine.stats(), server.pool
    body = {
        "status": "ok" if stats["alive"] else "unavailable",
        "model": pool.base_name,
        "dtype": str(pool.model.dtype).removeprefix("torch."),
        "adapters": pool.names[1:],
        "loaded_adapters": pool.loaded,
        "waiting": stats["waiting"],
        "running": stats["running"],
        "largest_batch": stats["largest_batch"],
    }
    return JSONResponse(body, status_code=200 if stats["alive"] else 503)


def create_app(
    engine: Engine,
    *,
    api_keys: Sequence[str] = (),
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    docs: bool = False,
    observer: Observer | None = None,
    completions: CompletionStore | None = None,
    adapter_updates: bool = False,
) -> FastAPI:
    """The routes over `engine` (which the caller starts and closes), behind `tuneforge.web`'s edge.

    With `api_keys`, every route but `/health` wants `Authorization: Bearer KEY` with one of them.
    `observer` records the requests (by default one of the app's own); `completions` is where
    `store: true` keeps them (without it, such a request is refused, and the stored completions' routes say
    that none are stored). The app can be called from inside another (the jobs service) as it is, sharing its
    host's observer and store; a host that caps
    bodies itself gives `max_body_bytes` None, so its cap is the one. With `adapter_updates`, clients with a
    key may load and unload adapters (vLLM's routes); without it those routes refuse with a 404.
    """
    app = FastAPI(
        title="tuneforge", summary="OpenAI-compatible inference for a base model and its adapters", **docs_urls(docs)
    )
    observer = observer or Observer()
    metrics = observer.metrics(GenerationMetrics)
    metrics.watch(engine)
    app.state.served = Served(
        engine,
        model_context_length(engine.pool.model),
        default_max_tokens,
        observer,
        metrics,
        completions,
        adapter_updates,
    )
    app.include_router(v1)
    app.state.completions = completions  # without one, its routes say that none are stored (`completion_store`)
    app.include_router(completion_routes.router)
    app.add_api_route("/health", health, methods=["GET"])
    edge(app, api_keys=api_keys, max_body_bytes=max_body_bytes, observer=observer)
    return app


async def submit(
    server: Served,
    request: Request,
    body: SampledBody,
    prompts: list,
    default_max: int,
    length_param: str,
    tools: list[dict] | None = None,
    keep_tokens: tuple[str, ...] = (),
    constraint=None,
    images: tuple[bytes, ...] = (),
) -> Generation | Generations:
    """Queue `prompts` (chat's messages, or a completion's prompts), each with `body.n` choices: a `Generation`
    for one prompt, `Generations` for several, whose errors name the prompt (`prompt 2: ...`). `images`: the
    image files a chat prompt shows (`_image_files`). Its route has checked `body` (`check_supported`)."""
    name = server.known_model(body.model)
    logged = prompts[0] if len(prompts) == 1 else prompts
    note(request, model=name, **({"prompt": logged} if server.observer.log_prompts else {}))
    # Long prompts take a while to render and encode: off the event loop, so other requests go on, all in one hop.
    template_kwargs = getattr(body, "chat_template_kwargs", None)
    encoded = await asyncio.to_thread(
        _encode, server.tokenizer(name), prompts, tools, template_kwargs, length_param, body.prompt_field, images
    )
    queued = []
    for number, prompt_ids in enumerate(encoded):
        try:
            queued.append((prompt_ids, _reply_limit(body, prompt_ids, server.window, default_max, length_param)))
        except APIError as err:
            if len(prompts) > 1:
                err.message = f"{length_param} {number}: {err.message}"
            raise
    if constraint is not None and reasoning.reasoning_opened(server.tokenizer(name), queued[0][0]):
        raise APIError(
            400,
            f"{body.FORMAT_PARAM}: this prompt opens the model's reasoning, which a reply constrained to JSON could "
            f"not write. Leave {body.FORMAT_PARAM} out, or turn the reasoning off where the template can "
            "(chat_template_kwargs).",
            param=body.FORMAT_PARAM,
            code="unsupported_value",
        )
    try:
        generations = server.engine.submit_all(
            name,
            [(ids, body.sampling(max_new_tokens, keep_tokens, constraint)) for ids, max_new_tokens in queued],
            body.n,
            images,
        )
    except EngineError as err:
        raise engine_error(err) from err
    return generations.parts[0] if len(prompts) == 1 else generations


def _reply_limit(
    body: SampledBody, prompt_ids: list[int], window: int | None, default_max: int, length_param: str
) -> int:
    """The most tokens the completion of a prompt of `prompt_ids` may have."""
    if not prompt_ids:
        raise APIError(400, "The prompt is empty.", param=length_param)
    return _max_new_tokens(body.length_limit(), len(prompt_ids), window, default_max, length_param)


def _encode(
    tokenizer,
    prompts: list,
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
    param: str = "messages",
    field_name=lambda field: field,
    images: tuple[bytes, ...] = (),
) -> list[list[int]]:
    """Each prompt's token ids (its images' tokens among them), the texts in one batch of the tokenizer's."""
    for prompt in prompts:
        if isinstance(prompt, list):  # as training refuses such rows: text that would end a turn or open one
            for problem in renderer_for(tokenizer).special_tokens_in_prompt(prompt, tools, path=param, brackets=False):
                field = field_name(problem.field)
                raise APIError(400, f"{field}: {problem.message}", param=field, code="invalid_value")
    try:
        return encode_prompts(tokenizer, prompts, tools, template_kwargs, images)
    except (TemplateError, ValueError) as err:  # a template that refuses these messages (roles, order)
        raise APIError(400, f"The model's chat template cannot render these messages: {err}", param=param) from err


async def answer(
    server: Served,
    request: Request,
    body: SampledBody,
    reply: _Reply | _ResponseReply,
    generation: Generation | Generations,
):
    note(request, id=reply.id)  # in the log line of an answer cut short too
    if body.stream:
        return StreamingResponse(
            reply.events(server, request, body, generation),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    result = asyncio.ensure_future(generation.result())
    hung_up = asyncio.ensure_future(_hang_up(request))
    try:
        await asyncio.wait([result, hung_up], return_when=asyncio.FIRST_COMPLETED)
    finally:
        hung_up.cancel()
        generation.cancel()  # a row whose client went stops decoding; a finished one is gone already
    if not result.done():
        result.cancel()
        return Response(status_code=CLIENT_LEFT)  # nobody reads it: the client has gone
    try:
        result.result()  # raises the generation's failure, if it failed
        whole = reply.whole(generation)
    except EngineError as err:
        raise engine_error(err) from err
    await server.answered(request, body, reply, generation)
    return whole


async def _hang_up(request: Request) -> None:
    """Returns once the client disconnects (Starlette does not cancel a handler then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _max_new_tokens(
    length_limit: tuple[str, int | None], prompt_tokens: int, window: int | None, default: int, prompt_param: str
) -> int:
    limit_param, requested = length_limit
    room = window - prompt_tokens if window else None
    if room is not None and room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {window} tokens, but the prompt has {prompt_tokens}. Shorten it.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return min(default, room) if room is not None else default
    if room is not None and requested > room:
        raise APIError(
            400,
            f"This model's maximum context length is {window} tokens; you asked for "
            f"{prompt_tokens + requested} ({prompt_tokens} in the prompt, {requested} for the "
            f"completion). Lower {limit_param} or shorten the prompt.",
            param=limit_param,
            code="context_length_exceeded",
        )
    return requested


async def _events(
    server: Served, request: Request, body: GenerationBody, reply: _Reply, generation: Generation | Generations
):
    """The SSE stream: each choice's chunks as they come (`_choice_events`), the usage if asked, `[DONE]`."""
    try:
        async for chunk in _merged([_choice_events(reply, generation, index) for index in range(generation.n)]):
            yield _sse(chunk)
        await server.answered(request, body, reply, generation)
        if body.stream_options and body.stream_options.include_usage:
            yield _sse(reply.usage_chunk(generation))
        yield _sse("[DONE]")
    except EngineError as err:
        yield _sse(engine_error(err).body())
    finally:
        generation.cancel()  # a client that disconnected mid-stream ends up here too


async def _choice_events(reply: _Reply, generation: Generation | Generations, index: int):
    """Choice `index`'s chunks: its opening (chat), a chunk per piece, the tool calls, the finish reason."""
    if reply.chat:
        yield reply.chunk(opening=True, index=index)
    # A reasoning model's reasoning streams as it comes; its answer (or any other reply) is parsed for tool
    # calls, its text streamed up to where a call may be starting.
    held = HeldStream(reply.tools) if reply.tools is not None else None
    # Each text chunk carries the log probabilities (where asked) of the tokens that came since the last one; the
    # last chunk the rest, so the chunks' join those of the whole answer.
    fresh = _Unsent(generation.logprobs[index])

    pieces = generation.pieces(index)
    if reply.echo is not None:
        # The prompt goes first, as OpenAI sends it; its tokens' log probabilities (where asked) come with the
        # prefill, before the first piece or the completion.
        first = await anext(pieces, None) if generation.sampling.prompt_logprobs else None
        yield reply.chunk(reply.echoed(index), index=index, prompt=generation.prompt_logprobs[index])
        pieces = _after(first, pieces)
    async for part, text in reasoning.deltas(pieces, reply.reasoning):
        if held is None or part != reasoning.CONTENT:
            yield reply.chunk(text, field=part, index=index, logprobs=fresh())
        elif text := held.feed(text):
            yield reply.chunk(text, index=index, logprobs=fresh())
    completion = generation.completions[index]
    parsed = reply.parsed(held.text) if held is not None else None
    if held is not None and (text := held.finish(called=parsed is not None)):
        yield reply.chunk(text, index=index, logprobs=fresh())
    if parsed is not None:
        yield reply.tool_calls_chunk(parsed.tool_calls, index)
    rest = (completion.logprobs or ())[fresh.sent :]
    finish_reason = reply_finish_reason(completion.finish_reason, called=parsed is not None)
    yield reply.chunk(finish_reason=finish_reason, index=index, logprobs=rest)


async def _after(first: str | None, rest):
    """`first` (where not None), then the items of `rest`."""
    if first is not None:
        yield first
    async for item in rest:
        yield item


async def _merged(streams: list):
    """The items of several async iterators as each comes; an error in one ends them all and is raised."""
    if len(streams) == 1:  # one choice: its own iterator, without tasks in between
        async for item in streams[0]:
            yield item
        return
    items: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for item in stream:
                await items.put(item)
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it
            await items.put(err)
        await items.put(done)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await items.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
