"""The dashboard's views and routes without a browser: run folders as they are written (and half-written),
the pages of `tuneforge ui`, and per-key visibility under `tuneforge api`'s keys.

The browser tests are in test_dashboard_browser.py.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config
from tiny import set_context

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient  # noqa: E402

from tuneforge.dashboard import runs as runs_module  # noqa: E402
from tuneforge.dashboard.app import create_ui_app  # noqa: E402
from tuneforge.dashboard.runs import RunFolder  # noqa: E402
from tuneforge.dashboard.sources import (
    FolderRuns,  # noqa: E402
    public_report,  # noqa: E402
)
from tuneforge.errors import DataError  # noqa: E402
from tuneforge.training import train  # noqa: E402


def write_run(folder: Path, *, steps: int = 6, finished: bool = True, lr: float = 1e-3) -> Path:
    """A run folder as the training loop writes it: config, metrics, checkpoints, and once finished the summary."""
    folder.mkdir(parents=True)
    config = {"base_model": "tiny-base", "method": "lora", "train": {"lr": lr}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    records = [
        {"step": s, "train_loss": 3.0 - 0.1 * s, "lr": lr, "elapsed": 0.5 * s, "tokens": 100 * s}
        for s in range(1, steps + 1)
    ]
    records[2]["valid_loss"] = 2.9
    lines = [json.dumps(r) for r in records]
    if finished:
        lines.append(json.dumps({"step": steps, "full_valid_loss": 2.5}))
        (folder / "summary.json").write_text(
            json.dumps({"status": "completed", "steps": steps, "metrics": {**records[-1], "full_valid_loss": 2.5}})
        )
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for step in (3, steps):
        (folder / "checkpoints" / f"step-{step}").mkdir(parents=True, exist_ok=True)
    return folder


def test_a_run_folder_is_read_as_it_is_being_written(tmp_path):
    folder = write_run(tmp_path / "live", finished=False)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train_lo')  # the loop is writing this line now
    view = RunFolder(folder)
    assert [m["step"] for m in view.metrics()] == [1, 2, 3, 4, 5, 6]
    assert view.last_metrics()["step"] == 6
    assert view.status() == "running"
    stale = time.time() - 3600
    for name in ("metrics.jsonl", "config.yaml"):
        os.utime(folder / name, (stale, stale))
    assert view.status() == "stopped"
    assert RunFolder(write_run(tmp_path / "done")).status() == "completed"
    assert RunFolder(tmp_path / "missing").metrics() == [] and RunFolder(tmp_path / "missing").summary is None


def test_a_runs_status_is_what_its_lock_says_and_only_where_it_cannot_tell_how_lately_its_files_changed(tmp_path):
    from tuneforge.training.distributed import World
    from tuneforge.training.run_folder import RUN_LOCK, sole_run_in

    folder = write_run(tmp_path / "run", finished=False)

    def changed(seconds_ago: float) -> None:
        for name in ("metrics.jsonl", "config.yaml"):
            os.utime(folder / name, (time.time() - seconds_ago,) * 2)

    changed(3600)  # a step slower than RUNNING_WITHIN_S: the run holds its lock all the while
    with sole_run_in(folder, World()):
        assert RunFolder(folder).status() == "running"
    changed(0)  # stopped with Ctrl-C just now: its lock went with its process
    assert RunFolder(folder).status() == "stopped"
    # A run folder copied from another machine: its lock is that machine's, and the files' times are all there is.
    (folder / RUN_LOCK).write_text("4242\ntoken\nanother-machine\n")
    assert RunFolder(folder).status() == "running"
    changed(3600)
    assert RunFolder(folder).status() == "stopped"


def test_a_run_that_has_logged_only_its_first_step_shows_that_step(tmp_path):
    folder = tmp_path / "first"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"base_model": "tiny-base", "method": "lora"}))
    first = {"step": 1, "train_loss": 2.9, "lr": 1e-3, "elapsed": 0.5}
    (folder / "metrics.jsonl").write_text(json.dumps(first) + '\n{"step": 2, "train_lo')  # step 2 being written
    assert RunFolder(folder).last_metrics()["step"] == 1
    [row] = FolderRuns(tmp_path).list_runs("local")
    assert row.step == 1 and row.elapsed_s == 0.5 and row.headline()[0] == "2.9"


def test_a_grpo_run_shows_its_validation_rewards(tmp_path):
    folder = tmp_path / "grpo"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"base_model": "tiny-base", "method": "grpo"}))
    records = [
        {"step": 1, "train_loss": 0.1, "reward": 0.5, "valid_reward": 0.25, "elapsed": 1.0},
        {"step": 2, "train_loss": 0.1, "reward": 0.6, "elapsed": 2.0},
        {"step": 2, "full_valid_reward": 0.75},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({"status": "completed", "steps": 2, "metrics": records[-1]}))
    [row] = FolderRuns(tmp_path).list_runs("local")
    assert row.headline()[2] == "0.75"  # the valid reward column
    events = [event.message for event in FolderRuns(tmp_path).run_page("local", "grpo").events]
    assert "Full validation reward 0.75" in events and "Step 1: validation reward 0.25" in events


def test_the_runs_list_shows_an_evaluated_runs_task_score_as_a_percentage_named_by_its_metric(tmp_path):
    """A task score is a share of the examples: a percentage with the metric that scored it, as report.html shows it.
    The list reads it from the run's evaluation, eval/after.json, which `tuneforge train` with eval.task and the
    quickstart both write (the quickstart's summary.json holds no task score)."""
    for name, scores in (
        ("exact", {"n": 50, "exact": 0.02, "fields": {"category": 0.5}}),
        ("contains", {"n": 3, "contains": 2 / 3}),
        ("none", None),  # data without reference answers
    ):
        (write_run(tmp_path / name) / "eval").mkdir()
        (tmp_path / name / "eval" / "after.json").write_text(json.dumps({"loss": 1.2, "scores": scores}))
    rows = {row.id: row.headline()[3] for row in FolderRuns(tmp_path).list_runs("local")}
    assert rows == {"exact": "2.0% exact", "contains": "66.7% contains", "none": "-"}
    with TestClient(create_ui_app(tmp_path)) as client:
        listing = client.get("/ui/").text
    assert "<th>task score</th>" in listing and '<td class="num">66.7% contains</td>' in listing


def test_run_folders_under_a_directory_are_listed_with_their_figures(tmp_path):
    write_run(tmp_path / "a")
    write_run(tmp_path / "group" / "b", steps=4, finished=False)
    (tmp_path / "not-a-run").mkdir()
    rows = {row.id: row for row in FolderRuns(tmp_path).list_runs("local")}
    assert set(rows) == {"a", "group/b"}
    assert rows["a"].status == "completed" and rows["a"].step == 6 and rows["a"].total_steps == 6
    assert rows["a"].headline()[:2] == ["2.4", "2.5"]  # final train loss, full validation loss
    assert rows["group/b"].status == "running" and rows["group/b"].step == 4 and rows["group/b"].elapsed_s == 2.0
    page = FolderRuns(tmp_path).run_page("local", "a")
    assert [c.step for c in page.checkpoints] == [6, 3] and page.checkpoints[1].metrics["valid_loss"] == 2.9
    assert page.tuned_model is None  # no final/ folder: nothing to chat with
    assert page.events[0].message == "Run completed after 6 steps"


def test_the_runs_list_parses_a_run_config_again_only_once_it_changes(tmp_path, monkeypatch):
    # A real run's config.yaml takes ~60 ms in pure-Python YAML: a list of 200 runs took seconds per load.
    for name in ("a", "b"):
        write_run(tmp_path / name)
    parsed = []
    load = runs_module.load_yaml
    monkeypatch.setattr(
        runs_module, "load_yaml", lambda text, *args, **kw: parsed.append(text) or load(text, *args, **kw)
    )
    runs = FolderRuns(tmp_path)
    assert [row.model for row in runs.list_runs("local")] == ["tiny-base", "tiny-base"] and len(parsed) == 2
    runs.list_runs("local")
    runs.run_page("local", "a")
    assert len(parsed) == 2
    (tmp_path / "b" / "config.yaml").write_text(yaml.safe_dump({"base_model": "other-base", "method": "dpo"}))
    rows = {row.id: row for row in runs.list_runs("local")}
    assert (rows["b"].model, rows["b"].method) == ("other-base", "dpo") and len(parsed) == 3


def test_the_runs_list_and_a_runs_page_read_each_summary_once(tmp_path, monkeypatch):
    """A summary gives a run's status, its row's figures and its page's last event: one read serves them all."""
    for name in ("a", "b"):
        write_run(tmp_path / name)
    read = []
    own = RunFolder._object
    monkeypatch.setattr(RunFolder, "_object", lambda folder, name, shape: read.append(name) or own(folder, name, shape))
    runs = FolderRuns(tmp_path)
    assert [row.status for row in runs.list_runs("local")] == ["completed", "completed"]
    assert read.count("summary.json") == 2
    read.clear()
    assert runs.run_page("local", "a").events[0].message == "Run completed after 6 steps"
    assert read.count("summary.json") == 1


def test_pages_of_tuneforge_ui(tmp_path):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", lr=3e-3)
    with TestClient(create_ui_app(tmp_path)) as client:
        listing = client.get("/ui/")
        assert listing.status_code == 200 and 'href="/ui/runs/a"' in listing.text
        run = client.get("/ui/runs/a")
        assert run.status_code == 200
        assert 'id="train-curve"' in run.text and 'id="valid-curve"' in run.text and 'id="final-valid"' in run.text
        assert "train.lr" in run.text  # hyperparameters, from config.yaml
        live = client.get("/ui/live/a").json()
        assert live["status"] == "completed" and not live["active"] and 'id="train-curve"' in live["html"]
        compared = client.get("/ui/compare?run=a&run=b").text
        assert 'id="train-curve-0"' in compared and 'id="train-curve-1"' in compared
        assert "<td>6 / 6</td>" in listing.text and "<td>6 / 6</td>" in compared  # steps done, of the run's total
        missing = client.get("/ui/runs/a%2F..%2F..")
        assert missing.status_code == 404 and "There is no run" in missing.text
        assert client.get("/ui/report/a").status_code == 404  # no evaluation was run
        unknown = client.get("/ui/nope")  # a browser's mistyped address gets a page, not JSON
        assert unknown.status_code == 404 and "There is no page /ui/nope" in unknown.text
        assert client.get("/ui/static/dashboard.css").status_code == 200
        models = client.get("/ui/api/models").json()["data"]
        assert models == ["tiny-base", "a:ckpt-step-6", "a:ckpt-step-3", "b:ckpt-step-6", "b:ckpt-step-3"]
        hello = [{"role": "user", "content": "hi"}]
        refused = client.post("/v1/chat/completions", json={"model": "nope", "messages": hello})
        assert refused.status_code == 404 and "nope" in refused.json()["error"]["message"]
        static = client.get("/ui/static/dashboard.js")
        assert static.status_code == 200 and "fetch(" in static.text
        # A file the static folder lacks is named as such, not as a URL the server has no endpoint at.
        gone = client.get("/ui/static/nosuch.js")
        assert gone.status_code == 404 and gone.json()["error"] == {
            "message": "File not found (GET /ui/static/nosuch.js): no file of this server's static files has that "
            "name.",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
        assert client.get("/v1/nosuch").json()["error"]["code"] == "unknown_url"  # the router's own 404


def test_links_to_a_run_whose_folder_name_has_url_characters_open_its_pages(tmp_path):
    name = "group/50% #1?ü"
    write_run(tmp_path / name)
    (tmp_path / name / "eval").mkdir()
    (tmp_path / name / "eval" / "report.html").write_text("<p>report</p>")
    with TestClient(create_ui_app(tmp_path)) as client:
        [run_link] = re.findall(r'href="(/ui/runs/[^"]*)"', client.get("/ui/").text)
        [compared_link] = re.findall(r'href="(/ui/runs/[^"]*)"', client.get("/ui/compare", params={"run": name}).text)
        run = client.get(html.unescape(run_link))
        assert run_link == compared_link and run.status_code == 200 and f"<h1>{html.escape(name)}</h1>" in run.text
        [live_url] = re.findall(r'data-url="([^"]*)"', run.text)
        assert client.get(html.unescape(live_url)).json()["status"] == "completed"
        [report_link] = re.findall(r'href="(/ui/report/[^"]*)"', run.text)
        assert client.get(html.unescape(report_link)).text == "<p>report</p>"


def test_the_playground_of_tuneforge_ui_chats_with_a_run_whose_name_has_a_space_and_a_dot(
    tiny_model_dir, triage_data, tmp_path
):
    name = "my run v1.2"
    train(tiny_run_config(tiny_model_dir, triage_data, tmp_path / name, max_steps=1, save_every=1), progress=False)
    hello = [{"role": "user", "content": "hi"}]
    with TestClient(create_ui_app(tmp_path)) as client:
        for model in (name, f"{name}:ckpt-step-1"):
            reply = client.post("/v1/chat/completions", json={"model": model, "messages": hello, "max_tokens": 2})
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == model and reply.json()["usage"]["completion_tokens"] >= 1


def test_a_run_whose_data_was_refused_is_listed_as_failed_with_its_problems(tiny_model_dir, triage_data, tmp_path):
    # Such a run writes its data report only; the list left it out, so its problems showed nowhere.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(triage_data["train"]).read_text().splitlines()[0] + "\n{not json\n")
    data = {**triage_data, "train": bad}
    with pytest.raises(DataError):
        train(tiny_run_config(tiny_model_dir, data, tmp_path / "runs" / "refused"), progress=False)
    with TestClient(create_ui_app(tmp_path / "runs")) as client:
        listing = client.get("/ui/").text
        assert 'href="/ui/runs/refused"' in listing and '<span class="status failed">failed</span>' in listing
        page = client.get("/ui/runs/refused").text
        assert 'id="run-error"' in page and "data check" in page
        [problem] = re.findall(r'<table class="problems">.*?</table>', page, re.S)
        assert "<td>2</td>" in problem and str(bad) in problem  # the bad row's line, in the file named
    assert not FolderRuns(tmp_path / "runs").list_runs("local")[0].active


def test_a_data_report_shown_to_a_client_names_files_by_id_and_hides_server_paths():
    report = {
        "files": [{"path": "/srv/tuneforge/jobs/files/abc/file-1.jsonl", "role": "train"}],
        "errors": [{"file": "/srv/tuneforge/jobs/files/abc/file-1.jsonl", "line": 4, "message": "see /etc/x"}],
        "warnings": [
            {
                "code": "truncated",
                "message": "1 row longer than max_length 1024 was cut (its end is not trained): "
                "/srv/tuneforge/jobs/files/abc/file-1.jsonl:7. Raise data.max_length or set data.truncation: drop.",
            }
        ],
        "cache": {"path": "/root/.cache/tuneforge/data-cache/k"},
        "replies": {"repeated": [{"reply": "Use method: lora for this."}]},  # a row's own text, as written
    }
    shown = public_report(report, {"/srv/tuneforge/jobs/files/abc/file-1.jsonl": "file-1 (train.jsonl)"})
    assert shown["replies"]["repeated"][0]["reply"] == "Use method: lora for this."
    assert shown["files"][0]["path"] == "file-1 (train.jsonl)" and shown["errors"][0]["file"] == "file-1 (train.jsonl)"
    assert "/etc" not in shown["errors"][0]["message"] and "cache" not in shown
    # Its advice is what a job's client can do: no config key a job cannot set.
    assert shown["warnings"][0]["message"].endswith("file-1 (train.jsonl):7. Shorten those rows to train them whole.")


def supervised_job(key: str, **fields):
    """A jobs-store row of a supervised job on the tiny model, owned by `key`."""
    from tuneforge.jobs.store import Job, new_id, now
    from tuneforge.web import owner_of

    return Job(
        id=new_id("ftjob-"),
        owner=owner_of(key),
        model="tiny",
        training_file="file-1",
        seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        created_at=now(),
        result_files=[],
        **fields,
    )


def test_a_page_link_holding_a_nul_sends_a_browser_to_the_login_page_without_it(tmp_path):
    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    app = create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=["key-a"], workers=0)
    with TestClient(app) as client:
        to_login = client.get("/ui/runs/x%00", follow_redirects=False)
        assert to_login.status_code == 303 and to_login.headers["location"] == "/ui/login"
        login = client.get(to_login.headers["location"])
        assert login.status_code == 200 and 'data-next="/ui/"' in login.text


@pytest.mark.parametrize("keys", [["key-a"], []], ids=["logged-in", "no-keys"])
def test_a_page_link_holding_a_nul_shows_a_browser_the_dashboards_error_page(tmp_path, keys):
    """A browser opening the page gets the refusal as a page; the dashboard's JavaScript, which reads JSON from
    under /ui too, gets it as the API's JSON."""
    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store
    from tuneforge.web import KEY_COOKIE

    app = create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=keys, workers=0)
    browser = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    with TestClient(app, cookies={KEY_COOKIE: "key-a"} if keys else None) as client:
        page = client.get("/ui/runs/x%00", headers=browser)
        assert page.status_code == 400 and page.headers["content-type"].startswith("text/html"), page.text
        said = html.unescape(re.search(r'<p id="error">(.*?)</p>', page.text, re.S)[1])
        assert said == client.get("/ui/runs/x%00").json()["error"]["message"]
        assert said.startswith("The URL's path '/ui/runs/x\\x00' holds a NUL") and 'href="/ui/"' in page.text
        fetched = client.get("/ui/live/x%00")
        assert fetched.status_code == 400 and fetched.json()["error"]["code"] == "invalid_value"
        api = client.get("/v1/fine_tuning/jobs/x%00", headers={**browser, "Authorization": "Bearer key-a"})
        assert api.status_code == 400 and api.json()["error"]["code"] == "invalid_value"  # the API's is JSON


