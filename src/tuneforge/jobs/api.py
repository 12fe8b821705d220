"""The OpenAI Fine-Tuning API over the store, the file storage and the workers, plus inference.

Routes: `/v1/files` (upload, list, get, content, delete), `/v1/fine_tuning/jobs` (create, list,
get, cancel, pause, resume, events, checkpoints) and, through `tuneforge.serve`, `/v1/models`,
`/v1/chat/completions` and `/v1/completions` for the base models of a key's jobs and its
fine-tuned models. Every error is OpenAI's body `{"error": {message, type, param, code}}`, a bad
argument a 400 that names it. With API keys, each key is an owner that sees only its own files,
jobs and models (keys are never stored: owners are hashes of them).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal, Sequence

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ConfigError, ModelSourceError
from ..models import resolve
from ..serve import APIError, install_error_handlers
from .files import FileStorage, FileTooLarge
from .inference import ForwardedResponse, InferenceModels
from .mapping import CreateJobBody, training_config
from .store import ACTIVE, Job, Store, StoredFile, new_id, now
from .worker import Workers

ORGANIZATION = "tuneforge"
LOCAL_OWNER = "local"
MAX_JSON_BODY_BYTES = 4 << 20
UPLOAD_PATH = "/v1/files"


def job_body(job: Job) -> dict:
    """A job as OpenAI's `fine_tuning.job` object."""
    return {
        "object": "fine_tuning.job", "id": job.id, "created_at": job.created_at, "error": job.error,
        "fine_tuned_model": job.fine_tuned_model if job.status == "succeeded" else None,
        "finished_at": job.finished_at, "hyperparameters": job.hyperparameters, "model": job.model,
        "organization_id": ORGANIZATION, "result_files": job.result_files, "seed": job.seed, "status": job.status,
        "trained_tokens": job.trained_tokens, "training_file": job.training_file,
        "validation_file": job.validation_file, "estimated_finish": job.estimated_finish, "integrations": [],
        "metadata": job.metadata_, "method": job.method, "user_provided_suffix": job.suffix,
    }


