"""The request bodies of the OpenAI-compatible routes (`app.py`): chat completions, completions and
responses, checked as OpenAI checks them (and refused with its error shapes through `tuneforge.web`)
before the engine sees a value, and what each asks of the decoder (`SampledBody.sampling`).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import replace
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import Field, PlainValidator, PrivateAttr, TypeAdapter, ValidationInfo, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from ..data.schema import Image, Message
from ..errors import unreadable_json
from ..generate import MAX_SEED, MAX_TOP_LOGPROBS, Sampling
from ..web import MAX_NESTING, APIError, Metadata, RequestBody, Shallow, StoredText, nesting
from ..web.shapes import not_unicode

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_MAX_TOKENS = 1024  # chat's, unless the server says otherwise
MAX_STOP_STRINGS = 4  # as OpenAI allows
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' `logprobs`, at most (OpenAI's limit)
# Prompts of one /v1/completions request (`prompt` as a list). Each waits in the engine's queue as a request of its
# own, so one request takes at most half of the queue it has by default (serve_defaults.MAX_WAITING, 256).
MAX_PROMPTS = 128
# Choices of one request, which decode together as rows of one batch (and at most the engine's batch size).
MAX_CHOICES = 16
# Below this, sampling picks the argmax but for rounding, and dividing the logits by it can overflow.
MIN_SAMPLING_TEMPERATURE = 1e-4
DEFAULT_MAX_BODY_BYTES = 4 << 20
# What the server passes to the chat template itself: apply_chat_template's arguments and the messages.
_APPLY_CHAT_TEMPLATE = inspect.signature(PreTrainedTokenizerBase.apply_chat_template)
TEMPLATE_ARGUMENTS = frozenset({"messages", *_APPLY_CHAT_TEMPLATE.parameters} - {"self", "kwargs"})
FUNCTIONS_ARE_TOOLS = (
    "is OpenAI's deprecated form of tool calling, which this server does not take: send the functions as "
    '`tools` ([{"type": "function", "function": ...}]), calls as an assistant message\'s `tool_calls` and their '
    'results as "tool" messages with a `tool_call_id`.'
)


# The fields of the SDK's message object (`ChatCompletionMessage`) that this server's replies hold as null.
SDK_NULL_FIELDS = ("function_call", "refusal", "audio")


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class ImageURL(RequestBody):
    url: str  # a base64 data URL, read as training reads an image row's (`data.images.read_image`)
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's; the processor sizes every image alike


class ImagePart(RequestBody):
    """An image in a user message, as OpenAI's API and its vision fine-tuning data give it; read by a model that
    reads images (`app._image_files`), refused by a text model."""

    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(RequestBody):
    name: str
    arguments: str  # JSON text, as OpenAI's API sends it

    @field_validator("arguments")
    @classmethod
    def _template_takes_them(cls, arguments: str) -> str:
        # The chat template is given JSON arguments as the object they spell (`data.schema.Message.to_template`), and
        # text that is not JSON as it is: the object must be one that Python reads, the template walks and the
        # tokenizer encodes.
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
        except (RecursionError, ValueError) as err:
            raise ValueError(f"the JSON text {unreadable_json(err)}; send arguments this server can read") from None
        if (depth := nesting(parsed)) > MAX_NESTING:
            raise ValueError(f"the JSON text nests arrays or objects {depth} deep; send at most {MAX_NESTING}")
        if (found := not_unicode(parsed)) is not None:
            path, position, character = found
            raise ValueError(
                f"the JSON text's {path or 'value'} is not Unicode text: character {position} ({character}) is one "
                "half of a UTF-16 surrogate pair alone; a \\u escape of a character beyond U+FFFF needs both halves"
            )
        return arguments


class ToolCall(RequestBody):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(RequestBody):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: Annotated[dict | None, Shallow] = None  # written by the chat template
    strict: bool | None = None


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class SentImage(NamedTuple):
    """An image part of a request's messages, with the names of its fields as the request gives them."""

    content_param: str  # the content it is a part of: "messages.0.content"
    index: int  # its index among the content's parts
    type: str  # its type as sent: "image_url" (chat) or "input_image" (responses)
    url_param: str  # its url's field: "messages.0.content.1.image_url.url"
    url: str


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None  # before content, whose check reads it
    # Checked when left out too: only an assistant message with tool_calls goes without content.
    content: str | list[TextPart | ImagePart] | None = Field(None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an assistant reply's reasoning, as a reasoning model's answer holds it
    # A reply's URL citations, as the SDK's message object holds them when a client sends it back; they describe the
    # content, which the template writes, and are not read.
    annotations: Annotated[list | None, Shallow] = None
    # What this server's replies never hold, refused when not null or empty (`_never_answered`).
    refusal: str | None = None
    audio: dict | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_function_turns(cls, message):
        # Said here, since pydantic would say that the "function" role is a wrong value.
        if not isinstance(message, dict):
            return message
        if message.get("function_call") is not None:
            raise ValueError(f"function_call {FUNCTIONS_ARE_TOOLS}")
        if message.get("role") == "function":
            raise ValueError(f"the 'function' role {FUNCTIONS_ARE_TOOLS}")
        # The SDK's message object (a reply's, sent back in a multi-turn loop) holds these as null, and some compatible
        # servers' replies the refusal as "": taken as left out.
        return {key: value for key, value in message.items() if key not in SDK_NULL_FIELDS or value not in (None, "")}

    @field_validator("refusal", "audio", mode="before")
    @classmethod
    def _never_answered(cls, value, info: ValidationInfo):
        what = "a refusal" if info.field_name == "refusal" else "audio"
        raise ValueError(
            f"this server's models answer with no {info.field_name} and the chat template has no place for "
            f"{what}: send the assistant's reply as text content, and {info.field_name} null or left out"
        )

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content, info: ValidationInfo):
        # Said here, since pydantic would report the union's first branch: "should be a valid string".
        if content is None and not info.data.get("tool_calls"):
            raise ValueError(
                "a message needs content: a string or a list of text parts (only an assistant message with "
                "tool_calls may have null content)"
            )
        role = info.data.get("role")
        for index, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind == "image_url" and role == "user":
                holder = part.get("image_url")
                if not isinstance(holder, dict) or not isinstance(holder.get("url"), str):
                    raise ValueError(
                        f'part {index} is an image without its url: send {{"type": "image_url", "image_url": '
                        '{"url": "data:image/png;base64,<the file\'s bytes in base64>"}}'
                    )
            elif kind == "image_url":
                raise ValueError(
                    f"part {index} is an image in a {role} message: images are read in user messages only, as "
                    "in training; send the image in a user message"
                )
            elif kind != "text":
                raise ValueError(
                    f"part {index} is of type {kind!r}: a message's content is a string or text parts "
                    '({"type": "text", "text": ...}) and, in a user message to a model that reads images, image '
                    'parts ({"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}})'
                )
        return content

    @model_validator(mode="after")
    def _fields_in_their_roles(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"a {self.role!r} message has tool_calls: only assistant messages make tool calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the tool_call_id of the call it answers")
        if self.reasoning_content is not None and self.role != "assistant":
            raise ValueError(f"only assistant messages have reasoning_content; remove it from this {self.role} message")
        return self

    @property
    def image_parts(self) -> list[tuple[int, ImagePart]]:
        """The content's image parts, with their index among its parts."""
        parts = self.content if isinstance(self.content, list) else []
        return [(index, part) for index, part in enumerate(parts) if isinstance(part, ImagePart)]

    def as_data_message(self) -> dict:
        """The message as a chat training row holds it ("developer" is OpenAI's newer name for "system",
        which chat templates know; a message with images keeps its parts, as image rows hold them)."""
        if isinstance(self.content, str | None):
            text = self.content
        elif self.image_parts:
            text = [part.model_dump(exclude_none=True) for part in self.content]
        else:
            text = "".join(part.text for part in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message

    def as_template_message(self) -> dict:
        """The message as training gives it to the chat template (a call's null content as "", its arguments
        as an object; a reasoning model's template writes reasoning_content, Qwen 3's into the last replies,
        or leaves it out; a template writes the participant's `name` or leaves it out, as in training)."""
        data = self.as_data_message()
        if not self.image_parts:
            return Message(**{**data, "content": data["content"] or ""}).to_template()
        # The template writes an image's marker for each image part; the image files go to the model apart.
        parts = tuple(
            Image(b"", part.image_url.url) if isinstance(part, ImagePart) else part.text for part in self.content
        )
        text = "".join(part for part in parts if isinstance(part, str))
        return Message(**{**data, "content": text, "parts": parts}).to_template()


SENT_MESSAGES = TypeAdapter(list[ChatMessage])  # a refusal's location starts with the message's index


def training_messages(messages: list[dict]) -> list[dict]:
    """Messages as sent (a stored completion's) as a chat training row holds them; one that the request checks
    refuse is a pydantic `ValidationError` located at its index."""
    return [message.as_data_message() for message in SENT_MESSAGES.validate_python(messages)]


def refuse_not_served(not_served: dict[str, tuple[str, tuple]], sent: dict[str, Any], prefix: str = "") -> None:
    """Refuses, with a 400 naming the parameter (`prefix` before its name, where the body sits), the first of
    `not_served`'s arguments ({name: (why, the values that ask for nothing)}) that `sent` sets otherwise."""
    for name, (why, harmless) in not_served.items():
        value = sent.get(name)
        if value is not None and not any(value == same and type(value) is type(same) for same in harmless):
            param = f"{prefix}{name}"
            raise APIError(400, f"{param} is not supported: {why}.", param=param, code="unsupported_value")


class StreamOptions(RequestBody):
    include_usage: bool = False
    # OpenAI pads its chunks with random `obfuscation` text unless this is false; these chunks carry none.
    include_obfuscation: bool = False


class SampledBody(RequestBody):
    """What every generating route takes: the model, its sampling and whether the answer streams; `submit`
    reads a body through these methods."""

    # The parameter that asks for structured output, and where a json_schema's schema sits in it.
    FORMAT_PARAM: ClassVar[str] = "response_format"
    SCHEMA_PARAM: ClassVar[str] = "response_format.json_schema.schema"
    # The field that limits the reply's length (`length_limit`).
    LENGTH_PARAM: ClassVar[str]
    # OpenAI's arguments of the route that this server does not build: {name: (why, the values that ask for
    # nothing)}, refused by name with why when set otherwise (any other unknown one is refused as unrecognized).
    NOT_SERVED: ClassVar[dict[str, tuple[str, tuple]]] = {}

    model: StoredText  # the jobs service looks a fine-tuned model up by it
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    # The values sent for NOT_SERVED's fields, which `check_supported` refuses when set.
    _not_served: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _set_aside_not_served(cls, data, handler):
        # They are no fields of the body, so any value passes validation and is refused by name afterwards.
        if not isinstance(data, dict):
            return handler(data)
        body = handler({key: value for key, value in data.items() if key not in cls.NOT_SERVED})
        body._not_served = {key: value for key, value in data.items() if key in cls.NOT_SERVED}
        return body

    @field_validator("temperature", "top_p", "stream", mode="before")
    @classmethod
    def _null_sampling_is_the_default(cls, value, info: ValidationInfo):
        # OpenAI's API takes null for these as their default, and its SDKs type them Optional.
        return cls.model_fields[info.field_name].default if value is None else value

    def check_supported(self) -> None:
        """Refuses, with a 400 naming the parameter, what was sent and is not served."""
        refuse_not_served(self.NOT_SERVED, self._not_served)

    def prompt_field(self, field: str) -> str:
        """The request's name of a field of the prompt (`messages.0.content`) that the template would write."""
        return field

    def length_limit(self) -> tuple[str, int | None]:
        """The parameter that limits the reply's length, and its value (None: not given)."""
        return self.LENGTH_PARAM, getattr(self, self.LENGTH_PARAM)

    def stop_strings(self) -> tuple[str, ...]:
        return ()

    def penalties(self) -> tuple[float, float]:
        """presence_penalty and frequency_penalty."""
        return 0.0, 0.0

    def logprobs_asked(self) -> int | None:
        """How many most likely tokens each generated token's log probability comes with; None: no log
        probabilities."""
        return None

    def sampling(self, max_new_tokens: int, keep_tokens: tuple[str, ...] = (), constraint=None) -> Sampling:
        temperature = self.temperature if self.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0
        return Sampling(
            max_new_tokens,
            temperature,
            self.top_p,
            self.seed,
            self.stop_strings(),
            keep_tokens,
            constraint,
            *self.penalties(),
            logprobs=self.logprobs_asked(),
        )


class GenerationBody(SampledBody):
    LENGTH_PARAM: ClassVar[str] = "max_tokens"

    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    # Several choices of one prompt; with a seed, choice i samples as a request with seed + i (`choice_sampling`).
    # At temperature 0 they are n equal choices, as OpenAI's are.
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    user: str | None = None  # OpenAI's end-user id; accepted and not used

    @field_validator("n", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _null_is_the_default(cls, value, info: ValidationInfo):
        return cls._null_sampling_is_the_default(value, info)

    @field_validator("stop", mode="before")
    @classmethod
    def _string_or_strings(cls, stop):
        # Said here, since pydantic would name the union's branches as parameters: "stop.str", "stop.list[str].0".
        if stop is None or isinstance(stop, str):
            return stop
        if not isinstance(stop, list) or not all(isinstance(item, str) for item in stop):
            raise ValueError(
                f"stop is a string or a list of at most {MAX_STOP_STRINGS} strings, got {json.dumps(stop)[:80]}"
            )
        return stop

    def check_supported(self) -> None:
        super().check_supported()
        if self.stream_options is not None and not self.stream:  # as OpenAI: it would go unused
            raise APIError(
                400, "stream_options is only allowed when stream is true.", param="stream_options", code="invalid_value"
            )
        if self.stream_options is not None and self.stream_options.include_obfuscation:
            raise APIError(
                400,
                "stream_options.include_obfuscation is not supported: this server's chunks carry no obfuscation "
                "field. Leave it out or false.",
                param="stream_options.include_obfuscation",
                code="unsupported_value",
            )

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}.", param="stop")
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty.", param="stop")
        return tuple(stop)

    def penalties(self) -> tuple[float, float]:
        return self.presence_penalty, self.frequency_penalty


_LOGIT_BIAS = (
    "decoding applies no per-token bias here: constrain the reply with response_format, or end it with stop",
    ({},),
)
_ONE_TIER = ("this server has one tier", ("auto", "default"))
# OpenAI's chat arguments that this server does not build, refused by name (`SampledBody.NOT_SERVED`).
CHAT_NOT_SERVED = {
    "logit_bias": _LOGIT_BIAS,
    "audio": ("this server answers in text", ()),
    "modalities": ("this server answers in text", (["text"],)),
    "prediction": ("a predicted output does not speed decoding here", ()),
    "reasoning_effort": (
        "a reasoning model reasons as its chat template makes it, with no effort set (chat_template_kwargs "
        "takes the template's own switches, such as Qwen 3's {\"enable_thinking\": false})",
        (),
    ),
    "verbosity": ("the model answers as it was tuned to", ()),
    "web_search_options": ("this server searches nothing", ()),
    "service_tier": _ONE_TIER,
}
# OpenAI's legacy completions arguments that this server does not build, refused by name.
COMPLETIONS_NOT_SERVED = {
    "logit_bias": _LOGIT_BIAS,
    "suffix": ("the model completes the prompt alone, with no text inserted before a suffix", ()),
    "best_of": ("every choice generated is returned: ask for several with n", (1,)),
}


class ChatCompletionBody(GenerationBody):
    NOT_SERVED: ClassVar[dict[str, tuple[str, tuple]]] = CHAT_NOT_SERVED
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    store: bool | None = None  # OpenAI's: keep the prompt and the answer (GET /v1/chat/completions lists them)
    metadata: Metadata | None = None  # kept with a stored completion; listings filter by it
    # What the SDK now sends in place of `user`: an end-user id and a cache key; accepted and not used.
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # OpenAI's tool calling: `tools` go to the chat template as training gives a row's tools to it, and
    # the reply is parsed into `tool_calls` (`tuneforge/tool_calls.py`). `functions` is its deprecated form.
    tools: list[Tool] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    # Each generated token's log probability, with the top_logprobs most likely tokens' (`generate.TokenLogprob`).
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # OpenAI's structured output: {"type": "text"} (the default), "json_object" or "json_schema", whose
    # reply's decoding is constrained to JSON (`constrain.py`).
    response_format: dict | None = None
    # vLLM's: more variables for the chat template (Qwen 3's enable_thinking), which the SDK sends in extra_body.
    chat_template_kwargs: Annotated[dict[str, Any] | None, Shallow] = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, kwargs):
        taken = sorted(set(kwargs or ()) & TEMPLATE_ARGUMENTS)
        if taken:
            raise ValueError(
                f"{', '.join(taken)} {'is' if len(taken) == 1 else 'are'} set by the server, not by "
                "chat_template_kwargs; it takes the chat template's own variables, such as enable_thinking"
            )
        return kwargs

    def check_supported(self) -> None:
        super().check_supported()
        if self.store and self.n > 1:
            raise APIError(
                400,
                f"store keeps one answer per request, and n={self.n} asks for {self.n}: send n=1 with store, or "
                "leave store out.",
                param="n",
                code="unsupported_value",
            )
        for param in ("functions", "function_call"):
            if getattr(self, param) is not None:
                raise APIError(400, f"{param} {FUNCTIONS_ARE_TOOLS}", param=param, code="unsupported_value")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400,
                f"top_logprobs={self.top_logprobs} needs logprobs: true (the most likely tokens come with each "
                "token's log probability): send both, or leave top_logprobs out.",
                param="top_logprobs",
                code="invalid_value",
            )
        kind, _ = self.output_format()
        if kind != "text" and self.calls_tools:
            raise APIError(
                400,
                f"response_format {kind} with tools is not supported: the reply is constrained to JSON, so the model "
                'could not make a tool call. Send tool_choice "none" to constrain the reply, or leave '
                "response_format out to let the model call the tools.",
                param="response_format",
                code="unsupported_value",
            )
        if self.tool_choice not in (None, "auto", "none"):
            raise APIError(
                400,
                f"tool_choice {json.dumps(self.tool_choice)[:80]} is not supported: this server does not constrain "
                'decoding to force a call. Send "auto" (the model decides; a model tuned on tool calls makes '
                'them as trained) or "none".',
                param="tool_choice",
                code="unsupported_value",
            )

    def output_format(self) -> tuple[str, dict | None]:
        """The reply's format, "text", "json_object" or "json_schema", and a json_schema's schema."""
        response_format = self.response_format or {}
        kind = response_format.get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(
                400,
                f'response_format.type {json.dumps(kind)[:80]} is not one of "text", "json_object", "json_schema".',
                param="response_format.type",
                code="invalid_value",
            )
        if kind != "json_schema":
            return kind, None
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(
                400,
                "response_format.json_schema.schema is missing or not an object: json_schema takes "
                '{"name": ..., "schema": {a JSON Schema}, "strict": true}.',
                param="response_format.json_schema.schema",
                code="invalid_value",
            )
        check_format_name(spec.get("name"), "response_format.json_schema.name")
        return kind, spec["schema"]

    @property
    def calls_tools(self) -> bool:
        """Whether the reply is parsed for tool calls: tools are given and `tool_choice` is not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    def template_tools(self) -> list[dict] | None:
        """The tools as the chat template gets them: as sent (with "none" too, as vLLM renders them)."""
        return [tool.model_dump(exclude_unset=True) for tool in self.tools] if self.tools else None

    def template_messages(self) -> list[dict]:
        return [message.as_template_message() for message in self.messages]

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def images_sent(self) -> list[SentImage]:
        """The messages' images, in order."""
        return [
            SentImage(
                f"messages.{at}.content",
                index,
                "image_url",
                f"messages.{at}.content.{index}.image_url.url",
                part.image_url.url,
            )
            for at, message in enumerate(self.messages)
            for index, part in message.image_parts
        ]

    def length_limit(self) -> tuple[str, int | None]:
        # OpenAI's newer name for max_tokens; given both, it wins.
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return super().length_limit()


