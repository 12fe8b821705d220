"""dpo.loss: kto on tiny models: the loss against a hand computation, TRL's unpaired data read as
its own format with the checks a curator needs, a short run that learns and resumes exactly."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run_config
from test_dpo import dpo_config, write_splits
from tiny import tiny_llama

from tuneforge.config import load_config
from tuneforge.data import Conversation, Message, collate, render_examples
from tuneforge.data.formats import check_row, detect_format, read_conversations
from tuneforge.errors import ConfigError, DataError, TuneforgeError
from tuneforge.methods import check_inputs, dpo
from tuneforge.models import load_tokenizer, resolve

CHATTY = [
    "Hello! Thanks so much for reaching out, I'd be happy to help you with that today.",
    "Sure thing, this sounds like something our team can look at. Have a great day!",
    "I think it might be a problem, but I am not sure. Could you tell me more?",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny models, on one thread."""


def kto_rows(chat_file: Path, *, undesirable: bool = True) -> list[dict]:
    """The demo task's chat rows as rated replies: each prompt's JSON answer desirable, a chatty reply
    to it undesirable, as a support tool would log them (TRL's prompt / completion / label)."""
    rows = []
    for i, line in enumerate(chat_file.read_text().splitlines()):
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:-1], "completion": [messages[-1]], "label": True})
        if undesirable:
            chatty = {"role": "assistant", "content": CHATTY[i % len(CHATTY)]}
            rows.append({"prompt": messages[:-1], "completion": [chatty], "label": False})
    return rows


@pytest.fixture(scope="module")
def kto_data(triage_data, tmp_path_factory) -> dict:
    return write_splits(triage_data, tmp_path_factory.mktemp("kto"), kto_rows)


def kto_config(model_dir, data: dict, out, dpo_section: dict | None = None, **train_options) -> dict:
    return dpo_config(model_dir, data, out, {"loss": "kto", **(dpo_section or {})}, **train_options)


