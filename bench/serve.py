"""Serving speed on one model: `tuneforge serve` against transformers `generate` and llama.cpp.

    python bench/serve.py [--model smollm2-135m-instruct] [--rounds 3] [--max-tokens 64] [--threads 2]

The model (a registry name, model folder or run folder) is exported once with tuneforge's own
export, as a merged safetensors folder (f32) and as a GGUF (f16), into bench/.work/serve/; every
contender runs that same model:

(a) transformers `model.generate` in fp32, batch 1, in this process (the path `serve` used to take);
(b) llama.cpp (llama-cpp-python, `pip install -e '.[bench]'`, which compiles it) on the GGUF, its
    own decoding loop (`Llama.generate`, greedy), batch 1, in this process, its KV cache reset
    before every prompt so no prompt reuses another's;
(c) `tuneforge serve` as shipped (`--precision auto`: bf16 where the CPU has it natively), in its own
    process, one streaming chat request at a time over HTTP (SSE), timed from sending the request
    to `data: [DONE]`;
(d) the same with `--precision fp32`, whose greedy answers must equal (a)'s;
(e) server (c) with 8 and with 32 streaming requests at once: all their tokens over the time from
    the first request sent to the last `[DONE]`.

All get the same chat prompts rendered by the model's chat template, decode greedily and stop at
the end of turn or `--max-tokens`; tokens/s counts the tokens generated (the end-of-turn token
included) over the whole request, prompt included; time to first token is reported apart. Every
contender uses `--threads` threads; they take turns prompt by prompt, in an order that rotates
every round, and only one computes at a time, so load from other work on a shared machine falls on
all alike.

Ratios pair each run with llama.cpp's run of the same prompt in the same round and take the
median, so load that changes between rounds does not skew them. Targets: (c) >= 0.5x (b) at
batch 1; (e) at 8 requests >= 2x (b) at batch 1. Writes
bench/results/serve-<date>.json, then rewrites BENCHMARKS.md through report.py.
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
WORK = HERE / ".work" / "serve"
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
TARGETS = {"serve_vs_llama_cpp": 0.5, "concurrent_8_vs_llama_cpp": 2.0}
CONCURRENCY = (8, 32)


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def exported(spec: str) -> tuple[Path, Path]:
    """The merged folder and the f16 GGUF of `spec`, made once by tuneforge's export."""
    from tuneforge.exporting import export

    folder = WORK / Path(spec).name
    merged, gguf = folder / "merged", folder / "gguf"
    if not merged.exists():
        export(spec, "merged", "f32", merged)
    if not gguf.exists():
        export(spec, "gguf", "f16", gguf)
    return merged, next(gguf.glob("*.gguf"))


class PromptIds:
    """Each prompt as token ids through the model's chat template, and the ids that end a reply."""

    def __init__(self, model_dir: Path):
        from tuneforge.generate import encode_prompts, stop_token_ids
        from tuneforge.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(str(model_dir))
        self.ids = dict(zip(PROMPTS, encode_prompts(self.tokenizer, [chat(p) for p in PROMPTS])))
        self.stop_ids = stop_token_ids(load_model(str(model_dir)), self.tokenizer)

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.stop_ids], skip_special_tokens=True)


class BareTransformers:
    """(a): the model loaded with plain transformers in fp32, `generate` at batch 1."""

    def __init__(self, model_dir: Path, prompts: PromptIds):
        from transformers import AutoModelForCausalLM

        self.prompts = prompts
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()

    def run(self, prompt: str, max_tokens: int) -> dict:
        import torch
        from transformers import LogitsProcessorList

        first: list[float] = []

        def first_token(input_ids, scores):
            # Called once the prompt's forward gives the first logits; the rest of a step is the argmax.
            first.append(first[0] if first else time.perf_counter())
            return scores

        ids = torch.tensor([self.prompts.ids[prompt]])
        stops = sorted(self.prompts.stop_ids)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
                logits_processor=LogitsProcessorList([first_token]),
            )
        finished = time.perf_counter()
        new = out[0, ids.shape[1] :].tolist()
        return timed(started, first[0], finished, len(new), self.prompts.text(new))


