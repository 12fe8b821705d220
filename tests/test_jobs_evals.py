"""OpenAI's Evals API on `tuneforge api`, through the official OpenAI SDK: evals whose testing criteria are
graders, runs answered by a tiny model (a base and a fine-tuned one) and graded, and what is refused."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_jobs import KEY, OTHER_KEY, ApiServer, chat_rows, create_job, nested_multi, upload, wait_for

from tuneforge.jobs.api import create_api
from tuneforge.jobs.store import Store

openai = pytest.importorskip("openai")
# This SDK warns that OpenAI is retiring its own Evals API; the API served here stays.
pytestmark = pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")

ITEMS = [
    {"question": "What is two plus two?", "answer": "four", "expected": "four"},
    {"question": "Name a colour.", "answer": "blue", "expected": "red"},
    {"question": "Say hello.", "answer": "hello", "expected": "hello"},
]
# Graders whose outcome does not depend on what a random tiny model says: one compares two item fields,
# one passes any answer; so the counts are known and the sample namespace is still read.
SAME_ANSWER = {
    "type": "string_check",
    "name": "same answer",
    "input": "{{ item.answer }}",
    "reference": "{{ item.expected }}",
    "operation": "eq",
}
ANY_ANSWER = {
    "type": "string_check",
    "name": "answered",
    "input": "{{ sample.output_text }}",
    "reference": "no model writes this \u2603",
    "operation": "ne",
}
CONFIG = {
    "type": "custom",
    "item_schema": {
        "type": "object",
        "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
        "required": ["question", "answer"],
    },
    "include_sample_schema": True,
}
TEMPLATE = {
    "type": "template",
    "template": [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": "Q: {{item.question}}"},
    ],
}
RUN_TIMEOUT_S = 120


def data_source(model: str, source: dict, **sampling) -> dict:
    return {
        "type": "completions",
        "model": model,
        "source": source,
        "input_messages": TEMPLATE,
        "sampling_params": {"max_completion_tokens": 4, "temperature": 0.0, "seed": 3, **sampling},
    }


def inline(items=ITEMS) -> dict:
    return {"type": "file_content", "content": [{"item": item} for item in items]}


def wait_run(client, eval_id: str, run_id: str, server: ApiServer | None = None):
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in ("completed", "failed", "canceled"):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} is {run.status}\n{server.log() if server else ''}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_dir):
    """The service allowed the sharp tiny model (tiny_sharp.py), whose answers tell the items' prompts apart."""
    api = ApiServer(tmp_path_factory.mktemp("evals-home"), allowed=[base_dir]).start()
    yield api
    api.stop()


def test_an_eval_runs_a_base_and_a_fine_tuned_model_and_survives_a_restart(server, base_dir):
    client = server.client()
    train = upload(client, chat_rows(4))
    job = create_job(client, base_dir, train.id, n_epochs=1)
    evaluation = client.evals.create(
        name="triage", data_source_config=CONFIG, testing_criteria=[SAME_ANSWER, ANY_ANSWER], metadata={"team": "a"}
    )
    assert evaluation.object == "eval" and evaluation.name == "triage" and evaluation.metadata == {"team": "a"}
    assert evaluation.data_source_config.schema_["properties"]["item"] == CONFIG["item_schema"]
    assert [c.name for c in evaluation.testing_criteria] == ["same answer", "answered"]

    items_file = client.files.create(
        file=("items.jsonl", "".join(json.dumps({"item": i}) + "\n" for i in ITEMS).encode()), purpose="evals"
    )
    base_run = client.evals.runs.create(evaluation.id, name="base", data_source=data_source(str(base_dir), inline()))
    assert base_run.status == "queued" and base_run.result_counts.total == 0
    job = wait_for(client, job.id, {"succeeded", "failed"}, server=server)
    assert job.status == "succeeded", job.error
    tuned_run = client.evals.runs.create(
        evaluation.id, data_source=data_source(job.fine_tuned_model, {"type": "file_id", "id": items_file.id})
    )
    for run in (base_run, tuned_run):
        run = wait_run(client, evaluation.id, run.id, server)
        assert run.status == "completed", f"{run.error}\n{server.log()}"
        counts = run.result_counts
        assert (counts.total, counts.passed, counts.failed, counts.errored) == (3, 2, 1, 0)
        per_criterion = {r.testing_criteria: (r.passed, r.failed) for r in run.per_testing_criteria_results}
        assert per_criterion == {"same answer": (2, 1), "answered": (3, 0)}
        assert run.per_model_usage[0].invocation_count == 3 and run.per_model_usage[0].completion_tokens >= 3
        # Each item's output is the model's answer to its own prompt: the live route's, with the same sampling.
        outputs, live = [], []
        for item in client.evals.runs.output_items.list(run.id, eval_id=evaluation.id):
            outputs.append(item.sample.output[0].content)
            messages = [{"role": m.role, "content": m.content} for m in item.sample.input]
            answer = client.chat.completions.create(
                model=item.sample.model, messages=messages, max_completion_tokens=4, temperature=0.0, seed=3
            )
            live.append(answer.choices[0].message.content)
        assert outputs == live and len(set(live)) == 3

    items = list(client.evals.runs.output_items.list(tuned_run.id, eval_id=evaluation.id, limit=2))
    assert [i.datasource_item_id for i in items] == [0, 1, 2]  # the SDK pages through both pages
    second = items[1]
    assert second.status == "fail" and second.datasource_item == ITEMS[1]
    assert {r.name: r.passed for r in second.results} == {"same answer": False, "answered": True}
    assert second.sample.input[1].content == "Q: Name a colour." and second.sample.input[0].role == "system"
    assert second.sample.model == job.fine_tuned_model and second.sample.seed == 3
    assert second.sample.usage.completion_tokens >= 1 and len(second.sample.output) == 1
    failed = client.evals.runs.output_items.list(tuned_run.id, eval_id=evaluation.id, status="fail")
    assert [i.datasource_item_id for i in failed] == [1]

    assert [r.id for r in client.evals.runs.list(evaluation.id)] == [base_run.id, tuned_run.id]
    assert [e.id for e in client.evals.list()] == [evaluation.id]
    with pytest.raises(openai.NotFoundError):  # another key's eval is not there for it
        server.client(OTHER_KEY).evals.retrieve(evaluation.id)

    # The service started again on the same store (here in this process: a server's start is the slow part).
    server.stop()
    with restarted(server.home / "jobs", allowed_models=[str(base_dir)], workers=0) as client:
        assert client.evals.retrieve(evaluation.id).testing_criteria[0].name == "same answer"
        run = client.evals.runs.retrieve(tuned_run.id, eval_id=evaluation.id)
        assert run.status == "completed" and run.result_counts.passed == 2
        assert len(list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id))) == 3

        assert client.evals.delete(evaluation.id).deleted
        with pytest.raises(openai.NotFoundError):
            client.evals.runs.retrieve(run.id, eval_id=evaluation.id)