def test_with_api_keys_each_key_sees_only_its_own_jobs_in_the_dashboard(tmp_path):
    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store
    from tuneforge.web import KEY_COOKIE

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    app = create_api(tmp_path, store, api_keys=["key-a", "key-b"], workers=0)
    job = supervised_job("key-a", status="queued", fine_tuned_model="ft:tiny:tuneforge::abc")
    store.add(job)
    with TestClient(app) as client:
        to_login = client.get("/ui/", follow_redirects=False)
        assert to_login.status_code == 303 and to_login.headers["location"] == "/ui/login?next=/ui/"
        assert client.get("/ui/login").status_code == 200 and client.get("/ui/static/dashboard.css").status_code == 200
        client.cookies.set(KEY_COOKIE, "key-a")
        assert job.id in client.get("/ui/").text and client.get(f"/ui/runs/{job.id}").status_code == 200
        client.cookies.set(KEY_COOKIE, "key-b")
        assert job.id not in client.get("/ui/").text
        assert client.get(f"/ui/runs/{job.id}").status_code == 404
        assert client.get(f"/ui/live/{job.id}").status_code == 404
        assert job.id not in client.get(f"/ui/compare?run={job.id}").text
        client.cookies.set(KEY_COOKIE, "wrong")
        assert client.get("/ui/", follow_redirects=False).status_code == 303
        # A cookie is a key for reading pages only: what does something needs the Bearer header.
        client.cookies.set(KEY_COOKIE, "key-a")
        check = client.post("/ui/api/check", json={"file_id": "file-1", "model": "tiny"})
        assert check.status_code == 401
        assert client.get("/v1/fine_tuning/jobs").status_code == 401
        with_header = client.post(
            "/ui/api/check", json={"file_id": "file-1", "model": "tiny"}, headers={"Authorization": "Bearer key-b"}
        )
        assert with_header.status_code == 404 and with_header.json()["error"]["param"] == "file_id"


