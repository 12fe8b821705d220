"""Job workers: threads of the server that claim jobs from the store and see them through.

A validating thread checks a job's files in-process (the data pipeline with the base model's
tokenizer), beside the training threads, so a new job's files are checked while others train. A
training thread trains a job in a child process (`runner.py`), so pausing or cancelling is a
signal to that child and a crash of the child never takes the server down. While the child runs,
the worker turns its `metrics.jsonl` and checkpoint folders into events and checkpoint rows. A job
that fails in a way nobody foresaw fails alone, with an error id for the operator's log; it is not
retried.

An eval thread beside them runs the queued runs of evals (`evals.EvalRunner`), one at a time, in-process:
a run answers with the model through `tuneforge.generate` and grades the answers; it is held, beaten and
recovered as a job is, and a run its server stopped under is queued again from its start (as often as a job).
Batches run on the API's event loop (`batches.BatchRunner`); a batch whose server died is recovered here,
to resume (as often as a job).

A job is held by a worker id `host:pid:process start time/thread`. While the process lives, a thread
of it beats the heartbeat of every job it holds, whatever it is doing with them (validating files
for minutes, waiting for a stopped run to checkpoint). When a server dies, the jobs it held are
found by the next server to look: on the same host the holder's process is gone; on another host
its heartbeat is older than `STALE_AFTER_S`. Such a job is queued again and resumes from its last
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import psutil

from ..data import check_data
from ..errors import ConfigError, ModelSourceError, TuneforgeError
from ..fsio import refused_write, refused_write_line, write_json
from ..methods import batch_items, check_inputs, prepare_items
from ..models import REGISTRY, ModelSource, resolve, run_tokenizer
from ..training import checkpoint, make_plan
from ..web import failure_id, scrub_paths
from ..wording import counted
from . import runner
from .access import client_names, training_spec
from .evals import EvalRunner
from .files import RESULT_COLUMNS, REWARD_COLUMNS, FileStorage
from .mapping import api_advice, processes, resolved_method, training_config
from .store import STATUSES, Job, JobCheckpoint, JobEvent, Store, event, new_id, now

log = logging.getLogger("tuneforge.jobs")

STALE_AFTER_S = 60.0  # a holder on another host that has not beaten its heartbeat this long is gone
HEARTBEAT_EVERY_S = 10.0
RECOVER_EVERY_S = 5.0
KILL_AFTER_S = 120.0  # a child still running this long after SIGTERM is killed
MAX_RECOVERIES = 3  # a job or eval run queued again this often after its server died fails when one dies again
LOG_TAIL_LINES = 20  # of a crashed training process's log, copied into the server's log
HOST = socket.gethostname()


def process_worker_id() -> str:
    me = psutil.Process()
    return f"{HOST}:{me.pid}:{me.create_time():.2f}"


def holder_alive(worker_id: str) -> bool | None:
    """Whether the process behind `worker_id` still runs; None when it is on another host."""
    host, pid, started = worker_id.split("/")[0].rsplit(":", 2)
    if host != HOST:
        return None
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except psutil.NoSuchProcess:
        return False


class JobFailure(Exception):
    """Why a job failed, as its `error` object says it: code, message and the parameter (a file id)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.error = {"code": code, "message": message, "param": param}


def _left_out(counts: dict) -> str:
    """The rows the data pipeline left out of a job's examples and why, from its report's `counts`, as the job's
    events tell them ("" where none were): the uploaded rows would otherwise not add up to the examples told."""
    reasons = [
        (counts.get("duplicates_exact", 0) + counts.get("duplicates_near", 0), "repeating an earlier row"),
        (counts.get("validation_leak", 0), "training rows also in the validation file"),
    ]
    told = [f"{n} {why}" for n, why in reasons if n]
    if not told:
        return ""
    return f" ({counted(sum(n for n, _ in reasons), 'row')} left out: {', '.join(told)})"


