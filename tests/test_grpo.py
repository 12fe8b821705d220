"""GRPO on the tiny model: group advantages, the loss and its normalisation, KL to the reference,
sampling inside the step, exact resume, and graders that fail before any training."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from families import CLOCK_TOOL, WEATHER_TOOL

from tuneforge.config import load_config
from tuneforge.dashboard.runs import reward_chart
from tuneforge.data.prepare import PiiScreen, SystemPromptTally
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.eval.report import rollouts_table
from tuneforge.generate import Completion, generate
from tuneforge.graders import build_grader
from tuneforge.methods import build_objective, prepare_items, prepare_model
from tuneforge.methods.grpo import STD_FLOOR, load_grader, read_prompts
from tuneforge.models import load_model, load_tokenizer
from tuneforge.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

# Rewards an answer that opens like the demo's JSON: a tiny random model sometimes does, so groups differ.
BRACE = {
    "type": "string_check",
    "name": "brace",
    "input": "{{ sample.output_text }}",
    "reference": "{",
    "operation": "like",
}


def grpo_config(model_dir, data, out, *, grader=BRACE, loss="grpo", beta=0.04, **train_options) -> dict:
    cfg = tiny_run_config(model_dir, data, out, **{"batch_size": 4, "max_steps": 2, **train_options})
    cfg["method"] = "grpo"
    cfg["grpo"] = {"grader": grader, "group_size": 4, "max_new_tokens": 8, "loss": loss, "beta": beta}
    return cfg


def objective_for(model_dir, data, tmp_path, **options):
    """The objective and prompt rows of a run, without dropout: two forwards of a batch compute the same."""
    raw = grpo_config(model_dir, data, tmp_path / "run", **options)
    raw["lora"]["dropout"] = 0.0
    cfg = load_config(raw)
    tokenizer = load_tokenizer(str(model_dir))
    model = prepare_model(load_model(str(model_dir)), cfg)
    objective = build_objective(model, cfg, tokenizer, dtype=torch.float32, device=torch.device("cpu"))
    return objective, prepare_items(cfg, tokenizer).train, cfg


def completions(texts_and_ids):
    return [Completion(text, 0, len(ids), "stop", tuple(ids)) for text, ids in texts_and_ids]


def graded_batch(objective, rows, answers, answers_per_token):
    """The answers graded, and every one of them as the batch that trains them."""
    group = objective._grade(rows, answers)
    return group, objective._batch(group, list(range(len(answers))), answers_per_token, sampled_scale=1.0)


def test_advantages_are_the_rewards_against_their_group(tiny_model_dir, triage_data, tmp_path):
    objective, rows, _ = objective_for(tiny_model_dir, triage_data, tmp_path)
    answers = completions([("{", [5]), ("no", [6, 7]), ("no", [6]), ("{ yes", [5, 8, 9])] * 2)
    group, batch = graded_batch(objective, rows[:2], answers, answers_per_token=0.5)
    assert group.rewards.tolist() == [1, 0, 0, 1] * 2
    expected = 0.5 / (0.5 + STD_FLOOR)  # mean 0.5, std 0.5 in each group of four
    assert torch.allclose(batch["advantages"], torch.tensor([expected, -expected, -expected, expected] * 2))
    # grpo: each answer's mean token loss
    assert torch.allclose(batch["token_weights"], torch.tensor([1, 1 / 2, 1, 1 / 3] * 2))
    assert group.parts[:, 0].tolist() == group.rewards.tolist()
    # Each answer trains its own tokens, after its prompt.
    trained = [row[row != -100].tolist() for row in batch["labels"]]
    assert trained[:4] == [[5], [6, 7], [6], [5, 8, 9]]

    objective.options = objective.options.model_copy(update={"loss": "dr_grpo"})
    _, batch = graded_batch(objective, rows[:2], answers, answers_per_token=0.5)
    assert batch["advantages"].tolist() == [0.5, -0.5, -0.5, 0.5] * 2  # not scaled by the std
    assert torch.allclose(batch["token_weights"], torch.full((8,), 1 / 8))  # 1 / max_new_tokens
    objective.options = objective.options.model_copy(update={"loss": "dapo"})
    assert graded_batch(objective, rows[:2], answers, 0.5)[1]["token_weights"].tolist() == [0.5] * 8


def test_the_loss_is_the_policy_gradient_and_kl_is_zero_at_the_start(tiny_model_dir, triage_data, tmp_path):
    objective, rows, _ = objective_for(tiny_model_dir, triage_data, tmp_path)
    answers = completions([("{", [5, 6]), ("no", [7]), ("no", [8, 9, 10]), ("{", [11])])
    _, batch = graded_batch(objective, rows[:1], answers, answers_per_token=1.0)
    sums = objective(**batch)
    # A fresh adapter is the reference: KL is exactly 0, and the loss's value is -sum(A_i * w_i * n_i).
    assert sums["kl"].item() == 0
    lengths = torch.tensor([2.0, 1, 3, 1])
    assert torch.isclose(sums["loss"], -(batch["advantages"] * batch["token_weights"] * lengths).sum(), atol=1e-6)
    assert sums["reward"].item() == 2 and sums["completion_length"].item() == 7

    # Its gradient is that of -sum(A_i * w_i * log pi(answer tokens)).
    sums["loss"].backward()
    got = {n: p.grad.clone() for n, p in objective.model.named_parameters() if p.requires_grad}
    objective.model.zero_grad()
    from tuneforge.methods.sft import token_cross_entropy, trained_hidden
    from tuneforge.models import causal_lm

    lm = causal_lm(objective.model)
    labels = batch["labels"]
    logp = -token_cross_entropy(lm, trained_hidden(lm, batch["input_ids"], labels), labels[labels != -100])[0]
    row = (labels != -100).nonzero()[:, 0]
    (-(batch["advantages"][row] * batch["token_weights"][row] * logp).sum()).backward()
    for name, p in objective.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[name], p.grad, atol=1e-6), name


def test_kl_is_the_k3_estimate_against_the_disabled_adapter(tiny_model_dir, triage_data, tmp_path):
    objective, rows, _ = objective_for(tiny_model_dir, triage_data, tmp_path)
    with torch.no_grad():
        for name, p in objective.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    answers = completions([("a", [5, 6]), ("b", [7]), ("c", [8, 9, 10]), ("d", [11])])
    _, batch = graded_batch(objective, rows[:1], answers, answers_per_token=1.0)
    kl = objective(**batch)["kl"].item()
    from tuneforge.methods.sft import reference_lm, token_cross_entropy, trained_hidden
    from tuneforge.models import causal_lm

    labels = batch["labels"]
    targets = labels[labels != -100]
    with torch.no_grad():
        lm = causal_lm(objective.model)
        logp = -token_cross_entropy(lm, trained_hidden(lm, batch["input_ids"], labels), targets)[0]
        with reference_lm(objective.model, []) as ref:
            ref_logp = -token_cross_entropy(ref, trained_hidden(ref, batch["input_ids"], labels), targets)[0]
    q = ref_logp - logp
    per_token = torch.exp(q) - q - 1
    row = (labels != -100).nonzero()[:, 0]
    per_answer = torch.zeros(4).index_add(0, row, per_token) / torch.tensor([2.0, 1, 3, 1])
    assert kl > 0 and abs(kl - per_answer.sum().item()) < 1e-5


def test_dapo_weights_make_the_step_a_mean_over_every_token(tiny_model_dir, triage_data, tmp_path):
    objective, rows, _ = objective_for(tiny_model_dir, triage_data, tmp_path, loss="dapo")
    micro = objective.make_batches([rows[:1], rows[1:2]], step=0, rank=0, all_sum=lambda t: t)
    answers = sum(objective.count(b) for b in micro)
    tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
    weighted = sum(float((b["token_weights"][:, None] * (b["labels"] != -100)).sum()) for b in micro)
    # The loop divides the step's summed loss by its answers: the weights turn that into a per-token mean.
    assert answers == 8 and weighted == pytest.approx(answers) and tokens > answers


def test_uniform_groups_are_skipped_and_the_rewards_still_cover_every_answer(tiny_model_dir, triage_data, tmp_path):
    objective, rows, _ = objective_for(tiny_model_dir, triage_data, tmp_path)
    alike = [("{", [5])] * 4  # every answer scores 1: zero advantages
    mixed = [("{", [5]), ("no", [6]), ("no", [7]), ("{", [8])]
    assert objective._trained_groups(objective._grade(rows[:2], completions(alike + mixed))) == list(range(8))
    objective.options = objective.options.model_copy(update={"skip_uniform_groups": True})
    assert objective._trained_groups(objective._grade(rows[:2], completions(alike + mixed))) == [4, 5, 6, 7]
    # A micro-batch of alike groups only still trains one, so every process runs every micro-batch.
    assert objective._trained_groups(objective._grade(rows[:2], completions(alike + alike))) == [0, 1, 2, 3]

    graded = []  # every answer the step samples, as graded
    grade = objective._grade
    objective._grade = lambda prompt_rows, answers: graded.append(grade(prompt_rows, answers)) or graded[-1]
    micro = objective.make_batches([rows[:2], rows[2:4]], step=0, rank=0, all_sum=lambda t: t)
    trained = sum(objective.count(b) for b in micro)
    sampled = torch.cat([g.rewards for g in graded])
    for group, batch in zip(graded, micro):
        kept = objective._trained_groups(group)
        assert batch["advantages"].tolist() == group.advantages[kept].tolist()
    # The loop divides each sum by the answers that trained: the rewards come out as the mean of all sampled.
    with torch.no_grad():
        means = step_means(objective, micro)
    assert means["reward"] == pytest.approx(sampled.mean().item())
    assert means["trained_share"] == pytest.approx(trained / len(sampled))


def test_sampling_is_seeded_by_step_and_batch(tiny_model_dir, triage_data, tmp_path):
    objective, rows, _ = objective_for(tiny_model_dir, triage_data, tmp_path)

    def answers(step, index=0):
        batches = objective.make_batches([rows[:1]] * (index + 1), step=step, rank=0, all_sum=lambda t: t)
        return batches[index]["input_ids"].tolist()

    assert answers(3) == answers(3)
    assert answers(3) != answers(4)
    assert answers(3, index=1) != answers(3)
    assert objective.model.training  # sampling ran in eval mode and handed the model back as it was


def test_a_grpo_run_logs_rewards_and_resumes_exactly(tiny_model_dir, triage_data, tmp_path):
    cfg = grpo_config(
        tiny_model_dir, triage_data, tmp_path / "ref", max_steps=4, save_every=2, eval_every=2, learning_rate=5e-2
    )
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "rollouts.jsonl").write_text('{"step": 9, "answers": []}\n')  # a fresh run starts it over
    train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    assert len(steps) == 4
    for record in steps:
        assert {"reward", "reward_std", "reward/brace", "kl", "completion_length"} <= set(record)
        assert 0 <= record["reward"] <= 1 and 1 <= record["completion_length"] <= 8
    assert steps[-1]["kl"] > 0  # the policy moved away from the reference
    assert "valid_reward" in steps[1] and "valid_reward/brace" in steps[1] and "valid_reward" not in steps[0]
    assert "full_valid_reward" in records[-1]
    # Each step's first group, as the report shows it: four answers with their rewards and advantages.
    rollouts = [json.loads(line) for line in (tmp_path / "ref" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [1, 2, 3, 4]
    assert all(len(r["answers"]) == 4 and all(0 <= a["reward"] <= 1 for a in r["answers"]) for r in rollouts)
    assert len(rollouts_table(tmp_path / "ref").rows) == 12  # the last three steps
    assert reward_chart(records).count("<svg") == 2  # the dashboard's reward and KL curves

    assert_resumes_exactly(cfg, tmp_path / "ref", tmp_path / "cut")


def assert_resumes_exactly(cfg: dict, ref: Path, cut: Path) -> None:
    """A copy of the finished 4-step run `ref` cut after step 2 (its checkpoint, the config and the log up to
    there) and resumed logs the same metrics and writes the same rollouts: the steps after the checkpoint sample
    again, in place of the cut run's records of them."""
    shutil.copytree(ref, cut)
    shutil.rmtree(cut / "checkpoints" / "step-4")
    shutil.rmtree(cut / "final")
    train({**cfg, "output_dir": str(cut)}, resume="latest", progress=False)
    drop = ("tokens_per_s", "elapsed")

    def logged(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]

    assert logged(cut) == logged(ref)
    assert (cut / "rollouts.jsonl").read_text() == (ref / "rollouts.jsonl").read_text()


