"""The jobs service's state in SQL: files, fine-tuning jobs, their events and checkpoints, evals with
their runs and output items (OpenAI's Evals API), and batches with their answered lines (OpenAI's Batch API).

The database is SQLite (the default, one file under `$TUNEFORGE_HOME/jobs`) or PostgreSQL (given
by URL, shared by several servers), through `tuneforge.database`. Every change of a job's status is
a guarded UPDATE (`... WHERE status IN (...)`), so two writers can never both move a job: the API
cancelling and a worker finishing race safely, and a queued job is claimed by exactly one worker.
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, String, UniqueConstraint, delete, func, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..database import JSON_COLUMNS, Page, Tables, connect, where_metadata
from ..web.shapes import MAX_FILENAME_CHARS

ACTIVE = ("validating_files", "queued", "running", "paused")
FINISHED = ("succeeded", "failed", "cancelled")
STATUSES = ACTIVE + FINISHED
_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def now() -> int:
    return int(time.time())


def claim_oldest(session, table, waiting: str, worker_id: str, **values):
    """The oldest row of `table` in status `waiting` that no worker holds, now held by `worker_id` (and given
    `values`); None when there is none.

    PostgreSQL skips rows another transaction has locked (`FOR UPDATE SKIP LOCKED`), so
    concurrent workers each get a different row at once; on SQLite, which has no row locks,
    the guarded UPDATE alone decides and a worker that lost the race simply tries again.
    """
    row = session.scalar(
        select(table)
        .where(table.status == waiting, table.worker_id.is_(None))
        .order_by(table.seq)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if row is None:
        return None
    values = {"worker_id": worker_id, **values}
    taken = session.execute(
        update(table)
        .where(table.id == row.id, table.status == waiting, table.worker_id.is_(None))
        .values(heartbeat_at=time.time(), **values)
    ).rowcount
    if taken != 1:
        return None
    for key, value in values.items():
        setattr(row, key, value)
    return row


class Base(DeclarativeBase):
    type_annotation_map = JSON_COLUMNS


def held_rows_index(table: str) -> Index:
    """An index of `table`'s rows a worker holds: recovery asks for them after a worker died, a handful among
    every row the store keeps. Partial, as only those are looked up by it."""
    held = text("worker_id IS NOT NULL")
    return Index(f"ix_{table}_held", "worker_id", sqlite_where=held, postgresql_where=held)


class OwnedObject:
    """The columns of every object the API shows: `seq` orders rows (and pages through them), `id`
    is the public name, `owner` the API key's hash that may see it."""

    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)


class StoredFile(OwnedObject, Base):
    __tablename__ = "files"
    filename: Mapped[str] = mapped_column(String(MAX_FILENAME_CHARS))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)

    def to_api(self) -> dict:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


