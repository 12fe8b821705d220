"""The data pipeline's own types: what every input format is normalised to, and what comes out.

Readers turn rows of any supported format into a `Conversation` (chat, alpaca, ShareGPT,
prompt/completion; a KTO row is one with a `label`), a `Document` (plain text for continued
pretraining) or a `Preference` (a prompt with a preferred and a rejected reply). Anything wrong
with a row is a `Problem`.
Rendering turns records into `Example`s: token ids plus already shifted labels.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

IGNORE_INDEX = -100
"""Label of a position that receives no loss (PyTorch's cross-entropy `ignore_index`)."""

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Image:
    """An image part of a message: the file's bytes (PNG, JPEG, ...) and the URL it was given as."""

    data: bytes
    url: str
    field: str | None = field(default=None, compare=False)
    """The row's field that gave it where that is not its message's part: an `images` field's entry (`images[1]`)."""


@dataclass
class Message:
    role: str
    content: str
    weight: int | None = None
    """Assistant messages only: 0 means "render but do not train on this reply" (OpenAI's field)."""
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    """Assistant messages only: the reply's reasoning, apart from its answer (as DeepSeek's and Qwen's
    APIs return it); chat templates of reasoning models (Qwen 3's) write it inside `<think>`."""
    parts: tuple[str | Image, ...] | None = None
    """User messages with images only: the content's parts in order, text and images; `content` is
    then its text parts joined (what dedup, the PII scan and the reports read)."""

    @property
    def images(self) -> tuple[Image, ...]:
        return tuple(p for p in self.parts or () if isinstance(p, Image))

    def to_template(self) -> dict:
        """The message as a chat template expects it (the loss weight is ours, not the template's)."""
        out = {"role": self.role, "content": self.content}
        if self.parts is not None:  # the template writes its image marker for each image part
            out["content"] = [
                {"type": "image"} if isinstance(p, Image) else {"type": "text", "text": p} for p in self.parts
            ]
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.tool_calls:
            out["tool_calls"] = [_call_for_template(call) for call in self.tool_calls]
        return out


SHOWN_IMAGE = "[image]"
"""What a person reads in an image's place in a prompt shown as text (eval's examples, GRPO's and training's
samples)."""


def shown_text(content: str | list[dict]) -> str:
    """A template message's content (`Message.to_template`) as a person reads it: its text, each image as
    `SHOWN_IMAGE`."""
    if isinstance(content, str):
        return content
    return "".join(SHOWN_IMAGE if part["type"] == "image" else part["text"] for part in content)


def _call_for_template(call: dict) -> dict:
    """A tool call with its arguments as an object: OpenAI's data holds them as JSON text
    (`"arguments": "{\\"city\\": \\"Paris\\"}"`), chat templates write them with `tojson` and expect an
    object, as transformers documents (a string would be written, and trained, as JSON inside a string)."""
    function = call.get("function")
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return call
    if not isinstance(parsed, dict):
        return call
    return {**call, "function": {**function, "arguments": parsed}}


@dataclass(frozen=True)
class RowField:
    """Where a record's message sits in its row: `path` names it (`messages[1]`, `prompt`); `holds_text` says the
    field is the message's text alone (a `completion` string, a ShareGPT turn's `value`, an alpaca `output`), so
    every part of the message is named by it, where the parts of a message object are named under it
    (`messages[1].tool_calls`)."""

    path: str
    holds_text: bool = False

    def of(self, part: str) -> str:
        """The row's field of a part of the message (`content`, `tool_calls[0].function.arguments`; "" for all)."""
        return self.path if self.holds_text or not part else f"{self.path}.{part}"


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict] | None = None
    label: bool | None = None
    """KTO rows only: whether the last message, the one reply that trains, is desirable (True) or
    undesirable (False); None for every other conversation."""
    fields: list[RowField] | None = field(default=None, compare=False)
    """Where each message sits in its row, for the problems found in it (`row_field`); None for a conversation
    not read from a row, whose messages are then named as its own (`messages[1]`)."""

    def row_field(self, field: str | None) -> str | None:
        """A field named by this conversation's messages (`messages[2].content`, as rendering names them) as its
        row names it (`completion`, `history[0][1]`); any other field as it is."""
        found = re.match(r"messages\[(\d+)\]\.?", field or "")
        if self.fields is None or found is None or int(found[1]) >= len(self.fields):
            return field
        return self.fields[int(found[1])].of(field[found.end() :])


@dataclass
class Document:
    """Plain text, trained on in full (continued pretraining)."""

    text: str


