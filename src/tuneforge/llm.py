"""`tuneforge.load(MODEL)`: a model held in memory that answers from Python as `tuneforge serve` and `chat` do.

    llm = tuneforge.load("runs/my-run")
    llm.generate("What is two plus two?", max_new_tokens=40)            # the reply's text
    llm.chat(messages, tools=TOOLS)                                      # serve's message: content, tool_calls

A prompt goes through the model's chat template (with `tools`, rendered as serve renders a request's; a text
holding the template's special tokens refused, as serve refuses it) and
`generate.py`'s decoding, greedy unless a temperature is given; the weights are held as `precision` says
(`auto`, as serve and chat hold them: bf16 where the hardware computes it natively, else fp32). A reply is
OpenAI's assistant message as serve's chat completions give it: a reasoning model's reasoning apart in
`reasoning_content`, and where tools are given, the calls it makes in `tool_calls`.
"""

from __future__ import annotations

from numbers import Integral
from pathlib import Path

from jinja2 import TemplateError
from pydantic import ValidationError

from . import reasoning
from .chat import checked_tools
from .data.images import read_shown_image
from .data.render import renderer_for
from .errors import ConfigError, complaint, key_path
from .generate import Sampling, encode_prompts, load_for_inference, stream
from .models import load_tokenizer, model_context_length, resolve
from .models.loading import image_inputs
from .progress import library_bars
from .tool_calls import tool_call_parser

DEFAULT_MAX_NEW_TOKENS = 256  # the reply length limit where a call sets none, within the context window