class Job(OwnedObject, Base):
    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (held_rows_index(__tablename__),)
    model: Mapped[str] = mapped_column(String(1024))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON)
    method: Mapped[dict]  # {"type": ..., TYPE: {"hyperparameters": {...}}}, "auto" resolved once validated
    status: Mapped[str] = mapped_column(String(24), index=True)
    stop_request: Mapped[str | None] = mapped_column(String(16))  # "pause" while a running job is asked to pause
    error: Mapped[dict | None]
    # Chosen at creation (checkpoint names need it); shown once the job has succeeded.
    fine_tuned_model: Mapped[str] = mapped_column(String(1200), unique=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    result_files: Mapped[list] = mapped_column(default=list)
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    integrations: Mapped[list | None]  # OpenAI's integrations (wandb), as the request gave them
    train_config: Mapped[dict | None]  # the tuneforge config, written when the files are validated
    total_steps: Mapped[int | None]
    step: Mapped[int] = mapped_column(default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    recoveries: Mapped[int] = mapped_column(default=0)  # times it was queued again after its server died

    @property
    def hyperparameters(self) -> dict:
        return self.method[self.method["type"]]["hyperparameters"]


class JobEvent(Base):
    __tablename__ = "fine_tuning_job_events"
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(String(4000))
    data: Mapped[dict | None]

    def to_api(self) -> dict:
        return {
            "id": self.id,
            "object": "fine_tuning.job.event",
            "created_at": self.created_at,
            "level": self.level,
            "type": self.type,
            "message": self.message,
            "data": self.data,
        }


def event(
    job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
) -> JobEvent:
    """A new event of job `job_id`, to add (`Store.add`, or with the status it tells of: `Store.move`)."""
    return JobEvent(
        id=new_id("ftevent-"), job_id=job_id, created_at=now(), level=level, type=type, message=message, data=data
    )


class JobCheckpoint(Base):
    __tablename__ = "fine_tuning_job_checkpoints"
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    step: Mapped[int]
    metrics: Mapped[dict]
    model: Mapped[str] = mapped_column(String(1300))
    created_at: Mapped[int] = mapped_column(BigInteger)

    def to_api(self) -> dict:
        return {
            "id": self.id,
            "object": "fine_tuning.job.checkpoint",
            "created_at": self.created_at,
            "fine_tuned_model_checkpoint": self.model,
            "fine_tuning_job_id": self.job_id,
            "metrics": {"step": self.step, **self.metrics},
            "step_number": self.step,
        }


# ---- evals (OpenAI's Evals API) ------------------------------------------------------------------

RUN_ACTIVE = ("queued", "in_progress")
RUN_FINISHED = ("completed", "failed", "canceled")


class Eval(OwnedObject, Base):
    __tablename__ = "evals"
    name: Mapped[str] = mapped_column(String(256))
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON)
    data_source_config: Mapped[dict]  # as shown: {"type": "custom", "schema": {...}}
    testing_criteria: Mapped[list]  # the graders as the client gave them, checked when created
    created_at: Mapped[int] = mapped_column(BigInteger)


class EvalRun(OwnedObject, Base):
    __tablename__ = "eval_runs"
    __table_args__ = (held_rows_index(__tablename__),)
    eval_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(256))
    model: Mapped[str] = mapped_column(String(1300))
    # What the model's name stood for when the run was created (`ModelAccess.for_inference`): the folder of
    # its base, or of its adapter, which any worker loads as it is.
    model_source: Mapped[str] = mapped_column(String(4096))
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON)
    data_source: Mapped[dict]  # as the client gave it, with the sampling params resolved
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[dict | None]
    result_counts: Mapped[dict | None]
    per_testing_criteria_results: Mapped[list | None]
    usage: Mapped[dict | None]  # prompt, completion and total tokens, invocation count
    created_at: Mapped[int] = mapped_column(BigInteger)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    recoveries: Mapped[int] = mapped_column(default=0)  # times it was queued again after its server died


class EvalOutputItem(Base):
    __tablename__ = "eval_run_output_items"
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    run_id: Mapped[str] = mapped_column(String(40), index=True)
    eval_id: Mapped[str] = mapped_column(String(40))
    index: Mapped[int]  # the item's place in the run's data source (datasource_item_id)
    item: Mapped[dict]
    sample: Mapped[dict]
    results: Mapped[list]
    status: Mapped[str] = mapped_column(String(8))  # pass | fail | error
    created_at: Mapped[int] = mapped_column(BigInteger)

    def to_api(self) -> dict:
        return {
            "object": "eval.run.output_item",
            "id": self.id,
            "run_id": self.run_id,
            "eval_id": self.eval_id,
            "created_at": self.created_at,
            "status": self.status,
            "datasource_item_id": self.index,
            "datasource_item": self.item,
            "results": self.results,
            "sample": self.sample,
        }