class CompletionBody(GenerationBody):
    NOT_SERVED: ClassVar[dict[str, tuple[str, tuple]]] = COMPLETIONS_NOT_SERVED
    # A string, token ids, or a list of prompts (`prompt_inputs`), each answered with n choices.
    prompt: str | list
    # Each generated token's log probability with this many most likely tokens' (0 to 5); false or absent: none.
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    # OpenAI's: the prompt's text before the completion's and, with logprobs, its tokens' log probabilities before
    # the generated ones' (log-likelihood scoring reads them); max_tokens 0 then scores the prompt alone.
    echo: bool | None = None
    max_tokens: int | None = Field(None, ge=0)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _a_count(cls, logprobs):
        # Said here, since pydantic would say "Input should be a valid integer" of true.
        if logprobs is False:
            return None
        if logprobs is True:
            raise ValueError(
                f"logprobs of /v1/completions is a number of most likely tokens to return with each token's log "
                f"probability (0 to {MAX_COMPLETION_LOGPROBS}), not true: send 0 for the tokens' own alone"
            )
        return logprobs

    def logprobs_asked(self) -> int | None:
        return self.logprobs

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:  # as OpenAI: it would answer nothing
            raise APIError(
                400,
                "max_tokens 0 generates nothing: it scores the prompt alone, with echo true (and logprobs). Ask "
                "for at least 1 token, or send echo: true.",
                param="max_tokens",
                code="invalid_value",
            )
        self.prompt_inputs()

    def prompt_inputs(self) -> list[str | tuple[int, ...]]:
        """The prompts, each as text or as token ids (a tuple), as OpenAI takes them: a string, a list of token ids,
        or a list of either (lm-evaluation-harness sends its batch as one); at most MAX_PROMPTS."""
        prompt = self.prompt
        if isinstance(prompt, str) or _token_ids(prompt):
            return [_one_prompt(prompt)]
        if prompt and all(isinstance(item, str) or _token_ids(item) for item in prompt):
            if len(prompt) > MAX_PROMPTS:
                raise APIError(
                    400,
                    f"prompt is a list of {len(prompt)} prompts; one request takes at most {MAX_PROMPTS}. Send the "
                    "rest in more requests.",
                    param="prompt",
                    code="invalid_value",
                )
            return [_one_prompt(item) for item in prompt]
        raise APIError(
            400,
            f"prompt is a list of {len(prompt)} items that are not all prompts: send a string, a list of token ids, "
            "or a list of prompts that are each a string or a non-empty list of token ids.",
            param="prompt",
            code="invalid_value",
        )

    def sampling(self, max_new_tokens: int, keep_tokens: tuple[str, ...] = (), constraint=None) -> Sampling:
        sampling = super().sampling(max_new_tokens, keep_tokens, constraint)
        return replace(sampling, prompt_logprobs=bool(self.echo) and self.logprobs is not None)


