"""The jobs API's routes, one router per resource: files, fine-tuning jobs, models, inference."""

from . import files, inference, jobs, models

ROUTERS = [files.router, jobs.router, models.router, inference.router]
