"""Serving throughput on SmolLM2-135M-Instruct: `tuneforge serve` against a bare transformers loop.

    python bench/serve.py [--rounds 4] [--max-tokens 128] [--concurrency 8] [--threads N]

(a) transformers' `model.generate` at batch 1, greedy, `--max-tokens` new tokens, in this process;
(b) `tuneforge serve` in its own process, one streaming chat request at a time over HTTP (SSE),
    timed from sending the request to `data: [DONE]`;
(c) the same server, `--concurrency` streaming requests at once: all their tokens over the time
    from the first request sent to the last `[DONE]`.

The prompts ask for long answers, so most runs end at `--max-tokens`; tokens/s counts the tokens
actually generated (an end-of-turn token included, on both sides). (a) and (b) get the same
prompts and decode greedily, so they do the same work; whether their texts agree is recorded.
The three take turns round by round ((a) and (b) in alternating order), so load from other work
on a shared machine falls on all alike; both processes use the same number of torch threads and
only one computes at a time.

Targets: (b) >= 90% of (a); (c) >= 3x (b). Writes bench/results/serve-<date>.json, then
rewrites BENCHMARKS.md through report.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, median, versions  # noqa: E402

PROMPTS = [
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a bill becomes a law in the United States.",
    "Describe the water cycle in detail for a high-school student.",
    "Write a long letter to a friend describing your summer holiday by the sea.",
    "Explain how a car engine works, part by part.",
    "Give a detailed history of the printing press and its effects on Europe.",
    "Write a recipe for lasagna with detailed instructions for every step.",
    "Describe the life cycle of a star, from nebula to its end.",
]
TARGETS = {"serve_vs_hf": 0.9, "concurrent_vs_batch1": 3.0}


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


class BareTransformers:
    """(a): the model loaded with plain transformers, `generate` at batch 1."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()

    def run(self, prompt: str, max_tokens: int) -> dict:
        import torch

        text = self.tokenizer.apply_chat_template(chat(prompt), tokenize=False, add_generation_prompt=True)
        inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
        seconds = time.perf_counter() - started
        new = out[0, inputs["input_ids"].shape[1] :]
        return {"seconds": seconds, "tokens": len(new), "text": self.tokenizer.decode(new, skip_special_tokens=True)}


