"""Training throughput, memory and validation loss of tuneforge vs the HF Trainer + PEFT and TRL,
side by side in one run on SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on all linear layers.

    python bench/run.py                      # `make bench`: the default candidates; 35 min on this shared 2-core
                                             # machine at load ~4 (less on a quiet one)
    python bench/run.py --steps 6 --candidates tuneforge,hf_trainer     # a quicker look
    python bench/run.py --list               # the candidates there are

Every candidate trains one epoch over the same synthetic chat data (`chatdata.py`, lengths like
real instruction data), with the same learning rate, schedule, seed and LoRA settings, so each sees
the same real tokens. One optimizer step holds ~600-1,000 real tokens: `--batch` sequences (3) for
padded candidates, one packed row of up to 1,024 tokens for packed ones (the average sequence is
~180-250 tokens). Packed candidates therefore take a few fewer optimizer steps over the same tokens.

Candidates run in separate processes (peak RSS is each one's own) and take turns step by step
(`turns.py`), so the machine's background load falls on all of them alike. A matmul probe takes a
turn every round too: that is the machine's limit under the same load, for MFU. Afterwards one
shared function (`validloss.py`) computes every adapter's validation loss the same way.

Raw results go to bench/results/train_throughput-<date>.json; then `report.py` rewrites BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import chatdata  # noqa: E402
from common import (  # noqa: E402
    FLOPS_FORMULA,
    flops_per_example,
    machine_info,
    median,
    model_shapes,
    tokenize_chat,
    versions,
)
from turns import Child, run_interleaved  # noqa: E402

BASELINE = "hf_trainer"

# name -> (label, spec fields). "packed": the batch is one packed row instead of --batch sequences.
CANDIDATES = {
    "tuneforge": (
        "tuneforge, defaults (packing on, precision auto)",
        {"kind": "tuneforge", "packing": True, "packed": True},
    ),
    "tuneforge_nopack": ("tuneforge, packing off (padded batches)", {"kind": "tuneforge", "packing": False}),
    "hf_trainer": ("HF Trainer + PEFT, DataCollatorForSeq2Seq padding, fp32", {"kind": "hf_trainer"}),
    "trl_sft": (
        "TRL SFTTrainer, packing (bfd, padding-free), fp32",
        {"kind": "trl_sft", "packing": True, "packed": True},
    ),
    # Not run by default: emulated bf16 is ~20x slower here (see the probe's bf16 figures).
    "hf_trainer_bf16": ("HF Trainer + PEFT, padding, bf16 autocast", {"kind": "hf_trainer", "bf16": True}),
    # Each tuneforge speed option off, one at a time (packing: tuneforge_nopack above).
    "tuneforge_model_attention": (
        "tuneforge, train.attention: model (the model's sdpa with a block mask)",
        {"kind": "tuneforge", "packing": True, "packed": True, "overrides": {"train.attention": "model"}},
    ),
}
DEFAULT = ["tuneforge", "tuneforge_nopack", "tuneforge_model_attention", "hf_trainer", "trl_sft"]


def loadavg() -> float:
    return os.getloadavg()[0]


def summarize(steps: list[dict], warmup: int) -> dict:
    timed = steps[warmup:] or steps
    rates = [s["tokens"] / s["seconds"] for s in timed]
    return {
        "timed_steps": len(timed),
        "tokens_per_s": median(rates),
        "tokens_per_s_aggregate": sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "seconds_per_step": median([s["seconds"] for s in timed]),
        "tokens_per_step": median([s["tokens"] for s in timed]),
    }


def probe_summary(rounds: list[dict]) -> dict:
    per_shape: dict[str, list[float]] = {}
    best = []
    for r in rounds:
        for shape, g in r["fp32_gflops"].items():
            per_shape.setdefault(shape, []).append(g)
        best.append(max(g for s, g in r["fp32_gflops"].items() if "lora" not in s))
    first = next((r for r in rounds if "bf16_gflops" in r), {})
    return {
        "rounds": len(rounds),
        "fp32_peak_gflops": median(best),
        "fp32_peak_gflops_max": max(best) if best else None,
        "fp32_gflops_by_shape": {s: median(v) for s, v in per_shape.items()},
        "bf16_gflops_by_shape": first.get("bf16_gflops"),
        "bf16_step": first.get("bf16_step"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", default=",".join(DEFAULT))
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of a padded candidate (one epoch)")
    p.add_argument(
        "--batch",
        type=int,
        default=3,
        help="sequences per step for padded candidates (6 padded to a 967-token row took 18 GB: OOM risk on 24 GB)",
    )
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    p.add_argument("--valid-rows", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--model", default=None, help="HF folder (default: the bundled SmolLM2)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every candidate and the probe; 0 = torch's own choice (all cores). 1 by "
        "default: on a shared 2-core machine 2 threads make every parallel op wait for a descheduled "
        "thread, which swamps the differences between candidates (see BENCHMARKS.md)",
    )
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--name", default="train_throughput", help="results file name prefix")
    p.add_argument("--work", default=str(HERE / "work"))
    p.add_argument("--list", action="store_true")
    p.add_argument(
        "--before",
        default=None,
        help="the src/ folder of another tuneforge checkout: adds a candidate tuneforge_before that runs it with "
        "the tuneforge candidate's settings, to compare two versions side by side",
    )
    args = p.parse_args()
    if args.list:
        for name, (label, _) in CANDIDATES.items():
            print(f"{name:22s} {label}{'  (default)' if name in DEFAULT else ''}")
        return
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    if args.before:
        commit = (
            subprocess.run(
                ["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            or args.before
        )
        CANDIDATES["tuneforge_before"] = (f"tuneforge at {commit}, defaults", CANDIDATES["tuneforge"][1])
        names.append("tuneforge_before")
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"unknown candidates {unknown}; --list shows them")

    if args.model:
        model_dir = args.model
    else:
        from tuneforge.models import resolve

        model_dir = str(resolve("smollm2-135m-instruct").path)
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    shapes = model_shapes(AutoConfig.from_pretrained(model_dir))

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    n_train = args.steps * args.batch
    train_rows, valid_rows = chatdata.generate(n_train, seed=1), chatdata.generate(args.valid_rows, seed=2)
    train_file, valid_file = (
        chatdata.write(work / "train.jsonl", train_rows),
        chatdata.write(work / "valid.jsonl", valid_rows),
    )
    train_tok = tokenize_chat(train_rows, tok)
    lengths = [len(t.input_ids) for t in train_tok]
    trained = [t.span[1] - t.span[0] for t in train_tok]
    lora = {"r": 16, "alpha": 32, "dropout": 0.0}  # PEFT's default and tuneforge's
    flops_total = sum(flops_per_example(shapes, lora["r"], n, t) for n, t in zip(lengths, trained))
    flops_per_token = flops_total / sum(lengths)
    # The length distribution, measured on a larger draw of the same generator (and on the train set).
    dist = chatdata.length_report(chatdata.generate(2000, seed=0), tok)

    print(
        f"data: {n_train} train rows ({sum(lengths):,} tokens, {sum(trained):,} trained), "
        f"{args.valid_rows} validation rows; lengths {dist['tokens']}",
        flush=True,
    )
    print(f"model FLOPs per real token: {flops_per_token / 1e6:.0f} M", flush=True)

    children, labels = [], {}
    started = time.time()
    load_samples = [loadavg()]
    for name in names:
        label, extra = CANDIDATES[name]
        labels[name] = label
        spec = {
            "name": name,
            "model": model_dir,
            "train": str(train_file),
            "out": str(work / name),
            "batch": 1 if extra.get("packed") else args.batch,
            "lr": args.lr,
            "seed": args.seed,
            "lora": lora,
            **({"threads": args.threads} if args.threads else {}),
            **{k: v for k, v in extra.items() if k != "packed"},
        }
        spec_path = work / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        before = {"PYTHONPATH": args.before} if name == "tuneforge_before" else None
        children.append(
            Child(name, [sys.executable, str(HERE / "candidates.py"), str(spec_path)], work / f"{name}.log", env=before)
        )
    if not args.no_probe:
        spec_path = work / "probe.spec.json"
        spec_path.write_text(
            json.dumps(
                {
                    "kind": "probe",
                    "name": "probe",
                    "model": model_dir,
                    "lora": lora,
                    **({"threads": args.threads} if args.threads else {}),
                }
            )
        )
        children.append(
            Child(
                "probe", [sys.executable, str(HERE / "candidates.py"), str(spec_path)], work / "probe.log", probe=True
            )
        )

    def on_message(child, msg):
        load_samples.append(loadavg())
        if msg["event"] == "step" and child.name != "probe":
            print(
                f"  {child.name:20s} step {msg['step']:3d}  {msg['tokens']:5d} tokens  {msg['seconds']:6.1f} s  "
                f"{msg['tokens'] / msg['seconds']:7.1f} tok/s",
                flush=True,
            )
        elif msg["event"] == "result":
            print(f"  {child.name} finished", flush=True)

    try:
        run_interleaved(children, on_message)
    finally:
        for c in children:
            c.close()
    train_seconds = time.time() - started

    trainers = [c for c in children if c.name != "probe"]
    print("validation loss (shared function) ...", flush=True)
    subprocess.run(
        [
            sys.executable,
            str(HERE / "validloss.py"),
            model_dir,
            str(valid_file),
            str(work / "valid.json"),
            *[c.result["adapter"] for c in trainers],
        ],
        check=True,
        env={**os.environ, **({"TF_BENCH_THREADS": str(args.threads)} if args.threads else {})},
    )
    valid = json.loads((work / "valid.json").read_text())

    probe = next((probe_summary(c.result["rounds"]) for c in children if c.name == "probe"), None)
    results = {}
    for c in trainers:
        s = summarize(c.steps, args.warmup)
        r = {
            "label": labels[c.name],
            "spec": json.loads((work / f"{c.name}.spec.json").read_text()),
            "steps": len(c.steps),
            "real_tokens": sum(st["tokens"] for st in c.steps),
            **s,
            "peak_rss_mib": c.result["peak_rss_mib"],
            "valid_loss": valid[c.result["adapter"]]["loss"],
            "precision": c.result.get("precision") or ("bf16" if CANDIDATES[c.name][1].get("bf16") else "fp32"),
            "step_log": c.steps,
        }
        r["achieved_gflops"] = flops_per_token * r["tokens_per_s"] / 1e9
        if probe:
            r["mfu"] = r["achieved_gflops"] / probe["fp32_peak_gflops"]
        results[c.name] = r
    # The HF Trainer in fp32, or in bf16 where that is the one run.
    baseline = next((name for name in (BASELINE, "hf_trainer_bf16") if name in results), None)
    if baseline is not None:
        base = results[baseline]
        for r in results.values():
            r["speedup_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["rss_vs_hf"] = r["peak_rss_mib"] / base["peak_rss_mib"]
            r["valid_loss_vs_hf"] = r["valid_loss"] / base["valid_loss"] - 1
    if "trl_sft" in results:
        for r in results.values():
            r["speedup_vs_trl"] = r["tokens_per_s"] / results["trl_sft"]["tokens_per_s"]

    import torch

    from tuneforge.models import resolve_precision

    out = {
        "bench": "train_throughput",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/run.py " + " ".join(sys.argv[1:]),
        "machine": {**machine_info(), "tuneforge_auto_precision": resolve_precision("auto", torch.device("cpu"))},
        "versions": versions(),
        "load_average": {"median": median(load_samples), "max": max(load_samples), "min": min(load_samples)},
        "wall_seconds": {"training_interleaved": train_seconds, "total": time.time() - started},
        "setup": {
            "model": model_dir,
            "lora": {**lora, "target_modules": "all-linear"},
            "lr": args.lr,
            "scheduler": "cosine, no warm-up",
            "seed": args.seed,
            "epochs": 1,
            "batch_sequences": args.batch,
            "batch_packed_rows": 1,
            "packed_row_tokens": 1024,
            "warmup_steps_excluded": args.warmup,
            "train_rows": n_train,
            "valid_rows": args.valid_rows,
            "threads": args.threads or torch.get_num_threads(),
        },
        "data": {
            "generator": "bench/chatdata.py",
            "distribution_2000_rows": dist,
            "train": {"tokens": sum(lengths), "trained_tokens": sum(trained), "lengths": chatdata.percentiles(lengths)},
        },
        "flops": {"formula": FLOPS_FORMULA, "per_real_token": flops_per_token},
        "probe": probe,
        "base_valid_loss": valid["base"]["loss"],
        "valid_tokens": valid["base"]["tokens"],
        "candidates": results,
    }
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    path = results_dir / f"{args.name}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"raw results: {path}")
    for name, r in results.items():
        print(
            f"{name:20s} {r['tokens_per_s']:8.1f} tok/s  x{r.get('speedup_vs_hf', float('nan')):.2f} vs HF  "
            f"RSS {r['peak_rss_mib']:7.0f} MiB  valid {r['valid_loss']:.4f}  MFU {r.get('mfu', float('nan')):.1%}"
        )
    import report

    report.main()


if __name__ == "__main__":
    main()
