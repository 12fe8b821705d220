"""Which models a client may name, and what each name stands for on this server.

A client may fine-tune from, and query, three kinds of model and no other: a registry model (any
case), a model the operator allows (`--allow-model`, named exactly as given there), and its own
fine-tuned models and checkpoints. So no request can make the server read an arbitrary path or
download a hub repo, and the answer to a name it may not use is the same whether or not that name
exists on disk. A checkpoint's step is digits, and its folder must lie inside its job's run folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelSourceError
from ..models import REGISTRY, ModelSource, resolve
from ..web import APIError
from .store import Store

CHECKPOINT_NAME = re.compile(r"(?P<model>ft:.+):ckpt-step-(?P<step>[0-9]{1,12})")
"""A checkpoint's model name: its job's fine-tuned model and the step."""


@dataclass(frozen=True)
class InferenceTarget:
    """A model to answer with, as its name resolved: its base folder (the key of the loaded app) and the adapter
    on it, if any."""

    source: ModelSource

    @property
    def base(self) -> Path:
        return self.source.path.resolve()

    @property
    def adapter(self) -> Path | None:
        return self.source.adapter


def fine_tuned_folder(store: Store, runs: Path, owner: str, name: str) -> Path | None:
    """The folder of `owner`'s fine-tuned model or checkpoint called `name`; None for any other name."""
    checkpoint = CHECKPOINT_NAME.fullmatch(name)
    job = store.job_with_model(owner, checkpoint["model"] if checkpoint else name)
    if job is None or (checkpoint is None and job.status != "succeeded"):
        return None
    run = (runs / job.id).resolve()
    folder = run / "checkpoints" / f"step-{int(checkpoint['step'])}" if checkpoint else run / "final"
    folder = folder.resolve()  # a symlink inside the run may point anywhere
    return folder if folder.is_relative_to(run) and folder.is_dir() else None


def training_spec(store: Store, runs: Path, owner: str, model: str) -> str:
    """What a job's config names as its base model: the folder of a fine-tuned source, else the model's name."""
    folder = fine_tuned_folder(store, runs, owner, model)
    return str(folder) if folder else model


def client_names(source: ModelSource, name: str) -> dict[str, str]:
    """The server's folders of a job's model (its adapter's, where it has one, and its base's), each as `name`, the
    model as the client named it: what a message about the model (its tokenizer's name is its folder) shows them."""
    return {str(folder): name for folder in (source.adapter, source.path) if folder is not None}


class ModelAccess:
    def __init__(self, store: Store, runs: Path, allowed: Sequence[str] = ()):
        self.store, self.runs, self.allowed = store, runs, tuple(allowed)

    def for_training(self, owner: str, name: str) -> tuple[str, str]:
        """(the model's name as the job keeps it, the base's short name that fine-tuned names start with)."""
        if name.lower() in REGISTRY:
            return name.lower(), name.lower()
        if name in self.allowed:
            return name, self._short_name(name)
        if fine_tuned_folder(self.store, self.runs, owner, name):
            return name, name.split(":")[1]
        raise APIError(
            400,
            f"The model `{name}` is not available for fine-tuning here. Name a registry model "
            f"({', '.join(REGISTRY)}), a model this server allows (GET /v1/models lists those "
            "you have used), or one of your fine-tuned models or checkpoints.",
            param="model",
            code="model_not_available",
        )

    def for_inference(self, owner: str, name: str, param: str = "model") -> InferenceTarget:
        """The model `name` that `owner` may answer with; one they may not is a 404 naming `param`, where the
        request names the model."""
        spec = name.lower() if name.lower() in REGISTRY else name if name in self.allowed else None
        if spec is None:
            folder = fine_tuned_folder(self.store, self.runs, owner, name)
            spec = str(folder) if folder else None
        if spec is None:
            raise no_such_model(name, param)
        try:
            source = resolve(spec, pull_missing=False)
        except ModelSourceError as err:
            raise APIError(
                404,
                f"The model `{name}` is not ready here: ask the server's operator to fetch it.",
                param=param,
                code="model_not_found",
            ) from err
        return InferenceTarget(source)

    def _short_name(self, spec: str) -> str:
        try:
            return resolve(spec, pull_missing=False).name
        except ModelSourceError:
            return spec.rstrip("/").rsplit("/", 1)[-1]


def no_such_model(name: str, param: str = "model") -> APIError:
    return APIError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        param=param,
        code="model_not_found",
    )
