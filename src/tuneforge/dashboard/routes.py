"""The dashboard's pages and the few JSON endpoints its JavaScript calls, over a `RunSource`.

Pages are Jinja2 templates rendered on the server, charts SVG drawn on the server by
`eval/report.py`'s code; `static/dashboard.js` polls a run's live part while it trains, uploads and
checks files, starts jobs and chats through the OpenAI routes of the same server, sending the key
as the Bearer header. Every page is for the caller (`web.caller`), so with API keys a key sees
only its own jobs and models, through the same owner-scoped queries as the API.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from http import HTTPStatus
from importlib.resources import files
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import ChainableUndefined, Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from ..web import Pages, RequestBody, caller
from .runs import (
    HEADLINE_METRICS,
    RunFolder,
    duration,
    evaluation_tables,
    learning_rate_chart,
    loss_chart,
    number,
    reward_chart,
)
from .sources import RunSource

PREFIX = "/ui"
POLL_MS = 2000
MAX_COMPARED = 8

# A field a run's file lacks (a data report without token counts) shows as blank, however deep the template reaches.
_templates = Environment(
    loader=PackageLoader("tuneforge.dashboard"),
    autoescape=select_autoescape(default=True),
    undefined=ChainableUndefined,
)
_templates.filters.update(number=number, duration=duration)


class CheckBody(RequestBody):
    file_id: str
    model: str
    method: Literal["supervised", "dpo"] = "supervised"


@lru_cache(maxsize=64)
def _cached_chart(kind: str, path: str, mtime_ns: int, size: int) -> str:
    """A run's chart, drawn again only when its metrics.jsonl has changed (pages poll while a run trains)."""
    metrics = RunFolder(Path(path)).metrics()
    if kind == "reward":
        return reward_chart(metrics)
    return loss_chart({"run": metrics}) if kind == "loss" else learning_rate_chart(metrics)


def run_chart(folder: RunFolder, kind: str) -> Markup:
    path = folder.path / "metrics.jsonl"
    try:
        stat = path.stat()
    except OSError:
        return Markup("")
    return Markup(_cached_chart(kind, str(folder.path), stat.st_mtime_ns, stat.st_size))


def install_dashboard(app: FastAPI, source: RunSource, *, keys_required: bool) -> Pages:
    """The dashboard's routes under /ui and its static files, and the `Pages` they are: `edge(..., pages=...)`
    lets browsers in, and shows them a request it refuses before any route as the dashboard's error page."""
    # The static files first: the router ends with a page for every other path under /ui.
    app.mount(f"{PREFIX}/static", StaticFiles(directory=str(files("tuneforge.dashboard") / "static")), name="static")
    page = page_renderer(source.kind == "jobs", keys_required)
    app.include_router(dashboard_router(source, page))
    return Pages(
        PREFIX,
        f"{PREFIX}/login",
        [f"{PREFIX}/static/"],
        error_page=lambda status, message: page("error.html", status, title=HTTPStatus(status).phrase, message=message),
    )


def page_renderer(jobs: bool, keys_required: bool) -> Callable[..., HTMLResponse]:
    """The dashboard's pages: a template rendered with what its frame shows (the jobs service's links, the
    log-out button where keys are required)."""

    def page(name: str, status: int = 200, **context) -> HTMLResponse:
        html = _templates.get_template(name).render(
            prefix=PREFIX, jobs=jobs, keys_required=keys_required, poll_ms=POLL_MS, **context
        )
        return HTMLResponse(html, status_code=status)

    return page


