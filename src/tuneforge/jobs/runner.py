"""One job's training, in its own process: `main(run_dir, parent, processes)`, started by a worker.

Reads `RUN_DIR/job.json` (the tuneforge config), trains (resuming from the newest whole checkpoint when
there is one) and writes `RUN_DIR/outcome.json`; its output goes to `RUN_DIR/train.log`. The worker
asks it to stop with SIGTERM (the loop checkpoints and stops). If the worker's server dies, the pipe
`parent` closes and this process stops the same way, so a restarted server resumes from a fresh
checkpoint; the lock on `RUN_DIR/.lock` makes a new process wait until this one has let the folder go.

A job on several processes: this process runs torchrun's agent, which starts them (`train_process`)
and passes a SIGTERM on to them. A process whose training fails writes the outcome itself, unless
another has already (the first failure is the cause), and exits with an error, so that torchrun
stops the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import signal
import sys
import threading
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from pathlib import Path

from ..errors import DataError, TuneforgeError
from ..fsio import refused_write, refused_write_line, write_json

CONFIG = "job.json"
OUTCOME = "outcome.json"
LOCK = ".lock"
LOG = "train.log"

# Training processes fork from a server process that has imported torch and the training code once,
# so a job starts in a moment instead of paying those imports each time. Importing this module is
# cheap, so `tuneforge api` starts that process first and the two import side by side.
PROCESSES = multiprocessing.get_context("forkserver")
PROCESSES.set_forkserver_preload(["tuneforge.training", "tuneforge.jobs.runner"])


def start_process_server() -> None:
    forkserver.ensure_running()


def _stop_when_parent_goes(parent: Connection) -> None:
    with contextlib.suppress(EOFError):
        parent.recv_bytes()  # nothing is ever sent: this returns when the worker's end closes
    os.kill(os.getpid(), signal.SIGTERM)


def run(run_dir: Path) -> dict:
    from ..training import checkpoint, train

    config = json.loads((run_dir / CONFIG).read_text())
    # The newest whole checkpoint, past a damaged one (a save cut short), which the job's events name
    # (`worker._started`): no one is there to choose another, as a user resuming by hand would be.
    last, _ = checkpoint.newest_whole(run_dir / "checkpoints")
    resume = str(last) if last else None
    try:
        # A job's folder is its own: without a checkpoint to resume from, it starts over.
        result = train(config, resume=resume, overwrite=resume is None, progress=False)
    except TuneforgeError as err:
        problems = getattr(err, "problems", []) if isinstance(err, DataError) else []
        return {
            "status": "failed",
            "code": err.code,
            "message": err.message,
            "file": next((p.file for p in problems if p.is_error and p.file), None),
        }
    except OSError as err:
        if not refused_write(err):
            raise
        return {"status": "failed", **no_room(err, "job", run_dir), "file": None}
    return {"status": result.status, "steps": result.steps, "metrics": result.metrics}


def no_room(err: OSError, what: str, within: Path | None = None) -> dict:
    """How a job or an eval run (`what`) whose write the machine refused fails: the server's state, not its
    fault. The client's message names the file within `within` (the job's folder), else by its name alone, never
    the server's path; `log`, the line for the server's log, names the path and what to do. A job store other
    than SQLite's is named by its URL (`database._full_disk_naming`), which is no path: it is shown as the job store."""
    named = os.fsdecode(err.filename)
    if "://" in named:
        shown = "records in the job store"
    else:
        where = Path(named)
        shown = where.relative_to(within) if within and where.is_relative_to(within) else where.name
    return {
        "code": "out_of_disk_space",
        "message": f"The server has no room to write this {what}'s {shown} ({err.strerror}). Once the server's "
        f"operator frees space, start a new {what} to try again.",
        "log": refused_write_line(err),
    }


def train_process(run_dir: str) -> dict:
    """One process of a job on several: `run`, started by torchrun's agent; rank 0's outcome is the job's."""
    outcome = run(Path(run_dir))
    if outcome["status"] == "failed":
        with contextlib.suppress(FileExistsError), open(Path(run_dir) / OUTCOME, "x") as f:
            json.dump(outcome, f)
        raise SystemExit(1)
    return outcome


def main(run_dir: str, parent: Connection, processes: int = 1) -> None:
    os.setsid()  # Ctrl-C at the server's terminal is for the server, which then stops this process itself
    folder = Path(run_dir)
    with open(folder / LOG, "ab") as log:
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
    with open(folder / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        threading.Thread(target=_stop_when_parent_goes, args=(parent,), daemon=True).start()
        if processes == 1:
            write_json(folder / OUTCOME, run(folder))
        else:
            from ..training.distributed import launch_function

            write_json(folder / OUTCOME, launch_function(train_process, (str(folder),), processes))
