"""Rendering records with the tokenizer's own chat template, and deriving which tokens are trained.

The trained tokens of an assistant reply are its content plus the end-of-turn token that closes it
(`<|im_end|>` in ChatML); never the template's headers, never the newline after the end of turn.
They are found by rendering growing prefixes of the conversation:

    prompt_i = render(messages[:i], add_generation_prompt=True)   # what the model sees before reply i
    turn_i   = render(messages[:i + 1])                           # reply i as the last message

Reply i is what turn_i adds to prompt_i, up to and including its end-of-turn token. Where the
whole rendering holds that same text (most templates), reply i is trained there. Templates that
rewrite an earlier turn once a later one follows (Qwen 3 drops the reasoning of past replies) would
train the rewritten text, which the model never writes; such a reply is trained on turn_i instead,
an example of its own, so the conversation becomes one example per such turn. A template whose
prompt_i is not where turn_i starts (Mistral writes the system prompt into the last user message
only, so it moves once a reply follows) leaves no exact place for reply i: that is an error naming
the message and both renderings. Masks are never derived from padding or from special-token
positions alone: SmolLM2's pad token is its end-of-turn token.

Tokenizing by pieces: a fast tokenizer cuts text at its unnormalised added tokens (`<|im_start|>`,
`<|im_end|>`, ...) before anything else and tokenizes the pieces between them independently. We
make the same cuts ourselves, which lets a batch tokenize each distinct piece once (a system prompt
shared by every row costs one encoding) and makes the prefix check cheap: a prefix's tokens are the
whole's tokens up to the piece it ends in, then the tokens of that piece's beginning. Whether the
tokenizer really works like that is checked on a probe when the renderer is built and on the first
text of every batch; one that does not (SentencePiece-style "a space before the first piece", say)
gets its texts tokenized whole and every prefix tokenized in full.

Speed: a batch is rendered on the calling thread and tokenized on a background thread (the Rust
tokenizer releases the GIL), so `prepare` can render one batch while the previous one tokenizes.
"""

from __future__ import annotations

import bisect
import os
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import accumulate, chain

from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.utils import internal_code

from ..errors import ConfigError, DataError
from ..models.images import VISION_MODELS
from ..models.loading import chat_template, fallback_template, given_chatml, image_inputs
from .schema import IGNORE_INDEX, Conversation, Document, Example, Image, Message, Preference, Problem, Record

TRAIN_ON = ("assistant", "last_assistant", "all")

Rendered = Example | tuple[Example, ...] | list[Problem]
"""What a record renders to: one Example, one Example per turn (a template that rewrites earlier
turns, see the module doc), or the problems that keep it from training."""

FATAL_CODES = frozenset({"template_not_prefix", "images_not_read"})
"""Problems that say the template or the model, not a row, is at fault: data preparation stops at once."""

_PROBE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": " 2+2?"},
    {"role": "assistant", "content": " 4"},
]
_PROBES = (_PROBE, _PROBE[1:])  # the second for templates that refuse a system message (Gemma 2)
_REPLY_STARTS = ("The", "I", "A", "Hello", "Paris", "4")  # words a reply may start with, after a generation prompt
_PROBE_TOOL = {"type": "function", "function": {"name": "tuneforge_probe_tool", "parameters": {"type": "object"}}}
_PROBE_NAME = "tuneforge_probe_name"
_PROBE_REASONING = "tuneforge_probe_reasoning"
_PROBE_CONTENT = "tuneforge_probe_content"
# Mistral's template takes only call ids of 9 letters and digits.
_PROBE_CALL = {"id": "probe0001", "type": "function", "function": {"name": "tuneforge_probe_tool", "arguments": {}}}
_SHORT_PIECE_CHARS = 64  # piece beginnings up to this long are cached ("assistant\n", "\n")
# What a template can raise on odd input; RecursionError: Jinja compiles and renders nested blocks, brackets and
# macros by recursion.
_TEMPLATE_FAILURES = (TemplateError, TypeError, ValueError, RecursionError)

_tokenizing: tuple[int, ThreadPoolExecutor] | None = None  # (process id, its tokenizing thread)


def _tokenize_thread() -> ThreadPoolExecutor:
    """The background thread that tokenizes, one per process (a forked child must start its own)."""
    global _tokenizing
    if _tokenizing is None or _tokenizing[0] != os.getpid():
        _tokenizing = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneforge-tokenize"))
    return _tokenizing[1]


@dataclass
class _Tokens:
    """A text's token ids, and where each piece (see module doc) starts, in characters and tokens."""

    ids: list[int]
    piece_chars: list[int]
    piece_tokens: list[int]


@dataclass
class _Plan:
    """A conversation rendered as text, with the character spans of its assistant turns."""

    text: str
    spans: list[tuple[int, int, int]]  # (reply start, turn end, message index)
    train_outside_spans: bool  # train_on "all": train everything except the spans (weight-0 replies)


@dataclass
class _Request:
    """One rendering to do: a conversation (or its beginning), with or without a generation prompt."""

    messages: list[dict]
    tools: list[dict] | None
    generation_prompt: bool
    images: tuple[bytes, ...] = ()  # the conversation's image files, in order (a beginning shows the first ones)


class RenderJob:
    """A batch being rendered; its tokenization runs in the background until `finish` is called."""

    def __init__(self, finish: Callable[[], list]):
        self._finish = finish

    def finish(self) -> list:
        return self._finish()


