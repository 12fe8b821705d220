"""The Python API (`tuneforge.evaluate`, ...): each function gives what its CLI command prints or writes, as
Python values, and raises `tuneforge.errors` where the command exits."""

from __future__ import annotations

import json
import sys

import pytest

import tuneforge
from tuneforge.cli import main
from tuneforge.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def cli_json(args: list[str], monkeypatch, capsys) -> dict:
    """What `tuneforge ARGS` prints, read as JSON; the command must succeed."""
    monkeypatch.setattr(sys, "argv", ["tuneforge", *args])
    with pytest.raises(SystemExit) as leaving:
        main()
    said = capsys.readouterr()
    assert leaving.value.code == 0, said.err
    return json.loads(said.out)


def test_evaluate_returns_the_metrics_eval_json_prints(tiny_model_dir, triage_data, monkeypatch, capsys):
    args = [str(tiny_model_dir), str(triage_data["test"]), "--limit", "2", "--max-new-tokens", "4"]
    printed = cli_json(["eval", *args, "--json"], monkeypatch, capsys)
    result = tuneforge.evaluate(tiny_model_dir, triage_data["test"], limit=2, max_new_tokens=4, progress=False)
    # `seconds`: how long each part took, which differs from one evaluation to the next.
    assert {**result, "seconds": None} == {**printed, "seconds": None}
    assert result["n"] == 2 and result["generation"]["max_new_tokens"] == 4
    assert capsys.readouterr().out == ""  # returned, not printed


def test_evaluate_raises_the_cli_s_refusal_as_an_error(tiny_model_dir, triage_data):
    with pytest.raises(ConfigError, match="--num-fewshot"):
        tuneforge.evaluate(tiny_model_dir, triage_data["test"], fewshot_file=triage_data["test"])
