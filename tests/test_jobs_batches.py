"""OpenAI's Batch API on `tuneforge api`, through the official OpenAI SDK: a file of requests answered by a tiny
model in the background, a request the live route refuses as an error line, cancel, a bad input file, and a
restart mid-batch."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest
from test_jobs_evals import restarted

openai = pytest.importorskip("openai")

BATCH_TIMEOUT_S = 120


def request(custom_id: str, model: str, *, url: str = "/v1/chat/completions", **body) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Say {custom_id}."}], "max_tokens": 4, **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def upload_requests(client, lines: list) -> str:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return client.files.create(file=("requests.jsonl", text.encode()), purpose="batch").id


def wait_batch(client, batch_id: str, statuses=("completed", "failed", "cancelled")):
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} is {batch.status}, not one of {statuses}")


def lines_of(client, file_id: str | None) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()] if file_id else []


def test_a_mixed_batch_answers_each_request_as_the_live_route_does(tmp_path, base_dir):
    model = str(base_dir)  # the sharp tiny model: "Say a." and "Say b." get different answers
    with restarted(tmp_path / "home", workers=1, allowed_models=[model]) as client:
        lines = [
            request("a", model, temperature=0),
            request("too-hot", model, temperature=7),  # the route answers 400 naming temperature
            request("b", model, temperature=0),
        ]
        input_file = upload_requests(client, lines)
        batch = client.batches.create(
            input_file_id=input_file,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"run": "nightly"},
        )
        assert batch.status == "validating" and batch.metadata == {"run": "nightly"}
        batch = wait_batch(client, batch.id)
        assert batch.status == "completed", batch.errors
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (3, 2, 1)
        assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.model == model

        output, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
        assert [line["custom_id"] for line in output] == ["a", "b"]
        answer = output[0]["response"]
        assert answer["status_code"] == 200 and answer["body"]["object"] == "chat.completion"
        assert answer["body"]["model"] == model and output[0]["error"] is None
        # The same requests, live: a batch answers each with the same engine and sampling.
        live = [client.chat.completions.create(**lines[i]["body"]).choices[0].message.content for i in (0, 2)]
        assert [line["response"]["body"]["choices"][0]["message"]["content"] for line in output] == live
        assert live[0] != live[1]
        [refused] = errors
        assert refused["custom_id"] == "too-hot" and refused["response"]["status_code"] == 400
        assert refused["response"]["body"]["error"]["param"] == "temperature"
        with pytest.raises(openai.BadRequestError) as live_refusal:
            client.chat.completions.create(**lines[1]["body"])
        said = refused["response"]["body"]["error"]["message"]
        assert said == live_refusal.value.response.json()["error"]["message"]  # both of temperature's bounds
        answered = [line["response"]["body"]["usage"] for line in output]
        assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in answered) > 0
        assert batch.usage.total_tokens == sum(u["total_tokens"] for u in answered)

        files = {f.id: f for f in client.files.list(purpose="batch_output")}
        assert set(files) == {batch.output_file_id, batch.error_file_id}
        assert [b.id for b in client.batches.list()] == [batch.id]


def test_a_bad_input_file_fails_the_batch_naming_each_line(tmp_path, tiny_model_dir):
    model = str(tiny_model_dir)
    with restarted(tmp_path / "home", workers=1, allowed_models=[model]) as client:
        lines = [
            request("a", model),
            "{not json",
            {"method": "POST", "url": "/v1/chat/completions", "body": {"model": model}},
            request("a", model),
            request("c", model, url="/v1/completions"),
            request("d", "no-such-model"),
            "[" * 100_000 + "]" * 100_000,  # JSON that Python's reader gives up on: nested too deeply
            "9" * 5000,  # an integer of more digits than it converts
            json.dumps(request("\ud800", model)),  # half of a UTF-16 surrogate pair alone, which no output file holds
            json.dumps(request("e", "no-such-\ud800")),  # echoed by the error, which the batch's JSON holds
            request("f", "no-such-\0"),  # no model's name holds a NUL, and PostgreSQL cannot look one up
        ]
        batch = client.batches.create(
            input_file_id=upload_requests(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = wait_batch(client, batch.id)
        assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
        found = [(e.line, e.code, e.param) for e in batch.errors.data]
        assert found == [
            (2, "invalid_json_line", None),
            (3, "missing_required_parameter", "custom_id"),
            (4, "duplicate_custom_id", "custom_id"),
            (5, "invalid_url", "url"),
            (6, "model_not_found", "body.model"),
            (7, "invalid_json_line", None),
            (8, "invalid_json_line", None),
            (9, "invalid_value", "custom_id"),
            (10, "invalid_value", "body.model"),
            (11, "invalid_value", "body.model"),
        ]
        assert "line 7: it nests arrays or objects too deeply" in batch.errors.data[5].message
        assert "line 8: it has an integer of more than" in batch.errors.data[6].message
        assert "line 9: custom_id is not Unicode text" in batch.errors.data[7].message
        assert "line 10: body.model is not Unicode text: character 8 ('\\ud800')" in batch.errors.data[8].message
        assert "line 11: body.model holds a NUL (\\u0000) at character 8" in batch.errors.data[9].message
        assert "line 4" in batch.errors.data[2].message and "line 1" in batch.errors.data[2].message
        with pytest.raises(openai.ConflictError, match="failed"):
            client.batches.cancel(batch.id)

        # Refused at once: an endpoint not served, another window, a file that is not a batch's.
        with pytest.raises(openai.BadRequestError, match="endpoint"):
            client.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/embeddings", completion_window="24h")
        with pytest.raises(openai.BadRequestError, match="completion_window"):
            client.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/completions", completion_window="1h")
        other = client.files.create(file=("train.jsonl", b'{"messages": []}\n'), purpose="fine-tune")
        with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
            client.batches.create(input_file_id=other.id, endpoint="/v1/completions", completion_window="24h")


def long_batch(client, model: str, count: int) -> str:
    lines = [request(f"r{i}", model, max_tokens=48, temperature=0) for i in range(count)]
    return client.batches.create(
        input_file_id=upload_requests(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def wait_answered(client, batch_id: str, at_least: int):
    deadline = time.monotonic() + BATCH_TIMEOUT_S
    while (batch := client.batches.retrieve(batch_id)).request_counts.completed < at_least:
        assert time.monotonic() < deadline and batch.status in ("validating", "in_progress"), batch.status
        time.sleep(0.02)
    return batch


def test_a_cancelled_batch_keeps_the_lines_answered_before(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("tuneforge.jobs.batches.IN_FLIGHT", 1)
    model = str(tiny_model_dir)
    with restarted(tmp_path / "home", workers=1, allowed_models=[model]) as client:
        batch_id = long_batch(client, model, 40)
        wait_answered(client, batch_id, 1)
        assert client.batches.cancel(batch_id).status in ("cancelling", "cancelled")
        batch = wait_batch(client, batch_id)
        assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
        counts = batch.request_counts
        assert 1 <= counts.completed < counts.total == 40
        output = lines_of(client, batch.output_file_id)
        assert len(output) == counts.completed and all(line["response"]["status_code"] == 200 for line in output)
        assert client.batches.cancel(batch_id).status == "cancelled"  # again: nothing changes


def test_a_batch_resumes_after_a_restart_without_answering_a_line_twice(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("tuneforge.jobs.batches.IN_FLIGHT", 1)
    model, home = str(tiny_model_dir), tmp_path / "home"
    with restarted(home, workers=1, allowed_models=[model]) as client:
        batch_id = long_batch(client, model, 12)
        wait_answered(client, batch_id, 2)
    # The server stopped: the batch waits for the next one, its answered lines kept.
    with restarted(home, workers=0, allowed_models=[model]) as client:
        stopped = client.batches.retrieve(batch_id)
        assert stopped.status == "validating" and 2 <= stopped.request_counts.completed < 12
    with restarted(home, workers=1, allowed_models=[model]) as client:
        batch = wait_batch(client, batch_id)
        assert batch.status == "completed" and batch.request_counts.completed == 12
        output = lines_of(client, batch.output_file_id)
        assert [line["custom_id"] for line in output] == [f"r{i}" for i in range(12)]
        assert len({line["id"] for line in output}) == 12


def test_a_batch_whose_model_goes_away_across_a_restart_keeps_its_answered_lines(tmp_path, tiny_model_dir, monkeypatch):
    """A batch validated once is not failed whole when its model is gone by the time the next server takes it
    up: the lines answered before stay in its output file, and the rest are error lines naming the model."""
    monkeypatch.setattr("tuneforge.jobs.batches.IN_FLIGHT", 1)
    model, home = str(tiny_model_dir), tmp_path / "home"
    with restarted(home, workers=1, allowed_models=[model]) as client:
        batch_id = long_batch(client, model, 12)
        answered = wait_answered(client, batch_id, 2).request_counts.completed
    with restarted(home, workers=1, allowed_models=[]) as client:  # the model is no longer served
        batch = wait_batch(client, batch_id)
        assert batch.status == "completed" and not batch.errors, batch.errors
        counts = batch.request_counts
        assert counts.completed >= answered and counts.completed + counts.failed == counts.total == 12
        assert len(lines_of(client, batch.output_file_id)) == counts.completed
        errors = lines_of(client, batch.error_file_id)
        assert len(errors) == counts.failed and all(e["response"]["status_code"] == 404 for e in errors)


def test_a_batch_whose_server_died_is_taken_up_by_the_next(tmp_path, tiny_model_dir):
    from tuneforge.jobs.store import Store
    from tuneforge.jobs.worker import HOST

    model, home = str(tiny_model_dir), tmp_path / "home"
    with restarted(home, workers=0, allowed_models=[model]) as client:
        batch_id = long_batch(client, model, 2)
    # As a server that was killed mid-batch leaves it: in progress, held by a process that is gone.
    store = Store(f"sqlite:///{home / 'jobs.db'}")
    dead = f"{HOST}:{os.getpid()}:1.00/batches"
    assert store.move_batch(batch_id, ["validating"], status="in_progress", total=2, worker_id=dead)
    with restarted(home, workers=1, allowed_models=[model]) as client:
        batch = wait_batch(client, batch_id)
        assert batch.status == "completed" and batch.request_counts.completed == 2


def test_a_batch_whose_server_dies_once_too_often_fails_instead_of_taking_each_next_server_down(tmp_path):
    """A request that takes its server down (the model answers in the server's process) is answered again by each
    next server: the batch is taken up again after each death, as a job is, and fails when found dead once more."""
    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Batch, Store, new_id, now
    from tuneforge.jobs.worker import HOST, MAX_RECOVERIES, Workers

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    batch = Batch(
        id=new_id("batch_"),
        owner="o",
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        status="validating",
        created_at=now(),
    )
    store.add(batch)
    for death in range(MAX_RECOVERIES + 1):
        assert store.claim_batch("x") is not None
        store.move_batch(batch.id, ["validating"], status="in_progress", worker_id=f"{HOST}:999999999:1.00/b")
        Workers(store, FileStorage(tmp_path), tmp_path, 0)._recover_orphans()
        after = store.get_batch(batch.id)
        assert after.worker_id is None and after.status == ("validating" if death < MAX_RECOVERIES else "failed")
    assert after.failed_at and after.errors[0]["code"] == "server_stopped"
    assert f"stopped {MAX_RECOVERIES + 1} times" in after.errors[0]["message"]


def test_an_upload_that_is_no_batch_file_is_refused_saying_what_a_batch_holds(tmp_path):
    with restarted(tmp_path / "home", workers=0) as client:
        for name, text in (("requests.jsonl", b""), ("requests.txt", b"{}\n")):
            with pytest.raises(openai.BadRequestError) as caught:
                client.files.create(file=(name, text), purpose="batch")
            assert caught.value.param == "file" and "a batch's requests" in caught.value.message
            assert "fine-tuning" not in caught.value.message


def test_a_request_line_longer_than_the_servers_body_limit_fails_the_batch_naming_the_line_unread(
    tmp_path, tiny_model_dir
):
    """Sent alone, such a request would be a 413; in a file it is not read, where parsed whole it would take
    several times its size in memory."""
    model = str(tiny_model_dir)
    with restarted(tmp_path / "home", workers=1, allowed_models=[model], max_body_bytes=1 << 16) as client:
        huge = request("b", model, stop=["x" * (1 << 16)])
        batch = client.batches.create(
            input_file_id=upload_requests(client, [request("a", model), huge]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        batch = wait_batch(client, batch.id)
        assert batch.status == "failed"
        [error] = batch.errors.data
        assert (error.line, error.code) == (2, "request_too_large")
        assert "over this server's limit of 65,536 bytes on a request body" in error.message, error.message


def test_a_batch_whose_output_the_servers_disk_has_no_room_for_fails_saying_so(
    tmp_path, tiny_model_dir, monkeypatch, caplog
):
    """A batch whose output file the disk refuses fails as a write the server has no room for, as an upload is a
    507: its error says so (no error id to quote) and the log has one line naming the path, no traceback."""
    from tuneforge.jobs.files import FileStorage

    save = FileStorage.save

    def full_disk(self, source, **kwargs):
        if kwargs["purpose"] == "batch_output":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "full" / "out.jsonl"))
        return save(self, source, **kwargs)

    monkeypatch.setattr(FileStorage, "save", full_disk)
    model = str(tiny_model_dir)
    with restarted(tmp_path / "home", workers=1, allowed_models=[model]) as client:
        batch = wait_batch(client, long_batch(client, model, 1))
    assert batch.status == "failed", batch
    (error,) = batch.errors.data
    assert error.code == "insufficient_storage" and "no room" in error.message, error
    assert "error id" not in error.message and "/" not in error.message, error
    (record,) = [r for r in caplog.records if r.name == "tuneforge.web"]
    assert str(tmp_path / "full" / "out.jsonl") in record.getMessage() and record.exc_info is None
