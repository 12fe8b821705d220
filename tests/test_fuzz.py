"""Property-based fuzzing of both servers' request bodies (hypothesis): whatever a client sends, the
answer is never a 5xx, and no body carries a traceback or a path of the server's own folders.

Bodies are valid requests with some fields replaced by arbitrary JSON or dropped, arbitrary JSON,
and arbitrary bytes, sent to every route that reads one; the apps run in this process on a tiny
model whose context is 64 tokens, so a request that passes every check is answered in moments.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import save_tiny_model, set_context

from tuneforge.jobs.api import create_api
from tuneforge.jobs.store import Store
from tuneforge.serve import AdapterPool, Engine, create_app

KEY = "fuzz-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Integers past 64 bits too: torch, SQLite and the tokenizer each have their own limit.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(2**60, 2**80).map(lambda n: n * (-1) ** n)
    | st.floats()
    | st.text(max_size=20)
)
json_values = scalars | st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


# Values at the limits of what the server's parts take: 32/64-bit integers, denormal and infinite floats, long text.
limits = st.sampled_from(
    [
        0,
        -1,
        2**31,
        2**63 - 1,
        2**63,
        2**64,
        2**70,
        -(2**63) - 1,
        1e-320,
        1e308,
        float("inf"),
        float("nan"),
        "",
        "x" * 5000,
        "\x00",
        [],
        {},
    ]
)


def varied(valid: dict, extra_fields: tuple[str, ...] = ()) -> st.SearchStrategy[bytes]:
    """`valid` with a field or two replaced (by a limit or arbitrary JSON) or dropped; any JSON; any bytes."""
    fields = st.sampled_from(sorted({*valid, *extra_fields, "unknown"}))
    changed = st.tuples(
        st.dictionaries(fields, limits | json_values, min_size=1, max_size=2), st.sets(fields, max_size=1)
    ).map(lambda change: {k: v for k, v in {**valid, **change[0]}.items() if k not in change[1]})
    return st.one_of(
        changed.map(json.dumps), changed.map(json.dumps), json_values.map(json.dumps), st.binary(max_size=64)
    )


def assert_answered(response, *server_folders: Path):
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text
    for folder in (*server_folders, Path(__file__).parents[1] / "src", Path(json.__file__).parent.parent):
        assert str(folder) not in response.text, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> Path:
    folder = set_context(save_tiny_model(tmp_path_factory.mktemp("fuzz") / "model"), 64)
    return folder


@pytest.fixture(scope="module")
def serve_client(short_model):
    engine = Engine(AdapterPool(str(short_model)), max_batch=4)
    with TestClient(create_app(engine, api_keys=[KEY]), raise_server_exceptions=False) as client:
        yield client
    engine.close()


@pytest.fixture(scope="module")
def jobs(short_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-jobs")
    app = create_api(
        root,
        Store(f"sqlite:///{root / 'jobs.db'}"),
        api_keys=[KEY],
        workers=0,
        allowed_models=[str(short_model)],
        max_upload_bytes=1 << 16,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        row = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
        upload = client.post(
            "/v1/files",
            headers=HEADERS,
            data={"purpose": "fine-tune"},
            files={"file": ("train.jsonl", row.encode() * 4)},
        )
        yield client, root, upload.json()["id"]


def chat_body(model: str) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0.5,
        "seed": 3,
        "stop": ["\n"],
        "stream": False,
    }


GENERATION_FIELDS = ("max_completion_tokens", "top_p", "n", "stream_options", "presence_penalty", "logprobs", "user")


@FUZZ
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), data=st.data())
def test_serve_answers_any_body_with_a_4xx_or_an_answer(serve_client, short_model, route, data):
    valid = chat_body(short_model.name)
    if route == "/v1/completions":
        valid = {**{k: v for k, v in valid.items() if k != "messages"}, "prompt": "Hi"}
    body = data.draw(varied(valid, GENERATION_FIELDS))
    response = serve_client.post(route, content=body, headers={**HEADERS, "Content-Type": "application/json"})
    assert_answered(response, short_model.parent)


@FUZZ
@given(data=st.data())
def test_the_jobs_api_answers_any_body_with_a_4xx_or_an_answer(jobs, short_model, data):
    client, root, file_id = jobs
    job = {
        "model": str(short_model),
        "training_file": file_id,
        "validation_file": None,
        "suffix": "s",
        "seed": 1,
        "metadata": {"k": "v"},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
    }
    route, valid = data.draw(
        st.sampled_from([("/v1/fine_tuning/jobs", job), ("/v1/chat/completions", chat_body(str(short_model)))])
    )
    body = data.draw(varied(valid, ("hyperparameters", "integrations", *GENERATION_FIELDS)))
    response = client.post(route, content=body, headers={**HEADERS, "Content-Type": "application/json"})
    assert_answered(response, root)


@FUZZ
@given(
    name=st.text(max_size=40),
    filename=st.text(max_size=20),
    purpose=st.text(max_size=12),
    content=st.binary(max_size=256),
    limit=st.integers(),
)
def test_the_jobs_api_answers_any_name_upload_or_query_with_a_4xx_or_an_answer(
    jobs, name, filename, purpose, content, limit
):
    client, root, _ = jobs
    quoted = quote(name, safe="")
    for path in (f"/v1/files/{quoted}", f"/v1/fine_tuning/jobs/{quoted}", f"/v1/models/{quoted}"):
        assert_answered(client.get(path, headers=HEADERS), root)
    assert_answered(client.delete(f"/v1/models/{quoted}", headers=HEADERS), root)
    assert_answered(client.get("/v1/fine_tuning/jobs", params={"limit": limit, "after": name}, headers=HEADERS), root)
    assert_answered(client.post(f"/v1/fine_tuning/jobs/{quoted}/pause", headers=HEADERS), root)
    upload = client.post("/v1/files", headers=HEADERS, data={"purpose": purpose}, files={"file": (filename, content)})
    assert_answered(upload, root)
