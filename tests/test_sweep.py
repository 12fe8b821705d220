"""`tuneforge sweep`: a grid of settings trained one run after another on the tiny model, ranked, resumable."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import tiny_run_config
from test_cli import run_cli

from tuneforge import sweep
from tuneforge.errors import ConfigError
from tuneforge.sweeps import parse_grid


@pytest.fixture
def config(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2, eval_every=1, save_every=1)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_sweep_trains_each_point_ranks_them_and_a_rerun_keeps_them(config, tmp_path, one_thread, capsys):
    out = tmp_path / "sweep"
    result = sweep(config, ["train.learning_rate=1e-2,1e-5", "lora.r=4"], out=out, progress=False)
    names = ["learning_rate-1e-2_r-4", "learning_rate-1e-5_r-4"]
    assert sorted(run.name for run in result.runs) == names
    for name in names:  # ordinary run folders
        assert (out / name / "final").is_dir() and (out / name / "config.yaml").is_file()
    written = json.loads((out / "sweep.json").read_text())
    losses = [run["eval_loss"] for run in written["runs"]]
    assert losses == sorted(losses) and None not in losses
    # The values as the config holds them, not as typed.
    assert written["grid"] == {"train.learning_rate": [0.01, 1e-05], "lora.r": [4]}
    assert written["best"]["name"] == written["runs"][0]["name"] == result.best.name
    assert yaml.safe_load((out / result.best.name / "config.yaml").read_text())["train"]["learning_rate"] in (
        0.01,
        1e-5,
    )
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    said = capsys.readouterr().out
    assert "sweep: 2 runs (2 train.learning_rate x 1 lora.r)" in said and "best (final validation loss" in said
    # Captured output is no terminal, as a log file: each run's row is one line with its figures whole.
    for run in result.runs:
        (row,) = [line for line in said.splitlines() if line.startswith(f"│ {run.name} ")][-1:]
        assert all(f"{figure:.4f}" in row for figure in (run.eval_loss, run.best_eval_loss, run.train_loss))

    # A rerun trains nothing again: the finished runs are kept, with the same figures.
    metrics = {name: (out / name / "metrics.jsonl").stat().st_mtime_ns for name in names}
    again = sweep(config, ["train.learning_rate=1e-2,1e-5", "lora.r=4"], out=out, progress=False)
    assert {name: (out / name / "metrics.jsonl").stat().st_mtime_ns for name in names} == metrics
    assert [(r.name, r.eval_loss) for r in again.runs] == [(r["name"], r["eval_loss"]) for r in written["runs"]]
    assert "finished earlier; kept" in capsys.readouterr().out


def test_a_rerun_keeps_and_resumes_runs_of_a_config_that_leaves_a_whole_number_setting_at_its_default(
    config, tmp_path, one_thread, capsys
):
    # lora.alpha's default is the integer 32; a run's config.yaml writes it, and reads back as the number 32.0.
    cfg = yaml.safe_load(config.read_text())
    del cfg["lora"]["alpha"]
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "sweep"
    sweep(config, ["lora.r=2,4"], out=out, progress=False)
    capsys.readouterr()
    shutil.rmtree(out / "r-4" / "final")  # interrupted after its last checkpoint
    again = sweep(config, ["lora.r=2,4"], out=out, progress=False)
    assert [run.status for run in again.runs] == ["completed", "completed"]
    said = capsys.readouterr().out
    assert "r-2 finished earlier; kept" in said and "sweep run r-4 (resumed)" in said


def test_a_rerun_resumes_an_interrupted_run_and_refuses_a_finished_run_of_another_config(
    config, tmp_path, one_thread, capsys, monkeypatch
):
    from tuneforge import sweeps

    out = tmp_path / "sweep"
    sweep(config, {"train.learning_rate": [1e-3]}, out=out, progress=False)
    run = out / "learning_rate-0.001"
    # As a run killed after its last checkpoint leaves it: no final model, no summary.
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    capsys.readouterr()
    # The point's config is loaded once, and its folder's state (finished, to resume, new) read once.
    loaded, found = [], []
    real_load, real_found = sweeps.load_config, sweeps._resume_mode
    monkeypatch.setattr(sweeps, "load_config", lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    monkeypatch.setattr(sweeps, "_resume_mode", lambda folder: found.append(folder) or real_found(folder))
    result = sweep(config, {"train.learning_rate": [1e-3]}, out=out, progress=False)
    monkeypatch.undo()
    assert len([given for given in loaded if len(given) > 1 and "train.learning_rate=0.001" in given[1]]) == 1
    assert found == [run]
    assert "sweep run learning_rate-0.001 (resumed)" in capsys.readouterr().out
    assert result.runs[0].status == "completed" and result.runs[0].steps == 2
    assert (run / "final").is_dir()
    # Interrupted again, then the sweep run with another base config: the run is not continued as this point's.
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    with pytest.raises(
        ConfigError, match=r"holds an interrupted run of another config \(train.max_steps: 2 -> 3\)"
    ) as e:
        sweep(config, {"train.learning_rate": [1e-3]}, ["train.max_steps=3"], out=out, progress=False)
    assert "--force" not in e.value.message  # the sweep has no such option
    sweep(config, {"train.learning_rate": [1e-3]}, out=out, progress=False)
    # The base config changed since: the finished run is no run of this sweep's point.
    with pytest.raises(ConfigError, match=r"holds a finished run of another config \(train.max_steps: 2 -> 3\)"):
        sweep(config, {"train.learning_rate": [1e-3]}, ["train.max_steps=3"], out=out, progress=False)


@pytest.mark.parametrize(
    ("summary", "told"),
    [("[]", "holds an array"), ('"completed"', "holds a string"), ('{"status": "compl', "is not JSON")],
)
def test_a_run_whose_summary_is_no_json_object_is_refused_as_damaged_naming_it(config, tmp_path, summary, told):
    """A finished run's summary.json that is no JSON object (edited by hand, written by another program) is
    refused as a damaged summary naming the file and what to do, before any run trains: not an AttributeError, nor
    the run taken for an unfinished one."""
    out = tmp_path / "sweep"
    run = out / "learning_rate-0.001"
    (run / "final").mkdir(parents=True)
    (run / "summary.json").write_text(summary)
    with pytest.raises(ConfigError) as refused:
        sweep(config, {"train.learning_rate": [1e-3]}, out=out, progress=False)
    message = refused.value.message
    point = "sweep run learning_rate-0.001 (train.learning_rate=0.001)"
    assert message.startswith(f"{point}: {run / 'summary.json'} {told}"), message
    assert message.endswith(f": the run's summary is damaged. Delete {run} to train the run again."), message
    assert sorted(p.name for p in run.iterdir()) == ["final", "summary.json"]


def test_a_rerun_refuses_a_finished_run_trained_on_data_edited_since(config, tmp_path, triage_data, one_thread):
    # The sweep's data file, edited after its run finished: the kept run would rank as one on the new rows.
    data = tmp_path / "train.jsonl"
    shutil.copyfile(triage_data["train"], data)
    out, overrides = tmp_path / "sweep", [f"data.train={data}"]
    sweep(config, {"train.learning_rate": [1e-3]}, overrides, out=out, progress=False)
    rows = data.read_text().splitlines(keepends=True)
    data.write_text("".join(rows[: len(rows) // 2]))
    with pytest.raises(ConfigError, match=r"learning_rate-0.001 holds a finished run on other data \(the contents"):
        sweep(config, {"train.learning_rate": [1e-3]}, overrides, out=out, progress=False)


@pytest.mark.parametrize(
    "sets, overrides, message",
    [
        (
            ["train.lr=1e-3,1e-4"],
            [],
            r"(?s)--set train.lr=1e-3: .*train.lr \(override\): unknown key. tuneforge calls it ",
        ),
        (["train.learning_rate=1e-3,fast"], [], r"(?s)--set train.learning_rate=fast: .*valid number.*\(got 'fast'\)"),
        (
            ["lora.r=4,0"],
            [],
            r"(?s)--set lora.r=0: .*lora.r \(override\): must be at least 1 and at most 1024 \(got 0\)",
        ),
        (
            ["lora.r=4,8"],
            ["data.validation=null"],
            r"--metric eval_loss ranks the runs by their validation loss, and "
            r"data.validation is unset: no validation rows. Set data.validation",
        ),
    ],
)
def test_every_point_is_checked_before_any_run(config, tmp_path, sets, overrides, message):
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match=message):
        sweep(config, sets, overrides, out=out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("under", ["", "sub"])
def test_an_out_that_is_a_file_or_under_one_is_refused_naming_out(config, tmp_path, under):
    (tmp_path / "notes").write_text("kept")
    out = tmp_path / "notes" / under if under else tmp_path / "notes"
    with pytest.raises(ConfigError) as err:
        sweep(config, ["lora.r=4,8"], out=out, progress=False)
    assert err.value.message.startswith(f"--out {out}: {tmp_path / 'notes'} is a file"), err.value.message
    assert "output_dir" not in err.value.message  # the sweep's own option, not each run's key
    assert (tmp_path / "notes").read_text() == "kept"


def test_grid_values_parse_as_a_yaml_list():
    grid = parse_grid(["train.learning_rate=1e-4, 2e-4", "lora.target_modules=[q_proj,v_proj],[q_proj]"])
    assert grid == {"train.learning_rate": ["1e-4", "2e-4"], "lora.target_modules": [["q_proj", "v_proj"], ["q_proj"]]}
    with pytest.raises(ConfigError, match="a value of lora.r is given twice"):
        parse_grid(["lora.r=8,8"])
    # A trailing comma leaves a value out, as a comma in the middle does: refused, not swept with one value fewer.
    for values in ("1e-4,", "1e-4,2e-4, "):
        with pytest.raises(ConfigError, match="give train.learning_rate one or more values, comma-separated, none"):
            parse_grid([f"train.learning_rate={values}"])
    with pytest.raises(ConfigError, match="each run of a sweep has its own folder"):
        parse_grid(["output_dir=a,b"])
    # A syntax error is placed by its column in the values, as an override's is.
    with pytest.raises(ConfigError) as caught:
        parse_grid(["lora.target_modules=[q_proj,v_proj,[q_proj]"])
    assert caught.value.message.startswith("--set 'lora.target_modules=[q_proj,v_proj,[q_proj]': the values of ")
    assert "at column 24)" in caught.value.message, caught.value.message


def test_the_python_api_takes_one_key_as_a_string_and_names_a_key_given_no_list(config, tmp_path):
    # One "KEY=V1,V2" string is that key's values (not one key per character), checked as the CLI's --set.
    assert parse_grid("train.learning_rate=1e-4,2e-4") == {"train.learning_rate": ["1e-4", "2e-4"]}
    with pytest.raises(ConfigError, match="(?s)--set train.learning_rate=zero: .*valid number"):
        sweep(config, "train.learning_rate=1e-4,zero", out=tmp_path / "s", progress=False)
    with pytest.raises(ConfigError, match="gives lora.r 8: give it a list"):
        sweep(config, {"lora.r": 8}, out=tmp_path / "s", progress=False)
    with pytest.raises(ConfigError, match=r"^a sweep's grid is a dict of each key's values .*, not NoneType\.$"):
        sweep(config, None, out=tmp_path / "s", progress=False)
    with pytest.raises(ConfigError, match=r"^--set 8 is int: give KEY=V1,V2,\.\.\. as a string\.$"):
        sweep(config, ["train.learning_rate=1e-4", 8], out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_the_cli_refuses_a_bad_point_with_exit_2(config, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["sweep", str(config), "--set", "train.lr=1e-3,1e-4"], monkeypatch, capsys)
    assert code == 2 and "unknown key. tuneforge calls it train.learning_rate" in err


def test_the_python_api_is_the_sweep_function_even_once_the_cli_has_loaded_it():
    import tuneforge
    import tuneforge.cli  # noqa: F401

    assert "sweep" in dir(tuneforge) and callable(tuneforge.sweep) and tuneforge.sweep.__name__ == "sweep"


def test_each_point_has_its_own_folder_and_one_setting_given_twice_is_refused(config, tmp_path, triage_data):
    from tuneforge.sweeps import check_points

    # Two files whose paths differ only where a folder name has no room for the characters: two folders.
    spaced, dashed = tmp_path / "v a.jsonl", tmp_path / "v-a.jsonl"
    for path in (spaced, dashed):
        shutil.copy(triage_data["validation"], path)
    points = check_points(config, [], {"data.validation": [str(spaced), str(dashed)]}, tmp_path / "s", "eval_loss")
    assert [run.name for run, _ in points] == ["validation-v-a.jsonl", "validation-v-a.jsonl-2"]
    with pytest.raises(ConfigError, match=r"train the same settings \(train.learning_rate=0.001\)"):
        check_points(config, [], {"train.learning_rate": ["1e-3", 0.001]}, tmp_path / "s", "eval_loss")


def test_a_long_value_makes_a_short_folder_name(config, tmp_path, tiny_model_dir):
    from tuneforge.sweeps import check_points

    template = (tiny_model_dir / "chat_template.jinja").read_text()
    points = check_points(config, [], {"model.chat_template": ["chatml", template]}, tmp_path / "s", "eval_loss")
    names = [run.name for run, _ in points]
    # A template written out (hundreds of characters) would be a name the file system refuses past 255 bytes.
    assert names[0] == "chat_template-chatml" and len(template) > 255 and len(names[1]) < 60


def test_the_help_shows_the_brackets_of_a_list_value(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(["sweep", "--help"], monkeypatch, capsys)
    assert code == 0 and "'lora.target_modules=[q_proj,v_proj],[v_proj]'" in out


def test_a_run_whose_validation_loss_is_nan_ranks_last_and_is_never_the_best(tmp_path):
    # A high learning rate can leave a run completed with a NaN validation loss, which sorts anywhere.
    from tuneforge.sweeps import SweepResult, write_outputs

    losses = {"lr-0.1": float("nan"), "lr-0.001": 1.2, "lr-0.0001": 0.8}
    runs = completed_runs(
        tmp_path,
        {
            name: [{"step": 1, "train_loss": 2.0, "valid_loss": loss}, {"step": 2, "full_valid_loss": loss}]
            for name, loss in losses.items()
        },
    )
    for metric in ("eval_loss", "best_eval_loss"):
        result = SweepResult(tmp_path, metric, runs)
        write_outputs(result, {"train.learning_rate": [0.1, 0.001, 0.0001]}, None)
        written = json.loads((tmp_path / "sweep.json").read_text())
        assert [run["name"] for run in written["runs"]] == ["lr-0.0001", "lr-0.001", "lr-0.1"]
        assert result.best.name == written["best"]["name"] == "lr-0.0001"


def test_a_grpo_sweep_ranks_by_validation_reward_higher_first_and_refuses_the_loss_metrics(
    config, tiny_model_dir, triage_data, tmp_path, one_thread
):
    # A grpo run validates by the reward of its answers (valid_reward) and logs no validation loss.
    from test_grpo import grpo_config

    from tuneforge.eval.report import loss_figure, read_metrics
    from tuneforge.sweeps import SweepResult, write_outputs

    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(grpo_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)))
    for metric in ("eval_loss", "best_eval_loss", "train_loss"):
        with pytest.raises(ConfigError, match="method: grpo grades its validation answers.*--metric eval_reward"):
            sweep(path, ["train.learning_rate=1e-3"], out=tmp_path / "refused", metric=metric, progress=False)
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ConfigError, match="method: lora logs losses, and no reward; rank by --metric eval_loss"):
        sweep(config, ["train.learning_rate=1e-3"], out=tmp_path / "refused", metric="eval_reward", progress=False)

    result = sweep(path, ["train.learning_rate=1e-3"], out=tmp_path / "sweep", progress=False)
    (run,) = result.runs
    assert result.metric == "eval_reward" and run.eval_reward is not None and result.best is run
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the rewards drawn

    rewards = {"lr-0.1": 0.25, "lr-0.001": 0.75, "lr-0.0001": 0.5}
    runs = completed_runs(
        tmp_path,
        {
            name: [{"step": 1, "train_loss": 0.1, "valid_reward": reward}, {"step": 2, "full_valid_reward": reward}]
            for name, reward in rewards.items()
        },
    )
    for metric in ("eval_reward", "best_eval_reward"):
        result = SweepResult(tmp_path, metric, runs)
        write_outputs(result, {"train.learning_rate": [0.1, 0.001, 0.0001]}, None)
        assert [run["name"] for run in json.loads((tmp_path / "sweep.json").read_text())["runs"]] == [
            "lr-0.001",
            "lr-0.0001",
            "lr-0.1",
        ]
    # Each run's validation rewards, on an axis that says higher is better, and no training loss.
    figure = loss_figure({run.name: read_metrics(run.output_dir) for run in runs}, "reward")
    assert "higher is better" in figure.axes[0].get_ylabel()
    assert sorted(line.get_gid() for line in figure.axes[0].lines) == sorted(
        f"{curve}-{i}" for i in range(3) for curve in ("valid-curve", "final-valid")
    )


def test_a_rerun_evaluates_a_run_stopped_during_its_evaluation_after_training(
    tiny_model_dir, triage_data, tmp_path, one_thread, monkeypatch
):
    from tuneforge import pipeline

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)
    cfg["eval"] = {"task": "support_triage"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out, real = tmp_path / "sweep", pipeline.evaluate_after_training

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C once training finished and wrote its final model and summary.json

    monkeypatch.setattr(pipeline, "evaluate_after_training", stopped)
    with pytest.raises(KeyboardInterrupt):
        sweep(path, ["lora.r=4"], out=out, progress=False)
    run = out / "r-4"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    monkeypatch.setattr(pipeline, "evaluate_after_training", real)
    trained = (run / "final" / "adapter_model.safetensors").stat().st_mtime_ns
    (result,) = sweep(path, ["lora.r=4"], out=out, progress=False).runs
    assert result.status == "completed" and (run / "eval" / "report.html").is_file()
    assert "task_exact" in json.loads((run / "summary.json").read_text())["metrics"]
    assert (run / "final" / "adapter_model.safetensors").stat().st_mtime_ns == trained  # evaluated, not trained again


@pytest.mark.parametrize("stopped_at", ["summary", "report"])
def test_an_evaluation_stopped_between_its_metrics_and_its_report_is_run_again(
    tiny_model_dir, triage_data, tmp_path, one_thread, monkeypatch, stopped_at
):
    # summary.json's metrics are written first, report.html last: a kill anywhere before the report leaves the
    # evaluation missing, so a rerun completes it; no report stands beside a summary that lacks its figures.
    from tuneforge import pipeline
    from tuneforge.config import load_config
    from tuneforge.eval import after_training

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)
    cfg["eval"] = {"task": "support_triage"}
    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    if stopped_at == "summary":
        monkeypatch.setattr(pipeline, "write_json", killed)  # summary.json's, with the evaluation's metrics
    else:
        monkeypatch.setattr(after_training, "write_run_report", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(cfg, progress=False)
    monkeypatch.undo()
    loaded = load_config(cfg)
    assert pipeline.evaluation_missing(loaded)
    pipeline.evaluate_run(loaded, progress=False)
    assert not pipeline.evaluation_missing(loaded) and (run / "eval" / "report.html").is_file()
    assert "task_exact" in json.loads((run / "summary.json").read_text())["metrics"]


def completed_runs(folder, metrics: dict[str, list[dict]]) -> list:
    """A completed sweep run per name (`lr-VALUE`), each under `folder` with the metrics.jsonl records given."""
    from tuneforge.sweeps import SweepRun, read_run

    runs = []
    for name, records in metrics.items():
        (folder / name).mkdir()
        (folder / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(SweepRun(name, {"train.learning_rate": float(name[3:])}, folder / name, status="completed"))
        read_run(runs[-1])
    return runs


def test_checking_the_points_shows_its_progress_and_progress_false_shows_none(config, tmp_path, monkeypatch, capsys):
    from tuneforge import progress
    from tuneforge.sweeps import check_points

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    grid = {"train.learning_rate": [1e-3, 2e-3], "lora.r": [2, 4]}
    check_points(config, [], grid, tmp_path / "s", "eval_loss", progress=True)
    lines = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()]
    assert lines == [f"sweep: checking points {n}/4" for n in range(1, 5)]
    check_points(config, [], grid, tmp_path / "s", "eval_loss", progress=False)
    assert capsys.readouterr().err == ""


def test_points_that_share_the_models_structure_build_it_once(config, tmp_path, monkeypatch):
    from tuneforge import methods
    from tuneforge.models import meta_model
    from tuneforge.sweeps import check_points

    built = []
    monkeypatch.setattr(methods, "meta_model", lambda *a, **k: built.append(1) or meta_model(*a, **k))
    grid = {"train.learning_rate": [1e-3, 2e-3, 3e-3], "lora.r": [2, 4]}
    assert len(check_points(config, [], grid, tmp_path / "s", "eval_loss")) == 6
    # One structure for each rank, the learning rates sharing it; a later check builds it again.
    assert len(built) == 2
    check_points(config, [], {"lora.r": [2, 4]}, tmp_path / "s", "eval_loss")
    assert len(built) == 4
    with pytest.raises(ConfigError, match="lora.target_modules"):
        check_points(config, ["lora.target_modules=[nowhere]"], {"lora.r": [2, 4]}, tmp_path / "s", "eval_loss")


def test_a_sweep_prints_its_folder_and_a_runs_error_as_written(config, tmp_path, monkeypatch, capsys):
    # An error quotes the user's values, the folder is the user's: rich would read `[/x]` in them as a closing
    # tag (an error that ends the sweep) and `:x:` as an emoji's code.
    from tuneforge import pipeline
    from tuneforge.errors import TuneforgeError

    def refused(*args, **kwargs):
        raise TuneforgeError("the value ':x: [/x]' is refused")

    monkeypatch.setattr(pipeline, "train", refused)
    out = tmp_path / "[/x] :x:"
    result = sweep(config, ["lora.r=2"], out=out, progress=False)
    assert [run.status for run in result.runs] == ["failed"]
    said = " ".join(capsys.readouterr().out.split())  # lines wrapped at 80 columns, joined
    assert "sweep run r-2 failed: the value ':x: [/x]' is refused" in said
    assert f"into {out}" in said and f"sweep {out} (by" in said and f"wrote {out / 'sweep.json'}" in said
