"""Checkpoints: everything an exact resume needs, written atomically, the last K kept.

A checkpoint folder is also a model folder: it holds the PEFT adapter (or the full HF model),
gathered on rank 0, and the tokenizer, so `tuneforge eval runs/x/checkpoints/step-40` works like on
any model. Beside them:
- `optimizer/`: the optimizer state, two fp32 tensors per trained weight and so the bulk of a
  checkpoint, as a sharded checkpoint of torch.distributed.checkpoint (DCP): each process writes
  the shards it holds, and DCP reshards them on load, so a run resumes on any number of processes;
- `scheduler.pt`, each process's RNG states (`rng-R.pt`) and `trainer_state.json` (step, tokens,
  config hash and the settings that change results, the sums of the steps not yet logged).

Every process writes into rank 0's temporary folder. Rank 0 checks that every file the DCP metadata
names and every process's RNG file is there (over several machines, the run folder must be one they
share), writes trainer_state.json last and renames the folder into place; a folder without
trainer_state.json is never taken for a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shlex
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from ..errors import RunFailed, TuneforgeError
from ..fsio import atomic_dir, write_json
from ..models.saving import on_residual_base, save_generation_config, save_tokenizer, save_weights
from . import distributed

STATE = "trainer_state.json"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler.pt"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def step_number(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def is_step(path: Path) -> bool:
    """Whether `path` is named as a checkpoint is written, `step-N`: a copy kept beside them (`step-40.bak`,
    `step-40-copy`) is none, so it is neither resumed nor pruned."""
    return re.fullmatch(r"step-\d+", path.name) is not None


def step_folders(root: Path) -> list[Path]:
    folders = [p for p in Path(root).glob("step-*") if is_step(p) and p.is_dir() and (p / STATE).is_file()]
    return sorted(folders, key=step_number)


def latest(root: Path) -> Path | None:
    folders = step_folders(root)
    return folders[-1] if folders else None


def latest_to_resume(root: Path) -> Path | None:
    """The latest checkpoint, once no step past it is left unreadable (`damaged_past_latest`): a damaged one is
    refused rather than passed over for an earlier checkpoint the user did not choose."""
    if damaged := damaged_past_latest(root):
        raise _damaged(*damaged)
    return latest(root)


def newest_whole(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose files a resume reads are all there and readable (`read_state`), for a resume
    no one is there to choose (a job's, after its server restarts), and the damaged ones past it, newest first,
    each with what is wrong with it."""
    skipped = [damaged] if (damaged := damaged_past_latest(root)) else []
    for folder in reversed(step_folders(root)):
        try:
            read_state(folder)
        except DamagedCheckpoint as err:
            skipped.append((folder, err.what))
            continue
        except RunFailed:
            pass  # whole, but written by an earlier version of tuneforge: the resume from it says so
        return folder, skipped
    return None, skipped


def damaged_past_latest(root: Path) -> tuple[Path, str] | None:
    """The newest `step-N` past the latest checkpoint that is unreadable, and what is wrong with it: one without
    trainer_state.json (its last file, so a copy cut short or a file deleted since), or a file of that name; None
    where there is none."""
    found = latest(root)
    after = step_number(found) if found else -1
    unreadable = [
        path
        for path in Path(root).glob("step-*")
        if is_step(path) and step_number(path) > after and not (path / STATE).is_file()
    ]
    if not unreadable:
        return None
    newest = max(unreadable, key=step_number)
    return newest, "it is a file, not a checkpoint folder" if newest.is_file() else f"{STATE} is missing"


# --- the model's weights ---------------------------------------------------------------------------


def gathered_weights(model, world: distributed.World, phase_name: str) -> dict | None:
    """For a sharded model, the weights `save_pretrained` writes (all of a full model, the trained
    ones of an adapter), gathered into rank 0's CPU memory; the other ranks get none. None for a
    model that is not sharded: it saves its own."""
    if not distributed.is_sharded(model):
        return None
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=hasattr(model, "peft_config")
    )
    with distributed.phase(phase_name, world):
        return _tied_as_in_model(model, get_model_state_dict(model, options=options))


