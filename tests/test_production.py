"""In production: metrics, request logs, stored completions and the training data made from them.

Real servers (uvicorn in a thread, a tiny model answering) driven by the official `openai` client;
metrics are scraped and read with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import SUBPROCESS_ENV, tiny_run_config
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_jobs import add_job
from test_serve import PROMPTS, random_adapter, running_server

from tuneforge.cli import main
from tuneforge.data.check import check_command
from tuneforge.errors import ConfigError, DataError
from tuneforge.eval import evaluate
from tuneforge.jobs.api import create_api
from tuneforge.jobs.store import Store
from tuneforge.serve import AdapterPool, CompletionStore, Engine, Retention, create_app
from tuneforge.serve.completion_store import SECONDS_A_DAY, StoredCompletion
from tuneforge.serve.from_completions import from_completions, from_completions_command
from tuneforge.training import train
from tuneforge.web import Observer, edge, owner_of

KEY, OTHER_KEY = "key-alice", "key-bob"
BASE = "base"  # the served name of the base model: its folder's name
QUESTION = [
    {"role": "system", "content": "You answer support tickets."},
    {"role": "user", "content": "Where is my parcel 4417?"},
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(base_dir, tmp_path_factory):
    adapter = random_adapter(base_dir, tmp_path_factory.mktemp("adapter") / "tuned", seed=1)
    engine = Engine(AdapterPool(str(base_dir), {"tuned": str(adapter)}))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """`tuneforge serve` with two keys and a completion store."""
    path = tmp_path_factory.mktemp("store") / "completions.db"
    store = CompletionStore.open(str(path))
    with running_server(create_app(engine, api_keys=[KEY, OTHER_KEY], completions=store)) as url:
        yield SimpleNamespace(url=url, store=store, path=path)


def sdk(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def scrape(url: str) -> tuple[dict, str]:
    """The samples at /metrics as {(name, labels): value}, and the text they came in."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).raise_for_status().text
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return samples, text


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_a_refused_request_is_counted_under_the_served_model_it_names(served):
    """A 400 for a request naming a served model counts under that model, whether its body's validation or a
    route's check refuses it; one naming a model nobody serves stays unlabelled, so labels stay bounded."""
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = {"route": "/v1/chat/completions", "method": "POST", "status": "400"}
    before, _ = scrape(served.url)
    refused = [
        {"model": BASE, "messages": "not a list"},  # the body's validation
        {"model": BASE, "messages": QUESTION, "temperature": 7},  # out of range
        {"model": BASE, "messages": QUESTION, "tool_choice": "required"},  # a route's check: no tools given
        {"model": "no-such-model", "messages": "not a list"},
    ]
    for body in refused:
        answer = httpx.post(f"{served.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert answer.status_code == 400, answer.text
    after, text = scrape(served.url)
    assert moved(before, after, "tuneforge_requests_total", **chat, model=BASE) == 3
    assert moved(before, after, "tuneforge_requests_total", **chat, model="") == 1
    assert "no-such-model" not in text


def ask(client, model: str = BASE, **options):
    return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=0, **options)


# ---- metrics and request logs ----------------------------------------------------------------------