class EvalStore:
    """The evals, their runs and their output items, in the job store's database (`Store` holds these methods)."""

    def get_eval(self: Store, owner: str, eval_id: str) -> Eval | None:
        with self.session() as session:
            return session.scalar(select(Eval).where(Eval.id == eval_id, Eval.owner == owner))

    def list_evals(self: Store, owner: str, *, after: str | None, limit: int, newest_first: bool) -> Page:
        return self.page(Eval, select(Eval).where(Eval.owner == owner), after, limit, newest_first)

    def update_eval(self: Store, owner: str, eval_id: str, **values) -> None:
        if values:
            with self.session() as session:
                session.execute(update(Eval).where(Eval.id == eval_id, Eval.owner == owner).values(**values))

    def delete_eval(self: Store, owner: str, eval_id: str) -> bool:
        """Delete the eval with its runs and their output items; a run in progress is canceled by it."""
        with self.session() as session:
            row = session.scalar(select(Eval).where(Eval.id == eval_id, Eval.owner == owner))
            if row is None:
                return False
            run_ids = list(session.scalars(select(EvalRun.id).where(EvalRun.eval_id == eval_id)))
            session.execute(delete(EvalOutputItem).where(EvalOutputItem.run_id.in_(run_ids)))
            session.execute(delete(EvalRun).where(EvalRun.eval_id == eval_id))
            session.delete(row)
            return True

    def delete_run(self: Store, run_id: str) -> None:
        with self.session() as session:
            session.execute(delete(EvalOutputItem).where(EvalOutputItem.run_id == run_id))
            session.execute(delete(EvalRun).where(EvalRun.id == run_id))

    def get_run(self: Store, eval_id: str, run_id: str, owner: str | None = None) -> EvalRun | None:
        query = select(EvalRun).where(EvalRun.id == run_id, EvalRun.eval_id == eval_id)
        if owner is not None:
            query = query.where(EvalRun.owner == owner)
        with self.session() as session:
            return session.scalar(query)

    def list_runs(
        self: Store, eval_id: str, *, status: str | None, after: str | None, limit: int, newest_first: bool
    ) -> Page:
        query = select(EvalRun).where(EvalRun.eval_id == eval_id)
        if status:
            query = query.where(EvalRun.status == status)
        return self.page(EvalRun, query, after, limit, newest_first)

    def move_run(
        self: Store, run_id: str, from_statuses: Iterable[str], *, held_by: str | None = None, **values
    ) -> bool:
        """Set `values` if the run is in one of `from_statuses` (and held by `held_by`, if given)."""
        query = update(EvalRun).where(EvalRun.id == run_id, EvalRun.status.in_(list(from_statuses)))
        if held_by is not None:
            query = query.where(EvalRun.worker_id == held_by)
        with self.session() as session:
            return session.execute(query.values(**values)).rowcount == 1

    def claim_run(self: Store, worker_id: str) -> EvalRun | None:
        """The oldest queued run nobody holds, now in progress and held by `worker_id`; None when there is none."""
        with self.session() as session:
            return claim_oldest(session, EvalRun, "queued", worker_id, status="in_progress")

    def held_runs(self: Store) -> list[EvalRun]:
        with self.session() as session:
            return list(session.scalars(select(EvalRun).where(EvalRun.worker_id.is_not(None))))

    def list_output_items(
        self: Store, run_id: str, *, status: str | None, after: str | None, limit: int, newest_first: bool
    ) -> Page:
        query = select(EvalOutputItem).where(EvalOutputItem.run_id == run_id)
        if status:
            query = query.where(EvalOutputItem.status == status)
        return self.page(EvalOutputItem, query, after, limit, newest_first)

    def get_output_item(self: Store, run_id: str, item_id: str) -> EvalOutputItem | None:
        with self.session() as session:
            return session.scalar(
                select(EvalOutputItem).where(EvalOutputItem.run_id == run_id, EvalOutputItem.id == item_id)
            )

    def finish_run(self: Store, run_id: str, held_by: str, items: list[EvalOutputItem], **values) -> bool:
        """Add the run's output items and set `values` (its status and counts) in one transaction, if the run
        is still in progress and held by `held_by`: a client that reads the run completed finds its items."""
        query = update(EvalRun).where(EvalRun.id == run_id, EvalRun.status == "in_progress")
        with self.session() as session:
            if session.execute(query.where(EvalRun.worker_id == held_by).values(**values)).rowcount != 1:
                return False
            session.execute(delete(EvalOutputItem).where(EvalOutputItem.run_id == run_id))  # an earlier attempt's
            session.add_all(items)
            return True


