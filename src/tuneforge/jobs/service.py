"""What the routes of the jobs API share: the store, the file storage, model access, inference and the
tokenizers runs.create reads chat templates from and jobs.create renders a job's chat template with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from .access import ModelAccess
from .evals import TemplateTokenizers
from .files import FileStorage
from .inference import InferenceModels
from .store import Store

ORGANIZATION = "tuneforge"


@dataclass(frozen=True)
class Service:
    root: Path
    store: Store
    storage: FileStorage
    access: ModelAccess
    inference: InferenceModels
    max_upload_bytes: int
    max_body_bytes: int
    allow_python_graders: bool = False
    tokenizers: TemplateTokenizers = field(default_factory=TemplateTokenizers)

    @property
    def runs(self) -> Path:
        return self.root / "runs"


def service_of(request: Request) -> Service:
    """The app's `Service` (a dependency for routes)."""
    return request.app.state.service
