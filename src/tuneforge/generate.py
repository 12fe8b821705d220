"""Text generation, shared by `eval`, `chat` and `serve`.

    from tuneforge.generate import generate, stream
    [done] = generate(model, tokenizer, [[{"role": "user", "content": "Hi"}]], max_new_tokens=40)
    done.text, done.prompt_tokens, done.completion_tokens, done.finish_reason   # "stop" | "length"
    for piece in (s := stream(model, tokenizer, messages)):
        print(piece, end="")
    s.completion                                                                # once exhausted

A prompt is a list of chat messages, rendered with the tokenizer's chat template and its
generation prompt, or a plain string used verbatim (completion style).

The decoding loop is our own rather than `model.generate`, for three reasons: streaming is a
plain iterator (no thread feeding a queue); every row knows why it finished ("stop" at an
end-of-turn token or a stop string, "length" at max_new_tokens), with its text cut exactly before
the stop string; and rows leave the batch as they finish, so a long rambling answer does not make
the short ones pay for it. Underneath it is the usual recipe: left padding, position ids counted
from each row's first real token, a KV cache, logits for the last position only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

Messages = list[dict]
Prompt = Messages | str


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int  # every token generated, the end-of-turn token that stopped it included
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_new_tokens reached)
    token_ids: tuple[int, ...] = ()  # the generated tokens, as counted in completion_tokens


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. temperature 0 is greedy (argmax); the seed makes sampling repeatable."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    def generator(self, device) -> torch.Generator | None:
        """A seeded random stream for sampling; None for greedy decoding or no seed (torch's global one)."""
        if self.temperature == 0 or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text the model continues: chat messages through the chat template, a string as it is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    # The template writes any BOS token itself; adding special tokens here would double it.
    texts = [render_prompt(tokenizer, p) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def stop_token_ids(model, tokenizer) -> frozenset[int]:
    """Token ids that end a reply: the generation config's EOS ids, the tokenizer's EOS, and the
    token that closes an assistant turn in the chat template (which some configs do not list)."""
    from tuneforge.data.render import renderer_for

    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_ids is None:
        config_ids = []
    elif isinstance(config_ids, int):
        config_ids = [config_ids]
    ids = set(config_ids) | set(renderer_for(tokenizer).end_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def generate(model, tokenizer, prompts: Sequence[Prompt], *, batch_size: int = 16, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             stop: Sequence[str] = (), on_progress: Callable[[int], None] | None = None) -> list[Completion]:
    """One completion per prompt, in the order given.

    Prompts are batched by length (less padding); with greedy decoding a prompt's completion does
    not depend on the batch it lands in. `on_progress(n)` is called as each batch of n finishes.
    """
    sampling = Sampling(max_new_tokens, temperature, top_p, seed, tuple(stop))
    ids = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    generator = sampling.generator(model.device)  # one random stream for all batches
    results: list[Completion | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        decoding = _Decoding(model, tokenizer, [ids[i] for i in chunk], sampling, generator)
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

    def __init__(self, decoding: "_Decoding"):
        self._decoding = decoding
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        for pieces in self._decoding:
            if pieces[0]:
                yield pieces[0]
        self.completion = self._decoding.completions()[0]


def stream(model, tokenizer, prompt: Prompt, *, max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = ()) -> Stream:
    sampling = Sampling(max_new_tokens, temperature, top_p, seed, tuple(stop))
    return Stream(_Decoding(model, tokenizer, encode_prompts(tokenizer, [prompt]), sampling,
                            sampling.generator(model.device)))


class _Row:
    """One prompt's completion: its tokens, its text so far and how much of that was handed out."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.handed_out = 0
        self.finish_reason: str | None = None

    def add(self, token: int, tokenizer, stop_ids: frozenset[int], sampling: Sampling) -> str:
        """Take the next token; return the text that is now safe to hand out."""
        self.tokens.append(token)
        if token in stop_ids:
            self.finish_reason = "stop"
            self.text = tokenizer.decode(self.tokens[:-1], skip_special_tokens=True)
        else:
            self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)
            cut = min((i for i in (self.text.find(s) for s in sampling.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop"
            elif len(self.tokens) >= sampling.max_new_tokens:
                self.finish_reason = "length"
        safe = len(self.text)
        if self.finish_reason is None:
            # A stop string may be starting at the end, or a character may be half decoded.
            safe -= max((len(s) for s in sampling.stop), default=1) - 1
            while safe > 0 and self.text[safe - 1] == "\ufffd":
                safe -= 1
        piece = self.text[self.handed_out:max(safe, self.handed_out)]
        self.handed_out += len(piece)
        return piece

    def completion(self) -> Completion:
        return Completion(self.text, self.prompt_tokens, len(self.tokens), self.finish_reason or "length",
                          tuple(self.tokens))


class _Decoding:
    """Decodes a batch of prompts; iterating runs one step at a time and yields, per row, the new text."""

    def __init__(self, model, tokenizer, prompt_ids: list[list[int]], sampling: Sampling,
                 generator: torch.Generator | None):
        if any(not ids for ids in prompt_ids):
            raise ValueError("a prompt rendered to no tokens; give it some text")
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.prompt_ids = prompt_ids
        self.rows = [_Row(len(ids)) for ids in prompt_ids]
        self.stop_ids = stop_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.stop_ids))
        self.generator = generator

    def completions(self) -> list[Completion]:
        return [row.completion() for row in self.rows]

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        if s.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1:
            # Keep the smallest set of most likely tokens whose probability reaches top_p.
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs
            sorted_probs[before >= s.top_p] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[str]]:
        from transformers import DynamicCache

        device = self.model.device
        width = max(len(ids) for ids in self.prompt_ids)
        input_ids = torch.full((len(self.prompt_ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for b, ids in enumerate(self.prompt_ids):
            input_ids[b, width - len(ids):] = torch.tensor(ids)
            attention_mask[b, width - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # Positions count from each row's first real token, so padding does not shift them.
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        active = list(range(len(self.rows)))  # row index of each batch line still decoding
        cache = DynamicCache(config=self.model.config)
        was_training = self.model.training
        self.model.eval()
        try:
            while active:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                 use_cache=True, logits_to_keep=1, **{_cache_argument(self.model): cache})
                tokens = self._pick(out.logits[:, -1].float()).tolist()
                pieces = [""] * len(self.rows)
                for line, token in enumerate(tokens):
                    row = self.rows[active[line]]
                    pieces[active[line]] = row.add(token, self.tokenizer, self.stop_ids, self.sampling)
                yield pieces
                keep = [line for line, r in enumerate(active) if self.rows[r].finish_reason is None]
                if not keep:
                    break
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    attention_mask, positions = attention_mask[index], positions[index]
                    tokens = [tokens[line] for line in keep]
                active = [active[line] for line in keep]
                input_ids = torch.tensor(tokens, device=device)[:, None]
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=-1)
                positions = positions[:, -1:] + 1
        finally:
            self.model.train(was_training)


def _cache_argument(model) -> str:
    """transformers 5.x renames forward's `past_key_values` to `cache` (the old name warns, then goes)."""
    from tuneforge.methods import causal_lm

    return "cache" if "cache" in inspect.signature(causal_lm(model).forward).parameters else "past_key_values"
