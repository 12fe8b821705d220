"""The command line as scripts and logs see it: messages and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tuneforge.recipes
from tuneforge.cli import main
from tuneforge.errors import TuneforgeError


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["tuneforge", *args])
    with pytest.raises(SystemExit) as leaving:
        main()
    said = capsys.readouterr()
    return leaving.value.code, said.out, said.err


def test_an_error_is_printed_as_written_its_emoji_codes_and_markup_left_as_text(monkeypatch, capsys):
    """`runs/support:x:` is a path and a weight, not rich's `:x:` emoji code."""
    message = "runs/support:x: the weight after ':' must be a finite number, e.g. runs/support:0.5 [bold]."

    def refused(*_args, **_kw):
        raise TuneforgeError(message)

    monkeypatch.setattr(tuneforge.recipes, "recipes_command", refused)
    code, out, err = run_cli(["recipes"], monkeypatch, capsys)
    assert code == 2 and " ".join(err.split()) == f"error: {message}", err


def test_recipes_list_lists_the_recipes_as_plain_recipes_does(monkeypatch, capsys):
    """`models list` lists the models; a user who learnt it tries `recipes list` too."""
    listed = [run_cli(args, monkeypatch, capsys) for args in (["recipes"], ["recipes", "list"])]
    assert listed[0] == listed[1] and listed[0][0] == 0 and "quickstart" in listed[0][1]


def test_ctrl_c_in_a_command_says_interrupted_on_stderr_and_exits_130(monkeypatch, capsys):
    def ctrl_c(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuneforge.recipes, "recipes_command", ctrl_c)
    code, out, err = run_cli(["recipes"], monkeypatch, capsys)
    assert code == 130 and out == "" and err.strip() == "interrupted"


def test_a_command_run_in_process_leaves_the_signal_handlers_and_warning_display_as_it_found_them(monkeypatch, capsys):
    """A test or a notebook goes on after `main` returns; a SIGTERM it gets later must not raise the CLI's
    own exception in whatever it does then."""
    import signal
    import warnings

    def handlers():
        return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), warnings.showwarning

    before = handlers()
    assert run_cli(["recipes"], monkeypatch, capsys)[0] == 0
    assert handlers() == before


def test_sigterm_removes_the_half_written_folder_says_terminated_and_exits_143(tmp_path):
    # A command halfway through writing its output folder gets a real SIGTERM, as from `timeout` or a CI cancel.
    script = f"""
import os, signal, tuneforge.recipes
from tuneforge.cli import main
from tuneforge.fsio import atomic_dir
def writing(*_args, **_kw):
    with atomic_dir({str(tmp_path / "out")!r}) as tmp:
        (tmp / "part").write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()
tuneforge.recipes.recipes_command = writing
main()
"""
    done = subprocess.run(
        [sys.executable, "-c", script, "recipes"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 143 and done.stdout == ""
    assert done.stderr.strip() == "terminated (SIGTERM)"
    assert list(tmp_path.iterdir()) == []


def test_serve_api_and_the_ui_playground_keep_the_engines_prefix_cache_by_default(monkeypatch, capsys):
    """`--prefix-cache-mb` left out, `serve` and `api` size the prefix cache as the engine does by default, and so
    does `ui`'s playground (its inference models take no such option)."""
    import inspect

    import tuneforge.jobs.command
    import tuneforge.serve.command
    from tuneforge.jobs.inference import InferenceModels
    from tuneforge.serve.engine import Engine

    engine_default = inspect.signature(Engine).parameters["prefix_cache_mb"].default
    given = {}
    monkeypatch.setattr(tuneforge.serve.command, "serve_command", lambda *_, **kw: given.setdefault("serve", kw) and 0)
    monkeypatch.setattr(tuneforge.jobs.command, "api_command", lambda *_, **kw: given.setdefault("api", kw) and 0)
    assert run_cli(["serve", "--model", "some-model"], monkeypatch, capsys)[0] == 0
    assert run_cli(["api"], monkeypatch, capsys)[0] == 0
    assert given["serve"]["prefix_cache_mb"] == given["api"]["prefix_cache_mb"] == engine_default > 0
    assert InferenceModels().prefix_cache_mb == engine_default


@pytest.mark.parametrize(
    ("args", "written"),
    [
        (["train", "cfg.yaml", "--train.max_steps=3"], "train.max_steps=3"),
        (["validate", "cfg.yaml", "--train.learning_rate", "1e-4"], "train.learning_rate=1e-4"),
    ],
)
def test_an_override_written_as_an_option_says_how_overrides_are_written(args, written, monkeypatch, capsys):
    """Axolotl takes `--train.max_steps=3`; tuneforge's overrides have no dashes, which click's own
    'No such option' does not say."""
    code, out, err = run_cli(args, monkeypatch, capsys)
    dashed = args[2].split("=")[0]
    said = " ".join(err.split())
    assert code == 2 and out == ""
    assert said.startswith(f"error: {dashed}: no such option;") and f"write it {written}" in said
    assert "Usage:" not in err


def test_an_unknown_option_without_a_dot_keeps_clicks_message(monkeypatch, capsys):
    code, _, err = run_cli(["train", "cfg.yaml", "--max-steps=3"], monkeypatch, capsys)
    assert code == 2 and "No such option: --max-steps" in err


def test_the_help_of_data_check_names_every_format_it_takes(monkeypatch, capsys):
    from tuneforge.data.formats import FORMATS

    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run_cli(["data", "check", "--help"], monkeypatch, capsys)
    listed = next(line for line in out.splitlines() if "--format" in line)
    assert code == 0 and [name for name in ("auto", *FORMATS) if f" {name} " not in listed.replace("|", " ")] == []


def test_a_warning_is_one_line_of_its_own_without_the_code_that_raised_it(tmp_path):
    # model.add_tokens naming a token the vocabulary holds warns as the tokenizer loads, deep in the library.
    script = """
import warnings, tuneforge.recipes
from tuneforge.cli import main
def warning(*_args, **_kw):
    warnings.warn("model.add_tokens: the vocabulary already holds <|im_end|> (id 2)", stacklevel=2)
tuneforge.recipes.recipes_command = warning
main()
"""
    done = subprocess.run(
        [sys.executable, "-c", script, "recipes"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "warning: model.add_tokens: the vocabulary already holds <|im_end|> (id 2)\n"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["serve", "--bogus", "x"], "error: No such option: --bogus"),
        (["train"], "error: Missing argument 'config'."),
        (["data", "check"], "error: Missing argument 'files'."),
    ],
)
def test_usage_errors_read_as_tuneforge_errors_with_the_usage(args, said, monkeypatch, capsys):
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and out == ""
    assert said in err and "Error:" not in err
    assert f"Usage: tuneforge {' '.join(a for a in args if not a.startswith('-') and a != 'x')}" in err


@pytest.mark.parametrize("args", [[], ["data"], ["models"]])
def test_a_command_group_given_no_command_shows_its_help_and_no_usage_error(args, monkeypatch, capsys):
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "error:" not in err and "Try '" not in err
    assert f"Usage: {' '.join(['tuneforge', *args])} [OPTIONS] COMMAND" in out + err


@pytest.fixture
def run_without_chat_template(tiny_model_dir, triage_data, tmp_path):
    """A config of a 2-step run on a tiny model without a chat template (a folder of its own: a process says the
    warning once for each model), and that model's folder."""
    import yaml
    from conftest import tiny_run_config
    from tiny import without_chat_template

    model = without_chat_template(tiny_model_dir, tmp_path / "no-template")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(model, triage_data, tmp_path / "run", max_steps=2)))
    return config, model


