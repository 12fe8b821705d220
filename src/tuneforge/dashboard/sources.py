"""Where the dashboard's runs come from: the jobs of `tuneforge api`, or the run folders under a directory.

Both give the pages the same things (`RunRow`s for the list, a `RunPage` per run, the models a
playground may chat with), for an owner: the jobs source shows an API key's own jobs only, through
the store's owner-scoped queries and `jobs/access.py`, exactly as the API does; the folders source
has one owner, the person at the terminal.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Protocol

from ..data import check_data
from ..errors import ConfigError, ModelSourceError, TuneforgeError
from ..jobs.access import InferenceTarget, client_names, training_spec
from ..jobs.mapping import CreateJobBody, api_advice, training_config
from ..jobs.service import Service
from ..jobs.store import Job, StoredFile
from ..methods import check_inputs
from ..models import REGISTRY, load_tokenizer, resolve
from ..web import APIError, scrub_paths
from .runs import SHARE_PREFIX, Checkpoint, Event, RunFolder, RunPage, RunRow, flat_config, metric_events

FOLDER_DEPTH = 2  # run folders are found this many levels under the directory `tuneforge ui` is given
_CHECKPOINT_NAME = re.compile(r"(?P<run>.+):ckpt-step-(?P<step>[0-9]{1,12})")
EVENTS_SHOWN = 200


class RunSource(Protocol):
    kind: str  # "jobs" or "folders"

    def list_runs(self, owner: str) -> list[RunRow]: ...

    def run_page(self, owner: str, run_id: str) -> RunPage | None: ...

    def folder(self, owner: str, run_id: str) -> RunFolder | None: ...

    def chat_models(self, owner: str) -> list[str]: ...


def _row_from_folder(folder: RunFolder, **fields) -> RunRow:
    """A list row with what the folder says about progress and final figures; `fields` as the caller knows them.
    Its task scores are its evaluation's (`RunFolder.task_scores`), whatever summary.json holds of them."""
    summary = folder.summary or {}
    metrics = summary.get("metrics") or folder.last_metrics()
    row = RunRow(**fields)
    figures = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith(SHARE_PREFIX)}
    row.metrics = figures | folder.task_scores()
    row.elapsed_s = metrics.get("elapsed", row.elapsed_s)
    row.step = metrics.get("step", row.step) or row.step
    row.total_steps = summary.get("steps", row.total_steps)
    row.problems = folder.problems
    return row


def _metrics_at(metrics: list[dict]) -> dict[int, dict]:
    by_step: dict[int, dict] = {}
    for record in metrics:
        by_step.setdefault(record["step"], {}).update(record)
    return by_step


