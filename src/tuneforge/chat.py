"""`tuneforge chat MODEL`: talk to a model in the terminal, each reply streamed as it is generated.

    from tuneforge.chat import chat_session
    chat_session(model, tokenizer, input=io.StringIO("Hi\\n/exit\\n"), output=sys.stdout)

The conversation goes through the model's own chat template. Decoding is greedy by default (the
same answer every time, which is what one wants when looking at a fine-tune) and stops at the
end of the model's turn or at `max_new_tokens`. When the conversation outgrows the context
window, the oldest exchanges are dropped. With no system message of the user's, the template's own
applies: for a fine-tuned model, the system prompt its training data shared (`models.system_prompt`).
A reasoning model's reasoning is shown apart from its answer (dimmed on a terminal) and kept apart in
the history, as `serve` returns it (`reasoning`). On a model that reads images (Gemma 3 4B and up),
`/image PATH` attaches a local image file to the next message, checked as an image row's is; the
prompt's images go into its prefill as `serve` passes them, and leave with their exchange.
With `--tools FILE` (OpenAI tool definitions), every prompt is rendered with the tools as `serve` renders a
request's, and a reply that calls them is parsed as `serve` parses it (`tool_calls`): each call is
shown by name, arguments and id, and kept in the history as OpenAI's `tool_calls`; `/tool NAME_OR_ID RESULT`
answers one with a `tool` message, and once every call of the reply has its result the model answers.
A line (or /system's or /tool's text) holding a special token of the chat template, such as `<|im_end|>`, is not
sent: the model would read it as a turn's end, not text; serve and `tuneforge.load` refuse it too, and so does
`--tools` a file whose definitions hold one, before the model loads.
"""

from __future__ import annotations

import builtins
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from jinja2 import TemplateError

from .data.formats import tool_definitions
from .data.images import read_image_file
from .data.render import renderer_for
from .data.schema import Image
from .errors import ConfigError, DataError, unreadable_json
from .generate import Sampling, encode_prompts, load_for_inference, stream
from .models import load_tokenizer, model_context_length, resolve
from .models.images import VISION_MODELS
from .models.loading import image_inputs
from .models.sources import untuned_base_note
from .models.system_prompt import recorded_system_prompt
from .reasoning import CONTENT, REASONING, ReasoningSplitter, assistant_message, reasoning_opened
from .tool_calls import HeldStream, ToolCallParser, tool_call_parser
from .wording import counted

PROMPT = ">>> "
HELP = """commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    start a new conversation with this system message
  /system         start a new conversation with the model's own (its fine-tuning's, if recorded)
  /show           print the system message in force
  /image PATH     attach a local image file (PNG, JPEG, GIF, WEBP) to your next message (a model that reads images)
  /tool NAME_OR_ID RESULT
                  answer the reply's call of that tool (or that call id) with RESULT (chat --tools)
  /exit           leave (so do Ctrl-D and end of input); Ctrl-C stops a reply, or drops the line typed
  /help           this list"""


