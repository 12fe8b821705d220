"""The quickstart end to end on the tiny model: every phase runs, files appear, targets are judged; its training
config is the shipped recipe, which `tuneforge train` runs on the data `--data-only` writes."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from tiny import save_tiny_model
from tiny_sharp import save_sharp_tiny_model
from transformers import AutoConfig

import tuneforge
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.quickstart import Targets, check_targets, quickstart, quickstart_config
from tuneforge.recipes import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quickstart_runs_every_phase_and_says_which_targets_it_missed(tmp_path):
    out = tmp_path / "qs"
    printed = io.StringIO()
    # The sharp tiny model replies with text (the plain one with newlines only): its replies are the replay.
    model = save_sharp_tiny_model(tmp_path / "model")
    code = quickstart(
        out, model=str(model), n_train=40, max_steps=2, test_subset=3, console=Console(file=printed, width=160)
    )
    text = printed.getvalue()
    assert code == 1  # a random tiny model cannot triage tickets
    for phase in ("1/6 model", "2/6 data", "3/6 base", "4/6 fine-tune", "5/6 tuned", "6/6 forgetting"):
        assert phase in text
    assert "missed targets:" in text and "tuned: all three fields right" in text and "wall time" in text
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "unlabelled.jsonl"):  # the last for distill_triage
        assert (out / "data" / name).is_file()
    assert (out / "final" / "adapter_config.json").is_file()
    for name in ("report.html", "before.json", "after.json", "forgetting.json", "samples.jsonl"):
        assert (out / "eval" / name).is_file(), name
    assert json.loads((out / "eval" / "after.json").read_text())["n"] == 3


def test_a_model_that_cannot_train_the_recipe_is_refused_before_any_data_or_model_work(tmp_path):
    """A model with fewer positions than the recipe's data.max_length: the quickstart says so before it writes
    the tickets, generates replay replies or scores the base model, as `tuneforge train` would after them."""
    model = save_tiny_model(tmp_path / "model")
    config = AutoConfig.from_pretrained(model)
    config.max_position_embeddings = 256
    config.save_pretrained(model)
    out, printed = tmp_path / "qs", io.StringIO()
    with pytest.raises(ConfigError) as refused:
        quickstart(out, model=str(model), n_train=40, max_steps=2, console=Console(file=printed, width=160))
    assert refused.value.message.startswith(f"{model} cannot train the quickstart recipe")
    assert "data.max_length: 512 tokens is more than the 256 positions model was built for" in refused.value.message
    assert "choose another --model" in refused.value.message
    assert not out.exists()  # no tickets, no replay replies
    assert "1/6 model" in printed.getvalue() and "2/6 data" not in printed.getvalue()


def test_targets_are_judged_against_their_goals():
    scores = lambda exact: {"n": 100, "scores": {"exact": exact}}  # noqa: E731
    questions = lambda kept, base: {"n": 115, "retained": kept, "base_accuracy": base}  # noqa: E731
    forgetting = {"general_text": {"change": 0.01}, "general_questions": questions(0.97, 1.0)}
    met = check_targets(Targets(), 600, scores(0.1), scores(0.9), forgetting)
    assert all(t["met"] for t in met)
    missed = check_targets(
        Targets(),
        1000,
        scores(0.3),
        scores(0.8),
        {"general_text": {"change": 0.05}, "general_questions": questions(0.9, 0.8)},
    )
    assert not any(t["met"] for t in missed)
    # A share of 100 tickets carries its 95% interval; questions kept too, when the base knew them all.
    assert met[1]["measured"] == "90.0% (95% interval 82.6%-94.5%)"
    assert missed[1]["measured"] == "80.0% (95% interval 71.1%-86.7%)"
    assert met[3]["measured"] == "97.0% (95% interval 92.1%-98.9%)"
    assert missed[3]["measured"] == "90.0%"
    # A base that knows none of the questions has none to lose.
    unknown = {"general_text": {"change": 0.01}, "general_questions": questions(None, 0.0)}
    [*_, kept_row, _] = check_targets(Targets(), 600, scores(0.1), scores(0.9), unknown)
    assert kept_row["measured"] == "the base knows none" and kept_row["met"]


def test_the_training_config_is_the_recipe_with_data_run_folder_and_overrides_only():
    data = {"train": Path("d/t.jsonl"), "validation": Path("d/v.jsonl"), "replay": Path("d/r.jsonl"), "test": Path("x")}
    recipe = load_recipe("quickstart")
    config = quickstart_config(data, Path("out"))
    assert config["data"] == {
        **recipe["data"],
        "train": "d/t.jsonl",
        "validation": "d/v.jsonl",
        "general_replay": "d/r.jsonl",
    }
    assert {**config, "data": recipe["data"], "output_dir": recipe["output_dir"]} == recipe
    assert config["output_dir"] == "out"
    changed = quickstart_config(data, Path("out"), model="m", max_steps=7, learning_rate=1e-3, lora_r=8)
    assert (changed["base_model"], changed["train"]["max_steps"], changed["train"]["learning_rate"]) == ("m", 7, 1e-3)
    assert (changed["lora"]["r"], changed["lora"]["alpha"]) == (8, recipe["lora"]["alpha"] / 2)  # alpha / r kept
    assert load_recipe("quickstart") == recipe  # the recipe itself is left as it was


def test_train_runs_the_recipe_on_the_data_only_files_as_the_printed_commands_say(tmp_path, monkeypatch):
    """A new user's way: `tuneforge quickstart --data-only`, then the commands it prints, as printed."""
    monkeypatch.chdir(tmp_path)
    model = save_sharp_tiny_model(tmp_path / "model")
    printed = io.StringIO()
    assert (
        quickstart(model=str(model), n_train=40, max_steps=2, data_only=True, console=Console(file=printed, width=100))
        == 0
    )
    recipe = load_recipe("quickstart")
    for key in ("train", "validation", "general_replay"):
        assert (tmp_path / recipe["data"][key]).is_file(), key  # where the recipe looks, from the working folder
    assert not (tmp_path / recipe["output_dir"] / "final").exists()
    commands = [line.strip() for line in printed.getvalue().splitlines() if line.startswith("  tuneforge ")]
    assert commands == [
        "tuneforge recipes show quickstart > quickstart.yaml",
        f"tuneforge train quickstart.yaml base_model={model} train.max_steps=2",
    ]
    shell = 'tuneforge() { "$PYTHON" -m tuneforge "$@"; }\n' + "\n".join(commands)
    src = str(Path(tuneforge.__file__).resolve().parents[1])
    done = subprocess.run(
        ["bash", "-ec", shell],
        env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / recipe["output_dir"]
    assert (run / "final" / "adapter_config.json").is_file()
    data = {
        key: (tmp_path / "runs/quickstart/data" / name).resolve()
        for key, name in (("train", "train.jsonl"), ("validation", "validation.jsonl"), ("replay", "replay.jsonl"))
    }
    expected = quickstart_config(data, Path(recipe["output_dir"]), model=str(model), max_steps=2)
    assert yaml.safe_load((run / "config.yaml").read_text()) == load_config(expected).model_dump()


def test_quickstart_prints_the_model_and_its_folder_as_named(tmp_path, monkeypatch, capsys):
    # rich would read `[/x]` in a user's path as a closing tag (an error) and `:x:` as an emoji's code.
    monkeypatch.setenv("COLUMNS", "1000")
    (tmp_path / "[").mkdir()
    model = save_sharp_tiny_model(tmp_path / "[" / "x]:x: [bold]")
    out = tmp_path / "[" / "x]:x: [bold] run"
    assert quickstart(model=str(model), out=out, n_train=40, max_steps=2, data_only=True) == 0
    said = capsys.readouterr().out
    assert f"fine-tune {model} on support-ticket triage, on this machine's CPU, into {out}\n" in said, said
    assert f"in {out / 'data'} (test tickets" in said
