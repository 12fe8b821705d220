"""method: dpo on tiny models: the loss against an independent computation, one forward per pair,
the disabled adapter as reference, a run that learns the preference, normalisation per pair,
clear errors on the wrong kind of data, and starting from an SFT run."""

import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run_config
from tiny import tiny_llama

from tuneforge.config import load_config
from tuneforge.data import Message, Preference, collate, render_preference
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.methods import dpo
from tuneforge.models import causal_lm
from tuneforge.models.attention import per_example_attention
from tuneforge.training import to_rows, train

CHATTY = [
    "Hello! Thanks so much for reaching out, I'd be happy to help you with that today.",
    "Sure thing, this sounds like something our team can look at. Have a great day!",
    "I think it might be a problem, but I am not sure. Could you tell me more?",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny models, on one thread."""


def preference_rows(chat_file: Path) -> list[dict]:
    """The demo task's chat rows as pairs: the JSON answer preferred, a chatty reply rejected."""
    rows = []
    for i, line in enumerate(chat_file.read_text().splitlines()):
        messages = json.loads(line)["messages"]
        rows.append(
            {
                "prompt": messages[:-1],
                "chosen": [messages[-1]],
                "rejected": [{"role": "assistant", "content": CHATTY[i % len(CHATTY)]}],
            }
        )
    return rows


def write_splits(triage_data: dict, folder, rows_of) -> dict:
    """`rows_of` each split of the demo data, written as a JSONL file of its own in `folder`."""
    paths = {}
    for split in ("train", "validation"):
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows_of(triage_data[split])))
    return paths


@pytest.fixture(scope="module")
def preference_data(triage_data, tmp_path_factory) -> dict:
    return write_splits(triage_data, tmp_path_factory.mktemp("preference"), preference_rows)


def dpo_config(model_dir, data: dict, out, dpo_section: dict | None = None, **train_options) -> dict:
    cfg = tiny_run_config(model_dir, data, out, **train_options)
    cfg["method"] = "dpo"
    cfg["lora"]["dropout"] = 0.0
    cfg["dpo"] = dpo_section or {}
    return cfg


def pairs_for(tokenizer, n: int = 3):
    """Rendered (chosen, rejected) pairs of different lengths, with their reply texts."""
    pairs, replies = [], []
    for i in range(n):
        chosen = '{"category": "outage", "priority": "urgent"}' if i % 2 else '{"category": "billing"}'
        rejected = CHATTY[i % len(CHATTY)]
        preference = Preference(
            [Message("user", "My database is down " * (i + 1))],
            Message("assistant", chosen),
            Message("assistant", rejected),
        )
        pairs.append(render_preference(preference, tokenizer))
        replies.append((chosen, rejected))
    return pairs, replies


def reply_logp(model, ids: list[int], reply: str, tokenizer) -> torch.Tensor:
    """log p(reply + end of turn | everything before it), found from the reply's text: the reply's
    tokens and <|im_end|> come right before the rendering's final newline."""
    target = tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    end = len(ids) - 1
    assert list(ids[end - len(target) : end]) == target and tokenizer.decode(ids[end:]) == "\n"
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    positions = torch.arange(end - len(target), end)
    return F.log_softmax(logits[positions - 1], -1)[torch.arange(len(target)), torch.tensor(target)].sum()