@contextlib.contextmanager
def restarted(root: Path, **options):
    """The SDK against a jobs service in this process, on the store and files under `root`."""
    app = create_api(root, Store(f"sqlite:///{root / 'jobs.db'}"), api_keys=[KEY], dashboard=False, **options)
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


@pytest.fixture
def sdk(tmp_path, tiny_model_dir):
    """The SDK against a jobs service in this process that runs nothing (no workers): its runs stay queued."""
    with restarted(tmp_path / "home", workers=0, allowed_models=[str(tiny_model_dir)]) as client:
        yield client


def refusal(call) -> tuple[str, str]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.body["param"], caught.value.body["message"]


def test_a_multi_grader_nested_past_the_apis_depth_is_refused_when_the_eval_is_created(sdk):
    from tuneforge.web import MAX_NESTING

    deep = nested_multi(SAME_ANSWER, 200)
    param, message = refusal(lambda: sdk.evals.create(data_source_config=CONFIG, testing_criteria=[ANY_ANSWER, deep]))
    assert param == "testing_criteria[1]" and f"at most {MAX_NESTING}" in message, (param, message)
    deepest = nested_multi(SAME_ANSWER, (MAX_NESTING - 1) // 2)
    assert sdk.evals.create(data_source_config=CONFIG, testing_criteria=[deepest]).testing_criteria[0].name


def test_bad_evals_and_runs_are_refused_naming_the_field(sdk, tiny_model_dir):
    bad_grader = {**SAME_ANSWER, "name": "bad", "operation": "equals"}
    param, message = refusal(
        lambda: sdk.evals.create(data_source_config=CONFIG, testing_criteria=[ANY_ANSWER, bad_grader])
    )
    assert param == "testing_criteria[1]" and '"bad" (string_check)' in message and "operation" in message
    python = {"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1.0\n"}
    assert refusal(lambda: sdk.evals.create(data_source_config=CONFIG, testing_criteria=[python]))[0] == (
        "testing_criteria[0]"
    )
    for kind in (["string_check"], {"string_check": 1}):  # not a name: the grader's type, refused as any other
        typed = {**SAME_ANSWER, "type": kind}
        param, message = refusal(
            lambda typed=typed: sdk.evals.create(data_source_config=CONFIG, testing_criteria=[typed])
        )
        assert param == "testing_criteria[0]" and "`type` must be one of" in message
    logs = {"type": "logs", "metadata": {}}
    param, message = refusal(lambda: sdk.evals.create(data_source_config=logs, testing_criteria=[ANY_ANSWER]))
    assert param == "data_source_config.type" and "'logs'" in message

    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
    model = str(tiny_model_dir)
    responses = {"type": "responses", "source": inline(), "model": model}
    param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=responses))
    assert param == "data_source.type" and "'responses'" in message
    reference = {**data_source(model, inline()), "input_messages": {"type": "item_reference", "item_reference": "x"}}
    assert refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=reference))[0] == (
        "data_source.input_messages.type"
    )
    lacking = [ITEMS[0], {"question": "?", "answer": "a"}]
    param, message = refusal(
        lambda: sdk.evals.runs.create(evaluation.id, data_source=data_source(model, inline(lacking)))
    )
    assert param == "data_source.source.content[1]" and "item.expected" in message
    latin1 = sdk.files.create(
        file=("items.jsonl", '{"item": {"answer": "caf\xe9"}}\n'.encode("latin-1")), purpose="evals"
    )
    param, message = refusal(
        lambda: sdk.evals.runs.create(
            evaluation.id, data_source=data_source(model, {"type": "file_id", "id": latin1.id})
        )
    )
    assert param == "data_source.source.id" and f"{latin1.id} line 1: it is not UTF-8" in message
    sample_in_input = {"type": "template", "template": [{"role": "user", "content": "{{ sample.output_text }}"}]}
    param, _ = refusal(
        lambda: sdk.evals.runs.create(
            evaluation.id, data_source={**data_source(model, inline()), "input_messages": sample_in_input}
        )
    )
    assert param == "data_source.input_messages.template[0].content"
    assert refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=data_source("nope", inline())))[0] == (
        "data_source.model"
    )
    for seed in (2**64, -1):  # past what torch's generator takes, which the run would fail on when it starts
        seeded = data_source(model, inline(), seed=seed)
        param, _ = refusal(lambda seeded=seeded: sdk.evals.runs.create(evaluation.id, data_source=seeded))
        assert param == "data_source.sampling_params.seed"


def test_sampling_params_openai_documents_and_tuneforge_does_not_build_are_refused_by_name(sdk, tiny_model_dir):
    """OpenAI's completions sampling_params `reasoning_effort` and `response_format`: a 400 naming the parameter,
    saying tuneforge does not support it and to remove it; response_format's plain text asks for nothing."""
    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[ANY_ANSWER])
    model = str(tiny_model_dir)
    for name, value, advice in (
        ("reasoning_effort", "low", "remove it"),
        ("response_format", {"type": "json_object"}, "remove it"),
        ("max_tokens", 16, "send max_completion_tokens instead"),  # chat's name for it, which a run does not take
    ):
        run = data_source(model, inline(), **{name: value})
        param, message = refusal(lambda run=run: sdk.evals.runs.create(evaluation.id, data_source=run))
        assert param == f"data_source.sampling_params.{name}", message
        assert message.startswith(f"{param} is not supported: ") and advice in message, message
    plain = sdk.evals.runs.create(
        evaluation.id, data_source=data_source(model, inline(), response_format={"type": "text"})
    )
    assert plain.status == "queued"


def test_text_that_is_not_unicode_is_a_400_naming_where_it_is(tmp_path):
    """JSON's \\u escapes can spell one half of a UTF-16 surrogate pair alone, in a value or in an object's key (an
    item's field): a 400 whose param says where, as the message does."""
    app = create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=[KEY], workers=0, dashboard=False)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    config, criteria = json.dumps(CONFIG), json.dumps([ANY_ANSWER])
    with TestClient(app) as http:
        for body, where in (
            (f'{{"name": "\\ud800", "data_source_config": {config}, "testing_criteria": {criteria}}}', "name"),
            (
                f'{{"data_source_config": {config}, "testing_criteria": {criteria}, "metadata": {{"\\udc00": "a"}}}}',
                "metadata.\\udc00",
            ),
        ):
            response = http.post("/v1/evals", content=body.encode(), headers=headers)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == where and error["message"].startswith(f"'{where}' is not Unicode text")