class Workers:
    """`count` training threads of this server process, and one thread that validates files (none if `count` is 0)."""

    def __init__(self, store: Store, storage: FileStorage, root: Path, count: int, *, poll_s: float = 0.5):
        self.store, self.storage, self.runs, self.poll_s = store, storage, Path(root) / "runs", poll_s
        self.evals = EvalRunner(store, storage)
        self._stopping = threading.Event()
        self._last_recovery = 0.0
        self._recovery_lock = threading.Lock()
        self._prefix = prefix = process_worker_id()
        roles = [("validating_files", self._validate)] * min(count, 1) + [("queued", self._train)] * count
        self._threads = [
            threading.Thread(
                target=self._work, args=(f"{prefix}/{i}", status, handle), name=f"tuneforge-job-worker-{i}", daemon=True
            )
            for i, (status, handle) in enumerate(roles)
        ]
        if count:
            self._threads.append(
                threading.Thread(
                    target=self._evaluate, args=(f"{prefix}/evals",), name="tuneforge-eval-worker", daemon=True
                )
            )
            self._threads.append(threading.Thread(target=self._beat, name="tuneforge-job-heartbeat", daemon=True))

    def start(self) -> None:
        runner.start_process_server()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop taking jobs; a running job is checkpointed and queued again for the next server."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()

    # ---- the loop of one worker --------------------------------------------------------------------

    def _work(self, worker_id: str, status: str, handle) -> None:
        """Claim jobs in `status` and `handle` each, until the server stops."""
        while not self._stopping.is_set():
            try:
                self._recover_orphans()
                job = self.store.claim(status, worker_id)
                if job is None:
                    self._stopping.wait(self.poll_s)
                    continue
                try:
                    handle(job, worker_id)
                except Exception as err:  # noqa: BLE001 - one job's unforeseen failure fails that job alone
                    self._fail(job, worker_id, _unforeseen(job, err))
                finally:
                    self._release(job, worker_id)
            except Exception:  # noqa: BLE001 - a worker must outlive a database hiccup; it retries
                log.exception("job worker %s", worker_id)
                self._stopping.wait(self.poll_s * 4)

    def _evaluate(self, worker_id: str) -> None:
        """Claim queued eval runs and run each, until the server stops."""
        while not self._stopping.is_set():
            try:
                self._recover_orphans()
                run = self.store.claim_run(worker_id)
                if run is None:
                    self._stopping.wait(self.poll_s)
                    continue
                try:
                    self.evals.run(run, worker_id, self._stopping)
                finally:
                    self.store.move_run(
                        run.id,
                        ("queued", "in_progress", "completed", "failed", "canceled"),
                        held_by=worker_id,
                        worker_id=None,
                    )
            except Exception:  # noqa: BLE001 - a worker must outlive a database hiccup; it retries
                log.exception("eval worker %s", worker_id)
                self._stopping.wait(self.poll_s * 4)

    def _beat(self) -> None:
        """Beat the heartbeat of the jobs this process holds until the server stops. A beat the store refuses
        is logged once while the cause stays the same (a full disk refuses every beat until space is freed):
        a refused write as one line naming the path, anything else with its traceback."""
        told = None
        while not self._stopping.wait(HEARTBEAT_EVERY_S):
            try:
                self.store.beat(self._prefix)
                told = None
            except Exception as err:  # noqa: BLE001 - the next beat retries after a database hiccup
                # The first line: a database error goes on with the statement and its parameters, the beat's time.
                cause = (type(err), str(err).partition("\n")[0])
                if cause == told:
                    continue
                told = cause
                if refused_write(err):
                    log.error("job heartbeat of %s: %s", self._prefix, refused_write_line(err))
                else:
                    log.exception("job heartbeat of %s", self._prefix)

    def _recover_orphans(self) -> None:
        with self._recovery_lock:
            if time.monotonic() - self._last_recovery < RECOVER_EVERY_S:
                return
            self._last_recovery = time.monotonic()
        for run in self.store.held_runs():
            alive = holder_alive(run.worker_id)
            if not alive and (alive is not None or time.time() - (run.heartbeat_at or 0) >= STALE_AFTER_S):
                if run.recoveries >= MAX_RECOVERIES:
                    # A run that takes its server down (too large a model, too many items) fails, not again forever.
                    error = {
                        "code": "server_stopped",
                        "message": f"The server running this eval run stopped {run.recoveries + 1} times while the "
                        "model answered; giving up. Create a new run to try again (fewer items, or a smaller model).",
                    }
                    self.store.move_run(
                        run.id, ["in_progress"], held_by=run.worker_id, status="failed", error=error, worker_id=None
                    )
                else:
                    # Its server died while the model answered: it runs again from the start.
                    self.store.move_run(
                        run.id,
                        ["in_progress"],
                        held_by=run.worker_id,
                        status="queued",
                        worker_id=None,
                        recoveries=run.recoveries + 1,
                    )
                self.store.move_run(run.id, ["canceled"], held_by=run.worker_id, worker_id=None)
        for batch in self.store.held_batches():
            alive = holder_alive(batch.worker_id)
            if not alive and (alive is not None or time.time() - (batch.heartbeat_at or 0) >= STALE_AFTER_S):
                held = {"held_by": batch.worker_id, "worker_id": None}
                if batch.recoveries >= MAX_RECOVERIES:
                    # A request that takes its server down is answered again by each next server: it fails.
                    error = {
                        "code": "server_stopped",
                        "message": f"The server running this batch stopped {batch.recoveries + 1} times while it "
                        "answered; giving up. Create a new batch to try again (shorter requests, or a smaller model).",
                        "param": None,
                        "line": None,
                    }
                    self.store.move_batch(
                        batch.id,
                        ["in_progress", "finalizing"],
                        status="failed",
                        failed_at=now(),
                        errors=[error],
                        **held,
                    )
                else:
                    # Its server died while answering: the next server validates it again and answers the rest.
                    self.store.move_batch(
                        batch.id,
                        ["in_progress", "finalizing"],
                        status="validating",
                        recoveries=batch.recoveries + 1,
                        **held,
                    )
                self.store.move_batch(batch.id, [batch.status], **held)
        for job in self.store.held_jobs():
            alive = holder_alive(job.worker_id)
            if alive or (alive is None and time.time() - (job.heartbeat_at or 0) < STALE_AFTER_S):
                continue
            if job.status != "running":
                self.store.move(job.id, [job.status], held_by=job.worker_id, worker_id=None)
            elif job.recoveries >= MAX_RECOVERIES:
                self._fail(
                    job,
                    job.worker_id,
                    JobFailure(
                        "server_stopped",
                        f"The server running this job stopped {job.recoveries + 1} times while it trained; "
                        f"giving up.{_kept_checkpoint(job, self.runs / job.id)} Start a new job to try again.",
                    ),
                )
            else:
                self._requeue_orphan(job)

    def _requeue_orphan(self, job: Job) -> None:
        last, _ = checkpoint.newest_whole(self.runs / job.id / "checkpoints")
        # The checkpoint may be newer than the last step the dead server reported.
        step = max(job.step, checkpoint.step_number(last) if last else 0)
        back_to = "paused" if job.stop_request == "pause" else "queued"
        self.store.move(
            job.id,
            ["running"],
            held_by=job.worker_id,
            status=back_to,
            worker_id=None,
            stop_request=None,
            estimated_finish=None,
            recoveries=job.recoveries + 1,
            adding=[
                event(
                    job.id,
                    f"The server running this job stopped after step {step}; the job is "
                    f"{back_to} again and will resume from "
                    + (f"checkpoint {last.name}." if last else "the start (no checkpoint yet)."),
                    level="warn",
                )
            ],
        )

    # ---- validating_files -> queued ----------------------------------------------------------------

    def _validate(self, job: Job, worker_id: str) -> None:
        self.store.add_event(
            job.id,
            f"Validating training file: {job.training_file}"
            + (f" and validation file: {job.validation_file}" if job.validation_file else ""),
        )
        try:
            config, total_steps, n_examples, left_out = self._check_files(job)
        except JobFailure as failure:
            self._fail(job, worker_id, failure)
            return
        self.store.move(
            job.id,
            ["validating_files"],
            held_by=worker_id,
            status="queued",
            worker_id=None,
            train_config=config.model_dump(mode="json"),
            total_steps=total_steps,
            method=resolved_method(job.method, config),
            adding=[
                event(
                    job.id,
                    f"Files validated: {counted(n_examples, 'training example')}{left_out}, "
                    f"{counted(config.train.epochs, 'epoch')}, {counted(total_steps, 'step')}. Job queued.",
                )
            ],
        )

    def _check_files(self, job: Job):
        paths = self._paths(job)
        spec = training_spec(self.store, self.runs, job.owner, job.model)
        model: dict[str, str] = {}
        try:
            config = training_config(
                spec, job.method, job.seed, *paths.values(), self.runs / job.id, integrations=job.integrations
            )
            source = self._base_model(job, config.base_model)
            model = client_names(source, job.model)
            tokenizer = run_tokenizer(config, source)  # with the job's tuneforge_chat_template, as training's
            # What training checks before any compute (data.max_length within the model's positions, preference
            # pairs for dpo and only for dpo, ...); none of it depends on the examples counted below.
            try:
                check_inputs(config, tokenizer, source)
            except ConfigError as err:  # the model or the job's settings are at fault, not a file
                raise self._failure(job, err.code, err.message, None, model) from err
            if config.method == "grpo":  # prompts, and a grader that can score them; problems raise
                prepared, problems, left_out = prepare_items(config, tokenizer), [], ""
            else:
                prepared, problems = check_data(config.data, tokenizer)
                left_out = _left_out(prepared.report["counts"])
            errors = [problem for problem in problems if problem.is_error]
            if errors:
                shown = "; ".join(str(problem) for problem in errors[:3])
                more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
                raise self._failure(
                    job, "invalid_file", f"{counted(len(errors), 'problem')}: {shown}{more}", errors[0].file, model
                )
            train_items, _ = batch_items(prepared, config)  # the examples, or for dpo one item per pair
            n_items = len(train_items)
            config = training_config(
                spec,
                job.method,
                job.seed,
                *paths.values(),
                self.runs / job.id,
                n_examples=n_items,
                integrations=job.integrations,
            )
            total_steps = make_plan(config, n_items, n_items, processes(job.method)).total_steps
        except ModelSourceError as err:  # the model was there when the job was created, and has gone since
            # A model not found is told by the job's own name for it: its message advises the command line (a path
            # to check, a hub id), which a caller of the API cannot follow.
            what = (
                f"The model `{job.model}` is no longer on this server."
                if err.code == "model_not_found"
                else scrub_paths(err.message)
            )
            raise JobFailure(
                err.code,
                f"model: {what} Create the job again with a model this server has: a registry model, one the server "
                "allows (GET /v1/models lists those you have used), or one of your fine-tuned models or checkpoints.",
                "model",
            ) from err
        except TuneforgeError as err:
            raise self._failure(job, err.code, err.message, str(paths["training_file"]), model) from err
        return config, total_steps, n_items, left_out

    def _base_model(self, job: Job, spec: str) -> ModelSource:
        """The job's base model. A registry model not yet on this server is fetched first (minutes, once),
        which the job's events say, so a job validating for that long is seen to be busy."""
        if spec in REGISTRY:
            try:
                return resolve(spec, pull_missing=False)
            except ModelSourceError:
                self.store.add_event(
                    job.id, f"Fetching the base model {spec} onto this server (once; later jobs reuse it)."
                )
        return resolve(spec)

    def _paths(self, job: Job) -> dict[str, Path | None]:
        """Where the job's training file and its validation file (or None) are stored."""
        rows = {
            param: self.store.get_file(job.owner, file_id) if file_id else None
            for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file))
        }
        if rows["training_file"] is None or (job.validation_file and rows["validation_file"] is None):
            raise JobFailure(
                "file_not_found",
                "A file of this job has been deleted; upload it again and start a new job.",
                "training_file" if rows["training_file"] is None else "validation_file",
            )
        return {param: self.storage.path(row) if row else None for param, row in rows.items()}

    def _failure(
        self, job: Job, code: str, message: str, path: str | None, model: dict[str, str] | None = None
    ) -> JobFailure:
        """A failure whose message names files by id and the job's model as the job names it (`model`, from
        `client_names`), never by a server path, and advises the job's fields, not config keys (`api_advice`), and
        whose param is the parameter that names the file at fault (`training_file` or `validation_file`), as
        OpenAI's job error has it."""
        for folder, name in (model or {}).items():
            message = message.replace(folder, name)
        param = None
        for param_name, stored in self._paths(job).items():
            if stored is not None:
                message = message.replace(str(stored), getattr(job, param_name))
                if path and str(stored) in path:
                    param = param_name
        if param == "validation_file" and code == "invalid_file":
            code = "invalid_validation_file"
        elif code == "invalid_file":
            code = "invalid_training_file"
        return JobFailure(code, scrub_paths(api_advice(message)), param)

    # ---- queued -> running -> succeeded | failed | cancelled | paused ------------------------------

    def _train(self, job: Job, worker_id: str) -> None:
        if not self.store.move(job.id, ["queued"], held_by=worker_id, status="running", heartbeat_at=time.time()):
            return  # cancelled or paused before it started
        run_dir = self.runs / job.id
        write_json(run_dir / runner.CONFIG, job.train_config)
        (run_dir / runner.OUTCOME).unlink(missing_ok=True)
        self.store.add(_started(job, run_dir, worker_id))
        progress = RunProgress(self.store, job, run_dir)
        reader, writer = runner.PROCESSES.Pipe(duplex=False)
        child = runner.PROCESSES.Process(
            target=runner.main, args=(str(run_dir), reader, processes(job.method)), name=f"tuneforge-{job.id}"
        )
        child.start()
        reader.close()
        try:
            stop_reason = self._watch(job, worker_id, child, progress)
        finally:
            writer.close()
        progress.update()
        outcome_path = run_dir / runner.OUTCOME
        outcome = json.loads(outcome_path.read_text()) if outcome_path.is_file() else None
        if outcome and outcome["status"] == "completed":
            self._succeed(job, worker_id, progress)
        elif outcome and outcome["status"] == "failed":
            if "log" in outcome:
                log.error("job %s: %s", job.id, outcome["log"])
            self._fail(job, worker_id, self._failure(job, outcome["code"], outcome["message"], outcome["file"]))
        elif stop_reason:
            self._stopped(job, worker_id, stop_reason, progress)
        else:
            self._fail(job, worker_id, _crashed(job, run_dir, child.exitcode, progress.step))

    def _watch(self, job: Job, worker_id: str, child: BaseProcess, progress: RunProgress) -> str | None:
        """Follow the child until it exits; returns why we stopped it (pause, cancel, shutdown, lost) or None."""
        stop_reason, stopped_at = None, 0.0
        while True:
            child.join(timeout=self.poll_s)
            if child.exitcode is not None:
                return stop_reason
            values = progress.update()
            self.store.move(job.id, ["running"], held_by=worker_id, **values)
            if stop_reason is None:
                current = self.store.get_job(job.id)
                stop_reason = (
                    "cancel"
                    if current.status == "cancelled"
                    else "pause"
                    if current.stop_request == "pause"
                    else "lost"
                    if current.worker_id != worker_id
                    else "shutdown"
                    if self._stopping.is_set()
                    else None
                )
                if stop_reason:
                    child.terminate()  # SIGTERM: checkpoint and stop after the current step
                    stopped_at = time.monotonic()
            elif time.monotonic() - stopped_at > KILL_AFTER_S:
                _kill(child)

    def _succeed(self, job: Job, worker_id: str, progress: RunProgress) -> None:
        results = self.storage.save_results(progress.records(), owner=job.owner)
        if not self.store.move(
            job.id,
            ["running"],
            held_by=worker_id,
            status="succeeded",
            worker_id=None,
            finished_at=now(),
            estimated_finish=None,
            result_files=[results.id],
            step=progress.step,
            trained_tokens=progress.tokens,
            adding=[
                results,
                event(job.id, f"New fine-tuned model created: {job.fine_tuned_model}"),
                event(job.id, "The job has successfully completed."),
            ],
        ):
            # Cancelled as it finished: no results to show, and the cancel tells where it stopped, as any cancel does.
            self.storage.delete(results)
            self._stopped(job, worker_id, "cancel", progress)

    def _stopped(self, job: Job, worker_id: str, reason: str, progress: RunProgress) -> None:
        last, _ = checkpoint.newest_whole(self.runs / job.id / "checkpoints")
        kept = f"checkpoint {last.name}" if last else "no checkpoint (it stopped before the first one)"
        # The steps the run took until it stopped count in the job's figures, which a resumed run's
        # `RunProgress` starts from, so it reports each step's metrics once.
        figures = {"step": progress.step, "trained_tokens": progress.tokens}
        if reason == "pause" and self.store.get_job(job.id).status == "cancelled":
            reason = "cancel"  # cancelled while it paused: the job is cancelled, so its stop is told as a cancel
        if reason == "pause":
            self.store.move(
                job.id,
                ["running"],
                held_by=worker_id,
                status="paused",
                worker_id=None,
                stop_request=None,
                estimated_finish=None,
                adding=[event(job.id, f"Job paused at step {progress.step}; resuming continues from {kept}.")],
                **figures,
            )
        elif reason == "cancel":
            # The API marked the job cancelled at once; its trained tokens are those of the checkpoint kept.
            self.store.move(
                job.id,
                ["cancelled"],
                held_by=worker_id,
                adding=[event(job.id, f"Job cancelled at step {progress.step}; {kept} is kept.")],
                **figures,
            )
        elif reason == "shutdown":
            self.store.move(
                job.id,
                ["running"],
                held_by=worker_id,
                status="queued",
                worker_id=None,
                estimated_finish=None,
                adding=[
                    event(
                        job.id,
                        f"The server is stopping: the job is queued again at step "
                        f"{progress.step} and will resume from {kept}.",
                        level="warn",
                    )
                ],
                **figures,
            )

    def _release(self, job: Job, worker_id: str) -> None:
        """Let go of the job, whatever its status now (the API may have cancelled or paused it meanwhile)."""
        self.store.move(job.id, STATUSES, held_by=worker_id, worker_id=None)

    def _fail(self, job: Job, worker_id: str, failure: JobFailure) -> None:
        self.store.move(
            job.id,
            ["validating_files", "queued", "running"],
            held_by=worker_id,
            status="failed",
            worker_id=None,
            error=failure.error,
            finished_at=now(),
            estimated_finish=None,
            adding=[event(job.id, failure.error["message"], level="error")],
        )


