"""The jobs service in-process: which model names reach which weights, and a job that fails in a way
nobody foresaw. The apps run in this process (FastAPI's TestClient), so their state can be looked at."""

from __future__ import annotations

import io
import json
import time

import pytest
from fastapi.testclient import TestClient
from test_jobs import add_job, chat_rows
from test_serve import TOOLS, WEATHER, train_tool_caller
from tiny import save_tiny_model

from tuneforge.jobs.access import ModelAccess
from tuneforge.jobs.api import create_api
from tuneforge.jobs.files import FileStorage
from tuneforge.jobs.mapping import CreateJobBody
from tuneforge.jobs.store import Store
from tuneforge.jobs.worker import Workers
from tuneforge.serve.bodies import MAX_CHOICES
from tuneforge.web import owner_of

pytest.importorskip("sqlalchemy")
KEY, OTHER_KEY = "key-alice", "key-bob"
QUESTION = [{"role": "user", "content": "What is two plus two?"}]


def chat(http: TestClient, model: str, key: str = KEY):
    return http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": QUESTION, "max_tokens": 2},
        headers={"Authorization": f"Bearer {key}"},
    )


def test_one_model_under_several_names_loads_once_and_bases_are_bounded(tmp_path, tiny_model_dir):
    other = save_tiny_model(tmp_path / "other")
    same = [str(tiny_model_dir), f"{tiny_model_dir}/", f"{tiny_model_dir.parent}/./{tiny_model_dir.name}"]
    app = create_api(
        tmp_path / "home",
        Store(f"sqlite:///{tmp_path / 'jobs.db'}"),
        api_keys=[KEY],
        workers=0,
        allowed_models=[*same, str(other)],
        max_models=1,
    )
    with TestClient(app) as http:
        inference = app.state.service.inference
        for name in same:
            response = chat(http, name)
            assert response.status_code == 200 and response.json()["model"] == name  # the name asked for
        assert inference.loaded == [str(tiny_model_dir.resolve())]
        first = app.state.service.inference._served[str(tiny_model_dir.resolve())]
        assert chat(http, str(other)).status_code == 200
        assert inference.loaded == [str(other.resolve())]  # one base at most: the other one went
        assert not first.engine.stats()["alive"]


@pytest.mark.parametrize("prefix_cache_mb", [0, 1])
def test_the_inference_models_keep_the_prefix_cache_the_operator_sized(tmp_path, tiny_model_dir, prefix_cache_mb):
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    model = str(tiny_model_dir)
    app = create_api(
        tmp_path, store, api_keys=[KEY], workers=0, allowed_models=[model], prefix_cache_mb=prefix_cache_mb
    )
    with TestClient(app) as http:
        chat(http, model)
        again = chat(http, model).json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        cache = app.state.service.inference._served[str(tiny_model_dir.resolve())].engine.prefix_cache
    if prefix_cache_mb:  # the question asked again starts from its keys and values
        assert again > 0 and cache.max_bytes == 1 << 20
    else:
        assert again == 0 and cache is None


def _api_serving(tmp_path, model_dir):
    """A jobs service under tmp_path that trains nothing and serves `model_dir` to KEY."""
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    return create_api(tmp_path / "home", store, api_keys=[KEY], workers=0, allowed_models=[str(model_dir)])


def test_a_request_the_server_does_not_do_is_refused_before_its_model_loads(tmp_path, tiny_model_dir):
    app = _api_serving(tmp_path, tiny_model_dir)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    with TestClient(app) as http:
        for extra, param in (
            ({"tools": tools, "tool_choice": "required"}, "tool_choice"),
            ({"n": MAX_CHOICES + 1}, "n"),
        ):
            body = {"model": str(tiny_model_dir), "messages": QUESTION, "max_tokens": 2, **extra}
            response = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert response.status_code == 400 and response.json()["error"]["param"] == param
        assert app.state.service.inference.loaded == []


