"""Evaluation on tiny models: loss against a hand computation, metrics on run and checkpoint folders,
KL, forgetting, the report, the command."""

import json
import re
import shutil
import subprocess
import sys
from importlib import resources

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import SUBPROCESS_ENV, tiny_run_config
from families import CLOCK_TOOL, WEATHER_TOOL
from matplotlib.container import BarContainer
from tiny import set_context

from tuneforge.errors import DataError, TuneforgeError
from tuneforge.eval import compare, eval_command, evaluate, measure_forgetting, read_eval_examples, write_run_report
from tuneforge.eval.evaluate import choose_metric
from tuneforge.eval.forgetting import (
    BASE_QUESTIONS_FILE,
    QUESTION_SAMPLES_RIGHT,
    ModelPair,
    answer_questions,
    kept_questions,
    mean_kl,
)
from tuneforge.eval.report import (
    Table,
    forgetting_table,
    learning_rate_figure,
    loss_figure,
    loss_label,
    metrics_table,
    print_tables,
    reward_figures,
    scores_figure,
    scores_plot,
    share_interval,
)
from tuneforge.models import load_model, load_tokenizer
from tuneforge.pipeline import train

PROMPTS = ["Hello, how are you today?", "What is two plus two?", "How do I reset my password?"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, triage_data, tmp_path_factory):
    """A finished 4-step LoRA run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("eval") / "run"
    train(tiny_run_config(tiny_model_dir, triage_data, run, max_steps=4, save_every=2, eval_every=2), progress=False)
    return run


def test_loss_equals_a_hand_computation(tiny_model_dir, triage_data):
    """Cross-entropy over the assistant's tokens (its reply and the end-of-turn token), all tokens
    of all examples weighted alike, computed here from plain logits one example at a time. The
    tickets share their system prompt, so `evaluate` runs them packed, the prompt held once."""
    result = evaluate(str(tiny_model_dir), triage_data["test"], limit=5, max_new_tokens=4, progress=False)
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    total, count = 0.0, 0
    for example in read_eval_examples(triage_data["test"], limit=5):
        messages = example.prompt + [{"role": "assistant", "content": example.reference}]
        prompt = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
        whole = prompt + example.reference + "<|im_end|>"
        assert tokenizer.apply_chat_template(messages, tokenize=False).startswith(whole)
        ids = tokenizer(whole, add_special_tokens=False, return_tensors="pt")["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        total += F.cross_entropy(logits[start - 1 : -1], ids[0, start:], reduction="sum").item()
        count += ids.shape[1] - start
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_loss_runs_packed_with_the_shared_system_prompt_once(tiny_model_dir, triage_data, monkeypatch):
    """The same loss as example by example, for fewer tokens through the model: the tickets share
    their system prompt."""
    import sys

    from tuneforge.eval.evaluate import _render, token_loss

    model, tokenizer = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    examples = [x for e in read_eval_examples(triage_data["test"], limit=8) for x in _render(e, tokenizer)]
    run = []  # token positions through the model (padding included)
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: run.append(args[0].numel()))
    packed = token_loss(model, examples, tokenizer.pad_token_id)
    packed_tokens = sum(run)
    monkeypatch.setattr(sys.modules["tuneforge.eval.evaluate"], "supports_per_example_attention", lambda *a: False)
    run.clear()
    one_by_one = token_loss(model, examples, tokenizer.pad_token_id, batch_size=1)
    assert packed["tokens"] == one_by_one["tokens"]
    assert packed["loss"] == pytest.approx(one_by_one["loss"], rel=1e-5)
    assert packed_tokens < 0.8 * sum(run)


def test_documents_of_raw_text_get_the_loss_of_every_token_in_the_windows_their_run_trained(
    tiny_model_dir, tmp_path, capsys
):
    """A text file has no answers: eval gives the loss over every token of its documents, cut as the run's
    data.truncation: split cut them, so on the run's validation file it is the run's valid_loss."""
    pages = [" ".join(f"Page {i}: the quick brown fox number {j} jumps." for j in range(3 + i)) for i in range(6)]
    for name, part in (("train", pages[:4]), ("valid", pages[4:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in part))
    data = {"train": tmp_path / "train.jsonl", "validation": tmp_path / "valid.jsonl"}
    cfg = tiny_run_config(tiny_model_dir, data, tmp_path / "run", max_steps=2, batch_size=2)
    cfg["data"] |= {"max_length": 24, "truncation": "split"}
    valid_loss = train(cfg, progress=False).metrics["full_valid_loss"]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    result = evaluate(str(tmp_path / "run"), data["validation"], progress=False)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert (result["n"], result["window"], result["windows"]) == (2, 24, report["counts"]["validation"])
    assert result["tokens"] == sum(len(tokenizer(p)["input_ids"]) for p in pages[4:])  # each token, then the EOS
    assert result["loss"] == pytest.approx(valid_loss, rel=1e-5)
    assert eval_command(str(tmp_path / "run"), str(data["validation"])) == 0
    shown = " ".join(capsys.readouterr().out.split())  # the table's lines wrap at the terminal's width
    assert "loss on 2 documents of valid.jsonl" in shown and "loss per token" in shown and "Examples" not in shown


def test_metrics_on_a_run_folder_and_a_checkpoint(tiny_run, triage_data):
    options = dict(metric="support_triage", limit=6, max_new_tokens=8, progress=False)
    final = evaluate(str(tiny_run), triage_data["test"], **options)
    last = evaluate(str(tiny_run / "checkpoints" / "step-4"), triage_data["test"], **options)
    middle = evaluate(str(tiny_run / "checkpoints" / "step-2"), triage_data["test"], **options)
    assert final["n"] == 6 and len(final["samples"]) == 6
    for key in ("valid_json", "valid_labels", "category", "priority", "product", "exact"):
        assert 0 <= final["scores"][key] <= 1
    assert {"input", "prediction", "reference", "correct"} <= set(final["samples"][0])
    assert final["samples"][0]["input"] in (triage_data["test"].read_text())
    # final/ is the step-4 checkpoint's model; step 2 is another one.
    assert last["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert [s["prediction"] for s in last["samples"]] == [s["prediction"] for s in final["samples"]]
    assert middle["loss"] != pytest.approx(final["loss"], rel=1e-6)


def test_progress_false_leaves_out_the_bars_of_every_model_load(tiny_model_dir, triage_data, capfd):
    # A notebook asks for quiet: transformers' "Loading weights" bar is progress too, and the caller's
    # own setting of it is back afterwards.
    from transformers.utils import logging as transformers_logging

    capfd.readouterr()
    evaluate(str(tiny_model_dir), triage_data["test"], limit=1, max_new_tokens=1, progress=False)
    measure_forgetting(str(tiny_model_dir), str(tiny_model_dir), progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()


def test_metric_is_chosen_from_the_data(tmp_path, triage_data):
    # A task's own scorer is asked for by name; the triage answers are JSON objects.
    assert choose_metric("auto", read_eval_examples(triage_data["test"])) == "json_fields"
    plain = tmp_path / "plain.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "JSON?"}, {"role": "assistant", "content": '{"a": 1}'}]},
    ]
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert choose_metric("auto", read_eval_examples(plain)) == "exact"
    assert choose_metric("auto", read_eval_examples(plain)[1:]) == "json_fields"
    assert choose_metric("contains", read_eval_examples(plain)) == "contains"


def test_a_misspelt_metric_is_refused_with_the_nearest_one():
    with pytest.raises(
        TuneforgeError, match=r"unknown metric 'exactt' \(did you mean 'exact'\?\); use one of auto, exact,"
    ):
        choose_metric("exactt", [])
    with pytest.raises(TuneforgeError, match=r"unknown metric 'bleu'; use one of auto, exact,") as far:
        choose_metric("bleu", [])
    assert "did you mean" not in far.value.message


def test_a_preference_pair_is_evaluated_against_its_chosen_reply(tmp_path):
    # A DPO run's validation file holds pairs; `eval.task` scores its answers against the chosen ones.
    pairs = tmp_path / "pairs.jsonl"
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    pairs.write_text(json.dumps(row) + "\n")
    (example,) = read_eval_examples(pairs)
    assert example.reference == "4"
    assert example.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert (example.file, example.line) == (str(pairs), 1)


def test_a_metric_that_cannot_score_the_references_is_refused_with_their_lines(tmp_path, tiny_model_dir):
    data = tmp_path / "plain.jsonl"
    answers = ["4", '{"category": "bug", "priority": "low", "product": "console"}', '{"a": 1}', "!!"]
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]}) + "\n"
            for a in answers
        )
    )
    examples = read_eval_examples(data)
    with pytest.raises(DataError, match=r"2 rows cannot be scored by json_fields") as unfit:
        choose_metric("json_fields", examples)
    assert [p.line for p in unfit.value.problems] == [1, 4]
    assert "plain.jsonl:1 messages: [reference_unfit_for_metric] the reference answer is not a JSON object" in str(
        unfit.value
    )
    with pytest.raises(DataError, match=r"3 rows cannot be scored by support_triage") as unfit:
        choose_metric("support_triage", examples)
    assert [p.line for p in unfit.value.problems] == [1, 3, 4]
    with pytest.raises(DataError, match=r"plain.jsonl:4 messages: .*holds no letter or digit"):
        choose_metric("contains", examples)
    assert choose_metric("exact", examples) == "exact"
    # Before the model is loaded, rather than after its answers are generated.
    with pytest.raises(DataError, match="cannot be scored by json_fields"):
        evaluate(str(tmp_path / "no-model-here"), data, metric="json_fields", progress=False)


def test_rows_without_a_reference_answer_are_refused_with_their_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
        + "\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2 .*example_missing_assistant_message"):
        read_eval_examples(bad)
    with pytest.raises(DataError, match=r"bad.jsonl: 1 row cannot be evaluated"):
        read_eval_examples(bad)
    with pytest.raises(DataError) as missing:  # a file that is not there is no row count
        read_eval_examples(tmp_path / "missing.jsonl")
    assert "missing.jsonl: cannot be evaluated" in missing.value.message
    assert "does not exist. Check the path" in str(missing.value.problems[0])


def test_a_row_that_cannot_be_rendered_is_named_by_its_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "weightless.jsonl"
    rows = [("2+2?", "4", 1), ("3+3?", "6", 0)]
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a, "weight": w}]})
            + "\n"
            for q, a, w in rows
        )
    )
    with pytest.raises(DataError) as unrendered:
        evaluate(str(tiny_model_dir), data, progress=False)
    assert "weightless.jsonl:2 messages: [no_trained_tokens]" in unrendered.value.message
    assert "<data>" not in unrendered.value.message
    assert [(p.file, p.line) for p in unrendered.value.problems] == [(str(data), 2)]


def test_kl_is_zero_against_itself_and_positive_after_a_change(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    same = mean_kl(ModelPair(model, model), tokenizer, PROMPTS, progress=False)
    assert same["mean"] == 0 and same["tokens"] > 0
    changed = load_model(str(tiny_model_dir)).eval()
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    assert mean_kl(ModelPair(changed, model), tokenizer, PROMPTS, progress=False)["mean"] > 0


def test_kl_of_an_adapter_is_against_the_adapter_switched_off(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(str(tiny_model_dir))
    adapted = get_peft_model(
        load_model(str(tiny_model_dir)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    ).eval()
    assert mean_kl(ModelPair(adapted), tokenizer, PROMPTS, progress=False)["mean"] == 0  # LoRA B starts at zero
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert mean_kl(ModelPair(adapted), tokenizer, PROMPTS, progress=False)["mean"] > 0


def test_forgetting_of_a_full_model_needs_its_base(tiny_model_dir):
    with pytest.raises(Exception, match="base model"):
        ModelPair(load_model(str(tiny_model_dir)))


def test_kept_questions_are_those_the_base_model_knows_firmly():
    record = json.loads(resources.files("tuneforge.eval").joinpath(BASE_QUESTIONS_FILE).read_text())
    kept = kept_questions()
    assert len(kept) >= 100 and len(kept) == record["correct"] <= record["greedy_right"]
    assert all(q["answers"] for q in kept)
    assert all(record["right_in_samples"][q["question"]] >= QUESTION_SAMPLES_RIGHT for q in kept)
    # The rule leaves out questions the base answers right greedily but in fewer samples.
    assert record["greedy_right"] > record["correct"]


def test_questions_are_answered_per_question_greedily_or_sampled(base):
    model, tokenizer = base  # the sharp tiny model: each question gets its own greedy answer
    questions = [{"question": f"What is {n} plus {n}?", "answers": [str(2 * n)]} for n in (1, 22, 333)]
    options = dict(progress=False)
    greedy = answer_questions(model, tokenizer, questions, samples=2, **options)
    alone = [answer_questions(model, tokenizer, [q], **options)[0][0] for q in questions]
    assert greedy == [[a, a] for a in alone]
    assert len(set(alone)) == len(questions)
    sampled = answer_questions(model, tokenizer, questions, samples=4, temperature=1.0, seed=3, **options)
    assert [len(answers) for answers in sampled] == [4, 4, 4]
    assert sampled == answer_questions(model, tokenizer, questions, samples=4, temperature=1.0, seed=3, **options)
    assert any(len(set(answers)) > 1 for answers in sampled)


def test_a_share_comes_with_its_wilson_interval():
    # 72 of 100 by hand: centre (0.72 + 1.96²/200) / (1 + 1.96²/100) = 0.71187,
    # half 1.96 · sqrt(0.72 · 0.28 / 100 + 1.96² / 40000) / (1 + 1.96²/100) = 0.08675.
    assert share_interval(0.72, 100) == pytest.approx((0.62512, 0.79861), abs=1e-5)
    low, high = share_interval(0.0, 100)
    assert low == 0.0 and high == pytest.approx(0.03699, abs=1e-5)  # none right is not "0% for sure"
    assert share_interval(1.0, 115)[1] == pytest.approx(1.0)
    four_times_the_examples = share_interval(0.72, 400)
    assert (four_times_the_examples[1] - four_times_the_examples[0]) / (0.79861 - 0.62512) == pytest.approx(
        0.5, abs=0.02
    )


def test_a_run_of_one_logged_step_draws_each_curve_as_a_visible_point():
    one_step = [
        {"step": 1, "train_loss": 0.1, "lr": 1e-3, "reward": 0.5, "reward/format": 1.0, "reward_std": 0.2, "kl": 0.0}
    ]
    figures = [loss_figure({"run": one_step}), learning_rate_figure(one_step)]
    figures += [figure for _, figure in reward_figures(one_step)]
    lines = [line for figure in figures for line in figure.axes[0].lines]
    assert len(lines) == 6 and all(line.get_marker() not in (None, "", "None") for line in lines)
    two_steps = [one_step[0], {**one_step[0], "step": 2}]
    assert loss_figure({"run": two_steps}).axes[0].lines[0].get_marker() == "None"  # a line, as for any longer run


def test_the_step_axis_of_a_short_run_has_whole_steps_only():
    short = [{"step": 1, "train_loss": 2.0, "lr": 1e-4, "reward": 0.5, "reward_std": 0.2, "kl": 0.0}]
    short += [{**short[0], "step": 2}, {**short[0], "step": 3}]
    figures = [loss_figure({"run": short}), learning_rate_figure(short)]
    figures += [figure for _, figure in reward_figures(short)]
    for figure in figures:
        figure.canvas.draw()
        ticks = [tick for tick in figure.axes[0].get_xticks() if 1 <= tick <= 3]
        assert ticks and all(tick == int(tick) for tick in ticks), ticks


def test_the_scores_plot_draws_each_share_with_its_95_percent_interval():
    before = {"metric": "exact", "n": 100, "data": "test.jsonl", "scores": {"n": 100, "exact": 0.72}}
    after = {"metric": "exact", "n": 100, "data": "test.jsonl", "scores": {"n": 100, "exact": 0.78}}
    base, tuned = [c for c in scores_figure(before, after).axes[0].containers if isinstance(c, BarContainer)]
    (segment,) = base.errorbar.lines[2][0].get_segments()
    assert segment[:, 1] == pytest.approx(share_interval(0.72, 100))  # 62.5% to 79.9%: it holds 78%
    assert tuned.errorbar is not None
    every_right = {"metric": "exact", "n": 60, "data": "test.jsonl", "scores": {"n": 60, "exact": 1.0}}
    scores_figure(before | {"n": 60, "scores": {"n": 60, "exact": 0.0}}, every_right)  # ends at 0% and 100%


def test_the_scores_plot_names_the_file_it_scores():
    # After training the validation file is scored, not a test file: the axis and caption name it.
    scores = {"metric": "exact", "n": 4, "data": "data/valid.jsonl", "scores": {"n": 4, "exact": 0.5}}
    caption, _ = scores_plot(scores, scores)
    assert "valid.jsonl" in caption and "test" not in caption
    assert scores_figure(scores, scores).axes[0].get_ylabel() == "share of valid.jsonl's examples (0 to 1)"


def test_the_learning_rate_axis_starts_at_zero():
    warmup = [{"step": step, "lr": 1e-4 * min(1.0, step / 3)} for step in range(1, 21)]
    axes = learning_rate_figure(warmup).axes[0]
    assert axes.get_ylim()[0] == 0 and axes.get_ylim()[1] >= 1e-4  # the first step's 3.3e-5 sits a third of the way up


def test_every_figure_labels_its_axes():
    metrics = [{"step": 1, "train_loss": 0.1, "lr": 1e-3, "reward": 0.5, "reward_std": 0.2, "kl": 0.0}]
    scores = {
        "metric": "exact",
        "data": "data/test.jsonl",
        "scores": {"n": 4, "exact": 0.5, "fields": {"category": 0.75}},
    }
    figures = [loss_figure({"run": metrics}), learning_rate_figure(metrics), scores_figure(scores, scores)]
    figures += [figure for _, figure in reward_figures(metrics)]
    labels = [(figure.axes[0].get_xlabel(), figure.axes[0].get_ylabel()) for figure in figures]
    assert labels == [
        ("step", "policy-gradient loss per token (GRPO)"),
        ("step", "learning rate (no unit)"),
        ("", "share of test.jsonl's examples (0 to 1)"),  # the x-axis names each score at its bar
        ("step", "grader score per answer"),
        ("step", "per token"),
    ]


def test_the_loss_axis_names_the_runs_objective():
    sft = [{"step": 1, "train_loss": 2.0}]
    grpo = [{"step": 1, "train_loss": 0.1, "reward": 0.5, "kl": 0.0}]
    dpo = [{"step": 1, "train_loss": 0.7, "rewards/margins": 0.1}]
    distill = [{"step": 1, "train_loss": 3.0, "divergence": 2.5}]
    assert loss_label({"a": sft}) == "cross-entropy per trained token"
    assert loss_label({"a": grpo}) == "policy-gradient loss per token (GRPO)"
    assert loss_label({"a": dpo}) == "DPO loss per pair"
    assert loss_label({"a": distill}) == "distillation loss per trained token"
    assert loss_label({"a": sft, "b": grpo}) == "training loss"


def test_run_report_is_written_and_self_contained(tiny_run, tiny_model_dir, triage_data):
    options = dict(limit=4, max_new_tokens=8, progress=False)
    before = evaluate(str(tiny_model_dir), triage_data["test"], **options)
    after = evaluate(str(tiny_run), triage_data["test"], **options)
    forgetting = measure_forgetting(str(tiny_run), progress=False)
    assert forgetting["general_questions"]["n"] == len(kept_questions())
    assert forgetting["kl"]["mean"] >= 0 and forgetting["general_text"]["tokens"] > 0
    targets = [{"target": "exact", "goal": ">= 85%", "measured": "0%", "met": False}]
    report = write_run_report(tiny_run, before, after, forgetting, targets, facts={"wall time": "1 s"})
    assert report == tiny_run / "eval" / "report.html"
    page = report.read_text()
    sources = re.findall(r"""(?:src|href)\s*=\s*['"]?([^'" >]+)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "<link" not in page
    assert page.count("<img") == 3  # loss curves, learning rate, scores
    for title in ("Targets", "Forgetting", "Examples", "MISSED"):
        assert title in page
    # The tiny base knows none of the questions: the table names the model that does.
    assert f"general questions right (of the {len(kept_questions())} smollm2-135m-instruct knows)" in page
    samples = [json.loads(line) for line in (tiny_run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"input", "base", "tuned", "reference"} <= set(samples[0])
    saved = json.loads((tiny_run / "eval" / "after.json").read_text())
    assert saved["scores"] == after["scores"] and "samples" not in saved
    assert (tiny_run / "eval" / "before.json").is_file() and (tiny_run / "eval" / "forgetting.json").is_file()
    # Evaluated again without forgetting: the earlier measure goes with the report that showed it.
    write_run_report(tiny_run, before, after)
    assert sorted(p.name for p in (tiny_run / "eval").iterdir()) == [
        "after.json",
        "before.json",
        "report.html",
        "samples.jsonl",
    ]


def test_a_configs_eval_section_runs_on_the_final_model(tiny_model_dir, triage_data, tmp_path):
    """`eval: {task, forgetting}` in a training config: when training ends, the base and the final
    model are scored on the validation file and measured on the general sets, into eval/ and the
    run's final metrics."""
    run = tmp_path / "run"
    config = tiny_run_config(tiny_model_dir, triage_data, run, max_steps=2)
    config["eval"] = {"task": "support_triage", "forgetting": True}
    result = train(config, progress=False)
    for name in ("report.html", "before.json", "after.json", "forgetting.json", "samples.jsonl"):
        assert (run / "eval" / name).is_file(), name
    before, after = (json.loads((run / "eval" / f"{name}.json").read_text()) for name in ("before", "after"))
    assert after["n"] == before["n"] == 16 and after["metric"] == "support_triage"
    assert before["model"] != after["model"] and before["loss"] != after["loss"]
    # The base side is the adapter switched off: the base model's own figures.
    base_alone = evaluate(str(tiny_model_dir), triage_data["validation"], metric="support_triage", progress=False)
    assert before["loss"] == pytest.approx(base_alone["loss"], rel=1e-5) and before["scores"] == base_alone["scores"]
    # Saved as `tuneforge eval` saves its results, header included.
    assert set(before) == set(after) == set(base_alone) - {"samples"}
    assert before["spec"] == str(tiny_model_dir) and after["spec"] == str(result.final_dir)
    forgetting = json.loads((run / "eval" / "forgetting.json").read_text())
    assert result.metrics["task_exact"] == after["scores"]["exact"]
    assert result.metrics["task_priority"] == after["scores"]["priority"]
    # The tiny model knows none of the general questions, so no share of them is kept: null, in strict JSON.
    assert forgetting["general_questions"]["base_accuracy"] == 0
    assert forgetting["general_questions"]["retained"] is None
    assert result.metrics["forgetting_questions_kept"] is None
    json.loads((run / "summary.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert result.metrics["forgetting_kl"] == forgetting["kl"]["mean"] > 0  # two LoRA steps moved the model
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["forgetting_text_ce_change"] == forgetting["general_text"]["change"]


def test_forgetting_alone_has_its_report_too(tiny_model_dir, triage_data, tmp_path):
    config = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)
    config["eval"] = {"forgetting": True}
    train(config, progress=False)
    eval_dir = tmp_path / "run" / "eval"
    assert sorted(p.name for p in eval_dir.iterdir()) == ["forgetting.json", "report.html"]
    page = (eval_dir / "report.html").read_text()
    assert "Forgetting: general data the training never saw" in page and "Examples" not in page
    assert page.count("<img") == 2  # loss curves, learning rate
    # A small KL keeps its digits: at four decimals one step's 1e-5 would read as no change at all.
    forgetting = json.loads((eval_dir / "forgetting.json").read_text())
    kl_row = next(row for row in forgetting_table(forgetting).rows if row[0].startswith("KL"))
    assert float(kl_row[2]) == pytest.approx(forgetting["kl"]["mean"], rel=1e-2) and float(kl_row[2]) > 0


def test_the_base_of_a_lora_run_trained_further_is_that_run(tiny_run, tiny_model_dir, triage_data, tmp_path):
    """Its adapter switched off leaves the model beneath the LoRA run: the base side is the run itself."""
    config = tiny_run_config(tiny_run, triage_data, tmp_path / "run", max_steps=1)
    config["eval"] = {"task": "exact"}
    train(config, progress=False)
    before = json.loads((tmp_path / "run" / "eval" / "before.json").read_text())
    start = evaluate(str(tiny_run), triage_data["validation"], metric="exact", max_new_tokens=1, progress=False)
    assert before["spec"] == str(tiny_run)
    assert before["loss"] == pytest.approx(start["loss"], rel=1e-6)


def write_two_turn_rows(path, first: tuple[str, str], numbers):
    """Chat rows of two turns: the same first exchange, then a sum to answer, one row per number."""
    turns = [[*first, f"What is {n} plus {n}?", f"The answer is {2 * n}."] for n in numbers]
    roles = ("user", "assistant") * 2
    rows = [{"messages": [{"role": r, "content": c} for r, c in zip(roles, texts)]} for texts in turns]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_conversations_a_template_trains_turn_by_turn_are_evaluated_as_training_validates_them(tmp_path):
    """Qwen 3 drops the reasoning of earlier replies: a two-turn row trains as two examples, and the
    evaluation's loss is the run's validation loss on them."""
    from families import FAMILIES, save_family_model

    model = save_family_model(FAMILIES["qwen3"], tmp_path / "qwen3")
    first = ("hi", "<think>\nhmm\n</think>\n\nhello")
    files = {
        split: write_two_turn_rows(tmp_path / f"{split}.jsonl", first, numbers)
        for split, numbers in (("train", range(4, 12)), ("validation", range(4)))
    }
    config = tiny_run_config(model, files, tmp_path / "run", max_steps=1)
    config["eval"] = {"task": "exact"}
    result = train(config, progress=False)
    after = json.loads((tmp_path / "run" / "eval" / "after.json").read_text())
    assert after["loss"] == pytest.approx(result.metrics["full_valid_loss"], rel=1e-5)


def test_training_with_an_eval_section_prints_where_its_report_and_plots_are(
    tmp_path, tiny_model_dir, triage_data, capsys
):
    config = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=1)
    config["eval"] = {"task": "exact"}
    train(config)
    out = capsys.readouterr().out
    assert f"report with plots: {tmp_path / 'run' / 'eval' / 'report.html'}" in out.replace("\n", "")


# `tuneforge train` whose evaluation after training is stopped by Ctrl-C as it starts.
STOPPED_WHILE_EVALUATING = """
import os, signal, tuneforge.pipeline
from tuneforge.cli import main
def evaluating(*_args, **_kw):
    os.kill(os.getpid(), signal.SIGINT)
    signal.pause()
tuneforge.pipeline.evaluate_after_training = evaluating
main()
"""


def test_ctrl_c_in_the_evaluation_after_training_says_the_model_is_kept_and_how_to_evaluate_it(
    tmp_path, tiny_model_dir, triage_data
):
    """Training completed: the run is not to be continued, its model is in final/, and the --resume said runs the
    evaluation it lacks."""
    out = tmp_path / "run"
    config = tiny_run_config(tiny_model_dir, triage_data, out, max_steps=1)
    config["eval"] = {"task": "exact"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    stopped = subprocess.run(
        [sys.executable, "-c", STOPPED_WHILE_EVALUATING, "train", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        env=SUBPROCESS_ENV,
    )
    assert stopped.returncode == 130, stopped.stderr
    assert " ".join(stopped.stderr.split()).endswith(
        f" interrupted during the evaluation after training; the trained model is in {out / 'final'}. "
        f"`tuneforge train {out / 'config.yaml'} --resume` runs the evaluation."
    )
    assert not (out / "eval" / "report.html").exists()
    train(out / "config.yaml", resume=True, progress=False)
    assert (out / "eval" / "report.html").is_file()


def test_the_loss_after_training_counts_the_tokens_data_train_on_trains(tmp_path, tiny_model_dir, triage_data):
    first = ("Hello, how are you today?", "I am fine, thank you.")
    validation = write_two_turn_rows(tmp_path / "two-turns.jsonl", first, range(4))
    config = tiny_run_config(tiny_model_dir, {**triage_data, "validation": validation}, tmp_path / "run", max_steps=1)
    config["data"]["train_on"] = "last_assistant"
    config["eval"] = {"task": "exact"}
    result = train(config, progress=False)
    after = json.loads((tmp_path / "run" / "eval" / "after.json").read_text())
    assert after["loss"] == pytest.approx(result.metrics["full_valid_loss"], rel=1e-5)
    # `tuneforge eval` on the run counts what the run trained on too; on its base model, every reply.
    run = evaluate(str(tmp_path / "run"), validation, metric="exact", max_new_tokens=1, progress=False)
    assert run["loss"] == pytest.approx(result.metrics["full_valid_loss"], rel=1e-5)
    base = evaluate(str(tiny_model_dir), validation, metric="exact", max_new_tokens=1, progress=False)
    both = compare(str(tmp_path / "run"), str(tiny_model_dir), validation, metric="exact", max_new_tokens=1)
    assert both["base"]["loss"] != pytest.approx(base["loss"], rel=1e-6)  # the run's replies, not every one


def test_a_validation_file_eval_task_cannot_score_stops_the_run_before_any_compute(
    tiny_model_dir, triage_data, tmp_path
):
    rows = [json.loads(line) for line in triage_data["validation"].read_text().splitlines()]
    rows[1]["messages"] = rows[1]["messages"][:-1]  # ends with the user's ticket: no reference answer
    bad = tmp_path / "valid.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tiny_run_config(tiny_model_dir, {**triage_data, "validation": bad}, tmp_path / "run", max_steps=2)
    config["eval"] = {"task": "exact"}
    with pytest.raises(DataError, match=r"valid\.jsonl:2 messages: \[example_missing_assistant_message\]"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()
    # The tickets' answers are JSON objects: `contains` scores them, but a plain-text answer has no fields.
    rows[1]["messages"].append({"role": "assistant", "content": "outage"})
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config["eval"] = {"task": "json_fields"}
    with pytest.raises(DataError, match=r"valid\.jsonl:2 messages: \[reference_unfit_for_metric\]"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()
    # A row past the base model's context (2048 positions) could be neither scored nor answered.
    rows[1]["messages"][-2]["content"] = "Why? " * 2100
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config["eval"] = {"task": "exact"}
    with pytest.raises(DataError, match=r"valid\.jsonl:2: \[too_long\] the row is \d+ tokens"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_compare_model_that_cannot_be_found_fails_before_any_evaluation(tiny_model_dir, triage_data, capsys):
    from tuneforge.errors import ModelSourceError

    with pytest.raises(ModelSourceError, match="no-such-model"):
        eval_command(str(tiny_model_dir), str(triage_data["test"]), compare="no-such-model", limit=1)
    assert "loss" not in capsys.readouterr().err  # no progress bar: nothing was evaluated


def test_per_token_figures_of_models_with_other_tokenizers_are_not_compared(tiny_model_dir, triage_data, tmp_path):
    from tiny import tiny_llama, tiny_tokenizer

    other = tmp_path / "other-vocabulary"
    tokenizer = tiny_tokenizer(vocab_size=300)
    tiny_llama(tokenizer).save_pretrained(other)
    tokenizer.save_pretrained(other)
    result = compare(str(tiny_model_dir), str(other), triage_data["test"], limit=2, max_new_tokens=2, progress=False)
    assert result["base"]["tokens"] != result["tuned"]["tokens"]
    table = metrics_table({"base": result["base"], "tuned": result["tuned"]})
    changes = {row[0]: row[-1] for row in table.rows}
    assert changes["loss on reference answers"] == changes["perplexity"] == changes["next-token accuracy"] == ""
    assert changes["exact"] == "+0.0 pts"
    tokens = f"{result['base']['tokens']} and {result['tuned']['tokens']} tokens"
    assert f"tokenize the references into {tokens}" in table.caption
    same = metrics_table({"base": result["tuned"], "tuned": result["tuned"]})
    assert same.rows[0][-1] == "+0.0%" and "tokenize" not in same.caption


def test_eval_command_prints_tables_or_json(tiny_run, tiny_model_dir, triage_data, capsys):
    assert (
        eval_command(
            str(tiny_run), str(triage_data["test"]), compare=str(tiny_model_dir), limit=2, metric="support_triage"
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "support_triage on 2 examples" in out and "truth" in out and "change" in out
    assert eval_command(str(tiny_run), str(triage_data["test"]), json_out=True, limit=2, metric="json_fields") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metric"] == "json_fields" and printed["n"] == 2


def test_a_reasoning_model_is_scored_on_its_answer_after_the_reasoning(tiny_model_dir, tmp_path, monkeypatch):
    """A reply that thinks first is right when its answer is (the reference may hold reasoning too); one
    cut off at max_new_tokens inside its reasoning has no answer, and the usage counts it."""
    import sys

    from tuneforge.eval.evaluate import evaluate_loaded
    from tuneforge.generate import Completion

    rows = [
        ("What is two plus two?", "Four."),
        ("What is three plus three?", "<think>\nThree and three.\n</think>\n\nSix."),
        ("What is four plus four?", "Eight."),
    ]
    path = tmp_path / "valid.jsonl"
    messages = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in rows]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in messages))
    replies = [
        Completion("<think>\nTwo and two make four.\n</think>\n\nFour.", 9, 12, "stop"),
        Completion("<think>\nSix, surely.\n</think>\n\nSix.", 9, 10, "stop"),
        Completion("<think>\nFour and four, that is", 9, 8, "length"),
    ]
    evaluate_module = sys.modules["tuneforge.eval.evaluate"]
    monkeypatch.setattr(evaluate_module, "generate", lambda model, tokenizer, prompts, **options: replies)
    model, tokenizer = load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    result = evaluate_loaded(model, tokenizer, read_eval_examples(path), metric="exact", progress=False)
    assert [s["correct"] for s in result["samples"]] == [True, True, False]
    assert result["scores"]["exact"] == pytest.approx(2 / 3)
    assert result["usage"]["stopped_in_reasoning"] == 1
    assert ["cut inside the reasoning (no answer)", "1 of 3"] in metrics_table(
        {"model": {**result, "data": str(path)}}
    ).rows
    reply = '<think>\nhm\n</think>\n{"a": 1}'  # a JSON answer after reasoning: json_fields scores it
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Label?"}, {"role": "assistant", "content": reply}]})
        + "\n"
    )
    assert choose_metric("auto", read_eval_examples(path)) == "json_fields"


def test_the_tables_caption_says_what_its_metric_counts(tiny_model_dir, triage_data):
    """The caption explains the metric the table scores by: `contains` is not `exact`."""
    for metric, said in [
        ("contains", "contains: the answer holds the reference as whole words, case and punctuation aside"),
        ("exact", "exact: the whole answer right (every field, for JSON answers)"),
    ]:
        result = evaluate(
            str(tiny_model_dir), triage_data["test"], limit=1, max_new_tokens=2, metric=metric, progress=False
        )
        caption = metrics_table({"tuned": result}).caption
        assert said in caption and ("exact:" in caption) == (metric == "exact")


def test_the_table_states_how_the_scored_answers_were_generated(tiny_model_dir, triage_data):
    result = evaluate(str(tiny_model_dir), triage_data["test"], limit=2, max_new_tokens=3, progress=False)
    assert result["generation"] == {"decoding": "greedy", "max_new_tokens": 3}
    assert "answers scored: greedy, at most 3 new tokens" in metrics_table({"tuned": result}).caption


def test_eval_cli_takes_max_new_tokens(tiny_model_dir, triage_data, monkeypatch, capsys):
    """`tuneforge eval --max-new-tokens N` scores answers of up to N tokens (a reasoning model needs the room)."""
    import sys

    from tuneforge.cli import main

    args = [str(tiny_model_dir), str(triage_data["test"]), "--limit", "1", "--max-new-tokens", "3", "--json"]
    monkeypatch.setattr(sys, "argv", ["tuneforge", "eval", *args])
    with pytest.raises(SystemExit) as leaving:
        main()
    assert leaving.value.code == 0
    assert json.loads(capsys.readouterr().out)["generation"] == {"decoding": "greedy", "max_new_tokens": 3}


def test_a_row_longer_than_the_models_context_is_refused_with_its_line(tmp_path, tiny_model_dir):
    data = tmp_path / "long.jsonl"
    questions = ["2+2?", "Why? " * 2100, "3+3?"]
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "4"}]}) + "\n"
            for q in questions
        )
    )
    with pytest.raises(DataError, match=r"long.jsonl: 1 row does not fit the model's context") as long:
        evaluate(str(tiny_model_dir), data, progress=False)
    assert "long.jsonl:2: [too_long]" in long.value.message
    assert "maximum context length of 2048 tokens" in long.value.message