def test_kto_losses_equal_a_hand_computation_on_known_log_ratios():
    logratio = torch.tensor([0.5, -1.0, 2.0, 0.0])
    desirable = torch.tensor([True, False, False, True])
    kl, beta, w_d, w_u = torch.tensor(0.3), 0.1, 1.5, 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [
        w_d * (1 - sig(beta * (0.5 - 0.3))),
        w_u * (1 - sig(beta * (0.3 + 1.0))),
        w_u * (1 - sig(beta * (0.3 - 2.0))),
        w_d * (1 - sig(beta * (0.0 - 0.3))),
    ]
    got = dpo.kto_losses(logratio, kl, desirable, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def rated_examples(tokenizer):
    """Rendered rated replies of different lengths: (example, prompt text, reply text)."""
    out = []
    for i, (reply, label) in enumerate(
        [('{"category": "billing"}', True), (CHATTY[0], False), ('{"category": "outage"}', True), (CHATTY[1], False)]
    ):
        prompt = "My database is down " * (i + 1)
        record = Conversation([Message("user", prompt), Message("assistant", reply)], label=label)
        (example,) = render_examples(record, tokenizer, "last_assistant")
        example.desirable = label
        out.append((example, prompt, reply))
    return out


def reply_logp(model, tokenizer, prompt: str, reply: str) -> torch.Tensor:
    """log p(reply + end of turn | the prompt), from a rendering of its own."""
    conversation = Conversation([Message("user", prompt), Message("assistant", reply)])
    ids = list(render_examples(conversation, tokenizer, "last_assistant")[0].input_ids)
    target = tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    end = len(ids) - 1
    assert ids[end - len(target) : end] == target
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    positions = torch.arange(end - len(target), end)
    return F.log_softmax(logits[positions - 1], -1)[torch.arange(len(target)), torch.tensor(target)].sum()


def test_the_objective_equals_an_independent_computation_with_the_kl_from_mismatched_replies(tokenizer):
    policy, reference = tiny_llama(tokenizer, seed=0).eval(), tiny_llama(tokenizer, seed=1).eval()
    rated = rated_examples(tokenizer)
    beta, w_d, w_u = 0.5, 1.2, 0.8
    rows = dpo.kto_rows([e for e, _, _ in rated], 512)
    objective = dpo.DPOObjective(
        policy, beta=beta, loss="kto", desirable_weight=w_d, undesirable_weight=w_u, reference=reference
    )
    batch = collate(rows, tokenizer.pad_token_id)
    assert batch["desirable"].tolist() == [True, False, True, False]
    sums = objective(**batch)

    with torch.no_grad():
        ratio = lambda p, r: float(reply_logp(policy, tokenizer, p, r) - reply_logp(reference, tokenizer, p, r))  # noqa: E731
        # Each prompt with the reply of the row before it (the first with the last's): TRL's KL data.
        mismatched = [ratio(rated[i][1], rated[i - 1][2]) for i in range(len(rated))]
        kl = max(sum(mismatched) / len(mismatched), 0.0)
        expected, chosen, rejected = 0.0, [], []
        for e, prompt, reply in rated:
            r = ratio(prompt, reply)
            if e.desirable:
                expected += w_d * (1 - 1 / (1 + math.exp(-beta * (r - kl))))
                chosen.append(beta * r)
            else:
                expected += w_u * (1 - 1 / (1 + math.exp(-beta * (kl - r))))
                rejected.append(beta * r)
    assert dpo.count_pairs(batch) == 4
    assert sums["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert sums["kl"].item() == pytest.approx(4 * kl, rel=1e-4, abs=1e-6)
    assert sums["rewards/chosen"].item() == pytest.approx(sum(chosen), rel=1e-4)
    assert sums["rewards/rejected"].item() == pytest.approx(sum(rejected), rel=1e-4)
    assert (sums["_desirable"].item(), sums["_undesirable"].item()) == (2, 2)
    # Only the rated replies train: the mismatched ones' log-ratios are detached.
    sums["loss"].backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_the_kl_replies_answer_other_prompts_where_the_data_rates_several_replies_to_one(tokenizer):
    def rated(prompt: str, reply: str, label: bool):
        record = Conversation([Message("user", prompt), Message("assistant", reply)], label=label)
        (example,) = render_examples(record, tokenizer, "last_assistant")
        return example

    # Two replies to each prompt, side by side, as an A/B feedback log holds them.
    log = [
        ("The API is down", '{"category": "outage"}', True),
        ("The API is down", CHATTY[0], False),
        ("I was charged twice", '{"category": "billing"}', True),
        ("I was charged twice", CHATTY[1], False),
    ]
    rows = dpo.kto_rows([rated(*entry) for entry in log], 512)
    for row, (prompt, _, _) in zip(rows, log):
        # The second example of each row is its prompt with a reply from the other prompt's rows.
        other = [reply for p, reply, _ in log if p != prompt]
        halves = row_examples(row)
        assert tokenizer.decode(halves[1]).count(prompt) == 1
        assert any(reply in tokenizer.decode(halves[1]) for reply in other)


def row_examples(row):
    """A row's examples' token ids, split where its position ids restart."""
    starts = [t for t, p in enumerate(row.position_ids) if p == 0] + [len(row)]
    return [list(row.input_ids[a:b]) for a, b in zip(starts, starts[1:])]


def test_kto_rows_are_read_in_trl_and_chat_shapes_and_bad_labels_name_their_field(tmp_path):
    assert detect_format({"prompt", "completion", "label"}) == "kto"
    assert detect_format({"messages", "label"}) == "kto"
    good, _ = check_row(
        {"prompt": "Hi", "completion": "Hello! How can I help?", "label": False}, "kto", file="f.jsonl", line=1
    )
    assert good.label is False and [m.role for m in good.messages] == ["user", "assistant"]
    chat, _ = check_row(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ],
            "label": True,
        },
        "kto",
    )
    assert chat.label is True and [m.weight for m in chat.messages] == [None, 0, None, None]  # the last alone trains

    path = tmp_path / "rated.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi", "completion": "Hello", "label": "yes"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hi"}], "label": True})
        + "\n"
    )
    problems = [p for _, p in read_conversations(path) if hasattr(p, "code")]
    assert [(p.line, p.field) for p in problems] == [(1, "label"), (2, "messages[0]")]
    assert "must be true" in problems[0].message and '"yes"' in problems[0].message

    # The same reply rated both ways (two users' feedback) is no duplicate: both rows train.
    from tuneforge.data.dedup import DuplicateIndex, content_hash

    up, down = (check_row({"prompt": "Hi", "completion": "Hello", "label": label}, "kto")[0] for label in (True, False))
    assert content_hash(up) != content_hash(down)
    index = DuplicateIndex(0.5)
    index.add(1, content_hash(up), index.signature(up))
    assert index.find(content_hash(down), index.signature(down)) is None

    csv = tmp_path / "rated.csv"
    csv.write_text("prompt,completion,label\nHi,Hello,true\nHi,Go away,FALSE\n")
    assert [r.label for _, r in read_conversations(csv)] == [True, False]