def test_the_check_of_a_file_for_a_new_job_refuses_a_model_the_job_could_not_train(tmp_path, tiny_model_dir):
    # The same checks as the job's validation: a model of fewer positions than a job's data.max_length.
    import io
    import shutil

    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.files import FileStorage
    from tuneforge.jobs.store import Store
    from tuneforge.web import owner_of

    short = set_context(shutil.copytree(tiny_model_dir, tmp_path / "short"), 256)
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    rows = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    stored = FileStorage(tmp_path).save(
        io.BytesIO((json.dumps(rows) + "\n").encode()),
        owner=owner_of("key-a"),
        filename="t.jsonl",
        purpose="fine-tune",
        max_bytes=1 << 20,
    )
    store.add(stored)
    app = create_api(tmp_path, store, api_keys=["key-a"], workers=0, allowed_models=[str(short)])
    with TestClient(app) as client:
        check = client.post(
            "/ui/api/check",
            json={"file_id": stored.id, "model": str(short), "method": "supervised"},
            headers={"Authorization": "Bearer key-a"},
        )
    assert check.status_code == 400, check.text
    error = check.json()["error"]
    assert (
        error["param"] == "model" and "data.max_length: 1024 tokens is more than the 256 positions" in error["message"]
    )
    # Advised as the job's validation advises it: what a job's client can change, the base model.
    assert "give the job a base model of 1024 positions or more" in error["message"]
    assert "rope_scaling" not in error["message"]


