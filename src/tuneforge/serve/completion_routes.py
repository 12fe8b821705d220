"""Stored chat completions over HTTP, as OpenAI's API has them: list, retrieve, update, list messages, delete.

`GET /v1/chat/completions` (filters `model`, `metadata[KEY]=VALUE`; paging `after`, `limit`,
`order`), `GET /v1/chat/completions/{id}`, `POST /v1/chat/completions/{id}` (`{"metadata": ...}`
replaces the metadata whole; null clears it), `GET /v1/chat/completions/{id}/messages` and
`DELETE /v1/chat/completions/{id}`, each on the caller's own completions: another key's id is a
404 exactly as a missing one is. Both servers include `router`; the store is the app's
`state.completions`, and where that is None every route is a 404 saying that none are stored.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from ..database import UnknownCursor
from ..web import APIError, Metadata, RequestBody, caller, list_body, metadata_filter
from .completion_store import CompletionStore, StoredCompletion

router = APIRouter(prefix="/v1/chat/completions", dependencies=[Depends(caller)])
Order = Literal["asc", "desc"]


class UpdateCompletionBody(RequestBody):
    metadata: Metadata | None  # required, as OpenAI's; null clears it


def completion_store(request: Request) -> CompletionStore:
    """The app's store; an app made without one answers every route here with a 404 saying so (as OpenAI answers a
    path or a stored completion it does not have: the SDK's NotFoundError), since no change to the request helps."""
    store = request.app.state.completions
    if store is None:
        raise APIError(
            404,
            "This server stores no chat completions, so there are none to list, retrieve, update or delete (and "
            "store: true is refused): it was made without a completion store. `tuneforge serve` keeps them (in its "
            "--store database); an app of `create_app` keeps them given completions=CompletionStore.open(PATH).",
            code="not_found",
        )
    return store


def own_completion(store: CompletionStore, owner: str, completion_id: str) -> StoredCompletion:
    row = store.get(owner, completion_id)
    if row is None:
        raise not_found(completion_id)
    return row


def not_found(completion_id: str) -> APIError:
    return APIError(
        404, f"No stored chat completion found with id '{completion_id}'.", param="completion_id", code="not_found"
    )


@router.get("")
def list_completions(
    request: Request,
    model: str | None = None,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Order = "asc",
    owner: str = Depends(caller),
    store: CompletionStore = Depends(completion_store),
):
    page = store.list_completions(
        owner, model=model, metadata=metadata_filter(request), after=after, limit=limit, newest_first=order == "desc"
    )
    return list_body(page, page.has_more)


@router.get("/{completion_id}")
def get_completion(
    completion_id: str, owner: str = Depends(caller), store: CompletionStore = Depends(completion_store)
):
    return own_completion(store, owner, completion_id).to_api()


@router.post("/{completion_id}")
def update_completion(
    completion_id: str,
    body: UpdateCompletionBody,
    owner: str = Depends(caller),
    store: CompletionStore = Depends(completion_store),
):
    row = store.update_metadata(owner, completion_id, body.metadata)
    if row is None:
        raise not_found(completion_id)
    return row.to_api()


@router.get("/{completion_id}/messages")
def list_messages(
    completion_id: str,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Order = "asc",
    owner: str = Depends(caller),
    store: CompletionStore = Depends(completion_store),
):
    messages = own_completion(store, owner, completion_id).messages_to_api()
    if order == "desc":
        messages.reverse()
    ids = [message["id"] for message in messages]
    if after is not None and after not in ids:  # as every listing: no cursor of another list restarts this one
        raise UnknownCursor(after)
    start = ids.index(after) + 1 if after is not None else 0
    return list_body(messages[start : start + limit], has_more=start + limit < len(messages))


@router.delete("/{completion_id}")
def delete_completion(
    completion_id: str, owner: str = Depends(caller), store: CompletionStore = Depends(completion_store)
):
    if not store.delete_completion(owner, completion_id):
        raise not_found(completion_id)
    return {"object": "chat.completion.deleted", "id": completion_id, "deleted": True}
