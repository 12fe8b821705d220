"""The OpenAI Fine-Tuning API, self-hosted: files, jobs, events, checkpoints, and the models they make.

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store
    app = create_api(root, Store("sqlite:////path/jobs.db"), api_keys=["secret"], workers=2)
    # uvicorn.run(app) -- or `tuneforge api`

`store.py` (SQLAlchemy: SQLite by default, PostgreSQL by URL; guarded status changes and atomic
claims), `files.py` (uploads under the storage folder, named by id), `mapping.py` (OpenAI's method
and hyperparameters -> a tuneforge `Config`), `worker.py` (worker threads: validate files, train in
a child process, events and checkpoints, recovery after a crash), `runner.py` (the child process),
`access.py` (which models a key may name), `inference.py` (serve apps per base model for
inference), `metrics.py` (jobs by status and tokens trained, for /metrics), `routes/` (one router
per resource) over `service.py`, `api.py` (`create_api`),
`command.py` (`tuneforge api`). Importing the package is cheap (no torch): `tuneforge api` starts
the training process server before the heavy imports.
"""
