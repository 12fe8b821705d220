"""The app of `tuneforge ui [DIR]` (`command.py` starts it): the dashboard over the run folders under DIR,
for people who train from the CLI.

The same pages as under `tuneforge api`, without keys (it listens on this machine unless told
otherwise) and without the new-job form. Its playground chats with the runs' final models,
checkpoints and base models through `tuneforge.serve`, loaded on first use as the jobs service does.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from ..jobs.inference import InferenceModels
from ..jobs.routes.inference import answer
from ..serve import ChatCompletionBody
from ..web import edge
from .routes import PREFIX, install_dashboard
from .sources import FolderRuns

MAX_BODY_BYTES = 4 << 20


def create_ui_app(root: Path, *, max_models: int = 1) -> FastAPI:
    runs = FolderRuns(root)
    models = InferenceModels(max_bases=max_models)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await models.close()

    app = FastAPI(title="tuneforge ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    pages = install_dashboard(app, runs, keys_required=False)

    @app.get("/", include_in_schema=False)
    def root_page():
        return RedirectResponse(PREFIX + "/")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody):
        target = await asyncio.to_thread(runs.chat_target, body.model)
        return await answer(models, target, body)

    edge(app, api_keys=[], max_body_bytes=MAX_BODY_BYTES, pages=pages)
    return app