def list_body(rows, has_more: bool) -> dict:
    data = [row if isinstance(row, dict) else row.to_api() for row in rows]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def owner_of(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def create_api(root: Path, store: Store, *, api_keys: Sequence[str] = (), workers: int = 1,
               max_upload_bytes: int = 512 << 20) -> FastAPI:
    """The app; its lifespan starts `workers` job workers and stops them (jobs queued again) at the end."""
    storage = FileStorage(root)
    job_workers = Workers(store, storage, root, workers)
    models = InferenceModels()
    keys = [key.encode() for key in api_keys]

    def owner(request: Request) -> str:
        if not keys:
            return LOCAL_OWNER
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "No API key given: send it as `Authorization: Bearer KEY`.", code="invalid_api_key")
        if not any(hmac.compare_digest(given.strip().encode(), key) for key in keys):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return owner_of(given.strip())

    def own_file(owner_id: str, file_id: str, param: str = "file_id") -> StoredFile:
        row = store.get_file(owner_id, file_id)
        if row is None:
            raise APIError(404 if param == "file_id" else 400, f"No such File object: {file_id}", param=param,
                           code="file_not_found")
        return row

    def own_job(owner_id: str, job_id: str) -> Job:
        job = store.get_job(job_id, owner_id)
        if job is None:
            raise APIError(404, f"No fine-tuning job found with id {job_id}", param="fine_tuning_job_id",
                           code="fine_tune_not_found")
        return job

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        job_workers.start()
        try:
            yield
        finally:
            await asyncio.to_thread(job_workers.stop)
            await models.close()

    v1 = APIRouter(prefix="/v1")

    # ---- files -------------------------------------------------------------------------------------

    @v1.post("/files")
    def upload_file(file: UploadFile = File(...), purpose: str = Form(...), owner_id: str = Depends(owner)):
        if purpose != "fine-tune":
            raise APIError(400, f"purpose '{purpose}' is not supported here; upload training data with "
                                "purpose 'fine-tune'.", param="purpose", code="invalid_value")
        if not (file.filename or "").lower().endswith(".jsonl"):
            raise APIError(400, f"'{file.filename}' is not a .jsonl file; fine-tuning data is JSON Lines.",
                           param="file", code="invalid_file_format")
        try:
            row = storage.save(file.file, owner=owner_id, filename=file.filename, purpose=purpose,
                               max_bytes=max_upload_bytes)
        except FileTooLarge as err:
            raise APIError(413, str(err), param="file", code="file_too_large") from err
        store.add(row)
        return row.to_api()

    @v1.get("/files")
    def list_files(after: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                   order: Literal["asc", "desc"] = "desc", purpose: str | None = None,
                   owner_id: str = Depends(owner)):
        page = store.list_files(owner_id, purpose=purpose, after=after, limit=limit, newest_first=order == "desc")
        return list_body(page, page.has_more)

    @v1.get("/files/{file_id}")
    def get_file(file_id: str, owner_id: str = Depends(owner)):
        return own_file(owner_id, file_id).to_api()

    @v1.get("/files/{file_id}/content")
    def file_content(file_id: str, owner_id: str = Depends(owner)):
        row = own_file(owner_id, file_id)
        return FileResponse(storage.path(row.id), media_type="application/octet-stream", filename=row.filename)

    @v1.delete("/files/{file_id}")
    def delete_file(file_id: str, owner_id: str = Depends(owner)):
        own_file(owner_id, file_id)
        if (user := store.file_in_use(file_id)) is not None:
            raise APIError(400, f"{file_id} is in use by fine-tuning job {user.id} ({user.status}); cancel the "
                                "job or wait until it finishes.", param="file_id", code="file_in_use")
        store.delete_file(owner_id, file_id)
        storage.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- fine-tuning jobs --------------------------------------------------------------------------

    @v1.post("/fine_tuning/jobs")
    def create_job(body: CreateJobBody, owner_id: str = Depends(owner)):
        if body.hyperparameters is not None and body.method is not None:
            raise APIError(400, "Give hyperparameters in method.<type>.hyperparameters or in the legacy "
                                "top-level hyperparameters, not both.", param="hyperparameters")
        files = {"training_file": body.training_file, "validation_file": body.validation_file}
        for param, file_id in files.items():
            if file_id and own_file(owner_id, file_id, param).purpose != "fine-tune":
                raise APIError(400, f"{file_id} was not uploaded with purpose 'fine-tune'.", param=param,
                               code="invalid_file_purpose")
        base_name = _base_model_name(body.model)
        job_id = new_id("ftjob-")
        method = body.method_dict()
        seed = body.seed if body.seed is not None else random.randrange(2**31)
        try:
            training_config(body.model, method, seed, storage.path(body.training_file),
                            storage.path(body.validation_file) if body.validation_file else None,
                            root / "runs" / job_id)
        except ConfigError as err:
            raise APIError(400, f"This method or these hyperparameters are not supported: {err.message}",
                           param="method", code="unsupported_value") from err
        job = Job(id=job_id, owner=owner_id, model=body.model, training_file=body.training_file,
                  validation_file=body.validation_file, suffix=body.suffix, seed=seed, metadata_=body.metadata,
                  method=method, status="validating_files", created_at=now(), result_files=[],
                  fine_tuned_model=f"ft:{base_name}:{ORGANIZATION}:{body.suffix or ''}:{new_id('', 8)}")
        store.add(job)
        store.add_event(job.id, f"Created fine-tuning job: {job.id}")
        return job_body(job)

    @v1.get("/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                  owner_id: str = Depends(owner)):
        # OpenAI's SDK sends a metadata filter as `metadata[KEY]=VALUE`.
        metadata = {key[len("metadata["):-1]: value for key, value in request.query_params.items()
                    if key.startswith("metadata[") and key.endswith("]")}
        page = store.list_jobs(owner_id, after=after, limit=limit, metadata=metadata)
        return list_body([job_body(job) for job in page], page.has_more)

    @v1.get("/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str, owner_id: str = Depends(owner)):
        return job_body(own_job(owner_id, job_id))

    @v1.post("/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, owner_id: str = Depends(owner)):
        job = own_job(owner_id, job_id)
        # A running job's worker sees the new status and stops its training process within a step.
        if not store.move(job.id, ACTIVE, status="cancelled", finished_at=now(), stop_request=None,
                          estimated_finish=None):
            raise APIError(400, f"Job {job_id} has already finished ({job.status}); only an unfinished job can be "
                                "cancelled.", param="fine_tuning_job_id", code="invalid_state")
        store.add_event(job.id, "Job cancelled.")
        return job_body(own_job(owner_id, job_id))

    @v1.post("/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str, owner_id: str = Depends(owner)):
        job = own_job(owner_id, job_id)
        if store.move(job.id, ["queued"], status="paused"):
            store.add_event(job.id, "Job paused before it started.")
        elif store.move(job.id, ["running"], stop_request="pause"):
            store.add_event(job.id, "Pause requested: the job saves a checkpoint and stops after its current step.")
        else:
            raise APIError(400, f"Job {job_id} is {job.status}; only a queued or running job can be paused.",
                           param="fine_tuning_job_id", code="invalid_state")
        return job_body(own_job(owner_id, job_id))

    @v1.post("/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str, owner_id: str = Depends(owner)):
        job = own_job(owner_id, job_id)
        if not store.move(job.id, ["paused"], status="queued", stop_request=None):
            raise APIError(400, f"Job {job_id} is {job.status}; only a paused job can be resumed.",
                           param="fine_tuning_job_id", code="invalid_state")
        store.add_event(job.id, "Job resumed: queued to continue from its last checkpoint.")
        return job_body(own_job(owner_id, job_id))

    @v1.get("/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=1000),
                    owner_id: str = Depends(owner)):
        page = store.list_events(own_job(owner_id, job_id).id, after=after, limit=limit)
        return list_body(page, page.has_more)

    @v1.get("/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=100),
                         owner_id: str = Depends(owner)):
        page = store.list_checkpoints(own_job(owner_id, job_id).id, after=after, limit=limit)
        return list_body(page, page.has_more)

    # ---- inference ---------------------------------------------------------------------------------

    def model_cards(owner_id: str) -> dict[str, dict]:
        cards = {}
        for job in store.jobs_of(owner_id):
            cards.setdefault(job.model, {"id": job.model, "object": "model", "created": 0, "owned_by": "tuneforge"})
            if job.status == "succeeded":
                cards[job.fine_tuned_model] = {"id": job.fine_tuned_model, "object": "model",
                                               "created": job.finished_at, "owned_by": ORGANIZATION}
        return cards

    def served_as(owner_id: str, name: str) -> tuple[str, str | None]:
        """(base model, adapter folder or None) for a model name this owner may use."""
        for job in store.jobs_of(owner_id):
            run = root / "runs" / job.id
            if name == job.model:
                return job.model, None
            if job.status == "succeeded" and name == job.fine_tuned_model:
                return job.model, str(run / "final")
            step = name.removeprefix(f"{job.fine_tuned_model}:ckpt-step-")
            if step != name and (run / "checkpoints" / f"step-{step}").is_dir():
                return job.model, str(run / "checkpoints" / f"step-{step}")
        raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.", param="model",
                       code="model_not_found")

    @v1.get("/models")
    def list_models(owner_id: str = Depends(owner)):
        return {"object": "list", "data": list(model_cards(owner_id).values())}

    @v1.get("/models/{name:path}")
    def get_model(name: str, owner_id: str = Depends(owner)):
        card = model_cards(owner_id).get(name)
        if card is None:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        return card

    async def forward(request: Request, owner_id: str) -> ForwardedResponse:
        try:
            body = await request.json()
        except ValueError as err:
            raise APIError(400, f"The request body is not valid JSON: {err}") from err
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise APIError(400, "Missing required parameter: 'model'.", param="model")
        base, adapter = await asyncio.to_thread(served_as, owner_id, body["model"])
        adapters = {job.fine_tuned_model: str(root / "runs" / job.id / "final")
                    for job in await asyncio.to_thread(store.succeeded_jobs_on, base)}
        if adapter:
            adapters[body["model"]] = adapter
        served = await models.acquire(base, adapters, body["model"])
        if adapter is None:
            body["model"] = served.pool.base_name  # serve knows the base by its short name
        return ForwardedResponse(models, served, body)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request, owner_id: str = Depends(owner)):
        return await forward(request, owner_id)

    @v1.post("/completions")
    async def completions(request: Request, owner_id: str = Depends(owner)):
        return await forward(request, owner_id)

    app = FastAPI(title="tuneforge", summary="OpenAI-compatible fine-tuning jobs and inference", lifespan=lifespan)
    app.include_router(v1)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_json_bytes=MAX_JSON_BODY_BYTES, max_upload_bytes=max_upload_bytes)
    return app


def _base_model_name(model: str) -> str:
    """The base's short name for `ft:` names; a 400 naming `model` when there is no such model."""
    if model.startswith("ft:"):
        raise APIError(400, f"Fine-tuning a fine-tuned model ({model}) is not supported yet; start from its base.",
                       param="model", code="model_not_available")
    try:
        return resolve(model, pull_missing=False).name
    except ModelSourceError as err:
        if err.code == "model_not_pulled":  # a registry model: the job pulls it while validating
            return model.lower()
        raise APIError(400, f"Model {model} is not available for fine-tuning: {err.message}", param="model",
                       code="model_not_available") from err


class BodyLimit:
    """Refuses bodies beyond a limit (uploads have their own): at once by Content-Length, else while reading."""

    def __init__(self, app: ASGIApp, *, max_json_bytes: int, max_upload_bytes: int):
        self.app, self.max_json_bytes, self.max_upload_bytes = app, max_json_bytes, max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The multipart envelope around an upload adds a little to the file's own size.
        limit = self.max_upload_bytes + (64 << 10) if scope["path"] == UPLOAD_PATH else self.max_json_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(limit).response()(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise StarletteHTTPException(413, _too_large(limit).message)
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit:,} bytes.",
                    code="request_too_large")