def test_validation_grades_the_greedy_answers_to_every_validation_prompt(base_dir, triage_data, tmp_path):
    # A grader whose scores vary with the answer and the item, so the mean checks what was graded; the sharp tiny
    # model's answers differ in length from prompt to prompt, so the score depends on the item each is graded on.
    source = "def grade(sample, item):\n    return (len(sample['output_text']) + len(item['reference'])) % 7 / 6\n"
    lengths = {"type": "python", "name": "lengths", "source": source}
    cfg = grpo_config(base_dir, triage_data, tmp_path / "run", grader=lengths, max_steps=1)
    metrics = train(cfg, progress=False).metrics
    rows = prepare_items(load_config(cfg), load_tokenizer(str(base_dir))).valid
    assert len(rows) > 1
    final = tmp_path / "run" / "final"
    prompts = [tuple(r.input_ids) for r in rows]
    answers = generate(load_model(str(final)), load_tokenizer(str(final)), prompts, max_new_tokens=8)
    expected = sum((len(a.text) + len(r.item["reference"])) % 7 / 6 for a, r in zip(answers, rows)) / len(rows)
    assert 0 < expected < 1
    assert len({len(a.text) for a in answers}) > 1
    assert (
        metrics["full_valid_reward"] == pytest.approx(expected) == pytest.approx(metrics["full_valid_reward/lengths"])
    )


