"""Experiment trackers (train.report_to) on a tiny model: W&B offline and MLflow's file store, read back."""

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
from conftest import tiny_run_config

from tuneforge.errors import TuneforgeError
from tuneforge.training import train


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file: a LevelDB-style log of 32 KiB blocks after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, records = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7]) if left >= 7 else (0, 0)
        if kind == 0:  # a block's padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_and_mlflow_get_the_records_and_config_and_a_resumed_run_continues_their_runs_without_repeats(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    pytest.importorskip("wandb", reason="W&B is not installed: pip install -e '.[wandb]'")
    pytest.importorskip("mlflow", reason="MLflow is not installed: pip install -e '.[mlflow]'")
    from mlflow import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "triage")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to use a file: store
    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=4, save_every=2, eval_every=2, batch_size=4)
    cfg["train"]["report_to"] = ["wandb", "mlflow"]
    cfg["train"]["wandb"] = {"tags": ["tiny"]}
    cfg["train"]["mlflow"] = {"experiment": "triage"}
    cfg["train"].update(eval_samples=2, eval_max_new_tokens=4)
    train(cfg, progress=False)
    train(cfg, resume=str(run / "checkpoints" / "step-2"), progress=False)  # steps 3 and 4 again
    logged = [r for r in metrics(run) if "lr" in r]

    client = MlflowClient(store)
    (only,) = client.search_runs([client.get_experiment_by_name("triage").experiment_id])
    assert only.info.run_name == "run" and only.info.status == "FINISHED"
    assert only.data.params["train.learning_rate"] == "0.001" and only.data.params["train.report_to"]
    history = client.get_metric_history(only.info.run_id, "train_loss")
    by_step = {m.step: m.value for m in history}
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # steps 3 and 4 once: the resumed run repeats them
    assert by_step == {r["step"]: pytest.approx(r["train_loss"]) for r in logged}
    assert {m.step for m in client.get_metric_history(only.info.run_id, "valid_loss")} == {2}
    artifacts = {a.path for a in client.list_artifacts(only.info.run_id, "samples")}
    assert artifacts == {"samples/step-000002.json", "samples/step-000004.json"}
    sampled = json.loads(Path(client.download_artifacts(only.info.run_id, "samples/step-000002.json")).read_text())[0]
    assert sampled["prompt"].endswith("<|im_start|>assistant\n") and sampled["stopped"] is False

    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # one W&B run id, started then resumed
    first, resumed = (wandb_records(f) for f in files)
    (started,) = [r.run for r in first if r.WhichOneof("record_type") == "run"]
    assert (started.display_name, started.project, list(started.tags)) == ("run", "triage", ["tiny"])
    config = {item.key: json.loads(item.value_json) for item in started.config.update}
    assert config["train"]["learning_rate"] == 0.001
    losses, tables = [], []
    for record in first + resumed:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "lr" in items:
                losses.append((items["step"], items["train_loss"]))
            if "samples/_type" in items:  # a table: its rows are an artifact of the run
                tables.append((items["step"], items["samples/_type"], items["samples/nrows"]))
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert tables == [(2, "table-file", 2), (4, "table-file", 2)]
    assert sorted(losses) == sorted((m.step, m.value) for m in history)  # W&B and MLflow got the same values


def test_a_tracker_that_is_not_installed_is_refused_before_any_data_or_model_loads(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as where it is not installed
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    cfg["train"]["report_to"] = "wandb"
    with pytest.raises(TuneforgeError) as e:
        train(cfg, progress=False)
    assert "train.report_to" in e.value.message and "pip install 'tuneforge[wandb]'" in e.value.message
    assert not (tmp_path / "run" / "data_report.json").exists()


def test_wandb_without_a_login_says_how_to_log_in_once(tiny_model_dir, triage_data, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="W&B is not installed: pip install -e '.[wandb]'")
    from tuneforge.config import load_config
    from tuneforge.training import trackers

    # An earlier test's offline run leaves wandb's process-wide settings (WANDB_MODE=offline) behind.
    wandb.teardown()
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)
    cfg["train"]["report_to"] = ["wandb"]
    with pytest.raises(TuneforgeError, match="wandb could not start its run: W&B has no API key") as refused:
        trackers.Trackers(load_config(cfg), None)
    assert refused.value.message.count("wandb login") == 1 and "WANDB_MODE=offline" in refused.value.message


