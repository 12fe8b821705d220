"""Text generation, shared by `eval`, `chat` and `serve`.

    from tuneforge.generate import generate, stream
    [done] = generate(model, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=40)
    done.text, done.prompt_tokens, done.completion_tokens, done.finish_reason   # "stop" | "length"
    for piece in (s := stream(model, tokenizer, messages)):
        print(piece, end="")
    s.completion                                                                # once exhausted

A prompt is a list of chat messages, rendered with the tokenizer's chat template and its
generation prompt, or a plain string (completion style), encoded as a training document is: the
tokenizer's BOS, if it adds one, then the text. For a model that reads images, each image marker the
template writes is expanded into the image's tokens as training expands it, and `Batch.add` takes the
image files a prompt shows: its prefill passes their `pixel_values` (the image then sits in the KV
cache, so decoding steps need nothing more).

The decoding loop is our own rather than `model.generate`, for three reasons: streaming is a
plain iterator (no thread feeding a queue); every row knows why it finished ("stop" at an
end-of-turn token or a stop string, "length" at max_new_tokens), with its text cut exactly before
the stop string; and rows leave the batch as they finish, so a long rambling answer does not make
the short ones pay for it. Underneath it is the usual recipe: left padding, position ids counted
from each row's first real token, a KV cache, logits for the last position only; and a prefix that
all prompts of a batch share (an evaluation set's system prompt) is run once.

`Batch` is that loop opened up for `serve`: rows, each with its own sampling options, join a
running batch between steps as well as leave it (continuous batching).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import math
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from numbers import Integral, Real

import torch

from .models.architecture import model_context_length

Messages = list[dict]
TokenIds = tuple[int, ...]
Prompt = Messages | str | TokenIds
"""Chat messages (rendered through the chat template), text (after the tokenizer's BOS), or the token ids of a prompt
already rendered and tokenized (a tuple, used as they are)."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model's raw distribution: the log-softmax of its logits,
    before temperature, top_p, penalties or a constraint change them (vLLM's default "raw logprobs").

    `token` is the token's text as it decodes in the reply, and `bytes` its UTF-8 bytes; a token holding part of a
    multi-byte character has its own raw bytes, written as `\\xNN` escapes in `token` (as OpenAI's API gives
    them), so the tokens' bytes joined are the reply's. `offset` is where its text starts in the reply (in
    characters); `top` are the most likely tokens at that step, most likely first (`top` of each is empty)."""

    token: str
    bytes: bytes
    logprob: float
    offset: int = 0
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # every token generated, the end-of-turn token that stopped it included
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_new_tokens reached)
    token_ids: tuple[int, ...] = ()  # the generated tokens, as counted in completion_tokens
    # Each token's log probability where `Sampling.logprobs` asked for them (the end-of-turn token's is left out,
    # as it is not in the text); None where it did not.
    logprobs: tuple[TokenLogprob, ...] | None = None
    # Where `Sampling.prompt_logprobs` asked: each prompt token's, the first one's None (nothing precedes it), their
    # texts and offsets in the prompt's text as it decodes.
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    cached_tokens: int = 0  # leading prompt tokens whose keys and values came from a `PrefixCache`, not run again


MAX_SEED = 2**63 - 1  # torch's generator takes a 64-bit seed
MAX_TOP_LOGPROBS = 20  # the most likely tokens a generated token's log probability comes with, at most (OpenAI's)


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. temperature 0 is greedy (argmax); the seed makes sampling repeatable."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Special tokens that stay in the text, which decoding otherwise drops: a tool-call parser's markers
    # (Llama 3.1's <|python_tag|>, Mistral's [TOOL_CALLS]), which tell where the calls start.
    keep_tokens: tuple[str, ...] = ()
    # Structured output: an outlines-core Index (`constrain.json_index`) the reply follows token by token, then
    # ends with the end of the turn; None: unconstrained.
    constraint: object | None = None
    # OpenAI's penalties against repetition, in [-2, 2]: before a token is picked, each token's logit goes down by
    # frequency_penalty times the times the reply has it so far, and by presence_penalty once if it has it at all
    # (the reply's own tokens, not the prompt's). Negative values encourage repetition.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Each generated token's log probability (`TokenLogprob`) and those of this many most likely tokens beside it
    # (0 to MAX_TOP_LOGPROBS); None: none, and no log-softmax over the vocabulary is computed for the row.
    logprobs: int | None = None
    # The prompt's tokens' log probabilities too (OpenAI's completions `echo`), with `logprobs` most likely tokens
    # each, from the prefill's logits; with them the end-of-turn token that stops the reply gets its entry (text
    # empty), so the entries after the prompt's are one per generated token.
    prompt_logprobs: bool = False

    def __post_init__(self):
        # The types first: a Python caller's str or None would fail the comparisons below with a TypeError, and a
        # float or bool token count would be taken as a count.
        for name, kind, wanted in (
            ("max_new_tokens", Integral, "a whole number"),
            ("temperature", Real, "a number"),
            ("top_p", Real, "a number"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, Integral) or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED} (2**63 - 1) or None, got {self.seed!r}")
        if self.max_new_tokens < 0:  # 0: nothing is generated, the prompt is run (and scored) alone
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}")
        if self.prompt_logprobs and self.logprobs is None:
            raise ValueError("prompt_logprobs needs logprobs (how many most likely tokens come with each)")
        if not 0 <= self.temperature < math.inf:  # nan too
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop must be strings, none of them empty, got {stop!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    def generator(self, device) -> torch.Generator | None:
        """A seeded random stream for sampling; None for greedy decoding or no seed (torch's global one)."""
        if self.temperature == 0 or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))  # a NumPy integer too


def inference_device() -> torch.device:
    """Where chat and serve put the model: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(precision: str = "fp32") -> torch.dtype:
    """The dtype to hold weights in for generation on `inference_device()`.

    `fp32` decodes exactly as transformers does in fp32 (the library's default, and eval's). `auto`
    is bf16 where the device computes it natively, else fp32: at batch 1 a decoding step reads every
    weight once, so halving their bytes nearly doubles tokens/s on a CPU (BENCHMARKS.md, "Serving");
    greedy answers may then differ from fp32 ones. `tuneforge serve` and `tuneforge chat` use `auto`.
    """
    from .models import compute_dtype, resolve_precision

    return compute_dtype(resolve_precision(precision, inference_device()))


def load_for_inference(source, command: str, precision: str = "fp32", rope_scaling: dict | None = None):
    """`source`'s model (a `ModelSource`, with its adapter if it has one) on `inference_device()` in
    `inference_dtype(precision)`, in eval mode, its linear weights packed for decoding where that pays
    (`pack_linear_weights`): what `chat` and `serve` generate with. `command`: see `load_text_model`;
    `rope_scaling`: see `load_model`."""
    from .models import load_text_model

    model = load_text_model(source, command, dtype=inference_dtype(precision), rope_scaling=rope_scaling)
    model = model.to(inference_device()).eval()
    pack_linear_weights(model)
    return model


class PackedLinear(torch.nn.Linear):
    """A frozen linear layer whose weight oneDNN holds pre-packed in its blocked layout (packed once,
    in place of the plain weight, so no second copy). A decoding step then skips the reorder that
    oneDNN otherwise does to each weight at every call; the products are oneDNN's, as before.
    `weight` still reads as a plain tensor (a copy), for what reads it outside the forward pass:
    PEFT when an adapter loads, DoRA's weight norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    @property
    def weight(self) -> torch.Tensor:
        return self.packed_weight.to_dense()


def pack_linear_weights(model) -> int:
    """Turn `model`'s plain linear layers into `PackedLinear`s when it decodes in bf16 on a CPU with
    oneDNN (SmolLM2 at batch 1: about 1.3x the tokens/s, the same greedy answers; docs/LOG.md); returns
    how many. An output layer tied to the embeddings gets a packed copy (the embeddings keep the plain
    weight for their lookups): one more vocabulary x hidden matrix in memory, for the largest product of
    a decoding step. Adapters' own layers (PEFT's `lora_*`) are left alone: they come and go with the
    adapters a server loads."""
    embeddings = model.get_input_embeddings().weight
    on_onednn = embeddings.device.type == "cpu" and torch.backends.mkldnn.is_available()
    if not on_onednn or embeddings.dtype != torch.bfloat16:
        return 0
    packed = 0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or ".lora_" in name:
            continue
        weight = module.weight.detach()
        del module.weight  # a tied weight stays the embeddings'
        module.__class__ = PackedLinear
        module.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False)
        packed += 1
    return packed


