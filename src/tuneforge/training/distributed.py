"""torch.distributed, as torchrun sets it up: process group, reductions, how the model is spread over
the processes, launch.

No home-made distribution: a multi-process run is `torchrun` (or `tuneforge train --nproc N`, with
`--nnodes` for several machines, which starts torchrun); each process learns its rank from the
environment torchrun sets. The model is spread with torch's own DDP (a full copy in every process,
gradients averaged) or FSDP2 (`fully_shard`: each process holds 1/N of the weights, gradients and
optimizer state, and gathers one decoder layer at a time to compute).

Every collective runs inside a named phase. A collective that fails (another process died) or
waits longer than the process group's timeout (another process is stuck, or the ranks diverged)
raises `RunFailed` naming this rank, the phase and what to check, instead of hanging; the process
then exits and torchrun stops the others.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..errors import LAUNCHER_SHOWS_ERRORS, RunFailed, TuneforgeError
from ..models import causal_lm

T = TypeVar("T")

# How long torchrun lets processes it stops (SIGTERM) finish their step and checkpoint before it kills them.
SHUTDOWN_TIMEOUT_S = 120
# How long a machine of a run over several waits at --master for the others to join (torchrun's default).
JOIN_TIMEOUT_S = 600


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this machine
    device: torch.device = torch.device("cpu")
    timeout: float = 1800.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def machines(self) -> int:
        return self.size // self.local_size


def setup(timeout: float = 1800.0) -> World:
    """Join the process group when started by torchrun; a single process otherwise. `timeout` is how
    long (seconds) a process waits for the others at any collective."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    refuse_more_processes_than_gpus(local_size)
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # On GPUs the step's counts and sums are still reduced as CPU tensors, which NCCL cannot
        # carry: gloo takes those, NCCL the model's gradients and shards.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        if device.type == "cpu":
            # Processes on one machine share its cores; oversubscribing them is much slower.
            torch.set_num_threads(max(1, cores_here() // local_size))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size, device=device, timeout=timeout)


def cores_here() -> int:
    """The CPU cores this process may run on: a job scheduler's or `taskset`'s share of the machine, which
    `os.cpu_count()` (every core of the machine) does not see."""
    if hasattr(os, "sched_getaffinity"):  # Linux; elsewhere every core is this process's
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def refuse_more_processes_than_gpus(processes_here: int) -> None:
    """Each process trains on a GPU of its own: on a machine with GPUs, more processes than GPUs
    are refused before any work (rather than failing on a device that does not exist)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and processes_here > gpus:
        raise TuneforgeError(
            f"{processes_here} processes on this machine, but it has {gpus} GPU(s) and each process trains on one "
            f"of its own. Start at most {gpus} (--nproc {gpus}); CUDA_VISIBLE_DEVICES chooses which GPUs."
        )


def warn_more_processes_than_cores(processes_here: int) -> None:
    """Without GPUs the processes share this machine's CPU cores, one thread each at least: more processes
    than cores take turns on them, which makes no step faster. The run goes on, with a warning."""
    cores = cores_here()
    if processes_here > cores and not torch.cuda.is_available():
        print(
            f"warning: --nproc {processes_here} on a machine with {cores} CPU cores and no GPU: the processes take "
            f"turns on the cores, so a step is no faster than with --nproc {cores}, and often slower.",
            file=sys.stderr,
        )


# --- how the model is spread over the processes ----------------------------------------------------


def trains_every_weight(cfg) -> bool:
    """Full fine-tuning, of the model itself or of a distillation student, DPO policy or reward model."""
    return (
        cfg.method == "full"
        or (cfg.method == "distill" and cfg.distill.student == "full")
        or (cfg.method == "dpo" and cfg.dpo.policy == "full")
        or (cfg.method == "reward" and cfg.reward.trains == "full")
    )


def strategy(cfg, processes: int, *, saves_merged: bool = False) -> str:
    """How the processes share the model: "single" (one process), "ddp" or "fsdp", as
    `train.distributed` asks ("auto": fsdp for full fine-tuning, ddp for adapters, whose weights and
    optimizer state are small). A combination that cannot work is refused here, before any work,
    with what to use instead. `saves_merged`: the final model is an adapter merged into its base
    (`methods.adapter_on_merged_base`)."""
    t = cfg.train
    chosen = "single" if processes == 1 else t.distributed
    if chosen == "auto":
        chosen = "fsdp" if trains_every_weight(cfg) else "ddp"
    if t.cpu_offload and chosen != "fsdp":
        raise TuneforgeError(
            "train.cpu_offload keeps FSDP's shards of the weights and optimizer state on the CPU; it needs "
            f"train.distributed: fsdp and at least 2 processes (this run: {processes}, {chosen}). "
            "Leave cpu_offload out, or run with --nproc 2 or more and distributed: fsdp."
        )
    if chosen != "fsdp":
        return chosen
    if t.replay_loss == "kl_to_base" and not t.kl_to_base and not trains_every_weight(cfg):
        raise TuneforgeError(
            "train.replay_loss: kl_to_base with an adapter runs the base model only on micro-batches that hold "
            "replay rows, while a sharded (FSDP) forward needs every process at once. Use train.distributed: "
            "ddp (or auto) for this run."
        )
    if saves_merged:
        raise TuneforgeError(
            "this run merges its adapter into the base model for the final model, which FSDP's sharded "
            "weights cannot do. Use train.distributed: ddp (or auto) for this run."
        )
    if t.keep_best:
        raise TuneforgeError(
            "train.keep_best loads the best checkpoint's weights into the model for the final model, which FSDP's "
            "sharded weights cannot take. Use train.distributed: ddp for this run (or auto, for adapters), or "
            "leave keep_best out and evaluate the best checkpoint (tuneforge eval takes a checkpoint folder)."
        )
    if t.eval_samples:
        raise TuneforgeError(
            f"{cfg.key_at('train.eval_samples')}: every process answers the sample prompts with its own copy of "
            "the weights, while a sharded (FSDP) forward needs every process at each token. Use "
            "train.distributed: ddp for this run, or leave train.eval_samples out."
        )
    if cfg.method == "grpo":
        raise TuneforgeError(
            "method: grpo samples answers of different lengths on each process, while a sharded (FSDP) forward "
            "needs every process at each token. Use train.distributed: ddp for this run."
        )
    if cfg.model.quantize != "none":
        raise TuneforgeError(
            f"{cfg.key_at('model.quantize')}, {cfg.key_at('train.distributed')}: model.quantize: "
            f"{cfg.model.quantize} holds the base in bitsandbytes' quantized layers, which FSDP cannot shard "
            "here. Use train.distributed: ddp (or auto): each process holds the quantized base, "
            "which is small, and only the adapter's gradients are shared."
        )
    return chosen


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _frozen_model(cfg) -> str | None:
    """The model a run holds whole beside the one it trains, if any (`methods.build_objective`)."""
    if cfg.method == "distill":
        return "the teacher"
    if cfg.method == "dpo" and cfg.dpo.policy == "full" and cfg.dpo.has_reference:
        return "the reference model"
    if cfg.method == "full" and (cfg.train.kl_to_base or cfg.train.replay_loss == "kl_to_base"):
        return "a frozen copy of the base model"
    return None


def sharding_plan(cfg, spread: str, processes: int, memory: dict) -> list[tuple[str, str]]:
    """What each process of a run on `processes` processes, shared as `spread` (`strategy`), holds:
    (label, text) rows for the dry run, from its memory plan (`dry_run.memory_plan`, already per process)."""
    how = {
        "single": "one process holds the whole model",
        "ddp": "ddp: each process holds a whole copy of the model and averages gradients with the others",
        "fsdp": f"fsdp: each process holds 1/{processes} of the weights, gradients and optimizer state, and "
        "gathers one decoder layer at a time to compute",
    }[spread]
    gradients = memory["trained weights and gradients"] / 2  # an fp32 gradient per trained fp32 weight
    held = (
        f"weights {_size(memory['frozen weights'] + gradients)}, gradients {_size(gradients)}, optimizer state "
        f"{_size(memory['optimizer state'])}"
        + (" (weights and optimizer state in CPU memory)" if cfg.train.cpu_offload else "")
    )
    if _frozen_model(cfg):
        held += f", and {_frozen_model(cfg)}, whole"
    return [
        ("processes", f"{processes}, {how} (train.distributed: {cfg.train.distributed})"),
        ("each process holds", held),
    ]


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers keeps whole when it splits a model
    (`_no_split_modules`), which are the decoder layers."""
    names = set(getattr(causal_lm(model), "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard(objective: torch.nn.Module, model: torch.nn.Module, world: World, *, bf16: bool, cpu_offload: bool):
    """FSDP2: each decoder layer is one unit that is gathered to compute and sharded again after;
    the objective is the root unit, holding the rest (embeddings, final norm, output layer). Weights
    are fp32 shards; `bf16` computes in bf16 copies. Gradients are reduced in fp32."""
    layers = decoder_layers(model)
    if not layers:
        raise TuneforgeError(
            f"FSDP shards a model by its decoder layers, and {type(causal_lm(model)).__name__} names none "
            "(transformers' _no_split_modules). Use train.distributed: ddp for this model."
        )
    options = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32),
        "offload_policy": CPUOffloadPolicy(pin_memory=world.device.type == "cuda") if cpu_offload else OffloadPolicy(),
    }
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(objective, **options)
    return objective


def skips_vision(model: torch.nn.Module, cfg, train_items) -> bool:
    """Whether the run trains a vision tower that some micro-batches leave out: every weight trains (a full GRPO
    policy too, which `trains_every_weight` leaves out as it runs under DDP alone) on a model that reads images, and
    some training rows show no image (the tower runs only on images)."""
    return (
        not cfg.trains_adapters
        and getattr(model.config, "vision_config", None) is not None
        and _some_without_images(train_items)
    )


def _some_without_images(train_items) -> bool:
    from ..data import shows_images

    return not all(shows_images([item]) for item in train_items)


def refuse_skipped_vision(cfg, spread: str, train_items) -> None:
    """Refuse, before the model loads, FSDP on rows with images and rows without under full fine-tuning: a process
    whose micro-batch shows no image has no gradients for the vision tower, and FSDP reduces every process's same
    gradients at once."""
    from ..data import shows_images

    fsdp_full = spread == "fsdp" and trains_every_weight(cfg)
    if fsdp_full and shows_images(train_items) and _some_without_images(train_items):
        raise TuneforgeError(
            f"{cfg.key_at('train.distributed')}: fsdp (auto picks it for full fine-tuning) with training rows "
            "of which some show images and some do not: a process whose micro-batch shows none computes no "
            "gradients for the vision tower, while FSDP reduces the same gradients on every process. Use "
            "train.distributed: ddp for this run, or train the text rows and the image rows in runs of their "
            "own."
        )


def wrap(
    objective: torch.nn.Module,
    model: torch.nn.Module,
    cfg,
    world: World,
    *,
    spread: str,
    bf16: bool,
    skipped_vision: bool = False,
):
    """The objective as the steps run it, as `strategy` chose (`spread`): as it is on one process,
    in DDP, or sharded by FSDP. `skipped_vision`: a trained vision tower some micro-batches leave out
    (`skips_vision`)."""
    if spread == "single":
        return objective
    with phase("setting up the model on every process", world):
        if spread == "fsdp":
            return shard(objective, model, world, bf16=bf16, cpu_offload=cfg.train.cpu_offload)
        # DDP waits for every trained parameter's gradient unless it looks for the ones a forward left out: the
        # vision tower's, on a micro-batch without images. A parameter no process used keeps no gradient, as on
        # one process.
        return torch.nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[world.device.index] if world.device.type == "cuda" else None,
            find_unused_parameters=skipped_vision,
        )


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in module.modules())