def test_forgetting_on_a_model_whose_context_the_general_sets_overflow_is_refused_before_training(
    tmp_path, tiny_model_dir, triage_data
):
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    from tuneforge.eval.after_training import check_eval_inputs

    short = set_context(shutil.copytree(tiny_model_dir, tmp_path / "short"), 128)
    run = tiny_run_config(short, triage_data, tmp_path / "run")
    run["data"]["max_length"] = 128
    run["eval"] = {"forgetting": True}
    with pytest.raises(
        ConfigError, match=r"eval.forgetting: .* rows of up to \d+ tokens .* more than the 128 positions"
    ):
        check_eval_inputs(load_config(run))
    run["eval"] = {"forgetting": False}
    check_eval_inputs(load_config(run))


TOOL_ROWS = [
    {
        "messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "Sunny."}],
        "tools": [WEATHER_TOOL],
    },
    {
        "messages": [{"role": "user", "content": "What time is it?"}, {"role": "assistant", "content": "Noon."}],
        "tools": [CLOCK_TOOL, WEATHER_TOOL],
    },
    {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]},
]


def test_eval_answers_rows_with_their_tools_as_serve_renders_them(tmp_path):
    """Each answer is generated from the prompt with its row's tools, as `tuneforge serve` encodes a request with
    the same messages and tools."""
    from families import FAMILIES, save_family_model

    from tuneforge.generate import generate
    from tuneforge.models import load_model, load_tokenizer
    from tuneforge.serve.app import _encode
    from tuneforge.serve.bodies import ChatCompletionBody

    folder = save_family_model(FAMILIES["qwen2.5"], tmp_path / "qwen")
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TOOL_ROWS))
    result = evaluate(str(folder), data, max_new_tokens=6, progress=False)
    model, tokenizer = load_model(str(folder)), load_tokenizer(str(folder))
    for row, sample in zip(TOOL_ROWS, result["samples"]):
        body = ChatCompletionBody(model="m", messages=row["messages"][:-1], tools=row.get("tools"))
        [served] = _encode(tokenizer, [body.template_messages()], body.template_tools())
        [answer] = generate(model, tokenizer, [tuple(served)], max_new_tokens=6)
        assert sample["prediction"] == answer.text