def _token_ids(prompt) -> bool:
    """Whether `prompt` is one prompt as token ids: a non-empty list of integers."""
    return isinstance(prompt, list) and bool(prompt) and all(type(token) is int for token in prompt)


def _one_prompt(prompt: str | list[int]) -> str | tuple[int, ...]:
    return prompt if isinstance(prompt, str) else tuple(prompt)


# OpenAI's Responses API (`POST /v1/responses`): the stateless core, answered as a chat request is.
# Its fields that this server does not build, refused by name (any other unknown one is refused as unrecognized).
_TOOLS = "tool calling is served by /v1/chat/completions (`tools`), not by /v1/responses here"
_OUTPUT_LIMIT = "/v1/responses limits the reply's tokens with max_output_tokens: send that instead"
RESPONSES_NOT_SERVED = {  # what it is not, and the values that ask for nothing, as OpenAI's defaults
    "previous_response_id": ("this server keeps no responses: send the whole conversation in `input`", ()),
    "conversation": ("this server keeps no conversations: send the whole conversation in `input`", ()),
    "tools": (_TOOLS, ([],)),
    "tool_choice": (_TOOLS, ("auto", "none")),
    "parallel_tool_calls": (_TOOLS, (True,)),
    "max_tool_calls": (_TOOLS, ()),
    "reasoning": ("a reasoning model reasons as its chat template makes it, with no effort or summary set", ()),
    "background": ("a response is answered while the request waits, or streamed", (False,)),
    "prompt": ("this server keeps no prompt templates: send the instructions and the input themselves", ()),
    "truncation": ("the input is never truncated: a prompt past the context window is refused", ("disabled",)),
    "service_tier": _ONE_TIER,
    # Chat's names for the reply's limit, which a client moved from /v1/chat/completions sends.
    "max_tokens": (_OUTPUT_LIMIT, ()),
    "max_completion_tokens": (_OUTPUT_LIMIT, ()),
}


