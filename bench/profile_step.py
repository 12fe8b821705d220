"""Where the time of one tuneforge training step goes, on SmolLM2 (torch.profiler).

    python bench/profile_step.py [--step 3] [--packing true] [--overrides lora.dropout=0 ...]

Runs `tuneforge.train` as a user would (LoRA r=16 on all linear layers, the benchmark's synthetic
chat data, batch of one packed row), profiles one whole step after warm-up (from the end of the
step before to the end of this one: batch building and collation, forward, backward, clipping,
optimizer, logging), and sorts every operator's self time into parts:

- matmuls by layer kind (attention projections, MLP, LoRA A/B, output layer), forward and backward
  (recognised by shape: [tokens, 576] x [576, 1536] is gate/up, a dimension equal to the LoRA rank
  is an adapter, the vocabulary size is the output layer),
- attention (SDPA kernels), LoRA dropout (the forward hook span of PEFT's dropout modules),
- other element-wise work (norms, rotary, SiLU, residuals, LoRA scaling), forward and backward,
- the optimizer, gradient clipping, collation, and what is left: time inside Python and the
  framework that no operator accounts for.

Writes bench/results/profile-<date>.json (BENCHMARKS.md shows it) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import chatdata  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def classify_matmul(shapes, rank: int, vocab: int, hidden: int, inter: int) -> str:
    dims = {d for s in shapes if s for d in s}
    if vocab in dims:
        return "output layer (lm_head)"
    if rank in dims:
        return "LoRA A/B"
    if inter in dims:
        return "MLP (gate/up/down)"
    return "attention projections (q/k/v/o)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--step", type=int, default=3, help="the step to profile (earlier ones warm up)")
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--packing", default="true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--overrides", nargs="*", default=[])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--name", default="profile")
    p.add_argument("--work", default=str(HERE / "work-profile"))
    p.add_argument("--model", default="smollm2-135m-instruct", help="the model profiled (registry name or folder)")
    p.add_argument("--results", type=Path, default=HERE / "results", help="the folder profile-DATE.json goes into")
    args = p.parse_args()
    if args.step < 2:
        # The profile opens when the step before ends, so the first step has none.
        p.error(f"--step {args.step}: the step profiled is 2 or later (the profile starts when the step before ends)")

    import torch
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    if args.threads:
        torch.set_num_threads(args.threads)
    import tuneforge
    import tuneforge.data as tfdata
    from tuneforge.methods import sft
    from tuneforge.training import loop

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = chatdata.write(work / "train.jsonl", chatdata.generate(args.rows, seed=1))

    state = {"prof": None, "t0": None, "wall": None, "record": None}

    class ProfilingProgress:
        def __init__(self, total_steps, start_step, *, enabled):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            if state["prof"] is not None and state["wall"] is None:
                state["prof"].__exit__(None, None, None)

        def update(self, record):
            if record["step"] == args.step - 1:
                state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()
            elif record["step"] == args.step:
                state["wall"] = time.perf_counter() - state["t0"]
                state["prof"].__exit__(None, None, None)
                state["record"] = record

    loop.TrainProgress = ProfilingProgress

    # Labels around the parts the loop calls, and around PEFT's dropout and adapter modules.
    def labelled(fn, name):
        def wrapper(*a, **kw):
            with record_function(name):
                return fn(*a, **kw)

        return wrapper

    tfdata.collate = labelled(tfdata.collate, "bench::collate")
    loop.tfdata = tfdata
    sft.SFTObjective.forward = labelled(sft.SFTObjective.forward, "bench::forward")
    torch.Tensor.backward = labelled(torch.Tensor.backward, "bench::backward")
    torch.nn.utils.clip_grad_norm_ = labelled(torch.nn.utils.clip_grad_norm_, "bench::clip_grad_norm")

    load = loop.load_for_training
    model_info = {}

    def load_for_training(*a, **kw):
        model = load(*a, **kw)
        cfg = model.config
        model_info.update(vocab=cfg.vocab_size, hidden=cfg.hidden_size, inter=cfg.intermediate_size)
        for name, module in model.named_modules():
            if name.split(".")[-1] == "lora_dropout" or ".lora_dropout." in name + ".":
                for sub in [module] if not hasattr(module, "values") else list(module.values()):
                    open_spans = []
                    sub.register_forward_pre_hook(
                        lambda m, i, spans=open_spans: spans.append(record_function("bench::lora_dropout").__enter__())
                    )
                    sub.register_forward_hook(lambda m, i, o, spans=open_spans: spans.pop().__exit__(None, None, None))
        return model

    loop.load_for_training = load_for_training

    cfg = {
        "base_model": args.model,
        "method": "lora",
        "data": {"train": str(train), "validation": None, "packing": args.packing == "true", "dedup": "none"},
        "train": {"max_steps": args.step, "batch_size": args.batch, "eval_every": 0, "save_every": 0, "warmup": 0},
        "output_dir": str(work / "run"),
    }
    for o in args.overrides:
        key, value = o.split("=", 1)
        section, leaf = key.rsplit(".", 1)
        cfg.setdefault(section, {})[leaf] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    tuneforge.train(cfg, overwrite=True, progress=False)

    prof, wall = state["prof"], state["wall"]
    events = prof.events()
    rank = cfg.get("lora", {}).get("r", 16)
    parts = defaultdict(float)
    ops = defaultdict(lambda: [0, 0.0])

    def labels_of(ev):
        out, cur = [], ev.cpu_parent
        while cur is not None:
            out.append(cur.name)
            cur = cur.cpu_parent
        return out

    accounted = 0.0
    for ev in events:
        self_s = ev.self_cpu_time_total / 1e6
        if self_s <= 0:
            continue
        accounted += self_s
        names = labels_of(ev)
        in_backward = "bench::backward" in names or ev.name.startswith("autograd::")
        if ev.name.startswith("bench::") or ev.name.startswith("autograd::engine") or ev.name.startswith("Optimizer."):
            if ev.name.startswith("Optimizer."):
                parts["optimizer (AdamW step, zero_grad)"] += self_s
            else:
                parts["Python and framework overhead (no operator)"] += self_s
            continue
        key = None
        if ev.name in MATMUL_OPS:
            kind = classify_matmul(
                ev.input_shapes, rank, model_info["vocab"], model_info["hidden"], model_info["inter"]
            )
            key = f"matmul: {kind}, {'backward' if in_backward else 'forward'}"
        elif "scaled_dot_product" in ev.name or "attention" in ev.name:
            key = "attention (SDPA), " + ("backward" if in_backward else "forward")
        elif "bench::lora_dropout" in names:
            key = "LoRA dropout, forward (masks, scaling)"
        elif any(n.startswith("Optimizer.") for n in names) or "zero_grad" in " ".join(names):
            key = "optimizer (AdamW step, zero_grad)"
        elif "bench::clip_grad_norm" in names:
            key = "gradient clipping"
        elif "bench::collate" in names:
            key = "collation"
        elif any("log_softmax" in n or "nll_loss" in n or "cross_entropy" in n for n in names + [ev.name]):
            key = "cross-entropy"
        elif in_backward:
            key = "other element-wise and copies, backward"
        elif "bench::forward" in names:
            key = "other element-wise and copies, forward (norms, rotary, SiLU, residuals, LoRA scaling)"
        else:
            key = "other (batch building, logging, loss .item())"
        parts[key] += self_s
        shapes = str([list(s) for s in ev.input_shapes if s][:3]) if ev.input_shapes else ""
        ops[(ev.name, shapes)][0] += 1
        ops[(ev.name, shapes)][1] += self_s
    parts["Python and framework overhead (no operator)"] += max(0.0, wall - accounted)
    ordered = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
    top = sorted(ops.items(), key=lambda kv: -kv[1][1])[:15]
    record = state["record"]
    from tuneforge.models import resolve_precision

    precision = resolve_precision(cfg["train"].get("precision", "auto"), torch.device("cpu"))
    model_name = "SmolLM2-135M-Instruct" if args.model == "smollm2-135m-instruct" else args.model
    result = {
        "bench": "profile",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/profile_step.py " + " ".join(sys.argv[1:]),
        "what": (
            f"Step {args.step} of a tuneforge run on {model_name}, LoRA r={rank} all-linear, "
            f"packing {args.packing}, batch {args.batch}, precision {precision} (machine: native bf16 "
            f"{'yes' if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 'no'}), "
            f"{record['tokens'] // args.step if record else '?'} real tokens per step on average; "
            "torch.profiler self times of every operator, sorted into parts."
            + (f" Overrides: {' '.join(args.overrides)}." if args.overrides else "")
            + f" {torch.get_num_threads()} torch thread(s); 1-minute load average {os.getloadavg()[0]:.1f}."
        ),
        "load_average": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "step_seconds": wall,
        "step_tokens_per_s_own": record.get("tokens_per_s") if record else None,
        "categories": ordered,
        "top_ops": [{"name": n, "shapes": s, "calls": c, "self_s": t} for (n, s), (c, t) in top],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{args.name}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in ordered.items():
        print(f"{v:8.2f} s  {100 * v / wall:5.1f}%  {k}")
    print(f"{wall:8.2f} s  step wall time; raw: {out}")


if __name__ == "__main__":
    main()