def chat_session(
    model,
    tokenizer,
    *,
    input: TextIO | None = None,
    output: TextIO | None = None,
    system: str | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    tools: list[dict] | None = None,
) -> list[dict]:
    """Read turns from `input` (None: the terminal, with line editing) and stream replies to `output`
    until /exit or end of input; returns the conversation as it stands then, system message first. `tools`:
    OpenAI tool definitions (`read_tools`) every prompt is rendered with."""
    output = output or sys.stdout
    calls = _tools_parser(tokenizer) if tools else None
    read = _line_reader(input, output)
    window = model_context_length(model)
    renderer = renderer_for(tokenizer)
    history: list[dict] = []
    attached: list[Image] = []  # /image files for the next user message

    def note(text: str) -> None:
        output.write(f"({text})\n")
        output.flush()

    def special(text: str) -> bool:
        """Whether `text`, for the template, holds one of its special tokens (said, and the text not sent): the
        model would read it as structure (a turn's end, a new turn), as serve and tuneforge.load refuse it."""
        if problems := renderer.special_tokens_in([("", text)]):
            note(f"{problems[0].message.rstrip('.')}; not sent")
        return bool(problems)

    def respond() -> None:
        """Answer the conversation's last message (the user's, or a tool's result), the reply streamed; the
        message leaves the history where it is not sent or its reply is interrupted."""
        try:
            prompt_ids, budget = _fit(tokenizer, system, history, window, max_new_tokens, note, tools)
        except (TemplateError, ValueError) as err:  # a template that refuses these messages (Gemma 2: a system one)
            history.pop()  # its images stay attached for the next message
            note(
                f"the model's chat template refuses this conversation: {err}; not sent"
                + (" (/system with no text drops your system message)" if system else "")
            )
            return
        if budget < 1:
            history.pop()
            note(
                f"that message alone fills the model's {window}-token context"
                + (" with its images' tokens" if attached else "")
                + "; send a shorter one"
            )
            return
        images = _images_of(history)
        attached.clear()
        opened = reasoning_opened(tokenizer, prompt_ids)
        # The parser's markers stay in the reply's text (as serve keeps them): where a call starts after some
        # text (Llama 3.1's <|python_tag|>, Mistral's [TOOL_CALLS]), decoding would drop them and the call stay text.
        reply = stream(
            model,
            tokenizer,
            prompt_ids,
            max_new_tokens=budget,
            temperature=temperature,
            top_p=top_p,
            images=images,
            keep_tokens=calls.markers if calls is not None else (),
        )
        shown = _ReplyWriter(output, opened, calls)
        try:
            for piece in reply:
                shown.write(piece)
            answer = assistant_message(reply.completion.text, opened, calls.parse if calls is not None else None)
            shown.finish(called="tool_calls" in answer)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat; the unanswered turn is dropped
            shown.close()
            history.pop()
            output.write("\n")
            note("reply interrupted")
            return
        output.write("\n")
        # The reasoning goes back to the template apart, which keeps or drops it by its own rules (as in serve);
        # a reply that opens none has none.
        if answer.get(REASONING, "") is None:
            del answer[REASONING]
        if "tool_calls" in answer:
            for call in answer["tool_calls"]:
                function = call["function"]
                output.write(f"[call {function['name']} {function['arguments']}  id {call['id']}]\n")
            note("answer each call with /tool NAME_OR_ID RESULT")
        history.append(answer)
        if reply.completion.finish_reason == "length":
            note(f"cut at {budget} tokens" + (" while reasoning" if shown.reasoning_only else ""))

    while (line := read(PROMPT)) is not None:
        text = line.strip()
        if not text:
            continue
        if (position := _not_utf8_at(text)) is not None:
            note(f"that line is not UTF-8 text (character {position + 1}); not sent: check the terminal's encoding")
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/exit":
                break
            if command == "/reset":
                history.clear()
                attached.clear()
                note("conversation cleared")
            elif command == "/system":
                if special(argument):
                    continue
                system = argument.strip() or None
                history.clear()  # earlier replies were written under the old prompt and would steer the new ones
                attached.clear()
                note(f"new conversation; {_system_in_force(tokenizer, system)}")
            elif command == "/image":
                image = _attach(tokenizer, argument.strip())
                if isinstance(image, str):
                    note(f"{image}; not attached")
                else:
                    attached.append(image)
                    note(f"{counted(len(attached), 'image')} attached to your next message")
            elif command == "/tool":
                if special(argument):
                    continue
                answered = _tool_result(history, argument.strip(), tools)
                if isinstance(answered, str):
                    note(answered)
                    continue
                history.append(answered)
                if waiting := _awaiting(history):
                    note(f"{_waiting(waiting)}; the reply follows the last result")
                else:
                    respond()
            elif command == "/show":
                note(_system_in_force(tokenizer, system))
            elif command == "/help":
                output.write(HELP + "\n")
            else:
                note(f"unknown command {command}; /help lists the commands")
            continue
        if waiting := _awaiting(history):
            note(f"{_waiting(waiting)}; not sent")
            continue
        if special(text):
            continue
        history.append(_user_message(text, attached))
        respond()
    return _with_system(system, history)