def test_an_items_file_line_json_cannot_read_is_a_400_naming_the_line(sdk, tiny_model_dir):
    """Well-formed JSON that Python's reader gives up on (nested too deeply, an integer of too many digits)."""
    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
    cases = [
        ("[" * 100_000 + "]" * 100_000, "it nests arrays or objects too deeply"),
        ("9" * 5000, "it has an"),
        # Text no tokenizer encodes: the run would fail when it starts.
        ('{"item": {"question": "Hi \\ud83d", "answer": "a"}}', "item.question is not Unicode text"),
    ]
    for line, says in cases:
        items = sdk.files.create(file=("items.jsonl", f'{{"item": {{}}}}\n{line}\n'.encode()), purpose="evals")
        run = data_source(str(tiny_model_dir), {"type": "file_id", "id": items.id})
        param, message = refusal(lambda run=run: sdk.evals.runs.create(evaluation.id, data_source=run))
        assert param == "data_source.source.id" and f"{items.id} line 2: {says}" in message


def test_items_that_do_not_match_the_evals_item_schema_are_refused_naming_the_item_and_field(sdk, tiny_model_dir):
    not_a_schema = {**CONFIG, "item_schema": {"type": "object", "properties": {"answer": {"type": "text"}}}}
    param, message = refusal(lambda: sdk.evals.create(data_source_config=not_a_schema, testing_criteria=[ANY_ANSWER]))
    assert param == 'data_source_config.item_schema["properties"]["answer"]["type"]' and "'text'" in message

    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[ANY_ANSWER])
    model = str(tiny_model_dir)
    schema = "does not match the eval's data_source_config.item_schema"
    for wrong, said in (
        ({"question": "Say hi."}, f"item {schema}: 'answer' is a required property"),
        ({"question": "Say hi.", "answer": 4}, f"item.answer {schema}: 4 is not of type 'string'"),
    ):
        items = data_source(model, inline([ITEMS[0], wrong]))
        param, message = refusal(lambda items=items: sdk.evals.runs.create(evaluation.id, data_source=items))
        assert param == "data_source.source.content[1]" and said in message, message
    lines = "".join(json.dumps({"item": item}) + "\n" for item in [ITEMS[0], ITEMS[1], {"question": 1, "answer": "a"}])
    uploaded = sdk.files.create(file=("items.jsonl", lines.encode()), purpose="evals")
    source = {"type": "file_id", "id": uploaded.id}
    param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=data_source(model, source)))
    assert param == f"{uploaded.id} item[2]" and "item.question does not match" in message, message


def test_an_item_schema_whose_ref_cannot_be_resolved_is_a_400_naming_it(sdk, tiny_model_dir):
    for ref in ("#/$defs/missing", "https://example.invalid/answer.json"):
        schema = {**CONFIG["item_schema"], "properties": {"question": {"type": "string"}, "answer": {"$ref": ref}}}
        evaluation = sdk.evals.create(
            data_source_config={**CONFIG, "item_schema": schema}, testing_criteria=[ANY_ANSWER]
        )
        items = data_source(str(tiny_model_dir), inline([ITEMS[0]]))
        param, message = refusal(lambda items=items, e=evaluation: sdk.evals.runs.create(e.id, data_source=items))
        assert param == "data_source_config.item_schema" and ref in message and "cannot be resolved" in message


def test_an_eval_kept_from_before_item_schemas_were_checked_refuses_its_runs_naming_what_is_wrong(
    sdk, tiny_model_dir, tmp_path
):
    # An eval created before item_schema was checked as a JSON Schema may hold one that is not.
    from sqlalchemy import update

    from tuneforge.jobs.store import Eval

    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[ANY_ANSWER])
    schema = {**CONFIG["item_schema"], "properties": {"question": {"type": "text"}}}
    shown = {"type": "custom", "schema": {"type": "object", "properties": {"item": schema}, "required": ["item"]}}
    with Store(f"sqlite:///{tmp_path / 'home' / 'jobs.db'}").session() as session:
        session.execute(update(Eval).where(Eval.id == evaluation.id).values(data_source_config=shown))
    items = data_source(str(tiny_model_dir), inline([ITEMS[0]]))
    param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=items))
    assert param == 'data_source_config.item_schema["properties"]["question"]["type"]' and "'text'" in message


def test_a_queued_run_is_canceled_and_a_canceled_one_cannot_be_again(sdk, tiny_model_dir):
    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
    run = sdk.evals.runs.create(evaluation.id, data_source=data_source(str(tiny_model_dir), inline()))
    assert sdk.evals.runs.cancel(run.id, eval_id=evaluation.id).status == "canceled"
    param, message = refusal(lambda: sdk.evals.runs.cancel(run.id, eval_id=evaluation.id))
    assert param == "run_id" and "canceled" in message
    assert [r.status for r in sdk.evals.runs.list(evaluation.id, status="canceled")] == ["canceled"]
    assert sdk.evals.runs.delete(run.id, eval_id=evaluation.id).deleted
    assert sdk.evals.runs.list(evaluation.id).data == []
    for number in range(2):
        sdk.evals.create(name=f"more {number}", data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
    updated = sdk.evals.update(evaluation.id, name="renamed", metadata={"v": "2"})
    assert (updated.name, updated.metadata) == ("renamed", {"v": "2"}) and updated.testing_criteria[0].name
    assert sdk.evals.retrieve(evaluation.id).name == "renamed"
    page = sdk.evals.list(limit=2)
    assert page.has_more and [e.name for e in page.data] == ["renamed", "more 0"]
    assert [e.name for e in sdk.evals.list(limit=2, after=page.data[-1].id).data] == ["more 1"]


def test_an_older_job_store_gets_the_eval_tables_when_opened(tmp_path):
    from tuneforge.jobs import store as jobs_store

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    older = [t for name, t in jobs_store.Base.metadata.tables.items() if not name.startswith("eval")]
    engine = jobs_store.connect(url)
    jobs_store.Base.metadata.create_all(engine, tables=older)
    engine.dispose()
    store = Store(url)
    assert store.list_evals("someone", after=None, limit=5, newest_first=False) == []


def test_an_item_a_grader_fails_on_or_too_long_for_the_model_errors_alone(tmp_path, tiny_model_dir):
    source = (
        "def grade(sample, item):\n"
        "    if item['answer'] == 'blue':\n"
        "        raise ValueError('no blue')\n"
        "    return 0.5\n"
    )
    python = {"type": "python", "name": "py", "source": source, "pass_threshold": 0.5}
    similar = {"type": "text_similarity", "name": "sim", "input": "{{ sample.output_text }}",
               "reference": "{{ item.answer }}", "evaluation_metric": "fuzzy_match"}  # fmt: skip
    options = {"workers": 1, "allowed_models": [str(tiny_model_dir)], "allow_python_graders": True}
    with restarted(tmp_path / "home", **options) as sdk:
        param, message = refusal(lambda: sdk.evals.create(data_source_config=CONFIG, testing_criteria=[similar]))
        assert param == "testing_criteria[0].pass_threshold" and "text_similarity" in message
        evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[python])
        too_long = {"question": "word " * 3000, "answer": "four"}  # past the tiny model's 2048 positions
        items = inline([too_long, *ITEMS])  # first: the items after it are named by their place in the run
        run = sdk.evals.runs.create(evaluation.id, data_source=data_source(str(tiny_model_dir), items))
        run = wait_run(sdk, evaluation.id, run.id)
        assert run.status == "completed", run.error
        assert (run.result_counts.passed, run.result_counts.errored) == (2, 2)
        assert [(r.passed, r.failed) for r in run.per_testing_criteria_results] == [(2, 0)]
        errored = sdk.evals.runs.output_items.list(run.id, eval_id=evaluation.id, status="error").data
        [result] = errored[1].results
        assert errored[1].datasource_item_id == 2 and not result.passed
        assert "no blue" in result.error and "on item 2, output_text" in result.error
        assert errored[0].datasource_item_id == 0 and errored[0].results == [] and errored[0].sample.output == []
        assert errored[0].sample.error.code == "context_length_exceeded" and "2048" in errored[0].sample.error.message