class LLM:
    """A model and its tokenizer, loaded once (`load`), answering prompts one at a time."""

    def __init__(self, source, model, tokenizer):
        self.source, self.model, self.tokenizer = source, model, tokenizer

    @classmethod
    def load(cls, model: str | Path, *, precision: str = "auto", progress: bool = True) -> LLM:
        """MODEL (a registry name, model folder, run folder, checkpoint or .gguf file), with its adapter if it has
        one, on the GPU where there is one; `progress=False` leaves out transformers' bar of the weights' load."""
        source = resolve(model)
        with library_bars(progress):
            tokenizer = load_tokenizer(source)
            return cls(source, load_for_inference(source, "chat", precision), tokenizer)

    def __repr__(self) -> str:
        adapter = f", adapter {self.source.adapter}" if self.source.adapter else ""
        return f"LLM({self.source.name}{adapter})"

    def generate(
        self,
        prompt: str | list[dict],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | tuple[str, ...] | None = (),
    ) -> str:
        """The reply to `prompt` (a user message's text, or chat messages) as text: for a reasoning model the
        answer after its reasoning."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        reply = self._answer(messages, None, (prompt, "prompt"), max_new_tokens, temperature, top_p, seed, stop)
        return reply[reasoning.CONTENT]

    def chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | tuple[str, ...] | None = (),
    ) -> dict:
        """The assistant message answering `messages` (OpenAI's chat messages, a reply's `tool_calls` and `tool`
        results among them), as serve's chat completions give it: `content`, a reasoning model's
        `reasoning_content`, and with `tools` (OpenAI tool definitions) the `tool_calls` it makes (content then
        the text before them, None if none). Decoding stops at the end of the turn, a `stop` string or
        `max_new_tokens` (None: 256, or what the model's context window leaves after the prompt if less)."""
        return self._answer(messages, tools, (messages, "messages"), max_new_tokens, temperature, top_p, seed, stop)

    def _answer(
        self,
        messages: list[dict],
        tools: list[dict] | None,
        asked: tuple[str | list[dict], str],
        max_new_tokens: int | None,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: str | list[str] | tuple[str, ...] | None,
    ) -> dict:
        """`chat`'s reply to `messages`; `asked`, the prompt as the caller gave it (`generate`'s text, or the
        messages) and its name, whose fields a refusal of a special token names."""
        given, name = asked
        if not isinstance(messages, list | tuple) or not messages:
            wanted = (
                "a user message's text or a list of chat messages" if name == "prompt" else "a list of chat messages"
            )
            got = "an empty list" if isinstance(messages, list | tuple) else f"{type(given).__name__} {given!r:.60}"
            raise ConfigError(
                f"{name} must be {wanted} ([{{'role': 'user', 'content': 'Hi'}}]), got {got}.", code="invalid_value"
            )
        stop = () if stop is None else (stop,) if isinstance(stop, str) else stop  # one string: as serve reads it
        if not isinstance(stop, list | tuple):
            raise ConfigError(
                f"stop must be a string or a list of strings, got {type(stop).__name__}.", code="invalid_value"
            )
        if isinstance(max_new_tokens, Integral) and max_new_tokens < 1:  # NumPy ints too; Sampling names other types
            raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}.", code="invalid_value")
        try:
            length = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
            Sampling(length, temperature, top_p, seed, tuple(stop))
        except ValueError as err:
            raise ConfigError(str(err), code="invalid_value") from err
        definitions = checked_tools(tools, "tools") if tools else None
        self._refuse_special_tokens(*asked, definitions)
        parser = tool_call_parser(self.tokenizer, self.source.name, "tools") if definitions else None
        messages, images = self._template_messages(messages)
        try:
            prompt_ids = encode_prompts(self.tokenizer, [messages], definitions, images=images)[0]
        except (TemplateError, ValueError) as err:  # a template that refuses these messages (roles, order)
            raise ConfigError(f"The model's chat template cannot render these messages: {err}") from err
        window = model_context_length(self.model)
        room = window - len(prompt_ids) if window else None
        if room is not None and room < 1:
            raise ConfigError(
                f"The model's context window is {window} tokens and the prompt has {len(prompt_ids)}, which leaves "
                "none for the reply. Shorten the messages.",
                code="context_length_exceeded",
            )
        if max_new_tokens is None:
            max_new_tokens = DEFAULT_MAX_NEW_TOKENS if room is None else min(DEFAULT_MAX_NEW_TOKENS, room)
        if room is not None and max_new_tokens > room:
            raise ConfigError(
                f"The model's context window is {window} tokens and the prompt has {len(prompt_ids)}, which leaves "
                f"{room} for the reply; max_new_tokens asks for {max_new_tokens}. Lower it or shorten the messages.",
                code="context_length_exceeded",
            )
        reply = stream(
            self.model,
            self.tokenizer,
            tuple(prompt_ids),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            keep_tokens=parser.markers if parser is not None else (),
            images=images,
        )
        for _ in reply:
            pass
        opened = reasoning.reasoning_opened(self.tokenizer, prompt_ids)
        return reasoning.assistant_message(reply.completion.text, opened, parser.parse if parser is not None else None)

    def _template_messages(self, messages: list[dict]) -> tuple[list[dict], tuple[bytes, ...]]:
        """`messages` as serve gives a request's to the chat template (text parts joined; each `image_url` part of a
        user message the image's marker), and the image files they show, in order, each checked as serve checks
        one; a ConfigError naming the message and part of one it refuses."""
        from .serve.bodies import ChatMessage

        side, shown, files = image_inputs(self.tokenizer), [], []
        for i, raw in enumerate(messages):
            try:
                message = ChatMessage.model_validate(raw)
            except ValidationError as err:
                said = "; ".join(f"{'.'.join(key_path(e['loc'])) or 'message'}: {complaint(e)}" for e in err.errors())
                raise ConfigError(f"messages[{i}]: {said}", code="invalid_value") from None
            for j, part in message.image_parts:
                at = f"messages[{i}].content[{j}]"
                if side is None:
                    raise ConfigError(
                        f"{at}: an image part, and {self.source.name} reads text only (it has no image processor); "
                        "give the content as text, or load a model that reads images.",
                        code="invalid_value",
                    )
                image = read_shown_image(part.image_url.url, side)
                if isinstance(image, str):
                    raise ConfigError(f"{at}.image_url.url: {image}", code="invalid_value")
                files.append(image)
            shown.append(message.as_template_message())
        return shown, tuple(files)

    def _refuse_special_tokens(self, prompt: str | list[dict], path: str, tools: list[dict] | None = None) -> None:
        """A `ConfigError` naming the field where a text of `prompt` (named `path`) or `tools` holds a special
        token of the model's chat template, which it would read as structure (a turn's end, a new turn), not
        text: serve refuses such a request, and training such a row."""
        if problems := renderer_for(self.tokenizer).special_tokens_in_prompt(prompt, tools, path=path):
            raise ConfigError(f"{problems[0].field}: {problems[0].message}", code="invalid_value")


def load(model: str | Path, *, precision: str = "auto", progress: bool = True) -> LLM:
    """`LLM.load`: MODEL loaded to answer prompts (`LLM.generate`, `LLM.chat`)."""
    return LLM.load(model, precision=precision, progress=progress)
