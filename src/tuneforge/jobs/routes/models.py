"""`/v1/models`: the models a caller can name: the registry's, the models its jobs started from, its
fine-tuned models, and (by name) its checkpoints and the models the operator allows."""

from __future__ import annotations

import os
import shutil

from fastapi import APIRouter, Depends

from ...models import REGISTRY
from ...web import APIError, caller
from ..access import CHECKPOINT_NAME, fine_tuned_folder, no_such_model
from ..service import ORGANIZATION, Service, service_of
from ..store import ACTIVE

router = APIRouter(prefix="/v1/models", dependencies=[Depends(caller)])


def model_card(name: str, created: int = 0) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": ORGANIZATION}


def model_cards(service: Service, owner: str) -> dict[str, dict]:
    """The listed models. Models the operator allows are listed once the caller has used one (their
    names may be server paths, which only the clients told them should see)."""
    cards = {name: model_card(name) for name in REGISTRY}
    for job in service.store.jobs_of(owner):
        cards.setdefault(job.model, model_card(job.model))
        if job.status == "succeeded" and (service.runs / job.id / "final").is_dir():  # not deleted
            cards[job.fine_tuned_model] = model_card(job.fine_tuned_model, job.finished_at)
    return cards


@router.get("")
def list_models(owner: str = Depends(caller), service: Service = Depends(service_of)):
    return {"object": "list", "data": list(model_cards(service, owner).values())}


@router.get("/{name:path}")
def get_model(name: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    """Any name the caller may fine-tune from or query: a listed model, a registry name in any case, an
    allowed model, or one of its checkpoints."""
    cards = model_cards(service, owner)
    if name in cards:
        return cards[name]
    if name.lower() in REGISTRY:
        return cards[name.lower()]
    if name in service.access.allowed or fine_tuned_folder(service.store, service.access.runs, owner, name):
        return model_card(name)
    raise no_such_model(name)


@router.delete("/{name:path}")
def delete_model(name: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    """Delete one of the caller's fine-tuned models: its final weights go; the job and its checkpoints stay."""
    job = service.store.job_with_model(owner, name)
    folder = fine_tuned_folder(service.store, service.access.runs, owner, name)
    if job is None or folder is None:
        if folder and (checkpoint := CHECKPOINT_NAME.fullmatch(name)):
            model = checkpoint["model"]
            deletable = (
                f": `{model}` (its checkpoints stay)"
                if fine_tuned_folder(service.store, service.access.runs, owner, model)
                else f", and `{model}` has no weights to delete (its job has not succeeded, or they were deleted)"
            )
            raise APIError(
                403,
                f"The model `{name}` is a checkpoint of your fine-tuned model `{model}`; a job's checkpoints stay as "
                f"long as the job and are not deleted one by one. Only a fine-tuned model can be deleted{deletable}.",
                param="model",
                code="model_not_deletable",
                type="permission_error",
            )
        if folder or name in model_cards(service, owner) or name.lower() in REGISTRY or name in service.access.allowed:
            raise APIError(
                403,
                f"The model `{name}` is not one of your fine-tuned models; only those can be deleted.",
                param="model",
                code="model_not_deletable",
                type="permission_error",
            )
        raise no_such_model(name)
    if user := next((j for j in service.store.jobs_of(owner) if j.model == name and j.status in ACTIVE), None):
        raise APIError(
            400,
            f"The model `{name}` is the base of fine-tuning job {user.id} ({user.status}); cancel the job or wait "
            "until it finishes.",
            param="model",
            code="model_in_use",
        )
    # Renamed away first, so that a deletion cut short never leaves a half-deleted model listed.
    gone = folder.with_name(f".deleted-{folder.name}-{os.getpid()}")
    os.replace(folder, gone)
    shutil.rmtree(gone)
    return {"id": name, "object": "model", "deleted": True}