def test_a_run_whose_results_the_store_refuses_fails_and_is_not_left_in_progress(tmp_path, tiny_model_dir, monkeypatch):
    from sqlalchemy.exc import OperationalError

    def locked(*_, **__):  # SQLite past its busy timeout, say, as the run's results are written
        raise OperationalError("INSERT INTO eval_output_items", {}, Exception("database is locked"))

    monkeypatch.setattr(Store, "finish_run", locked)
    with restarted(tmp_path / "home", workers=1, allowed_models=[str(tiny_model_dir)]) as sdk:
        evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
        run = sdk.evals.runs.create(evaluation.id, data_source=data_source(str(tiny_model_dir), inline()))
        run = wait_run(sdk, evaluation.id, run.id)
        assert run.status == "failed" and run.error.code == "server_error" and "error id" in run.error.message


def test_a_run_whose_results_the_disk_has_no_room_for_fails_saying_so(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """A full disk as the run's results are written fails the run as a fine-tuning job's full disk fails the job:
    out of disk space, naming the file without the server's path (the log has the path and what to do, no
    traceback), not as a crash to quote an error id for; the run, and its empty list of items, stay readable."""
    import errno
    import os

    from tuneforge.fsio import REFUSED_WRITE_ADVICE

    database = tmp_path / "home" / "jobs.db"

    def full(*_, **__):  # as the store tells SQLite's "database or disk is full" (`database._full_disk_naming`)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(database))

    monkeypatch.setattr(Store, "finish_run", full)
    with restarted(tmp_path / "home", workers=1, allowed_models=[str(tiny_model_dir)]) as sdk:
        evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
        run = sdk.evals.runs.create(evaluation.id, data_source=data_source(str(tiny_model_dir), inline()))
        run = wait_run(sdk, evaluation.id, run.id)
        assert (run.status, run.error.code) == ("failed", "out_of_disk_space"), run.error
        assert run.error.message == (
            "The server has no room to write this run's jobs.db (No space left on device). Once the server's "
            "operator frees space, start a new run to try again."
        )
        assert sdk.evals.runs.output_items.list(run.id, eval_id=evaluation.id).data == []
    (record,) = [r for r in caplog.records if r.name == "tuneforge.jobs" and r.levelname == "ERROR"]
    assert (
        record.getMessage()
        == f"eval run {run.id}: {database}: No space left on device. " + (REFUSED_WRITE_ADVICE[errno.ENOSPC])
    )
    assert record.exc_info is None


def test_a_run_whose_failure_the_full_store_cannot_write_yet_is_failed_once_it_can(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A full disk under the store refuses the run's results and, at first, its failure too: the run is not left in
    progress with nobody to end it (its worker alive, so no other server takes it up); its failure is written once
    the store takes writes again."""
    import errno
    import os

    from tuneforge.jobs import evals

    def full(*_, **__):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "home" / "jobs.db"))

    moved = Store.move_run
    refusals = iter(range(3))  # the store refuses to write the run's end three times, then has room

    def full_at_first(store, run_id, from_statuses, **values):
        if values.get("status") == "failed" and next(refusals, None) is not None:
            full()
        return moved(store, run_id, from_statuses, **values)

    monkeypatch.setattr(Store, "finish_run", full)
    monkeypatch.setattr(Store, "move_run", full_at_first)
    monkeypatch.setattr(evals, "END_RETRY_S", 0.05)
    with restarted(tmp_path / "home", workers=1, allowed_models=[str(tiny_model_dir)]) as sdk:
        evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
        run = sdk.evals.runs.create(evaluation.id, data_source=data_source(str(tiny_model_dir), inline()))
        run = wait_run(sdk, evaluation.id, run.id)
    assert (run.status, run.error.code) == ("failed", "out_of_disk_space"), run.error
    assert next(refusals, None) is None


def ended_against(tmp_path, monkeypatch, refusal, stopping, refusals: int = 1_000) -> list[str]:
    """An eval runner ends a failed run against a store whose move_run raises `refusal` `refusals` times; the
    calls it made are returned."""
    from types import SimpleNamespace

    from tuneforge.jobs import evals
    from tuneforge.jobs.files import FileStorage

    calls = []

    def refused(store, run_id, from_statuses, **values):
        calls.append(values["status"])
        if len(calls) <= refusals:
            raise refusal

    def failing(*_):
        raise evals.RunFailure("x", "the run fails")

    monkeypatch.setattr(Store, "move_run", refused)
    monkeypatch.setattr(evals.EvalRunner, "_answer_and_grade", failing)
    runner = evals.EvalRunner(Store(f"sqlite:///{tmp_path / 'jobs.db'}"), FileStorage(tmp_path))
    with contextlib.suppress(type(refusal)):
        runner.run(SimpleNamespace(id="evalrun_x"), "host/evals", stopping)
    return calls


def test_a_run_end_the_store_refuses_for_good_is_not_tried_again(tmp_path, monkeypatch, caplog):
    """A refusal that no retry clears (a constraint the row breaks) ends the retrying at once, told once."""
    import threading

    from sqlalchemy.exc import IntegrityError

    from tuneforge.jobs import evals

    monkeypatch.setattr(evals, "END_RETRY_S", 0.0001)  # one retried fails the test at once, not after hours
    refusal = IntegrityError("UPDATE eval_runs", {}, Exception("CHECK constraint failed"))
    started = time.monotonic()
    assert ended_against(tmp_path, monkeypatch, refusal, threading.Event()) == ["failed"]
    assert time.monotonic() - started < 1
    assert not [r for r in caplog.records if "trying again" in r.getMessage()]


def test_a_run_end_a_full_store_refuses_is_told_once_and_written_when_it_can(tmp_path, monkeypatch, caplog):
    import errno
    import os
    import threading

    from tuneforge.jobs import evals

    monkeypatch.setattr(evals, "END_RETRY_S", 0.01)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "jobs.db"))
    assert ended_against(tmp_path, monkeypatch, full, threading.Event(), refusals=3) == ["failed"] * 4
    (told,) = [r for r in caplog.records if "trying again" in r.getMessage()]
    assert told.getMessage().startswith("eval run evalrun_x: its end cannot be written yet"), told.getMessage()


def test_a_run_end_a_busy_sqlite_store_refuses_by_an_extended_code_is_written_when_it_can(tmp_path, monkeypatch):
    """SQLite tells a busy database by extended codes too: in WAL mode (the store's), a write after a read that
    another connection's commit made stale is SQLITE_BUSY_SNAPSHOT, which clears once the transaction starts
    again, as SQLITE_BUSY does."""
    import sqlite3
    import threading

    from sqlalchemy.exc import OperationalError

    from tuneforge.jobs import evals

    path = tmp_path / "wal.db"
    writer = sqlite3.connect(path, timeout=0)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.commit()
    reader = sqlite3.connect(path, timeout=0)
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM t").fetchall()
    writer.execute("INSERT INTO t VALUES (1)")
    writer.commit()
    with pytest.raises(sqlite3.OperationalError) as stale:
        reader.execute("INSERT INTO t VALUES (2)")
    assert stale.value.sqlite_errorname == "SQLITE_BUSY_SNAPSHOT"
    reader.close()
    writer.close()
    monkeypatch.setattr(evals, "END_RETRY_S", 0.01)
    busy = OperationalError("UPDATE eval_runs", {}, stale.value)
    assert ended_against(tmp_path, monkeypatch, busy, threading.Event(), refusals=2) == ["failed"] * 3


def test_a_run_end_being_tried_again_stops_as_soon_as_the_server_stops(tmp_path, monkeypatch):
    """The server stopping while a run's end waits to be written again does not wait out the pause: the next
    server takes the run up as one whose server died."""
    import threading

    from sqlalchemy.exc import OperationalError

    stopping = threading.Event()
    threading.Timer(0.2, stopping.set).start()
    lost = OperationalError("UPDATE eval_runs", {}, Exception("server closed the connection unexpectedly"), True)
    started = time.monotonic()
    assert ended_against(tmp_path, monkeypatch, lost, stopping) == ["failed"]
    assert time.monotonic() - started < 2


def test_a_run_whose_results_a_full_postgres_store_refuses_is_told_without_a_path():
    """A PostgreSQL store's full disk is named by the store's URL (`database._full_disk_naming`), not a file: the
    run's message says the job store has no room, naming no fragment of the URL (its socket folder), and the log
    keeps the URL as it is, its `//` too."""
    import errno
    import os

    from tuneforge.jobs.runner import no_room

    url = "postgresql+psycopg2://tuneforge:***@/jobs?host=/run/postgresql"
    told = no_room(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), url), "run")
    assert told["message"] == (
        "The server has no room to write this run's records in the job store (No space left on device). Once the "
        "server's operator frees space, start a new run to try again."
    )
    assert told["log"].startswith(f"{url}: No space left on device. "), told["log"]


def test_an_eval_run_whose_server_dies_once_too_often_fails_counting_every_death(tmp_path):
    """A run that takes its server down (the model answers in the server's process) is queued again after
    each death, as a job is, and fails when it is found dead once more than that."""
    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import EvalRun, new_id, now
    from tuneforge.jobs.worker import HOST, MAX_RECOVERIES, Workers
    from tuneforge.web import owner_of

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    run = EvalRun(
        id=new_id("evalrun_"),
        owner=owner_of(KEY),
        eval_id="eval_x",
        name="r",
        model="m",
        model_source="m",
        data_source={},
        status="queued",
        created_at=now(),
    )
    store.add(run)
    for death in range(MAX_RECOVERIES + 1):
        assert store.claim_run("x") is not None
        store.move_run(run.id, ["in_progress"], worker_id=f"{HOST}:999999999:1.00/e")  # a process that is gone
        Workers(store, FileStorage(tmp_path), tmp_path, 0)._recover_orphans()
        after = store.get_run(run.eval_id, run.id)
        assert after.worker_id is None and after.status == ("queued" if death < MAX_RECOVERIES else "failed")
    assert after.error["code"] == "server_stopped" and f"stopped {MAX_RECOVERIES + 1} times" in after.error["message"]


def test_a_run_renders_each_items_tools_and_returns_the_calls_as_a_chat_completion_does(
    tmp_path, tiny_model_dir, monkeypatch
):
    """An item's `tools`, else the sampling params' (OpenAI's `sampling_params.tools`), are in its prompt as
    `tuneforge serve` renders a request's; a reply that calls one has the calls in the sample's assistant message
    with finish_reason tool_calls, and the graders read them as `sample.output_tools`. Bad tools, and tools for a
    model whose chat template writes none or whose calls are not parsed, are a 400 naming the field when the run is
    created (serve refuses such a request's tools), not a run queued to fail."""
    from families import CLOCK_TOOL, FAMILIES, WEATHER_TOOL, save_family_model

    from tuneforge import generate as generate_module
    from tuneforge.models import load_tokenizer
    from tuneforge.serve.app import _encode
    from tuneforge.serve.bodies import ChatCompletionBody

    folder = save_family_model(FAMILIES["qwen2.5"], tmp_path / "qwen")
    # A template that writes tools, and its calls in a form no parser reads (<function_call>): serve refuses its
    # tools, so a run does too, rather than hand the graders calls left in the text.
    unparsed = Path(shutil.copytree(folder, tmp_path / "unparsed"))
    template = unparsed / "chat_template.jinja"
    template.write_text(template.read_text().replace("tool_call>", "function_call>"))
    sampled, generate = [], generate_module.generate

    def calling(model, tokenizer, prompts, **options):
        """The model's real answers (their prompts' lengths as it encoded them), each a finished call of its first
        tool."""
        sampled.extend(options["tools"])
        answers = generate(model, tokenizer, prompts, **options)
        calls = [f'<tool_call>\n{{"name": "{tools[0]["function"]["name"]}", "arguments": {{}}}}\n</tool_call>'
                 for tools in options["tools"]]  # fmt: skip
        return [dataclasses.replace(answer, text=call, finish_reason="stop") for answer, call in zip(answers, calls)]

    monkeypatch.setattr(generate_module, "generate", calling)
    called = {
        "type": "string_check",
        "name": "called",
        "input": "{{ sample.output_tools.0.function.name }}",
        "reference": "{{ item.answer }}",
        "operation": "eq",
    }
    items = [
        {"question": "Weather in Paris?", "answer": "get_weather", "tools": [WEATHER_TOOL]},
        {"question": "What time is it?", "answer": "get_time"},
    ]
    models = [str(folder), str(tiny_model_dir), str(unparsed)]
    with restarted(tmp_path / "home", workers=1, allowed_models=models) as sdk:
        evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[called])
        source = data_source(str(folder), inline(items), tools=[CLOCK_TOOL, WEATHER_TOOL])
        bad = data_source(str(folder), inline(items), tools=[{"type": "function", "function": {}}])
        param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=bad))
        assert param.startswith("data_source.sampling_params.tools[0].function") and "name" in message
        bad = data_source(str(folder), inline([{**items[0], "tools": "get_weather"}]))
        param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=bad))
        assert param == "data_source.source.content[0]" and "item.tools" in message

        run = wait_run(sdk, evaluation.id, sdk.evals.runs.create(evaluation.id, data_source=source).id)
        assert run.status == "completed", run.error
        assert (run.result_counts.passed, run.result_counts.total) == (2, 2)
        outputs = sdk.evals.runs.output_items.list(run.id, eval_id=evaluation.id, order="asc").data
        unwritten = {**source, "model": str(tiny_model_dir)}  # its ChatML template has no place for tools
        param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=unwritten))
        assert param == "data_source.source.content[0]" and "item.tools" in message
        assert "does not write tool definitions" in message
        unparsed_source = {**source, "model": str(unparsed), "source": inline(items[1:])}  # the sampling params'
        param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=unparsed_source))
        assert param == "data_source.sampling_params.tools"
        assert "writes tool calls in a form that is not parsed" in message
        uploaded = sdk.files.create(
            file=("items.jsonl", "".join(json.dumps({"item": i}) + "\n" for i in items).encode()), purpose="evals"
        )
        from_file = {**source, "model": str(unparsed), "source": {"type": "file_id", "id": uploaded.id}}
        param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=from_file))
        assert param == f"{uploaded.id} item[0]" and "item.tools" in message
        assert [r.model for r in sdk.evals.runs.list(evaluation.id)] == [str(folder)]  # none of them queued
    assert sampled == [[WEATHER_TOOL], [CLOCK_TOOL, WEATHER_TOOL]]
    tokenizer = load_tokenizer(str(folder))
    for output, tools, name in zip(outputs, sampled, ["get_weather", "get_time"]):
        sample = output.sample.model_dump()
        body = ChatCompletionBody(model="m", messages=sample["input"], tools=tools)
        [served] = _encode(tokenizer, [body.template_messages()], body.template_tools())
        assert sample["usage"]["prompt_tokens"] == len(served)
        [message] = sample["output"]
        assert message["role"] == "assistant" and message["content"] is None  # no text before the call, as serve's
        assert [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
            ("function", name, "{}")
        ]
        assert sample["finish_reason"] == "tool_calls" and output.results[0].passed