def test_compared_jobs_that_share_a_suffix_each_keep_their_curve(tmp_path):
    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store
    from tuneforge.web import KEY_COOKIE

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    app = create_api(tmp_path, store, api_keys=["key-a"], workers=0)
    ids = []
    for rate in (1e-3, 3e-3):
        job = supervised_job(
            "key-a", status="succeeded", suffix="same", fine_tuned_model=f"ft:tiny:tuneforge:same:{rate}"
        )
        store.add(job)
        write_run(tmp_path / "runs" / job.id, lr=rate)
        ids.append(job.id)
    with TestClient(app) as client:
        client.cookies.set(KEY_COOKIE, "key-a")
        compared = client.get("/ui/compare", params={"run": ids}).text
        assert 'id="train-curve-0"' in compared and 'id="train-curve-1"' in compared
        assert f"same ({ids[0]}): train" in compared and f"same ({ids[1]}): train" in compared


def test_tuneforge_ui_on_port_0_answers_where_it_says_and_a_port_in_use_is_refused_naming_it(tmp_path):
    import signal
    import socket
    import subprocess
    import sys

    import httpx
    from conftest import SUBPROCESS_ENV, announced_port

    write_run(tmp_path / "runs" / "a")
    command = [sys.executable, "-m", "tuneforge", "ui", str(tmp_path / "runs")]
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        ui = subprocess.Popen([*command, "--port", "0"], env=SUBPROCESS_ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = announced_port(log, ui, timeout=120)
        assert httpx.get(f"http://127.0.0.1:{port}/ui/runs/a", timeout=30).status_code == 200
        with socket.create_server(("127.0.0.1", 0)) as held:
            busy = held.getsockname()[1]
            refused = subprocess.run(
                [*command, "--port", str(busy)], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120
            )
        assert refused.returncode == 2, refused.stderr
        assert f"cannot listen on 127.0.0.1:{busy}" in refused.stderr and "--port" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=60)


