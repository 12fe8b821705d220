"""Benchmark data preparation: validate + render + tokenize typical chat rows; and streaming memory.

    python bench/data_prep.py [--rows 20000] [--tokenizer HF_FOLDER] [--stream-rows 200000]

Typical rows are the demonstration task's: a system prompt, a support ticket of one to five
sentences, a one-line JSON answer. The tokenizer is SmolLM2's (from `tuneforge.models`, or an HF
folder given with --tokenizer). Target: at least 5,000 rows/s on 2 cores. The streaming part
reads a large JSONL with `read_conversations` and reports how much the process grew meanwhile,
which must stay flat (bounded by a row and a read buffer), whatever the file size.

Prints rows/s and writes the raw figures to bench/results/data_prep-<date>.json (or --results).

`prepare` already tokenizes on a thread beside the one that reads and renders; the tokenizer's own
thread pool on top of that only oversubscribes two cores, so this script turns it off unless
TOKENIZERS_PARALLELISM is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

SYSTEM = (
    "You are the triage assistant for Nimbus Cloud. Read the customer's ticket and answer with JSON only: "
    '{"category": ..., "priority": ..., "product": ...}.'
)
OPENERS = ["Hi team,", "Hello,", "URGENT:", "hey", "Good morning.", ""]
PROBLEMS = [
    "our {p} has been unreachable since {t} and production is down",
    "I was charged twice for the {p} plan this month",
    "I can't sign in to the console, the two-factor code never arrives",
    "the {p} dashboard shows an error when I click save",
    "could you add support for scheduled snapshots of {p}?",
    "how do I resize a {p} without downtime",
    "latency on the {p} went up to several seconds after {t}",
]
DETAILS = [
    "We tried restarting twice.",
    "This is blocking our release.",
    "No rush.",
    "Customers are complaining.",
    "It worked yesterday.",
    "Please advise asap!!",
    "Ticket 4821 may be related.",
    "thx",
]
PRODUCTS = ["database", "compute", "storage", "network", "console"]
LABELS = {
    "category": ["billing", "outage", "access", "bug", "feature_request", "how_to"],
    "priority": ["urgent", "high", "medium", "low"],
    "product": PRODUCTS,
}


def typical_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        body = rng.choice(PROBLEMS).format(p=rng.choice(PRODUCTS), t=f"{rng.randint(1, 12)}:{rng.randint(10, 59)} UTC")
        ticket = " ".join([rng.choice(OPENERS), body + ".", *rng.sample(DETAILS, rng.randint(0, 4)), f"(ref {i})"])
        answer = json.dumps({k: rng.choice(v) for k, v in LABELS.items()})
        yield {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": ticket.strip()},
                {"role": "assistant", "content": answer},
            ]
        }


def write_jsonl(path: Path, n: int) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for row in typical_rows(n):
            f.write(json.dumps(row) + "\n")
    return path.stat().st_size


def load_tokenizer(folder: str | None):
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder), folder
    from tuneforge.models import load_tokenizer as load

    return load("smollm2-135m-instruct"), "smollm2-135m-instruct"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_prepare(tokenizer, folder: Path, rows: int, repeats: int) -> dict:
    from tuneforge.config import DataConfig
    from tuneforge.data import prepare

    path = folder / "chat.jsonl"
    size = write_jsonl(path, rows)
    cfg = DataConfig(train=str(path), validation=0.1, max_length=1024)
    prepare(DataConfig(train=str(path), validation=None), tokenizer, use_cache=False, log=lambda _: None)  # warm up
    times, process_cpu, main_cpu = [], [], []
    for _ in range(repeats):
        wall, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
        data = prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
        times.append(time.perf_counter() - wall)
        process_cpu.append(time.process_time() - cpu)
        main_cpu.append(time.thread_time() - main)
    best = min(times)
    # The main thread reads, checks and renders; the tokenizer runs beside it. On two idle cores the
    # wall time is the larger of the main thread's CPU time and half of all CPU time.
    idle_two_cores = rows / max(min(main_cpu), min(process_cpu) / 2)
    return {
        "rows": rows,
        "file_bytes": size,
        "seconds": times,
        "rows_per_s": rows / best,
        "tokens_per_s": data.report["tokens"]["total"] / best,
        "cpu_us_per_row": {"process": 1e6 * min(process_cpu) / rows, "main_thread": 1e6 * min(main_cpu) / rows},
        "rows_per_s_two_idle_cores": idle_two_cores,
        "load_average": os.getloadavg(),
        "report_counts": data.report["counts"],
        "tokens": data.report["tokens"],
    }


def bench_streaming(folder: Path, rows: int) -> dict:
    from tuneforge.data import read_conversations

    path = folder / "large.jsonl"
    size = write_jsonl(path, rows)
    before = rss_mib()
    peak, start, n = before, time.perf_counter(), 0
    for _ in read_conversations(path):
        n += 1
        if n % 10_000 == 0:
            peak = max(peak, rss_mib())
    return {
        "rows": n,
        "file_mib": size / 2**20,
        "read_rows_per_s": n / (time.perf_counter() - start),
        "rss_before_mib": before,
        "rss_peak_mib": peak,
        "rss_growth_mib": peak - before,
    }


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-rows", type=int, default=200_000)
    parser.add_argument("--tokenizer", help="an HF tokenizer folder (default: SmolLM2 via tuneforge.models)")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).parent / "results",
        help="the folder data_prep-DATE.json goes into (another one for a trial run, which report.py would "
        "otherwise show as the newest result)",
    )
    args = parser.parse_args()

    tokenizer, name = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        prep = bench_prepare(tokenizer, Path(tmp), args.rows, args.repeats)
        print(
            f"prepare: {prep['rows_per_s']:,.0f} rows/s, {prep['tokens_per_s']:,.0f} tokens/s "
            f"({args.rows} typical chat rows, best of {args.repeats}, tokenizer {name}, "
            f"load average {prep['load_average'][0]:.1f})"
        )
        cpu = prep["cpu_us_per_row"]
        print(
            f"  CPU per row: {cpu['process']:.0f} us in all, {cpu['main_thread']:.0f} us on the main thread; "
            f"on two idle cores that is {prep['rows_per_s_two_idle_cores']:,.0f} rows/s"
        )
        stream = bench_streaming(Path(tmp), args.stream_rows)
        print(
            f"streaming read: {stream['rows']:,} rows ({stream['file_mib']:.0f} MiB), "
            f"{stream['read_rows_per_s']:,.0f} rows/s, RSS grew {stream['rss_growth_mib']:.1f} MiB"
        )
    result = {
        "bench": "data_prep",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "tokenizer": name,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(default)"),
        "prepare": prep,
        "streaming": stream,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out = args.results / f"data_prep-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