def test_serve_metrics_count_requests_tokens_and_first_tokens_by_route_and_served_model(served):
    client = sdk(served.url)
    before, _ = scrape(served.url)
    answers = [ask(client), ask(client)]
    streamed = list(ask(client, "tuned", stream=True, stream_options={"include_usage": True}))
    legacy = client.completions.create(model=BASE, prompt="The quick brown fox", max_tokens=4, temperature=0)
    with pytest.raises(openai.NotFoundError):
        ask(client, "no-such-model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve("chatcmpl-no-such-id")
    after, text = scrape(served.url)

    chat = {"route": "/v1/chat/completions", "method": "POST"}
    assert moved(before, after, "tuneforge_requests_total", **chat, model=BASE, status="200") == 2
    assert moved(before, after, "tuneforge_requests_total", **chat, model="tuned", status="200") == 1
    assert moved(before, after, "tuneforge_requests_total", **chat, model="", status="404") == 1
    assert (
        moved(
            before, after, "tuneforge_requests_total", route="/v1/completions", method="POST", model=BASE, status="200"
        )
        == 1
    )
    one = {"route": "/v1/chat/completions/{completion_id}", "method": "GET", "model": "", "status": "404"}
    assert moved(before, after, "tuneforge_requests_total", **one) == 1
    assert moved(before, after, "tuneforge_request_duration_seconds_count", **chat) == 4
    # Labels stay bounded: neither a model nobody serves nor a raw path becomes one.
    assert "no-such-model" not in text and "chatcmpl-no-such-id" not in text

    generated = sum(a.usage.completion_tokens for a in answers) + legacy.usage.completion_tokens
    assert generated == 16
    assert moved(before, after, "tuneforge_generated_tokens_total", model=BASE) == generated
    assert (
        moved(before, after, "tuneforge_generated_tokens_total", model="tuned") == streamed[-1].usage.completion_tokens
    )
    prompt_tokens = sum(a.usage.prompt_tokens for a in answers) + legacy.usage.prompt_tokens
    assert moved(before, after, "tuneforge_prompt_tokens_total", model=BASE) == prompt_tokens
    assert moved(before, after, "tuneforge_time_to_first_token_seconds_count", model=BASE) == 3
    assert moved(before, after, "tuneforge_time_to_first_token_seconds_count", model="tuned") == 1
    assert value(after, "tuneforge_adapters_loaded", base=BASE) == 1
    assert httpx.get(f"{served.url}/metrics").status_code == 401  # a server with keys wants one here too


def wait_for_gauge(url: str, name: str, wanted: float, **labels) -> None:
    deadline = time.monotonic() + 10
    while value(scrape(url)[0], name, **labels) != wanted:
        assert time.monotonic() < deadline, f"{name} {labels} never read {wanted}"
        time.sleep(0.02)


def test_queue_depth_and_batch_size_are_read_while_a_request_decodes(served):
    body = {"model": BASE, "messages": QUESTION, "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{served.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        lines = response.iter_lines()  # held: a dropped iterator closes the stream
        assert next(lines).startswith("data: ")
        wait_for_gauge(served.url, "tuneforge_batch_size", 1, base=BASE)
        assert value(scrape(served.url)[0], "tuneforge_requests_waiting", base=BASE) == 0
    wait_for_gauge(served.url, "tuneforge_batch_size", 0, base=BASE)  # the client went: its row stops


def request_log(caplog) -> list[dict]:
    return [json.loads(record.getMessage()) for record in caplog.records if record.name == "tuneforge.requests"]


def test_a_stream_its_client_leaves_is_logged_and_counted_as_499_not_200(served, caplog):
    caplog.set_level(logging.INFO, logger="tuneforge.requests")
    before, _ = scrape(served.url)
    body = {"model": BASE, "messages": QUESTION, "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{served.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        first = json.loads(next(response.iter_lines()).removeprefix("data: "))
    deadline = time.monotonic() + 10
    while not (lines := [line for line in request_log(caplog) if line.get("id") == first["id"]]):
        assert time.monotonic() < deadline, "the cut stream was never logged"
        time.sleep(0.02)
    [line] = lines
    assert line["status"] == 499 and line["route"] == "/v1/chat/completions" and line["model"] == BASE
    after, _ = scrape(served.url)
    chat = {"route": "/v1/chat/completions", "method": "POST", "model": BASE}
    assert moved(before, after, "tuneforge_requests_total", **chat, status="499") == 1
    assert moved(before, after, "tuneforge_requests_total", **chat, status="200") == 0


def test_an_unexpected_failure_is_one_500_logged_once_under_its_error_id_and_counted(caplog):
    app = FastAPI()

    @app.get("/v1/broken")
    def broken():
        raise RuntimeError("a defect inside a route")

    observer = Observer()
    edge(app, api_keys=[KEY], max_body_bytes=1 << 10, observer=observer)
    caplog.set_level(logging.INFO)
    # The test client raises whatever the app lets out: the failure must end inside the app.
    with TestClient(app) as client:
        response = client.get("/v1/broken", headers={"Authorization": f"Bearer {KEY}"})
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert response.status_code == 500 and response.json()["error"]["code"] == "server_error"
    error_id = response.json()["error"]["message"].split("error id ")[1].split(")")[0]
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and error_id in tracebacks[0].getMessage()
    counted = {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "tuneforge_requests_total"
    }
    assert counted[("/v1/broken", "500")] == 1


def test_the_request_log_has_a_json_line_a_request_and_prompts_only_when_asked(served, engine, caplog):
    caplog.set_level(logging.INFO, logger="tuneforge.requests")
    reply = ask(sdk(served.url))
    [line] = [line for line in request_log(caplog) if line.get("id") == reply.id]
    assert line["route"] == "/v1/chat/completions" and line["status"] == 200 and line["model"] == BASE
    assert line["completion_tokens"] == reply.usage.completion_tokens and line["time_to_first_token_s"] > 0
    assert line["owner"] == owner_of(KEY) and KEY not in json.dumps(line)
    assert "parcel 4417" not in caplog.text

    caplog.clear()
    with running_server(create_app(engine, observer=Observer(log_prompts=True))) as url:
        ask(sdk(url))
    [line] = [line for line in request_log(caplog) if line["route"] == "/v1/chat/completions"]
    assert line["prompt"] == QUESTION


# ---- stored completions ----------------------------------------------------------------------------


def test_stored_completions_are_listed_retrieved_and_deleted_with_the_sdk(served):
    client = sdk(served.url)
    stored = [ask(client, store=True, metadata={"test": "sdk", "n": str(i)}) for i in range(3)]
    other_team = ask(client, store=True, metadata={"test": "sdk-other"})
    ask(client, metadata={"test": "sdk"})  # metadata alone does not store
    chunks = list(ask(client, "tuned", store=True, metadata={"test": "sdk"}, stream=True))
    streamed_id, streamed_text = chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    every = [c.id for c in client.chat.completions.list(metadata={"test": "sdk"}, limit=2)]  # the SDK pages on
    assert every == [*(reply.id for reply in stored), streamed_id]
    newest_first = client.chat.completions.list(metadata={"test": "sdk"}, order="desc", limit=100)
    assert [c.id for c in newest_first] == every[::-1]
    assert [c.id for c in client.chat.completions.list(model=BASE, metadata={"test": "sdk"})] == every[:3]
    assert [c.id for c in client.chat.completions.list(metadata={"test": "sdk", "n": "1"})] == [stored[1].id]
    assert [c.id for c in client.chat.completions.list(metadata={"test": "sdk-other"})] == [other_team.id]

    kept = client.chat.completions.retrieve(stored[1].id)
    assert kept.object == "chat.completion" and kept.model == BASE and kept.metadata == {"test": "sdk", "n": "1"}
    assert kept.choices[0].message.content == stored[1].choices[0].message.content
    assert kept.usage == stored[1].usage and kept.created == stored[1].created
    messages = list(client.chat.completions.messages.list(stored[1].id))
    assert [(m.role, m.content) for m in messages] == [(m["role"], m["content"]) for m in QUESTION]
    assert [m.id for m in client.chat.completions.messages.list(stored[1].id, order="desc", limit=1)] == [
        messages[1].id,
        messages[0].id,
    ]
    with pytest.raises(openai.BadRequestError) as caught:  # not the first page again, as if it were the next
        client.chat.completions.messages.list(stored[1].id, after=stored[2].id)
    assert caught.value.param == "after" and stored[2].id in caught.value.message
    whole_stream = client.chat.completions.retrieve(streamed_id)
    assert whole_stream.model == "tuned" and whole_stream.choices[0].message.content == streamed_text
    assert whole_stream.usage.completion_tokens == 6

    deleted = client.chat.completions.delete(stored[0].id)
    assert (deleted.object, deleted.id, deleted.deleted) == ("chat.completion.deleted", stored[0].id, True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(stored[0].id)
    assert [c.id for c in client.chat.completions.list(metadata={"test": "sdk"})] == every[1:]


def test_a_stored_completions_metadata_is_replaced_whole_with_the_sdk(served):
    client = sdk(served.url)
    kept = ask(client, store=True, metadata={"test": "update", "team": "support"})

    updated = client.chat.completions.update(kept.id, metadata={"test": "update", "stage": "reviewed"})
    assert updated.object == "chat.completion" and updated.id == kept.id
    assert updated.metadata == {"test": "update", "stage": "reviewed"}  # replaced, not merged: "team" is gone
    assert updated.choices[0].message.content == kept.choices[0].message.content and updated.usage == kept.usage
    assert client.chat.completions.retrieve(kept.id).metadata == {"test": "update", "stage": "reviewed"}
    assert [c.id for c in client.chat.completions.list(metadata={"stage": "reviewed"})] == [kept.id]
    assert list(client.chat.completions.list(metadata={"team": "support", "test": "update"})) == []

    with pytest.raises(openai.BadRequestError) as caught:  # as `create` checks it
        client.chat.completions.update(kept.id, metadata={str(i): "v" for i in range(17)})
    assert caught.value.param == "metadata" and "16" in caught.value.message
    assert client.chat.completions.retrieve(kept.id).metadata == {"test": "update", "stage": "reviewed"}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.update(kept.id, metadata={"test": "update"}, extra_body={"model": BASE})
    assert caught.value.param == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.update("chatcmpl-no-such-id", metadata={})
    assert caught.value.param == "completion_id"

    assert client.chat.completions.update(kept.id, metadata=None).metadata == {}


def test_stored_messages_are_listed_as_sent_and_train_as_the_chat_template_saw_them(served, tmp_path):
    client = sdk(served.url)
    sent = [
        {"role": "developer", "content": "You answer support tickets."},
        {"role": "user", "content": [{"type": "text", "text": "Where is "}, {"type": "text", "text": "4417?"}]},
        {"role": "assistant", "content": "Which parcel?", "name": "agent"},
        {"role": "user", "content": "That one.", "name": "ana"},
    ]
    reply = client.chat.completions.create(
        model=BASE, messages=sent, max_tokens=6, temperature=0, store=True, metadata={"test": "as-sent"}
    )
    listed = [
        m.model_dump(include={"role", "content", "content_parts", "name"}, exclude_none=True)
        for m in client.chat.completions.messages.list(reply.id)
    ]
    assert listed == [
        {"role": "developer", "content": "You answer support tickets."},
        {"role": "user", "content_parts": sent[1]["content"]},
        {"role": "assistant", "content": "Which parcel?", "name": "agent"},
        {"role": "user", "content": "That one.", "name": "ana"},
    ]

    made = from_completions(
        str(served.path), tmp_path / "rows.jsonl", metadata={"test": "as-sent"}, keep_truncated=True
    )
    assert made.written == 1
    [row] = [json.loads(line) for line in made.out.read_text().splitlines()]
    assert row["messages"] == [
        {"role": "system", "content": "You answer support tickets."},
        {"role": "user", "content": "Where is 4417?"},
        {"role": "assistant", "content": "Which parcel?", "name": "agent"},
        {"role": "user", "content": "That one.", "name": "ana"},
        {"role": "assistant", "content": reply.choices[0].message.content},
    ]


def test_rows_from_completions_hold_the_system_prompt_the_served_models_template_added(base_dir, tmp_path):
    """A tuned model's template adds the system prompt it was trained with to a conversation that brings none: the
    row trains with it, as the model saw the prompt; a conversation's own system message is kept instead."""
    from tuneforge.models import load_tokenizer
    from tuneforge.models.system_prompt import record_system_prompt

    adapter = random_adapter(base_dir, tmp_path / "prompted", seed=3)
    tokenizer = load_tokenizer(str(base_dir))
    record_system_prompt(tokenizer, "You triage tickets.")
    tokenizer.save_pretrained(adapter)
    engine = Engine(AdapterPool(str(base_dir), {"prompted": str(adapter)}))
    path = tmp_path / "completions.db"
    user = {"role": "user", "content": "Where is my parcel?"}
    own = {"role": "system", "content": "You answer in French."}
    try:
        with running_server(create_app(engine, api_keys=[KEY], completions=CompletionStore.open(str(path)))) as url:
            client = sdk(url)
            for model, messages in (("prompted", [user]), ("prompted", [own, user]), (BASE, [user])):
                client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0, store=True)
    finally:
        engine.close()
    made = from_completions(str(path), tmp_path / "rows.jsonl", keep_truncated=True)
    rows = [json.loads(line)["messages"][:-1] for line in made.out.read_text().splitlines()]
    assert rows == [[{"role": "system", "content": "You triage tickets."}, user], [own, user], [user]]


def test_a_key_never_sees_another_keys_stored_completions(served):
    alice, bob = sdk(served.url), sdk(served.url, OTHER_KEY)
    kept = ask(alice, store=True, metadata={"test": "isolation"}).id
    assert list(bob.chat.completions.list(metadata={"test": "isolation"})) == []
    missing = "chatcmpl-" + "0" * 32
    for action in (
        lambda id_: bob.chat.completions.retrieve(id_),
        lambda id_: bob.chat.completions.messages.list(id_),
        lambda id_: bob.chat.completions.update(id_, metadata={"test": "isolation", "by": "bob"}),
        lambda id_: bob.chat.completions.delete(id_),
    ):
        with pytest.raises(openai.NotFoundError) as theirs:
            action(kept)
        with pytest.raises(openai.NotFoundError) as absent:
            action(missing)
        assert theirs.value.body == {
            **absent.value.body,
            "message": absent.value.body["message"].replace(missing, kept),
        }
    assert alice.chat.completions.retrieve(kept).metadata == {"test": "isolation"}
    assert alice.chat.completions.retrieve(kept).id == kept


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ({f"k{i}": "v" for i in range(17)}, "17 pairs given; keep at most 16"),
        ({"k" * 65: "v"}, "has 65 characters; keep keys to 64"),
        ({"team": "v" * 513}, "the value of 'team' has 513 characters; keep values to 512"),
        ({"team": "a\0b"}, "the value of 'team' holds a NUL (\\u0000) at character 1"),
        ({"te\0am": "v"}, "the key 'te\\x00am' holds a NUL (\\u0000) at character 2"),
    ],
)
def test_metadata_beyond_openais_limits_is_a_400_that_says_what_to_keep(served, metadata, says):
    client = sdk(served.url)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, store=True, metadata=metadata)
    assert caught.value.param == "metadata" and says in caught.value.body["message"]


