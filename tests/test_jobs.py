"""The fine-tuning jobs service end to end, through the official OpenAI SDK against a real `tuneforge api`.

Each server is a real process (`python -m tuneforge api`) with its own TUNEFORGE_HOME, training the
tiny random Llama in seconds. PostgreSQL tests start a throwaway cluster with initdb/pg_ctl.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import announced_port, pulled_as
from tiny import set_context

openai = pytest.importorskip("openai")
pytest.importorskip("sqlalchemy")

KEY, OTHER_KEY = "key-alice", "key-bob"
SERVER_START_S = 120
JOB_TIMEOUT_S = 120
SERVER_NUMBERS = itertools.count()


class ApiServer:
    """`tuneforge api --port 0` in a child process; `kill()` is SIGKILL, as a crash would be."""

    def __init__(self, home: Path, *, allowed: list[Path], db: str | None = None, workers: int = 1):
        self.home, self.db, self.workers, self.allowed = home, db, workers, allowed
        self.log_path = home / f"server-{next(SERVER_NUMBERS)}.log"
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ApiServer:
        """Launch the server; `client()` waits until it answers (so tests can prepare meanwhile)."""
        args = [
            sys.executable,
            "-m",
            "tuneforge",
            "api",
            "--port",
            "0",
            "--workers",
            str(self.workers),
            "--api-key",
            KEY,
            "--api-key",
            OTHER_KEY,
            "--max-upload-mb",
            "1",
        ]
        for model in self.allowed:
            args += ["--allow-model", str(model)]
        if self.db:
            args += ["--db", self.db]
        env = {**os.environ, "TUNEFORGE_HOME": str(self.home), "OMP_NUM_THREADS": "1"}
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.ready = False
        return self

    def wait_ready(self) -> None:
        if self.ready:
            return
        deadline = time.monotonic() + SERVER_START_S
        self.port = announced_port(self.log_path, self.process, SERVER_START_S, after=self.log_start)
        while not self.ready:
            assert self.process.poll() is None, f"the server exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"the server did not start within {SERVER_START_S} s:\n{self.log()}"
            try:
                self.ready = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.3)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def client(self, key: str = KEY):
        self.wait_ready()
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=60)

    def store(self):
        """The server's job store, to read what the API does not show."""
        from tuneforge.database import database_url
        from tuneforge.jobs.store import Store

        return Store(database_url(self.db) if self.db else f"sqlite:///{self.home / 'jobs' / 'jobs.db'}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def add_job(store, key: str, **values):
    """A job row of `key`'s owner, put straight into the store (the server's state at some moment)."""
    from tuneforge.jobs.store import Job, new_id, now
    from tuneforge.web import owner_of

    job = Job(
        **{
            "id": new_id("ftjob-"),
            "owner": owner_of(key),
            "model": "m",
            "training_file": "file-x",
            "seed": 1,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {}}},
            "status": "failed",
            "created_at": now(),
            "result_files": [],
            "fine_tuned_model": f"ft:m:tuneforge::{new_id('', 8)}",
            **values,
        }
    )
    store.add(job)
    return job


def validated_job(tmp_path, model: str, method: dict, rows: str | None = None, **values):
    """A job on uploaded `rows` (4 chat rows by default), validated by a worker as it takes a job: (the store, the
    job)."""
    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Store
    from tuneforge.jobs.worker import Workers

    store, storage = Store(f"sqlite:///{tmp_path / 'jobs.db'}"), FileStorage(tmp_path)
    upload = storage.save(
        io.BytesIO((rows or chat_rows(4)).encode()),
        owner="o",
        filename="t.jsonl",
        purpose="fine-tune",
        max_bytes=1 << 20,
    )
    store.add(upload)
    job = add_job(
        store,
        KEY,
        owner="o",
        model=model,
        training_file=upload.id,
        status="validating_files",
        worker_id="w",
        method=method,
        **values,
    )
    Workers(store, storage, tmp_path, 0)._validate(job, "w")
    return store, job


def chat_rows(n: int, start: int = 0) -> str:
    questions = [
        "What is two plus two?",
        "How do I reset my password?",
        "My database is down, help!",
        "Hello, how are you today?",
    ]
    answers = ["The answer is four.", "Open the web console.", "Production is affected; we help.", "I am fine."]
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"{questions[i % 4]} ({i})"},
                {"role": "assistant", "content": f"{answers[i % 4]} {i}"},
            ]
        }
        for i in range(start, start + n)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows)


def upload(client, text: str, name: str = "train.jsonl"):
    return client.files.create(file=(name, text.encode(), "application/jsonl"), purpose="fine-tune")


def wait_for(client, job_id: str, statuses: set[str], timeout: float = JOB_TIMEOUT_S, server: ApiServer | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    events = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=50)]
    raise AssertionError(
        f"{job_id} is {job.status}, not {statuses}; events: {events}\n{server.log() if server else ''}"
    )


def all_events(client, job_id: str) -> list:
    return list(client.fine_tuning.jobs.list_events(job_id, limit=100))  # the SDK pages through every one


def create_job(client, model_dir: Path, train_id: str, *, n_epochs: int, suffix: str | None = None, **extra):
    return client.fine_tuning.jobs.create(
        model=str(model_dir),
        training_file=train_id,
        suffix=suffix,
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": n_epochs, "batch_size": 4}}},
        **extra,
    )


def sdk_flow(server: ApiServer, model_dir: Path) -> None:
    """Upload, create, poll to success, events, checkpoints, results, chat; then pause, resume and cancel another."""
    client = server.client()
    train = upload(client, chat_rows(12))
    valid = upload(client, chat_rows(4, start=100), name="valid.jsonl")
    assert train.purpose == "fine-tune" and train.bytes == len(chat_rows(12).encode())
    assert client.files.content(train.id).read() == chat_rows(12).encode()

    job = create_job(
        client, model_dir, train.id, n_epochs=2, suffix="triage", validation_file=valid.id, metadata={"team": "support"}
    )
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 2
    job = wait_for(client, job.id, {"succeeded", "failed", "cancelled"}, server=server)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith(f"ft:{model_dir.name}:tuneforge:triage:")
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.seed == 7
    assert job.method.supervised.hyperparameters.batch_size == 4

    events = all_events(client, job.id)
    metrics = [e for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert [e.data["step"] for e in reversed(metrics)] == [1, 2, 3, 4, 5, 6]  # 12 rows / 4 a step, 2 epochs
    assert all(e.data["total_steps"] == 6 for e in metrics)
    assert any(e.type == "metrics" and "full_valid_loss" in e.data for e in events)
    assert "The job has successfully completed." in [e.message for e in events]

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in checkpoints] == [6, 3]  # the end of each epoch, newest first
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-6"
    assert checkpoints[0].metrics.train_loss > 0 and checkpoints[1].metrics.valid_loss > 0

    [results_id] = job.result_files
    assert client.files.retrieve(results_id).purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(client.files.content(results_id).text)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6] and float(rows[-1]["full_valid_loss"]) > 0

    listed = client.fine_tuning.jobs.list(metadata={"team": "support"})
    assert [j.id for j in listed.data] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "sales"}).data == []

    for model in (job.fine_tuned_model, checkpoints[1].fine_tuned_model_checkpoint, str(model_dir)):
        reply = client.chat.completions.create(
            model=model, max_tokens=5, messages=[{"role": "user", "content": "What is two plus two?"}]
        )
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1
    response = client.responses.create(model=job.fine_tuned_model, input="What is two plus two?", max_output_tokens=5)
    assert response.model == job.fine_tuned_model and response.usage.output_tokens >= 1
    listed = [m.id for m in client.models.list()]
    assert job.fine_tuned_model in listed and "smollm2-135m-instruct" in listed
    # What the key can use, it can look up; another key gets for its models what a missing name gets.
    checkpoint_name = checkpoints[1].fine_tuned_model_checkpoint
    for name in (job.fine_tuned_model, checkpoint_name, "SmolLM2-135M-Instruct"):
        assert client.models.retrieve(name).id in (name, name.lower())
    for name in (job.fine_tuned_model, checkpoint_name, "ft:no-such-model"):
        with pytest.raises(openai.NotFoundError) as caught:
            server.client(OTHER_KEY).models.retrieve(name)
        assert caught.value.body["message"] == f"The model `{name}` does not exist or you do not have access to it."

    # A long job: pause it (checkpoint and stop), resume it (from the checkpoint), cancel it.
    long_job = create_job(client, model_dir, train.id, n_epochs=50)
    wait_for(client, long_job.id, {"running"}, server=server)
    while not any(e.type == "metrics" for e in all_events(client, long_job.id)):
        time.sleep(0.2)
    # Like OpenAI's, a job not yet finished shows no trained tokens; its metrics events show its progress.
    assert client.fine_tuning.jobs.retrieve(long_job.id).trained_tokens is None
    client.fine_tuning.jobs.pause(long_job.id)
    paused = wait_for(client, long_job.id, {"paused"}, server=server)
    assert paused.trained_tokens is None
    # Its figures are those of the step it stopped at, which the resumed run goes on from.
    run_records = server.home / "jobs" / "runs" / long_job.id / "metrics.jsonl"
    tokens_by_step = {
        r["step"]: r["tokens"] for r in map(json.loads, run_records.read_text().splitlines()) if "tokens" in r
    }
    assert server.store().get_job(long_job.id).trained_tokens == tokens_by_step[max(tokens_by_step)] > 0
    client.fine_tuning.jobs.resume(long_job.id)
    wait_for(client, long_job.id, {"running"}, server=server)
    cancelled = client.fine_tuning.jobs.cancel(long_job.id)
    assert cancelled.status == "cancelled"
    deadline = time.monotonic() + 60
    while not any(e.message.startswith("Job cancelled at step") for e in all_events(client, long_job.id)):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.3)
    messages = [e.message for e in all_events(client, long_job.id)]
    assert any(m.startswith("Job paused at step") for m in messages)
    assert f"Job resumed: queued to continue from step {max(tokens_by_step)}." in messages
    assert any(m.startswith("Resuming fine-tuning from checkpoint step-") for m in messages)
    job_after = client.fine_tuning.jobs.retrieve(long_job.id)
    assert job_after.status == "cancelled" and job_after.fine_tuned_model is None
    assert job_after.trained_tokens < job.trained_tokens * 25  # stopped well before its 50 epochs
    # Its figures are those of the checkpoint it kept, the steps run after the cancel included.
    [stopped] = [m for m in messages if m.startswith("Job cancelled at step")]
    step = int(stopped.removeprefix("Job cancelled at step ").split(";")[0])
    assert f"checkpoint step-{step} is kept" in stopped
    metrics = [e for e in all_events(client, long_job.id) if e.type == "metrics"]
    assert max(e.data["step"] for e in metrics) == step
    reported = [e.data["step"] for e in metrics if "train_loss" in e.data]
    assert len(reported) == len(set(reported))  # each step once, across the pause
    rows = (server.home / "jobs" / "runs" / long_job.id / "metrics.jsonl").read_text().splitlines()
    assert job_after.trained_tokens == max(json.loads(r)["tokens"] for r in rows if '"tokens"' in r)


# ---- SQLite: one server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unloadable_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with weights that cannot be read: its files validate, its training fails."""
    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("unloadable") / "model")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, unloadable_model_dir):
    api = ApiServer(tmp_path_factory.mktemp("jobs-home"), allowed=[tiny_model_dir, unloadable_model_dir]).start()
    yield api
    api.stop()


def test_sdk_end_to_end_on_sqlite(server, tiny_model_dir):
    sdk_flow(server, tiny_model_dir)