def render_prompt(
    tokenizer,
    prompt: Messages | str,
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
    images: Sequence[bytes] = (),
) -> str:
    """The text the model continues: chat messages (and the tools they may call) through the chat template
    (given `template_kwargs`, such as Qwen 3's enable_thinking), a string as it is. `images`: the image files
    the messages show, in order, whose sizes set how many tokens each becomes (Qwen2-VL)."""
    if isinstance(prompt, str):
        return prompt
    from .models.loading import image_inputs

    text = tokenizer.apply_chat_template(
        prompt, tools=tools, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    # A model that reads images: each image marker becomes the image's tokens, as in training (data.render).
    image_side = image_inputs(tokenizer)
    return image_side.expand(text, images) if image_side is not None else text


def encode_prompts(
    tokenizer,
    prompts: Sequence[Prompt],
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
    images: Sequence[bytes] = (),
) -> list[list[int]]:
    """Each prompt's token ids: messages rendered through the template (with `tools` and `template_kwargs`,
    if given), text with the tokenizer's special tokens (its BOS, as a document is encoded for training and as
    vLLM's completions encode a prompt), token ids as they are. `images`: those of a single chat prompt."""
    if images and len(prompts) != 1:
        raise ValueError(f"images are given for one prompt, and there are {len(prompts)}")
    # The template writes any BOS token itself; adding special tokens to its text would double it.
    chats = {
        i: render_prompt(tokenizer, p, tools, template_kwargs, images)
        for i, p in enumerate(prompts)
        if isinstance(p, list)
    }
    texts = {i: p for i, p in enumerate(prompts) if isinstance(p, str)}
    by_index = {i: list(p) for i, p in enumerate(prompts) if isinstance(p, tuple)}
    for encoded, add_special_tokens in ((chats, False), (texts, True)):
        if encoded:
            ids = tokenizer(list(encoded.values()), add_special_tokens=add_special_tokens)["input_ids"]
            by_index.update(zip(encoded, ids))
    return [by_index[i] for i in range(len(prompts))]


def encode_each(
    tokenizer,
    prompts: Sequence[Prompt],
    tools: Sequence[list[dict] | None] | None = None,
    images: Sequence[Sequence[bytes]] | None = None,
) -> list[list[int]]:
    """Each prompt's token ids as `encode_prompts` gives a request's (the server's), with the prompt's own
    `tools` and `images` (one entry a prompt, if given): prompts that share their tools and show no images
    are encoded together."""
    tools = list(tools) if tools is not None else [None] * len(prompts)
    images = list(images) if images is not None else [()] * len(prompts)
    if len(tools) != len(prompts) or len(images) != len(prompts):
        raise ValueError(f"tools for {len(tools)} and images for {len(images)} of {len(prompts)} prompts")
    ids: list[list[int] | None] = [None] * len(prompts)
    shared: dict[str, list[int]] = {}
    for i, (prompt, shown) in enumerate(zip(prompts, images)):
        if shown:  # Qwen2-VL's image tokens count by each image's size: the prompt is encoded with them
            ids[i] = encode_prompts(tokenizer, [prompt], tools[i], images=shown)[0]
        else:
            shared.setdefault(json.dumps(tools[i]), []).append(i)
    for members in shared.values():
        encoded = encode_prompts(tokenizer, [prompts[i] for i in members], tools[members[0]])
        for i, prompt_ids in zip(members, encoded):
            ids[i] = prompt_ids
    return ids


def stop_token_ids(model, tokenizer) -> frozenset[int]:
    """Token ids that end a reply (`reply_end_ids` of the model's generation config)."""
    return frozenset(reply_end_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer))


