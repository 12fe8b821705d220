"""Does torch.compile pay for the decoding step on this CPU? Eager against compiled, multi-LoRA included.

    python bench/decode_step.py [--threads 2] [--tokens 32]

SmolLM2-135M-Instruct in bf16 where native (fp32 elsewhere) with two random LoRA adapters, driven
by `generate.Batch` exactly as `serve` drives it. Eager: the model as it is. Compiled: the causal
LM's forward under `torch.compile(dynamic=True)` (inductor). For each, in turns: one row decoding
`--tokens` tokens (ms a step after the first), then rows joining and leaving (batch 1 -> 3 -> 1),
then the other adapter; the compiled side records the seconds its first calls took (compiling),
the graphs dynamo compiled and its recompiles as each phase begins. Writes
bench/results/decode_step-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, median, versions  # noqa: E402

PROMPTS = [
    "Explain how a car engine works, part by part.",
    "Describe the water cycle in detail for a high-school student.",
    "Write a recipe for lasagna with detailed instructions for every step.",
]


def dynamo_counts() -> dict:
    import torch._dynamo.utils as dynamo_utils

    stats = dynamo_utils.counters["stats"]
    return {"graphs": int(stats["unique_graphs"]), "recompiles": sum(dynamo_utils.counters["recompiles"].values())}


def with_adapters(model):
    """Two random LoRA adapters on every attention and MLP projection, as `serve` holds them."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(**config), adapter_name="alpha")
    model.add_adapter("beta", LoraConfig(**config))
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.to(torch.float32)
    return model.eval()


def decode(model, tokenizer, prompt_ids: list[list[int]], tokens: int, joining: bool) -> list[float]:
    """Seconds of each step of one row (others joining at step 4 and leaving at step 12 when `joining`)."""
    from tuneforge.generate import Batch, Sampling

    batch = Batch(model, tokenizer)
    batch.add(prompt_ids[0], Sampling(tokens))
    steps = []
    while batch:
        if joining and len(steps) == 4:
            for ids in prompt_ids[1:]:
                batch.add(ids, Sampling(8))
        started = time.perf_counter()
        batch.step()
        steps.append(time.perf_counter() - started)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import os

    import torch

    from tuneforge.generate import encode_prompts, inference_dtype
    from tuneforge.models import causal_lm, load_model, load_tokenizer, pull

    torch.set_num_threads(args.threads)
    source = pull("smollm2-135m-instruct")
    dtype = inference_dtype("auto")
    tokenizer = load_tokenizer(str(source))
    prompt_ids = encode_prompts(tokenizer, [[{"role": "user", "content": p}] for p in PROMPTS])
    eager = with_adapters(load_model(str(source), dtype=dtype))
    compiled = with_adapters(load_model(str(source), dtype=dtype))
    lm = causal_lm(compiled)
    lm.forward = torch.compile(lm.forward, dynamic=True)

    load = [os.getloadavg()[0]]
    phases: dict[str, dict] = {}
    started = time.perf_counter()
    for name, model in (("compiled", compiled), ("eager", eager)):
        phase = phases[name] = {}
        for adapter in ("alpha", "beta"):
            model.set_adapter(adapter)
            for joining in (False, True):
                key = f"{adapter}, {'rows joining and leaving' if joining else 'one row'}"
                before = dynamo_counts()
                t0 = time.perf_counter()
                steps = decode(model, tokenizer, prompt_ids, args.tokens, joining)
                phase[key] = {
                    "first_pass_seconds": time.perf_counter() - t0,
                    "graphs_compiled": dynamo_counts()["graphs"] - before["graphs"],
                    "recompiles": dynamo_counts()["recompiles"] - before["recompiles"],
                }
                print(f"{name}, {key}: {phase[key]}", flush=True)  # a compile may outlast the caller's patience
    warmup_seconds = time.perf_counter() - started
    load.append(os.getloadavg()[0])

    step_ms: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):  # turns, so load falls on both alike
        for name, model in (("eager", eager), ("compiled", compiled)):
            model.set_adapter("alpha")
            steps = decode(model, tokenizer, prompt_ids, args.tokens, joining=False)
            step_ms[name].append(1000 * median(steps[1:]))
        load.append(os.getloadavg()[0])
    counts = dynamo_counts()
    out = {
        "bench": "decode_step",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/decode_step.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "versions": versions(),
        "load_average": {"median": median(load), "min": min(load), "max": max(load)},
        "setup": {"dtype": str(dtype).removeprefix("torch."), "threads": args.threads, "tokens": args.tokens},
        "warmup_seconds": warmup_seconds,
        "first_passes": phases,
        "step_ms": {name: {"median": median(v), "rounds": v} for name, v in step_ms.items()},
        "dynamo": counts,
    }
    path = HERE / "results" / f"decode_step-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("first_passes", "step_ms", "dynamo", "load_average")}, indent=2))
    print(f"raw results: {path}")


if __name__ == "__main__":
    main()