def test_bad_requests_are_400s_naming_the_parameter(server, tiny_model_dir):
    client = server.client()
    train = upload(client, chat_rows(8))

    def refused(param: str, **kwargs):
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(**{"model": str(tiny_model_dir), "training_file": train.id, **kwargs})
        assert caught.value.param == param, caught.value.body
        return caught.value

    assert "not available" in refused("model", model="no-such-model-anywhere").message
    refused("training_file", training_file="")
    refused("validation_file", validation_file=train.id)
    refused("validation_file", validation_file="")
    epochs = refused(
        "method.supervised.hyperparameters.n_epochs",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
    )
    assert epochs.body["message"] == (
        "Invalid value for 'method.supervised.hyperparameters.n_epochs': must be 'auto' or an integer of at least 1 "
        "and at most 50 (got 0)"
    )
    refused(
        "method.supervised.hyperparameters.learning_rate_multiplier",
        method={"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": "high"}}},
    )
    refused("hyperparameters.batch_size", hyperparameters={"batch_size": -1})
    refused("suffix", suffix="x" * 65)
    # A page goes on after an object of the same list; any other cursor is refused, not an empty "end".
    other = upload(client, chat_rows(2))
    first_page = client.files.list(limit=1)
    assert [f.id for f in first_page.data] == [other.id] and first_page.has_more
    assert train.id in [f.id for f in client.files.list(after=other.id).data]
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.list(after="file-not-in-this-list")
    assert caught.value.param == "after" and "file-not-in-this-list" in caught.value.message
    refused("training_file", training_file="file-missing")
    refused("hyperparameters", hyperparameters={"n_epochs": 1}, method={"type": "supervised"})
    assert "Unrecognized" in refused("learning_rate", extra_body={"learning_rate": 0.1}).message
    # A misspelt hyperparameter is told the name it most likely meant.
    epochs = {"type": "supervised", "supervised": {"hyperparameters": {"epochs": 3}}}
    assert "did you mean 'n_epochs'?" in refused("method.supervised.hyperparameters.epochs", method=epochs).message
    # Inside a list's item too (pydantic names the item by its index, a number).
    typo = [{"type": "wandb", "wandb": {"project": "triage", "entitty": "me"}}]
    assert "did you mean 'entity'?" in refused("integrations.0.wandb.entitty", integrations=typo).message
    wandb = [{"type": "wandb", "wandb": {"project": "triage"}}]
    if importlib.util.find_spec("wandb") is None:  # the server runs on this interpreter
        assert "pip install 'tuneforge[wandb]'" in refused("integrations", integrations=wandb).message
    refused("integrations.0.wandb.project", integrations=[{"type": "wandb", "wandb": {"project": ""}}])
    refused("integrations.0.type", integrations=[{"type": "comet", "wandb": {"project": "triage"}}])
    none = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id, integrations=[])
    assert none.integrations == []
    client.fine_tuning.jobs.cancel(none.id)

    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("notes.txt", b"hello", "text/plain"), purpose="fine-tune")
    assert caught.value.param == "file"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("a.jsonl", b"{}\n", "application/jsonl"), purpose="assistants")
    assert caught.value.param == "purpose"
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", b"x" * ((1 << 20) + 1), "application/jsonl"), purpose="fine-tune")
    assert caught.value.status_code == 413 and caught.value.param == "file"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("empty.jsonl", b"", "application/jsonl"), purpose="fine-tune")
    assert caught.value.param == "file" and "'empty.jsonl' is empty" in caught.value.message
    assert "empty.jsonl" not in [f.filename for f in client.files.list()]
    for name_chars in (300, 5000):  # one under python-multipart's header limit, one past it
        with pytest.raises(openai.BadRequestError) as caught:
            client.files.create(file=("a" * name_chars + ".jsonl", b"{}\n", "application/jsonl"), purpose="fine-tune")
        assert caught.value.param == "file" and "at most 255 characters" in caught.value.message, caught.value.message


ANSWER_GRADER = {
    "type": "string_check",
    "name": "answer",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.reference }}",
    "operation": "eq",
}


def test_a_reinforcement_job_trains_with_its_grader_and_reports_rewards(server, tiny_model_dir):
    client = server.client()
    train = upload(client, chat_rows(8))
    hyperparameters = {"n_epochs": 1, "batch_size": 4, "compute_multiplier": 0.5, "eval_interval": 1}
    method = {"type": "reinforcement", "reinforcement": {"grader": ANSWER_GRADER, "hyperparameters": hyperparameters}}
    valid = upload(client, chat_rows(3))
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=train.id, validation_file=valid.id, seed=3, method=method
    )
    assert job.method.type == "reinforcement"
    job = wait_for(client, job.id, {"succeeded", "failed"}, server=server)
    assert job.status == "succeeded", job.error
    reinforcement = job.method.reinforcement
    assert reinforcement.grader.name == "answer"
    assert reinforcement.hyperparameters.compute_multiplier == 0.5  # 2 answers a prompt, half the default 4
    assert (reinforcement.hyperparameters.eval_interval, reinforcement.hyperparameters.eval_samples) == (1, 1)
    events = [e for e in all_events(client, job.id) if e.type == "metrics" and "reward" in (e.data or {})]
    metrics = [e.data for e in events]
    assert len(metrics) == 2  # 8 prompts, 4 a step
    for data in metrics:
        assert {"reward", "reward_std", "reward/answer", "reward_std/answer", "kl", "completion_length"} <= set(data)
        assert {"clipped_share", "train_loss"} <= set(data)
    for step_event in events:  # told by its reward, not by a loss that is near 0 whatever the answers
        data = step_event.data
        shown = f"reward={data['reward']:.4f} (std {data['reward_std']:.4f}), kl={data['kl']:.4f}"
        assert step_event.message.startswith(f"Step {data['step']}/2: {shown}"), step_event.message
        assert "training loss" not in step_event.message
    (first,) = [data for data in metrics if data["step"] == 1]  # eval_interval 1: validated before the last step
    assert "valid_reward" in first and "valid_reward/answer" in first
    # The validation prompts' greedy answers, graded at the end.
    (full,) = [e for e in all_events(client, job.id) if e.message.startswith("Full validation")]
    assert full.message.startswith("Full validation reward=") and 0 <= full.data["full_valid_reward"] <= 1
    assert "full_valid_reward/answer" in full.data
    rows = list(csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).text)))
    assert [row["reward"] != "" and row["clipped_share"] != "" for row in rows] == [True, True]
    reply = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content is not None


def test_reinforcement_jobs_refuse_bad_graders_and_options_when_created(server, tiny_model_dir):
    client = server.client()
    train = upload(client, chat_rows(8))

    def refused(reinforcement: dict) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(
                model=str(tiny_model_dir),
                training_file=train.id,
                method={"type": "reinforcement", "reinforcement": reinforcement},
            )
        return caught.value

    error = refused({"grader": {**ANSWER_GRADER, "operation": "sounds_like"}})
    assert error.param == "method.reinforcement.grader" and "operation" in error.message
    error = refused({"grader": {"type": "score_model", "name": "judge"}})
    assert "judge model" in error.message
    python = {"type": "python", "name": "mine", "source": "def grade(sample, item):\n    return 1.0\n"}
    error = refused({"grader": python})
    assert error.code == "python_grader_not_allowed" and "--allow-python-graders" in error.message
    error = refused({"grader": ANSWER_GRADER, "hyperparameters": {"reasoning_effort": "high"}})
    assert "reasoning_effort" in error.message
    error = refused({"grader": ANSWER_GRADER, "hyperparameters": {"eval_samples": 4}})
    assert "one greedy answer" in error.message
    error = refused({"grader": ANSWER_GRADER, "hyperparameters": {"eval_interval": 1}})  # and no validation_file
    assert "eval_interval" in error.message and "no validation_file" in error.message
    assert "method.reinforcement" in refused({}).param


def nested_multi(grader: dict, depth: int) -> dict:
    """`grader` inside `depth` multi graders, one inside the next."""
    for level in range(depth):
        grader = {"type": "multi", "name": f"level{level}", "graders": {"inner": grader}, "calculate_output": "inner"}
    return grader


def test_a_multi_grader_nested_past_the_apis_depth_is_refused_when_the_job_is_created(server, tiny_model_dir):
    """Each multi level nests two objects (the grader and its `graders`); a job's grader nested deeper than
    MAX_NESTING is refused naming it, as the API's other free-form JSON is."""
    from tuneforge.web import MAX_NESTING

    client = server.client()
    train = upload(client, chat_rows(8))
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(
            model=str(tiny_model_dir),
            training_file=train.id,
            method={"type": "reinforcement", "reinforcement": {"grader": nested_multi(ANSWER_GRADER, 200)}},
        )
    assert caught.value.param == "method.reinforcement.grader", caught.value
    assert f"at most {MAX_NESTING}" in caught.value.message
    deepest = nested_multi(ANSWER_GRADER, (MAX_NESTING - 1) // 2)
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=train.id,
        method={"type": "reinforcement", "reinforcement": {"grader": deepest}},
    )
    client.fine_tuning.jobs.cancel(job.id)


def test_openai_hyperparameters_map_onto_the_config(tmp_path):
    from tuneforge.jobs.mapping import CreateJobBody, resolved_method, training_config

    body = CreateJobBody(model="m", training_file="file-1", hyperparameters={"learning_rate_multiplier": 0.5})
    config = training_config("m", body.method_dict(), 3, tmp_path / "t.jsonl", None, tmp_path / "run", n_examples=20)
    assert (config.method, config.train.batch_size, config.train.epochs, config.train.seed) == ("lora", 8, 5, 3)
    assert config.train.learning_rate == pytest.approx(1e-4) and not config.data.packing
    assert config.train.save_every == 3 and config.data.validation is None  # a checkpoint an epoch: 20 // 8 steps
    method = resolved_method(body.method_dict(), config)
    assert method["supervised"]["hyperparameters"] == {"batch_size": 8, "learning_rate_multiplier": 0.5, "n_epochs": 5}
    small = CreateJobBody(model="m", training_file="file-1", hyperparameters={"learning_rate_multiplier": 3e-9})
    config = training_config("m", small.method_dict(), 3, tmp_path / "t.jsonl", None, tmp_path / "run", n_examples=20)
    reported = resolved_method(small.method_dict(), config)["supervised"]["hyperparameters"]
    assert reported["learning_rate_multiplier"] == 3e-9  # as given, not rounded to 0
    dpo = CreateJobBody(
        model="m",
        training_file="file-1",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}},
    )
    config = training_config("m", dpo.method_dict(), 3, tmp_path / "t.jsonl", None, tmp_path / "run", n_examples=4)
    assert (config.method, config.dpo.beta, config.train.batch_size, config.train.epochs) == ("dpo", 0.2, 4, 2)


@pytest.mark.parametrize(
    ("name", "value"),
    [("batch_size", float("inf")), ("n_epochs", float("nan")), ("learning_rate_multiplier", float("nan"))],
)
def test_hyperparameters_that_are_not_finite_numbers_are_refused_naming_them(name, value):
    # Python's JSON reader takes NaN, Infinity and 1e400 (infinity): the body's check refuses them as it does 0.
    from pydantic import ValidationError

    from tuneforge.jobs.mapping import CreateJobBody

    method = {"type": "supervised", "supervised": {"hyperparameters": {name: value}}}
    with pytest.raises(ValidationError) as caught:
        CreateJobBody(model="m", training_file="file-1", method=method)
    [error] = caught.value.errors()
    assert error["loc"] == ("method", "supervised", "hyperparameters", name)
    # Said as a number out of range is: "must be 'auto' or an integer ... (got 0)".
    assert "must be 'auto' or " in error["msg"] and error["msg"].endswith(f" (got {value!r})")


def test_a_learning_rate_multiplier_that_makes_a_learning_rate_of_0_is_refused_naming_it():
    from pydantic import ValidationError

    from tuneforge.jobs.mapping import CreateJobBody

    method = {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 1e-320}}}
    with pytest.raises(ValidationError) as caught:
        CreateJobBody(model="m", training_file="file-1", method=method)
    [error] = caught.value.errors()
    assert error["loc"][-1] == "learning_rate_multiplier" and "is 0 as a floating-point number" in error["msg"]


def test_tuneforge_processes_splits_each_batch_between_that_many_processes(tmp_path):
    from tuneforge.errors import ConfigError
    from tuneforge.jobs.mapping import CreateJobBody, processes, resolved_method, training_config

    def config(**hyperparameters):
        body = CreateJobBody(model="m", training_file="file-1", hyperparameters=hyperparameters)
        method = body.method_dict()
        return method, training_config("m", method, 3, tmp_path / "t.jsonl", None, tmp_path / "run", n_examples=20)

    method, plain = config()
    assert processes(method) == 1 and "tuneforge_processes" not in method["supervised"]["hyperparameters"]
    method, three = config(tuneforge_processes=3)
    assert processes(method) == 3 and three.train.batch_size == 6  # 'auto' (8), a multiple of 3
    assert three.train.save_every == 3  # a checkpoint an epoch: 20 // 6 steps
    assert resolved_method(method, three)["supervised"]["hyperparameters"]["tuneforge_processes"] == 3
    with pytest.raises(ConfigError, match="batch_size 5 is not a multiple of tuneforge_processes 2"):
        config(tuneforge_processes=2, batch_size=5)


def test_a_job_with_tuneforge_processes_trains_on_that_many_processes(server, tiny_model_dir):
    client = server.client()
    train_file = upload(client, chat_rows(12))
    refused = {"n_epochs": 1, "batch_size": 3, "tuneforge_processes": 2}
    with pytest.raises(openai.BadRequestError, match="not a multiple of tuneforge_processes"):
        client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train_file.id, hyperparameters=refused)
    hyperparameters = {"n_epochs": 1, "batch_size": 4, "tuneforge_processes": 2}
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir),
        training_file=train_file.id,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
    )
    job = wait_for(client, job.id, {"succeeded", "failed", "cancelled"}, server=server)
    assert job.status == "succeeded", job.error
    assert job.method.supervised.hyperparameters.model_extra["tuneforge_processes"] == 2
    last = server.home / "jobs" / "runs" / job.id / "checkpoints" / "step-3"
    assert sorted(p.name for p in last.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]  # one per process


BRACKETS_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}]\n{{ m.content }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]\n{% endif %}"
)