def test_a_queued_run_whose_models_template_no_longer_parses_its_calls_fails_when_it_starts(tmp_path):
    """The model's folder may change between a run's creation and its start (an allowed model replaced): a run
    whose model no longer has its calls parsed fails when it starts, saying so, rather than grade calls left in
    the text."""
    from families import FAMILIES, WEATHER_TOOL, save_family_model

    folder = save_family_model(FAMILIES["qwen2.5"], tmp_path / "qwen")
    items = [{"question": "Weather in Paris?", "answer": "get_weather", "tools": [WEATHER_TOOL]}]
    with restarted(tmp_path / "home", workers=0, allowed_models=[str(folder)]) as sdk:
        evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[ANY_ANSWER])
        run = sdk.evals.runs.create(evaluation.id, data_source=data_source(str(folder), inline(items)))
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text().replace("tool_call>", "function_call>"))
    with restarted(tmp_path / "home", workers=1, allowed_models=[str(folder)]) as sdk:
        run = wait_run(sdk, evaluation.id, run.id)
    assert run.status == "failed" and run.error.code == "unsupported_value"
    assert "item.tools" in run.error.message and "writes tool calls in a form that is not parsed" in run.error.message


def test_a_reasoning_models_sample_is_the_message_a_chat_completion_gives(tmp_path, monkeypatch):
    """A reasoning model's answer is its sample's assistant message as serve's chat completion gives it: the
    reasoning in `reasoning_content`, the answer after it in `content`, the calls after it in `tool_calls` (content
    null, finish_reason tool_calls); one cut while reasoning has an empty answer and finish_reason length."""
    from families import FAMILIES, WEATHER_TOOL, save_family_model

    from tuneforge import generate as generate_module
    from tuneforge.generate import Completion
    from tuneforge.tool_calls import ToolCallParser

    folder = save_family_model(FAMILIES["qwen3"], tmp_path / "qwen3")
    parsed, parse = [], ToolCallParser.parse

    def parse_noted(parser, text, ids_from=None):
        parsed.append(reply := parse(parser, text, ids_from))
        return reply

    monkeypatch.setattr(ToolCallParser, "parse", parse_noted)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    replies = [
        ("<think>\nadding\n</think>\n\nfour", "stop"),
        (f"<think>\nask the tool\n</think>\n\n{call}", "stop"),
        ("<think>\nstill thin", "length"),
    ]
    monkeypatch.setattr(
        generate_module, "generate", lambda *_, **__: [Completion(text, 9, 4, reason) for text, reason in replies]
    )
    items = [
        {"question": "What is two plus two?", "answer": "four"},
        {"question": "Weather in Paris?", "answer": "get_weather", "tools": [WEATHER_TOOL]},
        {"question": "Why is the sky blue?", "answer": "light"},
    ]
    with restarted(tmp_path / "home", workers=1, allowed_models=[str(folder)]) as sdk:
        evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[ANY_ANSWER])
        run = sdk.evals.runs.create(evaluation.id, data_source=data_source(str(folder), inline(items)))
        run = wait_run(sdk, evaluation.id, run.id)
        assert run.status == "completed", run.error
        outputs = sdk.evals.runs.output_items.list(run.id, eval_id=evaluation.id, order="asc").data
    samples = [output.sample.model_dump() for output in outputs]
    assert [sample["finish_reason"] for sample in samples] == ["stop", "tool_calls", "length"]
    messages = [sample["output"][0] for sample in samples]
    assert messages[0] == {"role": "assistant", "reasoning_content": "adding", "content": "four"}
    assert messages[2] == {"role": "assistant", "reasoning_content": "still thin", "content": ""}
    assert (messages[1]["reasoning_content"], messages[1]["content"]) == ("ask the tool", None)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in messages[1]["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})
    ]
    # The answer is parsed once: the message holds the calls the graders read, with the same (random) ids.
    assert [c["id"] for c in messages[1]["tool_calls"]] == [c["id"] for reply in parsed for c in reply.tool_calls]