def chat_command(
    spec: str,
    *,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    precision: str = "auto",
    tools: str | Path | None = None,
) -> int:
    """Load MODEL (registry name, folder, run folder, .gguf) and chat with it in the terminal; `tools`, a file of
    OpenAI tool definitions, checked (and the model's chat template for them) before the model loads."""
    try:
        Sampling(max_new_tokens, temperature, top_p)
    except ValueError as err:
        raise ConfigError(str(err), code="invalid_value") from err
    definitions = read_tools(tools) if tools is not None else None
    source = resolve(spec)
    tokenizer = load_tokenizer(source)
    if definitions:
        _tools_parser(tokenizer)
        _refuse_special_tokens(tokenizer, definitions, tools)
    model = load_for_inference(source, "chat", precision)
    sys.stdout.write(
        f"chatting with {source.name}"
        + (f" (adapter {source.adapter} on {source.path})" if source.adapter else "")
        + f"; {'greedy' if temperature == 0 else f'temperature {temperature}'}, "
        f"up to {max_new_tokens} tokens a reply; /help for commands.\n({_system_in_force(tokenizer, system)})\n"
    )
    if note := untuned_base_note(source):
        sys.stdout.write(f"({note})\n")
    if definitions:
        names = ", ".join(tool["function"]["name"] for tool in definitions)
        sys.stdout.write(f"(tools: {names}; /tool NAME_OR_ID RESULT answers a call)\n")
    chat_session(
        model,
        tokenizer,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        tools=definitions,
    )
    return 0