class GatheredModel:
    """A sharded model as `models.saving.save_model` sees it: the model's own attributes, except that
    `save_pretrained` writes the weights gathered on rank 0."""

    def __init__(self, model, weights: dict):
        self._model, self._weights = model, weights

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def save_pretrained(self, folder, **kwargs):
        # The gathered weights in place of any state_dict the caller passes (`save_weights` passes None).
        return self._model.save_pretrained(folder, **{**kwargs, "state_dict": self._weights})


def _tied_as_in_model(model, weights: dict) -> dict:
    """The gathered weights with a weight the model ties to another (`lm_head` to the input embeddings) the very
    tensor of the one it is tied to: gathering copies each, and `save_pretrained` drops a tied weight only where it
    shares the other's memory, so the copy would otherwise be written twice."""
    tied = {
        target: weights[source]
        for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()
        if target in weights and source in weights
    }
    return {**weights, **tied}


def savable(model, weights: dict | None):
    """What to hand `save_model`: the model, or for a sharded one its gathered weights (`gathered_weights`)."""
    return model if weights is None else GatheredModel(model, weights)


def restore_weights(folder: Path, model) -> None:
    """Load a checkpoint's weights into the model, before it is wrapped (DDP) or sharded (FSDP)."""
    folder = Path(folder)
    lora = hasattr(model, "peft_config")
    adapter, full = (folder / "adapter_model.safetensors").is_file(), any(folder.glob("model*.safetensors"))
    if adapter != full and adapter != lora:  # the weights of the other kind only, full or LoRA
        holds = (
            "a full model's weights (model.safetensors: a run that trains every weight wrote it)"
            if full
            else "a LoRA adapter (adapter_model.safetensors)"
        )
        raise RunFailed(
            f"{folder} holds {holds}, and this run trains {'a LoRA adapter' if lora else 'every weight'}. Resume "
            "from a checkpoint of this run, or start a new run with the checkpoint as base_model "
            f"({shlex.quote(str(folder))})."
        )
    if lora:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        with _reading(folder, "adapter_model.safetensors"):
            weights = load_file(folder / "adapter_model.safetensors")
        own = get_peft_model_state_dict(model)
        start = getattr(model, "adapter_start", None)  # PiSSA or OLoRA, saved on the original base (rank 2r)
        # A forced resume of another lora.r or lora.init: the adapter's shapes say so before torch's size errors.
        wrong = next(
            (
                key
                for key, value in weights.items()
                if key in own and value.shape != _as_saved(own[key], (start or {}).get(key), key)
            ),
            None,
        )
        if wrong is not None:
            raise RunFailed(
                f"{folder}: the checkpoint's adapter weight {wrong} is {list(weights[wrong].shape)}, and this run's "
                f"adapter writes it as {list(_as_saved(own[wrong], (start or {}).get(wrong), wrong))}: the "
                "checkpoint was written with another lora.r or lora.init. Resume with the settings it was written "
                "with, or start the run afresh."
            )
        if start:
            weights = on_residual_base(weights, start, folder)
        result = set_peft_model_state_dict(model, weights)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
    else:
        weights = {}
        for file in sorted(folder.glob("model*.safetensors")):  # one file, or the shards of a large model
            with _reading(folder, file.name):
                weights.update(load_file(file))
        result = model.load_state_dict(weights, strict=False)
        unexpected = list(result.unexpected_keys)
        # save_pretrained drops tied copies (lm_head == embed_tokens); anything else missing is real.
        tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")}
        missing = [k for k in result.missing_keys if k not in tied]
        if missing:
            raise RunFailed(
                f"{folder}: checkpoint lacks weights {missing[:3]}...; it was written by another model or method."
            )
    if unexpected:
        raise RunFailed(
            f"{folder}: checkpoint has weights this model lacks ({unexpected[:3]}...); "
            "was it written by another method?"
        )


def _as_saved(weight: torch.Tensor, first: torch.Tensor | None, key: str) -> torch.Size:
    """The shape `weight` of the model's adapter is saved in: a PiSSA or OLoRA A or B (`first`, its start) with
    its start beside it (`models.saving.on_original_base`)."""
    if first is None:
        return weight.shape
    dim = 0 if ".lora_A." in key else 1
    shape = list(weight.shape)
    shape[dim] += first.shape[dim]
    return torch.Size(shape)