def test_a_run_with_tools_on_a_model_folder_without_a_tokenizer_is_refused_naming_the_folders_fault(
    tmp_path, tiny_model_dir
):
    from families import WEATHER_TOOL

    folder = shutil.copytree(tiny_model_dir, tmp_path / "untokenized")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    items = [{"question": "Weather in Paris?", "answer": "get_weather", "tools": [WEATHER_TOOL]}]
    with restarted(tmp_path / "home", workers=0, allowed_models=[str(folder)]) as sdk:
        evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[ANY_ANSWER])
        param, message = refusal(
            lambda: sdk.evals.runs.create(evaluation.id, data_source=data_source(str(folder), inline(items)))
        )
    assert param == "data_source.model" and "holds no tokenizer" in message and str(folder) in message


def test_runs_with_tools_read_the_models_tokenizer_once_and_again_when_its_folder_changes(tmp_path, monkeypatch):
    """runs.create reads a model's chat template to check a run's tools: the tokenizer is loaded once for the
    requests that follow, and loaded again once a file in the model's folder has changed."""
    from families import FAMILIES, WEATHER_TOOL, save_family_model

    from tuneforge.models import loading

    folder = save_family_model(FAMILIES["qwen2.5"], tmp_path / "qwen")
    loads, raw_tokenizer = [], loading._raw_tokenizer
    monkeypatch.setattr(loading, "_raw_tokenizer", lambda source: loads.append(source) or raw_tokenizer(source))
    items = [{"question": "Weather in Paris?", "answer": "get_weather", "tools": [WEATHER_TOOL]}]
    with restarted(tmp_path / "home", workers=0, allowed_models=[str(folder)]) as sdk:
        evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[ANY_ANSWER])
        for _ in range(3):
            sdk.evals.runs.create(evaluation.id, data_source=data_source(str(folder), inline(items)))
        assert len(loads) == 1
        template = folder / "chat_template.jinja"
        template.write_text(template.read_text().replace("tool_call>", "function_call>"))
        param, message = refusal(
            lambda: sdk.evals.runs.create(evaluation.id, data_source=data_source(str(folder), inline(items)))
        )
        assert param == "data_source.source.content[0]" and "writes tool calls in a form that is not parsed" in message
        assert len(loads) == 2