@pytest.mark.parametrize("attention", ["per_example", "model"])
@pytest.mark.parametrize("loss,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_loss_equals_an_independent_computation_over_reply_tokens_only(tokenizer, loss, smoothing, attention):
    policy, reference = tiny_llama(tokenizer, seed=0).eval(), tiny_llama(tokenizer, seed=1).eval()
    pairs, replies = pairs_for(tokenizer)
    beta = 0.5
    # Rows as long as the longest and shortest pair together: two pairs packed into one row, the third
    # alone in another, so pairs are found per example, not per row.
    lengths = sorted(len(c) + len(r) for c, r in pairs)
    rows = to_rows(dpo.rows(pairs), load_config({"data": {"train": "x", "max_length": lengths[0] + lengths[-1]}}))
    assert len(rows) == 2
    objective = dpo.DPOObjective(policy, beta=beta, loss=loss, label_smoothing=smoothing, reference=reference)
    batch = collate(rows, tokenizer.pad_token_id)
    with per_example_attention(policy) if attention == "per_example" else contextlib.nullcontext():
        sums = objective(**batch)

    expected, rewards = [], []
    with torch.no_grad():
        for (chosen, rejected), (chosen_text, rejected_text) in zip(pairs, replies):
            ratios = [
                reply_logp(policy, e.input_ids, text, tokenizer) - reply_logp(reference, e.input_ids, text, tokenizer)
                for e, text in ((chosen, chosen_text), (rejected, rejected_text))
            ]
            h = ratios[0] - ratios[1]
            if loss == "sigmoid":
                expected.append(
                    -(1 - smoothing) * math.log(torch.sigmoid(beta * h))
                    - smoothing * math.log(torch.sigmoid(-beta * h))
                )
            else:
                expected.append(float((h - 1 / (2 * beta)) ** 2))
            rewards.append([beta * float(r) for r in ratios])
    assert dpo.count_pairs(batch) == 3
    assert sums["loss"].item() == pytest.approx(sum(expected), rel=1e-4)
    assert float(sums["rewards/chosen"]) == pytest.approx(sum(c for c, _ in rewards), rel=1e-4, abs=1e-5)
    assert float(sums["rewards/rejected"]) == pytest.approx(sum(r for _, r in rewards), rel=1e-4, abs=1e-5)
    assert float(sums["rewards/accuracies"]) == sum(c > r for c, r in rewards)


def test_reply_masks_cover_the_reply_and_its_end_of_turn_only(tokenizer):
    (pair,), ((chosen_text, rejected_text),) = pairs_for(tokenizer, 1)
    for example, text in zip(pair, (chosen_text, rejected_text)):
        trained = [t for t in example.labels if t != -100]
        assert tokenizer.decode(trained) == text + "<|im_end|>"
    assert pair[0].input_ids[:20] == pair[1].input_ids[:20]  # the shared prompt is there, untrained


def test_chosen_and_rejected_go_through_one_forward(tokenizer):
    model = dpo.prepare_model(tiny_llama(tokenizer), load_config({"method": "dpo", "data": {"train": "x"}}))
    pairs, _ = pairs_for(tokenizer)
    batch = collate(dpo.rows(pairs), tokenizer.pad_token_id)
    forwards = []
    causal_lm(model).get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    dpo.DPOObjective(model, beta=0.1, loss="sigmoid")(**batch)
    # One forward of the policy and one of the reference (adapter disabled), each over the whole batch.
    assert forwards == [batch["input_ids"].shape] * 2


def test_lora_reference_is_the_model_with_its_adapter_disabled_and_the_first_loss_is_log_2(tokenizer):
    base = tiny_llama(tokenizer)
    plain = tiny_llama(tokenizer)  # the same weights (same seed), never wrapped
    model = dpo.prepare_model(base, load_config({"method": "dpo", "data": {"train": "x"}}))
    pairs, _ = pairs_for(tokenizer)
    batch = collate(dpo.rows(pairs), tokenizer.pad_token_id)
    objective = dpo.DPOObjective(model, beta=0.1, loss="sigmoid")
    sums = objective(**batch)
    assert sums["loss"].item() / dpo.count_pairs(batch) == pytest.approx(math.log(2), abs=1e-6)
    assert float(sums["rewards/margins"]) == 0 and float(sums["rewards/accuracies"]) == 0

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        policy = dpo.sequence_logps(causal_lm(model), **batch)
        expected = dpo.sequence_logps(plain, **batch)
    reference = objective.reference_logps(**batch)
    assert torch.allclose(reference, expected, atol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-3)


def test_a_tiny_dpo_run_learns_to_prefer_the_json_answers(tiny_model_dir, preference_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    result = train(
        dpo_config(tiny_model_dir, preference_data, run, max_steps=12, learning_rate=5e-3, eval_every=6), progress=False
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], result.metrics
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-5) and first["rewards/accuracies"] == 0
    assert last["train_loss"] < 0.5 and last["rewards/accuracies"] >= 0.9 and last["rewards/margins"] > 0
    assert "train_mean_token_accuracy" not in last
    assert any("valid_rewards/accuracies" in r for r in rows)
    assert last["full_valid_rewards/accuracies"] >= 0.9 and last["full_valid_loss"] < math.log(2)

    # The trained adapter, loaded as users load it, prefers the chosen replies more than the base does.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "final")
    data = load_config(dpo_config(tiny_model_dir, preference_data, run))
    from tuneforge.data import prepare
    from tuneforge.models import load_tokenizer

    pairs = prepare(data.data, load_tokenizer(str(tiny_model_dir)), log=lambda *a: None).train_pairs
    batch = collate(dpo.rows(pairs), 0)
    with torch.no_grad():
        gaps = [
            (lambda logps: logps[0::2] - logps[1::2])(dpo.sequence_logps(causal_lm(m), **batch)) for m in (base, tuned)
        ]
    assert (gaps[1] > gaps[0]).float().mean() > 0.9


def test_full_policy_trains_against_a_frozen_copy(tiny_model_dir, preference_data, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    result = train(
        dpo_config(tiny_model_dir, preference_data, run, {"policy": "full"}, max_steps=2, learning_rate=1e-3),
        progress=False,
    )
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # the copy equals the policy at the start
    assert result.metrics["rewards/margins"] != 0  # and stayed put while the policy moved
    tuned, base = (AutoModelForCausalLM.from_pretrained(p) for p in (result.final_dir, tiny_model_dir))
    assert (tuned.model.layers[0].mlp.up_proj.weight - base.model.layers[0].mlp.up_proj.weight).abs().max() > 0


def test_the_loss_is_normalised_per_pair_whatever_the_accumulation(tiny_model_dir, preference_data, tmp_path):
    """Rows of packed pairs hold different numbers of pairs; dividing by the step's pairs makes
    one micro-batch and four give the same losses (a mean of micro-batch means would not)."""
    losses = {}
    for accumulation in (1, 4):
        run = tmp_path / f"accum{accumulation}"
        train(
            dpo_config(tiny_model_dir, preference_data, run, grad_accum=accumulation, max_steps=3, learning_rate=1e-2),
            progress=False,
        )
        losses[accumulation] = [
            json.loads(line)["train_loss"]
            for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train_loss" in json.loads(line)
        ]
    assert len(losses[1]) == 3
    assert losses[1] == pytest.approx(losses[4], rel=1e-5)


def test_dpo_on_sft_data_and_sft_on_pairs_fail_before_any_work(tiny_model_dir, triage_data, preference_data, tmp_path):
    sft_data_with_dpo = dpo_config(tiny_model_dir, triage_data, tmp_path / "a")
    with pytest.raises(TuneforgeError, match="method: dpo trains on preference pairs") as err:
        train(sft_data_with_dpo, progress=False)
    assert err.value.code == "not_preference_data"
    pairs_read_as_chat = dpo_config(tiny_model_dir, preference_data, tmp_path / "c")
    pairs_read_as_chat["data"]["format"] = "chat"
    with pytest.raises(TuneforgeError, match="data.format: chat reads this file's rows as another format") as err:
        train(pairs_read_as_chat, progress=False)
    assert err.value.code == "not_preference_data"
    pairs_with_lora = tiny_run_config(tiny_model_dir, preference_data, tmp_path / "b")
    with pytest.raises(TuneforgeError, match="method: lora cannot train on.*method: dpo") as err:
        train(pairs_with_lora, progress=False)
    assert err.value.code == "preference_data"
    assert not any((tmp_path / run).exists() for run in "abc")


def test_an_empty_pairs_file_is_refused_as_empty_not_as_other_data(tiny_model_dir, tmp_path):
    """`distill generate --keep pairs` writes an empty file where every prompt's answers scored alike: the run names
    the file as empty rather than as data of another kind."""
    empty = tmp_path / "pairs.jsonl"
    empty.write_text("")
    for loss in ("sigmoid", "kto"):
        cfg = dpo_config(tiny_model_dir, {"train": empty, "validation": empty}, tmp_path / loss, {"loss": loss})
        with pytest.raises(TuneforgeError, match="the file is empty") as err:
            train(cfg, progress=False)
        assert str(empty) in err.value.message and "not preference data" not in err.value.message
        assert "no rated replies" not in err.value.message


def test_config_refuses_label_smoothing_with_ipo_and_kl_to_base_or_train_on_all_with_dpo():
    with pytest.raises(ConfigError, match="label_smoothing is for loss: sigmoid"):
        load_config({"method": "dpo", "dpo": {"loss": "ipo", "label_smoothing": 0.1}, "data": {"train": "x"}})
    with pytest.raises(ConfigError, match="method: dpo does not take train.kl_to_base"):
        load_config({"method": "dpo", "train": {"kl_to_base": 0.1}, "data": {"train": "x"}})
    with pytest.raises(ConfigError, match="dpo.policy"):
        load_config({"method": "dpo", "dpo": {"policy": "dora"}, "data": {"train": "x"}})
    with pytest.raises(ConfigError, match="data.train_on: all trains the prompt too, but method: dpo"):
        load_config({"method": "dpo", "data": {"train": "x", "train_on": "all"}})


def test_dpo_from_an_sft_run_trains_on_the_merged_sft_model(tiny_model_dir, triage_data, preference_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.models import load_model

    sft = tmp_path / "sft"
    train(tiny_run_config(tiny_model_dir, triage_data, sft, max_steps=3, learning_rate=1e-2), progress=False)
    cfg = dpo_config(sft, preference_data, tmp_path / "dpo", max_steps=3, learning_rate=5e-3)

    # The reference is the SFT model: the SFT adapter merged, the fresh DPO adapter disabled.
    pairs, _ = pairs_for(load_tokenizer_of(tiny_model_dir))
    batch = collate(dpo.rows(pairs), 0)
    policy_model = dpo.prepare_model(load_model(str(sft)), load_config(cfg))
    with torch.no_grad():
        sft_logps = dpo.sequence_logps(causal_lm(load_model(str(sft))), **batch)
        base_logps = dpo.sequence_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), **batch)
    reference = dpo.DPOObjective(policy_model, beta=0.1, loss="sigmoid").reference_logps(**batch)
    assert torch.allclose(reference, sft_logps, atol=1e-4)
    assert not torch.allclose(reference, base_logps, atol=1e-3)

    result = train(cfg, progress=False)
    assert result.status == "completed"
    # final/ is SFT and DPO merged into one plain model (an adapter alone would point at the base
    # without SFT): it equals the merged SFT model with the last checkpoint's DPO adapter on top.
    from peft import PeftModel

    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    sft_with_dpo = PeftModel.from_pretrained(
        load_model(str(sft)).merge_and_unload(), tmp_path / "dpo" / "checkpoints" / "step-3"
    )
    with torch.no_grad():
        final_logps = dpo.sequence_logps(final, **batch)
        expected = dpo.sequence_logps(causal_lm(sft_with_dpo), **batch)
    assert torch.allclose(final_logps, expected, atol=1e-3)
    assert not torch.allclose(final_logps, sft_logps, atol=1e-2)


def load_tokenizer_of(model_dir):
    from tuneforge.models import load_tokenizer

    return load_tokenizer(str(model_dir))


def test_dpo_from_a_lora_run_on_a_quantized_base_is_refused_before_the_data_is_read(
    tiny_model_dir, preference_data, tmp_path
):
    from peft import LoraConfig, get_peft_model

    from tuneforge.models import load_model

    adapter = tmp_path / "adapter"
    get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=2, target_modules="all-linear")).save_pretrained(
        adapter
    )
    cfg = dpo_config(adapter, preference_data, tmp_path / "run", max_steps=1)
    cfg["model"] = {"quantize": "nf4"}
    with pytest.raises(ConfigError, match=r"^base_model, model\.quantize: dpo from a LoRA run .* set model\.quantize"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # no data report: the data was never read


def reply_mean_logp(model, ids: list[int], reply: str, tokenizer) -> float:
    """log p(reply + end of turn | everything before it) per token of it."""
    return float(reply_logp(model, ids, reply, tokenizer)) / len(
        tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("loss,smoothing", [("simpo", 0.0), ("simpo", 0.2), ("orpo", 0.0)])
def test_reference_free_losses_equal_a_direct_computation_in_one_forward(tokenizer, loss, smoothing):
    """SimPO and ORPO from the policy's per-token mean log-probabilities alone: the adapter stays on and
    the model runs once (no reference forward)."""
    model = dpo.prepare_model(tiny_llama(tokenizer), load_config({"method": "dpo", "data": {"train": "x"}}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.eval()
    pairs, replies = pairs_for(tokenizer)
    batch = collate(dpo.rows(pairs), tokenizer.pad_token_id)
    beta, gamma, lam = 2.0, 0.7, 0.3
    objective = dpo.DPOObjective(
        model, beta=beta, loss=loss, label_smoothing=smoothing, simpo_gamma=gamma, orpo_lambda=lam
    )
    forwards = []
    causal_lm(model).get_decoder().register_forward_pre_hook(lambda *args: forwards.append(1))
    sums = objective(**batch)
    assert forwards == [1] and objective.frozen == []

    expected, rewards, odds = [], [], []
    with torch.no_grad():
        for (chosen, rejected), texts in zip(pairs, replies):
            m = [reply_mean_logp(model, e.input_ids, text, tokenizer) for e, text in zip((chosen, rejected), texts)]
            if loss == "simpo":
                z = beta * m[0] - beta * m[1] - gamma
                expected.append(
                    -(1 - smoothing) * math.log(1 / (1 + math.exp(-z))) - smoothing * math.log(1 / (1 + math.exp(z)))
                )
                rewards.append([beta * v for v in m])
            else:
                o = [v - math.log(1 - math.exp(v)) for v in m]
                expected.append(-m[0] - lam * math.log(1 / (1 + math.exp(-(o[0] - o[1])))))
                rewards.append([lam * v for v in m])
                odds.append((o[0] - o[1], -m[0]))
    assert sums["loss"].item() == pytest.approx(sum(expected), rel=1e-4)
    assert float(sums["rewards/chosen"]) == pytest.approx(sum(c for c, _ in rewards), rel=1e-4)
    assert float(sums["rewards/margins"]) == pytest.approx(sum(c - r for c, r in rewards), rel=1e-4, abs=1e-5)
    assert float(sums["rewards/accuracies"]) == sum(c > r for c, r in rewards)
    if loss == "orpo":
        assert float(sums["log_odds_chosen"]) == pytest.approx(sum(o for o, _ in odds), rel=1e-4, abs=1e-5)
        assert float(sums["nll_loss"]) == pytest.approx(sum(n for _, n in odds), rel=1e-4)
    else:
        assert "nll_loss" not in sums


def test_orpo_log_odds_stay_finite_for_a_reply_of_probability_one():
    logps = torch.tensor([0.0, -1e-9, -0.5], requires_grad=True)
    losses = dpo.pair_losses(logps, torch.tensor([-2.0, -2.0, -2.0]), beta=1.0, kind="orpo", orpo_lambda=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(logps.grad).all()


def test_reference_free_losses_build_no_reference_even_for_a_full_policy(tokenizer):
    """base_model names no model: a reference copy would have to load it."""
    for loss in ("simpo", "orpo"):
        cfg = load_config({"method": "dpo", "dpo": {"loss": loss, "policy": "full"}, "data": {"train": "x"}})
        objective = dpo.build_objective(tiny_llama(tokenizer), cfg, dtype=torch.float32, device=torch.device("cpu"))
        assert objective.frozen == []


def test_config_takes_each_loss_with_its_own_keys_only():
    def dpo_section(**section):
        return load_config({"method": "dpo", "dpo": section, "data": {"train": "x"}}).dpo

    assert dpo_section(loss="simpo").beta == 2.0 and dpo_section(loss="simpo", beta=2.5).beta == 2.5
    assert dpo_section().beta == 0.1 and dpo_section(loss="orpo").orpo_lambda == 0.1
    assert dpo_section(loss="simpo", label_smoothing=0.1).label_smoothing == 0.1
    for section, keys in (
        ({"loss": "orpo", "label_smoothing": 0.1}, "label_smoothing is for loss: sigmoid or simpo"),
        ({"loss": "orpo", "beta": 0.5}, "loss: orpo has no beta.*dpo.orpo_lambda"),
        ({"loss": "sigmoid", "simpo_gamma": 0.5}, "dpo.simpo_gamma is for loss: simpo, and this run's loss is sigmoid"),
        ({"loss": "simpo", "orpo_lambda": 0.5}, "dpo.orpo_lambda is for loss: orpo, and this run's loss is simpo"),
    ):
        with pytest.raises(ConfigError, match=keys):
            dpo_section(**section)


def test_the_readme_dpo_example_shows_only_keys_its_loss_reads():
    """README's DPO example loads, and each dpo key it sets is one its table lists for the example's loss."""
    import re

    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Preference tuning \(DPO\)\n(.*?)^### ", readme, re.S | re.M)[1]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S)[1])
    loss = example["dpo"]["loss"]
    row = re.search(rf"^\| `{loss}` \|.*\| (.*?) \|$", section, re.M)[1]
    reads = set(re.findall(r"`(\w+)`", row)) | {"loss", "policy"}
    assert set(example["dpo"]) <= reads, f"README's DPO example sets {sorted(set(example['dpo']) - reads)}"
    assert load_config({**example, "data": {"train": "x"}}).dpo.loss == loss


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_a_tiny_reference_free_run_learns_the_preference_and_resumes_exactly(
    loss, tiny_model_dir, preference_data, tmp_path
):
    run = tmp_path / "run"
    cfg = dpo_config(
        tiny_model_dir,
        preference_data,
        run,
        {"loss": loss},
        max_steps=8,
        learning_rate=5e-3,
        eval_every=4,
        save_every=4,
    )
    result = train(cfg, progress=False)
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    first, last = rows[0], result.metrics
    assert last["rewards/margins"] > first["rewards/margins"] and last["rewards/accuracies"] >= 0.9
    assert last["full_valid_rewards/accuracies"] >= 0.9
    assert ("nll_loss" in last and last["nll_loss"] < first["nll_loss"]) == (loss == "orpo")
    # From the step-4 checkpoint again: steps 5 to 8 repeat to the bit.
    shutil.rmtree(run / "checkpoints" / "step-8")
    train(cfg, resume="latest", progress=False)
    again = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in rows]