class FolderRuns:
    """Run folders under `root` (the root itself, or up to `FOLDER_DEPTH` levels down), for `tuneforge ui`."""

    kind = "folders"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _folders(self) -> dict[str, RunFolder]:
        found = {}
        candidates = [self.root]
        for depth in range(1, FOLDER_DEPTH + 1):
            candidates += sorted(p for p in self.root.glob("/".join(["*"] * depth)) if p.is_dir())
        for path in candidates:
            folder = RunFolder(path)
            if folder.is_run():
                found[path.name if path == self.root else path.relative_to(self.root).as_posix()] = folder
        return found

    def folder(self, owner: str, run_id: str) -> RunFolder | None:
        return self._folders().get(run_id)

    def list_runs(self, owner: str) -> list[RunRow]:
        rows = [self._row(run_id, folder) for run_id, folder in self._folders().items()]
        return sorted(rows, key=lambda row: row.created, reverse=True)

    def _row(self, run_id: str, folder: RunFolder) -> RunRow:
        config = folder.config()
        # A run writes config.yaml and its data report as it starts; one whose data was refused, the report alone.
        started = (folder.path / "config.yaml", folder.path / "data_report.json")
        return _row_from_folder(
            folder,
            id=run_id,
            name=run_id,
            status=folder.status(),
            model=str(config.get("base_model", "-")),
            method=str(config.get("method", "-")),
            created=next((p.stat().st_mtime for p in started if p.exists()), 0),
        )

    def run_page(self, owner: str, run_id: str) -> RunPage | None:
        folder = self.folder(owner, run_id)
        if folder is None:
            return None
        metrics, steps = folder.metrics(), folder.checkpoint_steps()
        at = _metrics_at(metrics)
        config = folder.config()
        return RunPage(
            row=self._row(run_id, folder),
            folder=folder,
            events=metric_events(metrics, steps, folder.summary),
            checkpoints=[Checkpoint(step, at.get(step, {}), f"{run_id}:ckpt-step-{step}") for step in reversed(steps)],
            hyperparameters=flat_config(config),
            data_report=folder.data_report(),
            tuned_model=run_id if (folder.path / "final").is_dir() else None,
            base_model=str(config["base_model"]) if "base_model" in config else None,
            error="The run stopped at its data check: see the problems in its data report below."
            if folder.data_refused()
            else None,
        )

    def chat_models(self, owner: str) -> list[str]:
        names = []
        for run_id, folder in self._folders().items():
            base = folder.config().get("base_model")
            if base is not None and str(base) not in names:
                names.append(str(base))
            if (folder.path / "final").is_dir():
                names.append(run_id)
            names += [f"{run_id}:ckpt-step-{step}" for step in reversed(folder.checkpoint_steps())]
        return names

    def chat_target(self, name: str) -> InferenceTarget:
        """What a playground's model name stands for: a run's final model, one of its checkpoints, or a run's base."""
        folders = self._folders()
        checkpoint = _CHECKPOINT_NAME.fullmatch(name)
        if checkpoint and checkpoint["run"] in folders:
            spec = folders[checkpoint["run"]].path / "checkpoints" / f"step-{int(checkpoint['step'])}"
        elif name in folders:
            spec = folders[name].path / "final"
        elif name in self.chat_models(""):
            spec = name
        else:
            raise APIError(404, f"No run, checkpoint or base model called `{name}` under {self.root}.", param="model")
        try:
            source = resolve(str(spec), pull_missing=False)
        except ModelSourceError as err:
            raise APIError(404, f"The model `{name}` cannot be loaded: {err.message}", param="model") from err
        return InferenceTarget(source)


