"""`check_command` (`tuneforge data check`): exit codes, coded errors with lines, --show, --json."""

from __future__ import annotations

import json
import sys
import types

import pytest
from data.rows import BAD_INPUTS, chat, write_bad_input, write_jsonl

from tuneforge import progress
from tuneforge.config import DEFAULT_MODEL, DataConfig
from tuneforge.data import Document, prepare, render_conversation
from tuneforge.data.check import TRAINED_STYLE, check, check_command, highlight
from tuneforge.errors import ConfigError, DataError, ModelSourceError

REPLIES = ["The answer is four.", '{"category": "outage", "priority": "urgent", "product": "database"}']


@pytest.fixture
def models(monkeypatch, tokenizer):
    """Stands in for tuneforge.models (its own engineer's job): every model has the tiny tokenizer."""
    asked: list[str] = []

    def load_tokenizer(spec: str):
        asked.append(spec)
        if spec == "missing-model":
            raise ModelSourceError("no model called missing-model; see `tuneforge models list`")
        return tokenizer

    models = types.SimpleNamespace(load_tokenizer=load_tokenizer, source_context_length=lambda spec: None)
    monkeypatch.setitem(sys.modules, "tuneforge.models", models)
    return asked


@pytest.fixture
def good_file(tmp_path):
    return write_jsonl(
        tmp_path / "good.jsonl",
        [
            chat("What is two plus two?", REPLIES[0], system="Answer briefly."),
            chat("My database is down and production is affected, please help!", REPLIES[1]),
            chat("Hello, how are you?", "I am fine, thank you."),
        ],
    )


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_each_bad_input_exits_2_naming_code_and_line(tmp_path, capsys, models, name):
    path, code, line = write_bad_input(tmp_path, name)
    assert check_command([str(path)]) == 2
    out = capsys.readouterr().out
    assert code in out
    assert (f"{path}:{line}" if line else str(path)) in out
    assert "Traceback" not in out


def test_a_good_file_passes_and_uses_the_default_model(good_file, capsys, models):
    assert check_command([str(good_file)]) == 0
    out = capsys.readouterr().out
    assert "no errors" in out and "3 read, 3 valid, 0 rejected" in out
    assert models == [DEFAULT_MODEL]


def test_show_highlights_exactly_the_replies_and_their_end_of_turn(good_file, capsys, models, tokenizer):
    assert check_command([str(good_file)], model="some-model", show=2) == 0
    out = capsys.readouterr().out
    assert models == ["some-model"]
    assert out.count(f"{good_file}:") == 2 and "What is two plus two?" in out and "production is affected" in out

    for reply, row in zip(REPLIES, json.loads("[" + ",".join(good_file.read_text().splitlines()) + "]")):
        text = highlight(render_conversation(row["messages"], tokenizer), tokenizer)
        trained = [text.plain[span.start : span.end] for span in text.spans if span.style == TRAINED_STYLE]
        assert trained == [reply + "<|im_end|>"]


def test_show_without_colour_marks_the_trained_text(good_file, capsys, models):
    # capsys is no terminal, so the output has no colour (as piped or in a log): the marks carry the mask.
    assert check_command([str(good_file)], model="some-model", show=2) == 0
    out = capsys.readouterr().out
    assert "legend: ⟦trained⟧ / not trained" in out
    assert out.count("⟦") == out.count("⟧") == 3  # the legend's and each reply's with its end of turn
    for reply in REPLIES:
        assert f"⟦{reply}<|im_end|>⟧" in out
    assert "⟦What is two plus two?" not in out


def test_json_prints_only_the_report(good_file, tmp_path, capsys, models):
    other = write_jsonl(tmp_path / "other.jsonl", [chat("Hello, how are you?", "I am fine, thank you.")])
    assert check_command([str(good_file), str(other)], json_out=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["read"] == 4 and report["counts"]["shared_between_files"] == 1
    assert {"p50", "p90", "p99", "max"} <= set(report["tokens"]["length"])
    assert [f["format"] for f in report["files"]] == ["chat", "chat"]


@pytest.mark.parametrize("kind", ["chat", "preference"])
def test_the_check_holds_no_tokens_and_reports_what_preparing_reports(tmp_path, tokenizer, kind):
    from tuneforge.config import DataConfig
    from tuneforge.data.prepare import check_data

    if kind == "chat":
        rows = [chat(f"Question {i}: what is two plus {i}?", f"The answer is {i + 2}.") for i in range(12)]
    else:
        rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(12)]
    rows.append(rows[0])  # a duplicate
    cfg = DataConfig(train=[str(write_jsonl(tmp_path / "rows.jsonl", rows))], validation=0.25, max_length=64)
    kept, _ = check_data(cfg, tokenizer)
    light, _ = check_data(cfg, tokenizer, keep_examples=False)  # what `data check` runs: a report of any size
    assert (kept.train or kept.train_pairs) and not (light.train or light.valid or light.train_pairs)
    assert light.report == kept.report and light.report["counts"]["validation"] == 3


