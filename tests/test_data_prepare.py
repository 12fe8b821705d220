"""`prepare`: validation policy, report, dedup, split, leak check, length handling, cache."""

from __future__ import annotations

import importlib
import json
from array import array
from collections import Counter
from pathlib import Path

import pytest
import torch
from data.rows import GOOD_ROW, chat, trained_runs, write_bad_input, write_jsonl
from families import FAMILIES, family_tokenizer
from tiny import tiny_tokenizer

from tuneforge import progress
from tuneforge.config import DataConfig
from tuneforge.data import IGNORE_INDEX, collate, pack, prepare
from tuneforge.data.prepare import check_data, hash_data
from tuneforge.errors import DataError

TICKETS = [f"My database number {i} is down and production is affected, please help!" for i in range(40)]


@pytest.fixture
def isolated_home(tmp_path, monkeypatch) -> Path:
    """A private TUNEFORGE_HOME, so the test never touches (or reuses) the user's data cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUNEFORGE_HOME", str(home))
    return home


def rows(n: int = 20, system: str | None = "You are a helpful assistant.") -> list[dict]:
    return [
        chat(
            f"Question {i}: how do I reset my password for the web console?",
            f"Answer {i}: use the console.",
            system=system,
        )
        for i in range(n)
    ]


def run(tmp_path, tokenizer, data, **cfg):
    path = write_jsonl(tmp_path / "train.jsonl", data)
    cfg.setdefault("validation", None)
    return prepare(DataConfig(train=str(path), **cfg), tokenizer, use_cache=False, log=lambda _: None)


def test_strict_stops_with_every_error_and_writes_the_report(tmp_path, tokenizer):
    path, _, _ = write_bad_input(tmp_path, "unknown_role")
    with open(path, "a") as f:
        f.write("{broken\n")
    report_path = tmp_path / "run" / "data_report.json"
    with pytest.raises(DataError) as err:
        prepare(DataConfig(train=str(path)), tokenizer, report_path=report_path, use_cache=False)
    assert [(p.code, p.line) for p in err.value.problems] == [("unrecognized_role", 3), ("invalid_json", 4)]
    assert f"{path}:3" in str(err.value) and "data.on_error: skip" in str(err.value)
    report = json.loads(report_path.read_text())
    assert report["errors_total"] == 2
    assert report["errors"][0] == {
        "file": str(path),
        "line": 3,
        "field": "messages[0].role",
        "code": "unrecognized_role",
        "severity": "error",
        "message": err.value.problems[0].message,
    }


def test_skip_leaves_bad_rows_out_and_counts_them(tmp_path, tokenizer):
    path, _, _ = write_bad_input(tmp_path, "unknown_role")
    data = prepare(DataConfig(train=str(path), on_error="skip", validation=None), tokenizer, use_cache=False)
    counts = data.report["counts"]
    assert (counts["read"], counts["valid"], counts["rejected"]) == (3, 2, 1)
    assert counts["rejected_by_code"] == {"unrecognized_role": 1}
    assert counts["duplicates_exact"] == 1 and len(data.train) == 1  # lines 1 and 2 are the same row
    assert {w["code"] for w in data.report["warnings"]} >= {"rows_skipped", "duplicates_removed", "few_examples"}


def test_report_token_statistics(tmp_path, tokenizer):
    data = run(tmp_path, tokenizer, rows(20))
    tokens = data.report["tokens"]
    lengths = sorted(len(e) for e in data.train)
    assert tokens["total"] == sum(lengths) and tokens["length"]["max"] == lengths[-1]
    assert tokens["length"]["p50"] == lengths[9]
    assert tokens["trained"] == sum(e.trained_tokens for e in data.train)
    assert 0 < tokens["trained_share"] < 1
    assert data.report["template"]["end_of_turn_token"] == "<|im_end|>"


def test_exact_duplicates_ignore_case_and_spacing(tmp_path, tokenizer):
    data = rows(12)
    data.append(
        chat(
            "QUESTION 3:   how do I reset my password for the web console?",
            "answer 3: use the console.",
            system="You are a helpful assistant.",
        )
    )
    prepared = run(tmp_path, tokenizer, data)
    assert prepared.report["counts"]["duplicates_exact"] == 1 and len(prepared.train) == 12
    (dup,) = prepared.report["duplicates"]
    assert (dup["line"], dup["of_line"], dup["kind"]) == (13, 4, "exact")


def test_near_duplicates_are_removed_with_dedup_near(tmp_path, tokenizer):
    long_ticket = (
        "our production database cluster in the west region stopped accepting connections after the "
        "maintenance window last night and every query now times out after thirty seconds, which means "
        "our customers cannot check out and we are losing orders every minute"
    )
    data = [chat(t, "outage") for t in TICKETS[:10]] + [
        chat(long_ticket, "outage"),
        chat(long_ticket.replace("thirty", "forty"), "outage"),
    ]
    near = run(tmp_path, tokenizer, data, dedup="near")
    assert near.report["counts"]["duplicates_near"] == 1 and len(near.train) == 11
    assert near.report["duplicates"][0]["kind"] == "near"
    exact = run(tmp_path, tokenizer, data, dedup="exact")
    assert exact.report["counts"]["duplicates_near"] == 0 and len(exact.train) == 12


def test_near_duplicates_differing_in_punctuation_are_removed_with_dedup_near(tmp_path, tokenizer):
    question = "How do I reset my password for account 7919 in the eu region, from the mobile app?"
    reply = "To reset your password for account 7919, open the mobile app, choose item 12, and follow step 3."
    data = [chat(t, "outage") for t in TICKETS[:10]] + [
        chat(question, reply),
        chat(question.replace(",", "").replace("?", "!!"), reply.replace(",", "").replace(".", ";")),
    ]
    near = run(tmp_path, tokenizer, data, dedup="near")
    assert near.report["counts"]["duplicates_near"] == 1 and len(near.train) == 11
    sums = [chat(f"What is {s}? Answer with the number alone.", "4.") for s in ("2+2", "2*2", "2 + 2", "2 * 2")]
    assert run(tmp_path, tokenizer, data[:10] + sums, dedup="near").report["counts"]["duplicates_near"] == 0


def test_preference_pairs_that_differ_in_the_rejected_reply_are_not_near_duplicates(tmp_path, tokenizer):
    question = "Our production database stopped accepting connections after last night's maintenance window."
    chosen = "Restart the connection pooler first, then check the maintenance logs for failed migrations."
    rejected = ["Have you tried turning it off and on again?", "Databases never fail, so this is your network."]
    data = [
        {"prompt": f"Ticket {i}: {t}", "chosen": "Escalate.", "rejected": "Ignore."} for i, t in enumerate(TICKETS[:10])
    ]
    data += [{"prompt": question, "chosen": chosen, "rejected": r} for r in rejected]
    near = run(tmp_path, tokenizer, data, dedup="near")
    assert near.report["counts"]["duplicates_near"] == 0 and len(near.train_pairs) == 12


def test_counts_are_of_examples_where_a_template_trains_turn_by_turn(tmp_path):
    tokenizer = family_tokenizer(FAMILIES["qwen3"], tmp_path)  # drops past reasoning: one example per reply
    data = [
        {"messages": [*chat(f"Question {i}?", "One.")["messages"], *chat("And then?", "Two.")["messages"]]}
        for i in range(4)
    ]
    prepared = run(tmp_path, tokenizer, data, validation=0.25)
    counts = prepared.report["counts"]
    assert (counts["train"], counts["validation"]) == (len(prepared.train), len(prepared.valid)) == (6, 2)
    assert {w["code"]: w["count"] for w in prepared.report["warnings"]}["few_examples"] == 6


def test_validation_split_is_by_content_not_file_order(tmp_path, tokenizer):
    data = rows(40)
    forward = run(tmp_path, tokenizer, data, validation=0.25)
    backward = run(tmp_path, tokenizer, data[::-1], validation=0.25)
    assert len(forward.valid) == 10 and len(forward.train) == 30

    def as_set(examples):
        return {tuple(e.input_ids) for e in examples}

    assert as_set(forward.valid) == as_set(backward.valid)
    assert not as_set(forward.valid) & as_set(forward.train)


def test_rows_also_in_the_validation_file_leave_training(tmp_path, tokenizer):
    data = rows(12)
    train = write_jsonl(tmp_path / "train.jsonl", data)
    valid = write_jsonl(tmp_path / "valid.jsonl", [data[3], chat("A new question?", "A new answer.")])
    prepared = prepare(DataConfig(train=str(train), validation=str(valid)), tokenizer, use_cache=False)
    assert prepared.report["counts"]["validation_leak"] == 1
    assert len(prepared.train) == 11 and len(prepared.valid) == 2
    assert prepared.report["leaks"][0]["line"] == 4 and prepared.report["leaks"][0]["of_file"] == str(valid)
    assert "validation_leak" in {w["code"] for w in prepared.report["warnings"]}


def test_long_rows_are_truncated_and_counted(tmp_path, tokenizer):
    data = rows(11) + [chat("Short question?", "A long answer. " * 60)]
    prepared = run(tmp_path, tokenizer, data, max_length=64)
    assert prepared.report["counts"]["truncated"] == 1
    assert max(len(e) for e in prepared.train) == 64
    cut = next(e for e in prepared.train if len(e) == 64)
    assert cut.labels[-1] == IGNORE_INDEX and cut.trained_tokens > 0
    # The warning says which rows were cut, so they can be found and fixed.
    [warning] = [w for w in prepared.report["warnings"] if w["code"] == "truncated"]
    assert warning["where"] == [f"{tmp_path / 'train.jsonl'}:12"]
    assert (
        f"1 row longer than max_length 64 was cut (its end is not trained): {tmp_path / 'train.jsonl'}:12. Raise"
        in warning["message"]
    )

    dropped = run(tmp_path, tokenizer, data, max_length=64, truncation="drop")
    assert dropped.report["counts"]["dropped_too_long"] == 1 and len(dropped.train) == 11
    [warning] = [w for w in dropped.report["warnings"] if w["code"] == "dropped_too_long"]
    assert warning["where"] == [f"{tmp_path / 'train.jsonl'}:12"] and warning["message"].endswith("train.jsonl:12.")


def test_a_long_preference_pair_is_one_row_over_max_length(tmp_path, tokenizer):
    data = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."} for i in range(11)]
    data.append({"prompt": "Short question?", "chosen": "A long answer. " * 60, "rejected": "A bad answer. " * 60})
    prepared = run(tmp_path, tokenizer, data, max_length=64)
    assert prepared.report["counts"]["truncated"] == 1 and prepared.report["tokens"]["over_max_length"] == 1


@pytest.mark.parametrize("truncation", ["truncate", "drop"])
def test_a_row_left_out_as_too_long_does_not_count_for_the_system_prompt(tmp_path, tokenizer, truncation):
    data = rows(11) + [chat("A very long question. " * 60, "Short answer.", system="Another prompt.")]
    prepared = run(tmp_path, tokenizer, data, max_length=64, truncation=truncation, on_error="skip")
    assert len(prepared.train) == 11
    assert prepared.report["system_prompt"]["shared"] == "You are a helpful assistant."


def test_a_reply_cut_off_entirely_is_too_long(tmp_path, tokenizer):
    data = rows(11) + [chat("A very long question. " * 60, "Short answer.")]
    with pytest.raises(DataError) as err:
        run(tmp_path, tokenizer, data, max_length=64)
    assert [(p.code, p.line) for p in err.value.problems] == [("too_long", 12)]


def test_a_row_trained_turn_by_turn_keeps_the_turns_its_cut_leaves_trained(tmp_path):
    # Qwen 3 trains a row's first reply (with its reasoning) in an example of its own; a cut that leaves
    # the row's last reply nothing still trains that first one, as it would in any other family's row.
    tokenizer = family_tokenizer(FAMILIES["qwen3"], tmp_path / "qwen3")
    first = "<think>\nTwo and two.\n</think>\n\nFour."
    data = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And three plus three? " * 20},
                {"role": "assistant", "content": "Six."},
            ]
        }
        for i in range(12)
    ]
    prepared = run(tmp_path, tokenizer, data, max_length=100)
    assert prepared.report["counts"]["truncated"] == 12 and len(prepared.train) == 12
    assert {tuple(trained_runs(e, tokenizer)) for e in prepared.train} == {(first + "<|im_end|>",)}


def test_eos_never_trained_is_an_error_even_when_skipping(tmp_path, tokenizer):
    data = [chat(f"Hi {i}", "This reply is much too long to fit. " * 10) for i in range(12)]
    with pytest.raises(DataError) as err:
        run(tmp_path, tokenizer, data, max_length=40, on_error="skip")
    assert err.value.code == "eos_never_trained"


def test_no_valid_rows_is_an_error_even_when_skipping(tmp_path, tokenizer):
    path, _, _ = write_bad_input(tmp_path, "empty_file")
    with pytest.raises(DataError) as err:
        prepare(DataConfig(train=str(path), on_error="skip"), tokenizer, use_cache=False)
    assert [p.code for p in err.value.problems] == ["empty_file", "no_valid_rows"]


def test_a_validation_file_with_no_good_row_stops_even_when_skipping(tmp_path, tokenizer):
    """Skipping bad rows must not quietly turn into a run without the validation it was given."""
    train = write_jsonl(tmp_path / "train.jsonl", rows(12))
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"messages": [{"role": "wizard", "content": "hi"}]}] * 2)
    with pytest.raises(DataError) as err:
        prepare(DataConfig(train=str(train), validation=str(valid), on_error="skip"), tokenizer, use_cache=False)
    [last] = [p for p in err.value.problems if p.code == "no_valid_rows"]
    assert last.file == str(valid) and "no validation rows are left after 2 problems" in last.message
    # Left out, data.validation would be its default fraction, still validating: null is what leaves it out.
    assert "give data.validation: null to train without validation" in last.message


def test_no_valid_rows_says_they_were_all_in_the_validation_file(tmp_path, tokenizer):
    data = rows(4)
    train = write_jsonl(tmp_path / "train.jsonl", data)
    valid = write_jsonl(tmp_path / "valid.jsonl", data)
    with pytest.raises(DataError) as err:
        prepare(DataConfig(train=str(train), validation=str(valid)), tokenizer, use_cache=False)
    [problem] = err.value.problems
    assert problem.code == "no_valid_rows"
    assert "after 4 rows removed as also in the validation file" in problem.message


def test_warnings_for_missing_system_prompts_and_few_examples(tmp_path, tokenizer):
    prepared = run(tmp_path, tokenizer, rows(5, system=None))
    warnings = {w["code"]: w for w in prepared.report["warnings"]}
    assert warnings["no_system_message"]["count"] == 5
    assert warnings["few_examples"]["count"] == 5


def test_sft_and_preference_rows_cannot_be_mixed(tmp_path, tokenizer):
    chat_file = write_jsonl(tmp_path / "chat.jsonl", rows(12))
    pref_file = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}])
    with pytest.raises(DataError) as err:
        prepare(DataConfig(train=[str(chat_file), str(pref_file)], validation=None), tokenizer, use_cache=False)
    assert [(p.code, p.file) for p in err.value.problems] == [("mixed_formats", str(pref_file))]


def test_preference_data_fills_pairs(tmp_path, tokenizer):
    data = [
        {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."} for i in range(12)
    ]
    prepared = run(tmp_path, tokenizer, data, validation=0.25)
    assert prepared.report["kind"] == "preference"
    assert not prepared.train and len(prepared.train_pairs) == 9 and len(prepared.valid_pairs) == 3
    chosen, rejected = prepared.train_pairs[0]
    assert trained_runs(chosen, tokenizer)[0].startswith("Good answer")
    assert trained_runs(rejected, tokenizer)[0].startswith("Bad answer")


def test_text_rows_for_continued_pretraining(tmp_path, tokenizer):
    prepared = run(tmp_path, tokenizer, [{"text": f"The quick brown fox number {i}."} for i in range(12)])
    assert len(prepared.train) == 12
    assert all(e.trained_tokens == len(e) - 1 for e in prepared.train)


def document(i: int, sentences: int) -> dict:
    return {"text": " ".join(f"Document {i} says the quick brown fox number {j} jumps." for j in range(sentences))}


def test_token_statistics_are_of_the_examples_as_cut_to_max_length(tmp_path, tokenizer):
    """tokens per example describes what trains: a row cut to max_length counts as cut, and a row that
    truncation left nothing to train in (too_long) or that was dropped counts not at all."""
    data = run(tmp_path, tokenizer, [document(i, 1 + 2 * i) for i in range(6)], max_length=48)
    lengths = sorted(len(e) for e in data.train)
    assert data.report["counts"]["truncated"] >= 3 and lengths[-1] == 48
    assert data.report["tokens"]["length"] == {
        "p50": lengths[2],
        "p90": lengths[-1],
        "p99": lengths[-1],
        "max": 48,
        "mean": round(sum(lengths) / 6, 1),
    }
    dropped = run(tmp_path, tokenizer, [document(i, 1 + 2 * i) for i in range(6)], max_length=48, truncation="drop")
    assert dropped.report["tokens"]["length"]["max"] == max(len(e) for e in dropped.train) < 48
    no_reply_left = chat("Why? " + "Tell me everything. " * 40, "Because.", system=None)
    chats = run(tmp_path, tokenizer, [chat("Hi", "Hello", system=None), no_reply_left], max_length=48, on_error="skip")
    assert chats.report["counts"]["rejected_by_code"] == {"too_long": 1}
    assert chats.report["tokens"]["length"]["max"] == len(chats.train[0]) < 48


def test_split_cuts_a_long_document_into_windows_that_train_every_token_once(tmp_path, tokenizer):
    """data.truncation: split trains a document longer than max_length whole, window by window: each
    token is the target of one window, and the last window trains the EOS after the document."""
    whole = run(tmp_path, tokenizer, [document(0, 12)], max_length=4096).train[0]
    limit = len(whole) // 3 + 2
    split = run(tmp_path, tokenizer, [document(0, 12)], max_length=limit, truncation="split")
    windows = split.train
    assert len(windows) == 3 and all(len(w) <= limit for w in windows)
    targets = [label for w in windows for label in w.labels if label != IGNORE_INDEX]
    assert targets == [label for label in whole.labels if label != IGNORE_INDEX]
    assert sum(w.trained_tokens for w in windows) == whole.trained_tokens == len(whole) - 1
    assert windows[0].input_ids[0] == whole.input_ids[0] and windows[-1].labels[-2] == tokenizer.eos_token_id
    counts = split.report["counts"]
    assert (counts["split"], counts["train"], counts["train_documents"], counts["truncated"]) == (1, 3, 1, 0)


def test_split_keeps_each_document_whole_on_one_side_of_dedup_and_the_validation_split(tmp_path, tokenizer):
    docs = [document(i, 4 + i % 5) for i in range(30)] + [document(3, 7)]  # the last repeats document 3
    whole = run(tmp_path, tokenizer, docs, max_length=4096, validation=0.3)
    split = run(tmp_path, tokenizer, docs, max_length=40, validation=0.3, truncation="split")
    counts = split.report["counts"]
    assert counts["duplicates_exact"] == 1 and counts["split"] > 0
    assert (counts["train_documents"], counts["validation_documents"]) == (len(whole.train), len(whole.valid))
    assert counts["train"] > len(whole.train) and counts["validation"] > len(whole.valid)

    def joined(windows) -> list[list[int]]:
        """The documents the windows are of: a window goes on the one before it (on the token they share)
        until a window ends with the EOS that ends a document."""
        documents = []
        for w in windows:
            if documents and documents[-1][-1] != tokenizer.eos_token_id:
                documents[-1] += w.input_ids.tolist()[1:]
            else:
                documents.append(w.input_ids.tolist())
        return documents

    assert joined(split.train) == [e.input_ids.tolist() for e in whole.train]
    assert joined(split.valid) == [e.input_ids.tolist() for e in whole.valid]


def test_documents_cut_at_max_length_are_pointed_to_split(tmp_path, tokenizer):
    """Every document over max_length leaves its EOS untrained: the refusal, and the warning where some
    fit, name data.truncation: split, which trains them whole."""
    with pytest.raises(DataError) as err:
        run(tmp_path, tokenizer, [document(i, 6) for i in range(3)], max_length=32)
    assert err.value.code == "eos_never_trained" and "data.truncation: split" in str(err.value)
    cut = run(tmp_path, tokenizer, [document(0, 6), document(1, 1)], max_length=32)
    (warning,) = [w for w in cut.report["warnings"] if w["code"] == "truncated"]
    assert "or split to train each text document whole" in warning["message"]


def test_a_folder_in_data_train_is_its_documents_and_a_binary_one_is_refused_by_name(tmp_path, tokenizer):
    docs = tmp_path / "wiki"
    (docs / "ops").mkdir(parents=True)
    (docs / "intro.md").write_text(document(0, 3)["text"])
    (docs / "ops" / "runbook.txt").write_text(document(1, 4)["text"])
    (docs / ".notes.md").write_text("a hidden draft")
    cfg = DataConfig(train=[{"path": str(docs), "weight": 2}], validation=None)
    assert cfg.train_files == [str(docs / "intro.md"), str(docs / "ops" / "runbook.txt")]
    assert cfg.train_weights == [2, 2]
    prepared = prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    assert prepared.report["counts"]["train_kept"] == 2 and len(prepared.train) == 4
    (docs / "scan.pdf").write_bytes(b"%PDF-1.4\n\x00\x01")
    with pytest.raises(DataError) as err:
        prepare(DataConfig(train=str(docs), validation=None), tokenizer, use_cache=False, log=lambda _: None)
    assert err.value.code == "unknown_file_type" and str(docs / "scan.pdf") in str(err.value)
    # Under on_error: skip the file is left out, and a warning names it and why.
    skipped = prepare(DataConfig(train=str(docs), validation=None, on_error="skip"), tokenizer, use_cache=False)
    (warning,) = [w for w in skipped.report["warnings"] if w["code"] == "files_skipped"]
    assert warning["count"] == 1 and warning["where"] == [str(docs / "scan.pdf")]
    assert f"{docs / 'scan.pdf'} (unknown_file_type)" in warning["message"]


def test_a_kto_data_set_of_one_rating_is_refused_under_skip_not_called_a_file_left_out(tmp_path, tokenizer):
    """on_error: skip leaves bad rows out; a data set rated one way alone has no bad row to leave out."""
    rated = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": True} for i in range(12)]
    with pytest.raises(DataError) as err:
        run(tmp_path, tokenizer, rated, on_error="skip")
    assert [p.code for p in err.value.problems] == ["kto_one_label"]
    cfg = DataConfig(train=str(tmp_path / "train.jsonl"), validation=None, on_error="skip")
    checked, _ = check_data(cfg, tokenizer)
    assert "files_skipped" not in {w["code"] for w in checked.report["warnings"]}


def test_split_refuses_conversations_and_says_what_to_use(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="data.format is chat"):
        DataConfig(train="x.jsonl", format="chat", truncation="split")
    path = write_jsonl(tmp_path / "chats.jsonl", rows(3))
    with pytest.raises(DataError) as err:
        cfg = DataConfig(train=str(path), validation=None, truncation="split", on_error="skip")
        prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    assert err.value.code == "split_not_text" and f"{path}:1" in str(err.value)
    assert "data.truncation: truncate or drop" in str(err.value)
    with pytest.raises(DataError) as strict:  # on_error: skip stops it too, so it is not the way out
        prepare(cfg.model_copy(update={"on_error": "strict"}), tokenizer, use_cache=False, log=lambda _: None)
    assert strict.value.code == "split_not_text" and "data.on_error: skip" not in str(strict.value)


def test_the_cache_is_reused_and_says_so(tmp_path, tokenizer, isolated_home):
    path = write_jsonl(tmp_path / "train.jsonl", rows(12))
    cfg = DataConfig(train=str(path), validation=0.25)
    said = []
    first = prepare(cfg, tokenizer, log=said.append)
    assert first.report["cache"]["reused"] is False
    second = prepare(cfg, tokenizer, log=said.append)
    assert second.report["cache"]["reused"] is True and any(line.startswith("data: reusing") for line in said)
    assert [e.input_ids for e in second.train] == [e.input_ids for e in first.train]
    assert [e.labels for e in second.valid] == [e.labels for e in first.valid]
    assert (isolated_home / "data-cache" / first.report["cache"]["key"] / "train.parquet").is_file()

    other = prepare(cfg.model_copy(update={"max_length": 512}), tokenizer, log=said.append)
    assert other.report["cache"]["key"] != first.report["cache"]["key"]
    path.write_text(path.read_text() + json.dumps(GOOD_ROW) + "\n")
    changed = prepare(cfg, tokenizer, log=said.append)
    assert changed.report["cache"]["reused"] is False


def test_tokens_are_held_as_int32_arrays_from_tokenization_through_the_cache_to_the_batch(
    tmp_path, tokenizer, isolated_home
):
    """Token ids, labels and positions take 4 bytes a token (not a Python int each), prepared fresh and
    reused from the cache, and the batches packed from them hold exactly the chat template's tokens."""
    data = rows(24)
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "train.jsonl", data)), validation=None, max_length=128)
    fresh = prepare(cfg, tokenizer, log=lambda _: None)
    cached = prepare(cfg, tokenizer, log=lambda _: None)
    assert cached.report["cache"]["reused"] is True
    batches = []
    for prepared in (fresh, cached):
        for share in (True, False):
            packed = pack(prepared.train, cfg.max_length, share_prefixes=share)
            held = [s for e in prepared.train for s in (e.input_ids, e.labels)]
            held += [s for r in packed for s in (r.input_ids, r.labels, r.position_ids)]
            assert all(isinstance(s, array) and s.itemsize == 4 for s in held)
            batches.append(collate(packed, tokenizer.pad_token_id))
    for a, b in zip(batches[:2], batches[2:]):  # the same batches from the cache
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert batches[0]["input_ids"].numel() < batches[1]["input_ids"].numel()  # the system prompt held once

    # Each example of the unshared batch, read back from its positions, is its row's chat as the tokenizer
    # tokenizes it, with shifted labels that train its reply and end of turn.
    batch, examples = batches[1], []
    for ids, labels, positions in zip(*(batch[k].tolist() for k in ("input_ids", "labels", "position_ids"))):
        starts = [t for t, p in enumerate(positions) if p == 0] + [len(positions)]
        examples += [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
    examples = [(ids, labels) for ids, labels in examples if any(label != IGNORE_INDEX for label in labels)]
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in data]
    tokenized = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert sorted(ids for ids, _ in examples) == sorted(tokenized)
    for ids, labels in examples:
        assert labels[-1] == IGNORE_INDEX and all(label in (IGNORE_INDEX, i) for label, i in zip(labels, ids[1:]))
        reply = tokenizer.decode([label for label in labels if label != IGNORE_INDEX])
        assert reply.startswith("Answer ") and reply.endswith(": use the console.<|im_end|>")


