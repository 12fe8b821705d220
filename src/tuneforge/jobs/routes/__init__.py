"""The jobs API's routes, one router per resource: files, fine-tuning jobs, evals, models, inference."""

from . import evals, files, inference, jobs, models

ROUTERS = [files.router, jobs.router, evals.router, models.router, inference.router]