@dataclass
class Preference:
    """A prompt and two replies to it, the preferred one first (DPO-style training)."""

    prompt: list[Message]
    chosen: Message
    rejected: Message
    tools: list[dict] | None = None
    fields: tuple[list[RowField], list[RowField]] | None = None
    """Where each message of the chosen and of the rejected conversation (the prompt, then the reply)
    sits in its row, for the problems found in it (`sides`); None for a pair not read from a row."""
    margin: float | None = None
    """The row's `margin`: how far the chosen reply's reward should exceed the rejected's (Llama 2's margin
    loss, TRL's RewardTrainer `margin` column); None where the row gives none."""

    def sides(self) -> tuple[Conversation, Conversation]:
        """The chosen and the rejected conversation (the prompt, then the reply), each message where it sits in
        the row."""
        chosen, rejected = self.fields or (None, None)
        return (
            Conversation([*self.prompt, self.chosen], self.tools, fields=chosen),
            Conversation([*self.prompt, self.rejected], self.tools, fields=rejected),
        )


Record = Conversation | Document | Preference


@dataclass(frozen=True)
class Problem:
    """Something wrong with the data, located as precisely as we can: file, line (or row), field."""

    code: str
    message: str
    """Says what is wrong and what to do about it."""
    file: str = ""
    line: int | None = None
    """Line in a JSONL/CSV file, the line an element starts on in a JSON array, the row of a Parquet file."""
    field: str | None = None
    severity: Literal["error", "warning"] = "error"
    sample: str = ""
    """The part of `message` that is this row's own (a secret's masked sample); a warning that groups rows of
    one code says each listed row's in its place."""

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def where(self) -> str:
        place = self.file or "<data>"
        if self.line is not None:
            place += f":{self.line}"
        if self.field:
            place += f" {self.field}"
        return place

    def __str__(self) -> str:
        return f"{self.where()}: [{self.code}] {self.message}"

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
        }


def token_array(values: Iterable[int]) -> array:
    """Token ids, labels or position ids as a compact array of 32-bit ints (`array("i")`): 4 bytes a
    token where a list of Python ints takes about 36, so a data set of millions of tokens stays
    small in memory, from tokenization through the cache to the collator. It slices, concatenates
    (with another array), counts and iterates as a list does; `tolist()` gives the list."""
    return values if isinstance(values, array) and values.typecode == "i" else array("i", values)


@dataclass(slots=True)
class Example:
    """One tokenized training example (not packed).

    `labels` are already shifted: `labels[i]` is the target for position i, that is `input_ids[i + 1]`
    where that token is trained and `IGNORE_INDEX` elsewhere; the last position is always
    `IGNORE_INDEX`. A loss is `cross_entropy(logits[:, i], labels[:, i])` with no further shift, so
    examples can be packed side by side without one predicting the first token of the next.

    `desirable` is a KTO example's rating, None for any other example.

    `is_replay` marks a general replay example (`data.general_mix`), not the user's data: with
    `train.replay_loss: kl_to_base` it is learned as the base model's distribution, not as text.

    Both are held as `token_array`s, whatever sequence of ints they are given as.
    """

    input_ids: array
    labels: array
    is_replay: bool = False
    desirable: bool | None = None
    """KTO examples only: the rating of the reply it trains (`Conversation.label`)."""
    images: tuple[bytes, ...] = ()
    """The image files its image tokens stand for, in order (a model that reads images)."""
    margin: float | None = None
    """The chosen example of a preference pair only: its row's `margin` (`Preference.margin`, 0.0 where the
    row gives none), so that each pair's chosen example carries one and a row's margins follow its pairs."""

    def __post_init__(self) -> None:
        self.input_ids = token_array(self.input_ids)
        self.labels = token_array(self.labels)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)

    def truncated(self, max_length: int) -> Example:
        """The example cut to its first `max_length` tokens (itself if it is no longer): the last token
        kept loses its target, which was the first token cut."""
        if len(self) <= max_length:
            return self
        return replace(
            self,
            input_ids=self.input_ids[:max_length],
            labels=self.labels[: max_length - 1] + token_array([IGNORE_INDEX]),
        )

    def windows(self, max_length: int) -> tuple[Example, ...]:
        """The example cut into consecutive windows of at most `max_length` tokens that together train
        each of its trained tokens once (`data.truncation: split`). A window's last token has no target
        in it, so the next window starts on that token: there it predicts the first token the window
        before could not. The first window keeps the example's start (its BOS), the last its end (its EOS)."""
        if len(self) <= max_length:
            return (self,)
        out = []
        for start in range(0, len(self) - 1, max_length - 1):
            end = min(start + max_length, len(self))
            labels = self.labels[start : end - 1] + token_array([IGNORE_INDEX])
            out.append(replace(self, input_ids=self.input_ids[start:end], labels=labels))
        return tuple(out)


@dataclass
class PreparedData:
    """What `prepare` returns.

    SFT and text data fill `train` and `valid`. Preference data fills `train_pairs` and
    `valid_pairs` instead: (chosen, rejected) examples that share their prompt tokens, each
    training only its reply. `report` is what `data_report.json` holds.
    """

    train: list[Example]
    valid: list[Example]
    report: dict
    train_pairs: list[tuple[Example, Example]] = field(default_factory=list)
    valid_pairs: list[tuple[Example, Example]] = field(default_factory=list)