@pytest.mark.parametrize("kind", ["supervised", "dpo"])
@pytest.mark.parametrize(
    "template, said",
    [
        ("chatml", "Jinja text itself"),
        ("/etc/hostname", "Jinja text itself"),
        ("templates/turns.jinja", "Jinja text itself"),
        ("{% for m in messages %}{{ m.content }}", "does not compile at its line 1"),
        ("{{ bos_token }}\n{% for %}", "does not compile at its line 2"),
        ("{{ " + "[" * 300 + "]" * 300 + " }}", "does not compile: it nests more deeply than Jinja's compiler reads"),
    ],
)
def test_a_tuneforge_chat_template_is_refused_when_the_job_is_created_unless_it_is_jinja_text_that_compiles(
    kind, template, said
):
    """Never a name or a server file; Jinja's syntax is checked as transformers compiles a template, so the job is
    not queued to fail."""
    from pydantic import ValidationError

    from tuneforge.jobs.mapping import CreateJobBody

    method = {"type": kind, kind: {"hyperparameters": {"tuneforge_chat_template": template}}}
    with pytest.raises(ValidationError) as caught:
        CreateJobBody(model="m", training_file="file-1", method=method)
    [error] = caught.value.errors()
    assert error["loc"] == ("method", kind, "hyperparameters", "tuneforge_chat_template")
    assert said in error["msg"], error["msg"]


@pytest.mark.parametrize(
    "template",
    [BRACKETS_TEMPLATE, "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"],
)
def test_a_tuneforge_chat_template_is_the_runs_chat_template(tmp_path, template):
    from tuneforge.jobs.mapping import CreateJobBody, training_config

    body = CreateJobBody(model="m", training_file="file-1", hyperparameters={"tuneforge_chat_template": template})
    config = training_config("m", body.method_dict(), 3, tmp_path / "t.jsonl", None, tmp_path / "run")
    assert config.model.chat_template == template


@pytest.mark.parametrize("kind", ["supervised", "dpo"])
def test_a_tuneforge_chat_template_training_refuses_is_named_by_the_jobs_field(tmp_path, tiny_model_dir, kind):
    from tuneforge.errors import ConfigError
    from tuneforge.jobs.mapping import CreateJobBody, training_config
    from tuneforge.methods import check_inputs
    from tuneforge.models import resolve
    from tuneforge.models.loading import run_tokenizer

    field = f"method.{kind}.hyperparameters.tuneforge_chat_template"
    no_prompt = "{% for m in messages %}[{{ m.role }}]\n{{ m.content }}{{ eos_token }}{% endfor %}"
    method = {"type": kind, kind: {"hyperparameters": {"tuneforge_chat_template": no_prompt}}}
    body = CreateJobBody(model=str(tiny_model_dir), training_file="file-1", method=method)
    config = training_config(str(tiny_model_dir), body.method_dict(), 3, tmp_path / "t.jsonl", None, tmp_path / "r")
    source = resolve(str(tiny_model_dir))
    with pytest.raises(ConfigError, match="writes nothing for add_generation_prompt") as err:
        check_inputs(config, run_tokenizer(config, source), source)
    assert err.value.message.startswith(f"{field}:") and "model.chat_template" not in err.value.message


def test_a_job_trains_and_saves_its_tuneforge_chat_template_and_fails_on_one_training_cannot_use(
    server, tiny_model_dir
):
    client = server.client()
    train_file = upload(client, chat_rows(4))

    def job_with(template: str):
        hyperparameters = {"n_epochs": 1, "batch_size": 4, "tuneforge_chat_template": template}
        job = client.fine_tuning.jobs.create(
            model=str(tiny_model_dir),
            training_file=train_file.id,
            method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        )
        return wait_for(client, job.id, {"succeeded", "failed", "cancelled"}, server=server)

    job = job_with(BRACKETS_TEMPLATE)
    assert job.status == "succeeded", job.error
    # Saved with the model (after the system prompt it was trained with), so it serves with it.
    saved = (server.home / "jobs" / "runs" / job.id / "final" / "chat_template.jinja").read_text()
    assert saved.endswith(BRACKETS_TEMPLATE)
    no_prompt = "{% for m in messages %}[{{ m.role }}]\n{{ m.content }}{{ eos_token }}{% endfor %}"
    job = job_with(no_prompt)
    assert job.status == "failed" and "writes nothing for add_generation_prompt" in job.error.message, job.error
    assert job.error.message.startswith("method.supervised.hyperparameters.tuneforge_chat_template:"), job.error
    assert not any("Files validated" in e.message for e in all_events(client, job.id))  # failed before training


RENDER_FAILURES = [  # each compiles; rendering the training file's rows fails at the template's line 2
    (
        "{% for m in messages %}\n{% if m.role == 'system' %}{{ raise_exception('no system turn') }}{% endif %}",
        "no system turn",
    ),
    ("{% for m in messages %}\n{{ messages[5].content }}", "no element 5"),
    (
        "{% for m in messages %}\n{% if m.role == 'system' %}{{ m.content | shout }}{% endif %}",
        "No filter named 'shout'",
    ),
]


@pytest.mark.parametrize("kind", ["supervised", "dpo"])
def test_a_tuneforge_chat_template_that_fails_on_the_training_files_rows_is_refused_when_the_job_is_created(
    server, tiny_model_dir, kind
):
    """Rendered on the file's first rows when the job is created, so the job is not queued to fail validating."""
    client = server.client()
    pair = {
        "input": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello."}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    rows = chat_rows(4) if kind == "supervised" else (json.dumps(pair) + "\n") * 4
    train = upload(client, rows)
    field = f"method.{kind}.hyperparameters.tuneforge_chat_template"
    rest = "[{{ m.role }}]\n{{ m.content }}{{ eos_token }}{% endfor %}"
    rest += "{% if add_generation_prompt %}[assistant]\n{% endif %}"
    for failing, said in RENDER_FAILURES:
        hyperparameters = {"tuneforge_chat_template": failing + rest}
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(
                model=str(tiny_model_dir),
                training_file=train.id,
                method={"type": kind, kind: {"hyperparameters": hyperparameters}},
            )
        message = caught.value.body["message"]
        assert caught.value.param == field, message
        assert message.startswith(f"{field}: ") and f"{train.id} line 1" in message, message
        assert "at its line 2" in message and said in message, message
    assert not [job for job in client.fine_tuning.jobs.list() if job.training_file == train.id]


def test_a_tuneforge_chat_template_that_rewrites_earlier_turns_is_refused_when_the_job_is_created(
    server, tiny_model_dir
):
    """A template that writes the system prompt only where the conversation ends with a user message renders the
    prompt one way when asked for the reply and another once it follows: no reply of the file could train."""
    client = server.client()
    train = upload(client, chat_rows(4))
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{% if messages[-1].role == 'user' %}"
        "[system]\n{{ m.content }}{{ eos_token }}{% endif %}{% else %}[{{ m.role }}]\n{{ m.content }}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]\n{% endif %}"
    )
    field = "method.supervised.hyperparameters.tuneforge_chat_template"
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(
            model=str(tiny_model_dir),
            training_file=train.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"tuneforge_chat_template": template}}},
        )
    message = caught.value.body["message"]
    assert caught.value.param == field, message
    assert message.startswith(f"{field}: on {train.id} line 1, ") and "one way when asked for that reply" in message
    assert not [job for job in client.fine_tuning.jobs.list() if job.training_file == train.id]


def test_advice_a_job_cannot_follow_goes_and_the_sentence_around_it_stays():
    from tuneforge.jobs.mapping import api_advice

    # The data check's words when no example trains the end of turn (text documents cut at max_length).
    message = (
        "Usually max_length cuts every reply short (raise data.max_length, or set data.truncation: split to train "
        "each text document whole, window by window) or the chat template puts the end of turn outside the reply."
    )
    assert api_advice(message) == (
        "Usually max_length cuts every reply short (shorten the rows) or the chat template puts the end of turn "
        "outside the reply."
    )
    assert api_advice("Fix these rows, or set data.on_error: skip to leave bad rows out.") == "Fix these rows."
    # Rows of two kinds, where the validation file's rows are another kind than the training file's.
    mixed = (
        "this row is sft data but file-train:1 is preference data; preference pairs, rated (KTO) replies and SFT "
        "rows cannot be trained together. Use separate runs (method: dpo for preference data, with dpo.loss: kto "
        "for rated replies)."
    )
    assert api_advice(mixed).endswith("cannot be trained together. Give rows of one kind in the job's files.")


def test_the_data_checks_advice_on_long_rows_and_validation_is_what_a_job_can_do(tmp_path, tokenizer):
    """A job sets neither data.max_length (its rows fit tuneforge's default) nor data.truncation nor
    data.validation (its validation_file, or none): the data check's own messages about rows too long and a
    validation file with no row left advise the rows and validation_file instead."""
    from data.rows import chat, write_jsonl

    from tuneforge.config import DataConfig
    from tuneforge.data.prepare import check_data
    from tuneforge.jobs.mapping import api_advice

    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(11)]
    long_reply, long_prompt = chat("Short question?", "A long answer. " * 60), chat("A long question. " * 60, "Yes.")
    train = write_jsonl(tmp_path / "train.jsonl", [*rows, long_reply, long_prompt])
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"messages": [{"role": "wizard", "content": "hi"}]}])
    config = DataConfig(train=str(train), validation=str(valid), max_length=64)
    data, problems = check_data(config, tokenizer, keep_examples=False)
    said = {p.code: p.message for p in problems} | {w["code"]: w["message"] for w in data.report["warnings"]}
    advised = {code: api_advice(message) for code, message in said.items()}
    assert advised["too_long"].endswith("no trained token is left (the reply comes after the cut). Shorten the prompt.")
    assert advised["truncated"].endswith("train.jsonl:12. Shorten those rows to train them whole.")
    assert advised["no_valid_rows"].endswith(
        "Fix the rows listed, or leave validation_file out to train without validation."
    )
    assert not any("data." in message for message in advised.values()), advised


def test_a_reinforcement_jobs_prompt_too_long_is_advised_to_be_shortened(tmp_path, tokenizer):
    """A reinforcement job's prompts must be shorter than data.max_length, which no job field sets: the prompt
    check's advice is to shorten the prompt alone."""
    from data.rows import write_jsonl

    from tuneforge.data.prepare import SystemPromptTally
    from tuneforge.jobs.mapping import api_advice
    from tuneforge.methods.grpo import read_prompts

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "A long question. " * 60}])
    _, problems = read_prompts(str(prompts), tokenizer, 64, SystemPromptTally(tokenizer))
    assert [p.code for p in problems] == ["too_long"]
    assert api_advice(problems[0].message).endswith("after it. Shorten the prompt.")


def test_a_reinforcement_job_whose_prompt_and_answer_outgrow_its_base_model_is_advised_a_longer_one(
    tmp_path, tiny_model_dir, tokenizer
):
    """A reinforcement job sets neither data.max_length nor grpo.max_new_tokens: training's check of a prompt
    and its answer against the base model's positions advises a base model of enough of them."""
    from tuneforge.errors import ConfigError
    from tuneforge.jobs.mapping import CreateJobBody, api_advice, training_config
    from tuneforge.methods import check_inputs
    from tuneforge.models import resolve

    short = set_context(shutil.copytree(tiny_model_dir, tmp_path / "short"), 1024)
    method = CreateJobBody(
        model=str(short),
        training_file="t",
        method={"type": "reinforcement", "reinforcement": {"grader": ANSWER_GRADER}},
    ).method_dict()
    config = training_config(str(short), method, 0, tmp_path / "t.jsonl", None, tmp_path / "run")
    with pytest.raises(ConfigError) as caught:
        check_inputs(config, tokenizer, resolve(config.base_model, pull_missing=False))
    advised = api_advice(caught.value.message)
    # The keys a job cannot set are what its rows are fitted to, not what the message is about.
    assert advised.startswith("a prompt of up to 1023 tokens and an answer of up to 128 make rows of 1151, "), advised
    assert advised.endswith(
        "; give the job a base model of 1151 positions or more (a job's prompts may have up to 1023 tokens, one "
        "fewer than tuneforge's default data.max_length, and its answers 128, the default grpo.max_new_tokens)."
    ), advised


def test_bad_file_fails_the_job_naming_the_file(server, tiny_model_dir):
    client = server.client()
    bad = upload(client, chat_rows(3) + '{"messages": [{"role": "user"}]}\n' + '{"prompt_only": 1}\n')
    job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=bad.id)
    job = wait_for(client, job.id, {"failed", "succeeded"}, server=server)
    assert job.status == "failed"
    # OpenAI's error.param is the parameter that names the file; the message names the file by id and line.
    assert job.error.param == "training_file" and job.error.code == "invalid_training_file"
    assert f"{bad.id}:4" in job.error.message and str(server.home) not in job.error.message
    assert any(e.level == "error" for e in all_events(client, job.id))
    # Rows of two formats: the advice is the file's rows, not data.format, which a job cannot set.
    mixed = upload(client, chat_rows(2) + json.dumps({"text": "Plain text."}) + "\n")
    job = wait_for(
        client,
        client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=mixed.id).id,
        {"failed", "succeeded"},
        server=server,
    )
    assert f"{mixed.id}:3: [mixed_formats]" in job.error.message and "Keep one format per file." in job.error.message
    assert "data.format" not in job.error.message
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)

    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=upload(client, chat_rows(4)).id, validation_file=bad.id
    )
    job = wait_for(client, job.id, {"failed", "succeeded"}, server=server)
    assert job.error.param == "validation_file" and job.error.code == "invalid_validation_file", job.error
    assert f"{bad.id}:4" in job.error.message