def test_eval_refuses_tools_a_template_does_not_write(tiny_model_dir, tmp_path):
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TOOL_ROWS))
    with pytest.raises(DataError) as err:
        evaluate(str(tiny_model_dir), data, max_new_tokens=2, progress=False)
    assert [(p.line, p.field, p.code) for p in err.value.problems] == [
        (1, "tools", "tools_not_rendered"),
        (2, "tools", "tools_not_rendered"),
    ]


def test_a_run_reports_curves_leave_out_a_metrics_line_that_is_not_a_step_record_and_say_so(tmp_path):
    from tuneforge.eval.report import read_metrics, training_plots

    lines = [b'{"step": 1, "train_loss": 2.0, "lr": 0.001}', b'{"step": 2, "tra', b'{"step": 3, "train_loss": 1.5}']
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.warns(UserWarning, match="metrics.jsonl line 2 is not a step's record: it is not JSON"):
        metrics = read_metrics(tmp_path)  # as write_run_report and a sweep read it
    assert [m["step"] for m in metrics] == [1, 3]
    assert len(training_plots(metrics)) == 2  # the loss curve and learning rate


def test_a_run_reports_rollouts_leave_out_a_line_that_is_not_a_step_s_answers_and_say_so(tmp_path):
    """rollouts.jsonl (a GRPO run's sampled answers) with a line cut short, one not a record and one without its
    answers: the report's table shows the whole records and a warning names each line left out."""
    from tuneforge.eval.report import rollouts_table

    answer = {"text": "four", "reward": 1.0, "advantage": 0.5}
    lines = [
        json.dumps({"step": 1, "prompt": "2+2?", "answers": [answer]}),
        '{"step": 2, "prompt": "2+',
        "[1, 2]",
        json.dumps({"step": 3, "prompt": "3+3?"}),
        json.dumps({"step": 4, "prompt": "4+4?", "answers": [answer, answer]}),
    ]
    (tmp_path / "rollouts.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as said:
        table = rollouts_table(tmp_path, steps=5)
    assert [row[0] for row in table.rows] == ["1", "4", "4"]
    messages = [str(w.message) for w in said]
    for line in (2, 3, 4):
        assert any(f"rollouts.jsonl line {line} is not a step's sampled answers" in m for m in messages), messages


@pytest.mark.parametrize("grader", [False, True])
def test_a_reply_rated_undesirable_is_refused_as_a_reference_answer(tmp_path, grader):
    """A KTO row rated false holds a reply not to give: read as the reference, its loss and metric would reward
    the model for it. It is refused with its file, line and field; the rows rated true are references."""
    rows = [
        {"prompt": "The API is down", "completion": "Restart the gateway.", "label": True},
        {"prompt": "The API is down", "completion": "Have a nice day!", "label": False},
    ]
    data = tmp_path / "rated.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as err:
        read_eval_examples(data, prompts=grader)
    assert [(p.line, p.field, p.code) for p in err.value.problems] == [(2, "label", "undesirable_reference")]
    assert "rated undesirable (label: false)" in str(err.value)
    data.write_text(json.dumps(rows[0]) + "\n")
    assert [e.reference for e in read_eval_examples(data, prompts=grader)] == ["Restart the gateway."]


def test_compare_refuses_rows_past_the_base_s_context_before_the_tuned_model_loads(
    tiny_model_dir, tmp_path, monkeypatch
):
    """--compare with a base of a shorter context: the rows it cannot take are refused before either model loads,
    not after the tuned model has answered every row."""
    import sys

    evaluating = sys.modules["tuneforge.eval.evaluate"]  # the module, which the package's `evaluate` function hides
    base = set_context(shutil.copytree(tiny_model_dir, tmp_path / "short"), 16)
    loaded = []
    monkeypatch.setattr(evaluating, "load_text_model", lambda source, *a, **k: loaded.append(source.path))
    row = {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "4"}]}
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="more than the model's maximum context length of 16 tokens"):
        compare(str(tiny_model_dir), str(base), data, progress=False)
    assert loaded == []