def read_tools(path: str | Path) -> list[dict] | None:
    """The tool definitions of a JSON or YAML file (a list of OpenAI's `{"type": "function", "function": {...}}`),
    checked as a data row's `tools` are; a `ConfigError` or `DataError` naming the file (its line, for text that
    does not parse) and the field, for any problem. An empty list: None, no tools."""
    import yaml

    from .config import load_yaml, yaml_syntax_error

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else (err.strerror or str(err))
        raise ConfigError(f"--tools {path} cannot be read: {reason}.", code="bad_option") from err
    try:
        if path.suffix.lower() == ".json":
            value = json.loads(text) if text.strip() else None  # an empty file holds nothing, as YAML's does
        else:
            value = load_yaml(text, f"--tools {path}")
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"--tools {path}:{err.lineno}: not JSON ({err.msg}, column {err.colno}).", code="invalid_json"
        ) from err
    except (RecursionError, ValueError) as err:  # well-formed JSON that Python's reader gives up on
        if (what := unreadable_json(err)) is None:
            raise
        raise ConfigError(
            f"--tools {path}: the JSON {what}; no tool definition needs that.", code="invalid_json"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(yaml_syntax_error(f"--tools {path}", err, "not YAML"), code="invalid_yaml") from None
    if not isinstance(value, list):
        got = "nothing" if value is None else type(value).__name__
        raise ConfigError(
            f'--tools {path} must hold a list of tool definitions, [{{"type": "function", "function": {{"name": ..., '
            f'"description": ..., "parameters": {{...}}}}}}, ...], got {got}.',
            code="invalid_value",
        )
    return checked_tools(value, f"--tools {path}", str(path))


def checked_tools(value, where: str, file: str = "") -> list[dict] | None:
    """`value`, a list of OpenAI tool definitions, checked as a data row's `tools` are; a `DataError` that begins
    with `where` and names each bad field. An empty list: None, no tools."""
    definitions, problems = tool_definitions(value, file=file, known_keys_only=True)
    if problems:
        raise DataError.listing(f"{where}: {counted(len(problems), 'tool definition')} cannot be used", problems)
    return definitions


def _refuse_special_tokens(tokenizer, definitions: list[dict], path: str | Path) -> None:
    """A `DataError` naming the file and each field of the tool definitions whose text holds a special token of
    the model's chat template, which it would read as structure (a turn's end, a new turn), not text: serve
    refuses such a request's tools, and training such a row's."""
    if problems := renderer_for(tokenizer).special_tokens_in_prompt([], definitions):
        raise DataError.listing(
            f"--tools {path}: {counted(len(problems), 'text')} of the tool definitions cannot be sent",
            [replace(problem, file=str(path)) for problem in problems],
        )


def _tools_parser(tokenizer) -> ToolCallParser:
    """The parser of the model's tool calls for `--tools`, as serve picks it (`tool_calls.tool_call_parser`)."""
    return tool_call_parser(tokenizer, tokenizer.name_or_path or "the model", "--tools")


class _ReplyWriter:
    """Writes a streamed reply: a reasoning model's reasoning (see `reasoning`) apart from its answer,
    dimmed on a terminal and followed by a blank line, then the answer; other models' replies as written."""

    DIM, NORMAL = "\x1b[2m", "\x1b[22m"

    def __init__(self, output: TextIO, opened: bool | None, calls: ToolCallParser | None = None):
        self.output = output
        # A reply parsed for tool calls: the text from where a call may start waits for the rest, as serve streams it.
        self.held = HeldStream(calls) if calls is not None else None
        self.splitter = ReasoningSplitter(opened) if opened is not None else None
        self.terminal = output.isatty()
        self.field: str | None = None  # the part being written
        self.reasoning_only = opened is not None  # until the answer starts

    def write(self, piece: str) -> None:
        for field, text in self.splitter.feed(piece) if self.splitter else [(CONTENT, piece)]:
            self._held(field, text)

    def finish(self, called: bool) -> None:
        """Write the rest of the reply; where it makes tool calls (`called`, written by the caller), its text
        before them."""
        for field, text in self.splitter.finish() if self.splitter else []:
            self._held(field, text)
        if self.held is not None and (text := self.held.finish(called)):
            self._write(CONTENT, text.rstrip() if called else text)
        self.close()

    def close(self) -> None:
        """Leave the terminal's text normal, whatever part the reply stopped in."""
        if self.field == REASONING and self.terminal:
            self.output.write(self.NORMAL)
            self.output.flush()

    def _held(self, field: str, text: str) -> None:
        """Write `text`, of the reply's `field`; an answer parsed for tool calls up to where a call may start."""
        if self.held is None or field == REASONING:
            self._write(field, text)
        elif text := self.held.feed(text):
            self._write(field, text)

    def _write(self, field: str, text: str) -> None:
        if field != self.field:
            if self.field == REASONING:
                self.close()
                self.output.write("\n\n")
            elif field == REASONING and self.terminal:
                self.output.write(self.DIM)
            self.field = field
        if field != REASONING:
            self.reasoning_only = False
        self.output.write(text)
        self.output.flush()


def _system_in_force(tokenizer, system: str | None) -> str:
    if system:
        return f"system message: {system}"
    if (recorded := recorded_system_prompt(tokenizer)) is not None:
        return f"system message (the one the model was fine-tuned with): {recorded}"
    return "no system message (the chat template may add its own)"


def _attach(tokenizer, path: str) -> Image | str:
    """The image file at `path` for `/image`, checked as an image row's is (and taken by the model's image
    processor: Qwen2-VL's takes no side over 200 times the other), or why it is not attached."""
    side = image_inputs(tokenizer)
    if side is None:
        name = tokenizer.name_or_path or "this model"
        return (
            f"/image: {name} reads text only (it has no image processor); chat with a model that reads images "
            f"({VISION_MODELS}) to send one"
        )
    if not path:
        return "/image needs the path of an image file: /image PATH"
    image = read_image_file(path)
    if isinstance(image, str):
        return f"/image: {image.rstrip('.')}"
    if refused := side.refusal(image.data):
        return f"/image: the model's image processor does not take {path} ({refused}); crop or pad it"
    return image


def _user_message(text: str, images: list[Image]) -> dict:
    """A user message; with images, content parts as the chat template reads them (an image part first, as
    OpenAI's vision data puts it), each image's file under `image`, as transformers' processors take it."""
    if not images:
        return {"role": "user", "content": text}
    parts = [{"type": "image", "image": image.data} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def _images_of(history: list[dict]) -> list[bytes]:
    """The image files the conversation shows, in order."""
    return [
        part["image"]
        for m in history
        if isinstance(m["content"], list)
        for part in m["content"]
        if part.get("type") == "image"
    ]


def _awaiting(history: list[dict]) -> list[dict]:
    """The tool calls of the last reply that no `tool` message after it answers yet."""
    for at in range(len(history) - 1, -1, -1):
        if history[at]["role"] == "assistant":
            answered = {m.get("tool_call_id") for m in history[at + 1 :] if m["role"] == "tool"}
            return [call for call in history[at].get("tool_calls") or () if call["id"] not in answered]
        if history[at]["role"] != "tool":
            return []
    return []


def _waiting(calls: list[dict]) -> str:
    listed = ", ".join(f"{call['function']['name']} (id {call['id']})" for call in calls)
    return f"{counted(len(calls), 'call')} of the reply await{'s' if len(calls) == 1 else ''} a result: {listed}"


def _tool_result(history: list[dict], argument: str, tools: list[dict] | None) -> dict | str:
    """`/tool NAME_OR_ID RESULT`'s `tool` message, answering the call of the last reply with that id, or the one
    not yet answered with that name; or why there is none."""
    if not tools:
        return "/tool answers a tool call, and this chat has no tools: start it with --tools FILE"
    waiting = _awaiting(history)
    if not waiting:
        return "no tool call awaits a result: /tool answers a call of the model's last reply"
    key, _, result = argument.partition(" ")
    if not key or not result.strip():
        return f"/tool needs the call's tool name or id and its result: /tool NAME_OR_ID RESULT; {_waiting(waiting)}"
    matches = [call for call in waiting if call["id"] == key] or [
        call for call in waiting if call["function"]["name"] == key
    ]
    if len(matches) != 1:
        why = "no waiting call has that tool name or id" if not matches else "several waiting calls have that name"
        return f"/tool {key}: {why}; {_waiting(waiting)} (give its id)"
    return {"role": "tool", "tool_call_id": matches[0]["id"], "content": result.strip()}


def _with_system(system: str | None, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history


def _fit(
    tokenizer,
    system: str | None,
    history: list[dict],
    window: int | None,
    max_new_tokens: int,
    note: Callable[[str], None],
    tools: list[dict] | None = None,
) -> tuple[tuple[int, ...], int]:
    """The prompt's token ids (rendered with `tools`), oldest exchanges dropped while they and the reply
    overflow the window, and how many tokens the reply may have."""
    while True:
        # The images too: Qwen2-VL's image tokens count by each image's size.
        messages = _with_system(system, history)
        prompt_ids = tuple(encode_prompts(tokenizer, [messages], tools, images=_images_of(history))[0])
        if window is None:
            return prompt_ids, max_new_tokens
        room = window - len(prompt_ids)
        users = [i for i, m in enumerate(history) if m["role"] == "user"]
        if room >= max_new_tokens or len(users) <= 1:
            return prompt_ids, min(room, max_new_tokens)
        del history[: users[1]]  # the oldest user message and what answered it: replies, calls and their results
        note("oldest exchange dropped to fit the context window")


def _not_utf8_at(text: str) -> int | None:
    """Where a line read from a terminal holds bytes that were not UTF-8 (escaped as lone surrogates), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _line_reader(input: TextIO | None, output: TextIO) -> Callable[[str], str | None]:
    """A function that shows the prompt and returns the next line, or None at end of input."""
    if input is None:
        import readline  # noqa: F401 - importing it gives input() line editing and history

        # A line that is not UTF-8 is read whole, its bytes escaped, for the session to refuse: a strict
        # decoder would end the chat with a traceback.
        sys.stdin.reconfigure(errors="surrogateescape")

        def read_terminal(prompt: str) -> str | None:
            try:
                return builtins.input(prompt)
            except EOFError:
                output.write("\n")
                return None
            except KeyboardInterrupt:  # Ctrl-C a moment after a reply ends must not lose the conversation
                output.write("\n(the line is dropped; Ctrl-D or /exit leaves)\n")
                return ""

        return read_terminal

    def read_stream(prompt: str) -> str | None:
        output.write(prompt)
        output.flush()
        line = input.readline()
        return line.rstrip("\n") if line else None

    return read_stream