PREFERENCE_PAIRS = "".join(
    json.dumps({"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}) + "\n"
    for i in range(8)
)


def test_a_dpo_job_trains_on_openais_preference_pairs(server, tiny_model_dir):
    client = server.client()
    pairs = "".join(
        json.dumps(
            {
                "input": {"messages": [{"role": "user", "content": f"Question {i}?"}]},
                "preferred_output": [{"role": "assistant", "content": f"Good answer {i}."}],
                "non_preferred_output": [{"role": "assistant", "content": f"Bad answer {i}."}],
            }
        )
        + "\n"
        for i in range(6)
    )
    method = {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 3, "beta": 0.2}}}
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=upload(client, pairs).id, method=method
    )
    job = wait_for(client, job.id, {"succeeded", "failed"}, server=server)
    assert job.status == "succeeded", job.error
    assert job.method.dpo.hyperparameters.beta == 0.2 and job.trained_tokens > 0
    messages = [event.message for event in all_events(client, job.id)]
    assert "Files validated: 6 training examples, 1 epoch, 2 steps. Job queued." in messages


def test_training_rows_left_out_as_duplicates_or_validation_leaks_are_counted_in_the_jobs_events(
    server, tiny_model_dir
):
    """The data pipeline leaves out a training row repeated, or also in the validation file: the job says so, rather
    than counting fewer examples than were uploaded with no word why."""
    client = server.client()
    train = upload(client, chat_rows(8) + chat_rows(1, start=5))  # row 5 twice
    valid = upload(client, chat_rows(2), "valid.jsonl")  # rows 0 and 1 also in training
    job = create_job(client, tiny_model_dir, train.id, n_epochs=1, validation_file=valid.id)
    job = wait_for(client, job.id, {"succeeded", "failed"}, server=server)
    assert job.status == "succeeded", job.error
    messages = [event.message for event in all_events(client, job.id)]
    told = [message for message in messages if message.startswith("Files validated")]
    assert told == [
        "Files validated: 6 training examples (3 rows left out: 1 repeating an earlier row, 2 training rows also "
        "in the validation file), 1 epoch, 2 steps. Job queued."
    ], messages


def test_image_rows_for_a_text_only_model_are_refused_by_the_models_name_never_its_folder(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The job's failure and the dashboard's check of the file name the model as the client gave it."""
    from families import png_data_url

    from tuneforge.dashboard.sources import JobRuns
    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.mapping import CreateJobBody

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    pulled_as("smollm2-135m-instruct", tiny_model_dir, tmp_path / "home")
    image = {"type": "image_url", "image_url": {"url": png_data_url((220, 20, 20))}}
    row = {"messages": [{"role": "user", "content": [image]}, {"role": "assistant", "content": "Red."}]}
    method = CreateJobBody(model="smollm2-135m-instruct", training_file="t").method_dict()
    store, job = validated_job(tmp_path, "smollm2-135m-instruct", method, rows=json.dumps(row) + "\n")
    failed = store.get_job(job.id, "o")
    assert failed.status == "failed", failed.status
    assert "but smollm2-135m-instruct reads text only" in failed.error["message"], failed.error
    assert "<server path>" not in failed.error["message"] and str(tmp_path) not in failed.error["message"]
    service = create_api(tmp_path, store, api_keys=[KEY], workers=0).state.service
    report = JobRuns(service).check_file("o", job.training_file, "smollm2-135m-instruct", "supervised")
    message = report["errors"][0]["message"]
    assert "but smollm2-135m-instruct reads text only" in message, report["errors"]
    assert "<server path>" not in message and str(tmp_path) not in json.dumps(report)


@pytest.mark.parametrize(
    ("method", "rows", "code", "advice"),
    [
        ("dpo", chat_rows(8), "not_preference_data", "or train these rows with method.type supervised."),
        ("supervised", PREFERENCE_PAIRS, "preference_data", "Use method.type dpo, or give conversations"),
    ],
)
def test_a_file_of_the_wrong_kind_for_the_method_fails_while_validating(
    server, tiny_model_dir, method, rows, code, advice
):
    """Preference pairs for dpo, and for dpo only: checked with the files, not when training starts."""
    client = server.client()
    train = upload(client, rows)
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=train.id, method={"type": method, method: {}}
    )
    job = wait_for(client, job.id, {"failed", "succeeded", "running"}, server=server)
    assert job.status == "failed", job.status
    assert job.error.code == code and job.error.param == "training_file", job.error
    assert train.id in job.error.message and str(server.home) not in job.error.message
    # The advice names the request's method.type, never a config's method or dpo.loss.
    assert advice in job.error.message and "method: " not in job.error.message, job.error.message
    messages = [event.message for event in all_events(client, job.id)]
    assert not any(message.startswith(("Files validated", "Fine-tuning job started")) for message in messages)
    # The dashboard's check of a file for a new job says the same before any job exists.
    answer = httpx.post(
        server.base_url.removesuffix("/v1") + "/ui/api/check",
        json={"file_id": train.id, "model": str(tiny_model_dir), "method": method},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["param"] == "file_id"
    assert train.id in error["message"] and str(server.home) not in error["message"]
    assert advice in error["message"] and "method: " not in error["message"]


def test_each_key_sees_only_its_own(server, tiny_model_dir):
    alice, bob = server.client(KEY), server.client(OTHER_KEY)
    mine = upload(alice, chat_rows(4))
    assert mine.id not in [f.id for f in bob.files.list()]
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(mine.id)
    with pytest.raises(openai.BadRequestError):
        bob.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=mine.id)
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").files.list()
    assert alice.files.delete(mine.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(mine.id)


def test_a_job_may_start_only_from_a_model_the_server_allows(server, tiny_model_dir):
    """Paths, hub ids and another key's models all get the one answer, whether or not they exist."""
    alice, bob = server.client(KEY), server.client(OTHER_KEY)
    train = upload(bob, chat_rows(8))
    alices = create_job(alice, tiny_model_dir, upload(alice, chat_rows(8)).id, n_epochs=1)
    alices = wait_for(alice, alices.id, {"succeeded", "failed"}, server=server)
    run = server.home / "jobs" / "runs" / alices.id
    names = [
        "/etc/passwd",
        "/root/.ssh",
        "/proc/self/environ",
        "/dev/null",
        "/no/such/folder",
        str(run),
        f"{tiny_model_dir}/../model",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        alices.fine_tuned_model,
    ]
    for name in names:
        with pytest.raises(openai.BadRequestError) as caught:
            bob.fine_tuning.jobs.create(model=name, training_file=train.id)
        assert caught.value.code == "model_not_available" and caught.value.param == "model"
        assert caught.value.body["message"] == refusal_of(name)
    allowed = bob.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id)
    assert allowed.model == str(tiny_model_dir)
    bob.fine_tuning.jobs.cancel(allowed.id)


def test_a_fine_tuned_model_is_deleted_by_its_owner_only(server, tiny_model_dir):
    client = server.client()
    job = create_job(client, tiny_model_dir, upload(client, chat_rows(4)).id, n_epochs=1)
    job = wait_for(client, job.id, {"succeeded", "failed"}, server=server)
    name = job.fine_tuned_model
    [checkpoint] = client.fine_tuning.jobs.checkpoints.list(job.id)
    for not_theirs in (name, checkpoint.fine_tuned_model_checkpoint):  # another key learns nothing of them
        with pytest.raises(openai.NotFoundError):
            server.client(OTHER_KEY).models.delete(not_theirs)
    for other in ("SmolLM2-135M-Instruct", str(tiny_model_dir), checkpoint.fine_tuned_model_checkpoint):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.models.delete(other)
        assert caught.value.code == "model_not_deletable"
    # The checkpoint is the caller's own: the answer says what it is and which model can be deleted.
    assert caught.value.body["message"] == (
        f"The model `{other}` is a checkpoint of your fine-tuned model `{name}`; a job's checkpoints stay as long "
        f"as the job and are not deleted one by one. Only a fine-tuned model can be deleted: `{name}` (its "
        "checkpoints stay)."
    )

    deleted = client.models.delete(name)
    assert deleted.id == name and deleted.deleted
    assert name not in [model.id for model in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(name)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.NotFoundError):
        client.models.delete(name)
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == name  # the job keeps its record
    assert client.models.retrieve(checkpoint.fine_tuned_model_checkpoint).id == checkpoint.fine_tuned_model_checkpoint
    with pytest.raises(openai.PermissionDeniedError) as caught:  # its model gone, nothing is left to delete
        client.models.delete(checkpoint.fine_tuned_model_checkpoint)
    assert caught.value.body["message"].endswith(
        f"Only a fine-tuned model can be deleted, and `{name}` has no weights to delete (its job has not succeeded, "
        "or they were deleted)."
    ), caught.value.body["message"]


def test_a_model_deleted_after_it_answered_leaves_the_other_models_of_its_base_served(server, tiny_model_dir):
    client = server.client()
    job = create_job(client, tiny_model_dir, upload(client, chat_rows(4)).id, n_epochs=1)
    job = wait_for(client, job.id, {"succeeded", "failed"}, server=server)
    [checkpoint] = client.fine_tuning.jobs.checkpoints.list(job.id)
    hello = [{"role": "user", "content": "Hello"}]
    assert client.chat.completions.create(model=job.fine_tuned_model, max_tokens=2, messages=hello).usage
    client.models.delete(job.fine_tuned_model)
    # Its checkpoint, another adapter on the same base in memory, joins the base the deleted model was served on.
    reply = client.chat.completions.create(model=checkpoint.fine_tuned_model_checkpoint, max_tokens=2, messages=hello)
    assert reply.model == checkpoint.fine_tuned_model_checkpoint and reply.usage.completion_tokens >= 1


def refusal_of(name: str) -> str:
    return (
        f"The model `{name}` is not available for fine-tuning here. Name a registry model (smollm2-135m-instruct, "
        "gemma3-270m), a model this server allows (GET /v1/models lists those you have used), or one of your "
        "fine-tuned models or checkpoints."
    )


def test_a_job_fine_tunes_from_its_owners_fine_tuned_model(server, tiny_model_dir):
    """Needs the training fix for `save_final` on a run folder (AttributeError: 'peft_config' has no deleter)."""
    client = server.client()
    train = upload(client, chat_rows(8))
    first = wait_for(
        client, create_job(client, tiny_model_dir, train.id, n_epochs=1).id, {"succeeded", "failed"}, server=server
    )
    second = create_job(client, first.fine_tuned_model, train.id, n_epochs=1)
    assert second.model == first.fine_tuned_model
    second = wait_for(client, second.id, {"succeeded", "failed"}, server=server)
    if second.error:
        assert_no_server_details(second.error.message, server)
    assert second.status == "succeeded", second.error
    reply = client.chat.completions.create(
        model=second.fine_tuned_model, max_tokens=3, messages=[{"role": "user", "content": "Hello"}]
    )
    assert reply.usage.completion_tokens >= 1


def test_the_jobs_api_answers_a_list_of_prompts_as_serve_does(server, tiny_model_dir):
    # lm-evaluation-harness pointed at the jobs API sends its batch as one list of prompts.
    client = server.client()
    options = {"model": str(tiny_model_dir), "max_tokens": 3, "temperature": 0}
    prompts = ["Hello", "What is two plus two?", "Once upon a time"]
    together = client.completions.create(prompt=prompts, n=2, **options)
    alone = [client.completions.create(prompt=prompt, **options).choices[0].text for prompt in prompts]
    assert [choice.index for choice in together.choices] == list(range(6))
    assert [choice.text for choice in together.choices] == [text for text in alone for _ in range(2)]


def assert_no_server_details(message: str, server: ApiServer):
    assert "Traceback" not in message and 'File "' not in message and str(server.home) not in message, message
    assert "/site-packages/" not in message and "/tuneforge/" not in message, message


def test_failed_jobs_say_why_without_server_paths_or_tracebacks(server, unloadable_model_dir):
    client = server.client()
    job = client.fine_tuning.jobs.create(model=str(unloadable_model_dir), training_file=upload(client, chat_rows(8)).id)
    job = wait_for(client, job.id, {"succeeded", "failed"}, server=server)
    assert job.status == "failed"
    assert_no_server_details(job.error.message, server)
    assert str(unloadable_model_dir) not in job.error.message


def test_a_training_process_that_dies_fails_its_job_with_an_error_id(server, tiny_model_dir):
    client = server.client()
    job = create_job(client, tiny_model_dir, upload(client, chat_rows(12)).id, n_epochs=50)
    wait_for(client, job.id, {"running"}, server=server)
    lock = server.home / "jobs" / "runs" / job.id / ".lock"
    deadline = time.monotonic() + 30
    while not (trainer := process_holding(lock)):
        assert time.monotonic() < deadline, "no process holds the run folder"
        time.sleep(0.1)
    trainer.kill()
    job = wait_for(client, job.id, {"failed"}, server=server)
    assert job.error.code == "training_crashed" and "error id err_" in job.error.message
    assert_no_server_details(job.error.message, server)
    error_id = job.error.message.split("error id ")[1].split(")")[0]
    assert error_id in server.log()  # the operator finds the details under it