# ---- batches (OpenAI's Batch API) ----------------------------------------------------------------

BATCH_ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
BATCH_FINISHED = ("completed", "failed", "cancelled", "expired")


class Batch(OwnedObject, Base):
    __tablename__ = "batches"
    __table_args__ = (held_rows_index(__tablename__),)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(8))
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    errors: Mapped[list | None]  # the input file's problems, each {code, message, param, line}
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str | None] = mapped_column(String(1300))  # the first request's, once validated
    usage: Mapped[dict | None]  # the answered requests' tokens, once finished
    total: Mapped[int] = mapped_column(default=0)
    completed: Mapped[int] = mapped_column(default=0)
    failed: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[int] = mapped_column(BigInteger)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)
    failed_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    recoveries: Mapped[int] = mapped_column(default=0)  # times it was taken up again after its server died


class BatchLine(Base):
    """One answered request of a batch: its line as the output or error file holds it."""

    __tablename__ = "batch_lines"
    __table_args__ = (UniqueConstraint("batch_id", "index"),)
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(String(40), index=True)
    index: Mapped[int]  # the request's place among the input file's requests
    ok: Mapped[bool]  # answered 2xx: a line of the output file, else of the error file
    line: Mapped[dict]


class BatchStore:
    """The batches and their answered lines, in the job store's database (`Store` holds these methods)."""

    def get_batch(self: Store, batch_id: str, owner: str | None = None) -> Batch | None:
        query = select(Batch).where(Batch.id == batch_id)
        if owner is not None:
            query = query.where(Batch.owner == owner)
        with self.session() as session:
            return session.scalar(query)

    def list_batches(self: Store, owner: str, *, after: str | None, limit: int) -> Page:
        return self.page(Batch, select(Batch).where(Batch.owner == owner), after, limit, newest_first=True)

    def move_batch(
        self: Store, batch_id: str, from_statuses: Iterable[str], *, held_by: str | None = None, **values
    ) -> bool:
        """Set `values` if the batch is in one of `from_statuses` (and held by `held_by`, if given)."""
        query = update(Batch).where(Batch.id == batch_id, Batch.status.in_(list(from_statuses)))
        if held_by is not None:
            query = query.where(Batch.worker_id == held_by)
        with self.session() as session:
            return session.execute(query.values(**values)).rowcount == 1

    def claim_batch(self: Store, worker_id: str) -> Batch | None:
        """The oldest unheld batch to finish cancelling, else to validate and run, now held by `worker_id`."""
        with self.session() as session:
            return claim_oldest(session, Batch, "cancelling", worker_id) or claim_oldest(
                session, Batch, "validating", worker_id
            )

    def held_batches(self: Store) -> list[Batch]:
        with self.session() as session:
            return list(session.scalars(select(Batch).where(Batch.worker_id.is_not(None))))

    def answered_indexes(self: Store, batch_id: str) -> set[int]:
        with self.session() as session:
            return set(session.scalars(select(BatchLine.index).where(BatchLine.batch_id == batch_id)))

    def batch_lines(self: Store, batch_id: str) -> list[BatchLine]:
        query = select(BatchLine).where(BatchLine.batch_id == batch_id).order_by(BatchLine.index)
        with self.session() as session:
            return list(session.scalars(query))

    def add_batch_line(self: Store, held_by: str, line: BatchLine) -> bool:
        """Keep an answered line and count it, in one transaction, if its batch is still running and held by
        `held_by` (a server that lost the batch writes nothing)."""
        counter = Batch.completed if line.ok else Batch.failed
        query = update(Batch).where(
            Batch.id == line.batch_id, Batch.worker_id == held_by, Batch.status.in_(("in_progress", "cancelling"))
        )
        with self.session() as session:
            if session.execute(query.values({counter: counter + 1})).rowcount != 1:
                return False
            session.add(line)
            return True

    def finish_batch(
        self: Store, batch_id: str, held_by: str, from_statuses: Iterable[str], files: list[StoredFile], **values
    ) -> bool:
        """Add the batch's output files and set `values` (its final status) in one transaction, if it is still
        in one of `from_statuses` and held by `held_by`: a client that reads it finished finds its files."""
        query = update(Batch).where(
            Batch.id == batch_id, Batch.worker_id == held_by, Batch.status.in_(list(from_statuses))
        )
        with self.session() as session:
            if session.execute(query.values(**values)).rowcount != 1:
                return False
            session.add_all(files)
            return True


