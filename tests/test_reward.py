"""method: reward on tiny models: the Bradley-Terry loss against the classifier's own scores, a run that
learns to rank the chosen replies and resumes exactly, a saved model transformers loads as a sequence
classifier, and clear refusals of data without rejected replies."""

import contextlib
import json
import math
import shutil
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run_config
from test_dpo import pairs_for, preference_rows, write_splits

from tuneforge.config import load_config
from tuneforge.data import collate
from tuneforge.errors import TuneforgeError
from tuneforge.exporting import export
from tuneforge.methods import dpo, reward
from tuneforge.models.attention import per_example_attention
from tuneforge.training import to_rows, train


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny models, on one thread."""


@pytest.fixture(scope="module")
def preference_data(triage_data, tmp_path_factory) -> dict:
    return write_splits(triage_data, tmp_path_factory.mktemp("preference"), preference_rows)


def reward_config(model_dir, data: dict, out, reward_section: dict | None = None, **train_options) -> dict:
    cfg = tiny_run_config(model_dir, data, out, **train_options)
    cfg["method"] = "reward"
    cfg["lora"]["dropout"] = 0.0
    cfg["reward"] = reward_section or {}
    return cfg


def tiny_classifier(tokenizer):
    from tiny import tiny_llama
    from transformers import LlamaForSequenceClassification

    config = tiny_llama(tokenizer).config
    config.num_labels = 1
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("attention", ["per_example", "model"])
@pytest.mark.parametrize("center", [None, 0.5])
def test_loss_equals_a_hand_computation_from_the_classifiers_two_scores(tokenizer, attention, center):
    model = tiny_classifier(tokenizer)
    pairs, _ = pairs_for(tokenizer)
    # Two pairs packed into one row, the third alone in another: scores are taken per example, not per row.
    lengths = sorted(len(c) + len(r) for c, r in pairs)
    rows = to_rows(dpo.rows(pairs), load_config({"data": {"train": "x", "max_length": lengths[0] + lengths[-1]}}))
    assert len(rows) == 2
    objective = reward.RewardObjective(model, pad_id=tokenizer.pad_token_id, center_rewards_coefficient=center)
    batch = collate(rows, tokenizer.pad_token_id)
    with per_example_attention(model) if attention == "per_example" else contextlib.nullcontext():
        sums = objective(**batch)

    # Each reply scored on its own by transformers' classifier (its score at the last non-pad token).
    with torch.no_grad():
        scores = [
            [float(model(input_ids=torch.tensor([list(e.input_ids)])).logits[0, 0]) for e in pair] for pair in pairs
        ]
    expected = sum(-math.log(torch.sigmoid(torch.tensor(c - r))) + (center or 0) * (c + r) ** 2 for c, r in scores)
    assert dpo.count_pairs(batch) == 3
    assert sums["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert float(sums["margin"]) == pytest.approx(sum(c - r for c, r in scores), rel=1e-4, abs=1e-5)
    assert float(sums["accuracy"]) == sum(c > r for c, r in scores)


def test_a_tiny_reward_model_learns_to_rank_the_chosen_replies_and_resumes_exactly(
    tiny_model_dir, preference_data, tmp_path
):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = tmp_path / "run"
    cfg = reward_config(
        tiny_model_dir, preference_data, run, max_steps=8, learning_rate=5e-3, eval_every=4, save_every=4
    )
    result = train(cfg, progress=False)
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    first, last = rows[0], result.metrics
    # The new score head starts near 0 for every reply: the loss starts near log 2, the margin near 0.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=0.05) and abs(first["margin"]) < 0.1
    assert last["train_loss"] < 0.5 and last["accuracy"] >= max(0.9, first["accuracy"]) and last["margin"] > 1
    assert any("valid_accuracy" in r and "valid_margin" in r for r in rows)
    assert last["full_valid_accuracy"] >= 0.9 and last["full_valid_loss"] < math.log(2)

    # The saved adapter loads as transformers' sequence classifier and ranks the validation pairs as training did.
    model = AutoPeftModelForSequenceClassification.from_pretrained(run / "final", num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    validation = [json.loads(line) for line in preference_data["validation"].read_text().splitlines()]

    def score(row, reply):
        ids = tokenizer.apply_chat_template(row["prompt"] + reply, tokenize=True, return_dict=False)
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

    ranked = [score(row, row["chosen"]) > score(row, row["rejected"]) for row in validation]
    assert sum(ranked) / len(ranked) == pytest.approx(last["full_valid_accuracy"])
    # Exported merged: a plain classifier folder that scores as the adapter does.
    export(run, "merged", None, tmp_path / "merged", progress=False)
    adapter_scores = [score(row, row["chosen"]) for row in validation[:2]]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert [score(row, row["chosen"]) for row in validation[:2]] == pytest.approx(adapter_scores, abs=1e-4)

    # From the step-4 checkpoint again: steps 5 to 8 repeat to the bit.
    shutil.rmtree(run / "checkpoints" / "step-8")
    train(cfg, resume="latest", progress=False)
    again = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in rows]


def test_a_full_reward_model_saves_a_classifier_and_is_refused_as_a_gguf(tiny_model_dir, preference_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    result = train(
        reward_config(tiny_model_dir, preference_data, run, {"trains": "full"}, max_steps=2, learning_rate=1e-3),
        progress=False,
    )
    model = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    with pytest.raises(TuneforgeError, match="is a reward model.*--format merged") as err:
        export(run, "gguf", None, tmp_path / "gguf", progress=False)
    assert err.value.code == "reward_model_gguf"


def test_data_without_rejected_replies_is_refused_before_any_work(tiny_model_dir, triage_data, tmp_path):
    with pytest.raises(TuneforgeError, match="method: reward trains on preference pairs") as err:
        train(reward_config(tiny_model_dir, triage_data, tmp_path / "a"), progress=False)
    assert err.value.code == "not_preference_data"
    rated = tmp_path / "rated.jsonl"
    rated.write_text(json.dumps({"prompt": "hi", "completion": "hello", "label": True}) + "\n")
    with pytest.raises(TuneforgeError, match='dpo.loss: kto, or give .*"chosen", "rejected"') as err:
        train(reward_config(tiny_model_dir, {"train": rated, "validation": rated}, tmp_path / "b"), progress=False)
    assert not any((tmp_path / run).exists() for run in "ab")


def test_bradley_terry_loss_is_log_2_for_equal_scores_and_falls_with_the_margin():
    scores = torch.tensor([0.0, 1.0, 3.0])
    losses = reward.pair_losses(scores, torch.zeros(3))
    assert losses.tolist() == pytest.approx((-F.logsigmoid(scores)).tolist())
    assert losses[0].item() == pytest.approx(math.log(2))


def test_a_reward_model_grader_scores_the_answer_to_the_items_prompt(tokenizer, tiny_model_dir, tmp_path):
    from tuneforge.graders import GraderError, load_grader, sample_of

    model = tiny_classifier(tokenizer)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    grader = load_grader({"type": "reward_model", "name": "rm", "model": str(tmp_path / "rm")})
    items = [{"prompt": "My database is down"}, {"prompt": [{"role": "user", "content": "Reset my password"}]}]
    answers = ['{"category": "outage"}', "Have a nice day!"]
    scores = [r.score for r in grader.grade([sample_of(a) for a in answers], items)]
    expected = []
    for item, answer in zip(items, answers):
        prompt = [{"role": "user", "content": item["prompt"]}] if isinstance(item["prompt"], str) else item["prompt"]
        ids = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": answer}], tokenize=True, return_dict=False
        )
        with torch.no_grad():
            expected.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    assert scores == pytest.approx(expected, abs=1e-5)
    # A text generator is no reward model: refused when the spec is built, naming the field.
    with pytest.raises(GraderError, match=r"`model` .* is not a reward model"):
        load_grader({"type": "reward_model", "name": "rm", "model": str(tiny_model_dir)})


def test_the_api_refuses_reward_model_graders_which_name_a_folder_on_the_server(tmp_path):
    from pydantic import ValidationError

    from tuneforge.jobs.evals import testing_criteria
    from tuneforge.jobs.mapping import ReinforcementMethod
    from tuneforge.web import APIError

    spec = {"type": "reward_model", "name": "rm", "model": str(tmp_path)}
    inside = {"type": "multi", "name": "m", "graders": {"rm": spec}, "calculate_output": "rm"}
    for grader in (spec, inside):
        with pytest.raises(ValidationError, match="cannot name"):
            ReinforcementMethod(grader=grader)
        with pytest.raises(APIError, match=r"testing_criteria\[0\]: reward_model graders"):
            testing_criteria([grader], allow_python=True)


def test_a_reward_model_starts_from_an_sft_runs_merged_adapter(tiny_model_dir, triage_data, preference_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft = tmp_path / "sft"
    train(tiny_run_config(tiny_model_dir, triage_data, sft, max_steps=2, learning_rate=1e-2), progress=False)
    cfg = reward_config(sft, preference_data, tmp_path / "rm", max_steps=2, learning_rate=1e-3)
    cfg["lora"]["target_modules"] = ["v_proj"]  # the MLPs change through the SFT adapter alone
    result = train(cfg, progress=False)
    tuned = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weight = "layers.0.mlp.down_proj.weight"
    assert not torch.equal(tuned.model.get_parameter(weight), base.model.get_parameter(weight))


def test_a_reward_model_is_refused_by_every_command_that_loads_a_language_model_naming_the_grader(
    tokenizer, tiny_model_dir, tmp_path
):
    """chat, serve, eval, distill generate and distill init refuse it where they load their model, in the loader they
    share (`load_text_model`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from tuneforge.chat import chat_command
    from tuneforge.distill.student import init_student
    from tuneforge.distill.teacher_data import generate_teacher_data
    from tuneforge.eval.evaluate import evaluate
    from tuneforge.serve.adapters import AdapterPool

    full = tmp_path / "rm_full"
    tiny_classifier(tokenizer).save_pretrained(full)
    tokenizer.save_pretrained(full)
    adapter = tmp_path / "rm_lora"
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    get_peft_model(classifier, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    data = tmp_path / "eval.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(row) + "\n")
    sampling = {"system": None, "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0}
    attempts = {
        "chat": lambda model: chat_command(str(model), **sampling),
        "eval": lambda model: evaluate(str(model), data, progress=False),
        "serve": lambda model: AdapterPool(str(model)),
        "distill generate": lambda model: generate_teacher_data(
            str(model), data, tmp_path / "out.jsonl", progress=False
        ),
        "distill init": lambda model: init_student(str(model), tmp_path / "student", every=2),
    }
    for model in (full, adapter):
        for command, attempt in attempts.items():
            with pytest.raises(TuneforgeError, match=f"reward model.*tuneforge {command}.*--grader") as err:
                attempt(model)
            assert err.value.code == "reward_model_not_generator"
            assert '"type": "reward_model"' in str(err.value)
    with pytest.raises(TuneforgeError, match="reward model") as err:
        AdapterPool(str(tiny_model_dir), {"rm": str(adapter)})
    assert err.value.code == "reward_model_not_generator"


def test_an_exports_check_of_a_reward_model_compares_its_scores_not_next_tokens(tokenizer):
    from tuneforge.exporting.probe import ExportFailed, agreement, probe_ids, probe_logits, require_within

    reference = probe_logits(tiny_classifier(tokenizer), probe_ids(tokenizer))
    measured = agreement(reference, [scores + 0.5 for scores in reference])
    assert measured.described(1e-3, 0.9) == "largest score difference 0.5 (bound 0.001)"
    with pytest.raises(ExportFailed, match=r"merged model: largest score difference 0.5 \(bound 0.001\)\. ") as err:
        require_within(measured, 1e-3, "The merged model", 0.9)
    assert "next token" not in str(err.value)


def test_a_lora_reward_model_on_a_base_without_a_config_pad_token_scores_where_training_did(preference_data, tmp_path):
    """Llama 3's config has no pad token and its tokenizer pads with <|eot_id|>, the token each reply ends with:
    training scores a reply at its last token that is not the pad token, and so do the grader and the export."""
    from families import FAMILIES, save_family_model
    from transformers import AutoConfig

    from tuneforge.data import Message, Preference, render_preference
    from tuneforge.graders import load_grader, sample_of
    from tuneforge.models import load_model, load_tokenizer, resolve

    base = save_family_model(FAMILIES["llama3"], tmp_path / "llama3")
    assert AutoConfig.from_pretrained(base).pad_token_id is None
    run = tmp_path / "rm"
    train(reward_config(base, preference_data, run, max_steps=2, learning_rate=1e-2), progress=False)
    tokenizer = load_tokenizer(run / "final")
    assert tokenizer.pad_token == "<|eot_id|>"

    prompt, answer = "My database is down", '{"category": "outage"}'
    chosen, _ = render_preference(
        Preference([Message("user", prompt)], Message("assistant", answer), Message("assistant", "Hello!")), tokenizer
    )
    assert chosen.input_ids[-1] == tokenizer.pad_token_id  # the reply ends with the pad token
    model = load_model(resolve(str(run / "final"))).eval()
    assert model.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        trained = reward.example_rewards(
            model,
            torch.tensor([list(chosen.input_ids)]),
            torch.tensor([list(chosen.labels)]),
            pad_id=tokenizer.pad_token_id,
        )
    grader = load_grader({"type": "reward_model", "name": "rm", "model": str(run / "final")})
    (graded,) = grader.grade([sample_of(answer)], [{"prompt": prompt}])
    assert graded.score == pytest.approx(float(trained[0]), abs=1e-5)
    # The merged export keeps the pad token, so transformers (TRL, vLLM) score it there too.
    export(run, "merged", None, tmp_path / "merged", progress=False)
    assert AutoConfig.from_pretrained(tmp_path / "merged").pad_token_id == tokenizer.pad_token_id


def test_a_reward_model_as_the_base_of_a_run_that_trains_a_language_model_is_refused_naming_base_model(
    tokenizer, preference_data, tmp_path
):
    """A reward model's folder has a score head and no output layer: a DPO policy started from it would train
    from a new or tied output layer without a word."""
    from test_dpo import dpo_config

    rm = tmp_path / "rm"
    tiny_classifier(tokenizer).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    with pytest.raises(TuneforgeError, match=r"^base_model\b.*is a reward model .*reward_model") as err:
        train(dpo_config(rm, preference_data, tmp_path / "dpo", max_steps=1), progress=False)
    assert err.value.code == "reward_model_not_generator" and not (tmp_path / "dpo" / "final").exists()


def test_a_rows_margin_is_subtracted_inside_the_loss_and_rows_without_one_train_as_before(
    tiny_model_dir, preference_data, tokenizer, tmp_path
):
    from tuneforge.data import prepare

    rows = [json.loads(line) for line in preference_data["train"].read_text().splitlines()][:3]
    margins = [1.5, 0, -0.25]
    with_margins = tmp_path / "margins.jsonl"
    with_margins.write_text("".join(json.dumps({**r, "margin": m}) + "\n" for r, m in zip(rows, margins)))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_classifier(tokenizer)
    objective = reward.RewardObjective(model, pad_id=tokenizer.pad_token_id)

    def sums_and_scores(path):
        cfg = load_config(reward_config(tiny_model_dir, {**preference_data, "train": path}, tmp_path / "rm"))
        pairs = prepare(cfg.data, tokenizer, use_cache=False, log=lambda *a: None).train_pairs
        batch = collate(to_rows(dpo.rows(pairs), cfg), tokenizer.pad_token_id)
        with torch.no_grad():
            scores = [
                [float(model(input_ids=torch.tensor([list(e.input_ids)])).logits[0, 0]) for e in pair] for pair in pairs
            ]
            return pairs, batch, objective(**batch), scores

    pairs, batch, sums, scores = sums_and_scores(with_margins)
    assert [chosen.margin for chosen, _ in pairs] == margins  # each pair's, carried through packing's order
    cfg = load_config(reward_config(tiny_model_dir, {**preference_data, "train": with_margins}, tmp_path / "rm"))
    for _ in range(2):  # written to the data cache, then read back from it
        cached = prepare(cfg.data, tokenizer, log=lambda *a: None).train_pairs
        assert [chosen.margin for chosen, _ in cached] == margins
    assert sorted(batch["margin"].tolist()) == sorted(margins)
    expected = sum(-F.logsigmoid(torch.tensor(c - r - m)).item() for (c, r), m in zip(scores, margins))
    assert sums["loss"].item() == pytest.approx(expected, rel=1e-4)
    # The logged margin is the pair's reward difference, not less the row's margin.
    assert float(sums["margin"]) == pytest.approx(sum(c - r for c, r in scores), rel=1e-4, abs=1e-5)

    _, batch, sums, scores = sums_and_scores(plain)
    assert "margin" not in batch
    assert sums["loss"].item() == pytest.approx(sum(-F.logsigmoid(torch.tensor(c - r)).item() for c, r in scores))


@pytest.mark.parametrize("margin", ["wide", True, None, [1.0]])
def test_a_margin_that_is_no_number_is_refused_with_its_file_line_and_field(tmp_path, margin):
    from tuneforge.data import read_conversations

    path = tmp_path / "pairs.jsonl"
    row = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "margin": margin}) + "\n")
    problems = [item for _, item in read_conversations(path) if not hasattr(item, "chosen")]
    if margin is None:  # null: the row gives no margin
        assert problems == []
        return
    assert [(p.line, p.field, p.code) for p in problems] == [(2, "margin", "data_type")]
    assert "'margin' must be a finite number" in problems[0].message


