"""`tuneforge validate`: the dry run finds config and data mistakes before any training, in seconds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import yaml
from conftest import tiny_run_config
from tiny import without_chat_template

from tuneforge.dry_run import validate


def write_config(path, cfg: dict):
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge", "validate", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_version_is_the_installed_packages():
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "tuneforge", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == f"tuneforge {version('tuneforge')}\n"


def test_eval_every_without_validation_examples_is_a_warning(tiny_model_dir, triage_data, tmp_path, capsys):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", eval_every=10)
    cfg["data"]["validation"] = 0
    assert validate(cfg) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: train.eval_every: 10, but there are no validation examples" in out


def test_eval_every_and_save_every_past_the_last_step_are_warnings_at_their_lines(
    tiny_model_dir, triage_data, tmp_path, capsys
):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2, eval_every=10, save_every=20)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    text = path.read_text().splitlines()
    line = {
        key: next(i for i, said in enumerate(text, 1) if f" {key}:" in said) for key in ("eval_every", "save_every")
    }
    assert validate(path) == 0
    out = " ".join(capsys.readouterr().out.split())  # the console wraps the path where it likes: not compared
    assert "warning: train.eval_every (" in out and "warning: train.save_every (" in out
    assert f"line {line['eval_every']}): 10 steps, but the run takes 2, so it evaluates only at its end" in out
    assert f"line {line['save_every']}): 20 steps, but the run takes 2, so it saves a checkpoint only at its end" in out


@pytest.mark.parametrize("method", ["full", "distill"])
def test_a_lora_section_where_every_weight_trains_is_a_warning_at_its_lines(
    method, tiny_model_dir, triage_data, tmp_path, capsys
):
    cfg = {**tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run"), "method": method}
    if method == "distill":
        cfg["distill"] = {"teacher": str(tiny_model_dir), "student": "full"}
    cfg["lora"] = {"r": 16, "loraplus_lr_ratio": 16}  # r at its default: not counted as set
    path = write_config(tmp_path / "cfg.yaml", cfg)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "loraplus_lr_ratio:" in text)
    assert validate(path) == 0
    out = " ".join(capsys.readouterr().out.split())
    trained = "method: full" if method == "full" else "distill.student: full"
    assert "warning: lora.loraplus_lr_ratio (" in out and "lora.r (" not in out
    assert f"line {line}): set, but {trained} trains every weight and adds no adapter" in out


@pytest.mark.parametrize(
    ("method", "rate", "warned"),
    [("lora", 5, "5, far above the rates adapter training uses (1e-5 to 1e-3"), ("lora", 1e-2, None)]
    + [("full", 2e-3, "0.002, far above the rates full fine-tuning uses (1e-6 to 1e-4"), ("full", 1e-3, None)],
)
def test_a_learning_rate_far_above_fine_tunings_is_a_warning_at_its_line(
    method, rate, warned, tiny_model_dir, triage_data, tmp_path, capsys
):
    """An Axolotl user's `learning_rate: 5` (or a full fine-tune at LoRA's rates) is let through, as tiny test
    models train at high rates, but said."""
    cfg = {**tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", learning_rate=rate), "method": method}
    if method == "full":
        del cfg["lora"]
    path = write_config(tmp_path / "cfg.yaml", cfg)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "learning_rate:" in text)
    assert validate(path) == 0
    out = " ".join(capsys.readouterr().out.split())
    if warned:
        assert "warning: train.learning_rate (" in out and f"line {line}): {warned}" in out
    else:
        assert "learning_rate (" not in out


@pytest.mark.parametrize("from_layer", [0.0, 0.5])
@pytest.mark.parametrize(
    ("architecture", "left"),
    [("Qwen2MoeConfig", "mlp.experts.down_proj, mlp.experts.gate_up_proj, mlp.gate"), ("MixtralConfig", None)],
)
def test_all_linear_that_leaves_a_mixture_of_experts_models_routed_experts_is_a_warning_naming_them(
    architecture, left, from_layer, triage_data, tmp_path, capsys
):
    """PEFT adapts Mixtral's fused experts and router under all-linear, and Qwen2-MoE's not (its linear layers
    alone: attention, the shared expert and its gate); from_layer adapts what all-linear does in the layers it
    keeps, and the layers below it are no experts left out."""
    from tiny import save_tiny_model, tiny_moe

    model = save_tiny_model(tmp_path / "model", build=tiny_moe, architecture=architecture, experts=4)
    cfg = tiny_run_config(model, triage_data, tmp_path / "run")
    cfg["lora"] |= {"dropout": 0.0, "from_layer": from_layer}  # PEFT's adapters on fused experts take no dropout
    assert validate(write_config(tmp_path / "cfg.yaml", cfg)) == 0
    out = " ".join(capsys.readouterr().out.split())
    if left:
        linears = "down_proj, gate_proj, k_proj, o_proj, q_proj, shared_expert_gate, up_proj, v_proj"  # Qwen2-MoE's
        assert "warning: lora.target_modules (" in out  # at the lora section's line; the console wraps the path
        assert (
            "): all-linear adapts the linear layers of this mixture-of-experts model "
            f"({linears}), but not {left}, which keep the base's weights: PEFT adapts fused expert weights under "
            "all-linear itself, and only for the models it maps from transformers 4 (Mixtral, Qwen3-MoE); to train "
            "the experts, use method: full." in out
        )
    else:
        assert "warning: lora.target_modules" not in out and "mixture-of-experts" not in out


@pytest.mark.parametrize(
    ("architecture", "warned"), [("Qwen2MoeConfig", True), ("MixtralConfig", False), ("Qwen3MoeConfig", False)]
)
def test_a_target_modules_list_naming_routed_experts_peft_leaves_is_a_warning_naming_them(
    architecture, warned, triage_data, tmp_path, capsys
):
    """Qwen2-MoE's down_proj is the shared expert's linear layer and the routed experts' fused weight: PEFT adapts
    the first alone. On Mixtral and Qwen3-MoE the list adapts the fused weight as all-linear does."""
    from tiny import save_tiny_model, tiny_moe

    model = save_tiny_model(tmp_path / "model", build=tiny_moe, architecture=architecture, experts=4)
    cfg = tiny_run_config(model, triage_data, tmp_path / "run")
    cfg["lora"] |= {"dropout": 0.0, "target_modules": ["q_proj", "down_proj"]}
    assert validate(write_config(tmp_path / "cfg.yaml", cfg)) == 0
    out = " ".join(capsys.readouterr().out.split())
    said = (
        "): names down_proj, which PEFT adapts in this mixture-of-experts model's linear layers of that name "
        "(mlp.shared_expert.down_proj) but not in its routed experts (mlp.experts.down_proj), which keep the base's "
        "weights: PEFT adapts fused expert weights only for the models it maps from transformers 4 (Mixtral, "
        "Qwen3-MoE); to train the experts, use method: full."
    )
    assert (said in out) == warned and ("mixture-of-experts" in out) == warned


def test_a_batch_size_beyond_the_datas_rows_is_a_warning_at_its_line(tiny_model_dir, triage_data, tmp_path, capsys):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", batch_size=512)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("  batch_size:"))
    assert validate(path) == 0
    out = " ".join(capsys.readouterr().out.split())
    rows = int(re.search(r"│ rows │ ([\d,]+) \(packed", out)[1].replace(",", ""))
    # Packed rows are counted with the examples they hold: 96 examples making a few rows is no loss of data.
    packed = f"the 96 training examples pack into {rows} rows of up to 512 tokens (data.packing)"
    assert (
        f"line {line}): 512 rows a step, but {packed}, so every step trains on all of the data; set "
        f"train.batch_size to {rows} or fewer, add data, or set data.packing to false for a row per example." in out
    )
    # The plan says what a step trains, not what train.batch_size asked for.
    table = " ".join(re.sub("[│┃┌┐└┘├┤─┬┴┼]", " ", out).split())
    assert f"batch {rows} rows per step = 1 x {rows} (train.batch_size is 512, but {packed})" in table
    assert validate(path, ["data.packing=false"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "512 rows a step, but the data makes 96 rows, so every step trains on all of the data; set " in out
    assert "train.batch_size to 96 or fewer, or add data." in out


def test_a_model_without_a_chat_template_is_a_warning_naming_chatml_and_where_its_own_goes(
    tiny_model_dir, triage_data, tmp_path, capsys
):
    model = without_chat_template(tiny_model_dir, tmp_path / "no-template")
    with warnings.catch_warnings(record=True) as escaped:  # the filters as they are: none shown by validate
        assert validate(tiny_run_config(model, triage_data, tmp_path / "run")) == 0
    out = capsys.readouterr().out
    # Said once, in the plan's warnings (the data report's), not again as the Python warning loading raised.
    assert int(re.search(r"│ warnings\s+│\s+(\d+) │", out)[1]) == out.count("warning:") == 1
    assert not [w for w in escaped if "no chat template" in str(w.message)]
    said = "".join(out.split())  # the path may be folded anywhere
    assert f"warning:{model}hasnochattemplate;usingChatML" in said
    assert (
        f"givethattemplateasmodel.chat_template(a.jinjafile,orthetemplatewrittenout)orputitin{model}/chat_template.jinja."
        in said
    )


def test_a_warning_loading_the_model_raises_is_counted_and_listed_with_the_plans(
    tiny_model_dir, triage_data, tmp_path, capsys
):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    cfg["model"] = {"add_tokens": ["<|im_end|>"]}  # a token the vocabulary holds: a Python warning as it loads
    with warnings.catch_warnings(record=True) as escaped:
        assert validate(cfg) == 0
    out = capsys.readouterr().out
    assert int(re.search(r"│ warnings\s+│\s+(\d+) │", out)[1]) == out.count("warning:") == 1
    said = " ".join(out.split()[out.split().index("warning:") :])
    assert said.startswith("warning: model.add_tokens: the vocabulary of") and "already holds <|im_end|>" in said
    assert not [w for w in escaped if "already holds" in str(w.message)]


def test_reading_the_data_shows_its_progress(tiny_model_dir, triage_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))  # an empty data cache: the rows are read
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    assert validate(cfg) == 0
    lines = sum(1 for _ in open(cfg["data"]["train"], encoding="utf-8"))
    err = capsys.readouterr().err  # not a terminal here: plain lines with the rate and the ETA
    assert f"lines {lines}/{lines} (100%)" in err and "/s" in err and "eta" in err


def test_a_good_config_prints_the_plan(tiny_model_dir, triage_data, tmp_path, capsys):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    assert validate(cfg) == 0
    out = capsys.readouterr().out
    assert "plan for" in out and "steps" in out and "time (estimate)" in out
    cells = re.sub(r"[│\s]+", " ", out)  # the plan's table wraps a long cell over lines
    assert "nothing (see eval.task, eval.forgetting, eval.benchmarks)" in cells
    # capsys has no colour: the example's trained reply is marked, its prompt is not.
    example = out[out.index("legend: ⟦trained⟧ / not trained") : out.index("plan for")].split("\n", 1)[1]
    assert example.count("⟦") == 1 and "<|im_start|>assistant\n⟦{" in example and "}<|im_end|>⟧" in example
    assert not (tmp_path / "run").exists()  # a dry run writes no run folder
    cfg["eval"] = {"task": "support_triage", "forgetting": True}
    assert validate(cfg) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "after training" in line)
    assert "support_triage on validation.jsonl" in row and "nothing (see eval" not in out
    cfg["eval"] = {
        "task": "exact",
        "grader": {"type": "string_check", "input": "a", "reference": "a", "operation": "eq"},
    }
    assert validate(cfg) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "after training" in line)
    assert "exact and the grader of eval.grader" in row


def test_a_misspelt_key_and_a_bad_row_each_fail_in_seconds_naming_what_to_fix(tiny_model_dir, triage_data, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    cfg["train"]["learnig_rate"] = cfg["train"].pop("learning_rate")
    started = time.perf_counter()
    misspelt = run_cli(write_config(tmp_path / "typo.yaml", cfg))
    assert misspelt.returncode == 2
    assert "learnig_rate" in misspelt.stderr and "learning_rate" in misspelt.stderr
    assert "Traceback" not in misspelt.stderr

    rows = triage_data["train"].read_text().splitlines()
    broken = json.loads(rows[2])
    broken["messages"][1]["role"] = "customer"
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text("\n".join(rows[:2] + [json.dumps(broken)] + rows[3:]) + "\n")
    cfg = tiny_run_config(tiny_model_dir, {**triage_data, "train": bad_file}, tmp_path / "run")
    bad_row = run_cli(write_config(tmp_path / "bad.yaml", cfg))
    assert bad_row.returncode == 2
    assert "unrecognized_role" in bad_row.stderr + bad_row.stdout and ":3" in bad_row.stderr + bad_row.stdout
    assert "Traceback" not in bad_row.stderr
    assert time.perf_counter() - started < 120  # two process starts included; no training happened
    assert not (tmp_path / "run").exists()


def test_a_dpo_config_is_planned_in_pairs(tiny_model_dir, triage_data, tmp_path, capsys):
    rows = [json.loads(line)["messages"] for line in triage_data["train"].read_text().splitlines()]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": m[:-1],
                    "chosen": [m[-1]],
                    "rejected": [{"role": "assistant", "content": "Sure! Let me look."}],
                }
            )
            + "\n"
            for m in rows
        )
    )
    cfg = tiny_run_config(tiny_model_dir, {"train": pairs, "validation": None}, tmp_path / "run")
    cfg.update(method="dpo", dpo={"beta": 0.1})
    cfg["data"]["validation"] = None
    assert validate(cfg) == 0
    assert f"{len(rows):,} train" in capsys.readouterr().out


def test_a_grpo_config_is_planned_in_prompts_and_their_sampled_answers(tiny_model_dir, triage_data, tmp_path, capsys):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", batch_size=4, max_steps=2)
    grader = {"type": "string_check", "name": "brace", "input": "{{ sample.output_text }}", "reference": "{"}
    cfg.update(method="grpo", grpo={"grader": {**grader, "operation": "like"}, "group_size": 4, "max_new_tokens": 8})
    assert validate(cfg) == 0
    said = " ".join(capsys.readouterr().out.split())
    n_train, n_valid = (len(triage_data[split].read_text().splitlines()) for split in ("train", "validation"))
    assert f"{n_train:,} train, {n_valid:,} validation" in said
    # Every prompt's 4 answers of up to 8 tokens train, not the prompts alone.
    assert f"(up to {n_train * 4 * 8:,} trained)" in said and "(0 trained)" not in said


def test_lora_modules_the_model_lacks_are_a_config_error(tiny_model_dir, triage_data, tmp_path):
    import pytest

    from tuneforge.errors import ConfigError

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    cfg["lora"]["target_modules"] = ["qproj"]
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    assert "lora.target_modules" in caught.value.message and "q_proj" in caught.value.message
    assert not (tmp_path / "run").exists()
    # One name of several that matches nothing would be skipped, the others adapted.
    cfg["lora"]["target_modules"] = ["q_proj", "qproj"]
    with pytest.raises(ConfigError, match=r"^lora\.target_modules: names qproj, which this model has no module"):
        validate(cfg)
    cfg["lora"].update(target_modules="all-linear", modules_to_save=["lm_head", "lm_haed"])
    with pytest.raises(ConfigError, match=r"modules_to_save: names lm_haed, which this model has no module"):
        validate(cfg)


def test_a_max_length_beyond_the_models_positions_is_a_config_error_at_its_line(tiny_model_dir, triage_data, tmp_path):
    import pytest

    from tuneforge.errors import ConfigError

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    cfg["data"]["max_length"] = 4096  # the tiny model has 2048 positions
    path = write_config(tmp_path / "long.yaml", cfg)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("  max_length:"))
    with pytest.raises(ConfigError) as caught:
        validate(path)
    assert caught.value.message.startswith(f"data.max_length ({path} line {line}): 4096 tokens is more than the 2048")
    assert "set data.max_length to 2048 or less" in caught.value.message
    assert validate(path, ["data.max_length=2048"]) == 0
    # GRPO's rows are a prompt shorter than data.max_length and an answer of up to grpo.max_new_tokens.
    grader = {"type": "string_check", "name": "brace", "input": "{{ sample.output_text }}", "reference": "{"}
    grpo = ["method=grpo", f"grpo={{grader: {json.dumps({**grader, 'operation': 'like'})}, max_new_tokens: 8}}"]
    with pytest.raises(
        ConfigError,
        match=r"^data\.max_length \(override\), grpo\.max_new_tokens \(override\): a prompt "
        r"of up to 2047 tokens and an answer of up to 8 make rows of 2055, more than the 2048",
    ):
        validate(path, ["data.max_length=2048", *grpo])
    assert validate(path, ["data.max_length=2041", *grpo]) == 0


def test_an_output_dir_a_file_is_in_the_way_of_is_a_config_error_at_its_line(tiny_model_dir, triage_data, tmp_path):
    import pytest

    from tuneforge.errors import ConfigError
    from tuneforge.pipeline import train

    (tmp_path / "notes").write_text("mine")
    for out in (tmp_path / "notes", tmp_path / "notes" / "run"):
        path = write_config(tmp_path / "cfg.yaml", tiny_run_config(tiny_model_dir, triage_data, out))
        line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("output_dir:"))
        for check in (validate, train):  # train, through the Config it loads again
            with pytest.raises(ConfigError) as caught:
                check(path)
            said = caught.value.message
            assert said.startswith(f"output_dir ({path} line {line}): {tmp_path / 'notes'} is a file, not a folder")
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_cli_usage_error_is_a_usage_message_and_exit_2_not_a_traceback(tmp_path):
    for args in (
        ["validate", "--no-such-option", "x.yaml"],
        ["validate"],
        ["export", "runs/x", "--format", "merged"],
        ["eval", "runs/x", "test.jsonl", "--limit", "0"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and "Usage" in result.stderr, (args, result.stderr)


def test_the_plan_of_a_one_row_run_counts_in_the_singular(tiny_model_dir, triage_data, tmp_path, capsys):
    row = json.loads(triage_data["train"].read_text().splitlines()[0])
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(row) + "\n")
    cfg = tiny_run_config(tiny_model_dir, {"train": one, "validation": triage_data["validation"]}, tmp_path / "run")
    assert validate(write_config(tmp_path / "cfg.yaml", cfg)) == 0
    out = " ".join(re.sub("[│┃┌┐└┘├┤─┬┴┼]", " ", capsys.readouterr().out).split())
    assert "batch 1 row per step = 1 x 1 (train.batch_size is 8, but the 1 training example packs into 1 row" in out
    assert "only 1 training example; fine-tuning needs at least" in out


def test_the_plan_of_a_run_cut_by_max_steps_gives_the_epochs_it_trains(tiny_model_dir, triage_data, tmp_path, capsys):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", batch_size=1, max_steps=3)
    assert validate(cfg, ["data.packing=false"]) == 0
    table = " ".join(re.sub("[│┃┌┐└┘├┤─┬┴┼]", " ", capsys.readouterr().out).split())
    per_epoch = int(re.search(r"steps 3 \((\d+) per epoch", table)[1])
    # 3 steps of an epoch's 96: the run's summary gives the epochs so trained, and so does the plan.
    assert f"epochs {round(3 / per_epoch, 2):g} (from train.max_steps)" in table


def test_a_run_folder_and_data_file_are_printed_as_named(tiny_model_dir, triage_data, tmp_path, capsys, monkeypatch):
    # rich would read `[/x]` in a user's path as a closing tag (an error) and `:x:` as an emoji's code.
    monkeypatch.setenv("COLUMNS", "1000")  # the paths whole on their lines, not folded
    (tmp_path / "[").mkdir()
    data = {**triage_data, "train": shutil.copy(triage_data["train"], tmp_path / "[" / "x]:x: [bold].jsonl")}
    cfg = tiny_run_config(tiny_model_dir, data, tmp_path / "runs" / "[/x]:x:")
    assert validate(cfg) == 0
    said = capsys.readouterr()
    out, err = " ".join(said.out.split()), " ".join(said.err.split())
    assert "plan for" in out and "runs/[/x]:x:" in out and "\u274c" not in out
    assert "x]:x: [bold].jsonl (chat, train)" in out
    assert "data: x]:x: [bold].jsonl lines" in err and "\u274c" not in err
