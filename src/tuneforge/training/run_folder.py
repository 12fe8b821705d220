"""A run's output_dir as a run starts in it: the refusals that keep runs and their files apart, and resuming.

- `check_output_dir`, `earlier_run`, `refuse_earlier_run`, `clear_earlier_run`: a new run never mixes with
  or silently replaces an earlier one (`--resume` continues it, `--overwrite` starts over);
- `sole_run_in`: one run at a time writes a folder (a lock that goes with its process, which `training_process`
  and `is_training` read), seen by every process; `refuse_other_runs_on_other_machines`: every process runs
  the same config on the same data;
- `resume_point`, `check_resumable`, `check_same_data`: the checkpoint a resumed run continues from,
  refused where the config, the plan or the data changed since it was written;
- `restart_step_log`: the JSON-lines logs cut back to the checkpoint's step.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config, changed_settings, dotted, load_config
from ..data.cache import CACHE_FORMAT
from ..data.prepare import hash_data
from ..errors import ConfigError, TuneforgeError
from ..fsio import atomic_file, writing
from ..methods.grpo import ROLLOUTS_FILE
from . import checkpoint, distributed
from .trackers import IDS_FILE

if TYPE_CHECKING:
    from .loop import StepPlan


def restart_step_log(path: Path, resume_step: int | None) -> list[dict]:
    """A JSON-lines file of records by step, as a run starts: emptied for a fresh run; for a resumed
    one, cut to the records up to its checkpoint's step, since the steps after it run again. The full
    validation's record (its `full_valid_` metrics, its samples marked `full_valid`) goes too: it is
    written after the last checkpoint, and a run resumed there (to redo its final model) writes it
    again. A last line cut short (a run stopped while writing it, a full disk) goes too: its step runs
    again. Returns the records kept."""
    if resume_step is None:
        path.write_text("")
        return []
    kept = []
    if path.exists():
        text = path.read_text()
        lines = []
        for number, ln in enumerate(text.splitlines(), 1):
            if not ln:
                continue
            try:
                record = json.loads(ln)
            except json.JSONDecodeError as error:
                if text.endswith(ln):  # the last line, cut short as the run wrote it: its step runs again
                    continue
                problem = f"{error.msg}: character {error.pos + 1}"
            else:
                step = record.get("step", 0) if isinstance(record, dict) else None
                if type(step) is int:
                    lines.append((ln, record))
                    continue
                problem = "an object with an integer step, such as the run writes, was expected"
            # A line the run finished writing is whole: this one was damaged since.
            raise TuneforgeError(
                f"{path}:{number}: not a JSON record ({problem}); the run writes one a line. Restore "
                "the file, or delete the line and resume again.",
                code="metrics_damaged",
            )
        kept = [
            (ln, record)
            for ln, record in lines
            if record.get("step", 0) <= resume_step and not any(key.startswith("full_valid") for key in record)
        ]
        with atomic_file(path) as f:
            f.write("".join(ln + "\n" for ln, _ in kept))
    return [record for _, record in kept]


def resume_point(cfg: Config, resume: str | bool | None, force: bool) -> tuple[Path, dict] | tuple[None, None]:
    """The checkpoint to resume from and the loop state saved in it: the latest for "latest" or True (the
    Python spelling of a bare `--resume`), else the folder `resume` names; a refused resume fails here,
    before any heavy work."""
    if resume is not None and not isinstance(resume, str | Path | bool):
        raise TuneforgeError(
            f'--resume takes True or "latest" (the latest checkpoint) or a checkpoint folder\'s path, got {resume!r}.',
            code="bad_option",
        )
    if not resume:
        return None, None
    root = Path(cfg.output_dir) / "checkpoints"
    folder = checkpoint.latest_to_resume(root) if resume is True or resume == "latest" else Path(resume)
    if folder is None:
        raise TuneforgeError(f"no checkpoint to resume from at {root}{_no_checkpoint_advice(cfg)}.")
    if not (folder / checkpoint.STATE).is_file():
        # A folder named by hand that is no checkpoint (the run folder, a step since deleted): the run's own
        # checkpoints are what the user meant to pick from.
        kept = checkpoint.step_folders(root)
        choices = (
            f"the checkpoints of {cfg.output_dir} are {', '.join(str(p) for p in kept)}: resume from one of them, "
            "or give --resume alone for the latest"
            if kept
            else f"{cfg.output_dir} has no checkpoints; start without --resume"
        )
        what = "does not exist" if not folder.exists() else f"is not a checkpoint (it has no {checkpoint.STATE})"
        raise TuneforgeError(f"--resume {folder} {what}; {choices}.", code="bad_option")
    saved = checkpoint.read_state(folder)
    if saved["config_hash"] != cfg.results_hash() and not force:
        changes, compared = changes_since(cfg, saved)
        shown = f": {', '.join(changes)} ({compared})" if changes else ""
        advice = "Resume with the original config, or pass --force to continue anyway."
        if changes and all(change.startswith(("train.max_steps:", "train.epochs:")) for change in changes):
            # The schedule spans the run's steps: another length moves the saved step within it.
            advice = (
                "The run's length changed: --force continues its learning-rate schedule fitted to the new length "
                "(from the saved step on, its rates are the new schedule's); to train the run further on a schedule "
                f"of its own, start a new run from this checkpoint (base_model: "
                f"{shlex.quote(str(folder.absolute()))}, another output_dir); or resume with the original config."
            )
        raise TuneforgeError(
            f"{folder} was written with a different config (one that changes results){shown}. {advice}"
        )
    return folder, saved


def _no_checkpoint_advice(cfg: Config) -> str:
    """Where a relative output_dir was looked for, and the run folder the config file sits in where that
    one has checkpoints: a run's own config.yaml, given from another working directory, names a folder there."""
    if Path(cfg.output_dir).is_absolute():
        return "; start without --resume"
    said = f" (output_dir {cfg.output_dir} is read against the working directory, {Path.cwd()})"
    own = Path(cfg._source).absolute().parent
    if Path(cfg._source).is_file() and checkpoint.latest(own / "checkpoints") is not None:
        return (
            f"{said}; the config sits in the run folder {own}, which has checkpoints: resume it with the "
            f"override output_dir={shlex.quote(str(own))}, or from the folder the run started in"
        )
    return f"{said}; start without --resume"


