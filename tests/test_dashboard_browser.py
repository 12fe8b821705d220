"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Against a real `tuneforge api` (the tiny model, keys on): log in, upload a bad file and see its
problems by line, start a job on a good one, watch it reach `succeeded` with the curve drawn
(the page follows it on its own), open its report, chat with the fine-tuned model beside its base;
another key sees none of it. Against a real `tuneforge ui` over two trained run folders: the list,
a run page with its evaluation, the comparison chart, chat. Screenshots of each page go to the
test's tmp_path. Without a browser these tests skip, saying how to install one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from browser import Screenshots, chromium, console_errors, wait_until
from conftest import SUBPROCESS_ENV, announced_port, tiny_run_config
from test_dashboard import write_run
from test_jobs import KEY, OTHER_KEY, ApiServer, chat_rows, upload

pytestmark = pytest.mark.xdist_group("dashboard_browser")

JOB_TIMEOUT_S = 180
SERVER_START_S = 120


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    api = ApiServer(tmp_path_factory.mktemp("dashboard-home"), allowed=[tiny_model_dir]).start()
    yield api
    api.stop()


def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def all_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def log_in(driver, base: str, key: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{base}/ui/")
    wait_until(lambda: "/ui/login" in driver.current_url, "the login page")
    by_css(driver, "#api-key").send_keys(key)
    by_css(driver, "#login-form button[type=submit]").click()
    wait_until(lambda: all_css(driver, "#runs, #empty"), "the jobs list after logging in")


def chat_side_by_side(driver, shots: Screenshots, message: str) -> dict[str, str]:
    """Send `message` from the playground; what each answer's usage line says, once both have come."""
    by_css(driver, "#message").send_keys(message)
    by_css(driver, "#send").click()

    def answers():
        replies = {side: all_css(driver, f"#transcript-{side} li.assistant") for side in ("left", "right")}
        if all(r and "answered" in r[-1].get_attribute("class") for r in replies.values()):
            return {side: r[-1].find_element("css selector", "small.usage").text for side, r in replies.items()}
        errors = all_css(driver, "ol.transcript li.error")
        assert not errors, errors[0].text

    found = wait_until(answers, "both models' answers", timeout=120)
    shots.take("playground")
    return found


def test_upload_check_train_watch_report_and_chat_in_a_browser(browser, server, tiny_model_dir, tmp_path):
    shots = Screenshots(browser, tmp_path / "screenshots")
    server.wait_ready()
    base = f"http://127.0.0.1:{server.port}"
    log_in(browser, base, KEY)
    shots.take("jobs-empty")

    browser.get(f"{base}/ui/new")
    model_select = by_css(browser, "#model")
    from selenium.webdriver.support.ui import Select

    Select(model_select).select_by_value(str(tiny_model_dir))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat_rows(3) + '{"messages": [{"role": "user"}]}\n' + '{"prompt_only": 1}\n')
    by_css(browser, "#training-file").send_keys(str(bad))
    problems = wait_until(lambda: all_css(browser, "#training-check table.problems tr")[1:], "the bad file's problems")
    cells = [row.find_elements("css selector", "td") for row in problems]
    assert {cell[1].text for cell in cells} == {"4", "5"}, [[c.text for c in row] for row in cells]
    assert all(cell[0].text.endswith("(bad.jsonl)") and cell[0].text.startswith("file-") for cell in cells)
    assert not by_css(browser, "#start-job").is_enabled()
    shots.take("new-job-problems")

    good = tmp_path / "train.jsonl"
    good.write_text(chat_rows(12))
    by_css(browser, "#training-file").clear()
    by_css(browser, "#training-file").send_keys(str(good))
    wait_until(lambda: by_css(browser, "#training-check p.ok"), "the good file passing its check")
    valid = tmp_path / "valid.jsonl"
    valid.write_text(chat_rows(4, start=100))
    by_css(browser, "#validation-file").send_keys(str(valid))
    wait_until(lambda: by_css(browser, "#validation-check p.ok"), "the validation file passing its check")
    wait_until(lambda: by_css(browser, "#start-job").is_enabled(), "the start button")
    for field, value in (("n_epochs", "2"), ("batch_size", "4")):
        by_css(browser, f"#{field}").clear()
        by_css(browser, f"#{field}").send_keys(value)
    by_css(browser, "#suffix").send_keys("browser")
    shots.take("new-job-ready")
    by_css(browser, "#start-job").click()

    wait_until(lambda: "/ui/runs/ftjob-" in browser.current_url, "the new job's page")
    job_id = browser.current_url.rsplit("/", 1)[1]
    # No reload from the test: the page follows the job by itself until it has finished.
    wait_until(
        lambda: by_css(browser, "#run-status").text in ("succeeded", "failed", "cancelled"),
        "the job to finish",
        timeout=JOB_TIMEOUT_S,
        on_timeout=server.log,
    )
    assert by_css(browser, "#run-status").text == "succeeded", by_css(browser, "#live").text
    wait_until(lambda: all_css(browser, "#loss-chart svg #train-curve path"), "the training curve")
    assert all_css(browser, "#loss-chart svg #valid-curve") and all_css(browser, "#loss-chart svg #final-valid")
    assert [row.text.split()[0] for row in all_css(browser, "#checkpoints tr")[1:]] == ["6", "3"]
    assert "The job has successfully completed." in by_css(browser, "#events").text
    shots.take("job-succeeded")

    report = by_css(browser, "#data-report")
    browser.execute_script("arguments[0].scrollIntoView()", report)
    assert "16 read, 16 valid, 0 rejected" in report.text and "No problems." in report.text
    assert "(train.jsonl)" in report.text and str(server.home) not in browser.page_source
    assert "n_epochs" in by_css(browser, "#hyperparameters").text
    shots.take("job-report")

    by_css(browser, "#chat-tuned").click()
    wait_until(lambda: "/ui/playground" in browser.current_url, "the playground")
    tuned = by_css(browser, "#model-right").get_attribute("value")
    assert tuned.startswith(f"ft:{tiny_model_dir.name}:tuneforge:browser:")
    assert by_css(browser, "#model-left").get_attribute("value") == str(tiny_model_dir)
    usage = chat_side_by_side(browser, shots, "What is two plus two?")
    assert all(int(line.split()[0]) >= 1 for line in usage.values()), usage

    browser.get(f"{base}/ui/")
    row = by_css(browser, f'tr[data-run="{job_id}"]')
    assert "succeeded" in row.text and "supervised" in row.text
    shots.take("jobs-list")