def test_schemas_and_items_too_deep_to_check_are_a_400_naming_them(sdk, tiny_model_dir):
    """jsonschema checks by recursion: a schema nested deeper than Python's stack allows is refused naming it, and
    one that refers to itself without end is refused naming the first item it cannot check."""
    nested = {}
    for _ in range(300):
        nested = {"anyOf": [nested]}
    param, message = refusal(
        lambda: sdk.evals.create(data_source_config={**CONFIG, "item_schema": nested}, testing_criteria=[ANY_ANSWER])
    )
    assert param == "data_source_config.item_schema" and "too deeply" in message

    looped = {**CONFIG, "item_schema": {"$ref": "#"}}
    evaluation = sdk.evals.create(data_source_config=looped, testing_criteria=[ANY_ANSWER])
    run = data_source(str(tiny_model_dir), inline())
    param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=run))
    assert param == "data_source.source.content[0]" and "refers to itself without end" in message


def test_an_items_file_of_more_items_than_a_run_takes_is_refused_once_its_count_is_passed(
    sdk, tiny_model_dir, monkeypatch
):
    """The file is read only until it holds one item more than a run takes: the lines after are not parsed (a
    file of up to the upload limit would otherwise be read whole into memory)."""
    from tuneforge.jobs import evals

    monkeypatch.setattr(evals, "MAX_RUN_ITEMS", 3)
    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
    lines = "".join(json.dumps({"item": ITEMS[0]}) + "\n" for _ in range(4)) + "not JSON\n"
    uploaded = sdk.files.create(file=("items.jsonl", lines.encode()), purpose="evals")
    run = data_source(str(tiny_model_dir), {"type": "file_id", "id": uploaded.id})
    param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=run))
    assert param == "data_source.source.id" and f"{uploaded.id} holds more than 3 items" in message


def test_items_nested_too_deeply_to_store_are_a_400_naming_the_item(sdk, tiny_model_dir):
    """An item's arrays and objects, one inside another, deeper than a run's data source can be stored: refused at
    runs.create naming the item, inline or in a file, or the sampling params' tool, rather than a server error."""
    evaluation = sdk.evals.create(
        data_source_config={**CONFIG, "item_schema": {"type": "object"}}, testing_criteria=[SAME_ANSWER]
    )
    deep = {**ITEMS[0], "context": json.loads("[" * 300 + "]" * 300)}
    lines = "".join(json.dumps({"item": item}) + "\n" for item in (ITEMS[0], deep))
    uploaded = sdk.files.create(file=("items.jsonl", lines.encode()), purpose="evals")
    for source, where in (
        (inline([ITEMS[0], deep]), "data_source.source.content[1]"),
        ({"type": "file_id", "id": uploaded.id}, f"{uploaded.id} item[1]"),
    ):
        run = data_source(str(tiny_model_dir), source)
        param, message = refusal(lambda run=run: sdk.evals.runs.create(evaluation.id, data_source=run))
        assert param == where and "nests arrays or objects" in message and "at most 64" in message
    tool = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "examples": deep["context"]}},
    }
    run = data_source(str(tiny_model_dir), inline(), tools=[tool])  # stored with the run as the items are
    param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=run))
    assert param == "data_source.sampling_params.tools[0]" and "the tool nests arrays or objects" in message
    shallow = {**ITEMS[0], "context": json.loads("[" * 62 + "]" * 62)}  # the item's object and 62 inside it
    assert sdk.evals.runs.create(evaluation.id, data_source=data_source(str(tiny_model_dir), inline([shallow])))


