"""The OpenAI Fine-Tuning API over the store, the file storage and the workers, plus inference.

Routes (one router per resource, in `routes/`): `/v1/files` (upload, list, get, content, delete),
`/v1/fine_tuning/jobs` (create, list, get, cancel, pause, resume, events, checkpoints), `/v1/evals`
(OpenAI's Evals API: evals with graders as testing criteria, their runs and output items, `evals.py`),
`/v1/batches` (OpenAI's Batch API: files of requests answered in the background by the inference routes,
`batches.py`),
`/v1/models`, and through `tuneforge.serve`, `/v1/chat/completions`, `/v1/completions` and
`/v1/responses` for the models a key may use (`access.py`), and the key's stored chat completions (kept in the job
store's database). `/metrics` has the requests, generation and jobs (`metrics.py`). The web
dashboard (`tuneforge.dashboard`, which reads this service) adds its pages under `/ui`. Every
error is OpenAI's body `{"error": {message, type, param, code}}`, a bad argument a 400 that names
it. With API keys, each key is an owner that sees only its own files, jobs, models and stored
completions (keys are never stored: owners are hashes of them); the key is checked before any
body is read, and bodies are capped (`tuneforge.web`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from ..serve import CompletionStore, Retention, completion_routes
from ..serve_defaults import PREFIX_CACHE_MB
from ..web import Observer, docs_urls, edge, form_fields
from .access import ModelAccess
from .batches import BatchRunner
from .files import FileStorage
from .inference import InferenceModels
from .metrics import JobMetrics
from .routes import ROUTERS
from .routes.files import UPLOAD_PATH, upload_too_large
from .service import Service
from .store import Store
from .worker import Workers, process_worker_id

MAX_JSON_BODY_BYTES = 4 << 20
UPLOAD_ENVELOPE_BYTES = 64 << 10  # what multipart adds around an uploaded file


def create_api(
    root: Path,
    store: Store,
    *,
    api_keys: Sequence[str] = (),
    workers: int = 1,
    max_upload_bytes: int = 512 << 20,
    max_body_bytes: int = MAX_JSON_BODY_BYTES,
    allowed_models: Sequence[str] = (),
    max_models: int = 2,
    docs: bool = False,
    allow_python_graders: bool = False,
    dashboard: bool = True,
    retention: Retention = Retention(),
    log_prompts: bool = False,
    prefix_cache_mb: int = PREFIX_CACHE_MB,
) -> FastAPI:
    """The app; its lifespan starts `workers` job workers (and, with any, the batch runner) and stops them
    (jobs queued again) at the end.

    `allowed_models` are the models clients may name besides registry models and their own fine-tuned
    ones; at most `max_models` base models are held in memory for inference, each with a prefix cache of
    `prefix_cache_mb` MiB (0: none). `allow_python_graders`
    accepts reinforcement jobs whose grader runs the client's code here. `dashboard` serves the web
    dashboard (`tuneforge.dashboard`) under /ui. Stored chat completions live in the store's database,
    kept as `retention` says; `log_prompts` puts prompts in the request log.
    """
    observer = Observer(log_prompts=log_prompts)
    observer.registry.register(JobMetrics(store))
    completions = CompletionStore(store.engine, retention)
    service = Service(
        root,
        store,
        FileStorage(root),
        ModelAccess(store, root / "runs", allowed_models),
        InferenceModels(
            max_bases=max_models, observer=observer, completions=completions, prefix_cache_mb=prefix_cache_mb
        ),
        max_upload_bytes,
        max_body_bytes,
        allow_python_graders,
    )
    job_workers = Workers(store, service.storage, root, workers)
    # Batches answer with this server's inference models, so they run on its event loop, beside the workers.
    batch_runner = BatchRunner(service, f"{process_worker_id()}/batches") if workers else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        job_workers.start()
        batches = asyncio.ensure_future(batch_runner.run()) if batch_runner else None
        try:
            yield
        finally:
            if batches is not None:
                batch_runner.stop()  # a batch in progress goes back to be resumed by the next server
                await batches
            await asyncio.to_thread(job_workers.stop)
            await service.inference.close()

    app = FastAPI(
        title="tuneforge",
        summary="OpenAI-compatible fine-tuning jobs and inference",
        lifespan=lifespan,
        **docs_urls(docs),
    )
    app.state.service = service
    app.state.completions = completions
    for router in [*ROUTERS, completion_routes.router]:
        app.include_router(router)

    async def health() -> JSONResponse:
        # Ready while the job store's database answers; a 503 takes the server out of a load balancer when not.
        if await asyncio.to_thread(store.answers):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": "the job store's database does not answer"}, 503)

    app.add_api_route("/health", health, methods=["GET"])
    pages = None
    if dashboard:
        from ..dashboard.routes import install_dashboard
        from ..dashboard.sources import JobRuns

        pages = install_dashboard(app, JobRuns(service), keys_required=bool(api_keys))
    edge(
        app,
        api_keys=api_keys,
        max_body_bytes=max_body_bytes,
        per_path={UPLOAD_PATH: (max_upload_bytes + UPLOAD_ENVELOPE_BYTES, upload_too_large(max_upload_bytes))},
        forms=form_fields(ROUTERS),
        pages=pages,
        observer=observer,
    )
    return app