def test_tuneforge_ui_refuses_a_bad_folder_or_a_port_in_use_before_loading_torch(tmp_path):
    # Those imports take a minute on a loaded machine; a mistyped argument is refused without waiting for them.
    import socket
    import subprocess
    import sys

    from conftest import SUBPROCESS_ENV

    (tmp_path / "runs").mkdir()
    (tmp_path / "notes.txt").write_text("")
    run_cli = (
        "import sys\nfrom tuneforge.cli import main\ntry:\n    main()\nfinally:\n"
        "    print(sorted({'torch', 'transformers', 'fastapi'} & set(sys.modules)))"
    )
    with socket.create_server(("127.0.0.1", 0)) as held:
        busy = held.getsockname()[1]
        for arguments, loaded, said in [
            (["missing"], "[]", "missing is not a folder"),
            (["notes.txt"], "[]", "notes.txt is not a folder"),
            (["runs", "--port", str(busy)], "['fastapi']", f"cannot listen on 127.0.0.1:{busy}"),
        ]:
            refused = subprocess.run(
                [sys.executable, "-c", run_cli, "ui", *arguments],
                cwd=tmp_path,
                env=SUBPROCESS_ENV,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert refused.returncode == 2 and said in refused.stderr, refused.stderr
            assert refused.stdout.strip() == loaded, arguments


def test_a_runs_page_shows_the_sample_answers_of_each_validation_the_latest_open(tmp_path):
    folder = write_run(tmp_path / "a")
    sample = {"example": 0, "prompt": "<|im_start|>user\nhi<|im_end|>\n", "reference": "hello", "tokens": 9}
    records = [
        {"step": 3, "samples": [{**sample, "answer": "hello hello <b>", "stopped": False, "tokens": 128}]},
        {"step": 6, "full_valid": True, "samples": [{**sample, "answer": "hello", "stopped": True}]},
    ]
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "sam')
    with TestClient(create_ui_app(tmp_path)) as client:
        page = client.get("/ui/runs/a").text
        live = client.get("/ui/live/a").json()["html"]
    for shown in (page, live):
        latest, earlier = shown.index('id="samples-6-final" open'), shown.index('id="samples-3"')
        assert latest < earlier and 'id="samples-3" open' not in shown
        assert "1 of 1 did not stop" in shown and "did not stop: 128 tokens, no end of turn" in shown
        assert "hello hello &lt;b&gt;" in shown  # the model's text is escaped


def test_a_runs_page_shows_its_multiple_choice_benchmarks_as_its_report_does(tmp_path):
    """eval.benchmarks: the run page's evaluation holds each benchmark's table (acc and acc_norm, base vs tuned,
    the paired change) from eval/benchmark_NAME.json, as report.html does."""
    from tuneforge.eval.choices import side_by_side
    from tuneforge.eval.report import write_run_report

    folder = write_run(tmp_path / "quizzed")

    def scored(correct: list[bool]) -> dict:
        samples = [
            {"line": i + 1, "input": "Q?", "choices": ["a", "b"], "answer": 0, "loglikelihoods": [-1.0, -2.0]}
            | {"prediction": 1 - ok, "prediction_norm": 1 - ok, "correct": ok, "correct_norm": ok}
            for i, ok in enumerate(correct)
        ]
        share = sum(correct) / len(correct)
        return {"n": len(correct), "data": "house-quiz.jsonl", "scores": {"acc": share, "acc_norm": share}} | {
            "intervals": {"acc": [0.0, 1.0], "acc_norm": [0.0, 1.0]},
            "samples": samples,
        }

    benchmark = {"name": "house_quiz", **side_by_side(scored([False, False]), scored([True, False]))}
    write_run_report(folder, None, None, benchmarks=[benchmark])
    with TestClient(create_ui_app(tmp_path)) as client:
        page = client.get("/ui/runs/quizzed").text
    assert "multiple choice on 2 questions of house-quiz.jsonl" in page
    assert "change (paired)" in page and "1 gained, 0 lost" in page


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"step": 2, "tra', "not JSON"),  # a line cut short, with whole lines after it
        (b"[1, 2]", "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'{"train_loss": 2.0}', "`step` is not an integer"),
        (b'{"step": "2", "train_loss": 2.0}', "`step` is not an integer"),
        (b'{"step": 2, "train_loss": "<b>low</b>"}', "`train_loss` is not a number"),
        (b'{"step": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nests arrays or objects too deeply"),
        (b'{"step": 2, "train_loss": ' + b"9" * 5000 + b"}", "more than 4,300 digits"),
        (b'{"step": 2, "train_loss": 1.0}\xff', "not UTF-8"),
    ],
)
def test_a_metrics_line_that_is_not_a_step_record_is_noted_on_its_run_and_the_others_still_show(
    tmp_path, line, problem
):
    write_run(tmp_path / "good")
    folder = write_run(tmp_path / "bad", finished=False)
    with open(folder / "metrics.jsonl", "ab") as f:  # after six whole records, and before a seventh
        f.write(line + b'\n{"step": 7, "train_loss": 2.2}\n')
    with TestClient(create_ui_app(tmp_path)) as client:
        listing = client.get("/ui/")
        assert listing.status_code == 200 and 'href="/ui/runs/good"' in listing.text
        [bad_row] = re.findall(r'<tr data-run="bad">.*?</tr>', listing.text, re.S)
        assert "<td>7</td>" in bad_row  # the step of the last whole record
        if len(line) < 4096:  # the list reads the last 8 KiB of the file: here all of it
            assert "metrics.jsonl line 7" in bad_row and html.escape(problem, quote=False) in bad_row
        for url in ("/ui/runs/bad", "/ui/live/bad", "/ui/compare?run=good&run=bad"):
            page = client.get(url)
            assert page.status_code == 200, (url, page.text[:300])
            assert "<b>low</b>" not in page.text
        run = client.get("/ui/runs/bad").text
        assert "metrics.jsonl line 7" in run and html.escape(problem, quote=False) in run
        assert 'id="train-curve"' in run  # the whole records still draw their curve


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("config.yaml", b"base_model: \xff\n", "config.yaml is not UTF-8"),
        ("config.yaml", b"train: [\n: b", "config.yaml line 2, column 1: not YAML"),
        ("config.yaml", b"- 1\n- 2\n", "config.yaml is not a mapping of settings"),
        ("summary.json", b"[1]", "summary.json is not a JSON object"),
        (
            "summary.json",
            b'{"status": "completed", "steps": 6, "metrics": "low"}',
            "summary.json is not as tuneforge writes it: its `metrics` is not an object",
        ),
        ("summary.json", b'{"status": {"a": 1}, "steps": "six"}', "its `status` is not a text"),
        ("summary.json", b'{"status": "completed", "metrics": {"step": 6, "elapsed": 1e400}}', None),
        ("summary.json", b'{"metrics": {"step": 6, "elapsed": "long"}}', "in its `metrics`, `elapsed` is not a number"),
        ("data_report.json", b"[1]", "data_report.json is not a JSON object"),
        (
            "data_report.json",
            b'{"errors": [1, "x"], "counts": [1], "files": 5}',
            "data_report.json is not as tuneforge writes it: its `counts` is not an object",
        ),
        ("data_report.json", b'{"errors": [{"code": ["x"]}]}', "its `errors.0.code` is not a text"),
        ("data_report.json", b'{"counts": {"rejected_by_code": 5}}', "its `counts.rejected_by_code` is not an object"),
    ],
)
def test_a_run_file_of_the_wrong_shape_is_noted_on_its_run_and_the_others_still_show(tmp_path, name, content, problem):
    write_run(tmp_path / "good")
    folder = write_run(tmp_path / "bad")
    (folder / name).write_bytes(content)
    if name == "data_report.json":  # the list reads the report of a run that stopped at its data check
        for written in ("config.yaml", "metrics.jsonl", "summary.json"):
            (folder / written).unlink()
    with TestClient(create_ui_app(tmp_path)) as client:
        listing = client.get("/ui/")
        assert listing.status_code == 200 and 'href="/ui/runs/good"' in listing.text
        [bad_row] = re.findall(r'<tr data-run="bad">.*?</tr>', listing.text, re.S)
        assert problem is None or html.escape(problem, quote=False) in bad_row
        for url in ("/ui/runs/bad", "/ui/live/bad", "/ui/compare?run=good&run=bad", "/ui/playground", "/ui/api/models"):
            page = client.get(url)
            assert page.status_code == 200, (url, page.text[:300])
        assert problem is None or html.escape(problem, quote=False) in client.get("/ui/runs/bad").text
        hello = [{"role": "user", "content": "hi"}]
        assert client.post("/v1/chat/completions", json={"model": "nope", "messages": hello}).status_code == 404


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"before.json": "[1]", "after.json": "[2]"}, "eval/before.json is not a JSON object"),
        ({"before.json": '{"loss": 1}', "after.json": '{"loss": {"a": 1}}'}, "eval/before.json and eval/after.json"),
        (
            {"before.json": '{"loss": 1, "tokens": 5}', "after.json": '{"tokens": 5}'},
            "eval/after.json does not hold `loss`",
        ),
        (  # a figure inside an object (usage.stopped_by_length): the file without it is named, not both
            {
                "before.json": '{"tokens": 5, "loss": null, "scores": null, "usage": {"stopped_by_length": 0}}',
                "after.json": '{"tokens": 5, "loss": null, "scores": null, "usage": {}}',
            },
            "eval/after.json does not hold `stopped_by_length`",
        ),
        ({"forgetting.json": '{"kl": 1}'}, "eval/forgetting.json"),
        ({"benchmark_arc.json": '{"base": 1, "tuned": [1], "difference": "x"}'}, "eval/benchmark_arc.json"),
        ({"samples.jsonl": '{"input": "q"}\n{"cut'}, "eval/samples.jsonl line 2"),
        ({"samples.jsonl": '{"input": "<b>q</b>"}\n'}, "eval/samples.jsonl"),
    ],
)
def test_evaluation_files_of_the_wrong_shape_are_noted_on_the_runs_page(tmp_path, files, problem):
    folder = write_run(tmp_path / "run")
    (folder / "eval").mkdir()
    for name, text in files.items():
        (folder / "eval" / name).write_text(text)
    with TestClient(create_ui_app(tmp_path)) as client:
        page = client.get("/ui/runs/run")
        assert page.status_code == 200, page.text[:300]
        assert html.escape(problem, quote=False) in page.text and "<b>q</b>" not in page.text
        assert 'id="train-curve"' in page.text  # the rest of the page is there