def dashboard_router(source: RunSource, page: Callable[..., HTMLResponse]) -> APIRouter:
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    def not_found(what: str) -> HTMLResponse:
        message = f"There is no {what} here, or it is not yours to see."
        return page("error.html", status=404, title="Not found", message=message)

    @router.get("/login")
    def login(next: str = PREFIX + "/"):
        return page("login.html", next=next if next.startswith(PREFIX) else PREFIX + "/")

    @router.get("")
    def root():
        return RedirectResponse(PREFIX + "/")

    @router.get("/")
    async def runs_list(owner: str = Depends(caller)):
        rows = await asyncio.to_thread(source.list_runs, owner)
        return page("runs.html", rows=rows, metric_names=[name for name, _ in HEADLINE_METRICS])

    @router.get("/runs/{run_id:path}")
    async def run_page(run_id: str, owner: str = Depends(caller)):
        run = await asyncio.to_thread(source.run_page, owner, run_id)
        if run is None:
            return not_found(f"run {run_id}")
        tables = await asyncio.to_thread(evaluation_tables, run.folder)
        return page(
            "run.html",
            **live_context(run),
            evaluation=[Markup(table.to_html()) for table in tables],
            has_report=(run.folder.path / "eval" / "report.html").is_file(),
        )

    def live_context(run) -> dict:
        return {
            "run": run,
            "loss_chart": run_chart(run.folder, "loss"),
            "lr_chart": run_chart(run.folder, "lr"),
            "reward_chart": run_chart(run.folder, "reward"),
        }

    @router.get("/live/{run_id:path}")
    async def live(run_id: str, owner: str = Depends(caller)):
        run = await asyncio.to_thread(source.run_page, owner, run_id)
        if run is None:
            return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
        html = await asyncio.to_thread(_templates.get_template("live.html").render, prefix=PREFIX, **live_context(run))
        return {"status": run.row.status, "active": run.row.active, "html": html}

    @router.get("/report/{run_id:path}")
    async def report(run_id: str, owner: str = Depends(caller)):
        folder = await asyncio.to_thread(source.folder, owner, run_id)
        path = folder.path / "eval" / "report.html" if folder else None
        if path is None or not path.is_file():
            return not_found(f"report of {run_id}")
        return FileResponse(path, media_type="text/html")

    @router.get("/compare")
    async def compare(owner: str = Depends(caller), run: list[str] = Query([])):
        rows = {row.id: row for row in await asyncio.to_thread(source.list_runs, owner)}
        chosen = [run_id for run_id in dict.fromkeys(run) if run_id in rows][:MAX_COMPARED]

        def chart() -> str:
            # Jobs may share a suffix: such names get their id too, so that each run keeps its own curve.
            repeated = Counter(rows[i].name for i in chosen)
            labels = [rows[i].name if repeated[rows[i].name] == 1 else f"{rows[i].name} ({i})" for i in chosen]
            return loss_chart({label: source.folder(owner, i).metrics() for label, i in zip(labels, chosen)})

        svg = await asyncio.to_thread(chart) if chosen else ""
        return page(
            "compare.html",
            rows=[rows[i] for i in chosen],
            all_rows=list(rows.values()),
            chart=Markup(svg),
            metric_names=[name for name, _ in HEADLINE_METRICS],
        )

    @router.get("/playground")
    async def playground(owner: str = Depends(caller), left: str = "", right: str = ""):
        models = await asyncio.to_thread(source.chat_models, owner)
        return page("playground.html", models=models, left=left, right=right)

    @router.get("/api/models")
    async def chat_models(owner: str = Depends(caller)):
        return {"data": await asyncio.to_thread(source.chat_models, owner)}

    if source.kind == "jobs":
        add_job_routes(router, source, page)

    @router.get("/{path:path}")
    def unknown_page(path: str):
        return not_found(f"page {PREFIX}/{path}")

    return router


def add_job_routes(router: APIRouter, source, page: Callable[..., HTMLResponse]) -> None:
    """The new-job form and the check of an uploaded file, which only the jobs service has."""

    @router.get("/new")
    async def new_job(owner: str = Depends(caller)):
        models = await asyncio.to_thread(source.training_models, owner)
        return page("new_job.html", models=models)

    @router.post("/api/check")
    async def check(body: CheckBody, owner: str = Depends(caller)):
        return await asyncio.to_thread(source.check_file, owner, body.file_id, body.model, body.method)