def test_eval_of_a_reward_model_measures_its_ranking_of_held_out_pairs_as_its_run_did(
    tiny_model_dir, preference_data, tmp_path, capsys
):
    from tuneforge.errors import ConfigError
    from tuneforge.eval import eval_command

    run = tmp_path / "run"
    cfg = reward_config(tiny_model_dir, preference_data, run, max_steps=2, learning_rate=5e-3, save_every=2)
    summary = train(cfg, progress=False).metrics
    export(run, "merged", None, tmp_path / "merged", progress=False)
    validation = preference_data["validation"]
    capsys.readouterr()  # what training and the export printed

    def measured(model, **options):
        assert eval_command(str(model), str(validation), json_out=True, **options) == 0
        return json.loads(capsys.readouterr().out)

    result = measured(run, out=str(tmp_path / "scores"))
    # The run's own validation figures: the same pairs, scored where training scored them.
    assert result["accuracy"] == pytest.approx(summary["full_valid_accuracy"])
    assert result["margin"]["mean"] == pytest.approx(summary["full_valid_margin"], rel=1e-4, abs=1e-6)
    assert result["loss"] == pytest.approx(summary["full_valid_loss"], rel=1e-4)
    margins = [s["margin"] for s in result["samples"]]
    assert result["margin"]["median"] == pytest.approx(statistics.median(margins))
    assert result["ties"] == sum(m == 0 for m in margins)
    lines = [json.loads(line) for line in (tmp_path / "scores" / "scores.jsonl").read_text().splitlines()]
    assert [(s["line"], s["chosen_score"], s["rejected_score"]) for s in lines] == [
        (s["line"], s["chosen_score"], s["rejected_score"]) for s in result["samples"]
    ]
    assert (tmp_path / "scores" / "margins.png").read_bytes()[:4] == b"\x89PNG"
    # A checkpoint and the merged export score the pairs as the run's final model does.
    for model in (run / "checkpoints" / "step-2", tmp_path / "merged"):
        other = measured(model)
        assert [s["chosen_score"] for s in other["samples"]] == pytest.approx(
            [s["chosen_score"] for s in result["samples"]], abs=1e-4
        )

    # A bad row is refused with its file, line and field; chat rows and the options of answers are refused.
    rows = validation.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(rows[0] + "\n" + json.dumps({**json.loads(rows[1]), "chosen": 3}) + "\n")
    with pytest.raises(TuneforgeError, match=r"bad\.jsonl:2 chosen"):
        eval_command(str(run), str(bad), json_out=True)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": json.loads(rows[0])["prompt"] + json.loads(rows[0])["chosen"]}) + "\n")
    with pytest.raises(TuneforgeError, match="evaluated on preference pairs, but this file holds chat data"):
        eval_command(str(run), str(chat), json_out=True)
    with pytest.raises(ConfigError, match="--compare, --grader do not apply"):
        eval_command(str(run), str(validation), compare=str(tiny_model_dir), grader="g.yaml", json_out=True)