def test_a_config_whose_aliases_expand_to_millions_of_values_is_noted_not_expanded(tmp_path):
    folder = write_run(tmp_path / "bomb")
    # Nine lines of YAML: each alias list holds nine of the one before, 9**8 values in all once expanded.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    (folder / "config.yaml").write_text("base_model: tiny-base\n" + "\n".join(lines) + "\n")
    with TestClient(create_ui_app(tmp_path)) as client:
        started = time.perf_counter()
        page = client.get("/ui/runs/bomb")
        assert page.status_code == 200 and time.perf_counter() - started < 5
        said = "config.yaml line 6: the list or mapping there, with its aliases (*name), holds over 10,000 keys"
        assert len(page.text) < 1_000_000 and said in page.text
        assert said in client.get("/ui/").text


def test_a_config_with_an_integer_too_long_for_python_is_noted_not_a_server_error(tmp_path):
    folder = write_run(tmp_path / "run")
    (folder / "config.yaml").write_text("base_model: tiny-base\nseed: " + "9" * 5_000 + "\n")
    with TestClient(create_ui_app(tmp_path)) as client:
        page = client.get("/ui/runs/run")
        assert page.status_code == 200, page.text[:300]
        assert "config.yaml: the YAML has an integer of more than 4,300 digits" in page.text