def test_one_kind_of_rating_is_refused_and_the_report_counts_each(tiny_model_dir, triage_data, kto_data, tmp_path):
    only_good = tmp_path / "good.jsonl"
    only_good.write_text("".join(json.dumps(r) + "\n" for r in kto_rows(triage_data["train"], undesirable=False)))
    data = {"train": only_good, "validation": kto_data["validation"]}
    cfg = load_config(kto_config(tiny_model_dir, data, tmp_path / "r"))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    from tuneforge.data import prepare

    with pytest.raises(DataError, match="every training row is rated desirable") as refused:
        prepare(cfg.data, tokenizer, log=lambda *a: None)
    assert refused.value.problems[0].code == "kto_one_label"

    report = prepare(load_config(kto_config(tiny_model_dir, kto_data, tmp_path / "r")).data, tokenizer).report
    assert report["kind"] == "kto"
    assert report["counts"]["train_desirable"] == report["counts"]["train_undesirable"] == 96
    # The same chatty replies rate down many prompts: that is feedback, not a stock reply the model learns.
    assert "repeated_reply" not in {w["code"] for w in report["warnings"]}


def test_validate_explains_the_kl_forward_and_warns_of_an_unbalanced_weight(tiny_model_dir, kto_data, tmp_path, capsys):
    from tuneforge.dry_run import validate

    cfg = kto_config(tiny_model_dir, kto_data, tmp_path / "run", {"undesirable_weight": 2.0})
    assert validate(cfg) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "96 desirable (weight 1), 96 undesirable (weight 2)" in out.replace("│ │", "")
    assert "each rated reply runs beside a mismatched one" in out
    assert "outside the KTO paper's recommended 1 to 4/3; set dpo.desirable_weight between 2.00 and 2.67" in out


def test_data_format_kto_names_the_rated_replies_format(tiny_model_dir, kto_data, tmp_path, capsys):
    from tuneforge.dry_run import validate

    cfg = kto_config(tiny_model_dir, kto_data, tmp_path / "run")
    cfg["data"]["format"] = "kto"
    assert validate(cfg) == 0
    assert "96 desirable (weight 1), 96 undesirable (weight 1)" in " ".join(capsys.readouterr().out.split()).replace(
        "│ │", ""
    )


