"""The strict config: misspelt keys, overrides, relative paths, epochs: auto."""

import functools
import re

import pytest
import yaml

from tuneforge.chat import read_tools
from tuneforge.config import KNOWN_ELSEWHERE, Config, _known_keys, auto_epochs, load_config
from tuneforge.errors import ConfigError
from tuneforge.eval.command import grader_spec
from tuneforge.graders import load_grader
from tuneforge.sweeps import parse_grid


def write(tmp_path, cfg: dict):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_unknown_key_suggests_the_nearest(tmp_path):
    path = write(tmp_path, {"data": {"train": "x.jsonl"}, "train": {"learnin_rate": 1e-4}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "train.learnin_rate (line 4): unknown key" in e.value.message
    assert "unknown key (did you mean 'train.learning_rate'?)." in e.value.message
    assert str(path) in e.value.message


def test_a_list_item_s_unknown_key_suggests_the_item_s_nearest(tmp_path):
    """An `eval.benchmarks` entry's misspelt key is named with the entry's own key, at the same index."""
    benchmarks = [{"file": "quiz.jsonl"}, {"file": "mmlu.csv", "num_fewshots": 5}]
    path = write(tmp_path, {"data": {"train": "x.jsonl"}, "eval": {"benchmarks": benchmarks}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "eval.benchmarks.1.num_fewshots (line 7): unknown key" in e.value.message
    assert "(did you mean 'eval.benchmarks.1.num_fewshot'?)" in e.value.message


def test_a_list_item_s_unknown_key_is_not_matched_by_its_section_s_name_alone(tmp_path):
    """`eval.benchmarks.0.limt` shares its long section name with `eval.benchmarks.0.file`, but `limt` is no
    misspelt `file`: no suggestion rather than a wrong one."""
    path = write(tmp_path, {"data": {"train": "x.jsonl"}, "eval": {"benchmarks": [{"file": "q.jsonl", "limt": 5}]}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "eval.benchmarks.0.limt (line 6): unknown key" in e.value.message
    assert "did you mean 'eval.benchmarks.0.file'" not in e.value.message


def test_top_level_typo_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'base_model'"):
        load_config(write(tmp_path, {"base_modle": "x", "data": {"train": "x.jsonl"}}))


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(write(tmp_path, {"data": {"train": "x"}, "train": {"batch_size": 0}}))
    with pytest.raises(ConfigError, match=r"method"):
        load_config(write(tmp_path, {"data": {"train": "x"}, "method": "qlora"}))
    with pytest.raises(ConfigError, match="multiple of train.grad_accum"):
        load_config(write(tmp_path, {"data": {"train": "x"}, "train": {"batch_size": 6, "grad_accum": 4}}))
    with pytest.raises(ConfigError, match=r"data\.train \(line 1\): required"):
        load_config(write(tmp_path, {"data": {}}))


def test_the_preference_format_is_for_dpo_alone(tmp_path):
    for method in ("lora", "grpo"):
        extra = {"grpo": {"grader": {"type": "string_check"}}} if method == "grpo" else {}
        with pytest.raises(ConfigError, match=f"data.format: preference .* which method: {method} cannot train on"):
            load_config({"method": method, "data": {"train": "x", "format": "preference", "packing": False}, **extra})
    assert load_config({"method": "dpo", "data": {"train": "x", "format": "preference"}}).data.format == "preference"


def test_eval_section_is_checked_before_training(tmp_path):
    from tuneforge.eval.after_training import check_eval_inputs

    unknown = load_config(
        write(tmp_path, {"data": {"train": "x", "validation": "v.jsonl"}, "eval": {"task": "accuracy"}})
    )
    placed = r"eval\.task \(\S*cfg\.yaml line 5\)"  # the file and line the key was set at
    with pytest.raises(ConfigError, match=placed + r": unknown metric 'accuracy'.*support_triage"):
        check_eval_inputs(unknown)
    with pytest.raises(ConfigError, match="give data.validation as a file path"):
        load_config(write(tmp_path, {"data": {"train": "x", "validation": 0.1}, "eval": {"task": "exact"}}))
    assert load_config(
        write(tmp_path, {"data": {"train": "x", "validation": "v.jsonl"}, "eval": {"task": "auto", "forgetting": True}})
    ).eval.forgetting


def test_not_yaml_names_the_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml line \d+, column \d+: not valid YAML"):
        load_config(path)


def test_each_error_names_the_line_or_override_that_set_its_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: x\ntrain:\n  max_steps: 2\n  batch_size: two\n  lr: 1.0e-4\nmethod: qlora\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.max_steps=0"])
    assert e.value.message.splitlines() == [
        f"{path}: invalid config",
        "  method (line 7): Input should be 'full', 'lora', 'dora', 'distill', 'dpo', 'grpo' or 'reward' (got 'qlora')",
        "  train.max_steps (override): must be at least 1 (got 0); give a number in range, or leave the key out "
        "for its default.",
        "  train.batch_size (line 5): Input should be a valid integer, unable to parse string as an integer "
        "(got 'two')",
        "  train.lr (line 6): unknown key. tuneforge calls it train.learning_rate.",
    ]
    # A section the override replaces whole leaves none of the file's lines under it.
    with pytest.raises(ConfigError, match=r"train\.batch_size \(override\): Input should be a valid integer"):
        load_config(path, ["train={batch_size: two}", "method=lora"])


def test_a_training_file_listed_twice_is_refused_while_dedup_would_drop_its_second_listing(tmp_path, monkeypatch):
    # Listed twice to be seen twice as often, a file's second listing would be dropped whole as duplicates.
    (tmp_path / "chat.jsonl").write_text("{}\n")
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: [chat.jsonl, other.jsonl, ./chat.jsonl]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.splitlines()[1].startswith(
        f"  data.train (line 2): data.train lists {tmp_path}/chat.jsonl more than once; "
        "with data.dedup: exact every row of a later listing is a duplicate of the first and is left out"
    )
    assert load_config(path, ["data.dedup=none"]).data.train_files.count(str(tmp_path / "chat.jsonl")) == 2


def test_an_integer_in_exponent_form_is_read_as_its_number(tmp_path):
    # YAML 1.1 leaves 1e3 a string; the float keys read it already (learning_rate: 1e-4).
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: x\ntrain:\n  seed: 1e3\n  max_steps: 2E+1\n  learning_rate: 1e-4\n")
    config = load_config(path)
    assert (config.train.seed, config.train.max_steps, config.train.learning_rate) == (1000, 20, 1e-4)
    with pytest.raises(
        ConfigError,
        match=r"train\.batch_size \(override\): Input should be a valid integer, got a number with a fractional part",
    ):
        load_config(path, ["train.batch_size=15e-1"])


def test_true_or_false_is_no_number(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: x\n  packing: on\nlora:\n  r: yes\ntrain:\n  batch_size: true\n  epochs: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    for key, line in (("lora.r", 5), ("train.batch_size", 7), ("train.epochs", 8)):
        assert f"{key} (line {line}): true or false is no number" in e.value.message
    assert "packing" not in e.value.message


def test_off_unquoted_is_read_as_the_word_where_a_choice_offers_it(tmp_path):
    # YAML 1.1 reads `off` as false: `data.pii: off`, in the file or as an override, is the documented choice.
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: x\n  pii: off\n")
    assert load_config(path).data.pii == "off"
    assert load_config(path, ["data.pii=redact"]).data.pii == "redact"
    path.write_text("data:\n  train: x\n")
    assert load_config(path, ["data.pii=off"]).data.pii == "off"
    with pytest.raises(ConfigError, match=r"data\.dedup \(override\): Input should be"):
        load_config(path, ["data.dedup=off"])


def test_an_empty_path_is_refused_not_taken_for_a_folder(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text('base_model: ""\ndata:\n  train: x\n  validation: ""\noutput_dir: ""\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    for key, line in (("base_model", 1), ("data.validation", 4), ("output_dir", 5)):
        assert f"{key} (line {line}): String should have at least 1 character" in e.value.message


def test_a_key_of_several_types_is_named_without_them_on_one_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: 5\n  validation: []\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.splitlines()[1:] == [
        "  data.train (line 2): Input should be a valid string or Input should be a valid list (got 5)",
        "  data.validation (line 3): Input should be a valid string or Input should be a valid number (got [])",
    ]


def test_a_mistake_in_how_keys_go_together_names_each_key_and_its_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: x\ntrain:\n  batch_size: 4\n  grad_accum: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.splitlines()[1].startswith(
        "  train.batch_size (line 4), train.grad_accum (line 5): train.batch_size (4) must be a multiple"
    )
    # Found by a section's own check, its keys are named under the section; one from an override says so.
    path.write_text("data:\n  train: x\nmethod: distill\ndistill:\n  teacher: t\n  divergence: jsd\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["distill.teacher_top_k=4"])
    assert "  distill.teacher_top_k (override), distill.divergence (line 6): distill.teacher_top_k keeps" in (
        e.value.message
    )


def test_a_key_given_twice_names_both_lines(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: x\ntrain:\n  max_steps: 2\n  batch_size: 2\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml line 6: train is given twice \(also on line 3\)"):
        load_config(path)
    path.write_text("data:\n  train: x\n  packing: false\n  packing: true\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml line 4: data\.packing is given twice \(also on line 3\)"):
        load_config(path)


def test_a_merge_key_brings_in_keys_that_the_mapping_s_own_keys_override(tmp_path):
    # YAML's merge key: the second file takes the first's weight and sets its own path.
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "data:\n  train:\n    - &item\n      path: a.jsonl\n      weight: 2\n    - <<: *item\n      path: b.jsonl\n"
        "train:\n  max_steps: 2\n  learning_rate: 0\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    # Each key is placed where it is written: the merged weight on the line of the anchored item's.
    assert "train.learning_rate (line 10)" in e.value.message
    path.write_text(path.read_text().replace("  learning_rate: 0\n", ""))
    config = load_config(path)
    assert [(f.path, f.weight) for f in config.data.train] == [
        (str(tmp_path / "a.jsonl"), 2.0),
        (str(tmp_path / "b.jsonl"), 2.0),
    ]
    assert config._places["data.train.1.path"] == "line 7"
    assert config._places["data.train.1.weight"] == "line 5"


def test_a_config_from_python_takes_paths_and_refuses_what_is_no_config(tmp_path):
    assert load_config({"data": {"train": tmp_path / "train.jsonl"}}).data.train == str(tmp_path / "train.jsonl")
    with pytest.raises(ConfigError, match="a YAML file's path, a shipped recipe's name, a dict or a Config, not int"):
        load_config(5)
    with pytest.raises(ConfigError, match="give strings, numbers, lists and dicts"):
        load_config({"data": {"train": object()}})


def test_dotted_overrides_parse_as_yaml_scalars(tmp_path):
    cfg = load_config(
        write(tmp_path, {"data": {"train": "x"}}),
        ["train.learning_rate=1e-4", "data.packing=false", "lora.target_modules=[q_proj,v_proj]"],
    )
    assert cfg.train.learning_rate == 1e-4 and cfg.data.packing is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config(write(tmp_path, {"data": {"train": "x"}}), ["train.lr=1"])
    # Not its own section, nor train.warmup for their prefix: the name Hugging Face gives it is known.
    assert "did you mean" not in e.value.message and "tuneforge calls it train.learning_rate" in e.value.message
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config(write(tmp_path, {"data": {"train": "x"}}), ["train.gradient_accumulation_steps=2"])
    assert "gradient_checkpointing" not in e.value.message and "tuneforge calls it train.grad_accum" in e.value.message
    with pytest.raises(
        ConfigError, match=r"train\.save_steps \(override\): unknown key\. tuneforge calls it train\.save_every\."
    ):
        load_config(write(tmp_path, {"data": {"train": "x"}}), ["train.save_steps=50"])
    with pytest.raises(ConfigError, match=r"  trian \(override\): unknown key \(did you mean 'train'\?\)\."):
        load_config(write(tmp_path, {"data": {"train": "x"}}), ["trian.max_steps=1"])
    with pytest.raises(ConfigError, match=r"override data\.train\.1\.weight: data\.train is a list, whose items an "):
        load_config(write(tmp_path, {"data": {"train": ["x", "y"]}}), ["data.train.1.weight=2"])
    with pytest.raises(ConfigError, match=r"override base_model\.x: base_model is no section; give it whole, as "):
        load_config(write(tmp_path, {"base_model": "m", "data": {"train": "x"}}), ["base_model.x=2"])
    known = _known_keys(Config)
    assert all(target.split()[0].rstrip(":") in known for target in KNOWN_ELSEWHERE.values())
    # A syntax error is named by its column in the value, not by PyYAML's "<unicode string>" excerpt.
    with pytest.raises(
        ConfigError,
        match=r"override 'lora\.target_modules=\[q_proj': the value of lora\.target_modules is not valid YAML "
        r"\(expected ',' or '\]', but got '<stream end>' at column 8\); close the brackets and quotes",
    ):
        load_config(write(tmp_path, {"data": {"train": "x"}}), ["lora.target_modules=[q_proj"])
    with pytest.raises(ConfigError, match=r"\(mapping values are not allowed here at column 5\); .*quote it whole"):
        load_config(write(tmp_path, {"data": {"train": "x"}}), ["train.seed=a: b: c"])
    for override, key in (("=4", ""), ("train..seed=3", "train..seed")):
        with pytest.raises(ConfigError, match=f"override '{re.escape(override)}': '{re.escape(key)}' is no key"):
            load_config(write(tmp_path, {"data": {"train": "x"}}), [override])


def test_an_override_given_twice_is_refused_not_taken_at_its_last_value(tmp_path):
    path = write(tmp_path, {"data": {"train": "x"}})
    with pytest.raises(
        ConfigError, match=r"override 'data\.packing=yes': data\.packing is already given \('data\.packing=no'\)"
    ):
        load_config(path, iter(["data.packing=no", "train.seed=3", "data.packing=yes"]))
    with pytest.raises(
        ConfigError,
        match=r"override 'train=\{seed: 3\}': it replaces the section train whole, "
        r"and with it the earlier 'train\.max_steps=5'",
    ):
        load_config(path, ["train.max_steps=5", "train={seed: 3}"])
    # A section first and a key of it after: the key's value goes into the section.
    config = load_config(path, ["train={seed: 3}", "train.max_steps=5"])
    assert (config.train.seed, config.train.max_steps) == (3, 5)


def test_axolotl_and_llama_factory_keys_are_named_in_tuneforge_terms(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "model_name_or_path: m\nadapter: qlora\nfinetuning_type: lora\nlora_rank: 8\nlora_target: all\n"
        "datasets: [x]\nval_set_size: 0.1\ncutoff_len: 512\nquantization_bit: 4\ntrain_on_inputs: false\n"
        "data:\n  train: x\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    errors = e.value.message.splitlines()[1:]
    assert len(errors) == 10 and all("unknown key. tuneforge calls it" in line for line in errors)
    assert "  adapter (line 2): unknown key. tuneforge calls it method: lora (QLoRA is method: lora with " in (
        e.value.message
    )


def test_a_model_path_under_model_is_told_to_go_under_base_model(tmp_path):
    # `model:` holds how the base's weights are held; a path there is the model to tune, which is base_model.
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: x\nmodel: ./my-model\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "model (line 3): model holds how the base's weights are held" in e.value.message
    assert "the model to fine-tune is base_model: ./my-model" in e.value.message


def test_a_per_device_batch_size_is_named_with_what_train_batch_size_counts(tmp_path):
    # Hugging Face's and Axolotl's batch sizes are one device's micro-batch; train.batch_size is the whole step.
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "data:\n  train: x\nper_device_train_batch_size: 4\nmicro_batch_size: 4\ngradient_accumulation_steps: 2\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = e.value.message.splitlines()
    for line, key in ((3, "per_device_train_batch_size"), (4, "micro_batch_size")):
        assert (
            f"  {key} (line {line}): unknown key. tuneforge calls it train.batch_size (every row of an optimizer step: "
            f"{key} x gradient_accumulation_steps x processes)." in lines
        )
    assert (
        "  gradient_accumulation_steps (line 5): unknown key. tuneforge calls it train.grad_accum (train.batch_size "
        "counts the rows of all the micro-batches of a step, so multiply the per-device batch size by it there)."
        in lines
    )


def test_a_hugging_face_schedule_name_is_refused_naming_the_nearest_of_ours(tmp_path):
    path = write(tmp_path, {"data": {"train": "x"}, "train": {"scheduler": "constant_with_warmup"}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.splitlines()[1] == (
        "  train.scheduler (line 4): Hugging Face's constant_with_warmup schedule is not offered; the nearest here "
        "is constant (which warms up over train.warmup, then holds the learning rate). Give cosine, linear or "
        "constant: each warms up over train.warmup first (got 'constant_with_warmup')"
    )
    with pytest.raises(ConfigError, match=r"cosine_with_min_lr schedule is not offered; the nearest here is cosine \("):
        load_config(path, ["train.scheduler=cosine_with_min_lr"])
    assert load_config(path, ["train.scheduler=constant"]).train.scheduler == "constant"


def test_a_fraction_of_epochs_is_refused_saying_to_count_steps(tmp_path):
    path = write(tmp_path, {"data": {"train": "x"}, "train": {"epochs": 1.5}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.splitlines()[1] == (
        "  train.epochs (line 4): epochs counts whole passes over the data; for 1.5 of them, set train.max_steps to "
        "that many epochs' steps (`tuneforge validate` shows the steps an epoch takes) (got 1.5)"
    )
    assert load_config(path, ["train.epochs=2.0"]).train.epochs == 2


def test_max_grad_norm_0_is_refused_saying_null_turns_clipping_off(tmp_path):
    path = write(tmp_path, {"data": {"train": "x"}, "train": {"max_grad_norm": 0}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.splitlines()[1] == (
        "  train.max_grad_norm (line 4): 0 would clip every gradient to nothing; give null (~) to train without "
        "clipping (got 0)"
    )
    assert load_config(path, ["train.max_grad_norm=~"]).train.max_grad_norm is None


def test_the_python_api_takes_one_override_as_a_string_or_none(tmp_path):
    import tuneforge

    path = write(tmp_path, {"data": {"train": "x"}})
    assert load_config(path, "train.max_steps=3").train.max_steps == 3
    assert load_config(path, None).train.max_steps is None
    with pytest.raises(
        ConfigError, match=r"train\.max_stepz \(override\): unknown key \(did you mean 'train\.max_steps'\?\)"
    ):
        tuneforge.train(path, "train.max_stepz=3")
    with pytest.raises(ConfigError, match=r"data: required"):
        tuneforge.train({"base_model": "x"}, None)
    with pytest.raises(ConfigError, match=r"^override 3 is int: give each override as a KEY=VALUE string"):
        load_config(path, ["train.max_steps=3", 3])


def test_the_python_api_shows_its_keyword_arguments_in_help():
    import inspect

    import tuneforge

    parameters = inspect.signature(tuneforge.train).parameters
    for name in ("resume", "force", "overwrite", "progress"):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert f"`{name}" in tuneforge.train.__doc__, name
    assert "train" in dir(tuneforge)


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    cfg = load_config(write(tmp_path, {"data": {"train": "d.jsonl"}}))
    assert cfg.data.train == str((tmp_path / "d.jsonl").resolve())


def test_relative_paths_of_overrides_resolve_against_the_working_directory(tmp_path, monkeypatch):
    config_folder, cwd = tmp_path / "config folder", tmp_path / "working é"
    for folder in (config_folder, cwd / "sub"):
        folder.mkdir(parents=True)
        (folder / "d.jsonl").write_text("{}\n")
    (cwd / "d.jsonl").write_text("{}\n")
    path = config_folder / "cfg.yaml"
    path.write_text("data: {train: d.jsonl}\n")
    monkeypatch.chdir(cwd)
    cfg = load_config(path, ["data.validation=sub/d.jsonl"])
    assert cfg.data.train == str((config_folder / "d.jsonl").resolve())
    # Absolute, so the run's config.yaml runs from any folder.
    assert cfg.data.validation == str((cwd / "sub" / "d.jsonl").resolve())
    assert load_config(path, ["data.train=d.jsonl"]).data.train == str((cwd / "d.jsonl").resolve())
    assert load_config({"data": {"train": "d.jsonl"}}).data.train == str((cwd / "d.jsonl").resolve())


def test_a_path_under_the_home_folder_may_be_written_with_a_tilde(tmp_path, monkeypatch):
    home = tmp_path / "home é"
    (home / "data").mkdir(parents=True)
    (home / "data" / "d.jsonl").write_text("{}\n")
    monkeypatch.setenv("HOME", str(home))
    path = tmp_path / "cfg.yaml"
    path.write_text("data: {train: ~/data/d.jsonl}\noutput_dir: ~/runs/x\n")
    cfg = load_config(path, ["data.validation=~/data/d.jsonl"])
    assert cfg.data.train == cfg.data.validation == str(home / "data" / "d.jsonl")
    assert cfg.output_dir == str(home / "runs" / "x")  # not a folder named ~ in the working directory


def test_environment_variables_in_paths_are_expanded_and_an_unset_one_is_refused(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text("{}\n")
    monkeypatch.setenv("TF_DATA", str(tmp_path))
    monkeypatch.delenv("TF_UNSET", raising=False)
    path = tmp_path / "config folder" / "cfg.yaml"
    path.parent.mkdir()
    path.write_text("data:\n  train: $TF_DATA/d.jsonl\n  validation: ${TF_DATA}/d.jsonl\noutput_dir: $TF_DATA/runs/x\n")
    cfg = load_config(path)
    assert cfg.data.train == cfg.data.validation == str(tmp_path / "d.jsonl")
    assert cfg.output_dir == str(tmp_path / "runs" / "x")
    path.write_text("data:\n  train: d.jsonl\n  validation: $TF_UNSET/v.jsonl\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: data\.validation \(line 3\): \$TF_UNSET/v\.jsonl names the "):
        load_config(path)
    with pytest.raises(
        ConfigError, match=r"data\.train \(override\): \$\{TF_UNSET\}/d\.jsonl names the environment variable TF_UNSET"
    ):
        load_config(path, ["data.validation=null", "data.train=${TF_UNSET}/d.jsonl"])


def test_a_file_whose_name_holds_a_dollar_sign_is_read_as_named(tmp_path, monkeypatch):
    """A `$` in a real file's name is no variable: the file, found as written, is read, from the config's
    folder or from the working directory, as it was before variables were expanded."""
    monkeypatch.delenv("list", raising=False)
    folder = tmp_path / "data$list"
    folder.mkdir()
    (folder / "d.jsonl").write_text("{}\n")
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: data$list/d.jsonl\n  validation: null\n")
    assert load_config(path).data.train == str(folder / "d.jsonl")
    monkeypatch.chdir(tmp_path)
    assert load_config({"data": {"train": "data$list/d.jsonl", "validation": None}}).data.train == str(
        folder / "d.jsonl"
    )


def test_the_written_config_holds_non_ascii_paths_as_they_read(tmp_path):
    folder = tmp_path / "données 中文"
    written = load_config({"data": {"train": str(folder / "train.jsonl")}, "output_dir": "runs/é"}).to_yaml()
    assert f"train: {folder / 'train.jsonl'}" in written and "output_dir: runs/é" in written
    assert load_config(yaml.safe_load(written)).data.train == str(folder / "train.jsonl")


def test_results_hash_ignores_logging_cadence_only():
    a = Config.model_validate({"data": {"train": "x"}})
    b = Config.model_validate({"data": {"train": "x"}, "train": {"eval_every": 7, "save_every": 3}})
    c = Config.model_validate({"data": {"train": "x"}, "train": {"learning_rate": 1e-3}})
    assert a.results_hash() == b.results_hash() != c.results_hash()
    noisy = Config.model_validate({"data": {"train": "x"}, "train": {"neftune_alpha": 5}})
    assert noisy.results_hash() != a.results_hash()


def test_adam_betas_and_epsilon_reach_every_optimizer_and_a_resume_check():
    import torch

    from tuneforge.training.loop import make_optimizer

    default = Config.model_validate({"data": {"train": "x"}})
    # At their defaults (torch's and bitsandbytes' own) the hash is the one runs from before these keys saved.
    assert "adam_beta2" not in default.results_settings()["train"]
    params = {"w": torch.nn.Parameter(torch.zeros(64, 64)), "b": torch.nn.Parameter(torch.zeros(64))}
    for optimizer in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
        tuned = Config.model_validate(
            {"data": {"train": "x"}, "train": {"optimizer": optimizer, "adam_beta2": 0.95, "adam_epsilon": 1e-6}}
        )
        groups = make_optimizer(params, tuned, torch.device("cpu")).param_groups
        assert [(g["betas"], g["eps"]) for g in groups] == [((0.9, 0.95), 1e-6)] * 2, optimizer
        plain = Config.model_validate({"data": {"train": "x"}, "train": {"optimizer": optimizer}})
        at_defaults = make_optimizer(params, plain, torch.device("cpu")).param_groups
        assert [(g["betas"], g["eps"]) for g in at_defaults] == [((0.9, 0.999), 1e-8)] * 2, optimizer
    assert default.changed_results_settings(tuned) == [
        "train.adam_beta2: 0.999 -> 0.95",
        "train.adam_epsilon: 1e-08 -> 1e-06",
        "train.optimizer: adamw -> paged_adamw_8bit",
    ]
    with pytest.raises(ConfigError, match=r"train\.adam_beta2.*less than 1"):
        load_config({"data": {"train": "x"}, "train": {"adam_beta2": 1}})


def test_a_number_out_of_bounds_is_told_its_bounds_what_the_key_is_and_its_default(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: x\nlora:\n  r: 0\ntrain:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.learning_rate=-1"])
    assert e.value.message.splitlines()[1:] == [
        "  lora.r (line 4): must be at least 1 and at most 1024 (got 0); give a number in range, or leave the key "
        "out for its default (16).",
        "  train.batch_size (line 6): must be at least 1 (got 0): rows (sequences or packed rows) per optimizer "
        "step, all ranks together; give a number in range, or leave the key out for its default (8).",
        "  train.learning_rate (override): must be more than 0 (got -1); give a number in range, or leave the key "
        "out for its default (0.0002).",
    ]


def test_a_number_out_of_bounds_in_an_optional_section_is_told_its_bounds_and_what_the_key_is():
    with pytest.raises(ConfigError) as e:
        load_config({"data": {"train": "x"}}, ["model.rope_scaling={rope_type: yarn, factor: 1, beta_fast: 0}"])
    assert e.value.message.splitlines()[1:] == [
        "  model.rope_scaling.factor (override): must be more than 1 (got 1): the new window is the base's times "
        "this; give a number in range.",
        "  model.rope_scaling.beta_fast (override): must be more than 0 (got 0): yarn: where extrapolation ends "
        "(32); give a number in range, or leave the key out for its default.",
    ]


def test_epochs_out_of_range_are_told_their_bounds_as_every_number_is():
    with pytest.raises(ConfigError) as e:
        load_config({"data": {"train": "x"}}, ["train.epochs=0"])
    assert e.value.message.splitlines()[1:] == [
        "  train.epochs (override): must be 'auto' or an integer of at least 1 and at most 100 (got 0)"
    ]


def test_neftune_is_refused_where_a_teacher_or_reference_reads_the_same_inputs(tmp_path):
    for method, extra in (("dpo", {}), ("distill", {"distill": {"teacher": "t"}})):
        with pytest.raises(ConfigError, match=f"method: {method} does not take train.neftune_alpha"):
            load_config(
                write(tmp_path, {"data": {"train": "x"}, "method": method, **extra, "train": {"neftune_alpha": 5}})
            )


@pytest.mark.parametrize("n, epochs", [(10, 10), (20, 5), (100, 3), (5000, 3), (10000, 2), (30000, 1), (1, 25)])
def test_auto_epochs_follows_the_openai_heuristic(n, epochs):
    assert auto_epochs(n) == epochs


def test_a_teacher_or_grader_under_another_method_is_refused_not_ignored(tmp_path):
    for section, value in (("distill", {"teacher": "t"}), ("grpo", {"grader": {"type": "string_check"}})):
        for method in ("lora", "full", "dpo"):
            with pytest.raises(ConfigError, match=f"{section}.* is set, but method: {method} does not use"):
                load_config(write(tmp_path, {"data": {"train": "x"}, "method": method, section: value}))
        with pytest.raises(ConfigError, match="method: lora does not use"):  # `method:` forgotten: lora
            load_config(write(tmp_path, {"data": {"train": "x"}, section: value}))
    # A run's config.yaml carries every section with its defaults: those stay accepted.
    written = Config(data={"train": "x"}).model_dump()
    assert load_config(write(tmp_path, written)).method == "lora"


def test_jsd_beta_without_jsd_is_refused_not_ignored(tmp_path):
    for divergence in ("forward_kl", "reverse_kl"):
        distill = {"teacher": "t", "divergence": divergence, "jsd_beta": 0.3}
        with pytest.raises(ConfigError, match=f"jsd_beta weighs the mixture of divergence: jsd, which {divergence}"):
            load_config(write(tmp_path, {"data": {"train": "x"}, "method": "distill", "distill": distill}))
    for distill in ({"divergence": "jsd", "jsd_beta": 0.3}, {"divergence": "forward_kl", "jsd_beta": 0.5}):
        raw = {"data": {"train": "x"}, "method": "distill", "distill": {"teacher": "t", **distill}}
        assert load_config(write(tmp_path, raw)).distill.jsd_beta == distill["jsd_beta"]


def test_the_readme_config_block_shows_every_key_with_its_default():
    """README's config block says each key it shows has its default there, and which methods exist."""
    import typing
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"A config \(every key, with its default.*?```yaml\n(.*?)```", readme, re.S)[1]
    shown = yaml.safe_load(block)
    defaults = Config(data={"train": "x"}).model_dump()
    shown["data"].pop("train")  # the one key without a default: an example path

    def compare(shown: dict, defaults: dict, prefix: str = ""):
        for key, value in shown.items():
            if isinstance(value, dict):
                compare(value, defaults[key], f"{prefix}{key}.")
            else:
                assert value == defaults[key], f"README shows {prefix}{key}: {value}, the default is {defaults[key]}"

    compare(shown, defaults)
    for section, keys in defaults.items():  # distill, dpo, grpo and reward have blocks of their own
        if isinstance(keys, dict) and section not in ("distill", "dpo", "grpo", "reward"):
            missing = set(keys) - set(shown[section]) - ({"train"} if section == "data" else set())
            assert not missing, f"README's config block leaves out {section}: {sorted(missing)}"
    method_line = next(line for line in block.splitlines() if line.startswith("method:"))
    for method in typing.get_args(Config.model_fields["method"].annotation):
        assert method in method_line.split("#", 1)[1], f"README's method comment leaves out {method}"


def test_infinite_and_nan_numbers_are_refused(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "data:\n  train: x\ntrain:\n  learning_rate: .inf\n  weight_decay: .nan\n  distributed_timeout: .inf\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    for line, key in enumerate(("train.learning_rate", "train.weight_decay", "train.distributed_timeout"), 4):
        assert f"{key} (line {line}): Input should be a finite number" in e.value.message


def test_a_data_train_item_takes_a_path_and_a_weight_read_beside_the_config(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train:\n    - a.jsonl\n    - {path: b.jsonl, weight: 2.5}\n")
    data = load_config(path).data
    assert data.train_files == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert data.train_weights == [1.0, 2.5] and data.weighted


@pytest.mark.parametrize(
    "item, said",
    [
        ("{path: b.jsonl, weight: 0}", "data.train.1.weight (line 4): data.train[1] (b.jsonl): weight 0 is not"),
        ("{path: b.jsonl, weight: -1}", "data.train.1.weight (line 4): data.train[1] (b.jsonl): weight -1 is not"),
        ("{path: b.jsonl, weight: two}", "data.train.1.weight (line 4): data.train[1] (b.jsonl): weight 'two'"),
        ("{path: b.jsonl, wieght: 2}", "data.train.1.wieght (line 4): data.train[1] (b.jsonl): unknown key wieght"),
        ("{weight: 2}", "data.train.1.path (line 4): data.train[1]: path is required"),
    ],
)
def test_a_bad_data_train_item_is_refused_naming_its_file_place_and_field(tmp_path, item, said):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data:\n  train:\n    - a.jsonl\n    - {item}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert said in str(e.value)


def test_grpo_refuses_data_train_weights_it_would_ignore(tmp_path):
    path = tmp_path / "cfg.yaml"
    grader = "{type: string_check, name: x, input: '{{ sample.output_text }}', reference: x, operation: eq}"
    grpo = f"grpo: {{grader: {grader}}}"
    path.write_text(f"method: grpo\n{grpo}\ndata:\n  train:\n    - a.jsonl\n    - {{path: b.jsonl, weight: 2}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "method: grpo samples its prompts from the files as they are, so a weight would be ignored" in str(e.value)
    path.write_text(f"method: grpo\n{grpo}\ndata:\n  train:\n    - a.jsonl\n    - {{path: b.jsonl, weight: 1}}\n")
    assert load_config(path).data.train_weights == [1, 1]


def test_missing_data_files_are_refused_by_key_and_line_before_any_model_loads(tmp_path, monkeypatch):
    from tuneforge.dry_run import validate
    from tuneforge.pipeline import check_launch
    from tuneforge.pipeline import train as train_and_evaluate
    from tuneforge.training.loop import train

    monkeypatch.chdir(tmp_path)
    path = tmp_path.resolve() / "configs" / "run.yaml"
    path.parent.mkdir()
    # base_model names no model: a run that resolved it before looking at its data would fail on that. eval.task
    # reads the validation file before training: it is refused by key there too, not as a file of no key.
    path.write_text(
        "base_model: no-such-model\ndata:\n  train:\n    - data/train.jsonl\n  validation: /nowhere/valid.jsonl\n"
        "eval:\n  task: auto\n"
    )
    launch = functools.partial(check_launch, processes=2)
    for run in (validate, train, train_and_evaluate, launch):
        with pytest.raises(ConfigError) as e:
            run(path, ["data.general_mix=0.2", "data.general_replay=replay.jsonl"])
        assert e.value.message.splitlines() == [
            f"data.train.0 ({path} line 4): data/train.jsonl is neither in {path.parent} (the config's folder) nor "
            f"in the working directory {tmp_path.resolve()}",
            f"data.validation ({path} line 5): /nowhere/valid.jsonl does not exist",
            f"data.general_replay (override): replay.jsonl is not in the working directory {tmp_path.resolve()}",
            "Correct the path, or give it absolute.",
        ]


def test_a_training_run_checks_its_data_files_once_before_its_evaluation_checks(tmp_path, monkeypatch):
    from tuneforge import pipeline
    from tuneforge.training import loop

    (tmp_path / "train.jsonl").write_text("{}\n")
    path = tmp_path / "run.yaml"
    path.write_text(f"base_model: no-such-model\noutput_dir: {tmp_path / 'run'}\ndata:\n  train: train.jsonl\n")
    calls, checked = [], Config.check_data_files

    def check_data_files(cfg):
        calls.append("data files")
        checked(cfg)

    class Stop(Exception):
        pass

    def setup(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(Config, "check_data_files", check_data_files)
    monkeypatch.setattr(pipeline, "check_eval_inputs", lambda cfg: calls.append("evaluation"))
    monkeypatch.setattr(loop, "setup", setup)  # where the model would load: the checks are done by then
    with pytest.raises(Stop):
        pipeline.train(path, progress=False)
    assert calls == ["data files", "evaluation"]


def test_a_key_left_without_a_value_is_refused_as_empty(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train:\nlora:\ntrain:\n  learning_rate:\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    empty = "has no value (YAML reads a key with nothing after it as null); give it one"
    assert e.value.message.splitlines()[1:] == [
        f"  lora (line 3): {empty}, or leave the key out for its default.",
        f"  data.train (line 2): {empty}.",
        f"  train.learning_rate (line 5): {empty}, or leave the key out for its default.",
    ]


def test_an_empty_list_item_is_refused_as_one_to_fill_or_delete(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train:\n    - a.jsonl\n    -\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    # An item takes a path or {path, weight}: it is named once, not again under the second type's name.
    assert [line for line in e.value.message.splitlines() if "data.train.1" in line] == [
        "  data.train.1 (line 4): is an empty list item (a '-' with nothing after it); give it a value or delete "
        "the line."
    ]


def test_a_yaml_mistake_names_its_place_and_what_to_fix(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: a.jsonl\ntrain:\n  max_steps: 2\n\tbatch_size: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message == (
        f"{path} line 5, column 1: not valid YAML (found character '\\t' that cannot start any token); YAML "
        "indents with spaces, never tabs: replace the tab there with spaces."
    )
    path.write_text("data:\n  train: a.jsonl\n train:\n  max_steps: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.startswith(f"{path} line 3, column 2: not valid YAML (")
    assert e.value.message.endswith(
        "; check the indentation there and on the line above (a section's keys line up, "
        "indented by spaces under it), that each key has ': ' after it, and that "
        "brackets and quotes close."
    )


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            b"data:\n  train: a.jsonl\noutput_dir: caf\xe9\n",
            "line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8",
        ),
        (b"data:\n  train: a.jsonl\r\noutput_dir: o\x00ut\n", "line 3: a control character (U+0000), which YAML"),
        ("data:\n  train: a.jsonl\n".encode("utf-16"), "line 1: not UTF-8 text (byte 0xff)"),
    ],
)
def test_a_config_file_that_is_not_utf8_text_is_refused_by_line(tmp_path, text, said):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.startswith(f"{path} {said}")


def test_yaml_too_deep_or_with_too_long_an_integer_is_refused_by_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: a.jsonl\ntrain:\n  max_steps: " + "9" * 5_000 + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message == (
        f"{path} line 4: the YAML has an integer of more than 4,300 digits, more than Python reads, which no "
        "config needs; fix the value there."
    )
    path.write_text("data:\n  train: a.jsonl\nlora:\n  target_modules: " + "[" * 5_000 + "]" * 5_000 + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.startswith(f"{path} line 4: the YAML nests arrays or objects too deeply to be read")
    with pytest.raises(ConfigError) as e:
        load_config({"data": {"train": "a.jsonl"}}, [f"train.max_steps={'9' * 5_000}"])
    assert e.value.message.endswith(
        "': the value of train.max_steps: the YAML has an integer of more than 4,300 digits, more than Python reads, "
        "which no config needs; fix the value there."
    )


def test_aliases_that_never_end_or_multiply_past_reason_are_refused_by_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    laughs = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else '0'] * 9)}]\n" for i in range(9))
    path.write_text("data:\n  train: a.jsonl\n" + laughs)
    with pytest.raises(ConfigError) as e:
        load_config(path)  # 9 ** 9 items: never reached
    assert e.value.message == (
        f"{path} line 8: the list or mapping there, with its aliases (*name), holds over 100,000 keys and list "
        "items, which no config needs (aliases of aliases multiply); write the values out, or alias each once."
    )
    path.write_text("data: &d\n  train: a.jsonl\n  more: [*d]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message.startswith(f"{path} line 1: the list or mapping there holds an alias (*name) of itself")
    path.write_text("data:\n  train: a.jsonl\nlora:\n  target_modules: &m [q_proj, v_proj]\n  modules_to_save: *m\n")
    assert load_config(path).lora.modules_to_save == ["q_proj", "v_proj"]  # an alias of a list, not of itself


def test_a_key_that_yaml_reads_as_null_is_refused_by_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  train: a.jsonl\ntrain:\n  max_steps: 2\n  ~: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message == (
        f"{path} line 5: a key under train written as ~, which YAML reads as no name (null); name the key, or "
        "delete the line."
    )


def test_a_folder_given_as_the_config_is_refused_as_a_folder(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert e.value.message == f"{tmp_path} is a folder, not a config file; give the YAML file."
    (tmp_path / "config.yaml").write_text("data:\n  train: a.jsonl\n")  # a run's folder
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert e.value.message.endswith(f"give the YAML file (a run's folder holds its config: {tmp_path}/config.yaml).")


@pytest.mark.parametrize("text", ["", "# base_model: smollm2-135m-instruct\n\n"])
def test_an_empty_config_file_is_refused_as_empty(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.message == (
        f"{path}: the file holds no keys (it is empty, or all comments); write the run's config in it "
        "(`tuneforge recipes show quickstart` prints one to start from)."
    )


def test_a_replay_file_is_checked_only_where_general_mix_reads_it(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: train.jsonl\n  general_replay: replay.jsonl\n")
    load_config(path).check_data_files()  # general_mix 0: the replay file is never read
    with pytest.raises(ConfigError, match=r"data.general_replay \(.*run.yaml line 3\): replay.jsonl is neither in"):
        load_config(path, ["data.general_mix=0.2"]).check_data_files()


def test_a_benchmark_file_that_is_not_there_is_refused_by_its_key(tmp_path, monkeypatch):
    """eval.benchmarks' files and few-shot files are looked for as data files are, and one found in neither place
    is refused before any model loads, naming its key, its line and the folders looked in."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "arc.jsonl").write_text("{}\n")
    path = tmp_path.resolve() / "run.yaml"
    path.write_text(
        "data:\n  train: train.jsonl\neval:\n  benchmarks:\n    - mmlu.csv\n"
        "    - {file: arc.jsonl, num_fewshot: 5, fewshot_file: arc_dev.jsonl}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path).check_data_files()
    folders = f"is neither in {path.parent} (the config's folder) nor in the working directory {tmp_path.resolve()}"
    assert e.value.message.splitlines() == [
        f"eval.benchmarks.0 ({path} line 5): mmlu.csv {folders}",
        f"eval.benchmarks.1.fewshot_file ({path} line 6): arc_dev.jsonl {folders}",
        "Correct the path, or give it absolute.",
    ]


def test_a_datasets_save_to_disk_folder_is_refused_by_key_saying_how_to_write_it_out(tmp_path):
    # The files `datasets.Dataset.save_to_disk` writes: read as a folder of data files, each would be refused
    # on its own (an .arrow file of no known kind, two JSON files of no known format).
    saved = tmp_path / "tickets"
    saved.mkdir()
    (saved / "data-00000-of-00001.arrow").write_bytes(b"\xff\xff\xff\xff")
    (saved / "dataset_info.json").write_text('{"features": {}}')
    (saved / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: tickets\n")
    with pytest.raises(ConfigError) as e:
        load_config(path).check_data_files()
    assert e.value.message == (
        f"data.train ({path} line 2): {saved} is a folder of Hugging Face datasets' save_to_disk, which is not "
        f"read as data; write its rows to a JSON Lines file (datasets.load_from_disk('{saved}').to_json('FILE.jsonl')) "
        "and name that file."
    )


def test_target_modules_as_a_string_of_names_with_commas_is_the_list_of_them(tmp_path):
    """LLaMA-Factory writes `lora_target: q_proj,v_proj`; a module name holds no comma, so it is a list."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: x\nlora:\n  target_modules: q_proj, v_proj,o_proj\n")
    assert load_config(path).lora.target_modules == ["q_proj", "v_proj", "o_proj"]
    assert load_config(path, ["lora.target_modules=k_proj,v_proj"]).lora.target_modules == ["k_proj", "v_proj"]


@pytest.mark.parametrize(
    ("written", "said"),
    [
        ("q_proj", "a string here is all-linear alone; write the modules as a list: [q_proj]"),
        ("q_proj,", "a string here is all-linear alone; write the modules as a list: [q_proj, v_proj]"),
        ("all", "every linear layer is written all-linear here"),  # LLaMA-Factory's lora_target: all
        ("all_linear", "every linear layer is written all-linear here"),
        ("All-Linear", "every linear layer is written all-linear here"),
    ],
)
def test_target_modules_as_another_string_says_to_write_a_list(tmp_path, written, said):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  train: x\nlora:\n  target_modules: {written}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    [line] = [line for line in e.value.message.splitlines() if "lora.target_modules" in line]
    assert line == f"  lora.target_modules (line 4): {said} (got {written!r})"


@pytest.mark.parametrize("written", ["[all-linear]", "[q_proj, all-linear]"])
def test_target_modules_listing_all_linear_says_to_write_it_without_brackets(tmp_path, written):
    """all-linear is target_modules' keyword for every linear layer; inside a list it would be a module's name."""
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  train: x\nlora:\n  target_modules: {written}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    [line] = [line for line in e.value.message.splitlines() if "lora.target_modules" in line]
    assert line.startswith(
        "  lora.target_modules (line 4): all-linear is written alone, without brackets (target_modules: all-linear), "
        "for every linear layer; a list names modules, such as [q_proj, v_proj] (got "
    )


def test_target_modules_as_an_empty_list_is_refused_saying_what_to_write(tmp_path):
    """PEFT reads an empty target_modules as no module to adapt: the run would train nothing."""
    said = (
        "an empty list adapts no layer; write all-linear for every linear layer, or list the layers to adapt, "
        "such as [q_proj, v_proj] (got [])"
    )
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: x\nlora:\n  target_modules: []\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"  lora.target_modules (line 4): {said}" in e.value.message.splitlines()
    path.write_text("data:\n  train: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["lora.target_modules=[]"])
    assert f"  lora.target_modules (override): {said}" in e.value.message.splitlines()


BIG = "9" * 5_000  # more digits than Python converts to an int


@pytest.mark.parametrize(
    ("read", "said"),
    [
        (lambda d: read_tools(_written(d / "t.yaml", f"- {BIG}\n")), "t.yaml"),
        (lambda d: grader_spec(f"{{a: {BIG}}}"), "--grader"),
        (lambda d: parse_grid(f"train.seed={BIG}"), "--set 'train.seed="),
        (lambda d: parse_grid("train.seed=" + "[" * 3_000 + "]" * 3_000), "--set"),
        (lambda d: load_grader(str(_written(d / "g.yaml", f"type: x\nn: {BIG}\n"))), "g.yaml line 2"),
    ],
)
def test_every_reader_of_a_user_s_yaml_refuses_what_python_gives_up_on_naming_the_input(tmp_path, read, said):
    with pytest.raises(ConfigError) as e:
        read(tmp_path)
    assert said in e.value.message and "which no config needs" in e.value.message


def test_every_reader_of_a_user_s_yaml_bounds_its_aliases(tmp_path):
    nested = "x0: &x0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]\n" for i in range(1, 7)
    )
    with pytest.raises(ConfigError) as e:
        load_grader(str(_written(tmp_path / "g.yaml", "type: x\n" + nested)))
    assert "holds over 100,000 keys and list items" in e.value.message
    with pytest.raises(ConfigError) as e:
        parse_grid("train.seed=&a [*a]")
    assert e.value.message.startswith("--set 'train.seed=&a [*a]': the list or mapping there holds an alias")


def _written(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("tokens", "said"),
    [
        ('["<tool>", "<tool>"]', "lists <tool> more than once"),
        ('["<tool>", "  "]', "'  ', which is empty or only whitespace"),
        ('["<tool>", ""]', "'', which is empty or only whitespace"),
    ],
)
def test_add_tokens_repeated_or_blank_is_named_once_at_its_line(tmp_path, tokens, said):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data:\n  train: x.jsonl\nmodel:\n  add_tokens: {tokens}\n")
    with pytest.raises(ConfigError, match=said) as e:
        load_config(path)
    assert "  model.add_tokens (line 4): model.add_tokens " in e.value.message


def test_grader_files_not_found_are_refused_as_data_files_are_naming_key_line_and_folders(tmp_path, monkeypatch):
    """A grader's file (a reward function's FILE.py, or a JSON/YAML file holding a grader) found neither beside the
    config nor in the working directory is refused before any model loads, naming its key, its line and the
    folders looked in, as a data file is."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "rewards.py").write_text("def f(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    path = tmp_path.resolve() / "run.yaml"
    folders = f"is neither in {path.parent} (the config's folder) nor in the working directory {tmp_path.resolve()}"
    for grader, refused in (
        ("rewrds.py:f", f"grpo.grader ({path} line 5): rewrds.py"),
        ("[rewards.py:f, other.py:g]", f"grpo.grader.1 ({path} line 5): other.py"),
        ("grader.yaml", f"grpo.grader ({path} line 5): grader.yaml"),
    ):
        path.write_text(f"method: grpo\ndata:\n  train: train.jsonl\ngrpo:\n  grader: {grader}\n")
        with pytest.raises(ConfigError) as e:
            load_config(path).check_data_files()
        assert e.value.message.splitlines() == [f"{refused} {folders}", "Correct the path, or give it absolute."]
    path.write_text("method: grpo\ndata:\n  train: train.jsonl\ngrpo:\n  grader: [rewards.py:f]\n")
    load_config(path).check_data_files()
