"""Early stopping and the best checkpoint (train.early_stopping_patience, early_stopping_threshold,
keep_best) on a tiny model that overfits a few rows."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from safetensors.torch import load_file

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.training import train


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def overfit_data(triage_data, tmp_path_factory) -> dict:
    """Four training rows and validation rows unlike them: at a high learning rate, valid_loss falls,
    then climbs as the model learns the four rows by heart."""
    folder = tmp_path_factory.mktemp("overfit")
    rows = Path(triage_data["train"]).read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(rows[:4]) + "\n")
    shutil.copy(triage_data["validation"], folder / "valid.jsonl")
    return {"train": folder / "train.jsonl", "validation": folder / "valid.jsonl"}


def overfit_config(model_dir, data, out, **train) -> dict:
    settings = {"max_steps": 30, "batch_size": 4, "learning_rate": 2e-2, "warmup": 0, "scheduler": "constant"}
    cfg = tiny_run_config(model_dir, data, out, eval_every=2, **{**settings, **train})
    cfg["lora"]["dropout"] = 0.0
    return cfg


def valid_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["valid_loss"] for m in metrics(run) if "valid_loss" in m}


def test_a_run_that_overfits_stops_early_and_finishes_as_a_completed_run(
    tiny_model_dir, overfit_data, tmp_path, capsys
):
    run = tmp_path / "run"
    result = train(overfit_config(tiny_model_dir, overfit_data, run, early_stopping_patience=2), progress=False)
    losses = valid_losses(run)
    best_step = min(losses, key=losses.get)
    stopped = best_step + 2 * 2  # two validations, 2 steps apart, no better than the best
    assert result.status == "completed" and result.steps == stopped < 30
    assert max(losses) == stopped
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == stopped
    assert summary["epochs"] == stopped  # the epochs trained (one step each), not the 30 planned
    assert summary["stopped_early"]["step"] == stopped and summary["stopped_early"]["of"] == 30
    assert summary["best"] == {"step": best_step, "valid_loss": losses[best_step]}
    assert "full_valid_loss" in summary["metrics"] and (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / f"step-{stopped}").is_dir()
    said = capsys.readouterr().out
    assert f"stopped early at step {stopped} of 30" in said and "train.early_stopping_patience" in said


def test_keep_best_writes_the_best_validations_weights_as_the_final_model(tiny_model_dir, overfit_data, tmp_path):
    run = tmp_path / "run"
    cfg = overfit_config(tiny_model_dir, overfit_data, run, max_steps=16, keep_best=True, keep_checkpoints=1)
    result = train(cfg, progress=False)
    losses = valid_losses(run)
    best_step = min(losses, key=losses.get)
    assert best_step < 16 and result.steps == 16  # the run overfits after its best validation
    kept = {p.name for p in (run / "checkpoints").iterdir()}
    assert kept == {f"step-{best_step}", "step-16"}  # keep_checkpoints: 1 keeps the last and the best
    final = load_file(run / "final" / "adapter_model.safetensors")
    best = load_file(run / "checkpoints" / f"step-{best_step}" / "adapter_model.safetensors")
    last = load_file(run / "checkpoints" / "step-16" / "adapter_model.safetensors")
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"] == {"step": best_step, "valid_loss": losses[best_step]}
    assert summary["metrics"]["best_step"] == best_step
    assert summary["metrics"]["full_valid_loss"] == pytest.approx(losses[best_step], rel=1e-5)


def test_a_resumed_run_stops_early_where_the_uninterrupted_one_did(tiny_model_dir, overfit_data, tmp_path):
    run = tmp_path / "run"
    cfg = overfit_config(tiny_model_dir, overfit_data, run, early_stopping_patience=2, save_every=2)
    cfg["train"]["keep_checkpoints"] = 30
    uninterrupted = train(cfg, progress=False)
    losses = valid_losses(run)
    best_step = min(losses, key=losses.get)
    # Resumed from the first validation after the best: one of the two no better than it is behind it.
    resume_at = run / "checkpoints" / f"step-{best_step + 2}"
    resumed = train(cfg, resume=str(resume_at), progress=False)
    assert resumed.steps == uninterrupted.steps
    assert json.loads((run / "summary.json").read_text())["stopped_early"]["step"] == uninterrupted.steps


@pytest.mark.parametrize(
    "train_keys, data_keys, said",
    [
        ({"early_stopping_patience": 2}, {"validation": 0}, "data.validation"),
        ({"keep_best": True}, {"validation": None}, "data.validation"),
        ({"early_stopping_patience": 2, "eval_every": 0}, {}, "train.eval_every"),
        ({"early_stopping_threshold": 0.01}, {}, "train.early_stopping_threshold"),
    ],
)
def test_early_stopping_and_keep_best_without_validations_to_judge_are_refused_at_load(
    tmp_path, train_keys, data_keys, said
):
    cfg = {
        "base_model": "smollm2-135m-instruct",
        "data": {"train": "t.jsonl", **data_keys},
        "train": {"eval_every": 5, **train_keys},
        "output_dir": str(tmp_path / "run"),
    }
    with pytest.raises(ConfigError, match=said) as error:
        load_config(cfg)
    assert "line" in str(error.value) or "train." in str(error.value)


def test_the_new_keys_at_their_defaults_keep_the_results_hash_and_hugging_faces_names_point_to_them(tmp_path):
    cfg = {"base_model": "smollm2-135m-instruct", "data": {"train": "t.jsonl"}}
    plain = load_config(cfg).results_hash()
    defaults = {"early_stopping_patience": 0, "early_stopping_threshold": 0.0, "keep_best": False}
    assert load_config({**cfg, "train": defaults}).results_hash() == plain
    assert load_config({**cfg, "train": {"keep_best": True}}).results_hash() != plain
    for name, ours in (("load_best_model_at_end", "train.keep_best"), ("metric_for_best_model", "valid_loss")):
        with pytest.raises(ConfigError, match=ours):
            load_config({**cfg, "train": {name: True}})
