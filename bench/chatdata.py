"""A seeded synthetic instruction-chat data set whose lengths look like real instruction data.

    python bench/chatdata.py OUT.jsonl --rows 400 --seed 0      # writes OpenAI chat JSONL

Real instruction sets (Alpaca, Dolly, ShareGPT/UltraChat first turns) have a skewed length
distribution: most conversations are short (a median near 100-150 tokens with the template), with
a long tail to the context limit. Here each conversation draws its total length in tokens from a
log-normal with median `MEDIAN` and shape `SIGMA`, cut to [MIN_TOKENS, MAX_TOKENS]; a share of
that goes to the user's request, the rest to the assistant's reply. The text is English made from
sentence templates: replies have a recognisable style (an opener, numbered steps or paragraphs, a
closing line), so a LoRA run learns something measurable in a few steps.

One system prompt of a few, one user turn, one assistant turn: with a single reply, "train on the
assistant" and "train on the completion" (TRL's prompt-completion format) mean the same tokens, so
every trainer in the benchmark trains on the same positions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

MEDIAN = 110  # target tokens per conversation before rounding up to whole sentences (measured p50 ~120)
SIGMA = 0.9  # log-normal shape: p90 ~ 3.2x the median, p99 ~ 8x
MIN_TOKENS, MAX_TOKENS = 40, 920
TOKENS_PER_WORD = 1.3  # SmolLM2's BPE on this text (measured: see `length_report`)
TEMPLATE_TOKENS = 14  # <|im_start|>role\n ... <|im_end|>\n for three turns

SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise, friendly assistant. Answer clearly.",
    "You are an expert assistant for engineers. Be precise and practical.",
    "You are a patient tutor. Explain step by step.",
]
TOPICS = [
    "the garden",
    "a small bakery",
    "the city library",
    "a mountain trail",
    "the school project",
    "our web server",
    "the weekly budget",
    "a birthday party",
    "the science fair",
    "a road trip",
    "the kitchen sink",
    "a job interview",
    "the chess club",
    "an old bicycle",
    "the team meeting",
    "a rainy weekend",
    "the photo album",
    "a new laptop",
    "the compost bin",
    "a piano lesson",
]
NOUNS = [
    "plan",
    "list",
    "idea",
    "problem",
    "question",
    "schedule",
    "recipe",
    "report",
    "note",
    "step",
    "tool",
    "method",
    "result",
    "detail",
    "reason",
    "change",
    "example",
    "summary",
    "rule",
    "option",
]
VERBS = [
    "check",
    "write",
    "build",
    "clean",
    "prepare",
    "compare",
    "explain",
    "organise",
    "measure",
    "review",
    "improve",
    "test",
    "describe",
    "share",
    "choose",
    "repair",
    "plan",
    "count",
    "sort",
    "finish",
]
ADJS = [
    "simple",
    "careful",
    "quick",
    "clear",
    "small",
    "useful",
    "early",
    "quiet",
    "strong",
    "fresh",
    "short",
    "long",
    "easy",
    "common",
    "better",
    "final",
    "first",
    "second",
    "safe",
    "cheap",
]
ADVS = ["carefully", "slowly", "first", "again", "together", "quickly", "often", "today", "later", "calmly"]

ASKS = [
    "Can you help me {v} {t}?",
    "How should I {v} the {n} for {t}?",
    "What is a {a} way to {v} {t}?",
    "Please {v} a {a} {n} about {t}.",
    "I need a {n} to {v} {t}. Where do I start?",
    "Could you {v} the {n} of {t} for me?",
]
CONTEXT = [
    "Last week I tried to {v} the {n}, but it was not {a} enough.",
    "My friend says the {n} should be {a}, and I am not sure.",
    "We have a {a} {n} and a {a} {n} to {v} {d}.",
    "The {n} for {t} is {a}, so I want to {v} it {d}.",
    "I already {v} the {n} {d}, and the {n} looks {a}.",
]
OPENERS = [
    "Sure! Here is a {a} way to {v} {t}.",
    "Good question. To {v} {t}, start with a {a} {n}.",
    "Happy to help with {t}.",
    "Here is a {a} {n} for {t}.",
]
STEPS = [
    "{v} the {n} {d}, and keep it {a}.",
    "Next, {v} each {n} and note any {a} {n}.",
    "Then {v} the {a} {n} before you {v} the {n}.",
    "Make sure the {n} stays {a} while you {v} it.",
    "If the {n} is not {a}, {v} it {d} and try again.",
    "Write down the {n} so you can {v} it {d}.",
]
CLOSERS = [
    "That should give you a {a} {n}. Let me know if you want more detail.",
    "In short: {v} {d}, keep the {n} {a}, and review it.",
    "Good luck with {t}!",
]


def _fill(rng: random.Random, template: str, topic: str) -> str:
    out = template
    for key, pool in (("{v}", VERBS), ("{n}", NOUNS), ("{a}", ADJS), ("{d}", ADVS)):
        while key in out:
            out = out.replace(key, rng.choice(pool), 1)
    return out.replace("{t}", topic)


def _words(text: str) -> int:
    return len(text.split())


def _user(rng: random.Random, topic: str, words: int) -> str:
    parts = [_fill(rng, rng.choice(ASKS), topic)]
    while sum(map(_words, parts)) < words:
        parts.insert(-1 if rng.random() < 0.5 else len(parts), _fill(rng, rng.choice(CONTEXT), topic))
    return " ".join(parts)


def _reply(rng: random.Random, topic: str, words: int) -> str:
    lines = [_fill(rng, rng.choice(OPENERS), topic)]
    numbered = rng.random() < 0.6
    n = 0
    while sum(map(_words, lines)) < words - 8:
        n += 1
        step = _fill(rng, rng.choice(STEPS), topic)
        step = step[0].upper() + step[1:]
        lines.append(f"{n}. {step}" if numbered else step)
    lines.append(_fill(rng, rng.choice(CLOSERS), topic))
    return "\n".join(lines) if numbered else " ".join(lines)


def conversation(rng: random.Random) -> dict:
    total = math.exp(rng.gauss(math.log(MEDIAN), SIGMA))
    total = min(MAX_TOKENS, max(MIN_TOKENS, total))
    system = rng.choice(SYSTEMS)
    body_words = max(10, (total - TEMPLATE_TOKENS) / TOKENS_PER_WORD - _words(system) * 1.1)
    user_share = rng.uniform(0.15, 0.5)
    topic = rng.choice(TOPICS)
    user = _user(rng, topic, max(6, round(body_words * user_share)))
    reply = _reply(rng, topic, max(10, round(body_words * (1 - user_share))))
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": reply},
        ]
    }


def generate(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [conversation(rng) for _ in range(n)]


def write(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def percentiles(lengths: list[int]) -> dict:
    ordered = sorted(lengths)

    def at(q: float) -> int:  # nearest-rank
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "n": len(ordered),
        "p10": at(0.1),
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
    }


def length_report(rows: list[dict], tokenizer) -> dict:
    """Measured token lengths (the model's chat template, as trained) and the assistant share."""
    full = tokenizer.apply_chat_template([r["messages"] for r in rows], tokenize=False)
    prompts = tokenizer.apply_chat_template(
        [r["messages"][:-1] for r in rows], tokenize=False, add_generation_prompt=True
    )
    n_full = [len(ids) for ids in tokenizer(full, add_special_tokens=False)["input_ids"]]
    n_prompt = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    return {"tokens": percentiles(n_full), "assistant_share": round(1 - sum(n_prompt) / sum(n_full), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="HF folder to measure lengths with (default: SmolLM2 via tuneforge)")
    args = p.parse_args()
    if args.rows < 1:
        p.error(f"--rows {args.rows}: the lengths are measured on at least one row")
    rows = generate(args.rows, args.seed)
    write(args.out, rows)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from tuneforge.models import load_tokenizer

        tok = load_tokenizer("smollm2-135m-instruct")
    print(json.dumps(length_report(rows, tok)))


if __name__ == "__main__":
    main()
