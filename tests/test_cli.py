"""The command line as scripts and logs see it: messages and exit codes."""

from __future__ import annotations

import sys

import pytest

import tuneforge.recipes
from tuneforge.cli import main


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["tuneforge", *args])
    with pytest.raises(SystemExit) as leaving:
        main()
    said = capsys.readouterr()
    return leaving.value.code, said.out, said.err


def test_ctrl_c_in_a_command_says_interrupted_on_stderr_and_exits_130(monkeypatch, capsys):
    def ctrl_c(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuneforge.recipes, "recipes_command", ctrl_c)
    code, out, err = run_cli(["recipes"], monkeypatch, capsys)
    assert code == 130 and out == "" and err.strip() == "interrupted"