def test_a_server_without_a_store_refuses_store_true_and_says_it_stores_none(engine):
    """Made without a completion store, the app refuses store: true, and answers the SDK's list, retrieve, update,
    messages and delete of stored completions with a 404 saying it stores none (not that a method or path is
    unknown)."""
    with TestClient(create_app(engine)) as http:
        response = http.post(
            "/v1/chat/completions", json={"model": BASE, "messages": QUESTION, "max_tokens": 2, "store": True}
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "store"
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        completions = client.chat.completions
        for call in (
            lambda: completions.list(),
            lambda: completions.retrieve("chatcmpl-1"),
            lambda: completions.update("chatcmpl-1", metadata={"run": "a"}),
            lambda: completions.messages.list("chatcmpl-1"),
            lambda: completions.delete("chatcmpl-1"),
        ):
            with pytest.raises(openai.NotFoundError) as caught:
                call()
            error = caught.value.body
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "not_found"
            assert error["message"].startswith("This server stores no chat completions")


def store_by_http(http: TestClient, n: int = 1) -> list[str]:
    body = {"model": BASE, "messages": QUESTION, "max_tokens": 2, "store": True}
    return [http.post("/v1/chat/completions", json=body).raise_for_status().json()["id"] for _ in range(n)]


def listed(http: TestClient) -> list[str]:
    return [c["id"] for c in http.get("/v1/chat/completions", params={"limit": 100}).json()["data"]]


@pytest.mark.parametrize(("days", "count"), [(0, None), (float("nan"), None), (None, 0)])
def test_retention_that_would_keep_nothing_or_prune_nothing_is_refused(days, count):
    with pytest.raises(ConfigError, match="--store-max"):
        Retention(days, count)


def test_retention_keeps_the_newest_completions_up_to_the_count(engine, tmp_path):
    store = CompletionStore.open(str(tmp_path / "completions.db"), Retention(max_count=3))
    with TestClient(create_app(engine, completions=store)) as http:
        ids = store_by_http(http, 5)
        assert listed(http) == ids[2:]


def test_retention_deletes_completions_past_the_age_when_one_is_stored_and_when_the_store_opens(engine, tmp_path):
    path = str(tmp_path / "completions.db")
    store = CompletionStore.open(path, Retention(max_age_days=1))

    def written_ago(seconds: float) -> str:
        """A row written straight into the store as if `seconds` ago (`save` would prune it at once)."""
        completion_id = f"chatcmpl-{int(seconds)}-ago"
        created = int(time.time() - seconds)
        response = {"id": completion_id, "model": BASE, "created": created, "choices": []}
        store.add(
            StoredCompletion(
                id=completion_id, owner="local", model=BASE, created=created, messages=QUESTION, response=response
            )
        )
        return completion_id

    with TestClient(create_app(engine, completions=store)) as http:
        old, recent = written_ago(2 * SECONDS_A_DAY), written_ago(3600)
        assert listed(http) == [old, recent]  # no write since: still there
        new = store_by_http(http)
        assert listed(http) == [recent, *new]
    old = written_ago(2 * SECONDS_A_DAY)
    assert store.get("local", old) is not None
    assert CompletionStore.open(path, Retention(max_age_days=1)).get("local", old) is None


# ---- from stored completions to training data ------------------------------------------------------


def test_served_answers_become_training_data_a_tiny_fine_tune_and_an_eval_run_on(served, base_dir, tmp_path):
    client = sdk(served.url)
    replies = [
        client.chat.completions.create(
            model=BASE,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=8,
            temperature=0,
            store=True,
            metadata={"set": "round-trip"},
        )
        for prompt in PROMPTS[:6]
    ]
    out = tmp_path / "train.jsonl"
    command = [sys.executable, "-m", "tuneforge", "data", "from-completions", "--store", str(served.path)]
    command += ["--model", BASE, "--metadata", "set=round-trip", "--out", str(out), "--keep-truncated"]
    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"6 chat rows in {out}" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["messages"] for row in rows] == [
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply.choices[0].message.content}]
        for prompt, reply in zip(PROMPTS, replies)
    ]
    assert check_command([str(out)], model=str(base_dir)) == 0

    config = tiny_run_config(base_dir, {"train": out, "validation": out}, tmp_path / "run", max_steps=2)
    config["data"]["validation"] = None  # six rows: nothing to split off
    assert train(config, progress=False).status == "completed"
    # The same file scores a model on the stored prompts, the served replies as references.
    scored = evaluate(str(tmp_path / "run"), out, limit=3, max_new_tokens=4, progress=False)
    assert scored["n"] == 3 and scored["tokens"] > 0 and len(scored["samples"]) == 3


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["tuneforge", *args])
    with pytest.raises(SystemExit) as leaving:
        main()
    return leaving.value.code, capsys.readouterr().err