def test_a_key_sees_only_its_own_jobs_in_the_dashboard(browser, server, tiny_model_dir, tmp_path):
    shots = Screenshots(browser, tmp_path / "screenshots")
    alice = server.client(KEY)
    job = alice.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=upload(alice, chat_rows(8)).id)
    base = f"http://127.0.0.1:{server.port}"
    try:
        log_in(browser, base, KEY)
        assert all_css(browser, f'tr[data-run="{job.id}"]')
        log_in(browser, base, OTHER_KEY)
        assert not all_css(browser, f'tr[data-run="{job.id}"]')
        shots.take("other-key-list")
        browser.get(f"{base}/ui/runs/{job.id}")
        assert by_css(browser, "#error").text.startswith("There is no run")
        playground_models = [o.get_attribute("value") for o in all_css(browser, "#model-left option")]
        assert job.fine_tuned_model not in playground_models
        by_css(browser, "#logout").click()
        wait_until(lambda: "/ui/login" in browser.current_url, "the login page after logging out")
        browser.get(f"{base}/ui/runs/{job.id}")
        assert "/ui/login" in browser.current_url
        by_css(browser, "#api-key").send_keys("not-a-key")
        by_css(browser, "#login-form button[type=submit]").click()
        wait_until(lambda: by_css(browser, "#login-error").is_displayed(), "the refusal of a wrong key")
        assert "Incorrect API key" in by_css(browser, "#login-error").text
        shots.take("wrong-key")
    finally:
        with contextlib.suppress(openai.BadRequestError):  # it may have finished already: nothing to stop
            alice.fine_tuning.jobs.cancel(job.id)


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, tiny_model_dir, one_thread) -> Path:
    """Two short LoRA runs of the tiny model with evaluation (base vs tuned, forgetting), at two learning rates."""
    import tuneforge
    from tuneforge.tasks.support_triage import generate

    root = tmp_path_factory.mktemp("ui-runs")

    data = generate(root / "data", n_train=32, n_valid=8, n_test=8, seed=1)
    for name, rate in (("lr-1e-3", 1e-3), ("lr-3e-3", 3e-3)):
        config = tiny_run_config(
            tiny_model_dir, data, root / "runs" / name, learning_rate=rate, batch_size=2, eval_every=4, save_every=4
        )
        config["eval"] = {"task": "auto", "forgetting": True}
        tuneforge.train(config, progress=False)
    return root / "runs"