def test_loading_a_reward_model_logs_no_tensor_parallel_plan(tiny_model_dir):
    """transformers checks a model's tensor-parallel plan where its load report is quieted and names the layers
    it would not shard (the new score head among them): a multi-GPU fact, for a model tuneforge loads whole."""
    import logging

    from tuneforge.models import load_model, resolve

    said = []
    handler = logging.Handler()
    handler.emit = said.append
    logger = logging.getLogger("transformers.distributed.tensor_parallel")
    logger.addHandler(handler)
    try:
        load_model(resolve(str(tiny_model_dir)), classifier=True)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in said if "not sharded" in r.getMessage()]


def test_eval_of_a_reward_model_refuses_pairs_with_images_by_line_and_field(tmp_path):
    """A reward model on a vision model (its tokenizer renders image parts) scores tokens alone: a pair whose prompt
    holds an image is refused with its file, line and field before any weights load, not run as bare image tokens."""
    from families import png_data_url, save_gemma3_vision_model
    from transformers import AutoModelForSequenceClassification

    from tuneforge.eval import eval_command

    base = save_gemma3_vision_model(tmp_path / "base")
    rm = tmp_path / "rm"
    shutil.copytree(base, rm)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(rm)
    image = {"type": "image_url", "image_url": {"url": png_data_url((220, 20, 20))}}
    rows = [
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."},
        {
            "prompt": [{"role": "user", "content": [{"type": "text", "text": "Colour?"}, image]}],
            "chosen": [{"role": "assistant", "content": "Red."}],
            "rejected": [{"role": "assistant", "content": "Blue."}],
        },
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (rm / "model.safetensors").write_bytes(b"")  # a refusal before loading never reads the weights
    with pytest.raises(TuneforgeError, match=r"pairs\.jsonl:2 prompt\[0\]\.content: \[images_not_read\] .*text only"):
        eval_command(str(rm), str(pairs), json_out=True)


def test_eval_of_a_reward_model_names_a_missing_pairs_file_as_missing(tmp_path):
    """A mistyped path is said not to exist, not to hold rows of no known format."""
    from tuneforge.eval.reward import read_pairs

    with pytest.raises(TuneforgeError, match=r"nosuch\.jsonl does not exist\. Check the path\.") as err:
        read_pairs(tmp_path / "nosuch.jsonl")
    assert err.value.code == "file_not_found"


@pytest.mark.parametrize("where", ["notes.txt", "notes.txt/scores"])
def test_eval_of_a_reward_model_refuses_an_out_that_is_a_file_before_its_weights_load(tokenizer, tmp_path, where):
    """--out names a file (or a folder under one): refused, naming it, before the weights load, as for
    multiple-choice questions; the file is kept."""
    from tuneforge.errors import ConfigError
    from tuneforge.eval import eval_command

    rm = tmp_path / "rm"
    tiny_classifier(tokenizer).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    (rm / "model.safetensors").write_bytes(b"")  # a refusal before loading never reads the weights
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}) + "\n")
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(ConfigError, match=f"--out {tmp_path / where}: {taken} is a file, not a folder"):
        eval_command(str(rm), str(pairs), out=str(tmp_path / where), json_out=True)
    assert taken.read_text() == "mine"