@pytest.mark.parametrize(
    "command",
    [
        ["data", "check", "{train}", "--model", "{model}"],
        ["validate", "{config}"],
        ["train", "{config}"],
        ["data", "prepare", "{config}", "--out", "{config}.rows"],
        ["eval", "{model}", "{train}", "--limit", "1", "--max-new-tokens", "1"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_a_model_without_a_chat_template_is_warned_of_once_by_each_command(
    command, run_without_chat_template, triage_data, monkeypatch, capsys
):
    config, model = run_without_chat_template
    args = [part.format(config=config, model=model, train=triage_data["train"]) for part in command]
    code, out, err = run_cli(args, monkeypatch, capsys)
    said = "".join((out + err).replace("│", "").split())  # the path may be folded anywhere, in a table's cell
    assert code == 0, out + err
    assert said.count("hasnochattemplate;usingChatML") == 1, out + err
    assert f"{model}hasnochattemplate;usingChatML(<|im_start|>role...<|im_end|>)" in said


def test_a_misspelt_name_is_offered_the_nearest_in_the_same_words_everywhere(tmp_path):
    """A config key, a recipe, a registry model, a metric and a data key: each misspelt name is followed by the
    one question that offers the name it meant."""
    from tuneforge.config import load_config
    from tuneforge.data.formats import read_conversations
    from tuneforge.eval.evaluate import choose_metric
    from tuneforge.models import resolve
    from tuneforge.recipes import recipe_path

    (tmp_path / "d.jsonl").write_text('{"mesages": []}\n')
    (config := tmp_path / "run.yaml").write_text("base_modle: x\ndata:\n  train: d.jsonl\n")
    said = []
    for refused in (
        lambda: load_config(config),
        lambda: recipe_path("quickstar"),
        lambda: resolve("gemma-270m"),
        lambda: choose_metric("exactt", []),
    ):
        with pytest.raises(TuneforgeError) as caught:
            refused()
        said.append(caught.value.message)
    ((_, problem),) = read_conversations(tmp_path / "d.jsonl")
    said.append(problem.message)
    assert "base_modle (line 1): unknown key (did you mean 'base_model'?)." in said[0]
    assert "no shipped recipe named 'quickstar' (did you mean 'quickstart'?); there are: " in said[1]
    assert said[2].startswith("'gemma-270m' (did you mean 'gemma3-270m'?) is not a registry model")
    assert said[3].startswith("unknown metric 'exactt' (did you mean 'exact'?); use one of auto, ")
    assert "(did you mean 'messages' for 'mesages'?)" in said[4]
