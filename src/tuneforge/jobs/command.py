"""`tuneforge api`: the store, the job workers and the HTTP server (jobs and inference) in one process."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from pathlib import Path

from ..console import new_console, plain
from ..database import database_url, existing_store, opening, shown_url
from ..fsio import tuneforge_home


def default_store_file() -> Path:
    """The SQLite file of the job store of a `tuneforge api` given no --db."""
    return tuneforge_home() / "jobs" / "jobs.db"


def open_store(db: str | None, option: str = "--db"):
    """The job store at `db`, a file path or a database URL (default: `default_store_file`), and the folder of
    files and runs; `option` is the command's option that gave `db`, which its errors name."""
    from .store import Store

    root = tuneforge_home() / "jobs"
    root.mkdir(parents=True, exist_ok=True)
    url = database_url(db) if db else f"sqlite:///{default_store_file()}"
    with opening(url, option):
        return Store(url), root


def api_command(
    *,
    host: str,
    port: int,
    db: str | None,
    workers: int,
    api_keys: Sequence[str],
    max_upload_mb: int,
    max_body_mb: int,
    allowed_models: Sequence[str],
    max_models: int,
    docs: bool,
    allow_python_graders: bool = False,
    store_max_age_days: float | None = None,
    store_max_count: int | None = None,
    log_prompts: bool = False,
    prefix_cache_mb: int,
) -> int:
    from ..web.listen import bind, listen
    from . import runner

    sock = bind(host, port)
    store, root = open_store(db)  # first: a --db that does not open is refused before the training processes start
    runner.start_process_server()  # early: it imports torch and the training code while this process does the rest
    from ..serve import Retention
    from ..serve.command import prefix_cache_note, served_limits
    from ..web.observe import log_requests_to_stderr
    from .api import create_api

    app = create_api(
        root,
        store,
        api_keys=api_keys,
        workers=workers,
        max_upload_bytes=max_upload_mb << 20,
        max_body_bytes=max_body_mb << 20,
        allowed_models=allowed_models,
        max_models=max_models,
        docs=docs,
        allow_python_graders=allow_python_graders,
        retention=Retention(store_max_age_days, store_max_count),
        log_prompts=log_prompts,
        prefix_cache_mb=prefix_cache_mb,
    )
    log_requests_to_stderr()
    inference = app.state.service.inference
    limits = served_limits(
        inference.max_batch,
        inference.max_waiting,
        inference.default_max_tokens,
        max_body_mb,
        "within each model's context window",
    )
    prefix_cache = prefix_cache_note(prefix_cache_mb) + (" per base model" if prefix_cache_mb else "")
    listen(
        app,
        sock,
        lambda url: f"tuneforge api at {url}/v1 with {workers} job worker(s); store {plain(shown_url(store.url))}; "
        f"files and runs under {plain(root)}"
        + (" (API key required)" if api_keys else "")
        + f"; inference on up to {max_models} base model(s) at once, each with its own {limits}; {prefix_cache}; "
        f"files uploaded up to {max_upload_mb} MiB",
    )
    return 0


def worker_command(*, db: str, workers: int) -> int:
    """Job workers without an HTTP server: they claim queued jobs from a shared store until SIGINT or
    SIGTERM, then checkpoint a running job and queue it again for another worker."""
    from .files import FileStorage
    from .worker import Workers

    existing_store(
        db,
        "A worker takes its jobs from the store a `tuneforge api` keeps: give that server's --db (its database URL, "
        f"or its SQLite file on storage the machines share; without --db, {default_store_file()}).",
    )
    store, root = open_store(db, "--store")
    job_workers = Workers(store, FileStorage(root), root, workers)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    job_workers.start()
    new_console(stderr=True).print(
        plain(
            f"tuneforge worker: {workers} job worker(s) on store {shown_url(store.url)}; files and runs under {root}"
        ),
        highlight=False,
    )
    stop.wait()
    job_workers.stop()
    return 0