def process_holding(path: Path) -> psutil.Process | None:
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "forkserver" in " ".join(process.info["cmdline"] or []) and any(
                Path(f.path) == path for f in process.open_files()
            ):
                return process
        except psutil.Error:
            continue
    return None


def test_pausing_twice_asks_once_and_files_are_checked_while_another_job_trains(server, tiny_model_dir):
    client = server.client()
    long_job = create_job(client, tiny_model_dir, upload(client, chat_rows(12)).id, n_epochs=50)
    wait_for(client, long_job.id, {"running"}, server=server)
    # The one training thread is busy: the new job's files are checked anyway. It is long too: once
    # the first job pauses it trains, and it must still be unfinished when it is cancelled below.
    other = create_job(client, tiny_model_dir, upload(client, chat_rows(8)).id, n_epochs=50)
    wait_for(client, other.id, {"queued"}, timeout=30, server=server)
    assert client.fine_tuning.jobs.retrieve(long_job.id).status == "running"
    # Paused before it started, it has no step to go on from.
    client.fine_tuning.jobs.pause(other.id)
    client.fine_tuning.jobs.resume(other.id)
    resumed = [e.message for e in all_events(client, other.id) if e.message.startswith("Job resumed")]
    assert resumed == ["Job resumed: queued to start from the beginning."]
    client.fine_tuning.jobs.pause(long_job.id)
    client.fine_tuning.jobs.pause(long_job.id)
    wait_for(client, long_job.id, {"paused"}, server=server)
    requested = [e for e in all_events(client, long_job.id) if e.message.startswith("Pause requested")]
    assert len(requested) == 1
    client.fine_tuning.jobs.cancel(long_job.id)
    client.fine_tuning.jobs.cancel(other.id)


def test_a_file_that_is_not_utf8_fails_its_job_saying_so(server, tiny_model_dir):
    client = server.client()
    text = chat_rows(3).encode() + b'{"messages": "caf\xe9"}\n'
    bad = client.files.create(file=("train.jsonl", text, "application/jsonl"), purpose="fine-tune")
    job = wait_for(
        client,
        client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=bad.id).id,
        {"failed", "succeeded"},
        server=server,
    )
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert "UTF-8" in job.error.message and f"{bad.id}:4" in job.error.message, job.error.message


def test_the_key_is_checked_before_an_upload_is_read(server):
    """A body under the upload cap that never comes: the 401 comes at once, from the headers alone."""
    server.wait_ready()
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        sock.sendall(
            f"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {1 << 19}\r\n\r\n--b\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 401")


