"""torch.distributed, as torchrun sets it up: process group, reductions, launch.

No home-made distribution: a multi-process run is `torchrun` (or `tuneforge train --nproc N`,
which starts torchrun); each process learns its rank from the environment torchrun sets.

Every collective runs inside a named phase. A collective that fails (another process died) or
waits longer than the process group's timeout (another process is stuck, or the ranks diverged)
raises `RunFailed` naming this rank, the phase and what to check, instead of hanging; the process
then exits and torchrun stops the others.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import RunFailed


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout: float = 1800.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(timeout: float = 1800.0) -> World:
    """Join the process group when started by torchrun; a single process otherwise. `timeout` is how
    long (seconds) a process waits for the others at any collective."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout)
        )
        if device.type == "cpu":
            # Processes on one machine share its cores; oversubscribing them is much slower.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return World(rank=rank, size=size, local_rank=local_rank, device=device, timeout=timeout)


def _is_collective_failure(error: BaseException) -> bool:
    # gloo raises plain RuntimeErrors from its transport; NCCL raises DistBackendError.
    text = str(error)
    return isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text


@contextlib.contextmanager
def phase(name: str, world: World):
    """Run collectives (explicit ones, and DDP's inside forward/backward) as the phase `name`: a
    failed or timed-out collective becomes a `RunFailed` that says which rank, where, and why."""
    try:
        yield
    except RuntimeError as error:
        if world.size == 1 or not _is_collective_failure(error):
            raise
        first_line = str(error).strip().splitlines()[0][:300]
        raise RunFailed(
            f"rank {world.rank} of {world.size}: {name}: the other processes did not take part in time. Another "
            f"process failed (its error is printed above or below this one), or it is stuck or ran ahead; a process "
            f"waits for the others for train.distributed_timeout = {world.timeout:g} s. If a phase that one process "
            f"runs alone (preparing data, writing a checkpoint) takes longer than that, raise it. ({first_line})"
        ) from None


def all_sum(t: torch.Tensor, world: World, phase_name: str) -> torch.Tensor:
    if dist.is_initialized():
        with phase(phase_name, world):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_across(values: dict[str, float], world: World, phase_name: str) -> dict[str, float]:
    """Each value summed over all ranks, key by key, in one all-reduce (float64)."""
    totals = all_sum(torch.tensor(list(values.values()), dtype=torch.float64), world, phase_name)
    return dict(zip(values, totals.tolist()))


def barrier(world: World, phase_name: str) -> None:
    if dist.is_initialized():
        with phase(phase_name, world):
            dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(args: list[str], nproc: int) -> int:
    """Run `tuneforge ARGS` under torchrun with `nproc` processes on this machine. torchrun stops
    every process as soon as one fails; the exit code is then the failed process's own (2 for bad
    input, 1 for a failed run), and each process has printed its own error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launcher = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "tuneforge", *args])
    try:
        run(launcher)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1
        error = RunFailed(
            f"process {rank} of {nproc} stopped first (exit code {failure.exitcode}); torchrun "
            "stopped the others. Its error is printed above."
        )
        error.exit_code = code  # bad input stays exit code 2, as in a single process
        raise error from None
    return 0
