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
"""

from __future__ import annotations

import builtins
import sys
from collections.abc import Callable
from typing import TextIO

from jinja2 import TemplateError

from .data.images import read_image_file
from .data.schema import Image
from .errors import ConfigError
from .generate import Sampling, encode_prompts, load_for_inference, stream
from .models import load_tokenizer, model_context_length, resolve
from .models.loading import image_inputs
from .models.sources import untuned_base_note
from .models.system_prompt import recorded_system_prompt
from .reasoning import REASONING, ReasoningSplitter, message, reasoning_opened
from .wording import counted

PROMPT = ">>> "
HELP = """commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    start a new conversation with this system message
  /system         start a new conversation with the model's own (its fine-tuning's, if recorded)
  /show           print the system message in force
  /image PATH     attach a local image file (PNG, JPEG, GIF, WEBP) to your next message (a model that reads images)
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
) -> list[dict]:
    """Read turns from `input` (None: the terminal, with line editing) and stream replies to `output`
    until /exit or end of input; returns the conversation as it stands then, system message first."""
    output = output or sys.stdout
    read = _line_reader(input, output)
    window = model_context_length(model)
    history: list[dict] = []
    attached: list[Image] = []  # /image files for the next user message

    def note(text: str) -> None:
        output.write(f"({text})\n")
        output.flush()

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
            elif command == "/show":
                note(_system_in_force(tokenizer, system))
            elif command == "/help":
                output.write(HELP + "\n")
            else:
                note(f"unknown command {command}; /help lists the commands")
            continue
        history.append(_user_message(text, attached))
        try:
            prompt_ids, budget = _fit(tokenizer, system, history, window, max_new_tokens, note)
        except (TemplateError, ValueError) as err:  # a template that refuses these messages (Gemma 2: a system one)
            history.pop()  # its images stay attached for the next message
            note(
                f"the model's chat template refuses this conversation: {err}; not sent"
                + (" (/system with no text drops your system message)" if system else "")
            )
            continue
        if budget < 1:
            history.pop()
            note(
                f"that message alone fills the model's {window}-token context"
                + (" with its images' tokens" if attached else "")
                + "; send a shorter one"
            )
            continue
        images = _images_of(history)
        attached.clear()
        opened = reasoning_opened(tokenizer, prompt_ids)
        reply = stream(
            model, tokenizer, prompt_ids, max_new_tokens=budget, temperature=temperature, top_p=top_p, images=images
        )
        shown = _ReplyWriter(output, opened)
        try:
            for piece in reply:
                shown.write(piece)
            shown.finish()
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat; the unanswered turn is dropped
            shown.close()
            history.pop()
            output.write("\n")
            note("reply interrupted")
            continue
        output.write("\n")
        parts = {"content": reply.completion.text} if opened is None else message(reply.completion.text, opened)
        # The reasoning goes back to the template apart, which keeps or drops it by its own rules (as in serve).
        history.append({"role": "assistant", **{k: v for k, v in parts.items() if v is not None}})
        if reply.completion.finish_reason == "length":
            note(f"cut at {budget} tokens" + (" while reasoning" if shown.reasoning_only else ""))
    return _with_system(system, history)


def chat_command(
    spec: str, *, system: str | None, max_new_tokens: int, temperature: float, top_p: float, precision: str = "auto"
) -> int:
    """Load MODEL (registry name, folder, run folder, .gguf) and chat with it in the terminal."""
    try:
        Sampling(max_new_tokens, temperature, top_p)
    except ValueError as err:
        raise ConfigError(str(err), code="invalid_value") from err
    source = resolve(spec)
    tokenizer = load_tokenizer(source)
    model = load_for_inference(source, "chat", precision)
    sys.stdout.write(
        f"chatting with {source.name}"
        + (f" (adapter {source.adapter} on {source.path})" if source.adapter else "")
        + f"; {'greedy' if temperature == 0 else f'temperature {temperature}'}, "
        f"up to {max_new_tokens} tokens a reply; /help for commands.\n({_system_in_force(tokenizer, system)})\n"
    )
    if note := untuned_base_note(source):
        sys.stdout.write(f"({note})\n")
    chat_session(model, tokenizer, system=system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    return 0


class _ReplyWriter:
    """Writes a streamed reply: a reasoning model's reasoning (see `reasoning`) apart from its answer,
    dimmed on a terminal and followed by a blank line, then the answer; other models' replies as written."""

    DIM, NORMAL = "\x1b[2m", "\x1b[22m"

    def __init__(self, output: TextIO, opened: bool | None):
        self.output = output
        self.splitter = ReasoningSplitter(opened) if opened is not None else None
        self.terminal = output.isatty()
        self.field: str | None = None  # the part being written
        self.reasoning_only = opened is not None  # until the answer starts

    def write(self, piece: str) -> None:
        for field, text in self.splitter.feed(piece) if self.splitter else [("content", piece)]:
            self._write(field, text)

    def finish(self) -> None:
        for field, text in self.splitter.finish() if self.splitter else []:
            self._write(field, text)
        self.close()

    def close(self) -> None:
        """Leave the terminal's text normal, whatever part the reply stopped in."""
        if self.field == REASONING and self.terminal:
            self.output.write(self.NORMAL)
            self.output.flush()

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
            "(Gemma 3 4B and up) to send one"
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


def _with_system(system: str | None, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history


def _fit(
    tokenizer,
    system: str | None,
    history: list[dict],
    window: int | None,
    max_new_tokens: int,
    note: Callable[[str], None],
) -> tuple[tuple[int, ...], int]:
    """The prompt's token ids, oldest exchanges dropped while they and the reply overflow the window,
    and how many tokens the reply may have."""
    while True:
        # The images too: Qwen2-VL's image tokens count by each image's size.
        prompt_ids = tuple(encode_prompts(tokenizer, [_with_system(system, history)], images=_images_of(history))[0])
        if window is None:
            return prompt_ids, max_new_tokens
        room = window - len(prompt_ids)
        if room >= max_new_tokens or len(history) <= 1:
            return prompt_ids, min(room, max_new_tokens)
        del history[:2]  # the oldest user message and the reply to it
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