def changes_since(cfg: Config, saved: dict) -> tuple[list[str], str]:
    """`KEY: then -> now` for each setting that changes results, from the config that wrote the checkpoint whose
    loop state is `saved` to `cfg`, and what the first values are from: the run's config.yaml where it is that
    config (its whole settings shown), else the settings the checkpoint recorded (config.yaml edited since, or
    rewritten by a forced resume); none for a checkpoint that recorded none, from an earlier version."""
    written = Path(cfg.output_dir) / "config.yaml"
    try:
        earlier = load_config(written)
    except TuneforgeError:
        earlier = None
    if earlier is not None and earlier.results_hash() == saved["config_hash"]:
        return earlier.changed_results_settings(cfg), f"the original is {written}"
    if isinstance(recorded := saved.get("results_settings"), dict):
        return changed_settings(recorded, cfg, recorded), "the checkpoint's value first, then this config's"
    return [], ""


def check_resumable(folder: Path, saved: dict, plan: StepPlan) -> None:
    """A checkpoint (`folder`, its loop state `saved`) past this run's last step is refused: its final
    checkpoint and model would be saved under that step, with the weights of the later one (a config
    changed with --force, or data that shrank)."""
    step = saved["step"]
    if step > plan.total_steps:
        raise TuneforgeError(
            f"{folder} is at step {step}, past this run's last step ({plan.total_steps}: train.max_steps, or "
            "train.epochs over the data). Resume with a config that runs at least as many steps, or use the "
            "checkpoint as it is (tuneforge eval and export take it).",
            code="resume_past_end",
        )