def test_a_validation_fraction_holds_out_training_prompts(tiny_model_dir, triage_data, tmp_path):
    raw = grpo_config(tiny_model_dir, triage_data, tmp_path / "run")
    raw["data"]["validation"] = 0.25
    data = prepare_items(load_config(raw), load_tokenizer(str(tiny_model_dir)))
    total = sum(1 for _ in open(triage_data["train"], encoding="utf-8"))
    assert len(data.valid) == round(0.25 * total) and len(data.train) + len(data.valid) == total
    assert not {r.where for r in data.valid} & {r.where for r in data.train}
    assert data.report["counts"]["validation"] == len(data.valid)


def test_a_grader_that_fails_stops_the_run_before_training(tiny_model_dir, triage_data, tmp_path):
    broken = {"type": "python", "name": "strict", "source": "def grade(sample, item):\n    return item['nope']\n"}
    with pytest.raises(TuneforgeError, match="strict") as error:
        train(grpo_config(tiny_model_dir, triage_data, tmp_path / "run", grader=broken), progress=False)
    assert "nope" in error.value.message
    assert f"The sample answers the prompt at {triage_data['validation']}:1." in error.value.message
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_grade_that_fails_during_training_names_the_prompt_row(tiny_model_dir, triage_data, tmp_path):
    # Passes the check (empty answers), then fails on the sixth sampled answer: the second prompt's group.
    source = (
        "graded = []\n"
        "def grade(sample, item):\n"
        "    graded.append(sample['output_text'])\n"
        "    if sample['output_text'] and len(graded) == 6:\n"
        "        raise ValueError(item['reference'])\n"
        "    return 0.0\n"
    )
    grader = {"type": "python", "name": "sixth", "source": source}
    with pytest.raises(TuneforgeError) as error:
        train(grpo_config(tiny_model_dir, triage_data, tmp_path / "run", grader=grader), progress=False)
    found = re.search(
        rf"The sample answers the prompt at {re.escape(str(triage_data['train']))}:(\d+)\.", error.value.message
    )
    assert found, error.value.message
    row = json.loads(triage_data["train"].read_text().splitlines()[int(found[1]) - 1])
    assert f"ValueError: {row['messages'][-1]['content']}" in error.value.message