def test_a_tracker_that_fails_mid_run_warns_once_and_training_goes_on(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow", reason="MLflow is not installed: pip install -e '.[mlflow]'")
    from tuneforge.training import loop

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "mlruns"
    real_step = loop.train_step

    def store_lost_after_step_1(run, step, *args):
        if step == 1:
            shutil.rmtree(store)  # the tracking store is gone, as a server out of reach
        return real_step(run, step, *args)

    monkeypatch.setattr(loop, "train_step", store_lost_after_step_1)
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=3)
    cfg["train"]["report_to"] = ["mlflow"]
    cfg["train"]["mlflow"] = {"tracking_uri": f"file:{store}"}
    with pytest.warns(UserWarning, match="mlflow: could not report the run's metrics") as said:
        result = train(cfg, progress=False)
    assert result.status == "completed" and [r["step"] for r in metrics(tmp_path / "run") if "lr" in r] == [1, 2, 3]
    assert sum("mlflow" in str(w.message) for w in said) == 1


def test_an_mlflow_tracking_uri_its_client_cannot_use_is_refused_before_any_data_or_model_loads(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow", reason="MLflow is not installed: pip install -e '.[mlflow]'")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    cfg["train"]["report_to"] = ["mlflow"]
    cfg["train"]["mlflow"] = {"tracking_uri": "nosuchscheme://host"}
    with pytest.raises(TuneforgeError) as e:
        train(cfg, progress=False)
    assert "train.report_to" in e.value.message and "MLFLOW_TRACKING_URI" in e.value.message
    assert not (tmp_path / "run" / "data_report.json").exists()


def test_mlflow_without_a_tracking_uri_whose_default_store_needs_the_full_package_says_so(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed: pip install -e '.[mlflow]'")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)

    def skinny_client(tracking_uri=None):  # mlflow-skinny's client on its default SQLite store
        raise ModuleNotFoundError("No module named 'alembic'", name="alembic")

    monkeypatch.setattr(mlflow, "MlflowClient", skinny_client)
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    cfg["train"]["report_to"] = ["mlflow"]
    with pytest.raises(TuneforgeError) as e:
        train(cfg, progress=False)
    said = e.value.message
    assert "no tracking URI is set" in said and f"MLflow's default, {mlflow.get_tracking_uri()}," in said
    assert "alembic" in said and "pip install mlflow" in said and "MLFLOW_TRACKING_URI" in said


def test_tensorboard_gets_the_records_and_a_resumed_run_drops_its_events_past_the_checkpoint(
    tiny_model_dir, triage_data, tmp_path
):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed: pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=4, save_every=2, batch_size=4)
    cfg["train"].update(report_to=["tensorboard"], eval_samples=1, eval_max_new_tokens=4)
    train(cfg, progress=False)
    train(cfg, resume=str(run / "checkpoints" / "step-2"), progress=False)  # steps 3 and 4 again
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train_loss")]
    assert losses == [(r["step"], pytest.approx(r["train_loss"])) for r in metrics(run) if "lr" in r]
    assert {"config/text_summary", "samples/text_summary"} <= set(events.Tags()["tensors"])


def test_tensorboard_that_cannot_start_stops_a_run_that_asked_for_it_and_not_one_that_did_not(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    # An installed TensorBoard is used without being asked for (train.report_to unset); where it cannot
    # start (a run folder it cannot write), a run that never named it goes on without it.
    from tuneforge.config import load_config
    from tuneforge.training import trackers

    def cannot_write(cfg, out, resume_step, ids):
        raise PermissionError(13, "Permission denied", str(out / "tensorboard"))

    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: object())  # as if installed
    monkeypatch.setitem(trackers.STARTS, "tensorboard", cannot_write)
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)
    with pytest.warns(UserWarning, match="training goes on without it"):
        assert trackers.Trackers(load_config(cfg), None).writers == {}
    cfg["train"]["report_to"] = ["tensorboard"]
    with pytest.raises(TuneforgeError, match="tensorboard could not start its run"):
        trackers.Trackers(load_config(cfg), None)


def test_tensorboard_of_a_fresh_run_drops_the_events_a_run_killed_before_its_first_checkpoint_left(
    tiny_model_dir, triage_data, tmp_path
):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed: pip install -e '.[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=3, save_every=0, batch_size=4)
    cfg["train"]["report_to"] = ["tensorboard"]
    train(cfg, progress=False)
    # What a run killed before its first checkpoint leaves: its events and metrics, no checkpoint, no final model.
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    cfg["train"]["max_steps"] = 2
    train(cfg, progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]


