"""A reasoning model's reply parted into `reasoning_content` and `content`, as DeepSeek's API and
vLLM's reasoning parsers return it.

A model reasons when its chat template writes an assistant message's reasoning_content (Qwen 3's,
which the reply then opens with `<think>`) or when the prompt the template renders ends inside
`<think>` (DeepSeek-R1's). Its reply's reasoning is what comes before `</think>`, its answer what
follows, both as `tasks.metrics.split_reasoning` parts them for eval; a reply cut off before
`</think>` is all reasoning, with an empty answer. A reply that opens no reasoning is all answer,
as it is written. Other models' replies are never parted.

`ReasoningSplitter` parts a reply as it streams: a piece that may be the start of `<think>` or
`</think>` (or whitespace that the whole reply's parts would not keep) waits for the next one, so
the pieces of each part join to what `message` gives for the whole reply. A reply holding `</think>`
more than once is the exception: the stream parts it at the first, as vLLM does, the whole reply at
the last, as eval does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .data.render import renderer_for
from .tasks.metrics import THINK_CLOSE, THINK_OPEN, split_reasoning
from .tool_calls import reply_finish_reason

if TYPE_CHECKING:
    from .tool_calls import ParsedReply

REASONING, CONTENT = "reasoning_content", "content"
# Enough of the prompt's last tokens to hold its `<think>` and what follows it, where `<think>` is no token of its own.
_OPENING_TAIL_TOKENS = 16


def reasoning_opened(tokenizer, prompt_ids: list[int]) -> bool | None:
    """For a chat prompt: None where the model does not reason, else whether the prompt opens its reasoning
    (DeepSeek-R1's template ends the prompt with `<think>`)."""
    opened = tokenizer.decode(prompt_ids[-_OPENING_TAIL_TOKENS:]).rstrip().endswith(THINK_OPEN)
    return opened if opened or renderer_for(tokenizer).writes_reasoning else None


def message(text: str, opened: bool) -> dict:
    """The reply's `reasoning_content` (None where it opens none) and `content`."""
    if not (opened or text.lstrip().startswith(THINK_OPEN)):
        return {REASONING: None, CONTENT: text}
    reasoning, answer = split_reasoning(THINK_OPEN + text if opened else text)
    return {REASONING: reasoning, CONTENT: answer}


def assistant_message(text: str, opened: bool | None, calls: Callable[[str], ParsedReply | None] | None = None) -> dict:
    """OpenAI's assistant message of a reply's `text`, as serve's chat completions give it (and `chat`,
    `tuneforge.load`): a reasoning model's (`opened` not None, see `reasoning_opened`) reasoning apart in
    `reasoning_content`; then, where `calls` (a tool-call parser's `parse`) finds calls in the answer, the text
    before them in `content` (None if none) and the calls in `tool_calls`."""
    reply = {"role": "assistant", CONTENT: text}
    if opened is not None:
        reply.update(message(text, opened))
    if calls is not None and (parsed := calls(reply[CONTENT])) is not None:
        reply.update(content=parsed.content, tool_calls=parsed.tool_calls)
    return reply


def assistant_reply(
    text: str, generated: str, opened: bool | None, calls: Callable[[str], ParsedReply | None] | None = None
) -> tuple[dict, str]:
    """A reply's `assistant_message` and its finish_reason (`generated`, the generation's, as
    `tool_calls.reply_finish_reason` gives it), as serve's chat completions and an Evals run's samples give them."""
    reply = assistant_message(text, opened, calls)
    return reply, reply_finish_reason(generated, "tool_calls" in reply)


class ReasoningSplitter:
    """Parts streamed pieces of a reply: `feed(piece)` and `finish()` give (field, text) deltas in order."""

    def __init__(self, opened: bool):
        self._mode = REASONING if opened else "start"  # "start": not yet known whether the reply opens `<think>`
        self._pending = ""  # text received and not yet sent
        self._started = False  # whether the current part has sent any text

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self._pending += piece
        deltas = []
        if self._mode == "start":
            text = self._pending.lstrip()
            if text.startswith(THINK_OPEN):
                self._mode, self._pending = REASONING, text.removeprefix(THINK_OPEN)
            elif not THINK_OPEN.startswith(text):
                self._mode = "as written"  # no reasoning: the reply is the answer, sent as it is written
            else:
                return deltas
        if self._mode == REASONING:
            head, close, rest = self._pending.partition(THINK_CLOSE)
            if not close:
                return self._send(REASONING, hold=_partial_marker(self._pending))
            self._pending = head
            deltas += self._send(REASONING, hold=len(head) - len(head.rstrip()))
            self._mode, self._pending, self._started = CONTENT, rest, False
        if self._mode == "as written":
            text, self._pending = self._pending, ""
            return [*deltas, (CONTENT, text)] if text else deltas
        return deltas + self._send(CONTENT, hold=0)

    def finish(self) -> list[tuple[str, str]]:
        """What was held back, once the reply has ended."""
        if self._mode in ("start", "as written"):
            text, self._pending = self._pending, ""
            return [(CONTENT, text)] if text else []
        return self._send(self._mode, hold=len(self._pending) - len(self._pending.rstrip()))

    def _send(self, field: str, hold: int) -> list[tuple[str, str]]:
        """Send the pending text but its last `hold` characters and the whitespace before them: the parts
        are sent stripped, as `message` strips them."""
        text = self._pending[: len(self._pending) - hold]
        sent = text.rstrip()
        if not self._started:
            sent = sent.lstrip()
        self._pending = self._pending[len(text.rstrip()) :] if sent else self._pending
        if not sent:
            return []
        self._started = True
        return [(field, sent)]


def _partial_marker(text: str) -> int:
    """How many of the text's last characters may begin `</think>` (its next piece may complete it)."""
    return next((n for n in range(min(len(text), len(THINK_CLOSE) - 1), 0, -1) if THINK_CLOSE.startswith(text[-n:])), 0)


async def deltas(pieces, opened: bool | None):
    """A streamed reply's (field, text) deltas: its pieces parted where the model reasons (`opened` not
    None, see `reasoning_opened`), else each piece as content."""
    splitter = ReasoningSplitter(opened) if opened is not None else None
    async for piece in pieces:
        for delta in splitter.feed(piece) if splitter else [(CONTENT, piece)]:
            yield delta
    for delta in splitter.finish() if splitter else []:
        yield delta