def start_ui(runs: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tuneforge", "ui", str(runs), "--port", "0"],
            env={**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{announced_port(log, process, SERVER_START_S)}"

    def ready():
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{base}/ui/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, "tuneforge ui to answer", timeout=SERVER_START_S, on_timeout=log.read_text)
    return process, base


def test_tuneforge_ui_shows_run_folders_their_reports_a_comparison_and_chat(browser, trained_runs, tmp_path):
    shots = Screenshots(browser, tmp_path / "screenshots")
    process, base = start_ui(trained_runs, tmp_path / "ui.log")
    try:
        browser.delete_all_cookies()
        console_errors(browser)  # the browser is shared: what earlier tests' pages logged (their 404s by design) goes
        browser.get(f"{base}/")
        rows = wait_until(lambda: all_css(browser, "#runs tbody tr"), "the runs list")
        assert sorted(row.get_attribute("data-run") for row in rows) == ["lr-1e-3", "lr-3e-3"]
        assert all("completed" in row.text for row in rows)
        shots.take("runs")

        browser.get(f"{base}/ui/runs/lr-1e-3")
        assert all_css(browser, "#loss-chart svg #train-curve path") and all_css(browser, "#lr-chart svg")
        evaluation = by_css(browser, "#evaluation").text
        assert "base" in evaluation and "tuned" in evaluation and "Forgetting" in evaluation
        assert "Examples" in evaluation  # sample answers side by side
        assert "learning_rate" in by_css(browser, "#hyperparameters").text
        assert "No problems." in by_css(browser, "#data-report").text
        assert console_errors(browser) == []  # no failed request (a favicon's 404) nor script error
        shots.take("run")

        by_css(browser, "#report-file").click()
        wait_until(lambda: "tuneforge report" in browser.title, "the run's report.html")
        shots.take("report")

        browser.get(f"{base}/ui/")
        for box in all_css(browser, "#runs input[type=checkbox]"):
            box.click()
        by_css(browser, "#compare-selected").click()
        wait_until(lambda: all_css(browser, "#compare-chart svg"), "the comparison chart")
        for i in (0, 1):
            assert all_css(browser, f"#compare-chart svg #train-curve-{i} path")
        assert len(all_css(browser, "#compared tr")) == 3
        shots.take("compare")

        browser.get(f"{base}/ui/runs/lr-3e-3")
        by_css(browser, "#chat-tuned").click()
        wait_until(lambda: "/ui/playground" in browser.current_url, "the playground")
        assert by_css(browser, "#model-right").get_attribute("value") == "lr-3e-3"
        usage = chat_side_by_side(browser, shots, "Hello")
        assert all(int(line.split()[0]) >= 1 for line in usage.values()), usage
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_run_page_keeps_following_the_run_after_the_server_stops_answering_and_says_so(browser, tmp_path):
    # A failed request ended the page's polling: after a moment without the server it never updated again.
    run = write_run(tmp_path / "runs" / "live", finished=False)
    process, base = start_ui(tmp_path / "runs", tmp_path / "ui.log")
    try:
        browser.get(f"{base}/ui/runs/live")
        assert "step 6" in by_css(browser, "p.progress").text
        browser.execute_cdp_cmd("Network.enable", {})
        offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
        wait_until(lambda: "does not answer" in by_css(browser, "#live-note").text, "the note that the server is away")
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {**offline, "offline": False})
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 7, "train_loss": 2.2, "lr": 1e-3, "elapsed": 3.5}) + "\n")
        wait_until(lambda: "step 7" in by_css(browser, "p.progress").text, "the page to follow the run again")
        assert not by_css(browser, "#live-note").is_displayed()
        shutil.rmtree(run)
        wait_until(lambda: "no longer there" in by_css(browser, "#live-note").text, "the note that the run is gone")
    finally:
        browser.execute_cdp_cmd("Network.disable", {})
        process.terminate()
        process.wait(timeout=30)