def test_a_stored_message_the_request_checks_refuse_leaves_its_row_out_naming_it(tmp_path):
    # A store keeps what a server took when it answered; a message that today's checks refuse (content left out)
    # is one row's problem, as a row failing the data checks is, not the end of the command.
    path = tmp_path / "completions.db"
    store = CompletionStore.open(str(path))
    reply = {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}
    for i, messages in enumerate([[{"role": "user"}], [{"role": "user", "content": "The capital of France?"}]]):
        store.save("local", messages, {"id": f"chatcmpl-{i}", "model": "m", "created": i, "choices": [reply]}, None)
    result = from_completions(str(path), tmp_path / "rows.jsonl")
    assert result.written == 1
    [problem] = result.problems
    assert (problem.file, problem.field) == ("chatcmpl-0", "messages[0].content")
    assert "a message needs content" in problem.message


def test_from_completions_refuses_an_out_that_is_a_folder_as_a_bad_option(tmp_path, monkeypatch, capsys):
    # --out names the file to write: a folder there is the option's mistake (exit 2, naming --out and the folder),
    # not a failed write naming a temporary file beside it.
    path = tmp_path / "completions.db"
    reply = {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}
    messages = [{"role": "user", "content": "The capital of France?"}]
    CompletionStore.open(str(path)).save(
        "local", messages, {"id": "c", "model": "m", "created": 0, "choices": [reply]}, None
    )
    folder = tmp_path / "rows"
    folder.mkdir()
    code, said = run_cli(["data", "from-completions", "--store", str(path), "--out", str(folder)], monkeypatch, capsys)
    assert code == 2
    assert f"--out {folder} is a folder; give the file to write, e.g. {folder / 'completions.jsonl'}." in said
    assert (
        ".tmp-" not in said
        and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
        and not any(folder.iterdir())
    )