class ChatRenderer:
    """Renders records with one tokenizer's chat template and derives their loss masks."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        template = self.source_template = chat_template(tokenizer)
        self.uses_fallback_template = template is None or given_chatml(tokenizer)
        template = self.template = template or fallback_template(tokenizer)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        added = tokenizer.added_tokens_decoder
        # Tokens the tokenizer cuts text at, matched as plain text (no whitespace stripping around them).
        self._cut_ids = {
            t.content: i for i, t in added.items() if not (t.normalized or t.lstrip or t.rstrip or t.single_word)
        }
        self._cut_at = _any_of(self._cut_ids, keep=True) if self._backend else None
        # Special tokens that mark structure (those the template writes, BOS, EOS) must not appear in
        # content, where the tokenizer would read them as structure too.
        structural = {t.content for t in added.values() if t.special and t.content in template}
        structural |= {t for t in (tokenizer.bos_token, tokenizer.eos_token) if t}
        self._special_text = _any_of(structural)
        # Any special token in trained text teaches the model to write it: decoding drops it from the
        # answer (skip_special_tokens), and it may be a stop token (Llama 3's <|end_of_text|>).
        self._any_special_text = _any_of({t.content for t in added.values() if t.special})
        self._short_pieces: dict[str, list[int]] = {}
        self._probe_messages = self._accepted_probe()
        self._direct_render = self._direct_renderer() if self._probe_messages else None
        self.eos_id = tokenizer.eos_token_id
        self.end_of_turn_id = self._probe()
        self.end_ids = frozenset(i for i in (self.end_of_turn_id, self.eos_id) if i is not None)
        self.writes_tools = self._writes([_PROBE_TOOL], None, _PROBE_TOOL["function"]["name"])
        self.writes_names = self._writes(None, _PROBE_NAME, _PROBE_NAME)
        # A reasoning model's template (Qwen 3's) writes an assistant message's reasoning_content inside <think>.
        self.writes_reasoning = self._writes(None, None, _PROBE_REASONING, reasoning=_PROBE_REASONING)
        self.writes_content_with_calls = self._writes_content_with_calls()
        # The end-of-turn tokens as the template writes them, to find where a reply ends in a rendering.
        self._end_marks = tuple(added[i].content for i in self.end_ids if i in added)
        # A model that reads images: each image marker the template writes becomes the image's tokens.
        self.images = image_inputs(tokenizer)

    # --- public -----------------------------------------------------------------------------------

    def render(self, records: Sequence[Conversation | Document], train_on: str = "assistant") -> list[Rendered]:
        """Render and tokenize records in one batch; each becomes an Example, a tuple of Examples (one
        per turn, see the module doc), or the problems it has."""
        return self.start(records, train_on).finish()

    def start(self, records: Sequence[Conversation | Document], train_on: str = "assistant") -> RenderJob:
        """Render a batch now and start tokenizing it; `finish()` returns what `render` returns."""
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        out: list[Rendered] = [[] for _ in records]
        chats = [i for i, r in enumerate(records) if isinstance(r, Conversation)]
        planned = []
        for i, plans in zip(chats, self._plan([records[i] for i in chats], train_on)):
            if isinstance(plans, tuple):
                planned.append((i, plans))
            else:
                out[i] = plans
        tokens_later = self._tokenize_later([plan.text for _, plans in planned for plan in plans])
        documents = [i for i in range(len(records)) if isinstance(records[i], Document)]
        for i in documents:
            out[i] = self.special_tokens_in([("text", records[i].text)])
        documents = [i for i in documents if not out[i]]
        document_ids_later = self._encode_later([records[i].text for i in documents], add_special_tokens=True)

        def finish() -> list[Rendered]:
            tokens = tokens_later()
            if tokens is None:  # the tokenizer did not cut text as assumed; it now tokenizes whole texts
                return self.render(records, train_on)
            tokens_of = iter(tokens)
            for i, plans in planned:
                out[i] = _one_or_turns(
                    [
                        self._with_images(_in_row(self._mask(plan, next(tokens_of)), records[i]), records[i])
                        for plan in plans
                    ]
                )
            for i, ids in zip(documents, document_ids_later()):
                out[i] = self._document_example(ids)
            return out

        return RenderJob(finish)

    def render_preferences(self, preferences: Sequence[Preference]) -> list[tuple[Example, Example] | list[Problem]]:
        """Each preference as (chosen, rejected): the same prompt tokens, each training only its reply."""
        return self.start_preferences(preferences).finish()

    def start_preferences(self, preferences: Sequence[Preference]) -> RenderJob:
        job = self.start([side for p in preferences for side in p.sides()], train_on="last_assistant")

        def finish() -> list[tuple[Example, Example] | list[Problem]]:
            rendered = job.finish()
            out = []
            for chosen, rejected, pair in zip(rendered[::2], rendered[1::2], preferences):
                if isinstance(chosen, Example) and isinstance(rejected, Example):
                    out.append((chosen, rejected))
                else:
                    named = pair.fields is not None
                    out.append(_on_side(chosen, "chosen", named) + _on_side(rejected, "rejected", named))
            return out

        return RenderJob(finish)

    # --- text ------------------------------------------------------------------------------------

    def _direct_renderer(self) -> Callable[[list[dict], list[dict] | None, bool], str] | None:
        """A direct renderer with the template transformers compiles; None to use apply_chat_template.

        apply_chat_template's per-call work, and jinja's copying of the template's globals into a
        fresh context on every render, cost more than rendering a short chat. We render with the same
        compiled template and the same variables in one flat, reused mapping, once a probe shows the
        result equals apply_chat_template's.
        """
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
            variables = {**compiled.globals, **self.tokenizer.special_tokens_map}  # bos_token, eos_token, ...

            def render(messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
                context = compiled.new_context(
                    {
                        **variables,
                        "messages": messages,
                        "tools": tools,
                        "documents": None,
                        "add_generation_prompt": generation_prompt,
                    },
                    shared=True,
                )
                return compiled.environment.concat(compiled.root_render_func(context))

            for generation_prompt in (False, True):
                official = self.tokenizer.apply_chat_template(
                    self._probe_messages,
                    chat_template=self.template,
                    tokenize=False,
                    add_generation_prompt=generation_prompt,
                )
                if render(self._probe_messages, None, generation_prompt) != official:
                    return None
        except (ImportError, *_TEMPLATE_FAILURES):
            return None
        return _chatml_shortcut(render) or render

    def _apply_template(self, conversations: list[list[dict]], tools, generation_prompt: bool) -> list[str]:
        if self._direct_render is not None:
            return [self._direct_render(messages, tools, generation_prompt) for messages in conversations]
        return self.tokenizer.apply_chat_template(
            conversations,
            tools=tools,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def _plan(self, conversations: list[Conversation], train_on: str) -> list[tuple[_Plan, ...] | list[Problem]]:
        """Find every conversation's text and reply spans, rendering the whole batch at once."""
        requests: list[_Request] = []
        wanted: list[tuple[int, int, list[int]] | list[Problem]] = []  # per conversation: its requests, spans
        for conversation in conversations:
            span_at = _span_messages(conversation.messages, train_on)
            messages, tools = [m.to_template() for m in conversation.messages], conversation.tools
            problems = _in_row(self._reply_problems(conversation, messages, span_at, train_on), conversation)
            problems = problems or self.image_problems(conversation)
            if problems:
                wanted.append(problems)
                continue
            first = len(requests)
            shown = tuple(image.data for m in conversation.messages for image in m.images)
            requests.append(_Request(messages, tools, False, shown))
            for i in span_at:
                requests.append(_Request(messages[:i], tools, True, shown))
                if i < len(messages) - 1:
                    requests.append(_Request(messages[: i + 1], tools, False, shown))
            wanted.append((first, len(requests), span_at))
        texts = self._render_texts(requests)
        return [
            want
            if isinstance(want, list)
            else _in_row(
                self._spans(texts[want[0] : want[1]], want[2], conversation.messages, train_on == "all"), conversation
            )
            for conversation, want in zip(conversations, wanted)
        ]

    def _spans(
        self, rendered: list[str | Exception], span_at: list[int], messages: list[Message], train_outside_spans: bool
    ) -> tuple[_Plan, ...] | list[Problem]:
        """Check the prefix renderings of one conversation and turn them into plans: the whole
        rendering with the replies it holds as their own turns render them, and a plan of its own
        for each reply it holds rewritten (see the module doc)."""
        error = next((r for r in rendered if isinstance(r, Exception)), None)
        if error is not None:
            system = next((i for i, m in enumerate(messages) if m.role == "system"), None)
            if system is not None and self._probe_messages is _PROBES[1]:  # it renders a chat only without one
                return [_system_refused(error, system)]
            return [_template_error(error)]
        text, prefixes = rendered[0], iter(rendered[1:])
        spans, own_turns = [], []
        for i in span_at:
            prompt = next(prefixes)
            turn = next(prefixes) if i < len(messages) - 1 else text
            if not (turn.startswith(prompt) and len(turn) > len(prompt)):
                if messages[i - 1].role == "assistant":  # the row's shape, not the template: other rows train
                    return [_reply_after_reply(i, prompt, turn)]
                return [_context_changes(i, prompt, turn)]
            reply_end = self._reply_end(turn, len(prompt))
            calls = messages[i].tool_calls
            if (
                calls
                and not train_outside_spans
                and not any(c["function"]["name"] in turn[len(prompt) : reply_end] for c in calls)
            ):
                return [_tool_calls_not_rendered(i, turn[len(prompt) : reply_end])]
            reasoning = messages[i].reasoning_content
            if reasoning and reasoning.strip() not in turn[len(prompt) : reply_end]:
                return [_reasoning_not_rendered(i, turn[len(prompt) : reply_end])]
            if text.startswith(turn[:reply_end]):
                spans.append((len(prompt), reply_end, i))
            elif train_outside_spans:  # everything else in the whole rendering is trained: no turn of its own
                return [_not_prefix(i, text, turn[:reply_end])]
            else:
                own_turns.append(_Plan(turn, [(len(prompt), reply_end, i)], False))
        if spans or train_outside_spans:
            return (*own_turns, _Plan(text, spans, train_outside_spans))
        return tuple(own_turns)

    def _reply_end(self, turn: str, reply_start: int) -> int:
        """Where the reply starting at `reply_start` ends: just after its end-of-turn token, or at the
        end of `turn` (a template may write more after it, such as Phi-3's closing EOS)."""
        ends = [at + len(mark) for mark in self._end_marks if (at := turn.find(mark, reply_start)) >= 0]
        return min(ends, default=len(turn))

    def _reply_problems(
        self, conversation: Conversation, templated: list[dict], span_at: list[int], train_on: str
    ) -> list[Problem]:
        messages = conversation.messages
        # Every text the template writes (`templated`: the messages as it gets them), not the contents alone:
        # a name, a tool call or reasoning holding a structure token forges a turn as a content would.
        texts = [list(template_texts(m, f"messages[{i}]")) for i, m in enumerate(templated)]
        texts.append(list(template_texts(conversation.tools or [], "tools")))
        if self._special_text is not None and self._special_text.search("\n".join(t for f in texts for _, t in f)):
            return self.special_tokens_in(field for fields in texts for field in fields)
        if self._any_special_text is not None:
            trained = (
                [i for i, m in enumerate(messages) if not (m.role == "assistant" and m.weight == 0)]
                if train_on == "all"
                else span_at
            )
            problems = [
                _special_token_trained(field, found.group())
                for i in trained
                for field, text in texts[i]
                if (found := self._any_special_text.search(text))
            ]
            if problems:
                return problems
        if train_on != "all" and not span_at:
            return [_no_trained_tokens(conversation.messages, train_on)]
        if span_at and span_at[0] == 0:
            return [
                Problem(
                    "no_prompt",
                    "the conversation starts with an assistant reply, so nothing shows where "
                    "the reply begins; add the user message it answers (or give the reply weight 0).",
                    field="messages[0]",
                )
            ]
        return []

    def _render_texts(self, requests: list[_Request]) -> list[str | Exception]:
        """Render many requests, batched where they share tools and generation prompt."""
        out: list[str | Exception] = [""] * len(requests)
        groups: dict[tuple[int, bool], list[int]] = {}
        for n, request in enumerate(requests):
            groups.setdefault((id(request.tools), request.generation_prompt), []).append(n)
        for (_, generation_prompt), members in groups.items():
            tools = requests[members[0]].tools
            try:
                texts = self._apply_template([requests[n].messages for n in members], tools, generation_prompt)
            except _TEMPLATE_FAILURES:  # one conversation spoils the batch: find which, one by one
                texts = []
                for n in members:
                    try:
                        texts += self._apply_template([requests[n].messages], tools, generation_prompt)
                    except _TEMPLATE_FAILURES as e:
                        texts.append(e)
            for n, text in zip(members, texts):
                images = requests[n].images
                out[n] = self.images.expand(text, images) if self.images and isinstance(text, str) else text
        return out

    def image_problems(self, conversation: Conversation) -> list[Problem]:
        """A row with images for a model that reads none: the whole data set is for another model. For a model that
        reads images, each image its image processor refuses (Qwen2-VL's: a side over 200 times the other), by its
        part's url (or the row's field that gave it), as serve refuses it: rendering would raise the processor's
        error, and training would stop on it."""
        if self.images is not None:
            return [
                Problem(
                    "bad_image",
                    f"the model's image processor does not take this image ({refused}); crop or pad it.",
                    field=part.field or conversation.row_field(f"messages[{i}].content[{j}].image_url.url"),
                )
                for i, m in enumerate(conversation.messages)
                for j, part in enumerate(m.parts or ())
                if isinstance(part, Image) and (refused := self.images.refusal(part.data))
            ]
        at = next((i for i, m in enumerate(conversation.messages) if m.images), None)
        if at is None:
            return []
        name = self.tokenizer.name_or_path or "the model"
        return [
            Problem(
                "images_not_read",
                f"the row holds images, but {name} reads text only (it has no image processor). Train image rows "
                f"on a model that reads images ({VISION_MODELS}, with the processor settings their folders ship), "
                "or remove the image parts.",
                field=conversation.row_field(f"messages[{at}].content"),
            )
        ]

    def _with_images(self, result: Example | list[Problem], record: Conversation) -> Example | list[Problem]:
        """The example with the images its tokens show (the first ones of the conversation: a turn's
        example shows those of the messages up to it)."""
        images = [image.data for m in record.messages for image in m.images]
        if not images or not isinstance(result, Example):
            return result
        shown = self.images.shown(result.input_ids) if self.images is not None else 0
        return replace(result, images=tuple(images[:shown]))

    def special_tokens_in(self, fields) -> list[Problem]:
        """Problems for the (field, text) pairs whose text holds a special token the template or the
        tokenizer uses as structure: it would be read as that structure (a fake turn), not as text."""
        if self._special_text is None:
            return []
        return [
            Problem(
                "special_token_in_content",
                f"the text contains the special token {found.group()!r}, which "
                "would be read as template structure, not text; remove it or write it differently.",
                field=name,
            )
            for name, text in fields
            if (found := self._special_text.search(text))
        ]

    def special_tokens_in_prompt(
        self, messages: str | list, tools: list | None, *, path: str = "messages", brackets: bool = True
    ) -> list[Problem]:
        """`special_tokens_in` for a chat prompt sent to the model (a serve request's, `tuneforge.load`'s): every
        text of its messages (`path`) and tool definitions the template writes, as training checks a row's;
        fields named as `template_texts` names them."""
        return self.special_tokens_in(
            [
                *template_texts(messages, path, brackets=brackets),
                *template_texts(tools or [], "tools", brackets=brackets),
            ]
        )

    # --- tokens ----------------------------------------------------------------------------------

    def _pieces(self, text: str) -> list[str]:
        """The runs of plain text and the cut tokens of `text`, in order."""
        if self._cut_at is None:
            return [text] if text else []
        return [piece for piece in self._cut_at.split(text) if piece]

    def _tokenize_later(self, texts: list[str]) -> Callable[[], list[_Tokens] | None]:
        """Start tokenizing texts by pieces; the returned function waits for the result.

        It returns None if the first text's pieces do not add up to its whole tokenization; the
        renderer has then stopped cutting texts into pieces, and the batch must be rendered again.
        """
        split = [self._pieces(t) for t in texts]
        distinct = list({piece for pieces in split for piece in pieces if piece not in self._cut_ids})
        check = texts[:1] if self._cut_at is not None else []
        ids_later = self._encode_later(distinct + check)

        def result() -> list[_Tokens] | None:
            encoded = ids_later()
            piece_ids = self._piece_ids(distinct, encoded)
            tokens = [_assemble(pieces, piece_ids) for pieces in split]
            if check and tokens[0].ids != encoded[-1]:
                self._cut_at = None
                return None
            return tokens

        return result

    def _piece_ids(self, distinct: list[str], encoded: list[list[int]]) -> dict[str, list[int]]:
        piece_ids = dict(zip(distinct, encoded))
        piece_ids.update((token, [i]) for token, i in self._cut_ids.items())
        return piece_ids

    def _encode_later(self, texts: list[str], *, add_special_tokens: bool = False) -> Callable[[], list[list[int]]]:
        if not texts or self._backend is None:
            ids = self._encode_whole(texts, add_special_tokens=add_special_tokens)
            return lambda: ids
        return _tokenize_thread().submit(self._encode_whole, texts, add_special_tokens=add_special_tokens).result

    def _encode_whole(self, texts: list[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        return self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]

    def _piece_start_ids(self, text: str) -> list[int]:
        ids = self._short_pieces.get(text)
        if ids is None:
            ids = self._encode_whole([text])[0]
            if len(text) <= _SHORT_PIECE_CHARS:
                self._short_pieces[text] = ids
        return ids

    def _boundary(self, text: str, tokens: _Tokens, cut: int) -> int | None:
        """k such that the tokens of text[:cut] are tokens.ids[:k]; None if there is no such k."""
        if cut == len(text):
            return len(tokens.ids)
        p = bisect.bisect_right(tokens.piece_chars, cut) - 1
        start, first = tokens.piece_chars[p], tokens.piece_tokens[p]
        if cut == start:
            return first
        end = tokens.piece_tokens[p + 1] if p + 1 < len(tokens.piece_tokens) else len(tokens.ids)
        head = self._piece_start_ids(text[start:cut])
        return first + len(head) if len(head) <= end - first and tokens.ids[first : first + len(head)] == head else None

    def _mask(self, plan: _Plan, tokens: _Tokens) -> Example | list[Problem]:
        ids = tokens.ids
        # labels[t - 1] is the target that predicts token t (see Example).
        labels = ids[1:] + [IGNORE_INDEX] if plan.train_outside_spans else [IGNORE_INDEX] * len(ids)
        trained = len(ids) - 1 if plan.train_outside_spans else 0
        for reply_start, turn_end, message_index in plan.spans:
            start, end = self._boundary(plan.text, tokens, reply_start), self._boundary(plan.text, tokens, turn_end)
            if start is None and plan.text[reply_start : reply_start + 1].isspace():
                return [_reply_joins_prompt(message_index, plan.text, reply_start)]
            if start is None or end is None:
                return [
                    _not_prefix(
                        message_index,
                        plan.text,
                        plan.text[: reply_start if start is None else turn_end],
                        tokens_differ=True,
                    )
                ]
            # A reply is trained up to and including the token that ends its turn; what the template
            # writes after that (a newline) is not the model's to predict.
            stop = next((t + 1 for t in range(start, end) if ids[t] in self.end_ids), end)
            start = max(start, 1)  # the first token is nobody's target
            if plan.train_outside_spans:
                labels[start - 1 : stop - 1] = [IGNORE_INDEX] * (stop - start)
                trained -= stop - start
            else:
                labels[start - 1 : stop - 1] = ids[start:stop]
                trained += stop - start
        if not trained:
            return [
                Problem(
                    "no_trained_tokens",
                    "the template rendered no tokens to train on for this row; "
                    "check that the assistant replies have content.",
                    field="messages",
                )
            ]
        return Example(ids, labels)

    def _document_example(self, ids: list[int]) -> Example:
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = ids + [self.eos_id]  # so the model learns where a document ends
        return Example(ids, ids[1:] + [IGNORE_INDEX])

    def _accepted_probe(self) -> list[dict] | None:
        """The first probe conversation the template renders (Gemma 2 refuses a system message)."""
        for probe in _PROBES:
            try:
                self.tokenizer.apply_chat_template(probe, chat_template=self.template, tokenize=False)
            except _TEMPLATE_FAILURES:
                continue
            return probe
        return None

    def unwritten(self, record: Record) -> list[Problem]:
        """Warnings for what a row holds that the template leaves out of its rendering (SmolLM2's
        ChatML writes only roles and contents): its tool definitions, its messages' names."""
        if isinstance(record, Document):
            return []
        messages = (
            record.messages if isinstance(record, Conversation) else [*record.prompt, record.chosen, record.rejected]
        )
        problems = []
        if record.tools and not self.writes_tools:
            problems.append(
                Problem(
                    "tools_not_rendered",
                    "the chat template does not write tool definitions: the row's 'tools' are left out and the "
                    "model learns its replies without seeing them. Use a model whose chat template supports "
                    "tools, or remove 'tools' from these rows.",
                    severity="warning",
                )
            )
        beside_calls = next(
            (i for i, m in enumerate(messages) if m.tool_calls and isinstance(m.content, str) and m.content.strip()),
            None,
        )
        if beside_calls is not None and not self.writes_content_with_calls:
            where = record.row_field(f"messages[{beside_calls}].content") if isinstance(record, Conversation) else None
            problems.append(
                Problem(
                    "content_beside_calls_not_rendered",
                    "the chat template writes a reply's tool calls alone (Llama 3.1's and Mistral's do): the "
                    f"content beside them ({messages[beside_calls].content[:60]!r}) is left out, so the model "
                    "learns to call without it. Use a model whose chat template writes both (Qwen 2.5 and 3), "
                    "or leave the content out of replies that call tools.",
                    field=where,
                    severity="warning",
                )
            )
        if any(m.name for m in messages) and not self.writes_names:
            problems.append(
                Problem(
                    "names_not_rendered",
                    "the chat template does not write message names: the row's 'name' fields are left out, so "
                    "the model does not see who speaks. Use a model whose chat template writes names, or "
                    "remove 'name' from these rows.",
                    severity="warning",
                )
            )
        return problems

    def _writes_content_with_calls(self) -> bool:
        """Whether the template writes a reply's content beside its tool calls; True where it writes no
        calls at all (`tool_calls_not_rendered` says so of each such reply) or the probe does not render."""
        if self._probe_messages is None:
            return True
        prompt = self._probe_messages[:-1]
        reply = {"role": "assistant", "content": _PROBE_CONTENT, "tool_calls": [_PROBE_CALL]}
        try:
            before, text = self._apply_template([prompt, [*prompt, reply]], [_PROBE_TOOL], False)
        except _TEMPLATE_FAILURES:
            return True
        written = text.removeprefix(before)  # the reply as written (the tools' definitions are before it)
        return _PROBE_CONTENT in written or _PROBE_CALL["function"]["name"] not in written

    def _writes(self, tools: list[dict] | None, name: str | None, mark: str, *, reasoning: str | None = None) -> bool:
        """Whether the template writes `mark` into the probe conversation rendered with `tools`, its
        user messages named `name` and its last reply's reasoning_content `reasoning`."""
        if self._probe_messages is None:
            return False
        messages = [{**m, "name": name} if name and m["role"] == "user" else m for m in self._probe_messages]
        if reasoning:
            messages[-1] = {**messages[-1], "reasoning_content": reasoning}
        try:
            return mark in self._apply_template([messages], tools, False)[0]
        except _TEMPLATE_FAILURES:
            return False

    def _probe(self) -> int | None:
        """Check on a probe that the tokenizer cuts text as assumed; return the end-of-turn token.

        The end-of-turn token is the first added token after an assistant reply (ChatML: <|im_end|>),
        or EOS where the template has none.
        """
        probe = self._probe_messages
        if probe is None:
            return self.eos_id
        first_reply = next(i for i, m in enumerate(probe) if m["role"] == "assistant")
        try:
            whole = self._apply_template([probe], None, False)[0]
            prompt = self._apply_template([probe[:first_reply]], None, True)[0]
        except _TEMPLATE_FAILURES:
            return self.eos_id
        if self._tokenize_later([whole])() is None:
            return self._probe()
        turn = whole[len(prompt) :] if whole.startswith(prompt) else ""
        added = self.tokenizer.added_tokens_decoder
        return next((t for t in self._encode_whole([turn])[0] if t in added), self.eos_id)


_CHATML_PROBES = [
    _PROBE,
    [
        {"role": "user", "content": " leading and trailing spaces \n{{ not jinja }} "},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42"},
        {"role": "user", "content": "\n"},
    ],
    [{"role": "system", "content": ""}],
    [],
]


def _chatml_shortcut(jinja_render: Callable) -> Callable | None:
    """For a ChatML template, a renderer in plain string operations; None for any other template.

    Jinja spends most of a short chat's rendering time in its sandbox's attribute checks. A ChatML
    template (SmolLM2's among them) writes each message as `<|im_start|>role\ncontent<|im_end|>\n`,
    perhaps after a default system turn when the conversation has none, so we learn that default
    from the template and use the shortcut only once it renders every probe exactly as the template
    does. Messages with more than a role and a content (tool calls, names) and tool schemas still go
    through the template.
    """
    try:
        alone = jinja_render([{"role": "user", "content": "x"}], None, False)
    except _TEMPLATE_FAILURES:
        return None
    default_system = alone[: alone.find("<|im_start|>user\n")] if "<|im_start|>user\n" in alone else None
    if default_system is None:
        return None

    def chatml(messages: list[dict], generation_prompt: bool) -> str:
        parts = [default_system] if messages and messages[0]["role"] != "system" else []
        parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    try:
        if any(chatml(probe, g) != jinja_render(probe, None, g) for probe in _CHATML_PROBES for g in (False, True)):
            return None
    except _TEMPLATE_FAILURES:
        return None

    def render(messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
        # Role and text content only: content parts (an image beside text) go through the template itself.
        if tools is None and all(len(m) == 2 and isinstance(m["content"], str) for m in messages):
            return chatml(messages, generation_prompt)
        return jinja_render(messages, tools, generation_prompt)

    return render


def _any_of(strings, *, keep: bool = False) -> re.Pattern | None:
    """A pattern for any of `strings`, longest first (as tokenizers match added tokens); with `keep`,
    one group, so that re.split keeps the matches among the pieces."""
    if not strings:
        return None
    pattern = "|".join(map(re.escape, sorted(strings, key=len, reverse=True)))
    return re.compile(f"({pattern})" if keep else pattern)


def _assemble(pieces: list[str], piece_ids: dict[str, list[int]]) -> _Tokens:
    parts = [piece_ids[piece] for piece in pieces]
    ids = list(chain.from_iterable(parts))
    return _Tokens(ids, [0, *accumulate(map(len, pieces))][:-1], [0, *accumulate(map(len, parts))][:-1])


def _span_messages(messages: list[Message], train_on: str) -> list[int]:
    """The assistant messages whose spans matter: trained ones, or for train_on "all" the untrained."""
    replies = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if train_on == "all":
        return [i for i in replies if messages[i].weight == 0]
    candidates = replies[-1:] if train_on == "last_assistant" else replies
    return [i for i in candidates if messages[i].weight != 0]


def template_line(error: BaseException) -> int | None:
    """The chat template's line that `error` was raised at (where it does not compile, or the last of its
    lines rendering went through), or None when the error did not come from the template's text. Rendering
    through jinja's `render` leaves frames named <template> at the template's lines; rendering the compiled
    code directly (`ChatRenderer`'s direct renderer) leaves the code's own frames, mapped back as jinja does."""
    if isinstance(error, TemplateSyntaxError):
        return error.lineno
    line, frame = None, error.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        template = frame.tb_frame.f_globals.get("__jinja_template__")
        if code in internal_code:  # jinja's own helpers (a filter it has not raises from one): no template line
            pass
        elif template is not None:
            line = template.get_corresponding_lineno(frame.tb_lineno)
        elif code.co_filename == "<template>":
            line = frame.tb_lineno
        frame = frame.tb_next
    return line


def _refusal(error: Exception) -> str:
    """Where and why the template refused a conversation: " at its line N: what it raised" (no closing period)."""
    line = template_line(error)
    return f"{f' at its line {line}' if line else ''}: {str(error).rstrip('.')}"


def _template_error(error: Exception) -> Problem:
    return Problem(
        "template_error",
        f"the chat template refused this conversation{_refusal(error)}. Fix the "
        "conversation to suit the model's template (for example, alternate user and assistant).",
        field="messages",
    )


def _system_refused(error: Exception, message_index: int) -> Problem:
    return Problem(
        "template_error",
        f"the chat template has no system turn and refused this conversation's system message{_refusal(error)}. "
        "Fold the system prompt into the first user message, or remove it.",
        field=f"messages[{message_index}]",
    )


def template_texts(value, path: str, *, brackets: bool = True) -> Iterator[tuple[str, str]]:
    """(field, text) for every string of `value` a chat template may write: contents, names, tool calls'
    names and arguments, reasoning, tool definitions; a mapping's keys too (`tojson` writes them). List
    items are named `field[i]` as in data files' errors, or `field.i` (`brackets=False`) as pydantic names a
    request body's fields."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield path, str(key)
            yield from template_texts(item, f"{path}.{key}", brackets=brackets)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from template_texts(item, f"{path}[{index}]" if brackets else f"{path}.{index}", brackets=brackets)


def _special_token_trained(field: str, token: str) -> Problem:
    return Problem(
        "special_token_in_content",
        f"the trained text contains the special token {token!r}, which the tokenizer reads as that one control "
        "token, so the model would learn to write it where the text is meant: decoding drops it from answers, "
        "and a stop token there ends them early. Remove it or write it differently.",
        field=field,
    )


def _one_or_turns(results: list[Example | list[Problem]]) -> Rendered:
    problems = [p for r in results if isinstance(r, list) for p in r]
    if problems:
        return problems
    return results[0] if len(results) == 1 else tuple(results)


def _on_side(result: Example | list[Problem], side: str, named: bool) -> list[Problem]:
    """A side's problems: each at the row's field where rendering `named` it so (`Conversation.row_field`), by
    its side where it names the side's messages (all of them, as a template's refusal does) or no field."""
    if isinstance(result, Example):
        return []
    return [
        p
        if named and p.field and not re.match(r"messages\b", p.field)
        else replace(p, field=f"{side} {p.field}" if p.field else side)
        for p in result
    ]


def _in_row(
    found: tuple[_Plan, ...] | Example | list[Problem], conversation: Conversation
) -> tuple[_Plan, ...] | Example | list[Problem]:
    """Problems found in a conversation's messages, each at the row's field that holds what it names; a plan or
    an example as it is."""
    if not isinstance(found, list):
        return found
    return [replace(p, field=conversation.row_field(p.field)) for p in found]


def _no_trained_tokens(messages: list[Message], train_on: str) -> Problem:
    replies = [m for m in messages if m.role == "assistant"]
    if not replies:
        why, what = "it has no assistant message", "Add the assistant reply to learn"
    elif train_on == "last_assistant" and replies[-1].weight == 0:
        why, what = "train_on is last_assistant and the last assistant message has weight 0", "Set weight 1 on a reply"
    else:
        why, what = "every assistant message has weight 0", "Set weight 1 on a reply"
    return Problem(
        "no_trained_tokens",
        f"nothing in this row is trained: {why}. {what}, or remove the row.",
        field="messages",
    )


def _context_changes(message_index: int, prompt: str, turn: str) -> Problem:
    """Reply `message_index` has no exact place: what comes before it changes once it is added."""
    at = next((i for i, (a, b) in enumerate(zip(prompt, turn)) if a != b), min(len(prompt), len(turn)))
    return Problem(
        "template_not_prefix",
        f"the chat template writes the conversation before message {message_index} (an assistant reply) one way "
        f"when asked for that reply and another way once the reply follows, so the reply cannot be trained in "
        f"the context the model sees: they differ at character {at}: {prompt[max(0, at - 30) : at + 30]!r} "
        f"(asked for the reply) vs {turn[max(0, at - 30) : at + 30]!r} (with the reply). Some templates write "
        "the system prompt only where the conversation ends with a user message (Mistral's): fold the system "
        "prompt into the first user message, or use a template that keeps earlier turns as they are.",
        field=f"messages[{message_index}]",
    )


def _reply_after_reply(message_index: int, prompt: str, turn: str) -> Problem:
    """Reply `message_index` follows another reply, which the template writes one way as the last message
    and another once this reply follows (Qwen 3 writes an empty reasoning block only into the last reply)."""
    at = next((i for i, (a, b) in enumerate(zip(prompt, turn)) if a != b), min(len(prompt), len(turn)))
    return Problem(
        "reply_after_reply",
        f"this assistant reply follows another assistant reply, and the chat template writes that earlier reply "
        f"differently once this one follows it, so this reply cannot be trained in the context the model sees "
        f"(at character {at}: {prompt[max(0, at - 30) : at + 30]!r} vs {turn[max(0, at - 30) : at + 30]!r}). "
        "Join the two replies into one message, or put the user message they answer between them.",
        field=f"messages[{message_index}]",
    )


def _reply_joins_prompt(message_index: int, text: str, reply_start: int) -> Problem:
    """Reply `message_index` starts with whitespace that the tokenizer joins to the template's text before
    it: a problem of this row's text, not of the template (other rows train)."""
    return Problem(
        "reply_joins_prompt",
        f"the reply starts with whitespace that the tokenizer joins to the end of the prompt before it "
        f"({text[max(0, reply_start - 20) : reply_start + 20]!r}), so no token boundary marks where the reply "
        "starts, and the model would never see this prompt tokenized as it is when it answers. Remove the "
        "whitespace at the start of the reply.",
        field=f"messages[{message_index}].content",
    )


def _tool_calls_not_rendered(message_index: int, reply: str) -> Problem:
    return Problem(
        "tool_calls_not_rendered",
        f"the chat template does not write this reply's tool calls (it renders the reply as {reply!r}), so the "
        "model would learn to answer with that instead of calling the tool. Use a model whose chat template "
        "supports tool calls, or leave such rows out.",
        field=f"messages[{message_index}].tool_calls",
    )


def _reasoning_not_rendered(message_index: int, reply: str) -> Problem:
    return Problem(
        "reasoning_not_rendered",
        f"the chat template does not write this reply's reasoning (it renders the reply as {reply!r}), so the "
        "reasoning would not be trained. Use a model whose chat template writes reasoning_content (Qwen 3's), "
        "or write the reasoning into the content the way the model is to produce it (e.g. "
        "'<think>\\n...\\n</think>\\n\\n' before the answer).",
        field=f"messages[{message_index}].reasoning_content",
    )


def _not_prefix(message_index: int, whole: str, prefix: str, *, tokens_differ: bool = False) -> Problem:
    at = next((i for i, (a, b) in enumerate(zip(whole, prefix)) if a != b), min(len(whole), len(prefix)))
    how = (
        "tokenizes differently on its own than as part of the whole conversation"
        if tokens_differ
        else f"is not the start of the whole rendering (they differ at character {at}: "
        f"{prefix[max(0, at - 30) : at + 30]!r} vs {whole[max(0, at - 30) : at + 30]!r})"
    )
    return Problem(
        "template_not_prefix",
        f"the chat template renders the conversation up to message {message_index} in a way that {how}, so the "
        "trained tokens cannot be located safely. Use a template whose renderings of a conversation's beginnings "
        "are prefixes of the whole (e.g. one that does not rewrite earlier turns), or train_on: last_assistant.",
        field=f"messages[{message_index}]",
    )


_renderers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def renderer_for(tokenizer) -> ChatRenderer:
    """One renderer per tokenizer, reused (it has checked the template and tokenizer once)."""
    renderer = _renderers.get(tokenizer)
    if renderer is None or renderer.source_template != chat_template(tokenizer):  # a new template: check it anew
        renderer = _renderers[tokenizer] = ChatRenderer(tokenizer)
    return renderer


def check_template(tokenizer, where: str) -> None:
    """Refuse, before any data is read, a chat template chosen for a run (model.chat_template, which `where`
    names) that training or generation cannot use: one that does not compile or raises on a plain
    conversation (naming the template's line), one that leaves an assistant turn's opening out of
    add_generation_prompt (chat, serve and eval could not prompt a reply), one whose generation prompt ends
    in a space the tokenizer joins to a reply's first word, one whose assistant turns
    end with no token of the vocabulary (the model could not learn to stop, nor generation stop
    there), and one whose replies' spans cannot be found in its renderings."""

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    failure = None
    for probe in _PROBES:
        first_reply = next(i for i, m in enumerate(probe) if m["role"] == "assistant")
        try:
            prompt, without = render(probe[:first_reply], True), render(probe[:first_reply], False)
            replied = render(probe[: first_reply + 1], False)
        except (*_TEMPLATE_FAILURES, AttributeError, KeyError, IndexError) as err:
            failure = failure or err
            continue
        break
    else:
        line = template_line(failure)
        how = "does not compile" if isinstance(failure, TemplateSyntaxError) else "fails"
        raise ConfigError(
            f"{where}: the chat template {how}{f' at its line {line}' if line else ''} on a plain conversation (a "
            f"user message and an assistant reply): {type(failure).__name__}: {failure}. Fix the template there."
        )
    reply = probe[first_reply]["content"]
    turn = replied[len(prompt) :] if replied.startswith(prompt) else ""
    # What the template writes between the prompt and a reply's content: Mistral's reply follows [/INST]
    # as it is, but an assistant turn's opening (a role, a marker token) left out of the generation prompt
    # would be trained as the reply's and never be given to the model at inference.
    opening = turn[: turn.find(reply)] if reply in turn else ""
    markers = [t for t in tokenizer.get_added_vocab() if t in opening] + (
        ["assistant"] if "assistant" in opening else []
    )
    if prompt == without and markers:
        raise ConfigError(
            f"{where}: the chat template writes nothing for add_generation_prompt, but opens an assistant turn "
            f"with {opening!r}, so chat, serve and evaluation could not prompt the model for a reply. End it with "
            "{% if add_generation_prompt %}, that opening, {% endif %}."
        )
    renderer = renderer_for(tokenizer)
    # A generation prompt ending in a space ("[assistant] ") leaves the space a token of its own, where a reply
    # tokenizes it with the reply's first word (byte-level BPE's " Paris"): no reply starting with such a word
    # could be trained as the model is prompted.
    if prompt.endswith((" ", "\t")):
        prompt_ids, *followed = renderer._encode_whole([prompt, *(prompt + word for word in _REPLY_STARTS)])
        if any(ids[: len(prompt_ids)] != prompt_ids for ids in followed):
            raise ConfigError(
                f"{where}: the chat template's generation prompt ends in a space "
                f"({(prompt[len(without) :] if prompt.startswith(without) else '') or prompt[-30:]!r}), which the "
                f"tokenizer of {tokenizer.name_or_path or 'the model'} joins to the first word of a reply, so rows "
                "would be refused (template_not_prefix) and the model would be prompted with a space it never "
                "trained after. End the generation prompt without the trailing space (the reply's first token "
                "then holds it), or end the role with a newline instead, in the generation prompt and the turns alike."
            )
    ids = renderer._encode_whole([turn])[0] if turn else []
    if turn and not renderer.end_ids.intersection(ids):
        ending = turn[turn.find(reply) + len(reply) :] if reply in turn else turn
        raise ConfigError(
            f"{where}: the chat template ends an assistant turn with {ending[:40]!r}, which holds no single token of "
            f"the vocabulary of {tokenizer.name_or_path or 'the model'}, so the model could not learn to stop nor "
            "generation stop there. Add the token that ends a turn with model.add_tokens (as <|im_end|> for "
            "ChatML), or end each assistant turn with {{ eos_token }}."
        )
    try:
        # Without a system message: how a template places one (Mistral's, into the last user message) is a
        # matter of the rows that have one, each refused with its reason.
        render_examples([m for m in probe if m["role"] != "system"], tokenizer)
    except DataError as err:
        raise ConfigError(
            f"{where}: the chat template's replies cannot be found in its renderings of a plain conversation, so no "
            f"loss mask could be made: {err}"
        ) from None


def _raise_problems(problems: list[Problem]) -> None:
    raise DataError("\n".join(str(p) for p in problems), code=problems[0].code, problems=problems)


def render_examples(
    conversation: Conversation | Document | list[dict], tokenizer, train_on: str = "assistant"
) -> list[Example]:
    """Render one conversation (or a list of OpenAI-style message dicts, or a Document) as the examples
    it trains as: one, or one per turn where the template rewrites earlier turns (see the module doc).

    Raises DataError if the conversation is malformed or nothing in it is trained.
    """
    if isinstance(conversation, list):
        from .formats import normalise_messages

        messages, problems = normalise_messages(conversation)
        if problems:
            _raise_problems(problems)
        conversation = Conversation(messages)
    (result,) = renderer_for(tokenizer).render([conversation], train_on)
    if isinstance(result, list):
        _raise_problems(result)
    return list(result) if isinstance(result, tuple) else [result]


def render_conversation(
    conversation: Conversation | Document | list[dict], tokenizer, train_on: str = "assistant"
) -> Example:
    """`render_examples` for a conversation that renders as one example; a DataError names the
    conversation that trains turn by turn instead."""
    examples = render_examples(conversation, tokenizer, train_on)
    if len(examples) > 1:
        raise DataError(
            f"the chat template rewrites earlier assistant turns once later ones follow (Qwen 3 drops past "
            f"reasoning), so this conversation trains as {len(examples)} examples, one per turn, where one "
            "example is needed here: give each row a single assistant reply, or set train_on: last_assistant.",
            code="rendered_turn_by_turn",
        )
    return examples[0]


def render_preference(preference: Preference, tokenizer) -> tuple[Example, Example]:
    """(chosen, rejected) Examples: shared prompt tokens, each training only its own reply."""
    (result,) = renderer_for(tokenizer).render_preferences([preference])
    if isinstance(result, list):
        _raise_problems(result)
    return result