def test_a_row_without_a_field_the_grader_reads_stops_the_run_before_training(tiny_model_dir, triage_data, tmp_path):
    # The field is missing from a row past the first ones the grader is tried on, and inside a multi grader.
    files = {}
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in triage_data[split].read_text().splitlines()]
        for row in rows:
            row["answer"] = json.loads(row["messages"][-1]["content"])["category"]
        if split == "train":
            del rows[40]["answer"]
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = files["train"]
    exact = {**BRACE, "name": "cat", "reference": "{{ item.answer }}", "operation": "eq"}
    grader = {"type": "multi", "name": "all", "graders": {"brace": BRACE, "cat": exact}, "calculate_output": "cat"}
    cfg = grpo_config(tiny_model_dir, files, tmp_path / "run", grader=grader)
    with pytest.raises(TuneforgeError, match="reads item.answer, which the item does not have") as error:
        train(cfg, progress=False)
    assert f"The sample answers the prompt at {data}:41." in error.value.message
    # The fields listed are those a grade reads: the row's, and the prompt TRL-style reward functions take too.
    assert re.search(r"its fields: [^)]*\bprompt\b", error.value.message), error.value.message
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
    # A template reading the prompt is checked against every row as it is graded, with it.
    quoted = {**BRACE, "name": "quoted", "input": "{{ item.prompt }}"}
    cfg = load_config(grpo_config(tiny_model_dir, files, tmp_path / "run", grader=quoted))
    assert prepare_items(cfg, load_tokenizer(str(tiny_model_dir)), log=lambda *a: None).train


def test_grpo_options_that_cannot_work_are_refused(tiny_model_dir, triage_data, tmp_path):
    cfg = grpo_config(tiny_model_dir, triage_data, tmp_path / "run")
    assert load_config(cfg).data.packing is False  # each prompt is sampled from on its own
    with pytest.raises(ConfigError, match="data.packing to false"):
        load_config({**cfg, "data": {**cfg["data"], "packing": True}})
    with pytest.raises(ConfigError, match="grpo.grader"):
        load_config({**cfg, "grpo": {}})
    with pytest.raises(ConfigError, match="general_mix"):
        load_config({**cfg, "data": {**cfg["data"], "general_mix": 0.1}})
    # TRL's GRPOConfig names, which no spelling match would find.
    with pytest.raises(ConfigError, match="num_generations: unknown key. tuneforge calls it grpo.group_size"):
        load_config({**cfg, "grpo": {**cfg["grpo"], "num_generations": 8}})
    with pytest.raises(ConfigError, match="max_completion_length: unknown key. tuneforge calls it grpo.max_new_tokens"):
        load_config({**cfg, "grpo": {**cfg["grpo"], "max_completion_length": 64}})
    with pytest.raises(TuneforgeError, match="score_model"):
        build_grader({"type": "score_model", "name": "judge"})
    no_reference = tmp_path / "grader.yaml"
    no_reference.write_text("type: string_check\nname: exact\ninput: '{{ sample.output_text }}'\noperation: eq\n")
    with pytest.raises(TuneforgeError) as error:
        load_grader(load_config({**cfg, "grpo": {**cfg["grpo"], "grader": str(no_reference)}}))
    assert error.value.message.startswith(f'grpo.grader ({no_reference}): grader "exact" (string_check): `reference`')
    # A TRL reward file without its function: the message names the FILE.py:FUNCTION form and the python grader.
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def correct(prompts, completions, answer, **kwargs):\n"
        "    return [float(a in c) for c, a in zip(completions, answer)]\n"
    )
    with pytest.raises(
        ConfigError,
        match=r"rewards\.py is Python source; name the reward function in it as .*rewards\.py:FUNCTION.*"
        r"grade\(sample, item\) -> float",
    ):
        load_grader(load_config({**cfg, "grpo": {**cfg["grpo"], "grader": str(rewards)}}))


def test_prompt_rows_are_checked_with_file_line_and_field(tiny_model_dir, triage_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": "x"})
        + "\n"
        + json.dumps({"messages": [{"role": "assistant", "content": "only a reply"}]})
        + "\n"
        + json.dumps({"question": "neither messages nor a prompt"})
        + "\n"
    )
    cfg = load_config(grpo_config(tiny_model_dir, {**triage_data, "train": bad, "validation": None}, tmp_path / "r"))
    with pytest.raises(TuneforgeError) as error:
        prepare_items(cfg, load_tokenizer(str(tiny_model_dir)))
    assert f"{bad}:2 messages" in error.value.message and f"{bad}:3 messages" in error.value.message
    skipped = load_config({**cfg.model_dump(), "data": {**cfg.data.model_dump(), "on_error": "skip"}})
    [row] = prepare_items(skipped, load_tokenizer(str(tiny_model_dir))).train
    assert row.item == {"answer": "x"} and row.messages == [{"role": "user", "content": "hi"}]