def llama_cpp_class():
    """llama-cpp-python's model class; refused before the exports it needs take minutes, where it is missing."""
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise SystemExit("llama-cpp-python is missing: pip install -e '.[bench]' (it compiles llama.cpp)") from err
    return Llama


class LlamaCpp:
    """(b): llama.cpp on the GGUF export, its own greedy decoding loop at batch 1."""

    def __init__(self, gguf: Path, prompts: PromptIds, threads: int):
        Llama = llama_cpp_class()
        self.prompts = prompts
        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(self, prompt: str, max_tokens: int) -> dict:
        tokens: list[int] = []
        first = None
        self.llm.reset()  # no reuse of an earlier prompt's cache
        started = time.perf_counter()
        for token in self.llm.generate(self.prompts.ids[prompt], temp=0.0, reset=True):
            first = first or time.perf_counter()
            tokens.append(token)
            if token in self.prompts.stop_ids or len(tokens) >= max_tokens:
                break
        finished = time.perf_counter()
        return timed(started, first or finished, finished, len(tokens), self.prompts.text(tokens))


class Server:
    """(c), (d) and (e): `tuneforge serve` in its own process."""

    def __init__(self, model_dir: Path, threads: int, precision: str, log_file: Path, options: tuple[str, ...] = ()):
        """`options`: more of `tuneforge serve`'s options."""
        import httpx

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.model = model_dir.name
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.log = log_file.open("w")
        command = [sys.executable, "-m", "tuneforge", "serve", "--model", str(model_dir), "--port", str(port)]
        command += ["--max-batch", str(max(CONCURRENCY)), "--precision", precision, *options]
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
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

    def run(self, prompt: str | list[dict], max_tokens: int) -> dict:
        """One streamed chat request: a user message or the messages; its times, tokens, text and the prompt
        tokens (`prompt_tokens`) and those of them that came from the prefix cache (`cached_tokens`)."""
        body = {
            "model": self.model,
            "messages": chat(prompt) if isinstance(prompt, str) else prompt,
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
        run = timed(started, first or finished, finished, usage["completion_tokens"], "".join(pieces))
        details = usage["prompt_tokens_details"]
        return {**run, "prompt_tokens": usage["prompt_tokens"], "cached_tokens": details["cached_tokens"]}

    def concurrent(self, prompts: list[str], max_tokens: int) -> dict:
        with ThreadPoolExecutor(len(prompts)) as pool:
            runs = list(pool.map(lambda p: self.run(p, max_tokens), prompts))
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


def timed(started: float, first: float, finished: float, tokens: int, text: str) -> dict:
    return {
        "seconds": finished - started,
        "first_token_seconds": first - started,
        "tokens": tokens,
        "text": text,
        "started": started,
        "finished": finished,
    }


def rate(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def summary(runs: list[dict]) -> dict:
    return {
        "tokens_per_s": median([rate(r) for r in runs]),
        "first_token_seconds": median([r["first_token_seconds"] for r in runs]),
        "runs": [{k: r[k] for k in ("prompt", "tokens", "seconds", "first_token_seconds")} for r in runs],
    }


def paired(runs: list[dict], reference: list[dict]) -> float:
    """The median over prompts of a run's tokens/s over the reference's run of the same prompt and round."""
    return median([rate(a) / rate(b) for a, b in zip(runs, reference, strict=True)])


def agreement(reference: list[dict], other: list[dict]) -> dict:
    return {"agree": sum(a["text"] == b["text"] for a, b in zip(reference, other)), "of": len(reference)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name, model or run folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="threads of every contender")
    args = parser.parse_args()
    llama_cpp_class()

    import torch

    torch.set_num_threads(args.threads)
    # A plain SIGTERM (a timeout, say) would skip the `finally` below and leave the servers running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    merged, gguf = exported(args.model)
    prompts = PromptIds(merged)
    logs = Path(tempfile.mkdtemp())
    contenders = {
        "hf_generate": BareTransformers(merged, prompts),
        "llama_cpp": LlamaCpp(gguf, prompts, args.threads),
        "serve": Server(merged, args.threads, "auto", logs / "serve.log"),
        "serve_fp32": Server(merged, args.threads, "fp32", logs / "serve-fp32.log"),
    }
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    together: dict[int, list[dict]] = {n: [] for n in CONCURRENCY}
    load: list[float] = []
    try:
        for contender in contenders.values():  # warm-up, not timed: first calls allocate and pick kernels
            contender.run(PROMPTS[0], 8)
        names = list(contenders)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for prompt in (PROMPTS[(2 * round_) % len(PROMPTS)], PROMPTS[(2 * round_ + 1) % len(PROMPTS)]):
                for name in order:
                    load.append(os.getloadavg()[0])
                    results[name].append({"prompt": prompt, **contenders[name].run(prompt, args.max_tokens)})
            for n in CONCURRENCY:
                load.append(os.getloadavg()[0])
                batch = [PROMPTS[(round_ + i) % len(PROMPTS)] for i in range(n)]
                together[n].append(contenders["serve"].concurrent(batch, args.max_tokens))
            print(
                f"round {round_ + 1}/{args.rounds}: "
                + ", ".join(f"{name} {rate(runs[-1]):.1f}" for name, runs in results.items())
                + ", "
                + ", ".join(f"{n} concurrent {rate(runs[-1]):.1f}" for n, runs in together.items())
                + f" tok/s (load {load[-1]:.1f})",
                flush=True,
            )
        health = contenders["serve"].health()
    finally:
        for name in ("serve", "serve_fp32"):
            if name in contenders:
                contenders[name].close()

    measured = {name: summary(runs) for name, runs in results.items()}
    concurrent = {
        str(n): {"tokens_per_s": median([rate(r) for r in runs]), "runs": runs} for n, runs in together.items()
    }
    out = {
        "bench": "serve",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/serve.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "versions": {**versions(), "llama_cpp_python": _version("llama_cpp_python")},
        "load_average": {"median": median(load), "min": min(load), "max": max(load)},
        "wall_seconds": time.time() - started,
        "setup": {
            "model": args.model,
            "gguf": gguf.name,
            "device": "cpu",
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "prompts": PROMPTS,
        },
        "batch1": measured,
        "serve_dtype": health["dtype"],
        "concurrent": {**concurrent, "largest_batch": health["largest_batch"]},
        "same_text_as_hf": {name: agreement(results["hf_generate"], results[name]) for name in names[1:]},
        # Each run against llama.cpp's run of the same prompt in the same round, then the median: the
        # two ran minutes apart at most, so a change of load between rounds does not skew the ratio.
        "ratios": {
            **{
                f"{name}_vs_llama_cpp": paired(results[name], results["llama_cpp"])
                for name in names
                if name != "llama_cpp"
            },
            "serve_vs_hf_generate": paired(results["serve"], results["hf_generate"]),
            **{
                f"concurrent_{n}_vs_llama_cpp": median(
                    [
                        rate(run) / median([rate(r) for r in results["llama_cpp"][2 * i : 2 * i + 2]])
                        for i, run in enumerate(together[n])
                    ]
                )
                for n in CONCURRENCY
            },
        },
        "targets": TARGETS,
    }
    path = HERE / "results" / f"serve-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"raw results: {path}")
    for name, figures in measured.items():
        print(
            f"{name:12s} {figures['tokens_per_s']:6.1f} tok/s, "
            f"{out['ratios'].get(f'{name}_vs_llama_cpp', 1.0):.2f}x llama.cpp (paired), "
            f"first token {figures['first_token_seconds']:.3f} s"
        )
    for n in CONCURRENCY:
        print(
            f"{n} concurrent: {concurrent[str(n)]['tokens_per_s']:.1f} tok/s = "
            f"{out['ratios'][f'concurrent_{n}_vs_llama_cpp']:.2f}x llama.cpp batch 1"
        )
    print(f"same text as hf: {out['same_text_as_hf']}; load average median {out['load_average']['median']:.1f}")

    import report

    report.main()


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
