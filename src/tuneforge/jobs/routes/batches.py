"""`/v1/batches`: create, list, get and cancel the caller's batches (`jobs/batches.py` has the bodies and the
runner)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from ...web import APIError, caller, list_body
from ..batches import CreateBatchBody, batch_body
from ..service import Service, service_of
from ..store import Batch, new_id, now
from .files import own_file

router = APIRouter(prefix="/v1/batches", dependencies=[Depends(caller)])


def own_batch(service: Service, owner: str, batch_id: str) -> Batch:
    row = service.store.get_batch(batch_id, owner)
    if row is None:
        raise APIError(404, f"No batch found with id {batch_id}", param="batch_id", code="batch_not_found")
    return row


@router.post("")
def create_batch(body: CreateBatchBody, owner: str = Depends(caller), service: Service = Depends(service_of)):
    body.check()
    source = own_file(service, owner, body.input_file_id, "input_file_id", "batch")
    row = Batch(
        id=new_id("batch_"),
        owner=owner,
        endpoint=body.endpoint,
        input_file_id=source.id,
        completion_window=body.completion_window,
        metadata_=body.metadata,
        status="validating",
        created_at=now(),
    )
    service.store.add(row)
    return batch_body(row)


@router.get("")
def list_batches(
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    owner: str = Depends(caller),
    service: Service = Depends(service_of),
):
    page = service.store.list_batches(owner, after=after, limit=limit)
    return list_body([batch_body(row) for row in page], page.has_more)


@router.get("/{batch_id}")
def get_batch(batch_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    return batch_body(own_batch(service, owner, batch_id))


@router.post("/{batch_id}/cancel")
def cancel_batch(batch_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    row = own_batch(service, owner, batch_id)
    # The batch's runner (or, for one nobody holds yet, the next to claim it) ends it with its answered lines.
    moved = service.store.move_batch(row.id, ["validating", "in_progress"], status="cancelling", cancelling_at=now())
    row = own_batch(service, owner, batch_id)
    if not moved and row.status not in ("cancelling", "cancelled"):
        raise APIError(
            409,
            f"Batch {batch_id} is {row.status}; only a batch that is validating or in progress can be cancelled.",
            param="batch_id",
            code="invalid_state",
        )
    return batch_body(row)