def reply_end_ids(config_eos_ids: int | list[int] | None, tokenizer) -> list[int]:
    """Token ids that end a reply, in this order: a generation config's EOS ids, the token that closes an
    assistant turn in the chat template (which some configs do not list), and the tokenizer's EOS."""
    from tuneforge.data.render import renderer_for

    if config_eos_ids is None:
        config_eos_ids = []
    elif isinstance(config_eos_ids, int):
        config_eos_ids = [config_eos_ids]
    renderer = renderer_for(tokenizer)
    ids = [*config_eos_ids, renderer.end_of_turn_id, *sorted(renderer.end_ids), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


MIN_SHARED_PREFIX = 16
"""A prompt prefix that every row of a prefill shares is run once from this many tokens on."""

SCORED_LOGITS = 2**25
"""The most logits (positions x vocabulary; 128 MB in fp32) a prefill that scores its prompts' tokens holds at once:
its positions run in chunks of that many (`Batch._prefill_scoring`)."""

BATCH_SIZE = 64
"""Rows decoded together. On a CPU a small model's decoding step is far from compute-bound at 16
rows, so 64 rows decode nearly twice the tokens a second (docs/LOG.md, "Generation")."""


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    batch_size: int = BATCH_SIZE,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | Sequence[int] | None = None,
    stop: Sequence[str] = (),
    on_progress: Callable[[int], None] | None = None,
    images: Sequence[Sequence[bytes]] | None = None,
    tools: Sequence[list[dict] | None] | None = None,
) -> list[Completion]:
    """One completion per prompt, in the order given.

    Prompts are batched by length (less padding); with greedy decoding in fp32 a prompt's completion
    does not depend on the batch it lands in (in bf16 the kernels round differently at different batch
    shapes, so a near-tie may go the other way). An int `seed` is one random stream for all prompts; a
    sequence of seeds, one a prompt, gives each its own, so that a sampled completion in fp32 depends on
    its prompt and seed alone, not on the other prompts or the batch it lands in.
    `on_progress(n)` is called as each batch of n finishes. `images`, one sequence a prompt: the image files
    (PNG, JPEG, ...) each prompt's image parts show, in order, for a model that reads images. `tools`, one a
    prompt (None where it has none): the tools its chat prompt is rendered with, as the server renders a
    request's.
    """
    if max_new_tokens < 1:  # a completion of nothing: `Batch` takes 0 only to score prompts
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    seeds = None if seed is None or isinstance(seed, Integral) else list(seed)
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed a prompt")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images for {len(images)} prompts, and there are {len(prompts)}; give them per prompt")
    images = [tuple(shown) for shown in images] if images is not None else [()] * len(prompts)
    sampling = Sampling(max_new_tokens, temperature, top_p, None if seeds is not None else seed, tuple(stop))
    ids = encode_each(tokenizer, prompts, tools, images)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    if seeds is None:
        generators = [sampling.generator(model.device)] * len(ids)  # one random stream for all batches
    else:
        generators = [replace(sampling, seed=s).generator(model.device) for s in seeds]
    results: list[Completion | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        decoding = _Decoding(
            model,
            tokenizer,
            [ids[i] for i in chunk],
            sampling,
            [generators[i] for i in chunk],
            [images[i] for i in chunk],
        )
        for _ in decoding:
            pass
        for i, completion in zip(chunk, decoding.completions()):
            results[i] = completion
        if on_progress is not None:
            on_progress(len(chunk))
    return results


class Stream:
    """Text pieces of one completion as they are generated; `completion` is set once exhausted.

    Text is held back while it could still be the start of a stop string, or ends in half of a
    multi-byte character, so the pieces joined always equal `completion.text`.
    """

    def __init__(self, decoding: _Decoding):
        self._decoding = decoding
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for pieces in self._decoding:
            if pieces[0]:
                yield pieces[0]
        self.completion = self._decoding.completions()[0]


def stream(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    images: Sequence[bytes] = (),
    keep_tokens: Sequence[str] = (),
) -> Stream:
    """The completion of one prompt, streamed; `images`: the image files its image parts show, in order;
    `keep_tokens`: special tokens kept in the text (`Sampling.keep_tokens`)."""
    sampling = Sampling(max_new_tokens, temperature, top_p, seed, tuple(stop), tuple(keep_tokens))
    generators = [sampling.generator(model.device)]
    return Stream(
        _Decoding(
            model, tokenizer, encode_prompts(tokenizer, [prompt], images=images), sampling, generators, [tuple(images)]
        )
    )


def kept_token_ids(tokenizer, keep_tokens: Sequence[str]) -> dict[int, str]:
    """The ids of the special tokens in `keep_tokens` (those the tokenizer has), with their text."""
    if not keep_tokens:
        return {}
    added = tokenizer.added_tokens_encoder
    return {added[t]: t for t in keep_tokens if t in added}


def decode(tokenizer, tokens: list[int], keep: dict[int, str]) -> str:
    """The text of `tokens` without special tokens, but for those in `keep` (`kept_token_ids`), which stay
    as written."""
    cuts = [at for at, token in enumerate(tokens) if token in keep]
    if not cuts:
        return tokenizer.decode(tokens, skip_special_tokens=True)
    parts, start = [], 0
    for at in cuts:
        parts += [tokenizer.decode(tokens[start:at], skip_special_tokens=True), keep[tokens[at]]]
        start = at + 1
    return "".join([*parts, tokenizer.decode(tokens[start:], skip_special_tokens=True)])


class Row:
    """One prompt's completion as it is decoded: its tokens, its text so far and how much of that was handed out.

    Each row has its own sampling options and random stream, so rows of different requests can share a batch.
    """

    def __init__(
        self, prompt_ids: list[int], sampling: Sampling, generator: torch.Generator | None, images: tuple = ()
    ):
        self.prompt_ids = prompt_ids
        self.images: tuple[bytes, ...] = images  # the image files the prompt's image tokens show, in order
        # M-RoPE (Qwen2-VL): how far the next text position is from the count of tokens before it, once images
        # (placed in 3-D, fewer positions than tokens) come before it; 0 elsewhere.
        self.rope_delta = 0
        self.sampling, self.generator = sampling, generator
        self.tokens: list[int] = []
        self.text = ""
        self.handed_out = 0
        self.finish_reason: str | None = None
        self.cancelled = False  # set by whoever no longer wants the rest; the row leaves at the next step
        self._keep: dict[int, str] | None = None  # sampling.keep_tokens' ids, found at the first token
        # Where sampling.logprobs asks: each token's log probability, how many went out with a piece, how much of
        # the text has decoded whole, and whether a half character follows that.
        self.logprobs: list[TokenLogprob] | None = [] if sampling.logprobs is not None else None
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # set by the prefill where sampling asks
        self.cached_tokens = 0  # set by the prefill: its prompt's leading tokens a `PrefixCache` held
        self.cache_scope = None  # set by the prefill: the `PrefixCache` scope its keys and values go under, if any
        self._logprobs_handed_out = 0
        self._ends: list[int] = []  # where each token's text ends in the text
        self._whole, self._partial = 0, False
        self.guide = None  # where the reply stands in `sampling.constraint`, if it has one
        if sampling.constraint is not None:
            from outlines_core import Guide

            self.guide = Guide(sampling.constraint)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def add(self, token: int, tokenizer, stop_ids: frozenset[int], scored: Scored | None = None) -> str:
        """Take the next token (with its log probabilities `scored`, where the row asked for them); return the
        text that is now safe to hand out."""
        stop = self.sampling.stop
        if self._keep is None:
            self._keep = kept_token_ids(tokenizer, self.sampling.keep_tokens)
        self.tokens.append(token)
        if self.guide is not None and token not in stop_ids:
            self.guide.advance(token, return_tokens=False)
        if token in stop_ids:
            self.finish_reason = "stop"
            self.text = decode(tokenizer, self.tokens[:-1], self._keep)
            if self.sampling.prompt_logprobs and scored is not None:
                self._score(token, scored, tokenizer)
        else:
            self.text = decode(tokenizer, self.tokens, self._keep)
            if self.logprobs is not None and scored is not None:
                self._score(token, scored, tokenizer)
            cut = min((i for i in (self.text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop"
            elif len(self.tokens) >= self.sampling.max_new_tokens:
                self.finish_reason = "length"
        safe = len(self.text)
        if self.finish_reason is None:
            # A stop string may be starting at the end, or a character may be half decoded.
            safe -= max((len(s) for s in stop), default=1) - 1
            while safe > 0 and self.text[safe - 1] == "\ufffd":
                safe -= 1
        piece = self.text[self.handed_out : max(safe, self.handed_out)]
        self.handed_out += len(piece)
        return piece

    def _score(self, token: int, scored: Scored, tokenizer) -> None:
        """Record the log probability of `token`, just added to `text`: its text is what it adds to the text
        decoded whole before it, or its own raw bytes where it holds part of a character."""
        logprob, top = scored
        whole = len(self.text.rstrip("\ufffd"))  # a half character decodes as U+FFFD until its last byte comes
        partial = whole < len(self.text)
        raw = token_bytes(tokenizer, token) if partial or self._partial else None
        if raw is not None:
            text, data = raw.decode("utf-8", "backslashreplace"), raw
        else:
            text = self.text[self._whole : whole]
            data = text.encode()
        chosen = TokenLogprob(text, data, logprob, self._whole)
        alternatives = tuple(
            replace(chosen, offset=0) if other == token else TokenLogprob(*token_text(tokenizer, other), value)
            for other, value in top
        )
        self.logprobs.append(replace(chosen, top=alternatives))
        self._ends.append(whole)
        self._whole, self._partial = whole, partial

    def with_logprobs(self, piece: str) -> str | Piece:
        """`piece` as it is handed out: where the row asks for log probabilities, with those of the tokens whose
        text has now gone out whole (the rest go with a later piece, or with the completion)."""
        if self.logprobs is None:
            return piece
        start = end = self._logprobs_handed_out
        while end < len(self.logprobs) and self._ends[end] <= self.handed_out:
            end += 1
        self._logprobs_handed_out = end
        return Piece(piece, tuple(self.logprobs[start:end]))

    def completion(self) -> Completion:
        logprobs = None
        if self.logprobs is not None:
            # A token whose text starts past where a stop string cut the reply is not in it.
            end = len(self.text)
            logprobs = tuple(
                entry for entry, entry_end in zip(self.logprobs, self._ends) if entry.offset < end or entry_end <= end
            )
        return Completion(
            self.text,
            len(self.prompt_ids),
            len(self.tokens),
            self.finish_reason or "length",
            tuple(self.tokens),
            logprobs,
            self.prompt_logprobs,
            self.cached_tokens,
        )

    def finish_unstarted(self) -> None:
        """End a row that generates nothing (max_new_tokens 0: its prompt scored alone)."""
        self.finish_reason = "length"


def score_tokens(tokenizer, token_ids: Sequence[int], scores: Sequence[Scored]) -> tuple[TokenLogprob, ...]:
    """The `TokenLogprob`s of a run of tokens (a prompt), each with its score: texts and offsets as a reply's
    tokens get them, in the text the run decodes to (special tokens' text empty)."""
    row = Row([], Sampling(logprobs=0), None)
    for token, scored in zip(token_ids, scores):
        row.tokens.append(token)
        row.text = decode(tokenizer, row.tokens, {})
        row._score(token, scored, tokenizer)
    return tuple(row.logprobs)


Scored = tuple[float, list[tuple[int, float]]]
"""A picked token's raw log probability, and the most likely tokens' ids with theirs, most likely first."""


@dataclass(frozen=True)
class Piece:
    """A row's text handed out, with the log probabilities of the tokens taken since the last one."""

    text: str
    logprobs: tuple[TokenLogprob, ...]


def token_bytes(tokenizer, token: int) -> bytes | None:
    """A token's own bytes, where the tokenizer writes them in its vocabulary (`vocabulary_bytes`); None for any
    other tokenizer, or an id past its vocabulary."""
    by_id = vocabulary_bytes(tokenizer)
    return None if by_id is None else by_id.get(token)


_TOKENIZER_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (chat template, key)
_UNKEYED = itertools.count()


def tokenizer_key(tokenizer) -> str:
    """What `tokenizer` is, for the caches of its tables (`per_tokenizer`): a digest of its fast tokenizer's whole
    definition (vocabulary, added tokens, decoder), its chat template and its special tokens, so a tokenizer loaded
    again from the same files has the same key. Worked out once per tokenizer object, which it does not keep
    alive, and again when its chat template is replaced (a recorded system prompt, `models.system_prompt`); a
    tokenizer with no fast backend has a key of its own."""
    template = tokenizer.chat_template
    if (known := _TOKENIZER_KEYS.get(tokenizer)) is not None and known[0] is template:
        return known[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        key = f"object {next(_UNKEYED)}"
    else:
        definition = json.dumps([backend.to_str(), template, tokenizer.special_tokens_map], default=str)
        key = hashlib.sha256(definition.encode()).hexdigest()
    _TOKENIZER_KEYS[tokenizer] = (template, key)
    return key


def per_tokenizer(maxsize: int):
    """Caches a function of a tokenizer (and hashable arguments after it) by `tokenizer_key`, not by the object: a
    tokenizer loaded again (serve reloading an adapter, each adapter's own copy of the base's tokenizer) reads the
    entry of the first, and no entry keeps a tokenizer alive; the `maxsize` entries used last are kept. The
    entries are the function's `entries`."""

    def wrap(function):
        entries: OrderedDict = OrderedDict()
        lock = threading.Lock()

        @functools.wraps(function)
        def cached(tokenizer, *args):
            key = (tokenizer_key(tokenizer), *args)
            with lock:
                if key in entries:
                    entries.move_to_end(key)
                    return entries[key]
            value = function(tokenizer, *args)
            with lock:
                entries[key] = value
                while len(entries) > maxsize:
                    entries.popitem(last=False)
            return value

        cached.entries = entries
        return cached

    return wrap


@per_tokenizer(maxsize=8)
def vocabulary_bytes(tokenizer) -> dict[int, bytes] | None:
    """The bytes each token of `tokenizer` stands for, by id, where its vocabulary writes them: byte-level BPE
    (GPT-2's alphabet: SmolLM2, Llama 3, Qwen) maps each character of a token back to its byte; SentencePiece
    with byte fallback (Llama 2, Mistral, Gemma) writes a space as "\u2581" and a byte as "<0xAB>"; an added
    token is its own text. None for any other tokenizer. Log probabilities and structured output read these."""
    kinds = decoder_kinds(tokenizer)
    if "ByteLevel" in kinds:
        byte_of = _byte_level_bytes()

        def bytes_of(name: str) -> bytes:
            return bytes(byte_of[char] for char in name) if all(char in byte_of for char in name) else name.encode()
    elif "ByteFallback" in kinds:

        def bytes_of(name: str) -> bytes:
            match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", name)
            return bytes([int(match[1], 16)]) if match else name.replace("\u2581", " ").encode()
    else:
        return None
    added = tokenizer.added_tokens_decoder
    return {token: name.encode() if token in added else bytes_of(name) for name, token in tokenizer.get_vocab().items()}


def token_text(tokenizer, token: int) -> tuple[str, bytes]:
    """A token's text on its own and its bytes: its raw bytes where the tokenizer has them (`token_bytes`), a
    partial character's written as `\\xNN` escapes; else the token decoded alone."""
    raw = token_bytes(tokenizer, token)
    if raw is None:
        text = tokenizer.decode([token])
        return text, text.encode()
    return raw.decode("utf-8", "backslashreplace"), raw


@functools.cache
def _byte_level_bytes() -> dict[str, int]:
    """The byte each character of GPT-2's byte-level alphabet stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def decoder_kinds(tokenizer) -> set[str]:
    """The kinds of decoder a fast tokenizer's backend has (`ByteLevel`, `ByteFallback`, ...), nested ones too."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    state = json.loads(decoder.__getstate__())
    return {state.get("type"), *(part.get("type") for part in state.get("decoders") or [])}


class Batch:
    """Rows decoded together that may join and leave between steps (continuous batching, for `serve`).

        batch = Batch(model.eval(), tokenizer)
        row = batch.add(prompt_ids, Sampling(max_new_tokens=64))
        while batch:
            for row, piece in batch.step():   # one new token per row: a waiting row's first, after its prompt
                ...
        row.completion()

    Rows added while others decode are prefilled on their own at the next step and merged into the
    running KV cache, both sides left-padded to a common width; finished rows leave, and the cache
    columns that only they used go with them. Merging needs `PreallocatedLayer` on every layer, full attention and
    sliding windows alike (`kv_cache.new_cache`); with any other `can_join` is False and added rows wait until the
    running ones have finished. A sliding window's mask counts cache columns, so with one a prefill keeps each row's
    tokens in adjacent columns: no shared prefix run once before the prompts' padding, and with a prefix cache
    together only prompts that miss it or whose rests past their cached starts are as long (the others start at
    the next steps).

    With a `prefix_cache` (`kv_cache.PrefixCache`), a prefill starts from the keys and values of the longest
    prefix of its prompts seen before, and leaves its prompts' own there, then each row's prompt and reply as it
    leaves (finished or cancelled), which a conversation's next turn sends back; `cache_model` names the model as it
    runs (the base, or one loading of an adapter), so no prompt starts from another model's keys. Prompts
    scored whole (`Sampling.prompt_logprobs`) and models with layers other than `PreallocatedLayer` run without it.
    """

    def __init__(self, model, tokenizer, prefix_cache=None, cache_model: Hashable = None):
        from .kv_cache import has_sliding_window
        from .models.loading import image_inputs

        self.model, self.tokenizer = model, tokenizer
        self.prefix_cache, self.cache_model = prefix_cache, cache_model
        self.images = image_inputs(tokenizer)  # the model's image side; None where it reads no images
        # The token an image's features take the place of is never picked: a reply holding it shows no image (sent
        # back in the next turn it is refused; a GRPO answer holding it cannot run beside its prompt's pixels).
        self._unpicked = self.images.image_token_id if self.images is not None else None
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.window = model_context_length(model)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.stop_ids))
        self._cache_argument = _cache_argument(model)
        self._sliding = has_sliding_window(model.config)
        # The last position as an index tensor, not `logits_to_keep=1`: the model then gathers it into a
        # contiguous [rows, 1, hidden] tensor. The int's slice is a strided view, which torch's matmul
        # meets, for a weight that needs no gradient, by copying the weight once per row: 5 GB and 11x the
        # prefill's time for 16 prompts on Gemma 3's 262k vocabulary in bf16. Made once, on the model's
        # device, so no step copies it there.
        self._last_position = torch.tensor([-1], device=model.device)
        self._waiting: list[Row] = []  # added, not prefilled yet
        self._rows: list[Row] = []  # one per line of the running cache
        self._cache = None
        self._mask: torch.Tensor | None = None  # [rows, cache width]: 1 where the cache holds a real token
        self._next: torch.Tensor | None = None  # [rows]: each row's latest token, the input of the next step

    def __len__(self) -> int:
        return len(self._waiting) + len(self._rows)

    @property
    def can_join(self) -> bool:
        """Whether rows added now start at the next step rather than after the running ones finish."""
        from .kv_cache import PreallocatedLayer

        return self._cache is None or all(
            type(layer) is PreallocatedLayer and layer.is_initialized for layer in self._cache.layers
        )

    def add(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        generator: torch.Generator | None = None,
        images: Sequence[bytes] = (),
    ) -> Row:
        """Queue a prompt; `generator` is its random stream (None: greedy, or torch's global one); `images` are
        the image files (PNG, JPEG, ...) its image tokens show, in order (`render_prompt` expanded them)."""
        if not prompt_ids:
            raise ValueError("a prompt rendered to no tokens; give it some text")
        shown = self._images_shown(prompt_ids)
        if len(images) != shown:
            raise ValueError(
                f"the prompt holds the tokens of {shown} images and {len(images)} images were given"
                + ("" if self.images is not None else "; this model reads text only (it has no image processor)")
            )
        if self.window is not None:
            # Past the positions the model was built for it writes noise: a reply stops where the window ends.
            room = self.window - len(prompt_ids)
            if room < 1:
                raise ValueError(
                    f"the prompt has {len(prompt_ids)} tokens; the model's maximum context length is "
                    f"{self.window} tokens, which leaves no room for a reply. Shorten the prompt."
                )
            if sampling.max_new_tokens > room:
                sampling = replace(sampling, max_new_tokens=room)
        row = Row(list(prompt_ids), sampling, generator, tuple(images))
        self._waiting.append(row)
        return row

    def _images_shown(self, prompt_ids: Sequence[int]) -> int:
        """How many images' tokens the prompt holds: each image is one run of the image token."""
        return 0 if self.images is None else self.images.shown(prompt_ids)

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, str]]:
        """Decode one token for every running row and prefill the waiting ones; each row's new text."""
        self._waiting = [row for row in self._waiting if not row.cancelled]
        self._leave()
        produced = self._decode() if self._rows else []
        if self._waiting and self.can_join:
            produced += self._prefill()
        self._leave()
        return produced

    def _forward(
        self, input_ids, attention_mask, positions, cache, every_position: bool = False, images: dict | None = None
    ) -> torch.Tensor:
        """The logits of the last position, [rows, vocabulary] in fp32; with `every_position`, of every
        position, [rows, positions, vocabulary] in the model's dtype. `images`: a prefill's `pixel_values` and
        `token_type_ids` (`_image_inputs`)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if every_position else self._last_position,
            **{self._cache_argument: cache},
            **(images or {}),
        )
        return out.logits if every_position else out.logits[:, -1].float()

    def _decode(self) -> list[tuple[Row, str]]:
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=-1)
        # A row's next position is the number of real tokens before it, whatever padding sits on its left.
        positions = self._mask.sum(-1, keepdim=True)
        if self.images is not None and self.images.rope_from_images:
            positions = positions + torch.tensor([[row.rope_delta] for row in self._rows], device=positions.device)
        logits = self._forward(self._next[:, None], mask, positions, self._cache)
        self._mask = mask
        self._next, scored = self._pick(logits, self._rows)
        return self._hand_out(self._rows, self._next, scored)

    def _prefill(self) -> list[tuple[Row, str]]:
        """Run the waiting rows' prompts; a prefix they all share (a system prompt) runs once, and so
        does a prompt that several rows have (GRPO samples a group of answers to each prompt).

        The shared prefix is computed for one row and its cache copied to every distinct prompt; each
        prompt's own rest follows it, left-padded, so a row's cache reads prefix, padding, its own
        tokens. Rows of one prompt then get copies of its cache and its last logits.
        """
        from .kv_cache import PreallocatedLayer, new_cache

        rows, self._waiting = self._waiting, []
        # Rows scoring their prompt read every position's logits (`_prefill_scoring`): they prefill apart, and the
        # others wait for the next step, so no other prompt's positions are run and scored with theirs.
        scoring_rows = [row for row in rows if row.sampling.prompt_logprobs]
        if scoring_rows and len(scoring_rows) < len(rows):
            rows, self._waiting = scoring_rows, [row for row in rows if not row.sampling.prompt_logprobs]
        # Each prompt's `PrefixCache.find` answer, by scope and tokens: looked up once per prefill.
        found: dict[tuple, tuple[int, tuple | None]] = {}
        if self._sliding and self.prefix_cache is not None and not scoring_rows:
            # The sliding window counts cache columns, so each row's tokens sit in adjacent columns: prompts prefill
            # together where none starts from the cache (each left-padded whole) or where each one's rest past its
            # cached start is as long (no padding between the two). The first row's group prefills, the others wait.
            group = [self._sliding_group(row, found) for row in rows]
            later = [row for row, key in zip(rows, group) if key != group[0]]
            rows, self._waiting = [row for row, key in zip(rows, group) if key == group[0]], later + self._waiting
        # A prompt is its tokens and the images they show: the same tokens with other images are another prompt.
        distinct: dict[tuple[tuple[int, ...], tuple[bytes, ...]], int] = {}
        prompt_of_row = [distinct.setdefault((tuple(row.prompt_ids), row.images), len(distinct)) for row in rows]
        prompts = [ids for ids, _ in distinct]
        shown = [image for _, images in distinct for image in images]
        device = self.model.device
        cache = new_cache(self.model.config)
        # Prompts whose tokens' log probabilities a row asks for: every position's logits are read, so each runs
        # whole (no shared prefix), its positions' logits all from this prefill.
        scoring = sorted({prompt_of_row[line] for line, row in enumerate(rows) if row.sampling.prompt_logprobs})
        shared = _common_prefix_length(prompts)
        plain = all(type(layer) is PreallocatedLayer for layer in cache.layers)
        # The prefix cache serves prompts run as they come; with images, one prompt whose images it keys by.
        scope = None
        # Not for M-RoPE prompts with images (Qwen2-VL): the text after an image sits at positions the images set.
        if (
            self.prefix_cache is not None
            and plain
            and not scoring
            and (not shown or (len(prompts) == 1 and not self.images.rope_from_images))
        ):
            # The images by each one's digest: their files joined would be the same bytes for other files (a PNG
            # is read to its end chunk, and bytes after it move to the next file unseen).
            digests = b"".join(hashlib.sha256(image).digest() for image in shown)
            scope = (self.cache_model, hashlib.sha256(digests).digest() if shown else None)
        cached = self._start_from_prefix_cache(scope, prompts, shared, cache, found) if scope else [0] * len(prompts)
        if len(set(cached)) == 1 and cached[0] <= shared:
            # The cache holds one row, the prompts' common start: a prefix they share runs once after it.
            if (
                scoring
                or shown  # a prefix would run its image tokens without the image; prompts with images run whole
                or len(prompts) < 2
                or shared < MIN_SHARED_PREFIX
                or not plain
                or self._sliding  # padding between the prefix and each rest would count in the window
            ):
                shared = cached[0]
            if shared > cached[0]:
                prefix = torch.tensor([prompts[0][cached[0] : shared]], device=device)
                positions = torch.arange(cached[0], shared, device=device)[None]
                self._forward(prefix, prefix.new_ones(1, shared), positions, cache)
            if shared:
                cache.batch_repeat_interleave(len(prompts))
            before = [shared] * len(prompts)
        else:
            before = cached  # the cache holds each prompt's own start, left-padded to the longest
        # A prompt's columns: padding, the tokens in the cache before this forward, padding, its own rest.
        front = max(before)
        rests = [prompt[start:] for prompt, start in zip(prompts, before)]
        width = max(len(rest) for rest in rests)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), front + width), dtype=torch.long)
        for line, (start, rest) in enumerate(zip(before, rests)):
            mask[line, front - start : front] = 1
            input_ids[line, width - len(rest) :] = torch.tensor(rest)
            mask[line, front + width - len(rest) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        # Positions count a row's real tokens, so padding does not shift them.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, front:]
        # Images whose tokens came from the prefix cache sit in its keys already: the rest shows none.
        images = self._image_inputs(shown, input_ids) if shown and not any(cached) else None
        if images is not None and self.images.rope_from_images:
            positions = self._rope_positions(rows, prompt_of_row, input_ids, mask, images)
        if scoring:
            logits = self._prefill_scoring(
                rows, prompt_of_row, prompts, scoring, input_ids, mask, positions, cache, images
            )
        else:
            logits = self._forward(input_ids, mask, positions, cache, images=images)
        if scope:
            for line, (prompt, start, rest) in enumerate(zip(prompts, before, rests)):
                columns = (slice(front - start, front), slice(front + width - len(rest), None))

                def own(line=line, columns=columns):
                    return [
                        tuple(torch.cat([side[line : line + 1, :, at] for at in columns], dim=-2) for side in sides)
                        for sides in ((layer.keys, layer.values) for layer in cache.layers)
                    ]

                self.prefix_cache.store(scope, prompt, own)
        for row, prompt in zip(rows, prompt_of_row):
            row.cached_tokens, row.cache_scope = cached[prompt], scope
        if len(prompts) < len(rows):
            index = torch.tensor(prompt_of_row, device=device)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
        tokens, scored = self._pick(logits, rows)
        self._merge(rows, cache, mask, tokens)
        return self._hand_out(rows, tokens, scored)

    def _sliding_group(self, row: Row, found: dict) -> Hashable:
        """Which rows a sliding-window model's prefill with the prefix cache runs together: rows whose prompts miss
        the cache, rows whose prompts' rests past their cached starts are as long, and a prompt with images alone
        (the cache serves such prompts one at a time). Each prompt's lookup lands in `found` for the prefill."""
        if row.images:
            return (tuple(row.prompt_ids), row.images)
        start = self._cached_length((self.cache_model, None), row.prompt_ids, found)[0]
        return len(row.prompt_ids) - start if start else 0

    def _cached_length(self, scope: tuple, prompt: list[int], found: dict) -> tuple[int, tuple | None]:
        """The prompt's longest start the prefix cache holds for `scope` (`PrefixCache.find`), leaving its last token
        to run: at least `MIN_SHARED_PREFIX` tokens and, for a prompt with images, past its last image token (the
        rest then runs without images). Kept in `found` under the scope and tokens, where it is read from again."""
        key = (scope, tuple(prompt))
        if key not in found:
            least = MIN_SHARED_PREFIX
            if scope[1] is not None:
                soft = self.images.image_token_id
                least = max(least, 1 + max(at for at, token in enumerate(prompt) if token == soft))
            found[key] = self.prefix_cache.find(scope, prompt[: len(prompt) - 1], least)
        return found[key]

    def _start_from_prefix_cache(
        self, scope: tuple, prompts: list[list[int]], shared: int, cache, found: dict
    ) -> list[int]:
        """Fill `cache` (empty) with the keys and values of each prompt's longest start that the prefix cache holds
        for `scope` (`_cached_length`, reading the lookups `found` holds already); how many tokens that is, per prompt.
        Where every prompt starts from as many tokens within the `shared` ones they all have (a shared system
        prompt), those are the same keys: the cache holds them once, a row the prefill copies to each prompt; else
        a row per prompt, left-padded to the longest."""
        answers = [self._cached_length(scope, prompt, found) for prompt in prompts]
        starts = [start for start, _ in answers]
        taken = [self.prefix_cache.take(answer) for answer in answers]
        if not any(starts):
            return starts
        if len(set(starts)) == 1 and starts[0] <= shared:
            layers = taken[0]
        else:
            held = next(layers for layers in taken if layers)
            width = max(starts)
            # Each layer's keys and values of every prompt in one tensor made here (a miss's row all padding).
            layers = [
                tuple(
                    torch.cat(
                        [_left_pad(one[at][side] if one else held[at][side][:, :, :0], width, -2) for one in taken]
                    )
                    for side in (0, 1)
                )
                for at in range(len(held))
            ]
        for layer, (keys, values) in zip(cache.layers, layers):
            # The layer reads these tensors and copies them when it first grows: an entry stays as it is.
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        return starts

    def _rope_positions(self, rows, prompt_of_row, input_ids, mask, images: dict) -> torch.Tensor:
        """The prompts' 3-D M-RoPE positions [3, prompts, tokens], as the model computes them from the tokens and
        the images' grids (padding left out); each row keeps its prompt's offset for the positions it decodes."""
        from .models import causal_lm

        positions, deltas = causal_lm(self.model).model.get_rope_index(
            input_ids,
            mm_token_type_ids=images[self.images.type_ids],
            image_grid_thw=images["image_grid_thw"],
            attention_mask=mask,
        )
        for row, prompt in zip(rows, prompt_of_row):
            row.rope_delta = int(deltas[prompt])
        return positions

    def _image_inputs(self, shown: list[bytes], input_ids: torch.Tensor) -> dict:
        """What a prefill whose prompts show images passes beside their tokens, as training's batches do: the
        images' pixels (in the order their tokens come, row by row) and where their tokens are. Rows without
        images beside them have no image tokens, and attend as they do alone."""
        weights = self.model.get_input_embeddings().weight
        inputs = self.images.model_inputs(shown, input_ids)
        inputs["pixel_values"] = inputs["pixel_values"].to(weights.device, weights.dtype)
        return inputs

    def _prefill_scoring(
        self,
        rows: list[Row],
        prompt_of_row: list[int],
        prompts: list,
        scoring: list[int],
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache,
        images: dict | None,
    ) -> torch.Tensor:
        """The prefill of prompts of which rows score the tokens, `prompt_logprobs` set as it goes: each
        prompt token's log probability given those before it (the log-softmax of the logits at the position before
        it; the first token has none) and the most likely tokens' there. The positions run in chunks of at most
        `SCORED_LOGITS` logits in all, each chunk's scored as it comes, so memory does not grow with positions x
        vocabulary (4k positions of a 262k vocabulary are 4 GB of fp32 logits); prompts with `images`
        (`_image_inputs`) run whole, their image tokens in one forward with the pixels. Returns the last position's
        logits, [prompts, vocabulary] in fp32."""
        width = input_ids.shape[1]
        vocabulary = self.model.config.get_text_config().vocab_size
        chunk = width if images else max(1, SCORED_LOGITS // (len(prompts) * vocabulary))
        asking = {
            line: [row for row, of in zip(rows, prompt_of_row) if of == line and row.sampling.prompt_logprobs]
            for line in scoring
        }
        scored: dict[int, tuple[list, list, list]] = {line: ([], [], []) for line in scoring}
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            logits = self._forward(
                input_ids[:, start:end],
                mask[:, :end],
                positions[..., start:end],  # [prompts, tokens], or [3, prompts, tokens] for M-RoPE
                cache,
                every_position=True,
                images=images,
            )
            for line in scoring:
                # Left-padded: the prompt fills the last len(prompt) columns, each predicting the token after it.
                first, last = max(start, width - len(prompts[line])), min(end, width - 1)
                if first >= last:
                    continue
                raw = torch.log_softmax(logits[line, first - start : last - start].float(), dim=-1)
                targets = input_ids[line, first + 1 : last + 1]
                top = raw.topk(max(row.sampling.logprobs for row in asking[line]), dim=-1)
                chosen, values, ids = scored[line]
                chosen += raw.gather(-1, targets[:, None]).squeeze(-1).tolist()
                values += top.values.tolist()
                ids += top.indices.tolist()
        for line in scoring:
            prompt, (chosen, values, ids) = prompts[line], scored[line]
            for row in asking[line]:
                k = row.sampling.logprobs
                scores = [(None, []), *((c, list(zip(i[:k], v[:k]))) for c, i, v in zip(chosen, ids, values))]
                row.prompt_logprobs = score_tokens(self.tokenizer, prompt, scores)
        return logits[:, -1].float()

    def _merge(self, rows: list[Row], cache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask, self._next = rows, cache, mask, tokens
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for running, joining in zip(self._cache.layers, cache.layers):
            running.keys = torch.cat([_left_pad(running.keys, width, -2), _left_pad(joining.keys, width, -2)])
            running.values = torch.cat([_left_pad(running.values, width, -2), _left_pad(joining.values, width, -2)])
        self._mask = torch.cat([_left_pad(self._mask, width, -1), _left_pad(mask, width, -1)])
        self._next = torch.cat([self._next, tokens])
        self._rows = self._rows + rows

    def _leave(self) -> None:
        """Drop finished and cancelled rows from the running cache, leaving the keys and values of each one's prompt
        and reply in the prefix cache first."""
        keep = [line for line, row in enumerate(self._rows) if not row.done]
        if len(keep) == len(self._rows):
            return
        for line, row in enumerate(self._rows):
            if row.done and row.cache_scope is not None:
                self._store_reply(line, row)
        if not keep:
            self._rows, self._cache, self._mask, self._next = [], None, None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask, self._next = self._mask[index], self._next[index]
        self._rows = [self._rows[line] for line in keep]
        unused = int(self._mask.any(0).int().argmax())  # leading columns no remaining row attends to
        if unused and self.can_join:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self._mask = self._mask[:, unused:]

    def _store_reply(self, line: int, row: Row) -> None:
        """Keep the keys and values of `row` (line `line` of the running cache) in the prefix cache: its prompt and
        the tokens it generated but the last (picked, not yet run), its own columns without the padding. A chat
        client's next turn sends the reply back, so that turn runs only what it adds."""

        def own():
            columns = self._mask[line].nonzero().squeeze(-1)
            return [
                (layer.keys[line : line + 1, :, columns], layer.values[line : line + 1, :, columns])
                for layer in self._cache.layers
            ]

        self.prefix_cache.store(row.cache_scope, [*row.prompt_ids, *row.tokens[:-1]], own)

    def _pick(self, logits: torch.Tensor, rows: list[Row]) -> tuple[torch.Tensor, list[Scored | None]]:
        """The next token of each row (argmax, or a sample) and, for a row asking for them, its log
        probabilities; rows sharing options and a random stream are sampled in one draw, so a batch with one
        seed draws as it always has. A row's penalties lower the logits of the tokens it has generated first;
        a constrained row picks among the tokens its guide allows; no row picks the image token."""
        from .constrain import allowed

        # Rows asking for log probabilities get them from the raw logits, before penalties and a guide change them.
        asking = [line for line, row in enumerate(rows) if row.sampling.logprobs is not None]
        raw = torch.log_softmax(logits[asking], dim=-1) if asking else None
        if self._unpicked is not None and self._unpicked < logits.shape[-1]:
            logits[:, self._unpicked] = float("-inf")
        for line, row in enumerate(rows):
            presence, frequency = row.sampling.presence_penalty, row.sampling.frequency_penalty
            if row.tokens and (presence or frequency):
                counts = torch.bincount(torch.tensor(row.tokens, device=logits.device), minlength=logits.shape[-1])
                logits[line] -= counts[: logits.shape[-1]] * frequency + (counts[: logits.shape[-1]] > 0) * presence
            if row.guide is not None:
                logits[line].masked_fill_(~allowed(row.guide, logits.shape[-1], logits.device), float("-inf"))
        tokens = logits.argmax(-1)
        groups: dict[tuple, list[int]] = {}
        for line, row in enumerate(rows):
            if row.sampling.temperature > 0:
                groups.setdefault((row.sampling.temperature, row.sampling.top_p, id(row.generator)), []).append(line)
        for (temperature, top_p, _), lines in groups.items():
            tokens[lines] = _sample(logits[lines], temperature, top_p, rows[lines[0]].generator)
        scored: list[Scored | None] = [None] * len(rows)
        if asking:
            chosen = raw.gather(-1, tokens[asking][:, None]).squeeze(-1).tolist()
            values, ids = raw.topk(max(rows[line].sampling.logprobs for line in asking), dim=-1)
            values, ids = values.tolist(), ids.tolist()
            for at, line in enumerate(asking):
                k = rows[line].sampling.logprobs
                scored[line] = (chosen[at], list(zip(ids[at][:k], values[at][:k])))
        return tokens, scored

    def _hand_out(self, rows: list[Row], tokens: torch.Tensor, scored: list[Scored | None]) -> list[tuple[Row, str]]:
        produced = []
        for row, token, score in zip(rows, tokens.tolist(), scored):
            if row.sampling.max_new_tokens == 0:  # its prompt scored, nothing to generate
                row.finish_unstarted()
                produced.append((row, ""))
            else:
                produced.append((row, row.add(token, self.tokenizer, self.stop_ids, score)))
        return produced


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs[before >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least its last token to run
    (its logits give the row's first new token)."""
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    return next((t for t in range(limit) if any(p[t] != first[t] for p in prompts)), max(limit, 0))


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class _Decoding:
    """Decodes a fixed set of prompts together; iterating runs one step at a time and yields, per prompt,
    the new text."""

    def __init__(
        self,
        model,
        tokenizer,
        prompt_ids: list[list[int]],
        sampling: Sampling,
        generators: Sequence[torch.Generator | None],
        images: Sequence[tuple[bytes, ...]],
    ):
        """`generators[i]` is prompt i's random stream; prompts given the same one draw from it together.
        `images[i]`: the image files prompt i shows (`Batch.add`)."""
        self.model = model
        self.batch = Batch(model, tokenizer)
        self.rows = [
            self.batch.add(ids, sampling, generator, shown)
            for ids, generator, shown in zip(prompt_ids, generators, images)
        ]

    def completions(self) -> list[Completion]:
        return [row.completion() for row in self.rows]

    def __iter__(self) -> Iterator[list[str]]:
        line_of = {id(row): line for line, row in enumerate(self.rows)}
        was_training = self.model.training
        self.model.eval()
        try:
            while self.batch:
                pieces = [""] * len(self.rows)
                for row, piece in self.batch.step():
                    pieces[line_of[id(row)]] = piece
                yield pieces
        finally:
            self.model.train(was_training)


def _cache_argument(model) -> str:
    """transformers 5.x renames forward's `past_key_values` to `cache` (the old name warns, then goes)."""
    from tuneforge.models import causal_lm

    return "cache" if "cache" in inspect.signature(causal_lm(model).forward).parameters else "past_key_values"
