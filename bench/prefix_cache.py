"""Time to first token with `serve`'s prefix cache on and off, for a request sharing a long system prompt.

    python bench/prefix_cache.py [--model smollm2-135m-instruct] [--rounds 5] [--threads 2]

Two `tuneforge serve` processes on the same model (as shipped: `--precision auto`), one with the prefix
cache (its default size) and one with `--prefix-cache-mb 0`, take turns (which goes first alternates
every round; only one computes at a time, so load from other work falls on both alike). Each round has
a system prompt of about 1,000 tokens of its own (so no round starts from another's cache), and each
server answers two streamed chat requests with it: a first question, then a second one. The first
fills the cache; the second is what is timed: time to first token from sending it, through the
prefill, to its first text. Each server's `usage.prompt_tokens_details.cached_tokens` says what the
cache held. Replies are short (`--max-tokens`), since it is the prefill that the cache saves.

Then a conversation's next turn: a third request with the system prompt asks for a long reply (up to
`--reply-tokens`), and a fourth sends that conversation back, the reply included, with one more question;
the fourth's time to first token is what is timed, and its cached tokens say whether the reply's came from
the cache too.

The ratio is off / on of the second request's time to first token, per round, and its median. Writes
bench/results/prefix_cache-<date>.json, then rewrites BENCHMARKS.md through report.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import cpu_flags, median, result_header, write_result  # noqa: E402
from serve import Server  # noqa: E402

RULES = [
    "refunds are granted within thirty days of purchase when the receipt is attached",
    "password resets go through the account page, never through e-mail replies",
    "outages that affect production are escalated to the on-call engineer at once",
    "invoices are sent on the first working day of each month",
    "a customer who asks for a human is handed to one without argument",
    "personal data is never repeated back in full; show the last four characters only",
    "answers are short, kind and in the customer's language",
    "a ticket stays open until the customer confirms that the problem is solved",
]
QUESTIONS = ["My invoice is missing, what do I do?", "How do I reset my password?"]
TURNS = ["Explain in detail, step by step, how a customer gets a refund.", "And if the receipt is lost?"]
SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def system_prompt(round_: int, rules: list[str]) -> str:
    """A support desk's `rules` (`rule_lines`); the round's number first, so each round's prompt is its own from
    the first tokens on."""
    return "\n".join([f"Shift {round_}. You are the support desk of a web console. Follow these rules.", *rules])


def rule_lines(tokens: int, tokenizer) -> list[str]:
    """The numbered rules that make a system prompt about `tokens` tokens long: the same lines every round (only
    the round's number differs), so counted once."""
    rules = []
    while len(tokenizer(system_prompt(0, rules))["input_ids"]) < tokens:
        rules.append(f"Rule {len(rules) + 1}: {RULES[(len(rules) + 1) % len(RULES)]}.")
    return rules


def conversation(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name, model folder or run folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--reply-tokens", type=int, default=200, help="the longest first reply of the conversation")
    args = parser.parse_args()

    from tuneforge.generate import encode_prompts
    from tuneforge.models import load_tokenizer, resolve

    source = resolve(args.model)
    tokenizer = load_tokenizer(source)
    load_before = os.getloadavg()[0]
    logs = Path(tempfile.mkdtemp(prefix="prefix-cache-"))
    servers = {
        "on": Server(source.path, args.threads, "auto", logs / "on.log"),
        "off": Server(source.path, args.threads, "auto", logs / "off.log", ("--prefix-cache-mb", "0")),
    }
    rounds = []
    try:
        for server in servers.values():  # warm-up: first calls of every kernel, not timed
            server.run(conversation(system_prompt(-1, rule_lines(64, tokenizer)), QUESTIONS[0]), args.max_tokens)
        rules = rule_lines(args.system_tokens, tokenizer)
        for round_ in range(args.rounds):
            system = system_prompt(round_, rules)
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            runs = {}
            for name in order:
                first = servers[name].run(conversation(system, QUESTIONS[0]), args.max_tokens)
                second = servers[name].run(conversation(system, QUESTIONS[1]), args.max_tokens)
                # The next turn sends this server's own reply back, as its client would.
                reply = servers[name].run(conversation(system, TURNS[0]), args.reply_tokens)
                turn = [
                    *conversation(system, TURNS[0]),
                    {"role": "assistant", "content": reply["text"]},
                    {"role": "user", "content": TURNS[1]},
                ]
                runs[name] = {
                    "first": first,
                    "second": second,
                    "reply": reply,
                    "turn": servers[name].run(turn, args.max_tokens),
                }
            rounds.append(
                {
                    "prompt_tokens": len(encode_prompts(tokenizer, [conversation(system, QUESTIONS[1])])[0]),
                    "order": order,
                    **{
                        name: {
                            which: {
                                key: run[which][key]
                                for key in ("first_token_seconds", "prompt_tokens", "cached_tokens", "text")
                            }
                            for which in ("first", "second", "reply", "turn")
                        }
                        | {"reply_tokens": run["reply"]["tokens"]}
                        for name, run in runs.items()
                    },
                    "ratio": runs["off"]["second"]["first_token_seconds"] / runs["on"]["second"]["first_token_seconds"],
                    "same_text": runs["on"]["second"]["text"] == runs["off"]["second"]["text"],
                    "turn_ratio": runs["off"]["turn"]["first_token_seconds"]
                    / runs["on"]["turn"]["first_token_seconds"],
                    "turn_same_text": runs["on"]["turn"]["text"] == runs["off"]["turn"]["text"],
                }
            )
            print(
                f"round {round_}: off/on {rounds[-1]['ratio']:.2f}x, next turn {rounds[-1]['turn_ratio']:.2f}x",
                flush=True,
            )
    finally:
        for server in servers.values():
            server.close()
    flags = cpu_flags()
    result = {
        **result_header("prefix_cache", "python " + " ".join(sys.argv), load_before),
        "setup": {
            "model": args.model,
            "threads": args.threads,
            "system_tokens": args.system_tokens,
            "max_tokens": args.max_tokens,
            "reply_tokens": args.reply_tokens,
            "rounds": args.rounds,
            "lscpu_flags": sorted(flags),
            "simd_flags": [flag for flag in SIMD if flag in flags],
        },
        "rounds": rounds,
        "second_first_token_seconds": {
            name: median([r[name]["second"]["first_token_seconds"] for r in rounds]) for name in ("on", "off")
        },
        "first_first_token_seconds": {
            name: median([r[name]["first"]["first_token_seconds"] for r in rounds]) for name in ("on", "off")
        },
        "ratio": median([r["ratio"] for r in rounds]),
        "turn_first_token_seconds": {
            name: median([r[name]["turn"]["first_token_seconds"] for r in rounds]) for name in ("on", "off")
        },
        "turn_ratio": median([r["turn_ratio"] for r in rounds]),
    }
    print(f"wrote {write_result(result)}; median off/on {result['ratio']:.2f}x, next turn {result['turn_ratio']:.2f}x")
    subprocess.run([sys.executable, str(HERE / "report.py")], check=True)


if __name__ == "__main__":
    main()
