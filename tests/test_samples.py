"""Sample answers at each validation (`train.eval_samples`): what they hold, that they leave training as it
was, resume, the flag on answers that never stop, and the keys they are refused with."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from safetensors.torch import load_file
from test_grpo import BRACE

from tuneforge.config import load_config
from tuneforge.data.render import renderer_for
from tuneforge.errors import ConfigError
from tuneforge.models import load_model, load_tokenizer, resolve
from tuneforge.training import samples, train


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        (r["step"], r.get("train_loss"), r.get("valid_loss"), r.get("full_valid_loss")) for r in map(json.loads, lines)
    ]


def adapter(run: Path) -> dict:
    return load_file(run / "final" / "adapter_model.safetensors")


def test_samples_at_each_validation_leave_the_trained_weights_and_losses_as_they_were(
    tiny_model_dir, triage_data, tmp_path, capsys
):
    # LoRA dropout draws random numbers at every training step: a draw by the samples would move them.
    on = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "on", max_steps=6, batch_size=4, eval_every=2)
    on["train"].update(eval_samples=3, eval_max_new_tokens=16)
    train(on)
    off = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "off", max_steps=6, batch_size=4, eval_every=2)
    train(off, progress=False)

    written = records(tmp_path / "on")
    assert [(r["step"], r.get("full_valid", False)) for r in written] == [(2, False), (4, False), (6, True)]
    chosen = [[s["example"] for s in r["samples"]] for r in written]
    assert chosen == [[0, 5, 10]] * 3  # the same prompts, spread over the 16 validation rows
    first = written[0]["samples"][0]
    assert first["prompt"].endswith("<|im_start|>assistant\n")  # as generation renders it: the reply is to come
    assert first["reference"].startswith('{"category"') and "<|im_end|>" not in first["reference"]
    assert not (tmp_path / "off" / "samples.jsonl").exists()

    assert (tmp_path / "on" / "metrics.jsonl").read_text().count("train_loss") == 6
    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    on_weights, off_weights = adapter(tmp_path / "on"), adapter(tmp_path / "off")
    assert all(torch.equal(on_weights[k], off_weights[k]) for k in off_weights)

    # The untrained tiny model never ends its turn: the console says so at each validation.
    out = capsys.readouterr().out
    assert "samples at step 2: 3 of 3 answers DID NOT STOP within 16 tokens" in out
    assert "samples at the final validation, step 6" in out
    assert all(not s["stopped"] and s["tokens"] == 16 for r in written for s in r["samples"])


def test_greedy_samples_draw_no_random_numbers_and_leave_each_module_in_its_mode(tiny_model_dir, triage_data):
    source = resolve(str(tiny_model_dir))
    tokenizer = load_tokenizer(source)
    model = load_model(source).train()
    model.model.layers[0].eval()  # a module in another mode than its parent keeps it
    prompts = [samples.SamplePrompt(0, tuple(tokenizer("<|im_start|>user\nhi<|im_end|>\n")["input_ids"]), (1,))]
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    first = samples.answer(model, tokenizer, prompts, max_new_tokens=8)
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert samples.answer(model, tokenizer, prompts, max_new_tokens=8) == first  # greedy: the same each time


def test_an_answer_that_ends_its_turn_is_stopped_and_one_cut_at_the_bound_is_not(tiny_model_dir):
    source = resolve(str(tiny_model_dir))
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    prompt = samples.SamplePrompt(0, tuple(tokenizer("<|im_start|>user\nhi<|im_end|>\n")["input_ids"]), (1,))
    cut = samples.answer(model, tokenizer, [prompt], max_new_tokens=5)[0]
    assert not cut["stopped"] and cut["tokens"] == 5
    assert "DID NOT STOP within 5 tokens" in samples.console_lines(4, [cut])[0]
    # The same model made to end its turn after two tokens of its own.
    end = renderer_for(tokenizer).end_of_turn_id
    calls = []

    def end_turn_third(module, args, logits):
        calls.append(None)
        if len(calls) >= 3:
            logits[..., end] = logits.max() + 10
        return logits

    model.lm_head.register_forward_hook(end_turn_third)
    stopped = samples.answer(model, tokenizer, [prompt], max_new_tokens=5)[0]
    assert stopped["stopped"] and stopped["tokens"] == 3
    assert "DID NOT STOP" not in "\n".join(samples.console_lines(4, [stopped]))


def test_a_resumed_run_writes_each_validations_samples_once(base_dir, triage_data, tmp_path):
    # The sharp tiny model (tiny_sharp.py): its answers change as it trains, so a resumed run that answered
    # with other weights than the uninterrupted run's at the same step writes other answers.
    cfg = tiny_run_config(base_dir, triage_data, tmp_path / "run", max_steps=8, batch_size=4, eval_every=2)
    cfg["train"].update(eval_samples=2, eval_max_new_tokens=4, save_every=4, keep_checkpoints=3)
    train(cfg, progress=False)
    whole = records(tmp_path / "run")
    assert [r["step"] for r in whole] == [2, 4, 6, 8]
    assert len({tuple(s["answer"] for s in r["samples"]) for r in whole}) > 1  # the answers move with the weights
    train(cfg, progress=False, resume=str(tmp_path / "run" / "checkpoints" / "step-4"), force=True)
    assert records(tmp_path / "run") == whole
    train(cfg, progress=False, resume=True)  # at its last step: only the final validation runs again
    assert records(tmp_path / "run") == whole


@pytest.mark.parametrize(
    "change, key",
    [
        ({"method": "grpo", "grpo": {"grader": BRACE}}, "method"),
        ({"method": "dpo"}, "method"),
        ({"method": "reward"}, "method"),
        ({"data": {"train_on": "all"}}, "data.train_on"),
    ],
)
def test_eval_samples_where_no_prompt_is_answered_are_refused(tiny_model_dir, triage_data, tmp_path, change, key):
    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run")
    for section, values in change.items():
        cfg[section] = {**cfg[section], **values} if isinstance(values, dict) and section in cfg else values
    cfg["train"]["eval_samples"] = 2
    with pytest.raises(ConfigError, match=r"train\.eval_samples answers the validation prompts of SFT") as error:
        load_config(cfg)
    assert key in str(error.value)


def test_sample_prompts_leave_out_examples_without_a_prompt(tiny_model_dir, triage_data):
    from tuneforge.data.schema import IGNORE_INDEX, Example

    document = Example([5, 6, 7], [6, 7, IGNORE_INDEX])  # text data: every token trained
    chat = Example([1, 2, 3, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, 4, 5, IGNORE_INDEX])
    assert samples.sample_prompts([document, chat], 4) == [samples.SamplePrompt(1, (1, 2, 3), (4, 5))]


def test_eval_samples_are_refused_for_a_sharded_run(tiny_model_dir, triage_data, tmp_path):
    from tuneforge.errors import TuneforgeError
    from tuneforge.training import distributed

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", eval_samples=2, distributed="fsdp")
    cfg["method"] = "full"
    assert distributed.strategy(load_config({**cfg, "train": {**cfg["train"], "eval_samples": 0}}), 2) == "fsdp"
    with pytest.raises(TuneforgeError, match="train.eval_samples: every process answers the sample prompts"):
        distributed.strategy(load_config(cfg), 2)
