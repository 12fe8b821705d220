"""`/v1/chat/completions`, `/v1/completions` and `/v1/responses` for the models a caller may use, answered by
`tuneforge.serve`.

The body is checked here with serve's own models, then handed to the serve app that holds the
model's base, which serves the model under the name the body gives.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from ...serve import ChatCompletionBody, CompletionBody, ResponsesBody
from ...web import caller
from ..access import InferenceTarget
from ..inference import ForwardedResponse, InferenceModels
from ..service import Service, service_of

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


async def forward(
    service: Service, owner: str, body: ChatCompletionBody | CompletionBody | ResponsesBody
) -> ForwardedResponse:
    target = await asyncio.to_thread(service.access.for_inference, owner, body.model)
    return await answer(service.inference, target, body)


async def answer(
    models: InferenceModels, target: InferenceTarget, body: ChatCompletionBody | CompletionBody | ResponsesBody
) -> ForwardedResponse:
    """`body` answered by the serve app of `target`'s base, which calls the model what the body does."""
    body.check_supported()  # what the serve app refuses (n, tools, ...) is refused before a model loads for it
    served = await models.acquire(target, body.model)
    return ForwardedResponse(models, served, body.model_dump(exclude_unset=True))


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionBody, owner: str = Depends(caller), service: Service = Depends(service_of)
):
    return await forward(service, owner, body)


@router.post("/completions")
async def completions(body: CompletionBody, owner: str = Depends(caller), service: Service = Depends(service_of)):
    return await forward(service, owner, body)


@router.post("/responses")
async def responses(body: ResponsesBody, owner: str = Depends(caller), service: Service = Depends(service_of)):
    return await forward(service, owner, body)
