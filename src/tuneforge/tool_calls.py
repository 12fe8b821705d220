"""Tool calls in a model's reply: the parser its chat template implies, and OpenAI's `tool_calls` from its text.

A model tuned on tool calls writes them in the form its chat template renders them in training:

  hermes       `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block a call, maybe after
               some text (Qwen 2.5, Qwen 3, Hermes)
  llama3_json  the whole reply one JSON object `{"name": ..., "parameters": {...}}` (several joined by `;`),
               maybe after `<|python_tag|>` (Llama 3.1, 3.2)
  mistral      `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}, ...]`, maybe after some text; the
               marker is a special token that decoding may drop, so a reply that is such a JSON list is one too

The parser is picked by what the template writes (`parser_for`), as vLLM's `--tool-call-parser` names
them. Text that does not parse as calls stays the reply's content. `held_from` tells a stream where a
call may be starting, so that the text from there on is held back until the reply is whole; `HeldStream` streams
an answer so (serve's streamed replies, `chat --tools`).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass

_DECODER = json.JSONDecoder()
_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ParsedReply:
    content: str | None  # the text before the calls, None when there is none
    tool_calls: list[dict]  # OpenAI's: {"id", "type": "function", "function": {"name", "arguments": JSON text}}


@dataclass(frozen=True)
class ToolCallParser:
    name: str
    markers: tuple[str, ...]  # text that opens the calls wherever it appears
    leading: str = ""  # characters that open the calls when the reply starts with one

    def parse(self, text: str, ids_from: str | None = None) -> ParsedReply | None:
        """The reply's calls and the text before them; None when it holds no call that parses. The calls' ids
        are random, as OpenAI's replies' are, or, with `ids_from` (what names the reply in a file written, its
        row), derived from it and each call's index, so a rerun writes the same bytes."""
        start = self._start(text)
        if start is None:
            return None
        calls = _PARSE[self.name](text[start:])
        if not calls:
            return None
        content = text[:start].strip()
        return ParsedReply(content or None, [self._openai_call(call, ids_from, i) for i, call in enumerate(calls)])

    def held_from(self, text: str) -> int | None:
        """Where in `text`, a reply so far, a call may begin (the rest is held back); None: nowhere yet."""
        start = self._start(text)
        if start is not None:
            return start
        if self.leading and not text.strip():
            return 0  # the reply may still open with a call
        for length in range(min(len(text), max(map(len, self.markers))), 0, -1):  # a marker cut at the end
            if any(marker.startswith(text[-length:]) for marker in self.markers):
                return len(text) - length
        return None

    def _start(self, text: str) -> int | None:
        found = [i for i in (text.find(marker) for marker in self.markers) if i >= 0]
        if found:
            return min(found)
        stripped = text.lstrip()
        if stripped and stripped[0] in self.leading:
            return len(text) - len(stripped)
        return None

    def _openai_call(self, call: dict, ids_from: str | None, index: int) -> dict:
        arguments = call["arguments"]
        return {
            "id": self._call_id(call.get("id"), ids_from, index),
            "type": "function",
            "function": {
                "name": call["name"],
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
            },
        }

    def _call_id(self, given, ids_from: str | None, index: int) -> str:
        if self.name == "mistral" and isinstance(given, str) and len(given) == 9 and given.isalnum():
            return given
        drawn = secrets.token_bytes(12) if ids_from is None else hashlib.sha256(f"{ids_from}:{index}".encode()).digest()
        if self.name == "mistral":  # Mistral's template refuses any id but 9 letters and digits in the history
            return "".join(_ALPHANUMERIC[byte % len(_ALPHANUMERIC)] for byte in drawn[:9])
        return f"call_{drawn[:12].hex()}"


def reply_finish_reason(generated: str, called: bool) -> str:
    """A reply's finish_reason as a chat completion gives it: "tool_calls" where it ended by itself ("stop") and
    makes calls (`called`), else the generation's ("stop", or "length" where it was cut, calls or not)."""
    return "tool_calls" if called and generated == "stop" else generated