@pytest.mark.parametrize(
    ("body", "param", "said"),
    [
        (b'{"file_id": "\\ud800", "model": "tiny"}', "file_id", "'file_id' is not Unicode text"),
        (b'{"file_id": "file-1", "model": "tiny", "\\udc00": 1}', "\\udc00", "is not Unicode text"),
        (b'{"file_id": "file-1", "model": "tiny", "method": 1}', "method", "Invalid value for 'method'"),
    ],
)
def test_the_check_of_a_file_refuses_a_body_that_is_not_unicode_or_of_the_wrong_type_naming_it(
    tmp_path, body, param, said
):
    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    app = create_api(tmp_path, Store(f"sqlite:///{tmp_path / 'jobs.db'}"), api_keys=["key-a"], workers=0)
    with TestClient(app) as client:
        headers = {"Authorization": "Bearer key-a", "Content-Type": "application/json"}
        refused = client.post("/ui/api/check", content=body, headers=headers)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == param and said in error["message"]


@pytest.mark.parametrize("report", [{"tokens": {"trained": 1}}, {"errors_total": 1, "errors": [{}]}, {}])
def test_a_data_report_missing_fields_shows_what_it_has(tmp_path, report):
    folder = write_run(tmp_path / "run")
    (folder / "data_report.json").write_text(json.dumps(report))
    with TestClient(create_ui_app(tmp_path)) as client:
        page = client.get("/ui/runs/run")
    assert page.status_code == 200, page.text[:300]
    assert 'id="data-report"' in page.text and 'id="train-curve"' in page.text


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (
            '{"step": 1, "samples": 5}',
            "samples.jsonl line 2 is not as tuneforge writes it: its `samples` is not a list",
        ),
        ('{"step": 1, "samples": [5]}', "its `samples.0` is not an object"),
        ("[1, 2]", "samples.jsonl line 2 is not a JSON object"),
        ('{"step": 4, "samples": [{"answer": "\xff"}]}', "samples.jsonl line 2 is not UTF-8"),
        ('{"step": 4, "sampl', "samples.jsonl line 2 is not JSON"),  # cut short, with a whole line after it
    ],
)
def test_a_validation_samples_record_of_the_wrong_shape_is_noted_and_the_others_shown(tmp_path, record, problem):
    folder = write_run(tmp_path / "run")
    shown = {"step": 3, "samples": [{"example": 0, "answer": "kept answer", "reference": "r", "stopped": True}]}
    lines = [json.dumps(shown).encode(), record.encode("latin-1"), b'{"step": 5, "samples": []}', b'{"step": 6, "sa']
    (folder / "samples.jsonl").write_bytes(b"\n".join(lines))  # the last line still being written
    with TestClient(create_ui_app(tmp_path)) as client:
        page = client.get("/ui/runs/run")
        assert page.status_code == 200, page.text[:300]
        assert "kept answer" in page.text and html.escape(problem, quote=False) in page.text
        assert "samples.jsonl line 4" not in page.text  # still being written: left out unsaid
        assert client.get("/ui/live/run").status_code == 200