def check_same_data(folder: Path, saved: dict, data_key: str | None) -> None:
    """Data files whose contents changed since checkpoint `folder` (its loop state `saved`) was written
    are refused: the rows of each step are drawn from the data, so the resumed run would not continue
    the run it began."""
    saved_key = saved.get("data_key")  # none in checkpoints of earlier versions
    if not (saved_key and data_key and saved_key != data_key):
        return
    # The key holds how tuneforge prepares data (its cache format) beside the files and the tokenizer: the
    # checkpoint of a version that prepared data otherwise (or recorded no format) has a key that differs
    # though the files are as they were.
    saved_format = saved.get("data_format")
    if saved_format != CACHE_FORMAT:
        written_by = f"data format {saved_format}" if saved_format is not None else "a data format it did not record"
        raise TuneforgeError(
            f"{folder} was written by another version of tuneforge ({written_by}; this version prepares data in "
            f"format {CACHE_FORMAT}), so whether data.train, data.validation, the replay file or the base model's "
            "tokenizer changed since cannot be told from it. If they are as they were, pass --force to continue on "
            "the data as this version prepares it (its rows may be tokenized or drawn otherwise than in the run it "
            "continues); else resume with the data as it was.",
            code="data_changed",
        )
    raise TuneforgeError(
        f"the data changed since {folder} was written (the contents of data.train, data.validation or the "
        "replay file, or the base model's tokenizer): the resumed run would train on other rows than the run "
        "it continues. Resume with the data as it was, or pass --force to continue on the data as it is now.",
        code="data_changed",
    )


def check_output_dir(cfg: Config) -> None:
    """Refuse an output_dir where a file is in the way: at its path, or at a folder's above it."""
    out = Path(cfg.output_dir).absolute()
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"{cfg.key_at('output_dir')}: {existing} is a file, not a folder, and a run writes its files under "
            f"{out}; give output_dir a folder's path, or move the file."
        )


def earlier_run(out: Path) -> str | None:
    """What an earlier run left in `out` that a new run there would replace, in words; None if nothing."""
    steps = [folder.name for folder in checkpoint.step_folders(out / "checkpoints")]
    held = [f"checkpoints {', '.join(steps)}"] if steps else []
    held += ["a final model"] if (out / "final").is_dir() else []
    return " and ".join(held) or None


RUN_FILES = (
    "checkpoints",
    "final",
    "eval",
    "tensorboard",
    "wandb",
    IDS_FILE,
    "summary.json",
    "metrics.jsonl",
    "config.yaml",
    "data_report.json",
    ROLLOUTS_FILE,
)
"""What a run writes in its output_dir: all of it goes when `--overwrite` starts a new run there."""


def refuse_earlier_run(out: Path, resume: str | bool | None, overwrite: bool) -> bool:
    """A run started afresh where an earlier run left checkpoints or a final model is refused: the two
    runs' checkpoints would mix (the newest step numbers kept, whichever run wrote them), `--resume`
    would continue the wrong run, and the earlier final model would be replaced unasked. With
    `overwrite` it goes on; whether there is an earlier run for `clear_earlier_run` to delete is returned."""
    held = None if resume else earlier_run(out)
    if held and not overwrite:
        raise TuneforgeError(
            f"{out} holds an earlier run ({held}). Continue it with --resume, give this run another "
            "output_dir, or pass --overwrite to start over, deleting all that run wrote (checkpoints, final "
            "model, metrics, evaluation) once this run passes its checks.",
            code="run_exists",
        )
    return held is not None


