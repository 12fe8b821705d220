"""torch.distributed, as torchrun sets it up: process group, reductions, launch.

No home-made distribution: a multi-process run is `torchrun` (or `tuneforge train --nproc N`,
which starts torchrun); each process learns its rank from the environment torchrun sets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> World:
    """Join the process group when started by torchrun; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":
            # Processes on one machine share its cores; oversubscribing them is much slower.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(args: list[str], nproc: int) -> int:
    """Run `tuneforge ARGS` under torchrun with `nproc` processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tuneforge", *args]
    return subprocess.call(cmd)