def test_kto_data_needs_dpo_loss_kto_and_kto_needs_it(tiny_model_dir, kto_data, tmp_path, triage_data):
    source = resolve(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    sigmoid = load_config({**kto_config(tiny_model_dir, kto_data, tmp_path / "a"), "dpo": {}})
    with pytest.raises(TuneforgeError, match="set dpo.loss: kto"):
        check_inputs(sigmoid, tokenizer, source)
    lora = load_config(tiny_run_config(tiny_model_dir, kto_data, tmp_path / "b"))
    with pytest.raises(TuneforgeError, match="method: dpo with dpo.loss: kto"):
        check_inputs(lora, tokenizer, source)
    on_chat = load_config(kto_config(tiny_model_dir, triage_data, tmp_path / "c"))
    with pytest.raises(TuneforgeError, match="no rated replies"):
        check_inputs(on_chat, tokenizer, source)
    with pytest.raises(ConfigError, match="dpo.desirable_weight is for loss: kto"):
        load_config({**kto_config(tiny_model_dir, kto_data, tmp_path / "d"), "dpo": {"desirable_weight": 2.0}})


def test_the_balance_hint_gives_the_weight_that_brings_the_ratio_into_the_papers_range(
    tiny_model_dir, kto_data, tmp_path
):
    cfg = load_config(kto_config(tiny_model_dir, kto_data, tmp_path / "r"))
    report = {"counts": {"train_desirable": 10, "train_undesirable": 40}}
    warning = dpo.kto_balance_warning(cfg, report)
    assert "0.25" in warning and "set dpo.desirable_weight between 4.00 and 5.33" in warning
    assert dpo.kto_balance_warning(cfg, {"counts": {"train_desirable": 12, "train_undesirable": 10}}) is None


def test_a_tiny_kto_run_learns_to_reward_the_desirable_replies_and_resumes_exactly(tiny_model_dir, kto_data, tmp_path):
    run = tmp_path / "run"
    cfg = kto_config(
        tiny_model_dir, kto_data, run, max_steps=8, learning_rate=5e-3, eval_every=4, save_every=4, batch_size=8
    )
    result = train_quietly(cfg)
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    first, last = rows[0], result.metrics
    assert first["train_loss"] == pytest.approx(0.5, abs=1e-4) and first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert last["rewards/chosen"] > last["rewards/rejected"] and last["train_loss"] < first["train_loss"]
    assert last["full_valid_rewards/chosen"] > last["full_valid_rewards/rejected"]
    assert {"logps/chosen", "logps/rejected", "kl"} <= last.keys() and "_desirable" not in last
    # From the step-4 checkpoint again: steps 5 to 8 repeat to the bit.
    shutil.rmtree(run / "checkpoints" / "step-8")
    train_quietly(cfg, resume="latest")
    again = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert [(r["train_loss"], r["kl"]) for r in again] == [(r["train_loss"], r["kl"]) for r in rows]


def train_quietly(cfg, **options):
    from tuneforge.training import train

    return train(cfg, progress=False, **options)


def test_two_processes_estimate_the_kl_over_both_and_match_one_process_on_the_same_batch(
    tiny_model_dir, triage_data, tmp_path
):
    from test_distributed import metrics, run_cli

    def chatty_first(chat_file: Path) -> list[dict]:
        # Each prompt's chatty reply before its JSON one: every mismatched reply is another prompt's JSON answer,
        # which the policy learns to like, so the KL estimate rises above 0 within a few steps.
        rows = kto_rows(chat_file)
        return [row for i in range(0, len(rows), 2) for row in (rows[i + 1], rows[i])]

    kto_data = write_splits(triage_data, tmp_path, chatty_first)
    records = {}
    for nproc in (1, 2):  # one process runs the 4 rows at once, two processes 2 each: the same global micro-batch
        run = tmp_path / f"run{nproc}"
        cfg = kto_config(tiny_model_dir, kto_data, run, max_steps=2, batch_size=4, learning_rate=5e-2)
        res = run_cli(cfg, tmp_path, nproc)
        assert res.returncode == 0, res.stderr[-3000:]
        records[nproc] = [r[key] for r in metrics(run) if "train_loss" in r for key in ("train_loss", "kl")]
    assert records[1][-1] > 0  # the policy has moved from the reference, so the estimate counts
    assert records[2] == pytest.approx(records[1], rel=1e-5)


def test_a_kto_runs_evaluation_scores_its_validation_files_rows_rated_true(tiny_model_dir, kto_data, tmp_path):
    """eval.task on a KTO run's validation file, rated both ways as its validation loss needs: the rows rated true
    are the reference answers and those rated false, replies not to give, are left out, as a preference pair's
    rejected reply is; the run is not refused before training."""
    from tuneforge.eval.after_training import check_eval_inputs, validation_examples

    cfg = load_config({**kto_config(tiny_model_dir, kto_data, tmp_path / "run"), "eval": {"task": "exact"}})
    check_eval_inputs(cfg)
    rows = [json.loads(line) for line in kto_data["validation"].read_text().splitlines()]
    desirable = [row["completion"][0]["content"] for row in rows if row["label"]]
    assert len(desirable) < len(rows)
    assert [e.reference for e in validation_examples(cfg)] == desirable


def test_a_validation_split_of_one_rated_reply_is_refused_before_training_naming_it_and_the_count(
    tiny_model_dir, kto_data, tmp_path
):
    """KTO's KL estimate pairs each reply's prompt with another row's reply: a split of one row has only its own,
    and its validation loss would be 0.5 for a desirable reply whatever the model (TRL refuses a batch of one)."""
    from tuneforge.training import train

    one = tmp_path / "one.jsonl"
    one.write_text(Path(kto_data["validation"]).read_text().splitlines(keepends=True)[0])
    cfg = kto_config(tiny_model_dir, {"train": kto_data["train"], "validation": one}, tmp_path / "run", max_steps=1)
    with pytest.raises(DataError, match="1 rated reply") as refused:
        train(cfg, progress=False)
    (problem,) = [p for p in refused.value.problems if p.code == "kto_one_valid_row"]
    assert problem.file == str(one) and "2 or more" in problem.message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    two = tmp_path / "two.jsonl"
    two.write_text("".join(Path(kto_data["validation"]).read_text().splitlines(keepends=True)[:2]))
    cfg = kto_config(tiny_model_dir, {"train": kto_data["train"], "validation": two}, tmp_path / "run2", max_steps=1)
    train(cfg, progress=False)