def test_a_jobs_page_notes_what_its_run_folder_holds_that_training_does_not_write(tmp_path):
    from tuneforge.jobs.api import create_api
    from tuneforge.jobs.store import Store

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    app = create_api(tmp_path, store, api_keys=["key-a"], workers=0)
    job = supervised_job("key-a", status="running", fine_tuned_model="ft:tiny:tuneforge::abc")
    store.add(job)
    folder = tmp_path / "runs" / job.id
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('[1]\n{"step": 1, "train_loss": 1.0}\n')
    with TestClient(app) as client:
        headers = {"Authorization": "Bearer key-a"}
        for url in ("/ui/", f"/ui/runs/{job.id}", f"/ui/live/{job.id}"):
            page = client.get(url, headers=headers)
            assert page.status_code == 200 and "metrics.jsonl line 1 is not a step" in page.text, url


def test_the_ui_startup_line_prints_the_runs_folder_as_named(tmp_path, capsys, unserved):
    # rich would read `[/x]` in a user's path as a closing tag (an error) and `:x:` as an emoji's code.
    from tuneforge.dashboard.command import ui_command

    (tmp_path / "[").mkdir()
    runs = tmp_path / "[" / "x]:x: [bold]"
    runs.mkdir()
    assert ui_command(runs, host="127.0.0.1", port=0, max_models=1) == 0
    assert f"tuneforge ui: the runs under {runs.resolve()} at http://" in capsys.readouterr().err