def gradient_sync(objective: torch.nn.Module, last: bool):
    """The context of one micro-batch's backward. DDP reduces gradients on the last micro-batch of a
    step only; FSDP reduces them on every one, which keeps each process's gradients a shard."""
    if last or not isinstance(objective, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return objective.no_sync()


def clip_grad_norm(parameters, max_norm: float, world: World, phase_name: str) -> float:
    """Clip the gradients to a global norm of `max_norm`; their norm before. Sharded gradients make
    the norm a collective."""
    with phase(phase_name, world):
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


# --- collectives -----------------------------------------------------------------------------------


def _is_collective_failure(error: BaseException) -> bool:
    # gloo raises plain RuntimeErrors from its transport; NCCL raises DistBackendError.
    text = str(error)
    return isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text


@contextlib.contextmanager
def phase(name: str, world: World):
    """Run collectives (explicit ones, and DDP's or FSDP's inside forward/backward) as the phase
    `name`: a failed or timed-out collective becomes a `RunFailed` that says which rank, where, and why."""
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
            "runs alone (preparing data, a distillation teacher's top-k pass, writing a checkpoint) takes longer "
            f"than that, raise it. ({first_line})"
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


def from_main(value, world: World, phase_name: str):
    """Rank 0's `value` (any picklable object), on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    with phase(phase_name, world):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def from_every_rank(value, world: World, phase_name: str) -> list:
    """Every rank's `value` (any picklable object), by rank, on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * world.size
    with phase(phase_name, world):
        dist.all_gather_object(values, value)
    return values


def barrier(world: World, phase_name: str) -> None:
    if dist.is_initialized():
        with phase(phase_name, world):
            dist.barrier()


def cached_by_rank_0_first(world: World, doing: str, work: Callable[[bool], T]) -> T:
    """`work(main)` for work a process writes to the cache under $TUNEFORGE_HOME and the others read from it:
    rank 0 does it (`main` true) while the others wait, then the first process of each other machine (which
    reads rank 0's entry where $TUNEFORGE_HOME is shared, and does the work again where it is not), then the
    other processes, which read their machine's entry. One process writes an entry at a time, and once."""
    if world.is_main:
        done = work(True)
    barrier(world, f"{doing} (rank 0 does it while the others wait)")
    if world.machines > 1:
        if world.local_rank == 0 and not world.is_main:
            done = work(False)
        barrier(world, f"{doing} (the first process of each machine does it for the machine)")
    if world.local_rank != 0:
        done = work(False)
    return done


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --- launch ----------------------------------------------------------------------------------------


def rendezvous(nnodes: int = 1, node_rank: int = 0, master: str | None = None) -> list[str]:
    """torchrun's rendezvous options: this machine alone, or `nnodes` machines meeting at `master`
    (ADDR:PORT of the machine with node rank 0, which hosts the rendezvous) through c10d."""
    if nnodes == 1:
        if master is not None or node_rank:
            raise TuneforgeError("--master and --node-rank are for runs over several machines (--nnodes 2 or more).")
        return ["--standalone"]
    host, _, port = (master or "").rpartition(":")
    if not host or not port.isdigit():
        raise TuneforgeError(
            f"--master {master}: give ADDR:PORT, the address of the machine started with --node-rank 0 and a free "
            "port on it (e.g. --master 10.0.0.1:29500); every machine gets the same --master."
        )
    if not 0 <= node_rank < nnodes:
        raise TuneforgeError(f"--node-rank {node_rank}: give 0 to {nnodes - 1} (one per machine; 0 hosts --master).")
    return [
        f"--nnodes={nnodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={master}",
        "--rdzv-id=tuneforge",
        f"--rdzv-conf=is_host={'true' if node_rank == 0 else 'false'},join_timeout={JOIN_TIMEOUT_S}",
    ]


def launch(args: list[str], nproc: int, *, nnodes: int = 1, node_rank: int = 0, master: str | None = None) -> int:
    """Run `tuneforge ARGS` under torchrun with `nproc` processes on this machine (of `nnodes`, see
    `rendezvous`). torchrun stops every process as soon as one fails; the exit code is then the
    failed process's own (2 for bad input, 1 for a failed run). An error a process reports (`cli.main`)
    is printed once per machine, by local rank 0; the launcher's own error adds what other processes
    said differently. A traceback is printed by the process it comes from."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousError
    from torch.distributed.run import get_args_parser, run

    refuse_more_processes_than_gpus(nproc)
    warn_more_processes_than_cores(nproc)
    options = [*rendezvous(nnodes, node_rank, master), f"--nproc-per-node={nproc}"]
    launcher = get_args_parser().parse_args([*options, "-m", "tuneforge", *args])
    os.environ[LAUNCHER_SHOWS_ERRORS] = "1"  # the processes inherit it
    try:
        with _failure_as_error(nproc * nnodes, shows_errors=True):
            run(launcher)
    except SignalException as stopped:
        # Ctrl-C (or SIGTERM) reached torchrun's agent, which passed it on to every process: they have
        # saved a checkpoint and said how to resume. The exit code is a signal's, as on one process (130).
        return 128 + int(stopped.sigval)
    except RendezvousError as unmet:
        if nnodes == 1:
            raise
        port = int(master.rpartition(":")[2])
        if isinstance(unmet, RendezvousConnectionError) and node_rank == 0 and port_in_use(port):
            raise RunFailed(
                f"machine 0 of {nnodes}: port {port} of --master {master} is in use on this machine (by another "
                "program or run), so it cannot host the rendezvous. Give a free port in --master, the same on every "
                "machine, or stop what holds it."
            ) from None
        what = (
            f"could not reach --master {master}"
            if isinstance(unmet, RendezvousConnectionError)
            else f"the machines did not all meet at --master {master} within {JOIN_TIMEOUT_S} s"
        )
        raise RunFailed(
            f"machine {node_rank} of {nnodes}: {what} ({type(unmet).__name__}: "
            f"{str(unmet).strip() or 'no more said'}). Start the same "
            "command on every machine, each with its own --node-rank from 0 to "
            f"{nnodes - 1}, and the same --nnodes and --master; --master is the address of the machine with "
            "--node-rank 0 and a port on it that every machine can reach."
        ) from None
    finally:
        os.environ.pop(LAUNCHER_SHOWS_ERRORS, None)
    return 0


def port_in_use(port: int) -> bool:
    """Whether another socket holds `port` on this machine, as the rendezvous host binds it (every
    address, SO_REUSEADDR)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return True
    return False


def launch_function(fn, args: tuple, nproc: int):
    """Run `fn(*args)` in `nproc` processes on this machine under torchrun's agent; rank 0's return
    value. Processes stopped by a signal get `SHUTDOWN_TIMEOUT_S` to finish their step and checkpoint.

    The processes are forked: a forked process hands its return value back and ends with `os._exit`,
    never finalizing the interpreter, where a gloo thread still freeing a finished run's tensors
    would abort it (as `cli.leave` explains). Forking also spares each process the imports."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    refuse_more_processes_than_gpus(nproc)
    config = LaunchConfig(
        start_method="fork",
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    with _failure_as_error(nproc):
        return elastic_launch(config, fn)(*args)[0]


def unshown_errors(failures: dict) -> dict[int, str]:
    """The messages (by rank) that failed processes handed to the launcher without printing them
    (`cli._show_error`), less those equal to the one their machine's local rank 0 printed: a refusal
    every process raises is shown once, a process's own different error still is."""
    said = {rank: f.error_file_data.get("message") for rank, f in failures.items() if f.error_file != "<N/A>"}
    shown = {said[rank] for rank, f in failures.items() if f.local_rank == 0 and rank in said}
    unshown: dict[int, str] = {}
    for rank in sorted(said):
        message = said[rank]
        if failures[rank].local_rank != 0 and isinstance(message, str) and message not in shown:
            unshown[rank] = message
            shown.add(message)
    return unshown


@contextlib.contextmanager
def _failure_as_error(processes: int, shows_errors: bool = False):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        yield
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        unshown = unshown_errors(failed.failures) if shows_errors else {}
        if failure.exitcode < 0:  # ended by a signal, before it could print anything
            name = failure.signal_name()  # "<N/A>" for a number Python has no name for (a real-time signal)
            name = f"signal {-failure.exitcode}" if name == "<N/A>" else name
            why = " (the system's out-of-memory killer ends processes so: see `dmesg`)" if name == "SIGKILL" else ""
            said = f"process {rank} of {processes} was ended by {name} (exit code {failure.exitcode}) and printed "
            said += f"no error{why}; torchrun stopped the others."
        else:
            said = f"process {rank} of {processes} stopped first (exit code {failure.exitcode}); torchrun stopped "
            said += "the others."
            said += f" Its error: {unshown.pop(rank)}" if rank in unshown else " Its error is printed above."
        said += "".join(f" Process {other} said: {message}" for other, message in unshown.items())
        error = RunFailed(said)
        error.exit_code = failure.exitcode if failure.exitcode > 0 else 1  # bad input stays 2, as in one process
        raise error from None