def test_a_run_pages_sample_answers_keep_the_latest_validation_open_as_the_run_goes_on(browser, tmp_path):
    # The latest validation open, earlier ones a click away; a step a person opened stays open as the page redraws.
    run = write_run(tmp_path / "runs" / "live", finished=False)

    def validation(step: int) -> None:
        sample = {"example": 0, "prompt": "hi", "answer": f"answer {step}", "reference": "ref", "stopped": True}
        with open(run / "samples.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "samples": [{**sample, "tokens": 2}]}) + "\n")

    def opened() -> list[str]:
        return [d.get_attribute("id") for d in all_css(browser, "#samples > details") if d.get_attribute("open")]

    validation(2)
    validation(4)
    process, base = start_ui(tmp_path / "runs", tmp_path / "ui.log")
    try:
        browser.get(f"{base}/ui/runs/live")
        assert opened() == ["samples-4"]
        by_css(browser, "#samples-2 summary").click()
        validation(6)
        wait_until(lambda: all_css(browser, "#samples-6"), "the new validation's answers")
        assert opened() == ["samples-6", "samples-2"]
    finally:
        process.terminate()
        process.wait(timeout=30)


# The lines a table cell's text is laid out on, as the browser wraps it: its characters grouped by their top.
LINES_OF = """
const text = document.querySelector(arguments[0]).firstChild, lines = [];
let top = null;
for (let i = 0; i < text.length; i++) {
  const range = document.createRange();
  range.setStart(text, i);
  range.setEnd(text, i + 1);
  const at = Math.round(range.getBoundingClientRect().top);
  if (at !== top) lines.push("");
  top = at;
  lines[lines.length - 1] += text.data[i];
}
return lines;
"""


def test_at_phone_width_pages_do_not_scroll_sideways_and_a_model_name_wraps_at_its_hyphens(browser, tmp_path):
    # The runs list of a 160-character run name was 2000 px wide at 390 px: the whole page scrolled sideways.
    # A model's name wraps at its hyphens, not inside a word (smollm2-135m-i / nstruct).
    name = "very-long-run-name-" * 8
    write_run(tmp_path / "runs" / name)
    short = write_run(tmp_path / "runs" / "short")
    (short / "config.yaml").write_text(yaml.safe_dump({"base_model": "smollm2-135m-instruct", "method": "lora"}))
    process, base = start_ui(tmp_path / "runs", tmp_path / "ui.log")
    try:
        browser.set_window_size(390, 844)
        for page in ("/ui/", f"/ui/runs/{name}", f"/ui/compare?run={name}&run=short", "/ui/playground"):
            browser.get(base + page)
            widths = browser.execute_script("return [document.body.scrollWidth, window.innerWidth]")
            assert widths[0] <= widths[1], (page, widths)
            if page in ("/ui/", f"/ui/compare?run={name}&run=short"):
                lines = browser.execute_script(LINES_OF, 'tr:has(a[href$="/short"]) td.model')
                assert len(lines) > 1 and all(line.endswith("-") for line in lines[:-1]), (page, lines)
    finally:
        browser.set_window_size(1280, 900)
        process.terminate()
        process.wait(timeout=30)
