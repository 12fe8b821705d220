"""`/v1/fine_tuning/jobs`: create, list, get, cancel, pause, resume, events and checkpoints of the caller's jobs."""

from __future__ import annotations

import random

from fastapi import APIRouter, Depends, Query, Request

from ...config import Config
from ...data.prepare import render_first_rows
from ...errors import ConfigError, ModelSourceError
from ...graders import runs_python
from ...models import resolve
from ...training import checkpoint
from ...web import APIError, caller, list_body, metadata_filter
from ...wording import counted
from ..access import training_spec
from ..mapping import CreateJobBody, training_config
from ..service import ORGANIZATION, Service, service_of
from ..store import ACTIVE, FINISHED, Job, event, new_id, now
from .files import own_file

FIRST_ROWS = 8  # the training file's rows a job's chat template is rendered on when the job is created
TEMPLATE_FAULTS = ("template_error", "template_not_prefix")  # the rendering problems a job's template causes

router = APIRouter(prefix="/v1/fine_tuning/jobs", dependencies=[Depends(caller)])


def job_body(job: Job) -> dict:
    """A job as OpenAI's `fine_tuning.job` object."""
    return {
        "object": "fine_tuning.job",
        "id": job.id,
        "created_at": job.created_at,
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model if job.status == "succeeded" else None,
        "finished_at": job.finished_at,
        "hyperparameters": job.hyperparameters,
        "model": job.model,
        "organization_id": ORGANIZATION,
        "result_files": job.result_files,
        "seed": job.seed,
        "status": job.status,
        # As OpenAI's: null while the job runs (its progress is in the metrics events), the count once it finished.
        "trained_tokens": job.trained_tokens if job.status in FINISHED else None,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": job.estimated_finish,
        "integrations": job.integrations or [],
        "metadata": job.metadata_,
        "method": job.method,
        "user_provided_suffix": job.suffix,
    }


def own_job(service: Service, owner: str, job_id: str) -> Job:
    job = service.store.get_job(job_id, owner)
    if job is None:
        raise APIError(
            404, f"No fine-tuning job found with id {job_id}", param="fine_tuning_job_id", code="fine_tune_not_found"
        )
    return job


@router.post("")
def create_job(body: CreateJobBody, owner: str = Depends(caller), service: Service = Depends(service_of)):
    stored = {param: own_file(service, owner, file_id, param, "fine-tune") for param, file_id in body.files().items()}
    grader = body.method.reinforcement.grader if body.method and body.method.reinforcement else None
    if grader and runs_python(grader) and not service.allow_python_graders:
        raise APIError(
            400,
            "This server does not run python graders (they run your code on its machine); grade with string_check, "
            "text_similarity, json_fields or multi, or ask its operator to start it with --allow-python-graders.",
            param="method.reinforcement.grader",
            code="python_grader_not_allowed",
        )
    model, base_name = service.access.for_training(owner, body.model)
    job_id = new_id("ftjob-")
    method = body.method_dict()
    seed = body.seed if body.seed is not None else random.randrange(2**31)
    validation = stored.get("validation_file")
    try:
        config = training_config(
            training_spec(service.store, service.runs, owner, model),
            method,
            seed,
            service.storage.path(stored["training_file"]),
            service.storage.path(validation) if validation else None,
            service.runs / job_id,
            integrations=body.integrations_list(),
        )
    except ConfigError as err:
        raise APIError(
            400,
            f"This method or these hyperparameters are not supported: {err.message}",
            param="method",
            code="unsupported_value",
        ) from err
    if config.model.chat_template is not None:
        render_first_rows_with_template(service, config, body.training_file, f"method.{method['type']}")
    job = Job(
        id=job_id,
        owner=owner,
        model=model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=seed,
        metadata_=body.metadata,
        method=method,
        integrations=body.integrations_list(),
        status="validating_files",
        created_at=now(),
        result_files=[],
        fine_tuned_model=f"ft:{base_name}:{ORGANIZATION}:{body.suffix or ''}:{new_id('', 8)}",
    )
    service.store.add(job)
    service.store.add_event(job.id, f"Created fine-tuning job: {job.id}")
    told = waiting_for_validation(service, job)
    if told is not None:
        service.store.add_event(job.id, told)
    return job_body(job)


def waiting_for_validation(service: Service, job: Job) -> str | None:
    """What a new job waits for before a worker validates its files, or None when it waits for nothing. A worker
    validates one job's files at a time, oldest first: the job waits in validating_files with no event of its own
    behind the jobs being validated and those created before it that no worker has taken yet (a burst of jobs
    created together, before a worker took the first), unless one has taken it already. Another key's job is not
    named."""
    busy = service.store.held_jobs("validating_files")
    if job.id in {held.id for held in busy}:
        return None
    before = service.store.unheld_before("validating_files", job.seq)
    said = []
    if busy:
        named = [f"job {held.id}" if held.owner == job.owner else "another client's job" for held in busy]
        said.append(f"the files of {' and '.join(named)} are being validated now")
    if before:
        said.append(
            f"{counted(before, 'job')} created before it {'waits' if before == 1 else 'wait'} to be validated first"
        )
    return f"Waiting for a worker to validate this job's files: {', and '.join(said)}." if said else None


