"""`/v1/models`: the base models of the caller's jobs and its fine-tuned models."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ...web import caller
from ..access import no_such_model
from ..service import ORGANIZATION, Service, service_of

router = APIRouter(prefix="/v1/models", dependencies=[Depends(caller)])


def model_cards(service: Service, owner: str) -> dict[str, dict]:
    cards = {}
    for job in service.store.jobs_of(owner):
        cards.setdefault(job.model, {"id": job.model, "object": "model", "created": 0, "owned_by": ORGANIZATION})
        if job.status == "succeeded":
            cards[job.fine_tuned_model] = {
                "id": job.fine_tuned_model,
                "object": "model",
                "created": job.finished_at,
                "owned_by": ORGANIZATION,
            }
    return cards


@router.get("")
def list_models(owner: str = Depends(caller), service: Service = Depends(service_of)):
    return {"object": "list", "data": list(model_cards(service, owner).values())}


@router.get("/{name:path}")
def get_model(name: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    card = model_cards(service, owner).get(name)
    if card is None:
        raise no_such_model(name)
    return card