def test_prompts_come_from_prompt_rows_and_from_the_json_cells_of_a_csv(tiny_model_dir, triage_data, tmp_path):
    """TRL's prompt rows (text, or messages) and a spreadsheet's JSON cells, read as training reads them."""
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        json.dumps({"prompt": "Say hi", "reference": "hi"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "Say bye"}], "reference": "bye"})
        + "\n"
    )
    sheet = tmp_path / "prompts.csv"
    chat = json.dumps([{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}])
    sheet.write_text('messages,source\n"' + chat.replace('"', '""') + '",sheet\n')
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for path, expected in (
        (rows, [("Say hi", {"reference": "hi"}), ("Say bye", {"reference": "bye"})]),
        (sheet, [("Say yes", {"source": "sheet", "reference": "yes"})]),
    ):
        cfg = grpo_config(tiny_model_dir, {**triage_data, "train": path}, tmp_path / "r")
        cfg["data"]["validation"] = 0.0
        prepared = prepare_items(load_config(cfg), tokenizer)
        assert [(r.messages[-1]["content"], r.item) for r in prepared.train] == expected


# A TRL reward file: completions come as conversational messages, data columns by name, and a None (not
# applicable) counts 0 in the sum.
TRL_REWARDS = """
import json


def length(prompts, completions, **kwargs):
    assert all(p[-1]["role"] == "user" for p in prompts), prompts
    return [len(c[0]["content"]) / 100 for c in completions]


def even(completions, reference, **kwargs):
    assert all(json.loads(r)["category"] for r in reference)
    return [0.5 if len(c[0]["content"]) % 2 == 0 else None for c in completions]
"""


def test_trl_reward_functions_train_and_log_each_reward(tiny_model_dir, triage_data, tmp_path):
    (tmp_path / "rewards.py").write_text(TRL_REWARDS)
    cfg = grpo_config(tiny_model_dir, triage_data, tmp_path / "run", grader=["rewards.py:length", "rewards.py:even"])
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))  # the reward file is read against the config's folder
    train(load_config(tmp_path / "run.yaml"), progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "reward" in m]
    assert steps and all(m["reward"] == pytest.approx(m["reward/length"] + m["reward/even"]) for m in steps)
    answers = [
        a
        for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()
        for a in json.loads(line)["answers"]
    ]
    expected = [len(a["text"]) / 100 + (0.5 if len(a["text"]) % 2 == 0 else 0) for a in answers]
    assert [a["reward"] for a in answers] == pytest.approx(expected)
    assert len(set(expected)) > 1


def test_trl_reward_functions_see_text_prompts_as_text(tiny_model_dir, triage_data, tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        json.dumps({"prompt": "Say hi", "answer": "hi"}) + "\n" + json.dumps({"prompt": "Say bye", "answer": "bye"})
    )
    (tmp_path / "rewards.py").write_text(
        "def shape(prompts, completions, answer, **kwargs):\n"
        "    assert prompts == ['Say hi', 'Say bye'] and answer == ['hi', 'bye'], (prompts, answer)\n"
        "    assert all(isinstance(c, str) for c in completions), completions\n"
        "    return [0.0 for c in completions]\n"
    )
    cfg = grpo_config(tiny_model_dir, {"train": rows, "validation": rows}, tmp_path / "r", grader="x")
    cfg["grpo"]["grader"] = str(tmp_path / "rewards.py:shape")
    assert len(prepare_items(load_config(cfg), load_tokenizer(str(tiny_model_dir))).train) == 2


@pytest.mark.parametrize(
    ("function", "source", "message"),
    [
        ("nope", "def f(completions, **kwargs):\n    return [1.0] * len(completions)\n", "defines no top-level nope"),
        ("f", "def f(completions, **kwargs):\n    return [1.0 for c in completions\n", "rewards.py:2 does not compile"),
        (
            "f",
            "def f(completions, **kwargs):\n    return [1 / 0 for c in completions]\n",
            "f() raised ZeroDivisionError",
        ),
        ("f", "def f(completions, answer, **kwargs):\n    return [1.0] * len(completions)\n", "columns: reference"),
        ("f", "def f(completions, **kwargs):\n    return [1.0]\n", "returned a list of 1, not a list of 16"),
        ("f", "def f(completions, **kwargs):\n    [1.0] * len(completions)\n", "returned None (NoneType), not a list"),
        ("f", "def f(completions, **kwargs):\n    return [None] * len(completions)\n", "f() gave None"),
        (
            "f",
            "def f(completions, **kwargs):\n    return [float('nan')] * len(completions)\n",
            "gave nan, not a finite",
        ),
    ],
)
def test_trl_reward_functions_that_cannot_work_are_refused_before_training(
    tiny_model_dir, triage_data, tmp_path, function, source, message
):
    (tmp_path / "rewards.py").write_text(source)
    cfg = load_config(
        grpo_config(tiny_model_dir, triage_data, tmp_path / "r", grader=f"{tmp_path}/rewards.py:{function}")
    )
    with pytest.raises(TuneforgeError) as error:
        prepare_items(cfg, load_tokenizer(str(tiny_model_dir)))
    assert message in error.value.message and f"{tmp_path}/rewards.py:{function}" in error.value.message
    if "Traceback" in error.value.message:  # shown only with the lines of the user's file it passed through
        assert 'rewards.py", line ' in error.value.message
    if "compile" not in message and "top-level" not in message:
        assert f"The sample answers the prompt at {triage_data['validation']}:1." in error.value.message