@pytest.mark.parametrize(
    ("call", "argument", "value", "least"),
    [
        ("evaluate", "max_new_tokens", 0, 1),
        ("evaluate", "limit", 0, 1),
        ("evaluate", "limit", -1, 1),
        ("compare", "max_new_tokens", 2.5, 1),
        ("compare", "limit", 0, 1),
        ("evaluate_loaded", "max_new_tokens", 0, 1),
        ("evaluate_choices", "num_fewshot", -1, 0),
        ("evaluate_choices", "limit", 0, 1),
        ("compare_choices", "num_fewshot", -1, 0),
        ("evaluate", "batch_size", 0, 1),
        ("evaluate", "batch_size", -1, 1),
        ("compare", "batch_size", 0, 1),
        ("evaluate_loaded", "batch_size", 0, 1),
        ("evaluate_documents", "batch_size", -1, 1),
        ("evaluate_choices", "batch_size", 0, 1),
        ("compare_choices", "batch_size", -1, 1),
        ("measure_forgetting", "batch_size", 0, 1),
        ("evaluate_reward_model", "batch_size", 0, 1),
    ],
)
def test_the_python_evaluations_refuse_a_count_below_its_least_naming_it(
    tiny_model_dir, triage_data, tmp_path, call, argument, value, least
):
    """The lower-level functions a Python caller reaches refuse a count the CLI's bounds refuse, naming the
    argument, before any model loads: not a ValueError from generation, a file said to hold no conversations, or
    -1 few-shot examples run as none."""
    from tuneforge.errors import ConfigError
    from tuneforge.eval.choices import compare_choices, evaluate_choices
    from tuneforge.eval.evaluate import evaluate_documents, evaluate_loaded
    from tuneforge.eval.forgetting import measure_forgetting
    from tuneforge.eval.reward import evaluate_reward_model

    model = str(tiny_model_dir)
    documents = tmp_path / "documents.txt"
    documents.write_text("One document of raw text.\n")
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text(
        "".join(json.dumps({"question": f"{n}+2?", "choices": ["4", "5"], "answer": 0}) + "\n" for n in range(3))
    )
    calls = {
        "evaluate": lambda **given: evaluate(model, triage_data["test"], progress=False, **given),
        "compare": lambda **given: compare(model, model, triage_data["test"], progress=False, **given),
        "evaluate_loaded": lambda **given: evaluate_loaded(
            load_model(model), load_tokenizer(model), read_eval_examples(triage_data["test"]), progress=False, **given
        ),
        "evaluate_choices": lambda **given: evaluate_choices(model, quiz, progress=False, **given),
        "compare_choices": lambda **given: compare_choices(model, model, quiz, progress=False, **given),
        "evaluate_documents": lambda **given: evaluate_documents(model, documents, progress=False, **given),
        "measure_forgetting": lambda **given: measure_forgetting(model, model, progress=False, **given),
        "evaluate_reward_model": lambda **given: evaluate_reward_model(model, quiz, progress=False, **given),
    }
    with pytest.raises(ConfigError, match=rf"^{argument} takes a whole number of at least {least}, got {value!r};"):
        calls[call](**{argument: value})