# What `include` may ask for: each answer token's log probability (`ResponsesBody.logprobs_asked`).
LOGPROBS_INCLUDE = "message.output_text.logprobs"
INPUT_PARTS = (
    '{"type": "input_text", "text": ...} and, in a user message to a model that reads images, '
    '{"type": "input_image", "image_url": "data:image/png;base64,<the file\'s bytes in base64>"}'
)


class InputText(RequestBody):
    type: Literal["input_text", "output_text"]  # output_text: an earlier response's text, sent back
    text: str
    annotations: list | None = None  # what an earlier response's output_text part carries; unused
    logprobs: list | None = None


class InputImage(RequestBody):
    """An image in a user message, as OpenAI's Responses API gives it; read as chat's `ImagePart` is."""

    type: Literal["input_image"]
    image_url: str  # a base64 data URL
    file_id: str | None = None  # refused when set (`InputMessage._text_parts`): this server keeps no files
    detail: Literal["auto", "low", "high", "original"] | None = None  # OpenAI's; the processor sizes every image alike


class InputMessage(RequestBody):
    """A message item of `input`: its content a string or parts (text, and images in a user message), as OpenAI's
    API takes them."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[Annotated[InputText | InputImage, Field(discriminator="type")]]
    id: str | None = None  # what an earlier response's message item carries, sent back; unused
    status: str | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _messages_only(cls, item):
        # Said here, since pydantic would say "Input should be 'message'" of an item without a role.
        if isinstance(item, dict) and item.get("type", "message") != "message":
            raise ValueError(
                f"an item of type {json.dumps(item.get('type'))[:60]} is not served: this server takes message "
                'items ({"role": "user", "content": ...}) in input, and an earlier response\'s reasoning items'
            )
        return item

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content, info: ValidationInfo):
        if isinstance(content, str):
            return [{"type": "input_text", "text": content}]
        role = info.data.get("role")
        for index, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind == "input_image" and role == "user":
                if part.get("file_id") is not None or not isinstance(part.get("image_url"), str):
                    raise ValueError(
                        f"part {index} is an image without its image_url (this server keeps no files, so a file_id "
                        'is not read): send {"type": "input_image", "image_url": "data:image/png;base64,<the '
                        "file's bytes in base64>\"}"
                    )
            elif kind == "input_image":
                raise ValueError(
                    f"part {index} is an image in a {role} message: images are read in user messages only, as "
                    "in training; send the image in a user message"
                )
            elif kind not in ("input_text", "output_text"):
                raise ValueError(
                    f"part {index} is of type {json.dumps(kind)[:60]}: /v1/responses takes a string or parts: "
                    f"{INPUT_PARTS}"
                )
        return content

    def as_chat_message(self, reasoning: str | None = None) -> ChatMessage:
        """The message as chat's, its images as `image_url` parts and `reasoning` (an assistant message's, from the
        reasoning item before it) as its `reasoning_content`."""
        if not any(isinstance(part, InputImage) for part in self.content):
            content = "".join(part.text for part in self.content)
        else:
            content = [
                {"type": "image_url", "image_url": {"url": part.image_url}}
                if isinstance(part, InputImage)
                else {"type": "text", "text": part.text}
                for part in self.content
            ]
        return ChatMessage(role=self.role, content=content, reasoning_content=reasoning)


class ReasoningText(RequestBody):
    type: Literal["reasoning_text"]
    text: str


class SummaryText(RequestBody):
    type: Literal["summary_text"]
    text: str


class ReasoningItem(RequestBody):
    """A reasoning item of `input`: an earlier response's reasoning sent back before its message item, as the SDK's
    multi-turn pattern appends `response.output`. Its `reasoning_text` parts are that assistant message's
    `reasoning_content`, which the chat template writes or drops by its own rules, as the chat route's."""

    type: Literal["reasoning"]
    summary: list[SummaryText] = []  # OpenAI's abridgment of the reasoning, which the content holds whole; unused
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None  # refused when set (`_not_encrypted`)
    id: str | None = None  # unused, as a message item's
    status: str | None = None

    @field_validator("encrypted_content")
    @classmethod
    def _not_encrypted(cls, encrypted: str | None) -> None:
        if encrypted is not None:
            raise ValueError(
                "this server writes no encrypted reasoning and cannot read OpenAI's: send the reasoning as "
                "reasoning_text parts in content (as this server's responses give it) with encrypted_content null, "
                "or leave the item out"
            )

    @property
    def text(self) -> str | None:
        return None if self.content is None else "".join(part.text for part in self.content)