def render_first_rows_with_template(service: Service, config: Config, training_file: str, method_param: str) -> None:
    """A 400 naming the template's line and the row, where the job's tuneforge_chat_template fails on one of the
    training file's first rows: a template that compiles may still raise when it renders (raise_exception, an
    index past the messages, a filter Jinja has not), or rewrite a conversation's earlier turns once a reply
    follows (template_not_prefix), which validating the files would find only after the job is queued. A base
    model not yet on this server has no tokenizer here; its job's rows are all rendered while validating. The
    tokenizer with the template is the service's (`TemplateTokenizers`), loaded once for the jobs that send it."""
    param = f"{method_param}.hyperparameters.tuneforge_chat_template"
    try:
        source = resolve(config.base_model, pull_missing=False)
    except ModelSourceError:
        return
    try:
        tokenizer = service.tokenizers.get(source, config.model.chat_template, config.key_at("model.chat_template"))
    except ConfigError as err:  # the job's template is the tokenizer's only setting a job gives
        raise APIError(400, err.message, param=param, code="invalid_value") from err
    failed = [p for p in render_first_rows(config.data, tokenizer, FIRST_ROWS) if p.code in TEMPLATE_FAULTS]
    if failed:
        raise APIError(
            400,
            f"{param}: on {training_file} line {failed[0].line}, {failed[0].message}",
            param=param,
            code="invalid_value",
        )


@router.get("")
def list_jobs(
    request: Request,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    owner: str = Depends(caller),
    service: Service = Depends(service_of),
):
    page = service.store.list_jobs(owner, after=after, limit=limit, metadata=metadata_filter(request))
    return list_body([job_body(job) for job in page], page.has_more)


@router.get("/{job_id}")
def get_job(job_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    return job_body(own_job(service, owner, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    job = own_job(service, owner, job_id)
    # A running job's worker sees the new status and stops its training process within a step.
    if not service.store.move(
        job.id,
        ACTIVE,
        status="cancelled",
        finished_at=now(),
        stop_request=None,
        estimated_finish=None,
        adding=[event(job.id, "Job cancelled.")],
    ):
        raise invalid_state(
            f"Job {job_id} has already finished ({job.status}); only an unfinished job can be cancelled."
        )
    return job_body(own_job(service, owner, job_id))


@router.post("/{job_id}/pause")
def pause_job(job_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    job = own_job(service, owner, job_id)
    before_start = event(job.id, "Job paused before it started.")
    if service.store.move(job.id, ["queued"], status="paused", adding=[before_start]):
        return job_body(own_job(service, owner, job_id))
    if service.store.request_pause(job.id):
        service.store.add_event(job.id, "Pause requested: the job saves a checkpoint and stops after its current step.")
    elif not (job.status == "running" and job.stop_request == "pause"):  # asked twice: the first one holds
        raise invalid_state(f"Job {job_id} is {job.status}; only a queued or running job can be paused.")
    return job_body(own_job(service, owner, job_id))


@router.post("/{job_id}/resume")
def resume_job(job_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    job = own_job(service, owner, job_id)
    # From its newest whole checkpoint, as its run resumes (`runner.run`), which may lie before the last step it
    # reported (its server died after it).
    last, _ = checkpoint.newest_whole(service.runs / job.id / "checkpoints")
    where = f"to continue from step {checkpoint.step_number(last)}" if last else "to start from the beginning"
    resumed = event(job.id, f"Job resumed: queued {where}.")
    if not service.store.move(job.id, ["paused"], status="queued", stop_request=None, adding=[resumed]):
        raise invalid_state(f"Job {job_id} is {job.status}; only a paused job can be resumed.")
    return job_body(own_job(service, owner, job_id))


@router.get("/{job_id}/events")
def list_events(
    job_id: str,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=1000),
    owner: str = Depends(caller),
    service: Service = Depends(service_of),
):
    page = service.store.list_events(own_job(service, owner, job_id).id, after=after, limit=limit)
    return list_body(page, page.has_more)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(
    job_id: str,
    after: str | None = None,
    limit: int = Query(10, ge=1, le=100),
    owner: str = Depends(caller),
    service: Service = Depends(service_of),
):
    page = service.store.list_checkpoints(own_job(service, owner, job_id).id, after=after, limit=limit)
    return list_body(page, page.has_more)


def invalid_state(message: str) -> APIError:
    """The 400 for an action the job's status does not allow."""
    return APIError(400, message, param="fine_tuning_job_id", code="invalid_state")