class Server:
    """(b) and (c): `tuneforge serve` in its own process."""

    def __init__(self, model_dir: Path, threads: int, max_batch: int, log_file: Path):
        import httpx

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.model = model_dir.name
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.log = log_file.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tuneforge",
                "serve",
                "--model",
                str(model_dir),
                "--port",
                str(port),
                "--max-batch",
                str(max_batch),
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(timeout=900)
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}; see {log_file}")
            try:
                if self.client.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not start within 10 minutes; see {log_file}")
            time.sleep(0.5)

    def stream(self, prompt: str, max_tokens: int) -> dict:
        body = {
            "model": self.model,
            "messages": chat(prompt),
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        pieces, first, usage = [], None, None
        started = time.perf_counter()
        with self.client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter()
                        pieces.append(choice["delta"]["content"])
        finished = time.perf_counter()
        return {
            "seconds": finished - started,
            "first_token_seconds": (first or finished) - started,
            "tokens": usage["completion_tokens"],
            "text": "".join(pieces),
            "started": started,
            "finished": finished,
        }

    def concurrent(self, prompts: list[str], max_tokens: int) -> dict:
        with ThreadPoolExecutor(len(prompts)) as pool:
            runs = list(pool.map(lambda p: self.stream(p, max_tokens), prompts))
        seconds = max(r["finished"] for r in runs) - min(r["started"] for r in runs)
        return {"seconds": seconds, "tokens": sum(r["tokens"] for r in runs), "requests": len(runs)}

    def health(self) -> dict:
        return self.client.get(f"{self.url}/health").json()

    def close(self) -> None:
        self.process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully on SIGINT
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def rate(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    # 1 by default, as bench/run.py: on a shared 2-core machine a second thread mostly waits for a core.
    parser.add_argument("--threads", type=int, default=1, help="torch threads, each process")
    args = parser.parse_args()

    import torch

    from tuneforge.models import pull

    torch.set_num_threads(args.threads)
    # A plain SIGTERM (a timeout, say) would skip the `finally` below and leave the server running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model_dir = pull("smollm2-135m-instruct")
    started = time.time()
    bare = BareTransformers(model_dir)
    server = Server(model_dir, args.threads, args.concurrency, Path(tempfile.mkdtemp()) / "serve.log")
    try:
        # Warm-up, not timed: first calls allocate and pick kernels.
        bare.run(PROMPTS[0], 8)
        server.stream(PROMPTS[0], 8)
        single, batch1, together, load = [], [], [], []
        for round_ in range(args.rounds):
            for prompt in (PROMPTS[(2 * round_) % len(PROMPTS)], PROMPTS[(2 * round_ + 1) % len(PROMPTS)]):
                load.append(os.getloadavg()[0])
                order = ((single, bare.run), (batch1, server.stream))
                for results, run in order if (round_ % 2 == 0) else order[::-1]:
                    results.append({"prompt": prompt, **run(prompt, args.max_tokens)})
            load.append(os.getloadavg()[0])
            prompts = [PROMPTS[(round_ + i) % len(PROMPTS)] for i in range(args.concurrency)]
            together.append(server.concurrent(prompts, args.max_tokens))
            print(
                f"round {round_ + 1}/{args.rounds}: hf {rate(single[-1]):.1f} tok/s, serve {rate(batch1[-1]):.1f} "
                f"tok/s, {args.concurrency} concurrent {rate(together[-1]):.1f} tok/s (load {load[-1]:.1f})",
                flush=True,
            )
        largest_batch = server.health()["largest_batch"]
    finally:
        server.close()

    hf_rate, serve_rate = median([rate(r) for r in single]), median([rate(r) for r in batch1])
    concurrent_rate = median([rate(r) for r in together])
    agree = sum(a["text"] == b["text"] for a, b in zip(single, batch1))
    out = {
        "bench": "serve",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "versions": versions(),
        "load_average": {"median": median(load), "min": min(load), "max": max(load)},
        "wall_seconds": time.time() - started,
        "setup": {
            "model": "smollm2-135m-instruct",
            "dtype": "float32",
            "device": "cpu",
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "prompts": PROMPTS,
        },
        "hf_generate": {
            "tokens_per_s": hf_rate,
            "runs": [{k: r[k] for k in ("prompt", "tokens", "seconds")} for r in single],
        },
        "serve_stream": {
            "tokens_per_s": serve_rate,
            "first_token_seconds": median([r["first_token_seconds"] for r in batch1]),
            "runs": [{k: r[k] for k in ("prompt", "tokens", "seconds", "first_token_seconds")} for r in batch1],
        },
        "serve_concurrent": {"tokens_per_s": concurrent_rate, "largest_batch": largest_batch, "runs": together},
        "same_text": {"agree": agree, "of": len(single)},
        "ratios": {"serve_vs_hf": serve_rate / hf_rate, "concurrent_vs_batch1": concurrent_rate / serve_rate},
        "targets": TARGETS,
    }
    path = HERE / "results" / f"serve-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"raw results: {path}")
    print(
        f"(a) transformers generate, batch 1: {hf_rate:.1f} tok/s\n"
        f"(b) tuneforge serve, SSE, batch 1:  {serve_rate:.1f} tok/s = {out['ratios']['serve_vs_hf']:.2f}x (a)\n"
        f"(c) {args.concurrency} concurrent requests:         {concurrent_rate:.1f} tok/s = "
        f"{out['ratios']['concurrent_vs_batch1']:.2f}x (b)\n"
        f"same text from (a) and (b): {agree} of {len(single)}; load average median {out['load_average']['median']:.1f}"
    )

    import report

    report.main()


if __name__ == "__main__":
    main()