def test_data_reused_from_the_cache_is_logged_with_its_warnings_as_when_it_was_prepared(
    tmp_path, tokenizer, isolated_home
):
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "train.jsonl", rows(3))), validation=None)
    first, again = [], []
    prepare(cfg, tokenizer, log=first.append)
    assert prepare(cfg, tokenizer, log=again.append).report["cache"]["reused"] is True
    said = [line for line in first if line.startswith("data: 3 training") or line.startswith("data: warning:")]
    assert any("only 3 training examples" in line for line in said)
    assert [line for line in again if line in said] == said


def test_a_cache_entry_damaged_after_it_was_written_is_prepared_again(tmp_path, tokenizer, isolated_home):
    path = write_jsonl(tmp_path / "train.jsonl", rows(12))
    cfg = DataConfig(train=str(path), validation=0.25)
    first = prepare(cfg, tokenizer, log=lambda _: None)
    entry = isolated_home / "data-cache" / first.report["cache"]["key"]
    parquet = entry / "train.parquet"
    parquet.write_bytes(parquet.read_bytes()[:100])  # a disk fault, or a copy of the cache cut short
    said = []
    again = prepare(cfg, tokenizer, log=said.append)
    assert f"the cached data set in {entry} cannot be read" in said[0] and "preparing it again" in said[0]
    assert again.report["cache"]["reused"] is False
    assert [e.input_ids for e in again.train] == [e.input_ids for e in first.train]
    # Replaced by a whole entry: the next run reuses it.
    assert prepare(cfg, tokenizer, log=lambda _: None).report["cache"]["reused"] is True


