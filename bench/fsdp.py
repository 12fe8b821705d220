"""Full fine-tuning of SmolLM2-135M-Instruct on one process, on 2 with DDP and on 2 with FSDP: the
peak resident memory of the largest process and the tokens per second of the run.

    .venv/bin/python bench/fsdp.py [--steps 6] [--skip 2]

Each run is `tuneforge train CONFIG --nproc N` with the same global batch (the one process
accumulates two micro-batches where two processes take one each). The peak is what the kernel
reports for the launcher's process tree when it ends (`wait4`: the largest single process's peak
resident set); tokens per second are the data tokens of the steps after the first `--skip`, over
their time. Writes bench/results/fsdp-<date>.json; `bench/report.py` turns it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "fsdp"
CANDIDATES = {  # name: (processes, train.distributed)
    "one process": (1, "auto"),
    "ddp, 2 processes": (2, "ddp"),
    "fsdp, 2 processes": (2, "fsdp"),
}


@dataclass
class Setup:
    model: str = "smollm2-135m-instruct"
    rows: int = 200
    steps: int = 6
    skip: int = 2  # steps left out of tokens per second: the first ones warm up caches and allocators
    batch_size: int = 4
    max_length: int = 256
    learning_rate: float = 2e-5
    precision: str = "auto"
    seed: int = 0


def train_config(setup: Setup, data: Path, processes: int, distributed: str, out: Path) -> dict:
    return {
        "base_model": setup.model,
        "method": "full",
        "data": {
            "train": str(data),
            "validation": None,
            "max_length": setup.max_length,
            "truncation": "drop",
        },
        "train": {
            "max_steps": setup.steps,
            "batch_size": setup.batch_size,
            "grad_accum": 2 // processes,
            "learning_rate": setup.learning_rate,
            "precision": setup.precision,
            "distributed": distributed,
            "seed": setup.seed,
            "save_every": 0,
            "eval_every": 0,
        },
        "output_dir": str(out),
    }


def run_once(config: dict, processes: int, folder: Path) -> dict:
    """Train; the largest process's peak resident memory and the run's step records."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with open(folder / "train.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneforge", "train", str(path), "--nproc", str(processes), "--overwrite"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{folder}: training failed; see {folder / 'train.log'}")
    lines = (Path(config["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    steps = [record for record in map(json.loads, lines) if "train_loss" in record]
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "steps": steps}


def figures(measured: dict, skip: int) -> dict:
    steps = measured["steps"]
    first, last = steps[skip - 1], steps[-1]
    return {
        "peak_rss_mib": round(measured["peak_rss_mib"], 1),
        "tokens_per_s": round((last["tokens"] - first["tokens"]) / (last["elapsed"] - first["elapsed"]), 1),
        "seconds_per_step": round((last["elapsed"] - first["elapsed"]) / (len(steps) - skip), 2),
        "losses": [round(s["train_loss"], 6) for s in steps],
    }


def main() -> None:
    from chatdata import generate, write
    from common import result_header, write_result

    from tuneforge.models import resolve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=Setup.steps)
    parser.add_argument("--skip", type=int, default=Setup.skip)
    args = parser.parse_args()
    setup = Setup(steps=args.steps, skip=args.skip)
    load_before = os.getloadavg()[0]
    resolve(setup.model)  # pulled once, before any run starts its clock
    data = write(WORK / "train.jsonl", generate(setup.rows, setup.seed))
    results = {}
    for name, (processes, distributed) in CANDIDATES.items():
        folder = WORK / name.replace(",", "").replace(" ", "-")
        measured = run_once(train_config(setup, data, processes, distributed, folder / "run"), processes, folder)
        results[name] = {"processes": processes, "distributed": distributed, **figures(measured, setup.skip)}
        print(name, {k: v for k, v in results[name].items() if k != "losses"}, flush=True)
    result = {
        **result_header("fsdp", ".venv/bin/python bench/fsdp.py", load_before),
        "setup": asdict(setup),
        "candidates": results,
    }
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    main()
