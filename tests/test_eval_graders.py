"""Evaluation with graders on the tiny models: `tuneforge eval --grader`, the Python API and `eval.grader`
score the greedy answers as GRPO's graders score samples, each against its data row."""

import json

import pytest
from conftest import tiny_run_config
from data.rows import write_jsonl

from tuneforge.config import ConfigError, load_config
from tuneforge.errors import DataError
from tuneforge.eval import eval_command, evaluate
from tuneforge.eval.after_training import eval_grader
from tuneforge.eval.command import grader_spec
from tuneforge.eval.report import examples_table, metrics_table
from tuneforge.graders import GraderError
from tuneforge.pipeline import train

pytestmark = pytest.mark.usefixtures("one_thread")

SAME_ANSWER = {
    "type": "string_check",
    "name": "same",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
    "pass_threshold": 1,
}


def rows_of(path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def lone_answers(base, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Each prompt's greedy answer from the sharp tiny model (`base`), generated alone: what an evaluation
    should give each row, found without the evaluation under test. Its answers differ from prompt to prompt."""
    from tuneforge.generate import generate

    answers = [generate(*base, [prompt], max_new_tokens=max_new_tokens)[0].text for prompt in prompts]
    assert len(set(answers)) == len(answers)
    return answers


def test_a_string_check_graders_score_is_a_hand_count_of_the_answers(base, base_dir, triage_data, tmp_path, capsys):
    """Rows whose `answer` field is the model's own greedy answer to that row pass; the others fail: the mean
    score and the pass rate are that count, base and tuned side by side, in the table and in JSON."""
    rows = rows_of(triage_data["test"], 6)
    answers = lone_answers(base, [row["messages"][:-1] for row in rows], 4)
    for index, (row, answer) in enumerate(zip(rows, answers)):
        row["answer"] = answer if index % 3 == 0 else answer + " not it"
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    grader = tmp_path / "same.json"
    grader.write_text(json.dumps(SAME_ANSWER))

    result = evaluate(str(base_dir), data, max_new_tokens=4, progress=False, grader=str(grader))
    assert [s["prediction"] for s in result["samples"]] == answers  # each row's own answer
    hand_count = sum(s["prediction"] == row["answer"] for s, row in zip(result["samples"], rows))
    assert hand_count == 2
    figures = result["grader"]
    assert figures["name"] == "same" and figures["n"] == 6
    assert figures["mean"] == figures["pass_rate"] == pytest.approx(hand_count / 6)
    assert [s["grade"] for s in result["samples"]] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]

    kwargs = {"compare": str(base_dir), "max_new_tokens": 4, "grader": str(grader)}
    assert eval_command(str(base_dir), str(data), json_out=True, **kwargs) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["base"]["grader"]["mean"] == both["tuned"]["grader"]["mean"] == pytest.approx(2 / 6)
    # Each example shows its grade beside the metric's verdict.
    first, second = examples_table(both["samples"]).rows[:2]
    assert first[1].endswith("(grade 1)") and first[2].endswith("(grade 1)") and second[1].endswith("(grade 0)")
    rows = {row[0]: row[1:] for row in metrics_table({"base": both["base"], "tuned": both["tuned"]}).rows}
    assert rows["grader same: mean score"] == ["0.333 (95% interval 0.097-0.700)"] * 2 + ["+0.000"]
    assert rows["grader same: passed (score >= 1)"] == ["33.3% (95% interval 9.7%-70.0%)"] * 2 + ["+0.0 pts"]
    # --json gives the table's intervals, as multiple choice gives its scores' (`intervals`).
    assert both["base"]["grader"]["intervals"] == {
        "mean": pytest.approx([0.0968, 0.7000], abs=1e-4),
        "pass_rate": pytest.approx([0.0968, 0.7000], abs=1e-4),
    }


def test_reward_functions_in_a_python_file_score_with_a_mean_per_function(
    tiny_model_dir, triage_data, tmp_path, capsys
):
    """TRL-style reward functions (FILE.py:FUNCTION; on the command line several comma-separated, a comma in
    a file's path kept) score the answers as GRPO runs them, with the row's columns by name; their sum is the
    score, each has its mean."""
    rows = rows_of(triage_data["test"], 4)
    for index, row in enumerate(rows):
        row["weight"] = index
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    folder = tmp_path / "graders, v2"
    folder.mkdir()
    (folder / "rewards.py").write_text(
        "def by_weight(prompts, completions, weight, **kwargs):\n"
        "    return [float(w) for w in weight]\n"
        "def one(completions, **kwargs):\n"
        "    return [1.0 for _ in completions]\n"
    )
    functions = f"{folder}/rewards.py:by_weight,{folder}/rewards.py:one"
    assert eval_command(str(tiny_model_dir), str(data), max_new_tokens=2, grader=functions, json_out=True) == 0
    result = json.loads(capsys.readouterr().out)
    figures = result["grader"]
    assert [s["grade"] for s in result["samples"]] == [1.0, 2.0, 3.0, 4.0]
    assert figures["mean"] == 2.5 and not figures["all_0_or_1"] and "pass_rate" not in figures
    assert figures["parts"]["by_weight"]["mean"] == 1.5 and figures["parts"]["one"]["mean"] == 1.0
    # Scores not all 0 or 1: mean ± 1.96 standard errors (std 1.118 over 4 answers), for the sum and each part.
    assert figures["intervals"] == {"mean": pytest.approx([1.2348, 3.7652], abs=1e-4)}
    assert figures["parts"]["by_weight"]["intervals"] == {"mean": pytest.approx([0.2348, 2.7652], abs=1e-4)}
    assert figures["parts"]["one"]["intervals"] == {"mean": pytest.approx([0.5101, 1.0], abs=1e-4)}  # Wilson's


def test_a_grader_object_written_inline_on_the_command_line_scores_as_its_file_does(
    tiny_model_dir, triage_data, tmp_path, capsys
):
    """`--grader '{"type": "reward_model", "model": "runs/rm"}'`, as the README writes a grader: an object
    given inline, in JSON or in YAML's flow style, is that grader, not the name of a missing file."""
    data = write_jsonl(tmp_path / "test.jsonl", rows_of(triage_data["test"], 2))
    spec = {"type": "string_check", "name": "brace", "input": "{{ sample.output_text }}", "reference": "{"}
    spec["operation"] = "like"
    (tmp_path / "brace.json").write_text(json.dumps(spec))
    inline_yaml = (
        "{type: string_check, name: brace, input: '{{ sample.output_text }}', reference: '{', operation: like}"
    )
    figures = []
    for grader in (str(tmp_path / "brace.json"), json.dumps(spec), inline_yaml):
        assert eval_command(str(tiny_model_dir), str(data), max_new_tokens=2, grader=grader, json_out=True) == 0
        figures.append(json.loads(capsys.readouterr().out)["grader"])
    assert figures[0]["name"] == "brace" and figures[1] == figures[0] and figures[2] == figures[0]
    with pytest.raises(ConfigError, match=r"--grader: .* is not a valid JSON or YAML object"):
        eval_command(str(tiny_model_dir), str(data), grader='{"type": "string_check",', json_out=True)
    # A syntax error is named by its column in the option's one line, not by PyYAML's "<unicode string>" excerpt.
    with pytest.raises(ConfigError) as e:
        grader_spec('{"type": "string_check" "name": "x"}')
    assert "(expected ',' or '}', but got '<scalar>' at column 25)" in e.value.message
    assert "<unicode string>" not in e.value.message and "\n" not in e.value.message


def test_a_grader_file_that_is_not_utf8_text_is_refused_by_file_and_line(tmp_path):
    from tuneforge.graders import load_grader

    path = tmp_path / "grader.yaml"
    path.write_bytes(b"type: string_check\nname: caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        load_grader(str(path), key="--grader")
    assert e.value.message.startswith(f"{path} line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8")


def test_a_grader_file_that_is_not_yaml_is_refused_by_file_line_and_column(tmp_path):
    """As a config's syntax error is: the file's line and column, not PyYAML's "<unicode string>" and its excerpt."""
    from tuneforge.graders import load_grader

    path = tmp_path / "grader.yaml"
    path.write_text('type: string_check\nname: ok\n  input: "{{ sample.output_text }}"\n')
    with pytest.raises(ConfigError) as e:
        load_grader(str(path), key="grpo.grader")
    assert e.value.message.startswith(f"grpo.grader: {path} line 3, column 8: not valid JSON or YAML (mapping values")
    assert "<unicode string>" not in e.value.message and "\n" not in e.value.message


def test_a_json_grader_file_missing_a_comma_is_told_to_add_it_not_to_check_its_indentation(tmp_path):
    """A syntax error inside { } or [ ] (a JSON file's) is about brackets, quotes and commas: the message says so."""
    from tuneforge.graders import load_grader

    path = tmp_path / "grader.json"
    path.write_text('{\n  "type": "string_check",\n  "name": "ok"\n  "input": "{{ sample.output_text }}"\n}\n')
    with pytest.raises(ConfigError) as e:
        load_grader(str(path), key="--grader")
    assert e.value.message.startswith(f"--grader: {path} line 4, column 3: not valid JSON (Expecting ',' delimiter")
    assert "put a comma between" in e.value.message and "indentation" not in e.value.message


def test_a_json_grader_file_is_read_as_json_so_tabs_indent_it(tmp_path):
    """JSON takes tabs between its tokens, where YAML refuses a tab that indents."""
    from tuneforge.graders import load_grader

    spec = {"type": "string_check", "name": "tabbed", "input": "{{ sample.output_text }}", "reference": "x"}
    path = tmp_path / "grader.json"
    path.write_text(json.dumps({**spec, "operation": "eq"}, indent="\t"))
    assert load_grader(str(path), key="--grader").name == "tabbed"
    # As Windows editors save it: a byte-order mark before the JSON, and the suffix in capitals.
    saved = tmp_path / "GRADER.JSON"
    saved.write_text("\ufeff" + json.dumps({**spec, "operation": "eq"}), encoding="utf-8")
    assert load_grader(str(saved), key="--grader").name == "tabbed"
    path.write_text('{"type": "string_check", "name": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError, match=rf"--grader: {path}: the JSON has an integer of more than"):
        load_grader(str(path), key="--grader")


def test_a_grader_that_cannot_score_the_rows_is_refused_before_any_model_loads(triage_data, tmp_path):
    """A row without the field the grader reads is named by file and line, with the grader, before the
    model is even looked up (the model named here does not exist)."""
    rows = rows_of(triage_data["test"], 3)
    rows[0]["answer"] = rows[2]["answer"] = "x"
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(GraderError) as raised:
        evaluate("no-such-model", data, grader=SAME_ANSWER, progress=False)
    assert '"same" (string_check)' in str(raised.value) and "item.answer" in str(raised.value)
    assert f"{data}:2" in str(raised.value)
    with pytest.raises(ConfigError, match=r"--grader: .*missing\.yaml is no file"):
        evaluate("no-such-model", data, grader=str(tmp_path / "missing.yaml"), progress=False)


def test_a_configs_eval_grader_scores_base_and_tuned_after_training(tiny_model_dir, triage_data, tmp_path):
    """`eval.grader` beside `eval.task`: the after-training evaluation scores both models with it, into
    before/after.json, the report and the run's metrics; a relative grader file is the config's."""
    (tmp_path / "brace.yaml").write_text(
        "type: string_check\nname: brace\ninput: '{{ sample.output_text }}'\nreference: '{'\noperation: like\n"
    )
    config = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)
    config["eval"] = {"task": "exact", "grader": "brace.yaml"}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(config))
    result = train(config_file, progress=False)
    before, after = (
        json.loads((tmp_path / "run" / "eval" / f"{side}.json").read_text()) for side in ("before", "after")
    )
    assert before["grader"]["name"] == after["grader"]["name"] == "brace"
    assert result.metrics["grader_brace"] == after["grader"]["mean"]
    assert "grader brace: mean score" in (tmp_path / "run" / "eval" / "report.html").read_text()


def test_eval_grader_needs_eval_task_and_defaults_to_a_grpo_runs_grader(tiny_model_dir, triage_data, tmp_path):
    config = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    with pytest.raises(ConfigError, match="eval.grader scores the answers of the evaluation eval.task asks for"):
        load_config({**config, "eval": {"grader": SAME_ANSWER}})
    assert eval_grader(load_config({**config, "eval": {"task": "auto"}})) is None
    grpo = {**config, "method": "grpo", "grpo": {"grader": SAME_ANSWER}, "data": {**config["data"], "packing": False}}
    grpo["train"] = {**config["train"], "attention": "model"}
    assert eval_grader(load_config({**grpo, "eval": {"task": "auto"}})) == (SAME_ANSWER, None, "grpo.grader")
    own = {"type": "string_check", "name": "own", "input": "a", "reference": "a", "operation": "eq"}
    assert eval_grader(load_config({**grpo, "eval": {"task": "auto", "grader": own}})) == (own, None, "eval.grader")


def test_a_grpo_runs_eval_grades_answers_as_long_as_its_validation_reward_does(base_dir, triage_data, tmp_path):
    """A GRPO run's after-training evaluation answers within grpo.max_new_tokens, as its validation does, so
    the grader's held-out score of the final model is the run's own full_valid_reward."""
    # Scores that vary with the answer's length: answers cut at another length would score otherwise. The sharp
    # tiny model's answers differ in length from prompt to prompt, so the score depends on the item each is graded on.
    source = "def grade(sample, item):\n    return (len(sample['output_text']) + len(item['reference'])) % 7 / 6\n"
    config = tiny_run_config(base_dir, triage_data, tmp_path / "run", batch_size=4, max_steps=1)
    config["method"] = "grpo"
    config["grpo"] = {"grader": {"type": "python", "name": "lengths", "source": source}, "group_size": 4}
    config["grpo"]["max_new_tokens"] = 8
    config["eval"] = {"task": "auto"}
    metrics = train(config, progress=False).metrics
    after = json.loads((tmp_path / "run" / "eval" / "after.json").read_text())
    assert after["generation"]["max_new_tokens"] == 8
    samples = [json.loads(line) for line in (tmp_path / "run" / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len({len(sample["tuned"]) for sample in samples}) > 1
    assert metrics["grader_lengths"] == pytest.approx(metrics["full_valid_reward"])


def prompt_rows(triage_test, n: int) -> list[dict]:
    """GRPO's own data: each ticket's prompt as a `prompt` (text) or as messages ending in the user's turn,
    without its reference answer, and the answer in a field the grader reads."""
    rows = []
    for index, row in enumerate(rows_of(triage_test, n)):
        prompt, answer = row["messages"][:-1], row["messages"][-1]["content"]
        rows.append(
            {"prompt": prompt[-1]["content"], "answer": answer} if index % 2 else {"messages": prompt, "answer": answer}
        )
    return rows


def test_a_grader_scores_prompt_rows_without_reference_answers(base, base_dir, triage_data, tmp_path, capsys):
    """GRPO's held-out prompts (no reference answers) evaluate with a grader, base vs tuned: the grader's
    figures are the evaluation, and the loss and metric are left out with the reason, not zeros."""
    rows = prompt_rows(triage_data["test"], 4)
    prompts = [[{"role": "user", "content": row["prompt"]}] if "prompt" in row else row["messages"] for row in rows]
    for index, (row, answer) in enumerate(zip(rows, lone_answers(base, prompts, 4))):
        row["answer"] = answer if index < 3 else "not it"
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    grader = tmp_path / "same.json"
    grader.write_text(json.dumps(SAME_ANSWER))
    kwargs = {"compare": str(base_dir), "max_new_tokens": 4, "grader": str(grader)}
    assert eval_command(str(base_dir), str(data), json_out=True, **kwargs) == 0
    both = json.loads(capsys.readouterr().out)
    for side in ("base", "tuned"):
        result = both[side]
        assert result["grader"]["mean"] == result["grader"]["pass_rate"] == 0.75
        assert [s["grade"] for s in result["samples"]] == [1.0, 1.0, 1.0, 0.0]
        assert result["loss"] is result["scores"] is result["metric"] is None
        assert "no reference answer" in result["left_out"]
        assert all(s["reference"] is None and s["correct"] is None for s in result["samples"])
    table = metrics_table({"base": both["base"], "tuned": both["tuned"]})
    names = [row[0] for row in table.rows]
    assert names[0] == "grader same: mean score" and not any("loss" in name or "exact" in name for name in names)
    assert table.title.startswith("grader same on 4 examples") and "no reference answer" in table.caption
    assert examples_table(both["samples"]).rows[0][3] == "(none)"


def test_a_file_mixing_rows_with_and_without_references_is_graded_whole(tiny_model_dir, triage_data, tmp_path):
    """Rows with a reference answer give it to the grader as `item.reference`; the loss and metric are left
    out for the whole file, so every figure is over the same rows. A metric named outright is refused."""
    rows = rows_of(triage_data["test"], 2) + prompt_rows(triage_data["test"], 2)
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    (tmp_path / "rewards.py").write_text(
        "def has(completions, reference, **kwargs):\n    return [float(r is not None) for r in reference]\n"
    )
    has_reference = f"{tmp_path}/rewards.py:has"
    result = evaluate(str(tiny_model_dir), data, max_new_tokens=2, progress=False, grader=has_reference)
    assert [s["grade"] for s in result["samples"]] == [1.0, 1.0, 0.0, 0.0]
    assert result["loss"] is None and "2 of the 4 rows have no reference answer" in result["left_out"]
    with pytest.raises(DataError, match=r"mixed\.jsonl:3 messages: .*no reference answer for exact"):
        evaluate("no-such-model", data, metric="exact", grader=has_reference, progress=False)


def test_without_a_grader_prompt_rows_are_refused_with_a_hint_at_one(triage_data, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(triage_data["test"], 2))
    with pytest.raises(DataError) as raised:
        evaluate("no-such-model", data, progress=False)
    assert f"{data}:1 messages" in str(raised.value) and f"{data}:2 messages" in str(raised.value)
    assert "tuneforge eval --grader" in str(raised.value)


def test_a_grpo_runs_eval_scores_its_prompt_only_validation_file_with_its_grader(tiny_model_dir, triage_data, tmp_path):
    """A GRPO run whose data.validation is prompt rows: `eval.task: auto` scores base and tuned with
    grpo.grader, into before/after.json, the metrics and report.html (the grader's plot, no metric's)."""
    train_rows = write_jsonl(tmp_path / "train.jsonl", prompt_rows(triage_data["train"], 8))
    valid_rows = write_jsonl(tmp_path / "valid.jsonl", prompt_rows(triage_data["validation"], 4))
    config = tiny_run_config(tiny_model_dir, {"train": train_rows, "validation": valid_rows}, tmp_path / "run")
    config.update(method="grpo", eval={"task": "auto"})
    config["data"]["packing"] = False
    config["train"].update(attention="model", batch_size=2, max_steps=1)
    config["grpo"] = {"grader": {**SAME_ANSWER, "name": "brace", "reference": "{", "operation": "like"}}
    config["grpo"].update(group_size=2, max_new_tokens=4)
    result = train(config, progress=False)
    run = tmp_path / "run"
    after = json.loads((run / "eval" / "after.json").read_text())
    assert after["grader"]["name"] == "brace" and after["loss"] is None and "left_out" in after
    assert result.metrics["grader_brace"] == after["grader"]["mean"]
    assert not any(key.startswith("task_") for key in result.metrics)
    report = (run / "eval" / "report.html").read_text()
    assert "Grader brace, base vs tuned" in report and "grader brace: mean score" in report
    assert "loss on reference answers" not in report and "Scores, base vs tuned" not in report


def test_compare_checks_its_grader_once_for_both_models(tiny_model_dir, triage_data, tmp_path, capsys):
    """`eval --compare --grader` checks its grader once on the rows (grading empty answers), then grades
    each model's answers with it."""
    data = write_jsonl(tmp_path / "test.jsonl", rows_of(triage_data["test"], 2))
    calls = tmp_path / "calls.txt"
    (tmp_path / "rewards.py").write_text(
        "def one(completions, **kwargs):\n"
        "    texts = [c if isinstance(c, str) else c[0]['content'] for c in completions]\n"
        f"    open({str(calls)!r}, 'a').write('graded\\n' if any(texts) else 'checked\\n')\n"
        "    return [1.0 for _ in completions]\n"
    )
    kwargs = {"compare": str(tiny_model_dir), "max_new_tokens": 4, "json_out": True}
    assert eval_command(str(tiny_model_dir), str(data), grader=f"{tmp_path}/rewards.py:one", **kwargs) == 0
    assert json.loads(capsys.readouterr().out)["base"]["grader"]["mean"] == 1.0
    said = calls.read_text().splitlines()
    assert said.count("checked") == 1 and said.count("graded") == 2


def test_a_reward_file_not_found_for_grader_is_named_by_the_option_and_the_folder_looked_in(tmp_path, monkeypatch):
    """`--grader FILE.py:FUNCTION` names the option as given (no index for a lone function) and the working
    directory its relative path was looked for in; a list's entry is named by its index."""
    from tuneforge.graders import load_grader

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text("def f(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    folder = f"in the working directory {tmp_path.resolve()}"
    for spec, refused in (
        ("rewrds.py:f", f"--grader: rewrds.py is no file {folder} (from rewrds.py:f)"),
        (["rewards.py:f", "other.py:g"], f"--grader[1]: other.py is no file {folder} (from other.py:g)"),
    ):
        with pytest.raises(ConfigError) as error:
            load_grader(spec, key="--grader")
        assert error.value.message == f"{refused}; correct the path, or give it absolute.", error.value.message