def test_a_cache_that_cannot_be_written_is_only_a_warning(tmp_path, tokenizer, monkeypatch):
    blocked = tmp_path / "home-is-a-file"
    blocked.write_text("")
    monkeypatch.setenv("TUNEFORGE_HOME", str(blocked))
    said = []
    prepared = prepare(DataConfig(train=str(write_jsonl(tmp_path / "t.jsonl", rows(12)))), tokenizer, log=said.append)
    assert len(prepared.train) + len(prepared.valid) == 12
    assert "could not cache" in said[-1]


def test_general_mix_adds_replay_conversations_in_the_asked_share(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", rows(40))
    plain = prepare(DataConfig(train=str(path), validation=None), tokenizer, use_cache=False, log=lambda _: None)
    mixed = prepare(
        DataConfig(train=str(path), validation=None, general_mix=0.2, max_length=4096),
        tokenizer,
        use_cache=False,
        log=lambda _: None,
    )
    assert mixed.report["counts"]["general_mix"] == 10  # 10 / (40 + 10) = 20%
    assert len(mixed.train) == len(plain.train) + 10
    added = [tokenizer.decode(e.input_ids) for e in mixed.train[len(plain.train) :]]
    assert all("<|im_start|>assistant" in text for text in added)
    assert not set(added) & {tokenizer.decode(e.input_ids) for e in plain.train}
    # Replay is marked as such (train.replay_loss: kl_to_base learns it as the base's distribution).
    assert all(e.is_replay for e in mixed.train[len(plain.train) :]) and not any(e.is_replay for e in plain.train)


def test_the_cache_keeps_which_examples_are_general_replay(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    cfg = DataConfig(
        train=str(write_jsonl(tmp_path / "train.jsonl", rows(20))), validation=None, general_mix=0.2, max_length=4096
    )
    first = prepare(cfg, tokenizer, log=lambda _: None)
    again = prepare(cfg, tokenizer, log=lambda _: None)
    assert again.report["cache"]["reused"]
    assert [e.is_replay for e in again.train] == [e.is_replay for e in first.train]
    assert sum(e.is_replay for e in again.train) == 5


def code_tokenizer():
    """A byte-level BPE tokenizer (ChatML) trained on indented code, so it has tokens that join a newline and
    the spaces after it, as SmolLM2's does ("\\n " is one token)."""
    from tiny import CHATML_TEMPLATE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["user\nassistant\n  for x in xs:\n      print(x)\n  return"] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def test_a_reply_that_starts_with_whitespace_joining_the_prompt_is_a_row_problem(tmp_path):
    # "assistant\n" then "  for": the tokenizer joins the newline and the spaces into one token, so the
    # reply has no token boundary. That is this row's text, not the template: the other rows still train.
    tokenizer = code_tokenizer()
    assert "\u010a\u0120" in tokenizer.tokenize("assistant\n  for")  # "\n " is one token
    indented = chat("Show the loop", "  for x in xs:\n      print(x)")
    data = run(tmp_path, tokenizer, rows(12) + [indented], on_error="skip")
    assert data.report["counts"]["rejected_by_code"] == {"reply_joins_prompt": 1}
    assert data.report["errors"][0]["line"] == 13 and len(data.train) == 12


INDENTED = "  for x in xs:\n      print(x)"


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (chat("Show the loop", INDENTED) | {"system": "Be brief."}, "messages[1].content"),
        (
            {"conversations": [{"from": "human", "value": "Show the loop"}, {"from": "gpt", "value": INDENTED}]},
            "conversations[1].value",
        ),
        ({"prompt": "Show the loop", "completion": INDENTED}, "completion"),
        ({"instruction": "Show the loop", "output": INDENTED}, "output"),
        ({"prompt": "Show the loop", "chosen": INDENTED, "rejected": "No."}, "chosen"),
    ],
)
def test_a_reply_that_joins_the_prompt_is_named_by_the_row_s_field(tmp_path, row, field):
    # Found when the rendered text is tokenized, after the other rendering problems, and named as they are.
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    data, _ = check_data(DataConfig(train=str(path), validation=None), code_tokenizer(), keep_examples=False)
    assert [(e["code"], e["field"]) for e in data.report["errors"] if e["line"] == 1] == [("reply_joins_prompt", field)]