def test_a_reward_report_is_written_whole_and_never_over_a_folder_of_other_files(tmp_path, monkeypatch):
    """A write stopped between scores.jsonl and margins.png leaves the earlier report as it was, not a new
    scores.jsonl beside an old histogram; the folder is replaced whole, so one holding other files is refused."""
    from tuneforge.errors import ConfigError
    from tuneforge.eval import reward

    def result(margin: float) -> dict:
        sample = {"line": 1, "chosen_score": margin, "rejected_score": 0.0, "margin": margin}
        return {"n": 1, "accuracy": float(margin > 0), "samples": [sample]}

    out = tmp_path / "report"
    files = reward.write_scores(out, result(1.0))
    before = {name: (out / name).read_bytes() for name in ("scores.jsonl", "margins.png")}
    assert sorted(files) == ["margins_plot", "scores"] and all(before.values())

    def stopped(result):
        raise KeyboardInterrupt

    monkeypatch.setattr(reward, "margins_figure", stopped)
    with pytest.raises(KeyboardInterrupt):
        reward.write_scores(out, result(-2.0))
    assert {name: (out / name).read_bytes() for name in before} == before
    monkeypatch.undo()
    reward.write_scores(out, result(-2.0))
    assert json.loads((out / "scores.jsonl").read_text())["margin"] == -2.0

    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"--out {out} holds notes\.txt, .*a folder of its own"):
        reward.evaluate_reward_model("no-such-model", tmp_path / "pairs.jsonl", out=out)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_reward_report_into_a_mount_point_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """A mounted volume (a container's /out) cannot be renamed away to swap the report in: refused before the
    model is even looked up, pointing at a folder inside it, not after every pair is scored."""
    from types import SimpleNamespace

    import psutil

    from tuneforge.errors import ConfigError
    from tuneforge.eval import reward

    volume = tmp_path / "volume"
    volume.mkdir()
    partitions = psutil.disk_partitions(all=True)
    bound = SimpleNamespace(device="/srv/reports", mountpoint=str(volume), fstype="none", opts="rw,bind")
    monkeypatch.setattr(psutil, "disk_partitions", lambda all=False: [*partitions, bound])
    with pytest.raises(ConfigError, match=rf"--out {volume} is a mount point.*--out {volume / 'reward'}"):
        reward.evaluate_reward_model("no-such-model", tmp_path / "pairs.jsonl", out=volume)
    assert list(volume.iterdir()) == []
