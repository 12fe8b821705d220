"""A job's files are checked for the kind of data its method trains on while it validates, not when it trains.

A dpo job on chat rows (or a supervised one on preference pairs) must fail in `validating_files`, with
`error.param` the file's id as for any other bad file; the dashboard's check of a file for a new job
says the same before the job is created.
"""

from __future__ import annotations

import json

import httpx
import pytest
from test_jobs import KEY, ApiServer, all_events, chat_rows, upload, wait_for

pytest.importorskip("openai")

PAIRS = "".join(
    json.dumps({"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}) + "\n"
    for i in range(8)
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    api = ApiServer(tmp_path_factory.mktemp("jobs-home"), allowed=[tiny_model_dir]).start()
    yield api
    api.stop()


@pytest.mark.parametrize(
    ("method", "rows", "code"),
    [("dpo", chat_rows(8), "not_preference_data"), ("supervised", PAIRS, "preference_data")],
)
def test_a_file_of_the_wrong_kind_fails_while_validating_naming_the_file(server, tiny_model_dir, method, rows, code):
    client = server.client()
    train = upload(client, rows)
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=train.id, method={"type": method, method: {}}
    )
    job = wait_for(client, job.id, {"failed", "succeeded", "running"}, server=server)
    assert job.status == "failed", job.status
    assert job.error.code == code and job.error.param == train.id, job.error
    assert train.id in job.error.message and str(server.home) not in job.error.message
    messages = [event.message for event in all_events(client, job.id)]
    assert not any(message.startswith(("Files validated", "Fine-tuning job started")) for message in messages)


def test_the_dashboards_check_refuses_chat_rows_for_dpo(server, tiny_model_dir):
    client = server.client()
    train = upload(client, chat_rows(8))
    answer = httpx.post(
        server.base_url.removesuffix("/v1") + "/ui/api/check",
        json={"file_id": train.id, "model": str(tiny_model_dir), "method": "dpo"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "not_preference_data" and error["param"] == "file_id"
    assert train.id in error["message"] and str(server.home) not in error["message"]