def test_an_items_file_line_longer_than_a_row_is_refused_unread_naming_the_line(sdk, tiny_model_dir):
    """A line is read only up to the data readers' MAX_ROW_BYTES: one JSON array of the upload limit would
    otherwise be parsed whole, to several times its size in memory."""
    from tuneforge.data.readers import MAX_ROW_BYTES

    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
    huge = b'{"item": {"question": [' + b"0," * (MAX_ROW_BYTES // 2) + b'0], "answer": "a"}}\n'
    uploaded = sdk.files.create(
        file=("items.jsonl", json.dumps({"item": ITEMS[0]}).encode() + b"\n" + huge), purpose="evals"
    )
    run = data_source(str(tiny_model_dir), {"type": "file_id", "id": uploaded.id})
    param, message = refusal(lambda: sdk.evals.runs.create(evaluation.id, data_source=run))
    assert param == "data_source.source.id" and f"{uploaded.id} line 2: it is over 2 MiB" in message, message


def test_an_items_file_saved_with_a_byte_order_mark_is_read_as_training_files_are(sdk, tiny_model_dir):
    """Editors on Windows start UTF-8 files with one; the data readers skip it, and so do a run's items."""
    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
    lines = "".join(json.dumps({"item": item}) + "\r\n" for item in ITEMS)
    uploaded = sdk.files.create(file=("items.jsonl", b"\xef\xbb\xbf" + lines.encode()), purpose="evals")
    run = sdk.evals.runs.create(
        evaluation.id, data_source=data_source(str(tiny_model_dir), {"type": "file_id", "id": uploaded.id})
    )
    assert run.status == "queued"


def test_deleting_a_file_a_queued_run_job_or_batch_reads_is_refused_naming_it_until_it_finishes(sdk, tiny_model_dir):
    """OpenAI's API reference says nothing of deleting a file a run, job or batch still reads: it is refused, a 409
    naming the run, job or batch, so it does not fail later for want of its file; once the run and the job are
    canceled their files go (a canceled batch keeps its file until a server ends its cancelling: none runs here)."""
    lines = "".join(json.dumps({"item": item}) + "\n" for item in ITEMS)
    items = sdk.files.create(file=("items.jsonl", lines.encode()), purpose="evals")
    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
    run = sdk.evals.runs.create(
        evaluation.id, data_source=data_source(str(tiny_model_dir), {"type": "file_id", "id": items.id})
    )
    train = upload(sdk, chat_rows(8))
    job = create_job(sdk, tiny_model_dir, train.id, n_epochs=1)
    request = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}
    requests = sdk.files.create(file=("requests.jsonl", (json.dumps(request) + "\n").encode()), purpose="batch")
    batch = sdk.batches.create(input_file_id=requests.id, endpoint="/v1/chat/completions", completion_window="24h")
    readers = ((items, run, "eval run"), (train, job, "fine-tuning job"), (requests, batch, "batch"))
    for file, reader, what in readers:
        with pytest.raises(openai.ConflictError) as caught:
            sdk.files.delete(file.id)
        error = caught.value.body
        assert (error["param"], error["code"]) == ("file_id", "file_in_use"), error
        assert f"{what} {reader.id}" in error["message"] and "cancel" in error["message"], error["message"]
        assert sdk.files.retrieve(file.id).id == file.id
    assert sdk.evals.runs.retrieve(run.id, eval_id=evaluation.id).status == "queued"
    sdk.evals.runs.cancel(run.id, eval_id=evaluation.id)
    sdk.fine_tuning.jobs.cancel(job.id)
    assert sdk.files.delete(items.id).deleted and sdk.files.delete(train.id).deleted


def test_a_run_whose_file_goes_as_it_starts_fails_saying_so_not_as_a_crash(tmp_path, tiny_model_dir, monkeypatch):
    """The file's bytes gone between the run's look-up of its file and its reading (a deletion racing the run's
    start): the run fails saying its file was deleted, not with an error id for a traceback."""
    from tuneforge.jobs import evals

    looked_up = Store.get_file

    def then_deleted(store, owner, file_id):  # the deletion's unlink lands just after the run's look-up
        row = looked_up(store, owner, file_id)
        (tmp_path / "home" / "files" / f"{file_id}.jsonl").unlink()
        return row

    lines = "".join(json.dumps({"item": item}) + "\n" for item in ITEMS)
    with restarted(tmp_path / "home", workers=0, allowed_models=[str(tiny_model_dir)]) as sdk:
        items = sdk.files.create(file=("items.jsonl", lines.encode()), purpose="evals")
        evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
        run = sdk.evals.runs.create(
            evaluation.id, data_source=data_source(str(tiny_model_dir), {"type": "file_id", "id": items.id})
        )
    monkeypatch.setattr(evals.Store, "get_file", then_deleted)
    with restarted(tmp_path / "home", workers=1, allowed_models=[str(tiny_model_dir)]) as sdk:
        run = wait_run(sdk, evaluation.id, run.id)
    assert (run.status, run.error.code) == ("failed", "file_not_found"), run.error
    assert run.error.message == f"The file {items.id} of this run has been deleted.", run.error


def test_a_run_whose_file_goes_as_it_is_created_is_refused_as_a_deleted_file(
    sdk, tmp_path, tiny_model_dir, monkeypatch
):
    """The file's bytes gone between the run's creation looking its file up and reading it (a deletion racing the
    request): the request is refused as one naming a deleted file is, a 400 naming it, not a 500."""
    looked_up = Store.get_file

    def then_deleted(store, owner, file_id):  # the deletion's unlink lands just after the look-up
        row = looked_up(store, owner, file_id)
        (tmp_path / "home" / "files" / f"{file_id}.jsonl").unlink()
        return row

    lines = "".join(json.dumps({"item": item}) + "\n" for item in ITEMS)
    items = sdk.files.create(file=("items.jsonl", lines.encode()), purpose="evals")
    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
    monkeypatch.setattr(Store, "get_file", then_deleted)
    source = data_source(str(tiny_model_dir), {"type": "file_id", "id": items.id})
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.evals.runs.create(evaluation.id, data_source=source)
    assert refused.value.body == {
        "message": f"No such File object: {items.id}",
        "type": "invalid_request_error",
        "param": "data_source.source.id",
        "code": "file_not_found",
    }
    assert sdk.evals.runs.list(evaluation.id).data == []


def test_a_misspelt_argument_in_a_run_s_source_is_told_the_name_it_meant(sdk, tiny_model_dir):
    """A run's source is one of two shapes told apart by its `type`: a misspelt argument is matched in that one."""
    evaluation = sdk.evals.create(data_source_config=CONFIG, testing_criteria=[SAME_ANSWER])
    typo = {**inline(), "contnet": []}
    param, message = refusal(
        lambda: sdk.evals.runs.create(evaluation.id, data_source=data_source(str(tiny_model_dir), typo))
    )
    assert "Unrecognized request argument" in message and "did you mean 'content'?" in message, (param, message)