def test_a_chat_body_within_max_body_mb_reaches_the_model_whatever_its_characters(tmp_path, tiny_model_dir):
    # The host caps the body once (4 MiB by default); the serve app it hands the body to, re-encoded with
    # non-ASCII text escaped to six bytes a character, does not cap it again.
    app = _api_serving(tmp_path, tiny_model_dir)
    body = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "é " * 700_000}], "max_tokens": 2}
    assert len(json.dumps(body, ensure_ascii=False).encode()) < 4 << 20 < len(json.dumps(body).encode())
    with TestClient(app) as http:
        response = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_logprobs_asked_of_the_jobs_api_come_back_from_its_model(tmp_path, tiny_model_dir):
    app = _api_serving(tmp_path, tiny_model_dir)
    headers = {"Authorization": f"Bearer {KEY}"}
    chat = {
        "model": str(tiny_model_dir),
        "messages": QUESTION,
        "max_tokens": 3,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    completion = {"model": str(tiny_model_dir), "prompt": "Hi", "max_tokens": 3, "temperature": 0, "logprobs": 1}
    with TestClient(app) as http:
        [chat_choice] = http.post("/v1/chat/completions", json=chat, headers=headers).json()["choices"]
        [completion_choice] = http.post("/v1/completions", json=completion, headers=headers).json()["choices"]
    assert [len(entry["top_logprobs"]) for entry in chat_choice["logprobs"]["content"]] == [2, 2, 2]
    assert len(completion_choice["logprobs"]["token_logprobs"]) == 3


def test_a_tuned_models_tool_call_comes_back_through_the_jobs_api_as_tool_calls(tmp_path):
    model = str(train_tool_caller(tmp_path))
    app = create_api(
        tmp_path / "home", Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=[KEY], workers=0, allowed_models=[model]
    )
    body = {"model": model, "messages": WEATHER, "tools": TOOLS, "max_tokens": 60, "temperature": 0}
    with TestClient(app) as http:
        response = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    [choice] = response.json()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [call["function"]["name"] for call in choice["message"]["tool_calls"]] == ["get_weather"]


def test_registry_names_are_taken_in_any_case_and_kept_in_one(tmp_path):
    access = ModelAccess(Store(f"sqlite:///{tmp_path / 'jobs.db'}"), tmp_path / "runs")
    for name in ("smollm2-135m-instruct", "SMOLLM2-135M-INSTRUCT", "Smollm2-135m-Instruct"):
        assert access.for_training(owner_of(KEY), name) == ("smollm2-135m-instruct", "smollm2-135m-instruct")


def test_checkpoint_names_stay_inside_their_run_and_tell_nothing_of_the_disk(tmp_path, tiny_model_dir):
    root, store = tmp_path / "home", Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    alices, bobs = add_job(store, KEY, status="succeeded"), add_job(store, OTHER_KEY)
    (root / "runs" / alices.id / "final").mkdir(parents=True)
    (root / "runs" / bobs.id / "checkpoints" / "step-1").mkdir(parents=True)
    (root / "runs" / bobs.id / "checkpoints" / "step-2").symlink_to(root / "runs" / alices.id / "final")
    up = "/.." * 12
    names = [
        f"{bobs.fine_tuned_model}:ckpt-step-1/../../../{alices.id}/final",
        f"{bobs.fine_tuned_model}:ckpt-step-1{up}/etc",
        f"{bobs.fine_tuned_model}:ckpt-step-1{up}/no-such-folder",
        f"{bobs.fine_tuned_model}:ckpt-step-2",
        f"{bobs.fine_tuned_model}:ckpt-step-x",
        f"{bobs.fine_tuned_model}:ckpt-step-3",
        alices.fine_tuned_model,
        f"{alices.fine_tuned_model}:ckpt-step-1",
    ]
    with TestClient(create_api(root, store, api_keys=[KEY, OTHER_KEY], workers=0)) as http:
        for name in names:
            response = chat(http, name, OTHER_KEY)
            assert response.status_code == 404, (name, response.text)
            assert response.json()["error"]["message"] == (
                f"The model `{name}` does not exist or you do not have access to it."
            )


def _store_with_upload(tmp_path):
    """A job store and file storage under tmp_path, holding KEY's upload of an 8-row chat training file."""
    root, store = tmp_path / "home", Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    storage = FileStorage(root)
    upload = storage.save(
        io.BytesIO(chat_rows(8).encode()),
        owner=owner_of(KEY),
        filename="train.jsonl",
        purpose="fine-tune",
        max_bytes=1 << 20,
    )
    store.add(upload)
    return root, store, storage, upload


def test_a_job_that_fails_unforeseen_fails_alone(tmp_path, tiny_model_dir):
    """A job the worker cannot handle (here its method is malformed) fails with an error id; the next is checked."""
    root, store, storage, upload = _store_with_upload(tmp_path)
    broken = add_job(
        store,
        KEY,
        model=str(tiny_model_dir),
        training_file=upload.id,
        status="validating_files",
        method={"type": "supervised"},
    )
    good = add_job(
        store,
        KEY,
        model=str(tiny_model_dir),
        training_file=upload.id,
        status="validating_files",
        method=CreateJobBody(model="m", training_file="f").method_dict(),
    )
    workers = Workers(store, storage, root, 1, poll_s=0.05)
    workers.start()
    try:
        deadline = time.monotonic() + 60
        while store.get_job(good.id).status == "validating_files":
            assert time.monotonic() < deadline, store.get_job(broken.id).status
            time.sleep(0.1)
    finally:
        workers.stop()
    failed = store.get_job(broken.id)
    assert failed.status == "failed" and failed.error["code"] == "internal_error"
    assert "error id err_" in failed.error["message"] and "Traceback" not in failed.error["message"]


def test_an_empty_suffix_names_the_model_as_no_suffix_does(tmp_path, tiny_model_dir):
    root, store, _, upload = _store_with_upload(tmp_path)
    headers = {"Authorization": f"Bearer {KEY}"}
    prefix = f"ft:{tiny_model_dir.name}:tuneforge:"
    with TestClient(create_api(root, store, api_keys=[KEY], workers=0, allowed_models=[str(tiny_model_dir)])) as http:
        for suffix, name_part in ((None, ""), ("", ""), ("triage", "triage")):
            body = {"model": str(tiny_model_dir), "training_file": upload.id}
            if suffix is not None:
                body["suffix"] = suffix
            response = http.post("/v1/fine_tuning/jobs", json=body, headers=headers)
            assert response.status_code == 200, response.text
            job = store.get_job(response.json()["id"])
            assert job.fine_tuned_model.startswith(f"{prefix}{name_part}:"), job.fine_tuned_model
            assert len(job.fine_tuned_model) == len(prefix) + len(name_part) + 9
            assert response.json()["user_provided_suffix"] == (suffix or None)
        refused = http.post("/v1/fine_tuning/jobs", json={**body, "suffix": "a:b"}, headers=headers)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "suffix"
        assert "'a:b'" in refused.json()["error"]["message"]


def test_jobs_with_a_tuneforge_chat_template_load_the_base_models_tokenizer_once(tmp_path, tiny_model_dir, monkeypatch):
    """Each job's template is rendered on the training file's first rows when it is created; the tokenizer it
    renders with is loaded once per model and template, not on every request."""
    from test_jobs import BRACKETS_TEMPLATE

    from tuneforge.models import loading

    loads = []
    raw_tokenizer = loading._raw_tokenizer
    monkeypatch.setattr(loading, "_raw_tokenizer", lambda source: loads.append(source) or raw_tokenizer(source))
    root, store, _, upload = _store_with_upload(tmp_path)
    headers = {"Authorization": f"Bearer {KEY}"}
    fails = "{% for m in messages %}{{ m.content }}{% endfor %}\n{{ raise_exception('unrenderable') }}"
    with TestClient(create_api(root, store, api_keys=[KEY], workers=0, allowed_models=[str(tiny_model_dir)])) as http:
        for template, status in ((BRACKETS_TEMPLATE, 200), (BRACKETS_TEMPLATE, 200), (fails, 400), (fails, 400)):
            hyperparameters = {"tuneforge_chat_template": template}
            body = {"model": str(tiny_model_dir), "training_file": upload.id, "hyperparameters": hyperparameters}
            response = http.post("/v1/fine_tuning/jobs", json=body, headers=headers)
            assert response.status_code == status, response.text
    assert len(loads) == 2  # one per template
    error = response.json()["error"]  # the cached tokenizer's rendering still refuses the template
    assert error["param"] == "method.supervised.hyperparameters.tuneforge_chat_template"
    assert "at its line 2" in error["message"] and "unrenderable" in error["message"], error


def test_every_checkpoint_reports_its_validation_and_the_last_one_its_full_validation(tmp_path):
    """The final checkpoint is saved before the full validation is written; its row takes it when it comes.
    Every validation is over the whole file, so each checkpoint's is its full validation too."""
    from tuneforge.jobs.worker import RunProgress
    from tuneforge.training.checkpoint import STATE

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    job = add_job(store, KEY, status="running", total_steps=4, step=0)
    run_dir = tmp_path / "run"
    lines = [
        {"step": 2, "train_loss": 2.5, "train_mean_token_accuracy": 0.5, "valid_loss": 2.4, "tokens": 20},
        {"step": 4, "train_loss": 2.1, "train_mean_token_accuracy": 0.6, "tokens": 40},
    ]
    for step in (2, 4):
        (run_dir / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"step-{step}" / STATE).write_text("{}")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    progress = RunProgress(store, job, run_dir)
    progress.update()
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write(json.dumps({"step": 4, "full_valid_loss": 2.0, "full_valid_mean_token_accuracy": 0.7}) + "\n")
    progress.update()
    with TestClient(create_api(tmp_path / "home", store, api_keys=[KEY], workers=0)) as http:
        listed = http.get(f"/v1/fine_tuning/jobs/{job.id}/checkpoints", headers={"Authorization": f"Bearer {KEY}"})
    last, first = (checkpoint["metrics"] for checkpoint in listed.json()["data"])
    assert first == {
        "step": 2,
        "train_loss": 2.5,
        "train_mean_token_accuracy": 0.5,
        "valid_loss": 2.4,
        "full_valid_loss": 2.4,
    }
    assert last == {
        "step": 4,
        "train_loss": 2.1,
        "train_mean_token_accuracy": 0.6,
        "valid_loss": 2.0,
        "valid_mean_token_accuracy": 0.7,
        "full_valid_loss": 2.0,
        "full_valid_mean_token_accuracy": 0.7,
    }


def test_trained_tokens_are_shown_once_a_job_has_finished(tmp_path):
    """As OpenAI's: null while the job has not finished (its metrics events show its progress)."""
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    shown = {}
    with TestClient(create_api(tmp_path / "home", store, api_keys=[KEY], workers=0)) as http:
        for status in ("queued", "running", "paused", "succeeded", "cancelled"):
            job = add_job(store, KEY, status=status, trained_tokens=120)
            response = http.get(f"/v1/fine_tuning/jobs/{job.id}", headers={"Authorization": f"Bearer {KEY}"})
            shown[status] = response.json()["trained_tokens"]
    assert shown == {"queued": None, "running": None, "paused": None, "succeeded": 120, "cancelled": 120}