def forget_refused_report(out: Path) -> None:
    """Delete the data_report.json a run refused by its data left alone in `out` (a run that starts writes
    config.yaml beside it): it is that run's, and this run, refused before its data passes, would leave it
    to read as its own."""
    if not (out / "config.yaml").exists():
        (out / "data_report.json").unlink(missing_ok=True)


def clear_earlier_run(out: Path) -> None:
    """Delete every file of the earlier run in `out`, once the new run's data, model and plan are checked:
    a run refused before its first step leaves the earlier one whole, and one that starts leaves no file of
    the earlier one (its summary or evaluation) beside its own."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


RUN_LOCK = ".train.lock"
"""Held by the training run writing its output_dir; it says which process that is, and on which machine."""
MACHINE = socket.gethostname()


def _lock_holder(lock) -> str:
    """The process an open RUN_LOCK names: its first line, as the run holding it writes it."""
    lock.seek(0)
    return lock.readline().strip() or "unknown"


def training_process(out: Path) -> str | None:
    """The process (as RUN_LOCK names it) of the training run writing `out`, while one holds its lock; None where
    none does (a run that ended leaves the file, its lock released with the process)."""
    try:
        lock = open(out / RUN_LOCK)
    except OSError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(lock)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return None


def _in_use(out: Path, holder: str) -> TuneforgeError:
    return TuneforgeError(
        f"{out} is in use by another training run (process {holder}): two runs there would overwrite each "
        "other's checkpoints and final model. Wait for it to end (or stop it and continue it with --resume), "
        "or give this run another output_dir.",
        code="run_in_progress",
    )


def refuse_run_in_progress(out: Path) -> None:
    """A run whose output_dir another run is training in is refused by `check_before_launch`, before any work: by
    the launcher of several processes, once, before torchrun starts them, and by a sweep for each point
    (`sole_run_in` refuses it again as the run starts, should one start meanwhile)."""
    holder = training_process(out)
    if holder is not None:
        raise _in_use(out, holder)


def is_training(out: Path) -> bool | None:
    """Whether a training run writes `out` now, as its RUN_LOCK tells: True while a process holds it; False where
    none does and a run on this machine wrote it (the lock went with that run's process); None where the lock
    cannot tell: there is none, or a run on another machine wrote it (that machine's lock may not show here)."""
    if training_process(out) is not None:
        return True
    try:
        machine = (out / RUN_LOCK).read_text(errors="replace").splitlines()[2:3]
    except OSError:
        return None
    return False if machine == [MACHINE] else None


@contextlib.contextmanager
def sole_run_in(out: Path, world: distributed.World):
    """Hold `out` for this run until it ends: a second run started there is refused before it reads or
    deletes anything, since both would write the same checkpoints, metrics.jsonl and final model, and
    each removes the other's half-written checkpoint as a leftover. The lock goes with the process,
    so a killed run leaves nothing to clear by hand. A run refused before its first step leaves no
    output_dir behind where there was none, or only the report of the data that refused it.

    The lock also shows that every process sees the folder rank 0 writes: each process writes its
    shards of every checkpoint there, so on machines that do not share it (no network file system, or
    another output_dir in a machine's config) the run is refused here, before any work."""
    lock, holder, made, token, held = None, None, not out.exists(), uuid.uuid4().hex, False
    try:
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            lock = open(out / RUN_LOCK, "a+")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(lock)
            else:
                held = True
                with writing(out / RUN_LOCK):
                    lock.truncate(0)
                    lock.write(f"{os.getpid()}\n{token}\n{MACHINE}\n")
                    lock.flush()
                    os.fsync(lock.fileno())  # a network file system shows it to the other machines once it has it
        holder, token = distributed.from_main((holder, token), world, "checking that no other run writes output_dir")
        if holder is not None:
            raise _in_use(out, holder)
        sees = world.is_main or sees_lock(out / RUN_LOCK, token)
        every = distributed.from_every_rank(sees, world, "checking that every process shares output_dir")
        blind = [str(rank) for rank, seen in enumerate(every) if not seen]
        if blind:
            raise TuneforgeError(
                f"output_dir {out} is not one folder every process shares: rank(s) {', '.join(blind)} do not see "
                "the files rank 0 writes there, and each process writes its own shards of every checkpoint into "
                "it. On several machines, give output_dir as a folder they all share (a network file system) at "
                "the same path in every machine's config.",
                code="output_dir_not_shared",
            )
        yield
    finally:
        if lock is not None:
            # Only the run that holds the lock removes the folder it made: a run refused there may have found
            # the folder missing just before the holder made it, and the lock file is the holder's. A run refused
            # by its data leaves the report that says why (data_report.json) alone.
            left = {p.name for p in out.iterdir()} if held and made else set()
            if RUN_LOCK in left and left <= {RUN_LOCK, "data_report.json"}:
                (out / RUN_LOCK).unlink()
                if left == {RUN_LOCK}:
                    out.rmdir()
            # A write the disk refused stays in the file's buffer: close would raise it again over the error
            # that names the lock file.
            with contextlib.suppress(OSError):
                lock.close()


def refuse_other_runs_on_other_machines(
    cfg: Config, tokenizer, world: distributed.World
) -> tuple[str | None, list] | None:
    """Every process must run the same config on the same data: a machine started with another config
    file, or with data files or a tokenizer of other contents, would train its rows otherwise than the
    others (a silent mix, or ranks whose steps diverge and wait on each other). Each process's settings
    that change results and its data's cache key (the files' paths and contents, the tokenizer) are
    compared with rank 0's, and any difference is refused on every process before the data is prepared. The
    first process of each machine hashes its data, which the others on that machine read from the same files.
    Rank 0's data key, which every machine's data then matches, is returned for `prepare_data` with this
    process's data files' states taken before the hashing (`hash_data`), so that rows of a file saved over
    since are not cached under it (None on one process, which hashes its data as it prepares it)."""
    if world.size == 1:
        return None
    key, states = hash_data(cfg.data, tokenizer, contents=world.local_rank == 0)
    mine = {"settings": dotted(cfg.results_settings()), "data": key}
    every = distributed.from_every_rank(mine, world, "checking that every process runs the same config and data")
    main = every[0]
    differences = []
    for rank, theirs in enumerate(every[1:], start=1):
        changed = [
            f"{key}: {main['settings'].get(key)} on rank 0, {theirs['settings'].get(key)} on rank {rank}"
            for key in sorted(main["settings"].keys() | theirs["settings"].keys())
            if main["settings"].get(key) != theirs["settings"].get(key)
        ]
        if not changed and None not in (theirs["data"], main["data"]) and theirs["data"] != main["data"]:
            changed = [
                f"the contents of data.train, data.validation or the replay file, or the base model's tokenizer, "
                f"on rank {rank}"
            ]
        differences += changed
    if differences:
        raise TuneforgeError(
            "the processes of this run were started with different configs or data, and would not train one "
            f"model together: {'; '.join(differences)}. Start every machine with the same config file and the "
            "same data and base model at the same paths (pull a registry model on each: tuneforge models pull NAME).",
            code="machines_differ",
        )
    return main["data"], states


def sees_lock(path: Path, token: str, wait_s: float = 2.0) -> bool:
    """Whether the lock file at `path` holds `token`, as rank 0 wrote it. A network file system may show
    another machine's write a moment late, so a missing token is looked for again for `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            if token in path.read_text().split():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def refuse_resume_with_overwrite(cfg: Config, resume: str | bool | None, overwrite: bool) -> None:
    if resume and overwrite:
        # One continues the run in output_dir, the other deletes it: neither is guessed.
        raise TuneforgeError(
            f"--resume and --overwrite ask for opposite things: --resume continues the run in {cfg.output_dir}, "
            "--overwrite deletes it and starts over. Pass one of them.",
            code="bad_option",
        )