class Store(Tables, EvalStore, BatchStore):
    """Queries and guarded updates; every method opens and commits its own short transaction."""

    def __init__(self, url: str):
        super().__init__(connect(url), Base)
        # A store made before jobs kept their integrations gets the column (empty for its jobs).
        self.add_missing_columns(Job.__tablename__, {"integrations": "JSON"})
        # A store made before eval runs counted their recoveries gets the column (0 for its runs).
        self.add_missing_columns(EvalRun.__tablename__, {"recoveries": "INTEGER NOT NULL DEFAULT 0"})
        # A store made before batches counted their recoveries gets the column (0 for its batches).
        self.add_missing_columns(Batch.__tablename__, {"recoveries": "INTEGER NOT NULL DEFAULT 0"})

    # ---- files -----------------------------------------------------------------------------------

    def get_file(self, owner: str, file_id: str) -> StoredFile | None:
        with self.session() as session:
            return session.scalar(select(StoredFile).where(StoredFile.id == file_id, StoredFile.owner == owner))

    def list_files(self, owner: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool) -> Page:
        query = select(StoredFile).where(StoredFile.owner == owner)
        if purpose:
            query = query.where(StoredFile.purpose == purpose)
        return self.page(StoredFile, query, after, limit, newest_first)

    def delete_file(self, owner: str, file_id: str) -> StoredFile | None:
        with self.session() as session:
            row = session.scalar(select(StoredFile).where(StoredFile.id == file_id, StoredFile.owner == owner))
            if row is not None:
                session.delete(row)
            return row

    def file_in_batch(self, file_id: str) -> Batch | None:
        """A batch not yet finished that reads this file."""
        with self.session() as session:
            return session.scalar(
                select(Batch).where(Batch.status.in_(BATCH_ACTIVE), Batch.input_file_id == file_id).limit(1)
            )

    def file_in_eval_run(self, file_id: str) -> EvalRun | None:
        """An eval run not yet finished whose items are this file."""
        source = EvalRun.data_source[("source", "id")].as_string()
        with self.session() as session:
            return session.scalar(select(EvalRun).where(EvalRun.status.in_(RUN_ACTIVE), source == file_id).limit(1))

    def file_in_use(self, file_id: str) -> Job | None:
        """A job not yet finished that reads this file."""
        with self.session() as session:
            return session.scalar(
                select(Job)
                .where(Job.status.in_(ACTIVE), (Job.training_file == file_id) | (Job.validation_file == file_id))
                .limit(1)
            )

    # ---- jobs ------------------------------------------------------------------------------------

    def get_job(self, job_id: str, owner: str | None = None) -> Job | None:
        query = select(Job).where(Job.id == job_id)
        if owner is not None:
            query = query.where(Job.owner == owner)
        with self.session() as session:
            return session.scalar(query)

    def list_jobs(self, owner: str, *, after: str | None, limit: int, metadata: dict[str, str]) -> Page:
        query = where_metadata(select(Job).where(Job.owner == owner), Job.metadata_, metadata)
        return self.page(Job, query, after, limit, newest_first=True)

    def jobs_of(self, owner: str) -> list[Job]:
        with self.session() as session:
            return list(session.scalars(select(Job).where(Job.owner == owner).order_by(Job.seq)))

    def job_with_model(self, owner: str, fine_tuned_model: str) -> Job | None:
        with self.session() as session:
            return session.scalar(select(Job).where(Job.owner == owner, Job.fine_tuned_model == fine_tuned_model))

    def move(
        self,
        job_id: str,
        from_statuses: Iterable[str],
        *,
        held_by: str | None = None,
        adding: Iterable[DeclarativeBase] = (),
        **values: Any,
    ) -> bool:
        """Set `values` if the job is in one of `from_statuses` (and held by worker `held_by`, if given),
        and add the rows `adding` (the events that tell of it, a result file) in the same transaction: a
        client that reads the new status finds them too."""
        query = update(Job).where(Job.id == job_id, Job.status.in_(list(from_statuses)))
        if held_by is not None:
            query = query.where(Job.worker_id == held_by)
        with self.session() as session:
            if session.execute(query.values(**values)).rowcount != 1:
                return False
            session.add_all(adding)
            return True

    def request_pause(self, job_id: str) -> bool:
        """Ask a running job to pause; False when it is not running or has been asked already."""
        query = update(Job).where(Job.id == job_id, Job.status == "running", Job.stop_request.is_(None))
        with self.session() as session:
            return session.execute(query.values(stop_request="pause")).rowcount == 1

    def claim(self, status: str, worker_id: str) -> Job | None:
        """The oldest unheld job in `status`, now held by `worker_id`; None when there is none."""
        with self.session() as session:
            return claim_oldest(session, Job, status, worker_id)

    def beat(self, process_id: str) -> None:
        """Mark every job, eval run and batch held by a worker of the process `process_id` (worker ids
        `process_id/thread`) alive now."""
        with self.session() as session:
            for table in (Job, EvalRun, Batch):
                query = update(table).where(table.worker_id.startswith(f"{process_id}/", autoescape=True))
                session.execute(query.values(heartbeat_at=time.time()))

    def held_jobs(self, status: str | None = None) -> list[Job]:
        """The jobs a worker holds (found by the worker_id index); with `status`, those in it alone."""
        query = select(Job).where(Job.worker_id.is_not(None))
        with self.session() as session:
            return list(session.scalars(query if status is None else query.where(Job.status == status)))

    def unheld_before(self, status: str, seq: int) -> int:
        """How many jobs in `status` that no worker holds yet came before the job of `seq`: a worker takes them
        first."""
        query = select(func.count()).where(Job.status == status, Job.worker_id.is_(None), Job.seq < seq)
        with self.session() as session:
            return session.scalar(query)

    def job_totals(self) -> tuple[dict[str, int], int]:
        """Every owner's jobs together: how many are in each status, and the tokens they have trained."""
        with self.session() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            tokens = session.scalar(select(func.coalesce(func.sum(Job.trained_tokens), 0)))
        return {status: counts.get(status, 0) for status in STATUSES}, int(tokens)

    # ---- events and checkpoints ------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, **kind: Any) -> None:
        self.add(event(job_id, message, **kind))

    def list_events(self, job_id: str, *, after: str | None, limit: int) -> Page:
        return self.page(JobEvent, select(JobEvent).where(JobEvent.job_id == job_id), after, limit, newest_first=True)

    def list_checkpoints(self, job_id: str, *, after: str | None, limit: int) -> Page:
        query = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
        return self.page(JobCheckpoint, query, after, limit, newest_first=True)

    def sync_checkpoints(self, job_id: str, on_disk: dict[int, JobCheckpoint]) -> list[int]:
        """Make the job's rows match the checkpoints on disk (the loop prunes old ones), given as the rows
        they would be; returns new steps. A kept row's metrics follow the given row's: the final checkpoint
        is saved before the full validation that adds to its step's metrics is written."""
        with self.session() as session:
            rows = {
                row.step: row for row in session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id))
            }
            for step, row in rows.items():
                if step not in on_disk:
                    session.delete(row)
                elif on_disk[step].metrics != row.metrics:
                    row.metrics = on_disk[step].metrics
            added = sorted(set(on_disk) - set(rows))
            session.add_all(on_disk[step] for step in added)
        return added