class JobRuns:
    """The jobs of `tuneforge api`, each shown with its run folder; an owner sees its own jobs only."""

    kind = "jobs"

    def __init__(self, service: Service):
        self.service = service

    def _job(self, owner: str, run_id: str) -> Job | None:
        return self.service.store.get_job(run_id, owner)

    def folder(self, owner: str, run_id: str) -> RunFolder | None:
        job = self._job(owner, run_id)
        return RunFolder(self.service.runs / job.id) if job else None

    def _row(self, job: Job, folder: RunFolder | None = None) -> RunRow:
        end = job.finished_at or (time.time() if job.status == "running" else None)
        return _row_from_folder(
            folder or RunFolder(self.service.runs / job.id),
            id=job.id,
            name=job.suffix or job.id,
            status=job.status,
            model=job.model,
            method=job.method["type"],
            created=job.created_at,
            elapsed_s=end - job.created_at if end else None,
            step=job.step,
            total_steps=job.total_steps,
        )

    def list_runs(self, owner: str) -> list[RunRow]:
        return [self._row(job) for job in reversed(self.service.store.jobs_of(owner))]

    def run_page(self, owner: str, run_id: str) -> RunPage | None:
        job = self._job(owner, run_id)
        if job is None:
            return None
        store = self.service.store
        events = store.list_events(job.id, after=None, limit=EVENTS_SHOWN)
        checkpoints = store.list_checkpoints(job.id, after=None, limit=100)
        folder = RunFolder(self.service.runs / job.id)
        files = {param: self._file(job, param) for param in ("training_file", "validation_file")}
        hyperparameters = {
            "method": job.method["type"],
            **{key: str(value) for key, value in job.hyperparameters.items()},
            "seed": str(job.seed),
            **{param: f"{row.id} ({row.filename})" for param, row in files.items() if row},
            "suffix": job.suffix or "-",
        }
        report = folder.data_report()
        names = {str(self.service.storage.path(row)): f"{row.id} ({row.filename})" for row in files.values() if row}
        return RunPage(
            row=self._row(job, folder),  # the page's folder: what its views note shows on the page
            folder=folder,
            events=[Event(e.created_at, e.message, e.level) for e in events],
            checkpoints=[Checkpoint(c.step, c.metrics, c.model) for c in checkpoints],
            hyperparameters=hyperparameters,
            data_report=public_report(report, names) if report else None,
            tuned_model=job.fine_tuned_model if job.status == "succeeded" else None,
            base_model=job.model,
            error=(job.error or {}).get("message"),
        )

    def _file(self, job: Job, param: str) -> StoredFile | None:
        file_id = getattr(job, param)
        return self.service.store.get_file(job.owner, file_id) if file_id else None

    def chat_models(self, owner: str) -> list[str]:
        names = [*REGISTRY, *self.service.access.allowed]
        for job in reversed(self.service.store.jobs_of(owner)):
            if job.model not in names:
                names.append(job.model)
            if job.status == "succeeded":
                names.append(job.fine_tuned_model)
                checkpoints = self.service.store.list_checkpoints(job.id, after=None, limit=100)
                names += [c.model for c in checkpoints]
        return names

    def training_models(self, owner: str) -> list[str]:
        """What the new-job form offers as a base: registry models, the models the operator allows, the
        owner's fine-tuned models."""
        tuned = [job.fine_tuned_model for job in self.service.store.jobs_of(owner) if job.status == "succeeded"]
        return [*REGISTRY, *self.service.access.allowed, *reversed(tuned)]

    def check_file(self, owner: str, file_id: str, model: str, method: str) -> dict:
        """The data report of an uploaded file as a job on `model` would check it, before the job is created.

        The same pass the worker runs on a new job's files (training's checks before any compute, then
        `check_data` with the model's tokenizer and the job's data settings); problems name the file by id
        and name, never by its server path."""
        row = self.service.store.get_file(owner, file_id)
        if row is None:
            raise APIError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
        name, _ = self.service.access.for_training(owner, model)
        path = self.service.storage.path(row)
        try:
            spec = training_spec(self.service.store, self.service.runs, owner, name)
            body = CreateJobBody(model=name, training_file=file_id, method={"type": method})
            config = training_config(spec, body.method_dict(), 0, path, None, self.service.runs / "unused")
            source = resolve(config.base_model, pull_missing=False)
            tokenizer = load_tokenizer(source)
        except TuneforgeError as err:
            raise APIError(400, scrub_paths(err.message), param="model", code="model_not_available") from err
        names = {str(path): f"{row.id} ({row.filename})", **client_names(source, model)}
        try:
            # As the job's validation does: what training checks before any compute (the model's positions
            # against data.max_length, preference pairs for dpo and only for dpo, ...).
            check_inputs(config, tokenizer, source)
        except ConfigError as err:  # the model or the method, not the file, is at fault
            raise APIError(400, public_message(err.message, names), param="model", code=err.code) from err
        except TuneforgeError as err:
            raise APIError(400, public_message(err.message, names), param="file_id", code=err.code) from err
        data, _ = check_data(config.data, tokenizer, keep_examples=False)  # the report is all it shows
        return public_report(data.report, names)


def public_message(message: str, names: dict[str, str]) -> str:
    """A problem's message to show a job's client: the server paths `names` holds named as it says, any other
    hidden, and its advice in the job's fields (`api_advice`)."""
    return scrub_paths(api_advice(_named(message, names)))


def _named(text: str, names: dict[str, str]) -> str:
    for path, name in names.items():
        text = text.replace(path, name)
    return text


def public_report(report: dict, names: dict[str, str]) -> dict:
    """A data report to show a job's client: stored files named as `names` says, any other server path hidden,
    the cache's location left out, and the advice of its problems' and warnings' messages in the job's fields
    (`api_advice`; a row's own text, quoted elsewhere in the report, stays as written)."""

    def clean(value, key=None):
        if isinstance(value, dict):
            return {inner: clean(item, inner) for inner, item in value.items() if inner != "cache"}
        if isinstance(value, list):
            return [clean(item, key) for item in value]
        if isinstance(value, str):
            value = _named(value, names)
            return scrub_paths(api_advice(value) if key == "message" else value)
        return value

    return clean(report)