def test_rows_shared_between_files_are_all_counted_beyond_the_listed_duplicates(tmp_path, capsys, models):
    from tuneforge.data.prepare import MAX_LISTED

    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(MAX_LISTED + 5)]
    first, second = write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", rows)
    assert check_command([str(first), str(second)], json_out=True) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts["shared_between_files"] == counts["duplicates_exact"] == MAX_LISTED + 5


def test_each_file_of_a_mix_says_what_became_of_its_rows(good_file, tmp_path, capsys, models):
    other = write_jsonl(
        tmp_path / "other.jsonl", [chat("Hello, how are you?", "I am fine, thank you."), chat("Hi", "Hi!")]
    )
    assert check_command([str(good_file), str(other)], json_out=True) == 0
    report = json.loads(capsys.readouterr().out)
    counts = [(f["train_rows"], f["validation_rows"], f["left_out"]) for f in report["files"]]
    assert counts == [(3, 0, 0), (1, 0, 1)]  # other.jsonl's first row repeats good.jsonl's third
    assert sum(f["tokens"] for f in report["files"]) == report["tokens"]["total"]
    assert sum(f["trained_tokens"] for f in report["files"]) == report["tokens"]["trained"]
    assert check_command([str(good_file), str(other)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "files good.jsonl (chat, train): 3 train rows, 0 left out;" in out
    assert "other.jsonl (chat, train): 1 train row, 1 left out;" in out and "% of train tokens)" in out
    assert "validation leak 1 row appears in more than one file" in out


def test_a_value_the_report_quotes_is_printed_as_written_not_as_an_emoji_code(tmp_path, capsys, models):
    """rich reads `:x:` in printed text as the emoji code of an ❌."""
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": ":x:", "content": "hi"}]}])
    assert check_command([str(path)]) == 2
    out = capsys.readouterr().out
    assert "role ':x:' is not one of" in out and "\u274c" not in out, out


def test_errors_as_json(tmp_path, capsys, models):
    path, code, line = write_bad_input(tmp_path, "unknown_role")
    assert check_command([str(path)], json_out=True) == 2
    report = json.loads(capsys.readouterr().out)
    assert [(e["code"], e["line"]) for e in report["errors"]] == [(code, line)]


def test_a_model_that_cannot_be_loaded_exits_2(good_file, capsys, models):
    assert check_command([str(good_file)], model="missing-model", json_out=True) == 2
    out, err = capsys.readouterr()
    assert "no model called missing-model" in err and not out


@pytest.mark.parametrize("name", ["run.yaml", "run.yml"])
def test_a_config_given_as_data_names_the_command_that_checks_its_data(tmp_path, capsys, models, good_file, name):
    config = tmp_path / name
    config.write_text(f"data:\n  train: {good_file}\n")
    assert check_command([str(good_file), str(config)]) == 2
    out, err = capsys.readouterr()
    assert " ".join(err.split()) == (
        f"error: {config} is a YAML file, which tuneforge data check does not read as data: a training config's "
        "data is checked, every row with its base_model's tokenizer as training reads it, by `tuneforge validate "
        f"{config}`; give data check the data files themselves."
    )
    assert not out and not models  # refused before a tokenizer loads


def test_a_config_among_data_files_given_to_check_is_refused_before_a_tokenizer_loads(tmp_path, models, good_file):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  train: {good_file}\n")
    with pytest.raises(ConfigError, match=f"by `tuneforge validate {config}`"):
        check([good_file, config])
    assert not models


def test_options_reach_the_checks(tmp_path, capsys, models):
    path = write_jsonl(tmp_path / "long.jsonl", [chat("Hi", "Hello."), chat("Hi", "A long answer. " * 40)])
    assert check_command([str(path)], max_length=32, json_out=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["truncated"] == 1
    assert check_command([str(path)], format="alpaca") == 2
    assert "missing_field" in capsys.readouterr().out


def test_an_option_refused_is_named_as_an_option(good_file, capsys, models):
    assert check_command([str(good_file)], max_length=2) == 2
    assert capsys.readouterr().err.strip() == "error: --max-length: must be at least 8 (got 2)"
    assert check_command([str(good_file), str(good_file)]) == 2
    assert capsys.readouterr().err.startswith(f"error: files: data.train lists {good_file} more than once;")


def test_show_cuts_a_long_row_where_training_cuts_it(tmp_path, capsys, models, tokenizer):
    row = chat("Hi", "A long answer. " * 40)
    path = write_jsonl(tmp_path / "long.jsonl", [row])
    assert check_command([str(path)], max_length=32, show=1) == 2  # the cut leaves no end of turn to train
    out = capsys.readouterr().out
    whole = render_conversation(row["messages"], tokenizer)
    assert f"long.jsonl:1 (cut to max_length 32 of its {len(whole)} tokens)" in out
    shown = out[out.index("(cut to max_length") :].split("\n", 1)[1]
    assert shown.rstrip("\n").replace("⟦", "").replace("⟧", "") == tokenizer.decode(whole.input_ids[:32])


def test_truncation_split_shows_a_document_in_its_windows_and_counts_them(tmp_path, capsys, models, tokenizer):
    page = " ".join(f"The quick brown fox number {j} jumps over the lazy dog." for j in range(8))
    (tmp_path / "page.md").write_text(page)
    assert check_command([str(tmp_path / "page.md")], max_length=40, truncation="split", show=1) == 0
    out = " ".join(capsys.readouterr().out.split())  # the summary's lines wrap at the terminal's width
    windows = render_conversation(Document(page), tokenizer).windows(40)
    assert len(windows) > 2 and f"page.md:1 (window {len(windows)} of {len(windows)})" in out
    assert "cut to max_length" not in out and "1 split into windows" in out
    assert f"{len(windows)}: windows of 1 training document" in out
    assert check_command([str(tmp_path / "page.md")], format="chat", truncation="split") == 2
    assert capsys.readouterr().err.startswith("error: --truncation: data.truncation: split cuts text documents")


def test_show_leaves_out_a_row_training_refuses_as_too_long(tmp_path, capsys, models):
    rows = [chat("A long question. " * 40, "Yes."), chat("Hi", "Hello.")]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    assert check_command([str(path)], max_length=32, show=2) == 2
    out = capsys.readouterr().out
    assert f"{path}:1: [too_long]" in out
    assert [shown.split("\n", 1)[0] for shown in out.split("--- ")[1:]] == [f"{path}:2"]


def test_show_leaves_out_a_row_removed_as_a_duplicate(tmp_path, capsys, models):
    path = write_jsonl(tmp_path / "dup.jsonl", [chat("Hi", "Hello."), chat("Hi", "Hello."), chat("Bye", "Bye.")])
    assert check_command([str(path)], show=3) == 0
    out = capsys.readouterr().out
    assert [shown.split("\n", 1)[0] for shown in out.split("--- ")[1:]] == [f"{path}:1", f"{path}:3"]


def test_show_prints_both_sides_of_a_preference_pair_each_training_its_reply(tmp_path, capsys, models, tokenizer):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."}],
    )
    assert check_command([str(path)], show=1) == 0
    out = capsys.readouterr().out
    chosen, rejected = out.split("--- ")[1:]
    assert chosen.startswith(f"{path}:1 (chosen)\n") and rejected.startswith(f"{path}:1 (rejected)\n")
    assert "Four.<|im_end|>" in chosen and "Five.<|im_end|>" in rejected


def test_a_long_check_shows_its_progress_on_stderr(tmp_path, capsys, models, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    path = write_jsonl(tmp_path / "big.jsonl", [chat(f"Question {i}?", REPLIES[0]) for i in range(200)])
    assert check_command([str(path)]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0].startswith("data: big.jsonl lines 1/200 (0%)")
    assert lines[-1].startswith("data: big.jsonl lines 200/200 (100%)") and len(lines) == 200
    assert "200 read, 200 valid" in captured.out and "big.jsonl lines" not in captured.out


def test_a_max_length_past_the_models_context_is_refused_as_training_refuses_it(good_file, capsys, tiny_model_dir):
    assert check_command([str(good_file)], model=str(tiny_model_dir), max_length=4096) == 2
    out, err = capsys.readouterr()
    assert "--max-length 4096 is more than the 2048 positions" in err and not out
    assert check_command([str(good_file)], model=str(tiny_model_dir), max_length=2048) == 0


def test_a_row_that_stops_the_check_is_counted_once(tmp_path, capsys, models):
    """The first image row for a text-only model (or a conversation under --truncation split) stops the check: it
    is one row read and rejected, as each row after it that was read with a problem."""
    from families import png_data_url

    shown = {"type": "image_url", "image_url": {"url": png_data_url((255, 0, 0))}}
    rows = [
        {"messages": [{"role": "user", "content": [shown]}, {"role": "assistant", "content": "Red."}]},
        {"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "Red."}]}
        | {"images": ["green.png"]},
    ]
    for path, truncation, codes in (
        (write_jsonl(tmp_path / "images.jsonl", rows), "truncate", {"images_not_read": 1, "bad_image": 1}),
        (write_jsonl(tmp_path / "chat.jsonl", [chat("Hi", "Hello.")]), "split", {"split_not_text": 1}),
    ):
        assert check_command([str(path)], json_out=True, truncation=truncation) == 2
        counts = json.loads(capsys.readouterr().out)["counts"]
        read = len(rows) if truncation == "truncate" else 1
        assert (counts["read"], counts["valid"], counts["rejected"]) == (read, 0, read)
        assert counts["rejected_by_code"] == codes


def test_one_blank_line_and_one_error_are_counted_in_the_singular(good_file, capsys, models, tokenizer):
    good_file.write_text(good_file.read_text() + "\n")
    assert check_command([str(good_file)]) == 0
    assert "3 read, 3 valid, 0 rejected, 1 blank line skipped" in " ".join(capsys.readouterr().out.split())
    bad = write_jsonl(good_file.parent / "bad.jsonl", [chat("Hi", "Hello there."), {"prompt": "Hi"}])
    assert check_command([str(bad)]) == 2
    assert "\n1 error\n" in capsys.readouterr().out
    good_file.write_text(good_file.read_text() + "{not json\n")
    with pytest.raises(DataError) as refused:
        prepare(DataConfig(train=str(good_file), validation=None), tokenizer, use_cache=False, log=lambda _: None)
    assert "the data has 1 error (invalid_json x1)" in str(refused.value)


def test_a_model_without_a_chat_template_is_warned_of_once(good_file, tiny_model_dir, tmp_path, capsys):
    import warnings

    from tiny import without_chat_template

    folder = without_chat_template(tiny_model_dir, tmp_path / "no-template")
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        assert check_command([str(good_file)], model=str(folder)) == 0
    said = [str(w.message) for w in heard] + [capsys.readouterr().out]
    assert sum(text.count("has no chat template; using ChatML") for text in said) == 1


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_rows_all_rejected_for_their_system_message_are_not_said_to_have_none(family, tmp_path, capsys):
    from families import FAMILIES, save_family_model

    folder = save_family_model(FAMILIES[family], tmp_path / family)  # templates with no system turn
    path = write_jsonl(
        tmp_path / "system.jsonl", [chat("What is 2 + 2?", REPLIES[0], system="Be brief.") for _ in range(2)]
    )
    assert check_command([str(path)], model=str(folder)) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "no row has one" not in out and "system prompt none known: no row is kept" in out


def test_rows_a_template_problem_stops_the_check_before_are_not_counted_valid(
    tmp_path, capsys, models, tokenizer, monkeypatch
):
    """A chat template that writes the system prompt into the last user message only (Mistral's) stops the check
    at the first row: the rows read after it are said to be unchecked, not valid, and why."""
    template = (
        "{% for message in messages[1:] %}{% if message['role'] == 'user' %}{{ '<|im_start|>user\n' }}"
        "{% if loop.last %}{{ messages[0]['content'] + ' ' }}{% endif %}{{ message['content'] + '<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>assistant\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    monkeypatch.setattr(tokenizer, "chat_template", template)
    rows = [chat(f"Question {i}?", f"Answer {i}.", system="Be brief.") for i in range(20)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert check_command([str(path)], json_out=True) == 2
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert (counts["read"], counts["valid"], counts["rejected"], counts["unchecked"]) == (20, 0, 1, 19)
    assert check_command([str(path)]) == 2
    said = " ".join(capsys.readouterr().out.split())
    assert "20 read, 0 valid, 1 rejected; 19 not checked: the check stopped at a problem of the chat template" in said