def _input_item(item: Any) -> InputMessage | ReasoningItem:
    """An item of `input` as its `type` says; a complaint is located in the item (`input.0.content`), with no name
    of a union's member."""
    kind = ReasoningItem if isinstance(item, dict) and item.get("type") == "reasoning" else InputMessage
    return kind.model_validate(item)


# A json_schema's name, as OpenAI's API requires one.
FORMAT_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def check_format_name(name, param: str) -> None:
    """Refuse a json_schema format's `name` (at `param`) that OpenAI's API refuses: missing, or not 1 to 64
    letters, digits, underscores or dashes."""
    if isinstance(name, str) and FORMAT_NAME.fullmatch(name):
        return
    said = "is missing" if name is None else f"{json.dumps(name)[:80]} is not a name OpenAI's API takes"
    raise APIError(
        400,
        f"{param} {said}: json_schema needs a name of 1 to 64 letters, digits, underscores or dashes, "
        'such as "triage".',
        param=param,
        code="invalid_value",
    )


class ResponseFormat(RequestBody):
    """`text.format`: "text", "json_object", or "json_schema" with its schema beside its type (not nested, as
    chat's response_format has it)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _fields_flat(cls, data):
        if isinstance(data, dict) and "json_schema" in data:
            raise ValueError(
                "the Responses API takes the schema's fields flat in text.format, not nested in json_schema as "
                'chat\'s response_format does: send {"type": "json_schema", "name": ..., "schema": {a JSON Schema}, '
                '"strict": true}.'
            )
        return data


class TextConfig(RequestBody):
    format: ResponseFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # refused unless "medium", OpenAI's default


class ResponsesBody(SampledBody):
    NOT_SERVED: ClassVar[dict[str, tuple[str, tuple]]] = RESPONSES_NOT_SERVED
    FORMAT_PARAM: ClassVar[str] = "text.format"
    SCHEMA_PARAM: ClassVar[str] = "text.format.schema"
    LENGTH_PARAM: ClassVar[str] = "max_output_tokens"

    input: list[
        Annotated[
            InputMessage | ReasoningItem,
            PlainValidator(_input_item, json_schema_input_type=InputMessage | ReasoningItem),
        ]
    ] = Field(min_length=1)
    instructions: str | None = None  # the system message before the input
    max_output_tokens: int | None = Field(None, ge=1)
    text: TextConfig | None = None
    store: bool | None = None
    metadata: Metadata | None = None  # echoed in the response
    user: str | None = None  # OpenAI's end-user ids and cache key: accepted and not used
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # include [LOGPROBS_INCLUDE] asks for each answer token's log probability, with the top_logprobs most likely
    # tokens' (`generate.TokenLogprob`), as chat's logprobs and top_logprobs do.
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("input", mode="before")
    @classmethod
    def _text_is_a_user_message(cls, value):
        # Said here, since pydantic would say "Input should be a valid list" of any other value.
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if not isinstance(value, list):
            raise ValueError(
                f"input is {json.dumps(value)[:60]}: send the text as a string, or the conversation as a list of "
                'messages ({"role": "user", "content": ...})'
            )
        return value

    @property
    def n(self) -> int:
        return 1

    def check_supported(self) -> None:
        super().check_supported()
        for index, item in enumerate(self.include or []):
            if item != LOGPROBS_INCLUDE:
                raise APIError(
                    400,
                    f"include.{index} {json.dumps(item)[:80]} is not supported: this server includes the answer's log "
                    f"probabilities ({json.dumps(LOGPROBS_INCLUDE)}) and nothing else (a reasoning model's reasoning "
                    "is in the output already).",
                    param=f"include.{index}",
                    code="unsupported_value",
                )
        if self.top_logprobs and self.logprobs_asked() is None:
            raise APIError(
                400,
                f"top_logprobs={self.top_logprobs} needs include [{json.dumps(LOGPROBS_INCLUDE)}] (the most likely "
                "tokens come with each token's log probability): send both, or leave top_logprobs out.",
                param="top_logprobs",
                code="invalid_value",
            )
        if self.store:
            raise APIError(
                400,
                "store: true keeps a response for GET /v1/responses/{id} and previous_response_id, which this server "
                "does not serve: send store: false (or leave it out). /v1/chat/completions stores completions.",
                param="store",
                code="unsupported_value",
            )
        for at, item in enumerate(self.input):
            if isinstance(item, ReasoningItem) and self._reasoning_of(at + 1) is not item:
                raise APIError(
                    400,
                    f"input.{at} is a reasoning item without the assistant message item it comes before: send an "
                    "earlier response's output as it was given, each reasoning item followed by its message.",
                    param=f"input.{at}",
                    code="invalid_value",
                )
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise APIError(
                400,
                f"text.verbosity {self.text.verbosity!r} is not supported: the model answers as it was tuned to. "
                'Leave it out or send "medium".',
                param="text.verbosity",
                code="unsupported_value",
            )

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if LOGPROBS_INCLUDE in (self.include or ()) else None

    def images_sent(self) -> list[SentImage]:
        """The input's images, in order (`instructions` is text)."""
        return [
            SentImage(
                f"input.{at}.content", index, "input_image", f"input.{at}.content.{index}.image_url", part.image_url
            )
            for at, message in enumerate(self.input)
            if isinstance(message, InputMessage)
            for index, part in enumerate(message.content)
            if isinstance(part, InputImage)
        ]

    def output_format(self) -> tuple[str, dict | None]:
        """As `ChatCompletionBody.output_format`, read from `text.format`."""
        response_format = self.text.format if self.text is not None else None
        if response_format is None or response_format.type != "json_schema":
            return (response_format.type if response_format else "text"), None
        if response_format.schema_ is None:
            raise APIError(
                400,
                'text.format.schema is missing: json_schema takes {"type": "json_schema", "name": ..., "schema": '
                '{a JSON Schema}, "strict": true}.',
                param=self.SCHEMA_PARAM,
                code="invalid_value",
            )
        check_format_name(response_format.name, "text.format.name")
        return "json_schema", response_format.schema_

    def prompt_field(self, field: str) -> str:
        # The prompt's messages are `instructions`' (where given), then `input`'s.
        if self.instructions is None or not field.startswith("input."):
            return field
        _, index, *rest = field.split(".")
        return "instructions" if index == "0" else ".".join(["input", str(int(index) - 1), *rest])

    def template_messages(self) -> list[dict]:
        system = [] if self.instructions is None else [{"role": "system", "content": self.instructions}]
        messages = [ChatMessage(**m).as_template_message() for m in system]
        for at, item in enumerate(self.input):
            if isinstance(item, InputMessage):
                reasoning = self._reasoning_of(at)
                messages.append(item.as_chat_message(reasoning and reasoning.text).as_template_message())
        return messages

    def _reasoning_of(self, at: int) -> ReasoningItem | None:
        """The reasoning item just before input item `at` where that item is an assistant message: its reasoning."""
        if not 0 < at < len(self.input):
            return None
        item, before = self.input[at], self.input[at - 1]
        answers = isinstance(item, InputMessage) and item.role == "assistant"
        return before if answers and isinstance(before, ReasoningItem) else None