class HeldStream:
    """The text of a streamed answer parsed for tool calls, sent up to where a call may be starting: `feed` takes
    each piece and gives the text to send now, `finish` the rest once the reply is whole."""

    def __init__(self, parser: ToolCallParser):
        self.parser = parser
        self.text = ""  # the answer so far
        self._sent = 0  # how much of it was given to send

    def feed(self, piece: str) -> str:
        self.text += piece
        held = self.parser.held_from(self.text)
        return self._send(len(self.text) if held is None else held)

    def finish(self, called: bool) -> str:
        """The text not yet sent: where the reply makes calls (`called`, as the caller parsed it), the text before
        them, else all of it."""
        return self._send(self.parser.held_from(self.text) if called else len(self.text))

    def _send(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        text, self._sent = self.text[self._sent : upto], upto
        return text


def tool_call_parser(
    tokenizer, name: str, given: str, *, parses: bool = True, as_text: str = ""
) -> ToolCallParser | None:
    """The parser of the tool calls in the replies of the model `name` (whose tokenizer is `tokenizer`) to prompts
    rendered with the tools `given` names (`--tools`, a request's `tools`), as `serve` and `chat --tools` pick it;
    None where `parses` is False (the tools are rendered, the reply stays text). A `ConfigError` where the model's
    chat template writes no tool definitions, or writes its calls in a form not parsed (`as_text`: another way
    to the reply as text, where the caller has one)."""
    from .data.render import renderer_for  # here: rendering loads Jinja and the models, which parsing needs not
    from .errors import ConfigError

    renderer = renderer_for(tokenizer)
    if not renderer.writes_tools:
        raise ConfigError(
            f"{given}: the chat template of {name} does not write tool definitions, so the model would never see "
            "the tools. Use a model whose chat template takes tools (Qwen 2.5 and 3, Llama 3.1, Mistral, ...) "
            f"tuned on tool calls, or leave {given} out.",
            code="unsupported_value",
        )
    parser = parser_for(renderer.template) if parses else None
    if parses and parser is None:
        raise ConfigError(
            f"{given}: the chat template of {name} writes tool calls in a form that is not parsed (these are "
            '<tool_call>{"name": ..., "arguments": ...}</tool_call> as Qwen and Hermes write them, Llama 3.1\'s '
            f'{{"name": ..., "parameters": ...}} and Mistral\'s [TOOL_CALLS][...]). Leave {given} out{as_text}.',
            code="unsupported_value",
        )
    return parser


def parser_for(template: str | None) -> ToolCallParser | None:
    """The parser for replies of a model with this chat template; None when it writes no known call form."""
    if not template:
        return None
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if '"parameters"' in template:
        return LLAMA3_JSON
    return None


def _call(value, arguments_keys: tuple[str, ...]) -> dict | None:
    """A call object as the model wrote it, with its arguments under "arguments"; None if it is not one. The
    templates write every call's arguments (`{}` for none): an object with a name and no arguments is the
    model's answer in JSON (`[{"name": "Alice", "role": "admin"}]`), not a call."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    key = next((k for k in arguments_keys if k in value), None)
    if key is None:
        return None
    arguments = value[key]
    if not isinstance(arguments, dict | str):
        return None
    return {"name": value["name"], "arguments": arguments, "id": value.get("id")}


def _json_values(text: str, separator: str = "") -> list | None:
    """The JSON values `text` holds one after another (apart by whitespace and `separator`); None if not so."""
    values, at = [], 0
    while True:
        at = len(text) - len(text[at:].lstrip())
        if at == len(text):
            return values
        if values and separator and text.startswith(separator, at):
            at += len(separator)
            continue
        try:
            value, at = _DECODER.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        values.append(value)


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


def _parse_hermes(text: str) -> list[dict] | None:
    bodies = _HERMES_BLOCK.findall(text)
    if _HERMES_BLOCK.sub("", text).strip():  # text between or after the calls: not a call reply
        return None
    calls = []
    for body in bodies:
        values = _json_values(body)
        call = _call(values[0], ("arguments", "parameters")) if values and len(values) == 1 else None
        if call is None:
            return None
        calls.append(call)
    return calls


def _parse_llama3_json(text: str) -> list[dict] | None:
    values = _json_values(text.strip().removeprefix("<|python_tag|>"), ";")
    calls = [_call(value, ("parameters", "arguments")) for value in values or []]
    return calls if calls and all(calls) else None


def _parse_mistral(text: str) -> list[dict] | None:
    values = _json_values(text.removeprefix("[TOOL_CALLS]"))
    if not values or len(values) != 1 or not isinstance(values[0], list):
        return None
    calls = [_call(value, ("arguments", "parameters")) for value in values[0]]
    return calls if calls and all(calls) else None


_PARSE = {"hermes": _parse_hermes, "llama3_json": _parse_llama3_json, "mistral": _parse_mistral}
HERMES = ToolCallParser("hermes", ("<tool_call>",))
LLAMA3_JSON = ToolCallParser("llama3_json", ("<|python_tag|>",), leading="{")
MISTRAL = ToolCallParser("mistral", ("[TOOL_CALLS]",), leading="[")