def test_from_completions_prints_stored_text_and_paths_as_written(tmp_path, capsys):
    # A refusal quotes the stored prompt (a content part's type) and the report names --out: rich would read
    # `[/x]` there as a closing tag (an error) and `:x:` as an emoji's code.
    path = tmp_path / "completions.db"
    store = CompletionStore.open(str(path))
    reply = {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}
    odd = [{"role": "user", "content": [{"type": ":x: [/x]", "text": "hi"}]}]
    for i, messages in enumerate([odd, [{"role": "user", "content": "The capital of France?"}]]):
        store.save("local", messages, {"id": f"chatcmpl-{i}", "model": "m", "created": i, "choices": [reply]}, None)
    out = tmp_path / "[/x] :x:.jsonl"
    args = {"model": None, "metadata_specs": [], "api_key": None, "keep_truncated": False}
    assert from_completions_command(str(path), str(out), **args) == 0
    said = capsys.readouterr().out
    assert "part 0 is of type ':x: [/x]'" in said and f"1 chat row in {out}" in said


def test_from_completions_refuses_bad_input_saying_what_to_do(served, tmp_path, monkeypatch, capsys):
    out = tmp_path / "train.jsonl"
    ask(sdk(served.url), store=True, metadata={"set": "cut"})  # 6 tokens of 6: cut at its length limit
    store = ["--store", str(served.path), "--out", str(out)]

    code, said = run_cli(
        ["data", "from-completions", *store, "--metadata", "set=nothing-has-this"], monkeypatch, capsys
    )
    assert code == 2 and "No stored completions in" in said and "--metadata set=nothing-has-this" in said
    code, said = run_cli(["data", "from-completions", *store, "--metadata", "set=cut"], monkeypatch, capsys)
    assert code == 2 and "None of the 1 matching completions" in said and "--keep-truncated keeps it" in said
    missing = ["--store", str(tmp_path / "nowhere.db"), "--out", str(out)]
    code, said = run_cli(["data", "from-completions", *missing], monkeypatch, capsys)
    assert code == 2 and "no such file" in said and "`tuneforge serve` keeps stored completions in" in said
    assert not out.exists() and not (tmp_path / "nowhere.db").exists()

    bad = [sys.executable, "-m", "tuneforge", "data", "from-completions", *store, "--metadata", "team"]
    result = subprocess.run(bad, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert result.returncode == 2 and "--metadata team: expected KEY=VALUE, e.g. --metadata team=support" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


# ---- the jobs service ------------------------------------------------------------------------------


def test_the_jobs_service_stores_completions_per_key_and_reports_metrics(base_dir, tmp_path):
    db = tmp_path / "jobs.db"
    store = Store(f"sqlite:///{db}")
    add_job(store, KEY, status="succeeded", trained_tokens=100)
    add_job(store, OTHER_KEY, status="failed", trained_tokens=20)
    app = create_api(tmp_path / "home", store, api_keys=[KEY, OTHER_KEY], workers=0, allowed_models=[str(base_dir)])
    with running_server(app) as url:
        alice, bob = sdk(url), sdk(url, OTHER_KEY)
        before, _ = scrape(url)
        reply = ask(alice, str(base_dir), store=True, metadata={"via": "api"})
        chunks = list(ask(alice, str(base_dir), store=True, metadata={"via": "api"}, stream=True))
        assert reply.model == str(base_dir)  # the name the request gave
        assert [c.id for c in alice.chat.completions.list(metadata={"via": "api"})] == [reply.id, chunks[0].id]
        assert alice.chat.completions.retrieve(reply.id).metadata == {"via": "api"}
        assert list(bob.chat.completions.list()) == []
        with pytest.raises(openai.NotFoundError):
            bob.chat.completions.retrieve(reply.id)
        with pytest.raises(openai.NotFoundError):
            bob.chat.completions.delete(reply.id)
        after, _ = scrape(url)

    chat = {"route": "/v1/chat/completions", "method": "POST"}
    assert moved(before, after, "tuneforge_requests_total", **chat, model=str(base_dir), status="200") == 2
    assert moved(before, after, "tuneforge_time_to_first_token_seconds_count", model=str(base_dir)) == 2
    assert moved(before, after, "tuneforge_generated_tokens_total", model=str(base_dir)) == 12
    assert value(after, "tuneforge_jobs", status="succeeded") == value(after, "tuneforge_jobs", status="failed") == 1
    assert value(after, "tuneforge_jobs", status="queued") == 0
    assert value(after, "tuneforge_trained_tokens_total") == 120
    assert value(after, "tuneforge_batch_size", base=BASE) == 0

    # The api keeps them in its --db: from-completions reads them there.
    made = from_completions(f"sqlite:///{db}", tmp_path / "api.jsonl", metadata={"via": "api"}, keep_truncated=True)
    assert made.written == 2


# ---- methods a path does not take ------------------------------------------------------------------

SERVE_PATHS = {
    "/v1/models": ["GET"],
    f"/v1/models/{BASE}": ["GET"],
    "/v1/chat/completions": ["GET", "POST"],
    "/v1/chat/completions/chatcmpl-x": ["DELETE", "GET", "POST"],
    "/v1/chat/completions/chatcmpl-x/messages": ["GET"],
    "/v1/completions": ["POST"],
    "/health": ["GET"],
    "/metrics": ["GET"],
}
API_PATHS = {
    **SERVE_PATHS,
    f"/v1/models/{BASE}": ["DELETE", "GET"],
    "/v1/files": ["GET", "POST"],
    "/v1/files/file-x": ["DELETE", "GET"],
    "/v1/files/file-x/content": ["GET"],
    "/v1/fine_tuning/jobs": ["GET", "POST"],
    "/v1/fine_tuning/jobs/ftjob-x": ["GET"],
    "/v1/fine_tuning/jobs/ftjob-x/cancel": ["POST"],
    "/v1/fine_tuning/jobs/ftjob-x/events": ["GET"],
    "/ui/runs/x": ["GET"],
    "/ui/api/check": ["GET", "POST"],  # GET: the page for every other path under /ui
    "/ui/static/x.css": ["GET", "HEAD"],
}


def assert_other_methods_are_openai_405s_naming_what_is_taken(http: TestClient, paths: dict[str, list[str]]) -> None:
    for path, taken in paths.items():
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - set(taken):
            response = http.request(method, path)
            error = response.json()["error"]
            assert (response.status_code, error["code"]) == (405, "method_not_allowed"), (method, path)
            assert set(error) == {"message", "type", "param", "code"}
            assert (
                error["message"]
                == f"Invalid method for URL ({method} {path}): this server takes {', '.join(taken)} there."
            )
            assert response.headers["Allow"] == ", ".join(taken)


def test_a_method_a_path_does_not_take_is_an_openai_405_naming_the_methods_it_does(engine, base_dir, tmp_path):
    store = CompletionStore.open(str(tmp_path / "completions.db"))
    with TestClient(create_app(engine, completions=store)) as http:
        assert_other_methods_are_openai_405s_naming_what_is_taken(http, SERVE_PATHS)
    api = create_api(tmp_path / "home", Store(f"sqlite:///{tmp_path / 'jobs.db'}"), workers=0)
    assert_other_methods_are_openai_405s_naming_what_is_taken(TestClient(api), API_PATHS)


def test_the_jobs_service_is_ready_only_while_its_store_answers(tmp_path):
    folder = tmp_path / "db"
    store = Store(f"sqlite:///{folder / 'jobs.db'}")
    with TestClient(create_api(tmp_path / "home", store, workers=0, dashboard=False)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        store.engine.dispose()  # no pooled connection left: the next check opens one
        folder.rename(tmp_path / "gone")
        answer = client.get("/health")
    assert answer.status_code == 503
    assert answer.json()["status"] == "unavailable" and "database" in answer.json()["reason"]


def test_a_store_file_that_is_not_a_database_is_refused_naming_it(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    with pytest.raises(ConfigError) as caught:
        CompletionStore.open(str(notes))
    assert f"--store {notes}: cannot open the database" in str(caught.value)
    assert "file is not a database" in str(caught.value)
    assert notes.read_text() == "hello\n"


@pytest.mark.parametrize("scheme", ["postgres", "postgres+psycopg2"])
def test_a_postgres_url_with_or_without_a_driver_opens_the_postgresql_store_as_postgresql_does(scheme):
    """`postgres` is libpq's other spelling of `postgresql`, with a driver named after it (`+psycopg2`) too: both
    open a PostgreSQL store, not refused as a database tuneforge does not store in."""
    from tuneforge.database import connect

    engine = connect(f"{scheme}://tf@db-host/tuneforge")
    assert engine.url.drivername == "postgresql+psycopg2" and engine.url.database == "tuneforge"


def test_a_store_url_of_a_database_tuneforge_does_not_store_in_is_refused_saying_which_it_does():
    """A MySQL URL is no missing PostgreSQL driver: the error names the two databases a store may be."""
    with pytest.raises(ConfigError) as caught:
        CompletionStore.open("mysql://tf@db-host/tuneforge")
    message = str(caught.value)
    assert message.startswith("--store mysql://tf@db-host/tuneforge: cannot open the database"), message
    assert "SQLite or PostgreSQL" in message and "psycopg2" not in message, message


def test_from_completions_refuses_a_store_that_holds_no_completions_and_leaves_it_as_it_was(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(ConfigError) as caught:
        from_completions(str(other), tmp_path / "rows.jsonl")
    assert f"--store {other}: not a completion store" in str(caught.value)
    assert "`tuneforge serve` keeps stored completions in" in str(caught.value)
    with sqlite3.connect(other) as connection:
        assert connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [("notes",)]
    with pytest.raises(ConfigError, match=f"--store {tmp_path}: a folder, not a store's file"):
        from_completions(str(tmp_path), tmp_path / "rows.jsonl")
    assert not (tmp_path / "rows.jsonl").exists()


def test_from_completions_refuses_an_sqlite_url_naming_no_file_and_creates_nothing(tmp_path):
    typo = tmp_path / "nowhere" / "completions.db"
    with pytest.raises(ConfigError, match=f"--store sqlite:///{typo}: no such file"):
        from_completions(f"sqlite:///{typo}", tmp_path / "rows.jsonl")
    assert not typo.parent.exists()


def test_from_completions_counts_one_row_one_reply_and_one_completion_in_the_singular(tmp_path, capsys):
    path = tmp_path / "completions.db"
    store = CompletionStore.open(str(path))

    def saved(i: int, content: str, finish_reason: str) -> None:
        reply = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
        question = [{"role": "user", "content": f"Question {i}?"}]
        store.save("local", question, {"id": f"chatcmpl-{i}", "model": "m", "created": i, "choices": [reply]}, None)

    saved(0, "Cut sho", "length")
    with pytest.raises(DataError, match=r"\n1 reply cut at its length limit \(--keep-truncated keeps it\)"):
        from_completions(str(path), tmp_path / "none.jsonl")
    saved(1, "", "stop")  # an empty reply: the data checks refuse it
    saved(2, "Paris", "stop")
    args = {"model": None, "metadata_specs": [], "api_key": None, "keep_truncated": False}
    assert from_completions_command(str(path), str(tmp_path / "rows.jsonl"), **args) == 0
    said = capsys.readouterr().out
    assert "1 chat row in " in said
    assert "left out 1 reply cut at its length limit (--keep-truncated keeps it)" in said
    assert "left out 1 completion the data checks refuse:" in said


def test_an_empty_selection_names_the_model_or_metadata_nothing_stored_has_and_the_nearest_that_is(tmp_path):
    path = tmp_path / "completions.db"
    store = CompletionStore.open(str(path))
    reply = {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}
    question = [{"role": "user", "content": "The capital of France?"}]
    response = {"id": "chatcmpl-0", "model": "triage", "created": 0, "choices": [reply]}
    store.save("local", question, response, {"team": "support"})

    def refusal(**filters) -> str:
        with pytest.raises(DataError) as caught:
            from_completions(str(path), tmp_path / "rows.jsonl", **filters)
        return str(caught.value)

    assert "no stored completion holds the metadata key 'taem' (did you mean 'team'?)" in refusal(
        metadata={"taem": "support"}
    )
    store.save("local", question, {**response, "id": "chatcmpl-1", "model": "coder"}, {"repo": "tuneforge"})
    assert "no stored completion of the model 'triage' holds the metadata key 'repo'" in refusal(
        model="triage", metadata={"repo": "tuneforge"}
    )
    assert "none of the model 'triage' has team=suport" in refusal(model="triage", metadata={"team": "suport"})
    assert "none has team=suport (did you mean 'support'?)" in refusal(metadata={"team": "suport"})
    assert "no stored completion is of the model 'traige' (did you mean 'triage'?)" in refusal(
        model="traige", metadata={"team": "support"}
    )
    assert "did you mean" not in refusal(metadata={"color": "blue"})
    assert "no completion stored with the --api-key is of the model 'triage'" in refusal(model="triage", api_key="k")
    assert not (tmp_path / "rows.jsonl").exists()
