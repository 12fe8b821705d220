"""OpenAI-compatible routes: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, `/health`.

Bodies and errors are shaped as OpenAI's, so the official clients work unchanged: every error is
`{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes (a validation
error is a 400 naming the parameter, not FastAPI's 422). Sampling defaults are OpenAI's
(temperature 1, top_p 1); `max_tokens` defaults to 16 for completions, as OpenAI's does, and for
chat to the server's `default_max_tokens`, within the context window either way.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate import Completion, Sampling, encode_prompts
from ..models.convert import context_length
from .engine import Engine, EngineError, Generation

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI allows


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    @classmethod
    def from_engine(cls, err: EngineError) -> "APIError":
        return cls(err.status, err.message, code=err.code, type="server_error")

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request bodies --------------------------------------------------------------------------------


class _Body(BaseModel):
    # OpenAI refuses arguments it does not know; so do we, naming them, rather than ignore them silently.
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationBody(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    user: str | None = None  # OpenAI's end-user id; accepted and not used

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: this server returns one choice per request.",
                           param="n", code="unsupported_value")
        for param in ("presence_penalty", "frequency_penalty"):
            if getattr(self, param):
                raise APIError(400, f"{param} is not supported (leave it at 0).", param=param,
                               code="unsupported_value")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported.", param="logprobs", code="unsupported_value")

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}.", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty.", param="stop")
        return tuple(stop)


class ChatCompletionBody(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_GenerationBody):
    prompt: str


# ---- response bodies -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    """The envelope of one answer, whole or as stream chunks; chat and completions differ only in the choice."""

    chat: bool
    model: str
    id: str
    created: int

    @classmethod
    def start(cls, chat: bool, model: str) -> "_Reply":
        return cls(chat, model, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()))

    def whole(self, completion: Completion) -> dict:
        answer = {"message": {"role": "assistant", "content": completion.text}} if self.chat else {"text": completion.text}
        choice = {"index": 0, **answer, "logprobs": None, "finish_reason": completion.finish_reason}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice],
                              usage=_usage(completion))

    def chunk(self, text: str = "", finish_reason: str | None = None, *, opening: bool = False) -> dict:
        if self.chat:
            answer = {"delta": {"role": "assistant", "content": ""} if opening else {"content": text} if text else {}}
        else:
            answer = {"text": text}
        return self._envelope(self._chunk_object, [{"index": 0, **answer, "logprobs": None,
                                                     "finish_reason": finish_reason}])

    def usage_chunk(self, completion: Completion) -> dict:
        return self._envelope(self._chunk_object, [], usage=_usage(completion))

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _envelope(self, object_name: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}


def _usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


# ---- the app ---------------------------------------------------------------------------------------


def create_app(engine: Engine, *, api_keys: Sequence[str] = (), default_max_tokens: int = 1024) -> FastAPI:
    """The routes over `engine` (which the caller starts and closes), with OpenAI-shaped errors.

    With `api_keys`, every `/v1` route wants `Authorization: Bearer KEY` with one of them; `/health` never does.
    The app can be mounted inside another (the jobs service) as it is.
    """
    pool = engine.pool
    window = context_length(pool.model.config)
    keys = [key.encode() for key in api_keys]

    def authorise(request: Request) -> None:
        if not keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "No API key given: send it as `Authorization: Bearer KEY`.", code="invalid_api_key")
        if not any(hmac.compare_digest(given.strip().encode(), key) for key in keys):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0,
                "owned_by": "tuneforge" if name == pool.base_name else f"tuneforge (adapter on {pool.base_name})"}

    def known_model(name: str) -> str:
        if name not in pool.names:
            raise APIError(404, f"The model `{name}` does not exist. Served here: {', '.join(pool.names)}.",
                           param="model", code="model_not_found")
        return name

    def submit(body: _GenerationBody, prompt, default_max: int, length_param: str) -> Generation:
        body.check_supported()
        name = known_model(body.model)
        tokenizer = pool.tokenizer(name)
        try:
            [prompt_ids] = encode_prompts(tokenizer, [prompt])
        except (TemplateError, ValueError) as err:  # a template that refuses these messages (roles, order)
            raise APIError(400, f"The model's chat template cannot render these messages: {err}",
                           param="messages") from err
        if not prompt_ids:
            raise APIError(400, "The prompt is empty.", param=length_param)
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        max_new_tokens = _max_new_tokens(requested, len(prompt_ids), window, default_max, length_param)
        sampling = Sampling(max_new_tokens, body.temperature, body.top_p, body.seed, body.stop_strings())
        try:
            return engine.submit(name, prompt_ids, sampling)
        except EngineError as err:
            raise APIError.from_engine(err) from err

    async def answer(reply: _Reply, generation: Generation, body: _GenerationBody):
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_events(reply, generation, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return reply.whole(await generation.result())
        except EngineError as err:
            raise APIError.from_engine(err) from err
        finally:
            generation.cancel()  # the client may have gone; then the row stops decoding

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorise)])

    @v1.get("/models")
    def list_models():
        return {"object": "list", "data": [model_card(name) for name in pool.names]}

    @v1.get("/models/{name:path}")
    def get_model(name: str):
        return model_card(known_model(name))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionBody):
        messages = [message.as_template_message() for message in body.messages]
        generation = submit(body, messages, default_max_tokens, "messages")
        return await answer(_Reply.start(True, body.model), generation, body)

    @v1.post("/completions")
    async def completions(body: CompletionBody):
        generation = submit(body, body.prompt, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
        return await answer(_Reply.start(False, body.model), generation, body)

    app = FastAPI(title="tuneforge", summary="OpenAI-compatible inference for a base model and its adapters")
    app.include_router(v1)

    @app.get("/health")
    def health():
        stats = engine.stats()
        body = {"status": "ok" if stats["alive"] else "unavailable", "model": pool.base_name,
                "adapters": pool.names[1:], "loaded_adapters": pool.loaded,
                "waiting": stats["waiting"], "running": stats["running"], "largest_batch": stats["largest_batch"]}
        return JSONResponse(body, status_code=200 if stats["alive"] else 503)

    install_error_handlers(app)
    return app


def _max_new_tokens(requested: int | None, prompt_tokens: int, window: int | None, default: int,
                    prompt_param: str) -> int:
    room = window - prompt_tokens if window else None
    if room is not None and room < 1:
        raise APIError(400, f"This model's maximum context length is {window} tokens, but the prompt has "
                            f"{prompt_tokens}. Shorten it.", param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return min(default, room) if room is not None else default
    if room is not None and requested > room:
        raise APIError(400, f"This model's maximum context length is {window} tokens; you asked for "
                            f"{prompt_tokens + requested} ({prompt_tokens} in the prompt, {requested} for the "
                            "completion). Lower max_tokens or shorten the prompt.",
                       param="max_tokens", code="context_length_exceeded")
    return requested


async def _events(reply: _Reply, generation: Generation, include_usage: bool):
    """The SSE stream: a chunk per piece, one with the finish reason, the usage if asked, `[DONE]`."""
    try:
        if reply.chat:
            yield _sse(reply.chunk(opening=True))
        async for piece in generation.pieces():
            yield _sse(reply.chunk(piece))
        yield _sse(reply.chunk(finish_reason=generation.completion.finish_reason))
        if include_usage:
            yield _sse(reply.usage_chunk(generation.completion))
        yield _sse("[DONE]")
    except EngineError as err:
        yield _sse(APIError.from_engine(err).body())
    finally:
        generation.cancel()  # a client that disconnected mid-stream ends up here too


def install_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's body: APIError, validation (400 naming the parameter), HTTP errors, the unexpected."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        loc = list(first.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "header"):  # where it came from, not its name
            loc = loc[1:]
        param = ".".join(map(str, loc)) or None
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == "missing":
            message = f"Missing required parameter: '{param}'."
        elif first.get("type") == "json_invalid":
            message, param = f"The request body is not valid JSON: {first.get('msg')}", None
        else:
            message = f"Invalid value for '{param}': {first.get('msg')}" if param else first.get("msg", "Invalid request")
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail), type="invalid_request_error" if err.status_code < 500
                        else "server_error").response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        return APIError(500, f"The server failed on this request: {err}", type="server_error",
                        code="server_error").response()