def test_a_numpy_count_is_taken_as_the_whole_number_it_is(tiny_model_dir, tmp_path):
    """A count computed with NumPy (np.int64) is a whole number, as generation's Sampling takes it: not refused, and
    the result holds it as the JSON number it is (`tuneforge eval --json` prints the result with json.dumps)."""
    import numpy as np

    from tuneforge.eval.choices import evaluate_choices

    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text(
        "".join(json.dumps({"question": f"{n}+2?", "choices": ["4", "5"], "answer": 0}) + "\n" for n in range(3))
    )
    scored = evaluate_choices(str(tiny_model_dir), quiz, limit=np.int64(2), num_fewshot=np.int64(1), progress=False)
    assert scored["n"] == 2 and json.loads(json.dumps(scored))["num_fewshot"] == 1
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]})
    )
    answered = evaluate(str(tiny_model_dir), chat, max_new_tokens=np.int64(2), progress=False)
    assert json.loads(json.dumps(answered))["generation"]["max_new_tokens"] == 2


def test_a_damaged_bundled_base_questions_record_is_refused_as_a_damaged_install(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tuneforge.errors import TuneforgeError
    from tuneforge.eval import forgetting

    monkeypatch.setattr(forgetting, "resources", SimpleNamespace(files=lambda package: tmp_path))
    path = tmp_path / forgetting.BASE_QUESTIONS_FILE
    for damage in (b'{"model": "m", "kept": ["What is', b"[]", b'{"model": "m", "kept": 3}', None):
        if damage is None:
            path.unlink()
        else:
            path.write_bytes(damage)
        with pytest.raises(TuneforgeError) as refused:
            forgetting.kept_questions()
        assert refused.value.message.startswith(f"{path}: ") and "reinstall tuneforge" in refused.value.message
    path.write_text(json.dumps({"model": "m", "kept": ["What is the capital of France?"]}))
    assert [q["question"] for q in forgetting.kept_questions()] == ["What is the capital of France?"]


def test_a_report_table_prints_its_titles_and_headers_as_written(capsys):
    # Titles name the data file and headers the models, user text where rich would read `[/x]` as a closing tag
    # (an error) and `:x:` as an emoji's code.
    table = Table("score on 2 examples of [/x] :x:.jsonl", ["metric", "run [/x] :x:"], [["exact", "0.5"]], ":x: [/x]")
    print_tables([table])
    said = " ".join(capsys.readouterr().out.split())  # the title wrapped to the table's width, joined
    assert "of [/x] :x:.jsonl" in said and "run [/x] :x:" in said and ":x: [/x]" in said


def test_an_inline_eval_grader_that_cannot_work_is_named_by_the_config_file_and_line_that_set_it(tmp_path):
    """eval.grader written in the config is named with its file and line, as grpo.grader is, so that the error
    points at the line to fix."""
    from tuneforge.config import load_config
    from tuneforge.eval.after_training import check_eval_inputs

    (tmp_path / "val.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}\n'
    )
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  train: val.jsonl\n  validation: val.jsonl\neval:\n  task: auto\n  grader:\n    type: json_fields\n"
        '    input: "{{ sample.output_text }}"\n    reference: "{{ item.reference }}"\n    fieldz: [label]\n'
    )
    with pytest.raises(TuneforgeError) as error:
        check_eval_inputs(load_config(path))
    assert error.value.message.startswith(
        f'eval.grader ({path} line 6): grader "json_fields" (json_fields): unknown field(s) fieldz '
        "(did you mean 'fields'?);"
    ), error.value.message


@pytest.mark.parametrize(
    ("name", "text"), [("test.jsonl", ""), ("test.jsonl", "\n\n"), ("test.json", "[]"), ("test.csv", "")]
)
def test_an_empty_eval_file_is_told_to_hold_rows_not_training_rows(tiny_model_dir, tmp_path, name, text):
    """The readers serve eval as they serve training: an empty file is told to hold rows, not training rows."""
    data = tmp_path / name
    data.write_text(text)
    with pytest.raises(TuneforgeError) as err:
        evaluate(str(tiny_model_dir), data)
    assert "empty" in str(err.value) and "training" not in str(err.value)
