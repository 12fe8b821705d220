"""`/v1/evals`: create, list, get, update and delete the caller's evals; create, list, get, cancel and delete their
runs, and list and get a run's output items (`jobs/evals.py` has the bodies and the checks)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query

from ...errors import ModelSourceError
from ...web import APIError, caller, list_body
from ..evals import (
    CreateEvalBody,
    CreateRunBody,
    UpdateEvalBody,
    check_item_schema,
    check_items,
    check_items_match,
    check_nesting,
    check_tools,
    check_tools_read,
    data_source_config,
    eval_body,
    file_items,
    input_templates,
    items_param,
    run_body,
    testing_criteria,
)
from ..service import Service, service_of
from ..store import RUN_ACTIVE, Eval, EvalRun, new_id, now
from .files import no_such_file, own_file

router = APIRouter(prefix="/v1/evals", dependencies=[Depends(caller)])


def own_eval(service: Service, owner: str, eval_id: str) -> Eval:
    row = service.store.get_eval(owner, eval_id)
    if row is None:
        raise APIError(404, f"No eval found with id {eval_id}", param="eval_id", code="eval_not_found")
    return row


def own_run(service: Service, owner: str, eval_id: str, run_id: str) -> EvalRun:
    row = service.store.get_run(own_eval(service, owner, eval_id).id, run_id, owner)
    if row is None:
        raise APIError(404, f"No run found with id {run_id} in eval {eval_id}", param="run_id", code="run_not_found")
    return row


@router.post("")
def create_eval(body: CreateEvalBody, owner: str = Depends(caller), service: Service = Depends(service_of)):
    testing_criteria(body.testing_criteria, allow_python=service.allow_python_graders)
    check_item_schema(body.data_source_config.item_schema)
    row = Eval(
        id=new_id("eval_"),
        owner=owner,
        name=body.name or "",
        metadata_=body.metadata,
        data_source_config=data_source_config(body.data_source_config),
        testing_criteria=body.testing_criteria,
        created_at=now(),
    )
    service.store.add(row)
    return eval_body(row)


@router.get("")
def list_evals(
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "asc",
    owner: str = Depends(caller),
    service: Service = Depends(service_of),
):
    page = service.store.list_evals(owner, after=after, limit=limit, newest_first=order == "desc")
    return list_body([eval_body(row) for row in page], page.has_more)


@router.get("/{eval_id}")
def get_eval(eval_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    return eval_body(own_eval(service, owner, eval_id))


@router.post("/{eval_id}")
def update_eval(
    eval_id: str, body: UpdateEvalBody, owner: str = Depends(caller), service: Service = Depends(service_of)
):
    """Rename the eval or replace its metadata (what is not given stays)."""
    own_eval(service, owner, eval_id)
    values = {"name": body.name, "metadata_": body.metadata}
    service.store.update_eval(owner, eval_id, **{key: value for key, value in values.items() if value is not None})
    return eval_body(own_eval(service, owner, eval_id))


@router.delete("/{eval_id}")
def delete_eval(eval_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    if not service.store.delete_eval(owner, eval_id):
        own_eval(service, owner, eval_id)  # the 404
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


@router.post("/{eval_id}/runs")
def create_run(eval_id: str, body: CreateRunBody, owner: str = Depends(caller), service: Service = Depends(service_of)):
    evaluation = own_eval(service, owner, eval_id)
    source = body.data_source
    if source.sampling_params is not None:
        source.sampling_params.check_supported()
    templates = input_templates(source.input_messages.template)
    graders = testing_criteria(evaluation.testing_criteria, allow_python=service.allow_python_graders)
    if source.source.type == "file_id":
        row = own_file(service, owner, source.source.id, "data_source.source.id", "evals")
        try:
            items = file_items(service.storage.path(row), row.id)
        except FileNotFoundError:  # deleted after its row was read
            raise no_such_file(row.id, "data_source.source.id") from None
    else:
        items = [row.item for row in source.source.content]
    item_param = items_param(source.source.model_dump(include={"type", "id"}))
    sampling_tools = source.sampling_params.tools if source.sampling_params else None
    check_nesting(items, item_param, sampling_tools)
    check_items_match(evaluation.data_source_config["schema"]["properties"]["item"], items, item_param)
    check_items(graders, templates, items, item_param)
    check_tools(sampling_tools, items, item_param)
    # A model the caller may not use is refused now.
    target = service.access.for_inference(owner, source.model, param="data_source.model")
    model_source = str(target.adapter or target.base)

    def tokenizer():
        try:
            return service.tokenizers.get(target.source)
        except ModelSourceError as err:  # a folder the operator allowed that holds no usable tokenizer
            raise APIError(
                400,
                f"`{source.model}`'s tokenizer, whose chat template renders the items' tools, cannot be loaded: "
                f"{err.message}",
                param="data_source.model",
                code=err.code,
            ) from None

    check_tools_read(tokenizer, source.model, sampling_tools, items, item_param)
    run = EvalRun(
        id=new_id("evalrun_"),
        owner=owner,
        eval_id=evaluation.id,
        name=body.name or f"{source.model} run",
        model=source.model,
        model_source=model_source,
        metadata_=body.metadata,
        data_source=source.model_dump(mode="json", exclude_none=True),
        status="queued",
        created_at=now(),
    )
    service.store.add(run)
    return run_body(run)


@router.get("/{eval_id}/runs")
def list_runs(
    eval_id: str,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "asc",
    status: Literal["queued", "in_progress", "completed", "canceled", "failed"] | None = None,
    owner: str = Depends(caller),
    service: Service = Depends(service_of),
):
    evaluation = own_eval(service, owner, eval_id)
    page = service.store.list_runs(evaluation.id, status=status, after=after, limit=limit, newest_first=order == "desc")
    return list_body([run_body(run) for run in page], page.has_more)


@router.get("/{eval_id}/runs/{run_id}")
def get_run(eval_id: str, run_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    return run_body(own_run(service, owner, eval_id, run_id))


@router.delete("/{eval_id}/runs/{run_id}")
def delete_run(eval_id: str, run_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    run = own_run(service, owner, eval_id, run_id)
    service.store.delete_run(run.id)  # a run in progress stops after the batch its model is answering
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run.id}


# OpenAI's reference posts to the run itself; its SDK posts to .../cancel.
@router.post("/{eval_id}/runs/{run_id}/cancel")
@router.post("/{eval_id}/runs/{run_id}")
def cancel_run(eval_id: str, run_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)):
    run = own_run(service, owner, eval_id, run_id)
    # A run in progress sees the new status after the batch its model is answering, and stops.
    if not service.store.move_run(run.id, RUN_ACTIVE, status="canceled"):
        raise APIError(
            400,
            f"Run {run_id} has already finished ({run.status}); only a queued or running run can be canceled.",
            param="run_id",
            code="invalid_state",
        )
    return run_body(own_run(service, owner, eval_id, run_id))


@router.get("/{eval_id}/runs/{run_id}/output_items")
def list_output_items(
    eval_id: str,
    run_id: str,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "asc",
    status: Literal["pass", "fail", "error"] | None = None,
    owner: str = Depends(caller),
    service: Service = Depends(service_of),
):
    run = own_run(service, owner, eval_id, run_id)
    page = service.store.list_output_items(
        run.id, status=status, after=after, limit=limit, newest_first=order == "desc"
    )
    return list_body(page, page.has_more)


@router.get("/{eval_id}/runs/{run_id}/output_items/{item_id}")
def get_output_item(
    eval_id: str, run_id: str, item_id: str, owner: str = Depends(caller), service: Service = Depends(service_of)
):
    row = service.store.get_output_item(own_run(service, owner, eval_id, run_id).id, item_id)
    if row is None:
        raise APIError(404, f"No output item found with id {item_id}", param="output_item_id", code="not_found")
    return row.to_api()
