"""A training run that records what each process holds: `python -m torch.distributed.run ... fsdp_run.py
CONFIG OUT` (or `main` in one process). It trains as CONFIG says and, after the first optimizer step,
writes this process's bytes of parameters, gradients and optimizer state, counted from the tensors
(under FSDP: its shards), to OUT/held-RANK.json."""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from tuneforge.cli import leave
from tuneforge.training import loop


def local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def held_bytes(run: loop.Run) -> dict[str, int]:
    params = list(run.model.parameters())
    state = [v for per_param in run.optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
    return {
        "parameters": local_bytes(params),
        "gradients": local_bytes(p.grad for p in params if p.grad is not None),
        "optimizer": local_bytes(state),
    }


def main(config: str, out: str) -> None:
    """`loop.train` itself, its setup wrapped to install the measurement: the run starts and ends
    (process group included) as `tuneforge train` runs it."""
    setup = loop.setup

    def setup_and_measure(cfg, world, **options) -> loop.Run:
        run = setup(cfg, world, **options)
        record = Path(out) / f"held-{world.rank}.json"
        zero_grad, measured = run.optimizer.zero_grad, weakref.ref(run)  # no cycle keeps the run alive

        def measure_then_zero_grad(*args, **kwargs):  # right after an optimizer step, gradients and state both exist
            if not record.exists():
                record.write_text(json.dumps(held_bytes(measured())))
            zero_grad(*args, **kwargs)

        run.optimizer.zero_grad = measure_then_zero_grad
        return run

    loop.setup = setup_and_measure
    try:
        loop.train(config, progress=False)
    finally:
        loop.setup = setup  # `main` also runs inside the test process


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave(0)  # as `tuneforge train` ends a process of a multi-process run