def test_hostile_bodies_and_pages_get_4xx(server):
    server.wait_ready()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    nested = '{"model": "x", "messages": ' + "[" * 5000 + "]" * 5000 + "}"
    response = httpx.post(f"{server.base_url}/chat/completions", content=nested, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert "nests arrays or objects too deeply" in response.json()["error"]["message"]
    long_number = '{"model": "x", "messages": [], "max_tokens": 1' + "0" * 5000 + "}"
    response = httpx.post(f"{server.base_url}/chat/completions", content=long_number, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_value"
    assert "an integer of more than 4,300 digits" in response.json()["error"]["message"]
    big = httpx.post(f"{server.base_url}/chat/completions", content=b"[" + b" " * (5 << 20) + b"]", headers=headers)
    assert big.status_code == 413
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(f"http://127.0.0.1:{server.port}{path}", headers=headers).status_code == 404


def test_an_endpoint_the_server_does_not_have_is_a_404_saying_so_not_that_an_object_is_missing(server):
    # A call of OpenAI's SDK this server does not serve reads as the URL being unknown, not the checkpoint.
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().fine_tuning.checkpoints.permissions.retrieve("ft:m:tuneforge::abc:ckpt-step-1")
    path = "/v1/fine_tuning/checkpoints/ft:m:tuneforge::abc:ckpt-step-1/permissions"
    assert caught.value.body == {
        "message": f"Invalid URL (GET {path}): this server has no endpoint at that path.",
        "type": "invalid_request_error",
        "param": None,
        "code": "unknown_url",
    }


# ---- a crash mid-job ------------------------------------------------------------------------------------


def test_server_killed_mid_job_resumes_after_restart(server, tiny_model_dir):
    # Last of the SQLite tests: it restarts the module's server (same home) instead of starting its own.
    client = server.client()
    train = upload(client, chat_rows(12))
    job = create_job(client, tiny_model_dir, train.id, n_epochs=50)  # 150 steps, a checkpoint every 3
    wait_for(client, job.id, {"running"}, server=server)
    while not list(client.fine_tuning.jobs.checkpoints.list(job.id)):
        assert client.fine_tuning.jobs.retrieve(job.id).status == "running", server.log()
        time.sleep(0.1)
    server.kill()
    server.start()
    client = server.client()
    done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"}, server=server)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in all_events(client, job.id)]
    [stopped] = [m for m in messages if "The server running this job stopped" in m]
    after_step, checkpoint = stopped.split("after step ")[1].split(";")[0], stopped.split("checkpoint step-")[1]
    assert int(checkpoint.rstrip(".")) <= int(after_step), stopped  # never resumes past where it says it stopped
    assert any(m.startswith("Resuming fine-tuning from checkpoint step-") for m in messages), messages
    steps = [e.data["step"] for e in all_events(client, job.id) if e.type == "metrics" and "train_loss" in e.data]
    assert sorted(steps) == list(range(1, 151))  # every step reported once, none trained twice after resuming


# ---- PostgreSQL: two servers, one store -----------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url():
    binaries = {name: shutil.which(name) or f"/usr/local/bin/{name}" for name in ("initdb", "pg_ctl", "postgres")}
    if not all(os.access(path, os.X_OK) for path in binaries.values()):
        pytest.skip(f"PostgreSQL binaries not found ({', '.join(binaries)}); install PostgreSQL to run these tests")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install 'tuneforge[serve]'")
    user = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    folder = Path(tempfile.mkdtemp(prefix="tuneforge-pg-"))
    if user:
        shutil.chown(folder, user)
    data = folder / "data"
    run = dict(user=user, check=True, capture_output=True)
    subprocess.run([binaries["initdb"], "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], **run)
    subprocess.run(
        [
            binaries["pg_ctl"],
            "-D",
            str(data),
            "-l",
            str(folder / "log"),
            "-w",
            "-o",
            f"-k {folder} -c listen_addresses='' -c fsync=off",  # its Unix socket only: no TCP port to share
            "start",
        ],
        **run,
    )
    yield f"postgresql://postgres@/postgres?host={folder}"
    subprocess.run([binaries["pg_ctl"], "-D", str(data), "-m", "immediate", "stop"], user=user, capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_server_and_a_worker_on_postgres_run_each_job_once(tmp_path, tiny_model_dir, postgres_url):
    home = tmp_path / "home"  # shared, as run folders on shared storage would be
    first = ApiServer(home, allowed=[tiny_model_dir], db=postgres_url).start()
    second = ApiServer(home, allowed=[tiny_model_dir], db=postgres_url, workers=0).start()  # serves the API only
    env = {**os.environ, "TUNEFORGE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    with open(home / "worker.log", "ab") as log:  # `tuneforge worker`: a third claimant, no HTTP
        worker = subprocess.Popen(
            [sys.executable, "-m", "tuneforge", "worker", "--store", postgres_url],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        sdk_flow(first, tiny_model_dir)
        client_a, client_b = first.client(), second.client()
        train = upload(client_a, chat_rows(8))
        jobs = [create_job(client, tiny_model_dir, train.id, n_epochs=1) for client in (client_a, client_b) * 3]
        for job in jobs:
            assert wait_for(client_b, job.id, {"succeeded", "failed"}, server=second).status == "succeeded"
        workers = []
        for job in jobs:
            [start] = [e for e in all_events(client_a, job.id) if e.message == "Fine-tuning job started."]
            workers.append(start.data["worker"].split("/")[0])  # the process that trained it
        # Both claimants took jobs (each job started once): the first server and the worker process.
        assert len(set(workers)) == 2 and any(w.split(":")[1] == str(worker.pid) for w in workers), workers
        assert worker.poll() is None, (home / "worker.log").read_text()[-3000:]
        reply = client_b.chat.completions.create(
            model=client_b.fine_tuning.jobs.retrieve(jobs[0].id).fine_tuned_model,
            max_tokens=3,
            messages=[{"role": "user", "content": "Hello"}],
        )
        assert reply.choices[0].message.content is not None
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        first.stop()
        second.stop()


def test_a_postgres_url_spelt_postgres_as_libpq_and_hosting_providers_write_it_opens_the_store(postgres_url):
    """`postgres://` is libpq's other spelling of `postgresql://`, the one many hosts' DATABASE_URL has."""
    from tuneforge.jobs.store import Store

    store = Store(postgres_url.replace("postgresql://", "postgres://", 1))
    assert store.engine.url.drivername == "postgresql+psycopg2"
    assert list(store.list_jobs("someone", after=None, limit=10, metadata={})) == []


def test_a_postgres_store_whose_disk_is_full_answers_507_as_sqlites_does(tmp_path, postgres_url, caplog):
    """PostgreSQL's disk_full (SQLSTATE 53100, psycopg2's DiskFull) is told as SQLite's "database or disk is full"
    is: a 507 saying the server has no room, and one log line naming the database (its URL, no password) and what
    to do, not a 500 with a traceback. The server raises it here from a trigger on the files table, through the
    driver as a full disk under the database's files raises it."""
    from fastapi.testclient import TestClient
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    database = f"full_{os.getpid()}"
    admin = create_engine(make_url(postgres_url).set(drivername="postgresql+psycopg2"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {database}"))
    url = make_url(postgres_url).set(database=database).render_as_string(hide_password=False)
    store = Store(url)
    with store.engine.begin() as connection:
        connection.execute(
            text(
                "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
                "'could not extend file \"base/1/2\": No space left on device' USING ERRCODE = 'disk_full'; END $$"
            )
        )
        connection.execute(text("CREATE TRIGGER full_disk BEFORE INSERT ON files EXECUTE FUNCTION disk_full()"))
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        with TestClient(create_api(tmp_path, store, api_keys=[KEY], workers=0, dashboard=False)) as http:
            form = {"file": ("train.jsonl", chat_rows(4).encode())}
            answer = http.post("/v1/files", headers=headers, data={"purpose": "fine-tune"}, files=form)
            assert answer.status_code == 507, answer.text
            assert answer.json()["error"]["code"] == "insufficient_storage", answer.text
            assert http.get("/v1/files", headers=headers).json()["data"] == []
    finally:
        store.engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE {database}"))
    (record,) = [r for r in caplog.records if r.name == "tuneforge.web"]
    assert record.getMessage().startswith(f"postgresql+psycopg2://postgres@/{database}?host="), record.getMessage()
    assert "No space left on device. The disk is full" in record.getMessage() and record.exc_info is None


def test_the_job_store_is_a_sqlite_file_path_as_the_error_for_a_bad_one_says_or_a_url(tmp_path, monkeypatch):
    from tuneforge.jobs.command import open_store

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    store, _ = open_store("stores/jobs.db")
    assert store.url.database == str(tmp_path / "stores" / "jobs.db") and (tmp_path / "stores" / "jobs.db").is_file()


@pytest.mark.parametrize(
    ("db", "refusal"),
    [("bogus://x", "--db bogus://x: cannot open the database"), ("a-file/jobs.db", "File exists")],
)
def test_a_job_store_that_does_not_open_is_refused_before_the_training_processes_start(
    db, refusal, tmp_path, monkeypatch
):
    from tuneforge.errors import ConfigError
    from tuneforge.jobs import command, runner

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("in the way\n")
    started = []
    monkeypatch.setattr(runner, "start_process_server", lambda: started.append(True))
    options = dict(host="127.0.0.1", port=0, workers=1, api_keys=[], allowed_models=[], docs=False)
    with pytest.raises((ConfigError, OSError), match=refusal):
        command.api_command(**options, db=db, max_upload_mb=64, max_body_mb=3, max_models=2, prefix_cache_mb=0)
    assert started == []


def test_a_worker_store_that_cannot_be_opened_is_told_by_the_workers_own_option(tmp_path, monkeypatch):
    from tuneforge.errors import ConfigError
    from tuneforge.jobs.command import worker_command

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError) as caught:
        worker_command(db="mysql://tf@db-host/tuneforge", workers=1)
    assert caught.value.message.startswith("--store mysql://tf@db-host/tuneforge: cannot open"), caught.value.message


def test_a_worker_given_a_store_file_that_is_not_there_is_refused_and_creates_nothing(tmp_path, monkeypatch):
    """A worker joins a store an api keeps: a path that names no file is a typo, not a new store to wait on."""
    from tuneforge.errors import ConfigError
    from tuneforge.jobs.command import worker_command

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    typo = tmp_path / "hmoe" / "jobs" / "jobs.db"
    for given in (str(typo), f"sqlite:///{typo}"):
        with pytest.raises(ConfigError) as caught:
            worker_command(db=given, workers=1)
        assert caught.value.message.startswith(f"--store {given}: no such file."), caught.value.message
        assert "--db" in caught.value.message
        # An api started without --db keeps its store where the worker's $TUNEFORGE_HOME says: named, to give.
        assert f"without --db, {tmp_path / 'home' / 'jobs' / 'jobs.db'}" in caught.value.message
    assert not (tmp_path / "hmoe").exists()


def test_the_api_startup_line_prints_the_folder_of_files_as_named(tmp_path, monkeypatch, capsys, unserved):
    # rich would read `[/x]` in a user's path as a closing tag (an error) and `:x:` as an emoji's code.
    from tuneforge.jobs import command, runner

    (tmp_path / "[").mkdir()
    home = tmp_path / "[" / "x]:x: [bold]"
    monkeypatch.setenv("TUNEFORGE_HOME", str(home))
    monkeypatch.setattr(runner, "start_process_server", lambda: None)
    options = dict(host="127.0.0.1", port=0, db=None, workers=1, api_keys=[], allowed_models=[], docs=False)
    assert command.api_command(**options, max_upload_mb=64, max_body_mb=3, max_models=2, prefix_cache_mb=0) == 0
    said = capsys.readouterr().err
    assert f"store {home / 'jobs' / 'jobs.db'}; files and runs under {home / 'jobs'};" in said, said


def test_the_api_startup_line_gives_the_limits_its_inference_uses(tmp_path, monkeypatch):
    from tuneforge.jobs import command, runner
    from tuneforge.web import listen

    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path))
    monkeypatch.setattr(runner, "start_process_server", lambda: None)
    announced = []
    monkeypatch.setattr(listen, "listen", lambda app, sock, announce: announced.append(announce("http://here")))
    options = dict(host="127.0.0.1", port=0, db=None, workers=1, api_keys=[], allowed_models=[], docs=False)
    options.update(max_upload_mb=64, max_body_mb=3, max_models=2)
    assert command.api_command(**options, prefix_cache_mb=512) == 0
    assert command.api_command(**options, prefix_cache_mb=0) == 0
    cached, uncached = announced
    assert cached.startswith("tuneforge api at http://here/v1 with 1 job worker(s); ")
    assert cached.endswith(
        "; inference on up to 2 base model(s) at once, each with its own limits: 32 rows decoded at once, 256 "
        "waiting (then 429), max_tokens 1024 by default for chat and 16 for completions, prompt and reply within "
        "each model's context window, bodies up to 3 MiB, no request timeout; prefix cache up to 512 MiB per base "
        "model; files uploaded up to 64 MiB"
    )
    assert uncached.endswith("no request timeout; prefix cache off; files uploaded up to 64 MiB")


def test_a_finished_jobs_events_are_there_as_soon_as_its_status_is(tmp_path):
    # A client polling the status reads the events that tell of it in the same poll: every commit is
    # followed by a read, as a client's would be, of the status and the events.
    from sqlalchemy import event

    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Job, JobEvent, Store, StoredFile
    from tuneforge.jobs.worker import JobFailure, RunProgress, Workers

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    workers = Workers(store, FileStorage(tmp_path), tmp_path, 0)
    seen = []

    def read_as_a_client(session):
        with store._sessions() as client:
            for job in client.query(Job):
                messages = [e.message for e in client.query(JobEvent).filter(JobEvent.job_id == job.id)]
                results = [client.query(StoredFile).filter(StoredFile.id == f).one_or_none() for f in job.result_files]
                seen.append((job.status, messages, results))

    event.listen(store._sessions, "after_commit", read_as_a_client)
    told = {
        "succeeded": ["New fine-tuned model created: ft:tiny:alice:succeed", "The job has successfully completed."],
        "failed": ["The run ran out of memory."],
    }
    for finish in ("succeed", "fail"):
        job = add_job(store, KEY, status="running", worker_id="worker-1", fine_tuned_model=f"ft:tiny:alice:{finish}")
        if finish == "succeed":
            workers._succeed(job, "worker-1", RunProgress(store, job, tmp_path / "run"))
        else:
            workers._fail(job, "worker-1", JobFailure("out_of_memory", "The run ran out of memory."))
        finished = [(status, messages, results) for status, messages, results in seen if status in told]
        assert finished, seen
        for status, messages, results in finished:
            assert messages == told[status] and None not in results, (status, messages)
        seen.clear()


def test_a_job_cancelled_as_it_finishes_or_pauses_tells_the_step_and_checkpoint_it_kept(tmp_path):
    # The API marks a job cancelled at once; its run may finish its last step or pause meanwhile.
    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Store
    from tuneforge.jobs.worker import RunProgress, Workers
    from tuneforge.training.checkpoint import STATE

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    workers = Workers(store, FileStorage(tmp_path), tmp_path, 0)
    for finish in ("succeed", "pause"):
        job = add_job(store, KEY, status="cancelled", worker_id="worker-1", total_steps=2)
        run = tmp_path / "runs" / job.id
        (run / "checkpoints" / "step-2").mkdir(parents=True)
        (run / "checkpoints" / "step-2" / STATE).write_text("{}")
        rows = [{"step": step, "train_loss": 1.0, "tokens": 50 * step} for step in (1, 2)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        progress = RunProgress(store, job, run)
        progress.update()
        if finish == "succeed":
            workers._succeed(job, "worker-1", progress)
        else:
            workers._stopped(job, "worker-1", "pause", progress)
        cancelled = store.get_job(job.id)
        messages = [e.message for e in store.list_events(job.id, after=None, limit=100)]
        assert cancelled.status == "cancelled" and not cancelled.result_files, finish
        assert "Job cancelled at step 2; checkpoint step-2 is kept." in messages, (finish, messages)
        assert (cancelled.step, cancelled.trained_tokens) == (2, 100), finish


def test_a_store_is_shown_as_its_file_path_or_its_url_without_the_password(tmp_path):
    # The servers' first line names their store: a path with é must read as typed, not %C3%A9.
    from tuneforge.database import database_url, shown_url
    from tuneforge.jobs.store import Store

    path = tmp_path / "jobs é 中文.db"
    assert shown_url(Store(database_url(str(path))).url) == str(path)
    assert shown_url("postgresql://me:secret@db.example/jobs") == "postgresql://me:***@db.example/jobs"


def test_a_job_held_while_its_files_are_validated_stays_held_when_another_host_looks(tmp_path, monkeypatch):
    # Validating a job's files (a base model fetched first, a large file) may take longer than a
    # holder on another host is given; the holder's process beats the heartbeat of every job it holds.
    from tuneforge.jobs import worker
    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Store

    monkeypatch.setattr(worker, "HEARTBEAT_EVERY_S", 0.1)
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    here = worker.Workers(store, FileStorage(tmp_path), tmp_path, 1)
    job = add_job(
        store,
        KEY,
        status="validating_files",
        worker_id=f"{worker.process_worker_id()}/0",  # what this server's validating thread holds it as
        heartbeat_at=time.time() - worker.STALE_AFTER_S - 1,
    )
    here.start()
    try:
        deadline = time.monotonic() + 10
        while store.get_job(job.id).heartbeat_at < time.time() - worker.STALE_AFTER_S:
            assert time.monotonic() < deadline, "the holder's heartbeat was not beaten"
            time.sleep(0.05)
        monkeypatch.setattr(worker, "HOST", "another-host")  # a server elsewhere, sharing the store
        worker.Workers(store, FileStorage(tmp_path), tmp_path, 0)._recover_orphans()
        assert store.get_job(job.id).worker_id == job.worker_id
    finally:
        here.stop()


def _beat_until(workers, done: threading.Event) -> None:
    """`workers`' heartbeat, beating on its own thread until `done` is set, then stopped."""
    beating = threading.Thread(target=workers._beat)
    beating.start()
    assert done.wait(10), "the heartbeat stopped beating"
    workers._stopping.set()
    beating.join()


def test_a_heartbeat_the_full_store_refuses_is_logged_once_naming_the_path(tmp_path, monkeypatch, caplog):
    """A store whose disk is full refuses every beat: the log has one line naming the store's file and what to do
    (no traceback), not one each beat; once the store has taken a beat, the same refusal is told again."""
    import errno

    from tuneforge.fsio import REFUSED_WRITE_ADVICE
    from tuneforge.jobs import worker
    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Store

    database = tmp_path / "jobs.db"
    beats = iter(["full"] * 5 + ["taken"] + ["full"] * 5)
    done = threading.Event()

    def beat(store, process_id):
        outcome = next(beats, None)
        if outcome == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(database))
        if outcome is None:
            done.set()

    monkeypatch.setattr(worker, "HEARTBEAT_EVERY_S", 0.01)
    monkeypatch.setattr(Store, "beat", beat)
    _beat_until(worker.Workers(Store(f"sqlite:///{database}"), FileStorage(tmp_path), tmp_path, 0), done)
    told = [r for r in caplog.records if r.name == "tuneforge.jobs"]
    line = f"job heartbeat of {worker.process_worker_id()}: {database}: No space left on device. "
    assert [r.getMessage() for r in told] == [line + REFUSED_WRITE_ADVICE[errno.ENOSPC]] * 2
    assert all(r.exc_info is None for r in told)


def test_a_heartbeat_the_database_refuses_is_logged_once_though_its_parameters_change(tmp_path, monkeypatch, caplog):
    """A database error holds the beat's statement and its parameters, the beat's time among them: the same refusal
    (a store opened read-only) is logged once with its traceback, not again at each beat."""
    from tuneforge.jobs import worker
    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Store

    database = tmp_path / "jobs.db"
    here = worker.Workers(Store(f"sqlite:///{database}"), FileStorage(tmp_path), tmp_path, 0)
    read_only = Store(f"sqlite:///file:{database}?mode=ro&uri=true")
    beats, refused = itertools.count(), read_only.beat
    done = threading.Event()

    def beat(process_id):
        if next(beats) == 5:
            done.set()
        refused(process_id)

    monkeypatch.setattr(worker, "HEARTBEAT_EVERY_S", 0.01)
    monkeypatch.setattr(read_only, "beat", beat)
    here.store = read_only
    _beat_until(here, done)
    told = [r for r in caplog.records if r.name == "tuneforge.jobs"]
    assert [r.getMessage() for r in told] == [f"job heartbeat of {worker.process_worker_id()}"]
    assert "attempt to write a readonly database" in str(told[0].exc_info[1])


def test_a_job_whose_server_dies_once_too_often_fails_counting_every_death(tmp_path):
    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Store
    from tuneforge.jobs.worker import HOST, MAX_RECOVERIES, Workers

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    job = add_job(
        store,
        KEY,
        status="running",
        worker_id=f"{HOST}:999999999:1.00/1",  # a process of this host that is gone
        recoveries=MAX_RECOVERIES,  # queued again after each of the deaths before this one
    )
    Workers(store, FileStorage(tmp_path), tmp_path, 0)._recover_orphans()
    failed = store.get_job(job.id)
    assert failed.status == "failed" and failed.error["code"] == "server_stopped"
    assert f"stopped {MAX_RECOVERIES + 1} times" in failed.error["message"], failed.error
    assert "checkpoint" not in failed.error["message"]  # its run wrote none


def test_recovery_asks_the_store_for_the_held_jobs_runs_and_batches_by_an_index_in_a_store_made_without_it(tmp_path):
    # A store keeps every job it ran; a worker that looks for the orphans of a dead one every few seconds reads
    # only the rows some worker holds.
    from sqlalchemy import event, text

    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Store
    from tuneforge.jobs.worker import Workers

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with Store(url).engine.begin() as made_before:  # a store of a version that had no such index
        for table in ("fine_tuning_jobs", "eval_runs", "batches"):
            made_before.execute(text(f"DROP INDEX IF EXISTS ix_{table}_held"))
    store = Store(url)
    add_job(store, KEY, status="running", worker_id="host:1:1.00/1")
    asked = []
    event.listen(store.engine, "before_cursor_execute", lambda *call: asked.append(call[2:4]))
    Workers(store, FileStorage(tmp_path), tmp_path, 0)._recover_orphans()
    held = [(sql, params) for sql, params in asked if sql.startswith("SELECT") and "worker_id IS NOT NULL" in sql]
    assert len(held) == 3, asked
    with store.engine.connect() as connection:
        plans = [connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all() for sql, params in held]
    assert all("_held" in plan[0][-1] for plan in plans), plans


@pytest.mark.parametrize(
    ("made_before", "change"),
    [
        ("DROP INDEX ix_fine_tuning_jobs_held", "CREATE INDEX"),
        ("ALTER TABLE fine_tuning_jobs DROP COLUMN integrations", "ALTER TABLE"),
    ],
    ids=["index", "column"],
)
def test_processes_opening_a_store_an_earlier_version_made_at_once_each_open_it(tmp_path, made_before, change):
    # Servers and workers restarted on a new version open the store together: one adds what the store lacks while
    # the others wait, not each finding it missing and all but one failing on "already exists".
    from sqlalchemy import Engine, event, inspect, text

    from tuneforge.jobs.store import Store

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with Store(url).engine.begin() as connection:
        connection.execute(text(made_before))
    looked, second_opened, failed = threading.Event(), threading.Event(), []

    def pause_the_first_before_its_change(_connection, _cursor, statement, *_rest):
        if threading.current_thread() is first and statement.startswith(change):
            looked.set()
            second_opened.wait(timeout=2)  # the other opens meanwhile, or waits for this one (the fix)

    def open_store(then=None):
        try:
            Store(url)
        except Exception as err:
            failed.append(err)
        if then is not None:
            then.set()

    event.listen(Engine, "before_cursor_execute", pause_the_first_before_its_change)
    try:
        first = threading.Thread(target=open_store)
        first.start()
        assert looked.wait(timeout=30)
        second = threading.Thread(target=open_store, args=(second_opened,))
        second.start()
        first.join(timeout=60)
        second.join(timeout=60)
    finally:
        event.remove(Engine, "before_cursor_execute", pause_the_first_before_its_change)
    assert not failed, failed
    store = inspect(Store(url).engine)
    assert "ix_fine_tuning_jobs_held" in {index["name"] for index in store.get_indexes("fine_tuning_jobs")}
    assert "integrations" in {column["name"] for column in store.get_columns("fine_tuning_jobs")}


def test_a_crashed_training_says_its_last_checkpoint_is_kept_only_when_it_wrote_one(tmp_path):
    from tuneforge.jobs import runner
    from tuneforge.jobs.store import Store
    from tuneforge.jobs.worker import _crashed
    from tuneforge.training.checkpoint import STATE

    job = add_job(Store(f"sqlite:///{tmp_path / 'jobs.db'}"), KEY, status="running")
    (tmp_path / runner.LOG).write_text("step 3\n")
    assert "checkpoint" not in _crashed(job, tmp_path, -9, 3).error["message"]
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-2" / STATE).write_text("{}")
    assert "Its last checkpoint (step 2) is kept." in _crashed(job, tmp_path, -9, 3).error["message"]


def test_a_paused_job_its_server_died_under_resumes_saying_the_step_of_its_checkpoint(tmp_path):
    # The dead server reported step 10, but its last checkpoint is step 9: the job goes on from step 9.
    from fastapi.testclient import TestClient

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Store
    from tuneforge.jobs.worker import HOST, Workers
    from tuneforge.training.checkpoint import STATE

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    job = add_job(
        store,
        KEY,
        status="running",
        stop_request="pause",
        step=10,
        worker_id=f"{HOST}:999999999:1.00/1",  # a process of this host that is gone
    )
    saved = tmp_path / "runs" / job.id / "checkpoints" / "step-9"
    saved.mkdir(parents=True)
    (saved / STATE).write_text("{}")
    Workers(store, FileStorage(tmp_path), tmp_path, 0)._recover_orphans()
    assert store.get_job(job.id).status == "paused"
    with TestClient(create_api(tmp_path, store, api_keys=[KEY], workers=0)) as client:
        answer = client.post(f"/v1/fine_tuning/jobs/{job.id}/resume", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    messages = [e.message for e in store.list_events(job.id, after=None, limit=100)]
    assert "Job resumed: queued to continue from step 9." in messages, messages


def created_jobs_events(client, store) -> list[str]:
    """The events of a job `client` creates (as KEY's) on an uploaded training file, oldest first."""
    headers = {"Authorization": f"Bearer {KEY}"}
    train = client.post(
        "/v1/files", headers=headers, files={"file": ("t.jsonl", chat_rows(2))}, data={"purpose": "fine-tune"}
    )
    answer = client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "smollm2-135m-instruct", "training_file": train.json()["id"]},
    )
    assert answer.status_code == 200, answer.text
    return [e.message for e in reversed(store.list_events(answer.json()["id"], after=None, limit=10))]


def test_a_job_created_while_another_jobs_files_are_validated_says_it_waits_for_that_job(tmp_path):
    from fastapi.testclient import TestClient

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    with TestClient(create_api(tmp_path, store, api_keys=[KEY, OTHER_KEY], workers=0)) as client:
        alone = created_jobs_events(client, store)
        assert len(alone) == 1 and alone[0].startswith("Created fine-tuning job: ")
        mine = add_job(store, KEY, status="validating_files", worker_id="host:1:1.00/0")
        add_job(store, OTHER_KEY, status="validating_files", worker_id="other:1:1.00/0")
        add_job(store, KEY, status="validating_files")  # waiting too, not being validated
        waiting = created_jobs_events(client, store)
        held_jobs = store.held_jobs

        def held_once_a_worker_took_the_new_job(status):  # between the job's creation and the look at them
            while store.claim("validating_files", "host:1:1.00/1"):
                pass
            return held_jobs(status)

        store.held_jobs = held_once_a_worker_took_the_new_job
        taken = created_jobs_events(client, store)  # a worker has it: it waits for no other job
    assert waiting[1] == (
        f"Waiting for a worker to validate this job's files: the files of job {mine.id} and another client's job "
        "are being validated now, and 2 jobs created before it wait to be validated first."
    ), waiting
    assert len(taken) == 1, taken


@pytest.mark.parametrize(
    ("where", "sent", "said"),
    [
        ("hyperparameters", {"n_epochs": 0}, "must be 'auto' or an integer of at least 1 and at most 50 (got 0)"),
        ("hyperparameters", {"n_epochs": 10000}, "must be 'auto' or an integer of at least 1 and at most 50"),
        ("hyperparameters", {"learning_rate_multiplier": -1}, "a number of more than 0 and at most 10 (got -1)"),
        ("hyperparameters", {"tuneforge_processes": 0}, "must be at least 1 and at most 64 (got 0)"),
        ("hyperparameters", {"tuneforge_processes": 100}, "must be at least 1 and at most 64 (got 100)"),
        ("body", {"seed": -1}, "'seed': must be at least 0 and at most 2147483647 (got -1)"),
        ("query", {"limit": 0}, "'limit': must be at least 1 and at most 100 (got '0')"),
    ],
)
def test_a_number_out_of_its_bounds_is_refused_saying_both_of_them(tmp_path, where, sent, said):
    # As the config and the CLI say it: pydantic's own error names the one bound the number missed.
    from fastapi.testclient import TestClient

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    headers = {"Authorization": f"Bearer {KEY}"}
    with TestClient(
        create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=[KEY], workers=0)
    ) as client:
        if where == "query":
            answer = client.get("/v1/fine_tuning/jobs", headers=headers, params=sent)
        else:
            hyperparameters = sent if where == "hyperparameters" else {}
            method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
            job = {"model": "m", "training_file": "file-x", "method": method, **(sent if where == "body" else {})}
            answer = client.post("/v1/fine_tuning/jobs", headers=headers, json=job)
    assert answer.status_code == 400 and said in answer.json()["error"]["message"], answer.text


def test_jobs_created_in_a_burst_before_a_worker_took_the_first_say_they_wait_for_those_before_them(tmp_path):
    from fastapi.testclient import TestClient

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    with TestClient(create_api(tmp_path, store, api_keys=[KEY], workers=0)) as client:
        burst = [created_jobs_events(client, store) for _ in range(3)]
    assert [events[1:] for events in burst] == [
        [],
        ["Waiting for a worker to validate this job's files: 1 job created before it waits to be validated first."],
        ["Waiting for a worker to validate this job's files: 2 jobs created before it wait to be validated first."],
    ], burst


def test_a_paused_job_whose_last_checkpoint_is_damaged_resumes_saying_the_step_its_run_goes_on_from(tmp_path):
    """The job's run passes over a damaged last checkpoint for the newest whole one (`checkpoint.newest_whole`):
    the resume's event names the step the run goes on from, not the damaged one's."""
    from fastapi.testclient import TestClient

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store
    from tuneforge.training.checkpoint import OPTIMIZER, STATE

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    job = add_job(store, KEY, status="paused", step=4)
    checkpoints = tmp_path / "runs" / job.id / "checkpoints"
    for step in (2, 4):
        (checkpoints / f"step-{step}").mkdir(parents=True)
        (checkpoints / f"step-{step}" / STATE).write_text("{}")
    (checkpoints / "step-4" / OPTIMIZER).mkdir()  # its optimizer state's files lost: a resume cannot read it
    with TestClient(create_api(tmp_path, store, api_keys=[KEY], workers=0)) as client:
        answer = client.post(f"/v1/fine_tuning/jobs/{job.id}/resume", headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    messages = [e.message for e in store.list_events(job.id, after=None, limit=100)]
    assert "Job resumed: queued to continue from step 2." in messages, messages


def test_text_the_store_keeps_holding_a_nul_character_is_refused_naming_its_field(tmp_path):
    """PostgreSQL keeps no NUL in a text column (psycopg2 will not send one) nor reads one out of JSON text
    (`metadata ->> 'key'` fails on `\\u0000`), where SQLite takes both: a file's name, an eval's or a run's name,
    or metadata's key or value that holds one is a 400 naming it, on either database."""
    from fastapi.testclient import TestClient

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    headers = {"Authorization": f"Bearer {KEY}"}
    grader = {"type": "string_check", "name": "same", "input": "a", "reference": "a", "operation": "eq"}
    config = {"type": "custom", "item_schema": {"type": "object", "properties": {}}}
    with TestClient(
        create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=[KEY], workers=0)
    ) as http:

        def refused(path: str, param: str, says: str, **request):
            answer = http.post(path, **{"headers": headers, **request})
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"] == param and says in error["message"] and "NUL" in error["message"], error

        # Written by hand: httpx, as browsers, sends a NUL in a file's name as %00.
        form = (
            b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b\r\nContent-Disposition: '
            b'form-data; name="file"; filename="batch\x00.jsonl"\r\n\r\n{}\n\r\n--b--\r\n'
        )
        multipart = {**headers, "Content-Type": "multipart/form-data; boundary=b"}
        refused("/v1/files", "file", "'batch\\x00.jsonl'", content=form, headers=multipart)
        assert http.get("/v1/files", headers=headers).json()["data"] == []
        batch_input = http.post(
            "/v1/files", headers=headers, data={"purpose": "batch"}, files={"file": ("batch.jsonl", b"{}\n")}
        ).json()["id"]
        batch = {"input_file_id": batch_input, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        refused("/v1/batches", "metadata", "the value of 'team'", json={**batch, "metadata": {"team": "a\0b"}})
        job = {"model": "smollm2-135m-instruct", "training_file": batch_input}
        refused("/v1/fine_tuning/jobs", "metadata", "the key 'te\\x00am'", json={**job, "metadata": {"te\0am": "a"}})
        created = http.post(
            "/v1/evals", headers=headers, json={"data_source_config": config, "testing_criteria": [grader]}
        )
        eval_id = created.raise_for_status().json()["id"]
        evaluation = {"data_source_config": config, "testing_criteria": [grader]}
        refused("/v1/evals", "name", "a NUL (\\u0000) at character 6", json={**evaluation, "name": "triage\0"})
        refused(f"/v1/evals/{eval_id}", "metadata", "the value of 'n'", json={"metadata": {"n": "\0"}})
        source = {
            "type": "completions",
            "source": {"type": "file_content", "content": [{"item": {}}]},
            "model": "smollm2-135m-instruct",
            "input_messages": {"type": "template", "template": [{"role": "user", "content": "Hi"}]},
        }
        refused(f"/v1/evals/{eval_id}/runs", "name", "at character 0", json={"name": "\0", "data_source": source})


def test_a_path_or_query_parameter_holding_a_nul_character_is_refused_naming_it(tmp_path):
    """No id or name a store keeps holds a NUL, and PostgreSQL refuses to look one up (a 500 there, where SQLite
    answers that nothing matches): every route refuses one in its path or query, after the key is checked."""
    from fastapi.testclient import TestClient

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    headers = {"Authorization": f"Bearer {KEY}"}
    with TestClient(
        create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=[KEY], workers=0)
    ) as http:
        for url, param, says in (
            ("/v1/files/file-%00", None, "The URL's path '/v1/files/file-\\x00' holds a NUL (\\u0000) at character 15"),
            ("/v1/chat/completions/chatcmpl-1%00", None, "at character 31"),
            (
                "/v1/files?after=file-%00",
                "after",
                "The value of query parameter 'after' holds a NUL (\\u0000) at character 5",
            ),
            ("/v1/fine_tuning/jobs?metadata[team]=a%00", "metadata[team]", "at character 1"),
            (
                "/v1/chat/completions?metadata[te%00am]=a",
                "metadata[te\0am]",
                "The name of query parameter 'metadata[te",
            ),
        ):
            answer = http.get(url, headers=headers)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"] == param and says in error["message"], error
        assert http.get("/v1/files/file-%00").status_code == 401


def test_an_id_or_model_name_in_a_body_holding_a_nul_character_is_refused_naming_it(tmp_path):
    """A body's file id or model name is looked up in the store, which PostgreSQL refuses to do for text holding a
    NUL (a 500 there, where SQLite answers that nothing matches): it is a 400 naming the field."""
    from fastapi.testclient import TestClient

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    headers = {"Authorization": f"Bearer {KEY}"}
    grader = {"type": "string_check", "name": "same", "input": "a", "reference": "a", "operation": "eq"}
    config = {"type": "custom", "item_schema": {"type": "object", "properties": {}}}
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    template = {"type": "template", "template": [{"role": "user", "content": "Hi"}]}
    source = {"type": "completions", "source": {"type": "file_id", "id": "file-1"}, "input_messages": template}
    with TestClient(
        create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=[KEY], workers=0)
    ) as http:
        eval_id = (
            http.post("/v1/evals", headers=headers, json={"data_source_config": config, "testing_criteria": [grader]})
            .raise_for_status()
            .json()["id"]
        )
        batch = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}
        for path, body, param in (
            ("/v1/fine_tuning/jobs", {"model": "ft:base:org::x\0", "training_file": "file-1"}, "model"),
            ("/v1/fine_tuning/jobs", {"model": "smollm2-135m-instruct", "training_file": "file-\0"}, "training_file"),
            ("/v1/batches", {**batch, "input_file_id": "file-\0"}, "input_file_id"),
            ("/v1/chat/completions", {**chat, "model": "ft:base:org::x\0"}, "model"),
            ("/v1/completions", {"prompt": "Hi", "model": "ft:base:org::x\0"}, "model"),
            (f"/v1/evals/{eval_id}/runs", {"data_source": {**source, "model": "ft:x\0"}}, "data_source.model"),
            (
                f"/v1/evals/{eval_id}/runs",
                {"data_source": {**source, "model": "m", "source": {"type": "file_id", "id": "file-\0"}}},
                "data_source.source.file_id.id",  # pydantic names the union's member by its tag
            ),
        ):
            answer = http.post(path, headers=headers, json=body)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["param"] == param and "holds a NUL (\\u0000) at character" in error["message"], error


def test_a_job_whose_config_the_model_cannot_train_fails_while_its_files_are_validated(tmp_path, tiny_model_dir):
    # The checks training makes before any compute run with the files: a model of fewer positions than
    # the job's data.max_length fails the job at validation, not once it is queued and starts.
    from tuneforge.jobs.mapping import CreateJobBody

    short = set_context(shutil.copytree(tiny_model_dir, tmp_path / "short"), 256)
    store, job = validated_job(tmp_path, str(short), CreateJobBody(model=str(short), training_file="t").method_dict())
    failed = store.get_job(job.id)
    messages = [e.message for e in store.list_events(job.id, after=None, limit=100)]
    assert failed.status == "failed", messages
    assert "data.max_length: 1024 tokens is more than the 256 positions" in failed.error["message"], failed.error
    # A job sets no data.max_length and no model.rope_scaling: the base model is what its client can change.
    assert "give the job a base model of 1024 positions or more" in failed.error["message"]
    assert "rope_scaling" not in failed.error["message"]
    assert failed.error["param"] is None and str(tmp_path) not in failed.error["message"]
    assert not any(message.startswith("Files validated") for message in messages)


def test_a_wandb_integration_reports_the_job_to_wandb_and_the_job_echoes_it(tmp_path, tiny_model_dir, monkeypatch):
    from pydantic import ValidationError

    from tuneforge.jobs.mapping import CreateJobBody
    from tuneforge.jobs.routes.jobs import job_body

    integrations = [{"type": "wandb", "wandb": {"project": "triage", "tags": ["tiny"]}}]
    with monkeypatch.context() as absent:
        absent.setitem(sys.modules, "wandb", None)  # import wandb fails, as where it is not installed
        with pytest.raises(ValidationError, match=r"pip install 'tuneforge\[wandb\]'"):
            CreateJobBody(model="m", training_file="file-1", integrations=integrations)
    pytest.importorskip("wandb", reason="W&B is not installed: pip install -e '.[wandb]'")
    body = CreateJobBody(model=str(tiny_model_dir), training_file="file-1", integrations=integrations)
    shown = [{"type": "wandb", "wandb": {"project": "triage", "name": None, "entity": None, "tags": ["tiny"]}}]
    assert body.integrations_list() == shown
    store, job = validated_job(tmp_path, str(tiny_model_dir), body.method_dict(), integrations=body.integrations_list())
    validated = store.get_job(job.id)
    assert validated.status == "queued", validated.error
    assert validated.train_config["train"]["report_to"] == ["wandb"]
    # The W&B run is named after the run folder, the job's id, as OpenAI names it.
    assert validated.train_config["train"]["wandb"] == {
        "project": "triage",
        "entity": None,
        "name": None,
        "tags": ["tiny"],
    }
    assert job_body(validated)["integrations"] == shown


def test_a_job_store_made_before_jobs_kept_integrations_gets_the_column(tmp_path):
    import sqlite3

    from tuneforge.jobs.store import Store

    path = tmp_path / "jobs.db"
    add_job(Store(f"sqlite:///{path}"), KEY)
    with sqlite3.connect(path) as connection:  # the table as an earlier version made it
        connection.execute("ALTER TABLE fine_tuning_jobs DROP COLUMN integrations")
    store = Store(f"sqlite:///{path}")
    job = add_job(store, KEY, integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
    assert store.get_job(job.id).integrations == [{"type": "wandb", "wandb": {"project": "p"}}]


def test_an_upload_the_servers_disk_has_no_room_for_is_a_507_saying_so(tmp_path, file_size_limit, caplog):
    """A write the machine refuses (a full disk; here a file size limit, which refuses it the same way) is
    the server's state, not a defect: the client gets a 507 saying the server has no room, the log one line
    naming the path and what to do (no traceback), and no half-written file stays or is listed."""
    from fastapi.testclient import TestClient

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    headers = {"Authorization": f"Bearer {KEY}"}
    with TestClient(
        create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=[KEY], workers=0)
    ) as http:
        form = {"file": ("train.jsonl", chat_rows(12).encode() * 4)}
        with file_size_limit(2 * len(chat_rows(12))):  # the database's pages fit, not the upload
            answer = http.post("/v1/files", headers=headers, data={"purpose": "fine-tune"}, files=form)
        assert answer.status_code == 507, answer.text
        error = answer.json()["error"]
        assert error["code"] == "insufficient_storage" and "no room" in error["message"], error
        assert "/" not in error["message"], error  # no server path
        assert http.get("/v1/files", headers=headers).json()["data"] == []
    assert list((tmp_path / "files").iterdir()) == []
    (record,) = [r for r in caplog.records if r.name == "tuneforge.web"]
    assert str(tmp_path / "files") in record.getMessage() and "(ulimit -f)" in record.getMessage()
    assert record.exc_info is None


def test_a_job_whose_run_the_servers_disk_has_no_room_for_fails_saying_so(tmp_path, monkeypatch):
    """A job whose checkpoint the disk refuses fails as out of disk space, naming the file in the run without
    the server's path (which the operator's log line has, with what to do), not as a crash to quote an id for."""
    import errno

    import tuneforge.training
    from tuneforge.fsio import REFUSED_WRITE_ADVICE
    from tuneforge.jobs import runner

    step = tmp_path / "checkpoints" / "step-24"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(step))

    monkeypatch.setattr(tuneforge.training, "train", full_disk)
    (tmp_path / runner.CONFIG).write_text("{}")
    outcome = runner.run(tmp_path)
    assert (outcome["status"], outcome["code"]) == ("failed", "out_of_disk_space"), outcome
    assert "checkpoints/step-24" in outcome["message"] and str(tmp_path) not in outcome["message"], outcome
    assert "no room" in outcome["message"] and "operator" in outcome["message"], outcome
    assert outcome["log"] == f"{step}: No space left on device. {REFUSED_WRITE_ADVICE[errno.ENOSPC]}"


def test_a_store_the_disk_has_no_room_for_is_told_as_a_full_disk_naming_its_file(tmp_path):
    """SQLite's "database or disk is full" reads as any other write the disk refuses: an OSError naming the
    database's file (which the command line and the servers tell in one line), and what was stored stays."""
    import errno

    from sqlalchemy import event

    from tuneforge.jobs.store import Store, StoredFile, now

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    # SQLite answers a database grown past max_page_count as it answers a full disk (SQLITE_FULL).
    event.listen(store.engine, "connect", lambda connection, _: connection.execute("PRAGMA max_page_count=8"))
    store.engine.dispose()  # the connections made from here on take it
    kept = StoredFile(id="file-0", owner="o", filename="a.jsonl", purpose="fine-tune", bytes=1, created_at=now())
    store.add(kept)
    with pytest.raises(OSError) as refused:
        for n in range(1, 1000):
            name = "x" * 4000
            store.add(StoredFile(id=f"file-{n}", owner="o", filename=name, purpose="fine-tune", bytes=1, created_at=0))
    assert (refused.value.errno, refused.value.filename) == (errno.ENOSPC, str(tmp_path / "jobs.db"))
    assert store.get_file("o", "file-0").filename == "a.jsonl"


def test_a_crashed_training_whose_last_checkpoint_is_damaged_names_it_not_only_the_whole_one_before(tmp_path):
    from tuneforge.jobs import runner
    from tuneforge.jobs.store import Store
    from tuneforge.jobs.worker import _crashed
    from tuneforge.training.checkpoint import STATE

    job = add_job(Store(f"sqlite:///{tmp_path / 'jobs.db'}"), KEY, status="running")
    (tmp_path / runner.LOG).write_text("step 5\n")
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-2" / STATE).write_text("{}")
    (tmp_path / "checkpoints" / "step-4").mkdir()  # written in part: a resume refuses it rather than pass it over
    message = _crashed(job, tmp_path, -9, 5).error["message"]
    assert (
        f"Its last checkpoint, step 4, is damaged ({STATE} is missing), which a resume refuses; step 2 before it is "
        f"kept: a new job can start from it (model {job.fine_tuned_model}:ckpt-step-2)." in message
    )


def test_a_job_whose_last_checkpoint_is_damaged_resumes_from_the_whole_one_before_saying_so(
    tiny_model_dir, triage_data, tmp_path
):
    """A job's run resumes on its own (after a restart), so no one is there to choose a checkpoint: a damaged last
    one (a save cut short, a file lost since) is skipped for the newest whole one, and the job's events say which
    and why."""
    from conftest import tiny_run_config

    from tuneforge.jobs import runner
    from tuneforge.jobs.store import Store
    from tuneforge.jobs.worker import _started
    from tuneforge.training import checkpoint, train

    job = add_job(Store(f"sqlite:///{tmp_path / 'jobs.db'}"), KEY, status="queued")
    run_dir = tmp_path / "runs" / job.id
    config = tiny_run_config(tiny_model_dir, triage_data, run_dir, max_steps=4, save_every=2)
    train(config, progress=False)
    (run_dir / runner.CONFIG).write_text(json.dumps(config))
    last = run_dir / "checkpoints" / "step-4"
    for lost, what in [
        (checkpoint.STATE, f"{checkpoint.STATE} is missing"),
        (checkpoint.SCHEDULER, f"files are missing: {checkpoint.SCHEDULER}"),
    ]:
        (last / lost).unlink()
        started = _started(job, run_dir, "worker-1")
        assert (started.level, started.message) == (
            "warn",
            f"Checkpoint step-4 is damaged ({what}), so it is skipped: fine-tuning resumes from checkpoint step-2.",
        )
        assert runner.run(run_dir)["status"] == "completed", lost
        assert (last / lost).is_file()


def test_a_job_whose_base_model_is_gone_when_validated_fails_naming_the_model_field_and_what_to_give(tmp_path):
    """A model the server allowed when the job was created, deleted before the job's files are validated: the
    error names the job's `model`, and says to create the job again with a model this server has, once (not the
    command line's advice, a path to check or a hub id, beside it)."""
    from tuneforge.jobs.mapping import CreateJobBody

    gone = str(tmp_path / "gone-model")
    store, job = validated_job(tmp_path, gone, CreateJobBody(model=gone, training_file="t").method_dict())
    failed = store.get_job(job.id)
    assert (failed.status, failed.error["code"], failed.error["param"]) == ("failed", "model_not_found", "model")
    assert failed.error["message"] == (
        f"model: The model `{gone}` is no longer on this server. Create the job again with a model this server has: "
        "a registry model, one the server allows (GET /v1/models lists those you have used), or one of your "
        "fine-tuned models or checkpoints."
    ), failed.error["message"]


def test_a_job_on_a_model_without_a_chat_template_warns_of_it_once_in_each_log(tiny_model_dir, tmp_path):
    """The server's log, which checked the job's files, and the job's train.log, which trained it: each says the
    ChatML fallback once, not again as the data report's warning."""
    from tiny import without_chat_template

    from tuneforge.jobs import runner

    model = without_chat_template(tiny_model_dir, tmp_path / "no-template")
    api = ApiServer(tmp_path / "home", allowed=[model]).start()
    try:
        client = api.client()
        job = wait_for(
            client,
            create_job(client, model, upload(client, chat_rows(8)).id, n_epochs=1).id,
            {"succeeded", "failed"},
            server=api,
        )
        assert job.status == "succeeded", job.error
        server_log = api.log_path.read_text(errors="replace")
    finally:
        api.stop()
    (train_log,) = (tmp_path / "home").rglob(runner.LOG)
    for log in (server_log, train_log.read_text(errors="replace")):
        assert log.count("has no chat template; using ChatML") == 1, log[-6000:]
