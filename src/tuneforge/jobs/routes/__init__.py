"""The jobs API's routes, one router per resource: files, fine-tuning jobs, evals, batches, models, inference."""

from . import batches, evals, files, inference, jobs, models

ROUTERS = [files.router, jobs.router, evals.router, batches.router, models.router, inference.router]