def mlflow_run(tiny_model_dir, triage_data, tmp_path, monkeypatch, max_steps: int):
    """A tiny run's config reporting to an MLflow file store under tmp_path (checkpoints every 2 steps, all kept),
    and a function giving the steps of train_loss that store holds, in order."""
    pytest.importorskip("mlflow", reason="MLflow is not installed: pip install -e '.[mlflow]'")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    cfg = tiny_run_config(
        tiny_model_dir,
        triage_data,
        tmp_path / "run",
        max_steps=max_steps,
        save_every=2,
        batch_size=2,
        keep_checkpoints=5,
    )
    cfg["train"]["report_to"] = ["mlflow"]
    cfg["train"]["mlflow"] = {"tracking_uri": store}

    def sent() -> list[int]:
        client = MlflowClient(store)
        (only,) = client.search_runs([client.get_experiment_by_name("tuneforge").experiment_id])
        return sorted(m.step for m in client.get_metric_history(only.info.run_id, "train_loss"))

    return cfg, sent


def test_a_tracker_run_gets_each_step_once_over_several_resumes_and_an_attempt_without_it(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    # Each tracker's own mark of what it got decides what it is sent, not the log lines a resume drops: a
    # second resume from the same checkpoint (the first dying before the last step) sends no step again,
    # and the steps an attempt without the tracker trained go to it when a later attempt has it again.
    from tuneforge.training import loop

    run = tmp_path / "run"
    cfg, sent = mlflow_run(tiny_model_dir, triage_data, tmp_path, monkeypatch, max_steps=6)
    real_step = loop.train_step

    def dies_at(last):
        def step(run, step, *args):
            if step == last:
                raise RuntimeError("killed")
            return real_step(run, step, *args)

        return step

    train(cfg, progress=False)  # steps 1-6
    monkeypatch.setattr(loop, "train_step", dies_at(5))
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, resume=str(run / "checkpoints" / "step-2"), progress=False)  # steps 3 and 4 again, then dies
    monkeypatch.setattr(loop, "train_step", real_step)
    train(cfg, resume=str(run / "checkpoints" / "step-2"), progress=False)  # steps 3-6 again
    assert sent() == [1, 2, 3, 4, 5, 6]

    without = {**cfg, "train": {**cfg["train"], "report_to": [], "max_steps": 8}}
    train(without, resume=str(run / "checkpoints" / "step-6"), force=True, progress=False)  # steps 7, 8
    longer = {**cfg, "train": {**cfg["train"], "max_steps": 8}}
    train(longer, resume=str(run / "checkpoints" / "step-6"), force=True, progress=False)  # steps 7, 8 again
    assert sent() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_tracker_run_gets_the_steps_an_attempt_without_it_trained_up_to_the_checkpoint_resumed(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    # An attempt without MLflow trains steps 5-6 and checkpoints them: a later `--resume` (latest) with MLflow
    # again starts past them, and sends them from metrics.jsonl, as it sends no step MLflow got before.
    cfg, sent = mlflow_run(tiny_model_dir, triage_data, tmp_path, monkeypatch, max_steps=4)
    train(cfg, progress=False)  # steps 1-4
    without = {**cfg, "train": {**cfg["train"], "report_to": [], "max_steps": 6}}
    train(without, resume="latest", force=True, progress=False)  # steps 5, 6
    longer = {**cfg, "train": {**cfg["train"], "max_steps": 8}}
    train(longer, resume="latest", force=True, progress=False)  # steps 7, 8
    assert sent() == list(range(1, 9))


def test_a_tracker_run_gets_the_sample_answers_an_attempt_without_it_wrote_up_to_the_checkpoint_resumed(
    tiny_model_dir, triage_data, tmp_path, monkeypatch
):
    # The sample answers follow the metrics' rule: those of the validation at step 5, which an attempt without
    # MLflow wrote to samples.jsonl before its checkpoint at step 6, go to MLflow when a later attempt has it again.
    from mlflow import MlflowClient

    cfg, sent = mlflow_run(tiny_model_dir, triage_data, tmp_path, monkeypatch, max_steps=4)
    cfg["train"].update(eval_every=1, eval_samples=1, eval_max_new_tokens=2)
    train(cfg, progress=False)  # samples at steps 1-4
    without = {**cfg, "train": {**cfg["train"], "report_to": [], "max_steps": 6}}
    train(without, resume="latest", force=True, progress=False)  # samples at steps 5 and 6
    longer = {**cfg, "train": {**cfg["train"], "max_steps": 8}}
    train(longer, resume="latest", force=True, progress=False)  # samples at steps 7 and 8
    assert sent() == list(range(1, 9))
    client = MlflowClient(cfg["train"]["mlflow"]["tracking_uri"])
    (only,) = client.search_runs([client.get_experiment_by_name("tuneforge").experiment_id])
    artifacts = {a.path for a in client.list_artifacts(only.info.run_id, "samples")}
    # Step 6's are the final validation's of that attempt, which a run resumed past it does not keep.
    assert artifacts == {f"samples/step-{step:06d}.json" for step in (1, 2, 3, 4, 5, 7, 8)}