# --- saving and resuming ---------------------------------------------------------------------------


@contextlib.contextmanager
def _shared_temporary(final: Path, world: distributed.World, phase_name: str):
    """Rank 0's temporary folder for `final`, on every process; rank 0 renames it into place at the
    end, or removes it on an error."""
    with atomic_dir(final, replace=True) if world.is_main else contextlib.nullcontext() as tmp:
        yield distributed.from_main(tmp, world, phase_name)


def _shard_bytes(folder: Path) -> dict[str, int]:
    """Each file of the optimizer's shards that its DCP metadata names, with the bytes the metadata places in it."""
    needed: dict[str, int] = {}
    for info in dcp.FileSystemReader(folder / OPTIMIZER).read_metadata().storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    return needed


def _missing_shards(folder: Path, processes: int, shards: dict[str, int] | None = None) -> list[str]:
    """The files of the optimizer's shards (`shards`, read from its DCP metadata where not given) and of the first
    `processes` processes' RNG states that `folder` lacks."""
    expected = {folder / OPTIMIZER / name for name in (_shard_bytes(folder) if shards is None else shards)}
    expected |= {folder / rng_file(rank) for rank in range(processes)}
    return sorted(str(path.relative_to(folder)) for path in expected if not path.is_file())


def _short_shards(folder: Path, shards: dict[str, int]) -> list[str]:
    """The optimizer's shard files in `folder` shorter than the bytes its DCP metadata places in them (`shards`, a
    copy cut short), each with its size and the size it needs: found before any model loads, naming the file,
    where DCP's own read would fail later on whichever process reads it first."""
    short = []
    for name, size in sorted(shards.items()):
        path = folder / OPTIMIZER / name
        if path.is_file() and path.stat().st_size < size:
            short.append(f"{OPTIMIZER}/{name} ({path.stat().st_size:,} of {size:,} bytes)")
    return short


def _check_complete(folder: Path, processes: int) -> None:
    """Every file the processes wrote is in rank 0's folder (on several machines: a folder they share)."""
    missing = _missing_shards(folder, processes)
    if missing:
        raise RunFailed(
            f"checkpoint {folder.name}: files the other processes wrote are not in {folder.parent} "
            f"({', '.join(missing[:3])}). On several machines, output_dir must be a folder they all share "
            "(a network file system): each process writes its own shards of a checkpoint there."
        )