def test_reward_function_lists_and_weights_that_cannot_work_are_refused(tiny_model_dir, triage_data, tmp_path):
    (tmp_path / "rewards.py").write_text("def f(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    for grader, weights, message in (
        ([f"{tmp_path}/rewards.py:f", "f"], None, "grpo.grader[1]: 'f' is no reward function"),
        ([f"{tmp_path}/nope.py:f"], None, "nope.py is no file"),
        ([f"{tmp_path}/rewards.py:f"], [1.0, 2.0], "2 weights for 1 reward functions"),
        (BRACE, [1.0], "grpo.grader_weights weighs TRL-style reward functions"),
    ):
        cfg = grpo_config(tiny_model_dir, triage_data, tmp_path / "r", grader=grader)
        cfg["grpo"]["grader_weights"] = weights
        with pytest.raises(TuneforgeError, match=re.escape(message)):
            load_grader(load_config(cfg))
    cfg = {**tiny_run_config(tiny_model_dir, triage_data, tmp_path / "r"), "grpo": {"grader_weights": [1.0]}}
    with pytest.raises(ConfigError, match="grpo.grader_weights is set, but method: lora"):
        load_config(cfg)


def test_an_inline_grader_that_cannot_work_is_named_by_the_config_file_and_line_that_set_it(tmp_path):
    """A grader object written in the config is named as a config key is, with its file and line, so that an
    error in one of a config's graders points at the line to fix."""
    (tmp_path / "train.jsonl").write_text("{}\n")
    path = tmp_path / "run.yaml"
    path.write_text(
        "method: grpo\ndata:\n  train: train.jsonl\ngrpo:\n  grader:\n    type: json_fields\n"
        '    input: "{{ sample.output_text }}"\n    reference: "{{ item.reference }}"\n    fieldz: [label]\n'
    )
    with pytest.raises(TuneforgeError) as error:
        load_grader(load_config(path))
    assert error.value.message.startswith(
        f'grpo.grader ({path} line 5): grader "json_fields" (json_fields): unknown field(s) fieldz '
        "(did you mean 'fields'?);"
    )


# A constant reward (0.1: eight of them have a float std of 7e-9, not 0) beside one that varies by the answer.
SPREAD_REWARDS = """
def constant(completions, **kwargs):
    return [0.1] * len(completions)


def length(completions, **kwargs):
    return [len(c[0]["content"]) / 100 for c in completions]
"""


def step_means(objective, micro):
    """The step's logged metrics, as the loop makes them: each sum over the answers that trained."""
    trained = sum(objective.count(b) for b in micro)
    sums = [objective(**b) for b in micro]
    return {k: sum(s[k].item() for s in sums) / trained for k in objective.logged_sums}


def test_each_reward_function_logs_its_std_and_the_groups_that_scored_alike(tiny_model_dir, triage_data, tmp_path):
    (tmp_path / "rewards.py").write_text(SPREAD_REWARDS)
    grader = [f"{tmp_path}/rewards.py:constant", f"{tmp_path}/rewards.py:length"]
    objective, rows, _ = objective_for(tiny_model_dir, triage_data, tmp_path, grader=grader)
    objective.options = objective.options.model_copy(update={"group_size": 8, "skip_uniform_groups": True})
    graded = []  # every answer the step samples, as graded
    grade = objective._grade
    objective._grade = lambda prompt_rows, answers: graded.append(grade(prompt_rows, answers)) or graded[-1]
    micro = objective.make_batches([rows[:2], rows[2:4]], step=0, rank=0, all_sum=lambda t: t)
    with torch.no_grad():
        means = step_means(objective, micro)
    answers = [c for g in graded for c in g.completions]
    lengths = torch.tensor([len(c.text) / 100 for c in answers]).view(4, 8)
    assert means["reward/constant"] == pytest.approx(0.1) and means["reward_std/constant"] == 0
    assert means["reward_std/length"] == pytest.approx(lengths.std(dim=1, unbiased=False).mean().item())
    alike = (lengths.amax(dim=1) == lengths.amin(dim=1)).float().mean().item()
    assert means["zero_std_share"] == pytest.approx(alike)
    # Lengths cover every sampled answer, whether its group trained or not.
    assert means["completion_length"] == pytest.approx(sum(len(c.token_ids) for c in answers) / 32)
    assert means["clipped_share"] == pytest.approx(sum(c.finish_reason == "length" for c in answers) / 32)
    assert 0 < means["clipped_share"] and means["trained_share"] == pytest.approx(1 - alike)

    # A constant reward alone: every group scored alike, none of them teaches.
    objective, rows, _ = objective_for(tiny_model_dir, triage_data, tmp_path, grader=grader[:1])
    objective.options = objective.options.model_copy(update={"group_size": 8})
    with torch.no_grad():
        means = step_means(objective, objective.make_batches([rows[:2]], step=0, rank=0, all_sum=lambda t: t))
    assert means["zero_std_share"] == 1 and means["reward_std/constant"] == 0
    # Eight rewards of 0.1 in a group of its own have a float std of 7e-9, not 0 (torch's reduction over one
    # row): still alike, they get no advantage, and skip_uniform_groups trains them only as the one group
    # every micro-batch keeps.
    objective.options = objective.options.model_copy(update={"skip_uniform_groups": True})
    group = objective._grade(rows[:1], completions([("{", [5 + i]) for i in range(8)]))
    assert group.group_std.max() > 0 and group.advantages.abs().max() == 0 and bool(group.uniform.all())


