"""The Python API (`tuneforge.evaluate`, ...): each function gives what its CLI command prints or writes, as
Python values, and raises `tuneforge.errors` where the command exits."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from data.rows import chat, write_jsonl

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


def test_check_data_returns_the_report_data_check_json_prints(tiny_model_dir, tmp_path, monkeypatch, capsys):
    rows = [chat("What is two plus two?", "Four."), chat("Hello?", "Hi."), {"messages": [{"role": "user"}]}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    args = [str(data), "--model", str(tiny_model_dir), "--max-length", "64"]
    monkeypatch.setattr(sys, "argv", ["tuneforge", "data", "check", *args, "--json"])
    with pytest.raises(SystemExit) as leaving:
        main()
    assert leaving.value.code == 2  # the bad row
    printed = json.loads(capsys.readouterr().out)
    report = tuneforge.check_data(data, model=str(tiny_model_dir), max_length=64, progress=False)
    assert report == printed
    assert report["counts"]["valid"] == 2 and [(e["line"], e["file"]) for e in report["errors"]] == [(3, str(data))]
    assert capsys.readouterr().out == ""

    # A training config's data: section, read with its model's tokenizer, as the same files and options are.
    config = {"base_model": str(tiny_model_dir), "data": {"train": str(data), "validation": None, "max_length": 64}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    for source in (config, tmp_path / "run.yaml"):
        from_config = tuneforge.check_data(source, progress=False)
        assert {k: from_config[k] for k in ("counts", "tokens", "errors")} == {
            k: printed[k] for k in ("counts", "tokens", "errors")
        }
    assert tuneforge.check_data(config, "data.max_length=8", progress=False)["tokens"]["max_length"] == 8


def test_check_data_raises_what_data_check_refuses(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [chat("What is two plus two?", "Four.")])
    with pytest.raises(ConfigError, match="^--max-length: Input should be greater than or equal to 8$"):
        tuneforge.check_data(data, model=str(tiny_model_dir), max_length=2)
    with pytest.raises(ConfigError, match="so max_length does not apply"):
        tuneforge.check_data({"base_model": str(tiny_model_dir), "data": {"train": str(data)}}, max_length=64)