@contextlib.contextmanager
def _one_process_quietly():
    """DCP warns at every save and load of a one-process run that it assumes one process: what
    `no_dist` asks of it, so the warning tells the user nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized")
        yield


@contextlib.contextmanager
def _machine_refusal_names(folder: Path):
    """DCP gathers the processes' failures into one CheckpointException; a write the machine refused (a full
    disk, a file size limit) is raised as that OSError, naming the checkpoint `folder`, so it is told like any
    path the machine refuses rather than as a traceback."""
    try:
        yield
    except CheckpointException as error:
        cause = next(iter(error.failures.values()))[0]
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, cause.strerror, str(folder)) from error
        raise


def save(
    root: Path,
    step: int,
    model,
    tokenizer,
    base_path: Path,
    optimizer,
    scheduler,
    state: dict,
    keep: int,
    world: distributed.World,
    keep_also: int | None = None,
) -> Path:
    """Write checkpoint `step-STEP` (every process takes part) and keep the last `keep`, and step
    `keep_also`'s besides (the best one, `train.keep_best`); its tokenizer files and generation config
    are a model folder's, `base_path`'s tokenizer.model among them."""
    root, phase = Path(root), f"writing checkpoint step-{step}"
    weights = gathered_weights(model, world, phase)
    with distributed.phase(phase, world):
        optimizer_state = get_optimizer_state_dict(model, optimizer)
    if world.is_main:
        for stale in root.glob(".tmp-step-*"):  # left by a run killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
    with _shared_temporary(root / f"step-{step}", world, phase) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)  # there already, unless this machine does not share it
        torch.save(rng_states(), tmp / rng_file(world.rank))
        with distributed.phase(phase, world):
            # Returns once every process has written its shards.
            with _one_process_quietly(), _machine_refusal_names(root / f"step-{step}"):
                dcp.save(optimizer_state, checkpoint_id=tmp / OPTIMIZER, no_dist=world.size == 1)
        if world.is_main:
            save_weights(model, tmp, weights)
            save_tokenizer(tokenizer, base_path, tmp)
            save_generation_config(model, tokenizer, tmp)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER)
            _check_complete(tmp, world.size)
            write_json(tmp / STATE, state)
    if world.is_main:
        # Checkpoints past this step were written before this run resumed from an earlier one: they continue
        # the run it replaces, so they go, damaged ones too (else `latest` would resume them and pruning would
        # keep them instead, and `latest_to_resume` would refuse a damaged one).
        folders = step_folders(root)
        kept = [folder for folder in folders if step_number(folder) <= step][-keep:]
        kept += [folder for folder in folders if step_number(folder) == keep_also]
        later = [path for path in root.glob("step-*") if is_step(path) and step_number(path) > step]
        for old in {*folders, *later} - set(kept):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:  # a file of a checkpoint's name, which `latest_to_resume` refuses
                old.unlink(missing_ok=True)
    distributed.barrier(world, f"{phase} (rank 0 completes it while the others wait)")
    return root / f"step-{step}"


class DamagedCheckpoint(TuneforgeError):
    """A checkpoint that cannot be read: its `folder`, and `what` is wrong with it."""

    def __init__(self, message: str, folder: Path, what: str):
        super().__init__(message, code="checkpoint_damaged")
        self.folder, self.what = folder, what


def _damaged(folder: Path, what: str) -> DamagedCheckpoint:
    """A checkpoint that cannot be read, and the earlier checkpoints to resume from instead."""
    others = step_folders(folder.parent)
    names = [other.name for other in others]
    earlier = others[: names.index(folder.name)] if folder.name in names else others
    instead = (
        f"resume from an earlier one (--resume {shlex.quote(str(earlier[-1]))})"
        if earlier
        else "no earlier checkpoint is left to resume from"
    )
    return DamagedCheckpoint(
        f"{folder}: {what}. If the checkpoint is damaged (a copy cut short, a full disk), {instead}, "
        "or start the run over with --overwrite.",
        folder,
        what,
    )


@contextlib.contextmanager
def _reading(folder: Path, name: str):
    """Reading checkpoint file `name`: a missing, truncated or garbled one is an error that names it."""
    try:
        yield
    except TuneforgeError:
        raise
    except (Exception, CheckpointException) as error:
        # DCP gathers the processes' failures into one CheckpointException: the first says what went wrong.
        cause = next(iter(error.failures.values()))[0] if isinstance(error, CheckpointException) else error
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        raise _damaged(folder, f"{name} cannot be read ({first_line})") from None


def read_state(folder: Path) -> dict:
    """The loop state saved in checkpoint `folder` (step, tokens, config hash), once every file a
    resume reads is found there: a checkpoint missing one fails here, before the model loads."""
    folder = Path(folder)
    if not (folder / OPTIMIZER).is_dir():
        raise RunFailed(
            f"{folder} was written by an earlier version of tuneforge (its optimizer state is not sharded); "
            "finish the run with that version, or start it again without --resume."
        )
    with _reading(folder, f"{OPTIMIZER}/.metadata"):
        shards = _shard_bytes(folder)
    missing = _missing_shards(folder, 1, shards)
    missing += [SCHEDULER] if not (folder / SCHEDULER).is_file() else []
    if not any(folder.glob("*model*.safetensors")):
        missing.append("its weights (adapter_model.safetensors or model.safetensors)")
    if missing:
        raise _damaged(folder, f"files are missing: {', '.join(missing[:3])}")
    short = _short_shards(folder, shards)
    if short:
        raise _damaged(folder, f"files are cut short: {', '.join(short[:3])}")
    with _reading(folder, STATE):
        state = json.loads((folder / STATE).read_text())
    _check_state(folder, state)
    return state


# The loop state's fields a resume reads, and what each holds; the others (data_key, best, ...) are optional.
_STATE_FIELDS = {
    "step": (int, "a whole number, 0 or more"),
    "tokens": (int, "a whole number, 0 or more"),
    "elapsed": ((int, float), "a number of seconds"),
    "config_hash": (str, "a string"),
}


def _check_state(folder: Path, state) -> None:
    """A trainer_state.json an edit or another program left without a field the resume reads, or with one of
    another type, is refused naming the field, as a damaged checkpoint."""
    if not isinstance(state, dict):
        raise _damaged(folder, f"{STATE} holds a JSON {type(state).__name__}, not the object of the loop state")
    for key, (kind, what) in _STATE_FIELDS.items():
        if key not in state:
            raise _damaged(folder, f"{STATE} has no field {key!r}")
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
            raise _damaged(folder, f"{STATE}'s field {key!r} is {json.dumps(value)}, not {what}")
    # A checkpoint is written as step-STEP: a state of another step was copied in from another checkpoint.
    if is_step(folder) and state["step"] != step_number(folder):
        raise _damaged(
            folder, f"{STATE} is step {state['step']}'s, not {folder.name}'s (copied from another checkpoint)"
        )


def _check_parameter_groups(folder: Path, optimizer) -> None:
    """The optimizer this run's config builds splits the parameters into as many groups as the saved one
    did: a resume with --force may have changed a setting that splits them (LoRA+'s ratio), and the saved
    state then cannot be placed, though the checkpoint is whole. A saved group with no parameters
    (earlier versions kept one) holds no state and is not counted."""
    with _reading(folder, f"{OPTIMIZER}/.metadata"):
        keys = dcp.FileSystemReader(folder / OPTIMIZER).read_metadata().state_dict_metadata
    # Each process reads the groups' parameter names on its own, from the same files.
    groups = {key: [] for key in keys if key.startswith("param_groups.") and key.endswith(".params")}
    with _reading(folder, f"the optimizer state in {OPTIMIZER}/"), _one_process_quietly():
        dcp.load(groups, checkpoint_id=folder / OPTIMIZER, no_dist=True)
    saved = sum(1 for params in groups.values() if params)
    if saved != len(optimizer.param_groups):
        raise TuneforgeError(
            f"{folder} was saved by an optimizer with {saved} parameter group(s), and this run's config makes "
            f"{len(optimizer.param_groups)}: a setting that groups the parameters (lora.loraplus_lr_ratio, say) "
            "changed. Resume with the setting the checkpoint was saved with, or start a new run.",
            code="resume_mismatch",
        )


def load(folder: Path, model, optimizer, scheduler, world: distributed.World) -> dict:
    """Restore the optimizer state (resharded for this run's processes), the scheduler and the RNG
    states, and return the saved loop state. The weights come first, from `restore_weights`.

    On as many processes as the run that wrote it, each process takes its own RNG states, so the
    resumed run draws the random numbers the uninterrupted one would; on more, the new ones take
    rank 0's."""
    folder = Path(folder)
    _check_parameter_groups(folder, optimizer)
    configured = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    # Outside the phase, which tells a failed collective from a file that cannot be read.
    with (
        _reading(folder, f"the optimizer state in {OPTIMIZER}/"),
        distributed.phase(f"resuming from {folder.name}", world),
    ):
        optimizer_state = get_optimizer_state_dict(model, optimizer)
        with _one_process_quietly():
            dcp.load(optimizer_state, checkpoint_id=folder / OPTIMIZER, no_dist=world.size == 1)
        set_optimizer_state_dict(model, optimizer, optimizer_state)
    # The checkpoint gives the optimizer's moments and the schedule's step; the learning rates and weight
    # decay are this run's config's, which a resume with --force may have changed.
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    with _reading(folder, SCHEDULER):
        scheduler_state = torch.load(folder / SCHEDULER, weights_only=True)
    scheduler.load_state_dict({**scheduler_state, "base_lrs": scheduler.base_lrs})
    # The step's rate follows from the config's rates: the scheduler takes the saved step again to set it.
    scheduler.last_epoch -= 1
    scheduler.step()
    own = folder / rng_file(world.rank)
    rng = own if own.is_file() else folder / rng_file(0)
    with _reading(folder, rng.name):
        saved_rng = torch.load(rng, weights_only=False)
    set_rng_states(saved_rng)
    return read_state(folder)