def test_a_grpo_run_logs_reward_spreads_and_answer_lengths(tiny_model_dir, triage_data, tmp_path):
    (tmp_path / "rewards.py").write_text(SPREAD_REWARDS)
    grader = ["rewards.py:constant", "rewards.py:length"]
    cfg = grpo_config(tiny_model_dir, triage_data, tmp_path / "run", grader=grader, eval_every=1)
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    train(load_config(tmp_path / "run.yaml"), progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "reward" in m]
    for m in steps:
        assert m["reward_std/constant"] == 0 and m["reward_std/length"] >= 0
        assert 0 <= m["zero_std_share"] <= 1 and 0 <= m["clipped_share"] <= 1 and 1 <= m["completion_length"] <= 8
    assert 1 <= steps[0]["valid_completion_length"] <= 8 and 0 <= steps[0]["valid_clipped_share"] <= 1
    assert {"full_valid_completion_length", "full_valid_clipped_share"} <= set(logged[-1])


def test_data_pii_looks_in_prompt_rows_and_their_answers_as_in_other_formats(tiny_model_dir, triage_data, tmp_path):
    """GRPO's {"prompt", "answer"} rows are screened as the other formats are: a secret in a prompt and personal
    data in the answer its grader reads (which the rewards steer the model toward) are warned of by file, line
    and field, refused under data.pii: refuse, and replaced by placeholders under redact."""
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        json.dumps({"prompt": "Log in with key AKIAIOSFODNN7EXAMPLE and say hi", "answer": "hi"})
        + "\n"
        + json.dumps({"prompt": "Whose address is it?", "answer": "jane.doe@acme-mail.io"})
        + "\n"
    )
    tokenizer = load_tokenizer(str(tiny_model_dir))
    said = []

    def prepared(mode: str):
        cfg = grpo_config(tiny_model_dir, {**triage_data, "train": rows}, tmp_path / "r")
        cfg["data"].update(validation=0.0, pii=mode, on_error="skip")
        return prepare_items(load_config(cfg), tokenizer, log=said.append)

    warned = prepared("warn")
    assert [w["code"] for w in warned.report["warnings"]] == ["secret_in_prompt", "personal_data_in_reply"]
    assert f"{rows}:1 prompt" in said[0] and f"{rows}:2 answer" in said[1], said
    assert warned.report["pii"]["kinds"] == {"aws_access_key": 1, "email": 1}
    with pytest.raises(TuneforgeError, match="personal data in a reply"):
        prepared("refuse")
    redacted = prepared("redact").train
    assert "AKIA" not in redacted[0].messages[-1]["content"] and redacted[1].item == {"answer": "<EMAIL>"}


@pytest.mark.parametrize("family", ["qwen2.5", "llama3"])
def test_grpo_prompts_carry_their_rows_tools_as_serve_renders_them(tmp_path, family):
    """Each prompt holds its own row's tools, token for token as `tuneforge serve` encodes a request with the
    same messages and tools, rows with different tools (or none) in one file."""
    from families import FAMILIES, family_tokenizer

    from tuneforge.data.prepare import SystemPromptTally
    from tuneforge.methods.grpo import read_prompts
    from tuneforge.serve.app import _encode
    from tuneforge.serve.bodies import ChatCompletionBody

    tokenizer = family_tokenizer(FAMILIES[family], tmp_path / "tok")
    rows = [
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER_TOOL]},
        {"messages": [{"role": "user", "content": "What time is it?"}], "tools": [CLOCK_TOOL, WEATHER_TOOL]},
        {"messages": [{"role": "user", "content": "Hello"}], "answer": "hi"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, problems = read_prompts(str(path), tokenizer, 4096, SystemPromptTally(tokenizer))
    assert not [p for p in problems if p.is_error]
    for row, prompt in zip(rows, prompts):
        body = ChatCompletionBody(model="m", messages=row["messages"], tools=row.get("tools"))
        [served] = _encode(tokenizer, [body.template_messages()], body.template_tools())
        assert prompt.input_ids == served
    assert "get_weather" in tokenizer.decode(prompts[0].input_ids)
    assert "get_weather" not in tokenizer.decode(prompts[2].input_ids)


def test_grpo_refuses_tools_a_template_does_not_write(tiny_model_dir, tmp_path):
    """Rows with tools for a model whose template leaves tools out are refused at their line and field."""
    from tuneforge.data.prepare import SystemPromptTally
    from tuneforge.methods.grpo import read_prompts

    tokenizer = load_tokenizer(str(tiny_model_dir))
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "x"}], "tools": [CLOCK_TOOL]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, problems = read_prompts(str(path), tokenizer, 4096, SystemPromptTally(tokenizer))
    assert len(prompts) == 1
    [problem] = [p for p in problems if p.is_error]
    assert (problem.code, problem.line, problem.field) == ("tools_not_rendered", 2, "tools")