def test_general_mix_that_no_replay_conversation_fits_is_an_error_not_a_silent_zero(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", rows(40))
    replay = write_jsonl(tmp_path / "replay.jsonl", [chat("Tell me a long story", "Once upon a time " * 40)])
    cfg = DataConfig(train=str(path), validation=None, general_mix=0.2, general_replay=str(replay), max_length=64)
    with pytest.raises(DataError) as err:
        prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    assert err.value.code == "replay_too_long" and "max_length 64" in str(err.value)
    # Some fit: the rest are left out, and the report says so (a warning where the few left must repeat).
    write_jsonl(replay, [chat("Tell me a long story", "Once upon a time " * 40), chat("Hi", "Hello!")])
    data = prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    assert data.report["counts"]["general_mix"] == 10 and data.report["counts"]["general_replay_too_long"] == 1
    assert [w["count"] for w in data.report["warnings"] if w["code"] == "replay_repeated"] == [9]


def test_a_replay_file_too_small_for_general_mix_says_its_examples_repeat(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", rows(40))
    replay = write_jsonl(tmp_path / "replay.jsonl", [chat("Hi", "Hello!"), chat("How are you?", "Fine, thanks.")])
    cfg = DataConfig(train=str(path), validation=None, general_mix=0.2, general_replay=str(replay))
    data = prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    assert data.report["counts"]["general_mix"] == 10
    (warning,) = [w for w in data.report["warnings"] if w["code"] == "replay_repeated"]
    assert warning["count"] == 8 and "asks for 10 replay examples" in warning["message"]
    assert "repeated about 5.0 times" in warning["message"] and "lower data.general_mix" in warning["message"]
    # A few repeats are as a few epochs: nothing is said.
    write_jsonl(replay, [chat(f"Question {i}?", f"Answer {i}.") for i in range(4)])
    data = prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    assert not [w for w in data.report["warnings"] if w["code"] == "replay_repeated"]


def test_the_cache_is_not_reused_for_the_same_rows_at_another_path(tmp_path, tokenizer, isolated_home):
    # The report names files and lines: a copy elsewhere must get a report that names the copy.
    first = write_jsonl(tmp_path / "train.jsonl", rows(12))
    copy = write_jsonl(tmp_path / "copy.jsonl", rows(12))
    prepare(DataConfig(train=str(first)), tokenizer, log=lambda _: None)
    again = prepare(DataConfig(train=str(copy)), tokenizer, log=lambda _: None)
    assert again.report["cache"]["reused"] is False
    assert [f["path"] for f in again.report["files"]] == [str(copy)]


def test_rows_that_train_different_replies_or_offer_other_tools_are_not_duplicates(tmp_path, tokenizer):
    def turns(first_weight: int, tools: list[dict] | None = None) -> dict:
        row = chat("Question 1: how do I reset my password?", "Answer 1: use the console.")
        row["messages"][-1]["weight"] = first_weight
        row["messages"] += [
            {"role": "user", "content": "And for the web console?"},
            {"role": "assistant", "content": "The same way.", "weight": 1 - first_weight},
        ]
        return {**row, "tools": tools} if tools else row

    tool = {"type": "function", "function": {"name": "reset_password", "parameters": {"type": "object"}}}
    prepared = run(tmp_path, tokenizer, [turns(1), turns(0), turns(1, [tool]), turns(1)])
    assert prepared.report["counts"]["duplicates_exact"] == 1 and prepared.report["duplicates"][0]["of_line"] == 1
    assert sorted(trained_runs(e, tokenizer) for e in prepared.train) == [
        ["Answer 1: use the console.<|im_end|>"],
        ["Answer 1: use the console.<|im_end|>"],
        ["The same way.<|im_end|>"],
    ]
    # Nor near duplicates: they say the same words, but train other replies.
    near = run(tmp_path, tokenizer, [turns(1), turns(0), turns(1), *rows(10)], dedup="near")
    assert near.report["counts"]["duplicates_exact"] == 1 and near.report["counts"]["duplicates_near"] == 0
    assert [d["line"] for d in near.report["duplicates"]] == [3] and len(near.train) == 12


def test_tools_a_template_does_not_write_are_a_warning_naming_the_rows(tmp_path, tokenizer):
    # SmolLM2's ChatML writes only roles and contents: the tool definitions would vanish unsaid.
    tool = {"type": "function", "function": {"name": "reset_password", "parameters": {"type": "object"}}}
    data = rows(12)
    data[3] = {**data[3], "tools": [tool]}
    warnings = {w["code"]: w for w in run(tmp_path, tokenizer, data).report["warnings"]}
    assert warnings["tools_not_rendered"]["count"] == 1
    assert warnings["tools_not_rendered"]["where"] == [f"{tmp_path / 'train.jsonl'}:4"]

    writes_tools = tiny_tokenizer()
    writes_tools.chat_template = (
        "{% if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
        + writes_tools.chat_template
    )
    warnings = {w["code"] for w in run(tmp_path, writes_tools, data).report["warnings"]}
    assert "tools_not_rendered" not in warnings


@pytest.mark.parametrize(("name", "call_id", "warned"), [("llama3", "call_1", True), ("qwen2.5", "call_1", False)])
def test_content_beside_tool_calls_a_template_drops_is_a_warning_naming_the_reply(tmp_path, name, call_id, warned):
    # Llama 3.1's template writes a call alone: "Let me look." would not be trained, and nothing said so.
    tool = {"type": "function", "function": {"name": "get_order", "parameters": {"type": "object"}}}
    call = {"id": call_id, "type": "function", "function": {"name": "get_order", "arguments": "{}"}}
    data = rows(12)
    data[5] = {
        "tools": [tool],
        "messages": [
            {"role": "user", "content": "Where is my order?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
            {"role": "tool", "content": "shipped", "tool_call_id": call_id},
            {"role": "assistant", "content": "It has shipped."},
        ],
    }
    (tmp_path / name).mkdir()
    prepared = run(tmp_path / name, family_tokenizer(FAMILIES[name], tmp_path / name), data)
    warnings = {w["code"]: w for w in prepared.report["warnings"]}
    assert ("content_beside_calls_not_rendered" in warnings) is warned
    if warned:
        where = [f"{tmp_path / name / 'train.jsonl'}:6 messages[1].content"]
        assert warnings["content_beside_calls_not_rendered"]["where"] == where


def test_message_names_a_template_does_not_write_are_a_warning_naming_the_rows(tmp_path, tokenizer):
    data = rows(12)
    data[2]["messages"][1]["name"] = "alice"
    warnings = {w["code"]: w for w in run(tmp_path, tokenizer, data).report["warnings"]}
    assert warnings["names_not_rendered"]["where"] == [f"{tmp_path / 'train.jsonl'}:3"]

    writes_names = tiny_tokenizer()
    writes_names.chat_template = writes_names.chat_template.replace(
        "message['role'] + '\n'", "message['role'] + (' ' + message['name'] if message['name'] else '') + '\n'"
    )
    warnings = {w["code"] for w in run(tmp_path, writes_names, data).report["warnings"]}
    assert "names_not_rendered" not in warnings


def test_progress_follows_each_file_through_the_pass_and_is_off_unless_asked(tmp_path, tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    train = write_jsonl(tmp_path / "train.jsonl", rows(300))
    valid = write_jsonl(tmp_path / "valid.jsonl", [chat(t, "On it.") for t in TICKETS[:3]])
    cfg = DataConfig(train=str(train), validation=str(valid))
    prepare(cfg, tokenizer, use_cache=False, log=lambda _: None, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("data: valid.jsonl lines 1/3 (33%)")
    assert any(line.startswith("data: train.jsonl lines 150/300 (50%)") for line in lines)
    assert lines[-1].startswith("data: train.jsonl lines 300/300 (100%)") and "eta 0:00:00" in lines[-1]
    prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    assert capsys.readouterr().err == ""


def test_a_file_still_being_written_while_it_is_read_stops_even_when_skipping(tmp_path, tokenizer, monkeypatch):
    """A file appended to while it is read yields a half last line and rows of no one version of it: the
    run (and `data check`) says the file changed, first, rather than train on what it caught of it."""
    preparation = importlib.import_module("tuneforge.data.prepare")  # the module, not the function
    path = write_jsonl(tmp_path / "train.jsonl", rows(20))
    real = preparation.read_conversations

    def read_while_written(file, format):
        for i, item in enumerate(real(file, format)):
            if i == 3:  # another process appends, half a line at a time
                with open(path, "a", encoding="utf-8") as f:
                    f.write('{"messages": [{"role": "user", "content": "Late')
            yield item

    monkeypatch.setattr(preparation, "read_conversations", read_while_written)
    cfg = DataConfig(train=str(path), validation=None, on_error="skip")
    with pytest.raises(DataError) as err:
        prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    assert err.value.code == "file_changed"
    first = err.value.problems[0]
    assert first.file == str(path) and "changed while it was being read" in first.message
    assert "Wait until it is complete" in str(err.value)


def test_a_file_saved_over_before_it_is_read_is_not_cached_under_its_earlier_contents(
    tmp_path, tokenizer, isolated_home, monkeypatch
):
    """The cache key hashes the files before they are read: rows read from a later version must not be
    reused by a run on the earlier one."""
    preparation = importlib.import_module("tuneforge.data.prepare")
    earlier = rows(12)
    path = write_jsonl(tmp_path / "train.jsonl", earlier)
    real = preparation.check_data

    def saved_over_meanwhile(cfg, tokenizer, **kw):
        write_jsonl(path, rows(20))  # another terminal saves the file
        return real(cfg, tokenizer, **kw)

    cfg = DataConfig(train=str(path), validation=None)
    monkeypatch.setattr(preparation, "check_data", saved_over_meanwhile)
    assert len(prepare(cfg, tokenizer, log=lambda _: None).train) == 20
    monkeypatch.undo()
    monkeypatch.setenv("TUNEFORGE_HOME", str(isolated_home))
    write_jsonl(path, earlier)
    again = prepare(cfg, tokenizer, log=lambda _: None)
    assert len(again.train) == 12 and again.report["cache"]["reused"] is False


def test_a_file_saved_over_after_a_process_hashed_it_for_the_run_is_not_cached_under_its_earlier_contents(
    tmp_path, tokenizer, isolated_home
):
    """Several processes hash the data once, before they compare it across machines, and prepare it from that
    key: rows of a version saved after the hashing must not be cached under the earlier version's key."""
    earlier = rows(12)
    path = write_jsonl(tmp_path / "train.jsonl", earlier)
    cfg = DataConfig(train=str(path), validation=None)
    hashed = hash_data(cfg, tokenizer)  # refuse_other_runs_on_other_machines, as the run starts
    write_jsonl(path, rows(20))  # another terminal saves the file while the other machines start
    assert len(prepare(cfg, tokenizer, log=lambda _: None, hashed=hashed).train) == 20
    write_jsonl(path, earlier)
    again = prepare(cfg, tokenizer, log=lambda _: None)
    assert len(again.train) == 12 and again.report["cache"]["reused"] is False


def test_a_row_left_out_leaves_no_duplicate_behind_it(tmp_path, tokenizer):
    # Line 1 is the same row as line 12 but for its spacing (the content key ignores it), which makes it too
    # long to train: line 12 is not a repeat of a row that is not trained, it trains.
    spaced = chat("Short   question " + " " * 200 + "about passwords?", "Short answer.")
    data = [spaced, *rows(10), chat("Short question about passwords?", "Short answer.")]
    for cfg in ({"truncation": "drop"}, {"on_error": "skip"}):
        prepared = run(tmp_path, tokenizer, data, max_length=64, **cfg)
        assert prepared.report["counts"]["duplicates_exact"] == 0 and len(prepared.train) == 11, cfg
    # A near repeat of a row dropped as too long trains too.
    data = [chat(" ".join(TICKETS[:1] * 30), "We are on it."), *rows(10), chat(TICKETS[0], "We are on it.")]
    prepared = run(tmp_path, tokenizer, data, max_length=64, truncation="drop", dedup="near")
    assert prepared.report["counts"]["duplicates_near"] == 0 and len(prepared.train) == 11


def test_a_validation_row_left_out_removes_no_training_row(tmp_path, tokenizer):
    data = rows(12)
    # Row 4 spaced out (the same content key) is too long: it is dropped, and leaves row 4 in training.
    spaced = {"messages": [{**m, "content": m["content"].replace(" ", " " * 20)} for m in data[3]["messages"]]}
    train = write_jsonl(tmp_path / "train.jsonl", data)
    valid = write_jsonl(tmp_path / "valid.jsonl", [spaced, chat("A new question?", "A new answer.")])
    cfg = DataConfig(train=str(train), validation=str(valid), max_length=64, truncation="drop")
    prepared = prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    assert prepared.report["counts"]["validation_leak"] == 0
    assert len(prepared.train) == 12 and len(prepared.valid) == 1


@pytest.mark.parametrize("dedup", ["exact", "near"])
def test_what_dedup_leaves_out_is_the_same_whatever_rows_render_at_once(tmp_path, tokenizer, monkeypatch, dedup):
    # Repeats of rows still rendering, of rows left out as too long, and near repeats of a row that an
    # exact repeat follows: decided in file order, as if every row were rendered alone.
    long = chat(" ".join(TICKETS[:1] * 30), "We are on it.")
    data = [long, chat(TICKETS[0], "We are on it."), *rows(4), rows(4)[1], chat(TICKETS[0] + " now", "We are on it.")]
    data += [chat(TICKETS[0].upper(), "We are on it."), *rows(8)[4:], rows(8)[5], long]
    path = write_jsonl(tmp_path / "train.jsonl", data)
    cfg = DataConfig(train=str(path), validation=None, max_length=64, truncation="drop", dedup=dedup)
    cfg.near_dedup_threshold = 0.8  # line 8 is line 2 with one more word
    prepare_module = importlib.import_module("tuneforge.data.prepare")  # the module, not the function

    def left_out() -> tuple:
        data, _, selection = prepare_module.select_rows(cfg, tokenizer)
        return selection.train, sorted(selection.left_out.items()), data.report["duplicates"]

    whole = left_out()
    # Line 15 repeats line 1 (left out): too long itself; a near repeat of line 2 with dedup: near.
    assert [why["reason"] for _, why in whole[1]].count("over_max_length") == (2 if dedup == "exact" else 1)
    assert whole[0] == [(0, line) for line in (2, 3, 4, 5, 6, *([8] if dedup == "exact" else []), 10, 11, 12, 13)]
    for rows_at_once in (1, 2, 3):
        monkeypatch.setattr(prepare_module, "_CHUNK_ROWS", rows_at_once)
        assert left_out() == whole, rows_at_once


def test_rows_that_train_other_reasoning_or_tool_calls_are_not_near_duplicates(tmp_path):
    # Traces sampled for one problem (same question, same answer) and calls of other tools teach other things.
    tokenizer = family_tokenizer(FAMILIES["qwen3"], tmp_path / "qwen3")

    def row(reasoning: str | None = None, tool: str | None = None, **arguments) -> dict:
        data = chat("What is seventeen times twenty three, and what is the weather?", "391, and sunny.")
        data["messages"][-1]["reasoning_content"] = reasoning
        if tool:
            call = {"type": "function", "function": {"name": tool, "arguments": arguments}}
            data["messages"][-1]["tool_calls"] = [call]
        return data

    data = [row("17 * 20 = 340, 17 * 3 = 51, so 391."), row("23 * 10 = 230 and 23 * 7 = 161: 391.")]
    data += [row(tool="weather", city="Paris"), row(tool="stock_price", ticker="ACME", exchange="NYSE")]
    data += [row(tool="weather", city="Paris, France"), *rows(10)]  # one more word: a near repeat of line 3
    prepared = run(tmp_path, tokenizer, data, dedup="near", near_dedup_threshold=0.8)
    assert [(d["line"], d["of_line"]) for d in prepared.report["duplicates"]] == [(5, 3)]


def weighted_mix(tmp_path, weights=(2, 0.5), **cfg) -> DataConfig:
    """A file of 10 rows (and a repeat of its first) and one of 20, listed with `weights`."""
    small = rows(10)
    small.append(small[0])  # a duplicate that dedup leaves out before any weight applies
    big = [chat(f"Other question {i}: where are the invoices?", f"Other answer {i}.") for i in range(20)]
    paths = [write_jsonl(tmp_path / "small.jsonl", small), write_jsonl(tmp_path / "big.jsonl", big)]
    cfg.setdefault("validation", None)
    return DataConfig(train=[{"path": str(p), "weight": w} for p, w in zip(paths, weights)], **cfg)


def test_weights_repeat_or_halve_each_files_kept_rows_once_dedup_and_validation_are_done(
    tmp_path, tokenizer, isolated_home
):
    cfg = weighted_mix(tmp_path, validation=0.2)
    data = prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    small, big = data.report["files"]
    # Dedup and the split run on each file's rows once: the repeat of line 1 is a duplicate, not a copy.
    assert data.report["counts"]["duplicates_exact"] == 1
    assert small["train_rows"] + small["validation_rows"] == 10 and big["train_rows"] + big["validation_rows"] == 20
    assert (small["weight"], small["rows_per_epoch"]) == (2, 2 * small["train_rows"])
    assert (big["weight"], big["rows_per_epoch"]) == (0.5, round(big["train_rows"] / 2))
    assert len(data.train) == data.report["counts"]["train"] == small["rows_per_epoch"] + big["rows_per_epoch"]
    assert data.report["counts"]["train_kept"] == small["train_rows"] + big["train_rows"]
    assert len(data.valid) == data.report["counts"]["validation"] == small["validation_rows"] + big["validation_rows"]

    def text(e):
        return tokenizer.decode(e.input_ids)

    seen = Counter(text(e) for e in data.train)
    assert sorted(Counter(n for t, n in seen.items() if "Question" in t).items()) == [(2, small["train_rows"])]
    assert set(Counter(n for t, n in seen.items() if "Other" in t)) == {1}
    assert not {text(e) for e in data.valid} & set(seen)  # validation rows are never weighted into training
    # The half is chosen by content: the same rows on a rerun, whatever the order of the file.
    again = prepare(cfg, tokenizer, use_cache=False, log=lambda _: None)
    assert [text(e) for e in again.train] == [text(e) for e in data.train]
    # Packed, a row's copies go to different packed rows, for the epoch's shuffle to spread.
    for row in pack(data.train, 256):
        starts = [t for t, p in enumerate(row.position_ids) if p == 0] + [len(row)]
        held = [row.input_ids[a:b].tobytes() for a, b in zip(starts, starts[1:])]
        assert len(held) == len(set(held))


def test_a_weights_part_takes_at_least_one_row_and_the_report_tells_each_files_share(tmp_path, tokenizer):
    lines = []
    data = prepare(weighted_mix(tmp_path, weights=(1.5, 0.01)), tokenizer, use_cache=False, log=lines.append)
    small, big = data.report["files"]
    assert (small["rows_per_epoch"], big["rows_per_epoch"]) == (15, 1)
    assert any("small.jsonl" in line and "weight 1.5: 15 rows per epoch" in line for line in lines)
    assert any("big.jsonl" in line and "weight 0.01: 1 row per epoch" in line for line in lines)


def test_the_cache_key_follows_the_weights_and_not_a_weight_of_one(tmp_path, tokenizer):
    from tuneforge.data import cache

    weighted = weighted_mix(tmp_path)
    keys = {
        w: cache.cache_key(weighted.model_copy(update={"train": weighted_mix(tmp_path, w).train}), tokenizer)
        for w in ((2, 0.5), (3, 0.5), (1, 1))
    }
    assert len(set(keys.values())) == 3
    plain = DataConfig(train=[str(tmp_path / "small.jsonl"), str(tmp_path / "big.jsonl")], validation=None)
    assert cache.cache_key(plain, tokenizer) == keys[(1, 1)]


def test_one_reply_given_to_many_different_prompts_is_flagged_but_labels_are_not(tmp_path, tokenizer):
    refusal = "I'm sorry, but I cannot help with that request."
    data = rows(12) + [chat(f"Tell me about topic {i}.", refusal) for i in range(4)]
    prepared = run(tmp_path, tokenizer, data)
    [warning] = [w for w in prepared.report["warnings"] if w["code"] == "repeated_reply"]
    path = tmp_path / "train.jsonl"
    assert warning["count"] == 4 and warning["where"] == [f"{path}:13", f"{path}:14", f"{path}:15"]
    assert f"{refusal!r} in 4: {path}:13, {path}:14, {path}:15, ...)" in warning["message"]
    assert len(prepared.train) == 16  # flagged, still trained

    # Classification data repeats a few labels by design.
    labels = ['{"category": "outage", "priority": "urgent"}', '{"category": "billing", "priority": "low"}']
    labelled = [chat(f"Ticket {i}: something is wrong.", labels[i % 2]) for i in range(16)]
    prepared = run(tmp_path, tokenizer, labelled)
    assert "repeated_reply" not in {w["code"] for w in prepared.report["warnings"]}

    # JSON labels from a wide label space (the quickstart's tickets): most are given once, a few repeat.
    wide = [{"category": f"c{i}", "priority": "low"} for i in range(10)] + [{"category": "c0", "priority": "low"}] * 3
    labelled = [chat(f"Ticket {i}: something is wrong.", json.dumps(label)) for i, label in enumerate(wide)]
    prepared = run(tmp_path, tokenizer, labelled)
    assert "repeated_reply" not in {w["code"] for w in prepared.report["warnings"]}


def test_a_reply_opening_with_brackets_nested_past_what_python_reads_is_tallied_as_text(tmp_path, tokenizer):
    # Python's JSON reader gives up on such nesting with a RecursionError, not a ValueError.
    nested = "[" * 5000 + "]" * 5000 + " is as deep as it goes."
    prepared = run(tmp_path, tokenizer, rows(12) + [chat(f"Tell me about topic {i}.", nested) for i in range(4)])
    assert "repeated_reply" in {w["code"] for w in prepared.report["warnings"]}