def _kill(child: BaseProcess) -> None:
    """SIGKILL the child and the training processes it started (a job on several processes)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for process in psutil.Process(child.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    child.kill()


def _crashed(job: Job, run_dir: Path, exit_code: int | None, step: int) -> JobFailure:
    """The failure of a training process that died without an outcome; its log's tail goes to the server's log."""
    error_id = failure_id()
    tail = (run_dir / runner.LOG).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    log.error(
        "job %s: the training process stopped (exit code %s) at step %s (error id %s); the end of %s:\n%s",
        job.id,
        exit_code,
        step,
        error_id,
        run_dir / runner.LOG,
        "\n".join(tail),
    )
    return JobFailure(
        "training_crashed",
        f"The training process stopped (exit code {exit_code}) before it "
        f"finished, at step {step} (error id {error_id}).{_kept_checkpoint(job, run_dir)} Give the "
        "server's operator the error id for the details.",
    )


def _kept_checkpoint(job: Job, run_dir: Path) -> str:
    """The sentence (after a space) that tells a failed job's last checkpoint is kept; none when its run wrote none.
    A damaged one past it, which a resume refuses rather than pass over, is named, and the one kept before it as the
    model a new job starts from."""
    root = run_dir / "checkpoints"
    last = checkpoint.latest(root)
    if damaged := checkpoint.damaged_past_latest(root):
        folder, what = damaged
        kept = (
            f"step {checkpoint.step_number(last)} before it is kept: a new job can start from it (model "
            f"{job.fine_tuned_model}:ckpt-step-{checkpoint.step_number(last)})"
            if last
            else "no checkpoint before it is kept"
        )
        return (
            f" Its last checkpoint, step {checkpoint.step_number(folder)}, is damaged ({what}), which a resume "
            f"refuses; {kept}."
        )
    return f" Its last checkpoint (step {checkpoint.step_number(last)}) is kept." if last else ""


def _started(job: Job, run_dir: Path, worker_id: str) -> JobEvent:
    """The event of a job's run starting on `worker_id`: afresh, or resuming from its newest whole checkpoint (as
    `runner.run` does), naming each damaged one past it that is skipped and what is wrong with it."""
    last, skipped = checkpoint.newest_whole(run_dir / "checkpoints")
    data = {"worker": worker_id}
    if skipped:
        damaged = "; ".join(f"Checkpoint {folder.name} is damaged ({what})" for folder, what in skipped)
        them = "it is" if len(skipped) == 1 else "they are"
        then = f"fine-tuning resumes from checkpoint {last.name}" if last else "fine-tuning starts over"
        return event(job.id, f"{damaged}, so {them} skipped: {then}.", level="warn", data=data)
    return event(
        job.id, f"Resuming fine-tuning from checkpoint {last.name}." if last else "Fine-tuning job started.", data=data
    )


def _unforeseen(job: Job, err: Exception) -> JobFailure:
    error_id = failure_id()
    log.error("job %s failed (error id %s)", job.id, error_id, exc_info=err)
    return JobFailure(
        "internal_error",
        f"The server failed on this job (error id {error_id}); give the server's "
        "operator the error id for the details.",
    )


class RunProgress:
    """What a run folder says so far: metrics (as events), checkpoints (as rows), step, tokens, ETA."""

    def __init__(self, store: Store, job: Job, run_dir: Path):
        self.store, self.job, self.run_dir = store, job, run_dir
        self.step = job.step  # events for steps up to here were written by an earlier attempt
        self.tokens = job.trained_tokens or 0
        self._by_step: dict[int, dict] = {}
        self._full_valid_reported = False

    def records(self) -> list[dict]:
        return [{"step": step, **record} for step, record in sorted(self._by_step.items())]

    def update(self) -> dict:
        """Read the run folder again; write new events and checkpoints; return the job's progress fields."""
        # Checkpoint folders first: the loop logs a step's metrics before it saves that step's
        # checkpoint, so every folder seen here has its metrics in the file read next.
        steps_on_disk = [
            int(folder.name.removeprefix("step-")) for folder in checkpoint.step_folders(self.run_dir / "checkpoints")
        ]
        self._by_step.clear()
        for record in _complete_lines(self.run_dir / "metrics.jsonl"):
            self._by_step.setdefault(record["step"], {}).update(
                {key: value for key, value in record.items() if _is_metric(key) or key in ("tokens", "elapsed")}
            )
            # The last step is validated once, by the full validation (over the whole file, as every step's
            # validation is): it is that step's validation too, as OpenAI's last checkpoint reports both.
            for key, value in record.items():
                if key.startswith("full_valid_") and _is_metric(key.removeprefix("full_")):
                    self._by_step[record["step"]].setdefault(key.removeprefix("full_"), value)
        total = self.job.total_steps
        for step, record in sorted(self._by_step.items()):
            if step > self.step and "train_loss" in record:
                # A reinforcement job's loss is near 0 by construction (advantages centre on 0): its rewards say
                # how it learns.
                shown = (
                    f"reward={record['reward']:.4f} (std {record['reward_std']:.4f}), kl={record['kl']:.4f}"
                    if "reward" in record
                    else f"training loss={record['train_loss']:.4f}"
                )
                if "valid_loss" in record:
                    shown += f", validation loss={record['valid_loss']:.4f}"
                if "valid_reward" in record:
                    shown += f", validation reward={record['valid_reward']:.4f}"
                self.store.add_event(
                    self.job.id,
                    f"Step {step}/{total}: {shown}",
                    type="metrics",
                    data={**_openai_metrics(record), "step": step, "total_steps": total},
                )
                self.step, self.tokens = step, record.get("tokens", self.tokens)
            full = {key: value for key, value in record.items() if key.startswith("full_valid")}
            if full and not self._full_valid_reported:
                self._full_valid_reported = True
                shown = [f"{name}={record[key]:.4f}" for key, name in FULL_VALIDATION_SHOWN.items() if key in record]
                self.store.add_event(
                    self.job.id,
                    f"Full validation {', '.join(shown)}",
                    type="metrics",
                    data={**full, "step": step},
                )
        self.store.sync_checkpoints(self.job.id, {step: self._checkpoint_row(step) for step in steps_on_disk})
        latest = self._by_step.get(self.step, {})
        finish = None
        if latest.get("elapsed") and total:
            finish = now() + int(latest["elapsed"] / self.step * (total - self.step))
        return {"step": self.step, "trained_tokens": self.tokens, "estimated_finish": finish}

    def _checkpoint_row(self, step: int) -> JobCheckpoint:
        metrics = _openai_metrics(self._by_step.get(step, {}))
        # A step's validation runs over the whole validation file, so at a checkpoint it is the full
        # validation OpenAI reports at each epoch's checkpoint.
        for key, value in list(metrics.items()):
            if key.startswith("valid_") and _is_metric(f"full_{key}"):
                metrics.setdefault(f"full_{key}", value)
        return JobCheckpoint(
            id=new_id("ftckpt-"),
            job_id=self.job.id,
            step=step,
            created_at=now(),
            metrics=metrics,
            model=f"{self.job.fine_tuned_model}:ckpt-step-{step}",
        )


FULL_VALIDATION_SHOWN = {"full_valid_loss": "loss", "full_valid_reward": "reward"}


def _is_metric(key: str) -> bool:
    """Whether a metrics.jsonl key is one a job reports: OpenAI's, and a reinforcement job's rewards."""
    return (
        key in RESULT_COLUMNS[1:]
        or key in REWARD_COLUMNS
        or key.startswith(("reward/", "reward_std/", "valid_reward/", "full_valid_reward/"))
    )


def _openai_metrics(record: dict) -> dict:
    return {key: value for key, value in record.items() if _is_metric(key)}


def _complete_lines(path: Path) -> list[dict]:
    """The JSON lines of a file another process appends to, without a last line still being written."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # after the last newline comes nothing or a partial line
    return [json.loads(line) for line in lines if line.strip()]
