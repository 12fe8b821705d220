"""`/v1/models`: the models a caller can name: the registry's, the models its jobs started from, its
fine-tuned models, and (by name) its checkpoints and the models the operator allows."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ...models import REGISTRY
from ...web import caller
from ..access import fine_tuned_folder, no_such_model
from ..service import ORGANIZATION, Service, service_of

router = APIRouter(prefix="/v1/models", dependencies=[Depends(caller)])


def model_card(name: str, created: int = 0) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": ORGANIZATION}


def model_cards(service: Service, owner: str) -> dict[str, dict]:
    """The listed models. Models the operator allows are listed once the caller has used one (their
    names may be server paths, which only the clients told them should see)."""
    cards = {name: model_card(name) for name in REGISTRY}
    for job in service.store.jobs_of(owner):
        cards.setdefault(job.model, model_card(job.model))
        if job.status == "succeeded":
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