def test_grpo_samples_a_batch_of_rows_with_different_tools(tmp_path):
    """Rows with different tools share a micro-batch: each group's answers are sampled after its own prompt,
    tools included, and train after it."""
    from families import FAMILIES, save_family_model

    folder = save_family_model(FAMILIES["qwen2.5"], tmp_path / "qwen")
    rows = [
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER_TOOL]},
        {"messages": [{"role": "user", "content": "What time is it?"}], "tools": [CLOCK_TOOL, WEATHER_TOOL]},
        {"messages": [{"role": "user", "content": "Hello"}]},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = grpo_config(folder, {"train": path, "validation": path}, tmp_path / "run", max_steps=1)
    raw["data"]["max_length"] = 2048  # the tiny tokenizer spells the tools' definitions out in many tokens
    cfg = load_config(raw)
    tokenizer = load_tokenizer(str(folder))
    model = prepare_model(load_model(str(folder)), cfg)
    objective = build_objective(model, cfg, tokenizer, dtype=torch.float32, device=torch.device("cpu"))
    prompts = prepare_items(cfg, tokenizer).train
    [batch] = objective.make_batches([prompts], step=0, rank=0, all_sum=lambda t: t)
    group = objective.options.group_size
    for i, row in enumerate(prompts):
        for answer in batch["input_ids"][i * group : (i + 1) * group]:
            assert answer[: len(row.input_ids)].tolist() == row.input_ids
    assert "get_time" in objective.tokenizer.decode(prompts[1].input_ids)


def test_grpo_prompt_of_a_row_with_empty_tools_is_the_prompt_without_tools(tmp_path):
    """A row's `"tools": []` (as datasets with a tools column write for rows that offer none) offers no tools:
    its prompt is the row's without tools, as the server encodes a request with an empty tools list, not
    Llama 3's tool-use preamble."""
    from families import FAMILIES, family_tokenizer

    from tuneforge.data.prepare import SystemPromptTally
    from tuneforge.methods.grpo import read_prompts
    from tuneforge.serve.app import _encode
    from tuneforge.serve.bodies import ChatCompletionBody

    tokenizer = family_tokenizer(FAMILIES["llama3"], tmp_path / "tok")
    messages = [{"role": "user", "content": "Hello"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": []}) + "\n" + json.dumps({"messages": messages}) + "\n")
    prompts, problems = read_prompts(str(path), tokenizer, 4096, SystemPromptTally(tokenizer))
    assert not [p for p in problems if p.is_error]
    body = ChatCompletionBody(model="m", messages=messages, tools=[])
    [served] = _encode(tokenizer, [body.template_messages()], body.template_tools())
    assert prompts[0].input_ids == prompts[1].input_ids == served
    assert prompts[0].tools is None


def test_a_field_named_label_is_an_item_field_the_grader_reads_not_rated_replies(tiny_model_dir, triage_data, tmp_path):
    """OpenAI's reinforcement rows are messages and any fields: one named `label` is not KTO's rating."""
    from tuneforge.methods import check_inputs
    from tuneforge.models import resolve

    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Say hi"}], "label": "hi"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Say bye"}], "label": "bye"})
        + "\n"
    )
    grader = {**BRACE, "name": "label", "reference": "{{ item.label }}", "operation": "eq"}
    cfg = grpo_config(tiny_model_dir, {**triage_data, "train": rows}, tmp_path / "r", grader=grader)
    cfg["data"]["validation"] = 0.0
    cfg = load_config(cfg)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    check_inputs(cfg, tokenizer, resolve(str(tiny_model_dir)))
    prepared = prepare_items(cfg, tokenizer)
    assert [(r.messages[-1]["content"], r.item) for r in prepared.train] == [
        ("Say hi", {"label": "hi"}),
        ("Say bye", {"label": "bye"}),
    ]


def test_data_problems_of_a_prompt_row_name_its_prompt_field(tiny_model_dir, tmp_path):
    """A prompt row's prompt is its one user message: the PII check and an image the model cannot read name the
    row's `prompt` field, as its other problems do."""
    from PIL import Image

    Image.new("RGB", (20, 16), (255, 0, 0)).save(tmp_path / "red.png")
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        json.dumps({"prompt": "Write to jane.doe@acme-mail.io", "answer": "hi"})
        + "\n"
        + json.dumps({"prompt": "<image>What colour is it?", "images": ["red.png"], "answer": "red"})
        + "\n"
    )
    tokenizer = load_tokenizer(str(tiny_model_dir))
    screen = PiiScreen("warn", "assistant", [])
    _, problems = read_prompts(str(rows), tokenizer, 256, SystemPromptTally(tokenizer), screen)
    assert [(p.code, p.line, p.field) for p in screen.problems] == [("personal_data_in_prompt", 1, "prompt")]
    assert [(p.code, p.line, p.field) for p in problems] == [("images_not_read", 2, "prompt")]
