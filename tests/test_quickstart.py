"""The quickstart end to end on the tiny model: every phase runs, files appear, targets are judged."""

import io
import json

import pytest
from rich.console import Console
from tiny_sharp import save_sharp_tiny_model

from tuneforge.quickstart import Targets, check_targets, quickstart

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quickstart_runs_every_phase_and_says_which_targets_it_missed(tmp_path):
    out = tmp_path / "qs"
    printed = io.StringIO()
    # The sharp tiny model replies with text (the plain one with newlines only): its replies are the replay.
    model = save_sharp_tiny_model(tmp_path / "model")
    code = quickstart(out, model=str(model), n_train=40, max_steps=2, test_subset=3,
                      console=Console(file=printed, width=160))
    text = printed.getvalue()
    assert code == 1  # a random tiny model cannot triage tickets
    for phase in ("1/6 model", "2/6 data", "3/6 base", "4/6 fine-tune", "5/6 tuned", "6/6 forgetting"):
        assert phase in text
    assert "missed targets:" in text and "tuned: all three fields right" in text and "wall time" in text
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        assert (out / "data" / name).is_file()
    assert (out / "final" / "adapter_config.json").is_file()
    for name in ("report.html", "before.json", "after.json", "forgetting.json", "samples.jsonl"):
        assert (out / "eval" / name).is_file(), name
    assert json.loads((out / "eval" / "after.json").read_text())["n"] == 3


def test_targets_are_judged_against_their_goals():
    scores = lambda exact: {"n": 100, "scores": {"exact": exact}}  # noqa: E731
    questions = lambda kept, base: {"n": 115, "retained": kept, "base_accuracy": base}  # noqa: E731
    forgetting = {"general_text": {"change": 0.01}, "general_questions": questions(0.97, 1.0)}
    met = check_targets(Targets(), 600, scores(0.1), scores(0.9), forgetting)
    assert all(t["met"] for t in met)
    missed = check_targets(Targets(), 1000, scores(0.3), scores(0.8),
                           {"general_text": {"change": 0.05}, "general_questions": questions(0.9, 0.8)})
    assert not any(t["met"] for t in missed)
    # A share of 100 tickets carries its 95% interval; questions kept too, when the base knew them all.
    assert met[1]["measured"] == "90.0% (95% interval 82.6%-94.5%)"
    assert missed[1]["measured"] == "80.0% (95% interval 71.1%-86.7%)"
    assert met[3]["measured"] == "97.0% (95% interval 92.1%-98.9%)"
    assert missed[3]["measured"] == "90.0%"
