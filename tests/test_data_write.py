"""`tuneforge data prepare`: the rows a run trains and validates on, and those it leaves out, written out."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import yaml
from conftest import tiny_run_config
from data.rows import chat, write_jsonl

from tuneforge.cli import main
from tuneforge.pipeline import train

LONG_TICKET = (
    "our production database cluster in the west region stopped accepting connections after the "
    "maintenance window last night and every query now times out after thirty seconds, which means "
    "our customers cannot check out and we are losing orders every minute"
)


def cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["tuneforge", *args])
    with pytest.raises(SystemExit) as leaving:
        main()
    said = capsys.readouterr()
    return leaving.value.code, said.out, said.err


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def curated(tmp_path, tiny_model_dir, monkeypatch):
    """A config over a file with an exact duplicate, a near duplicate, a row over max_length and a bad row."""
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    ask = "Ticket {}: my login number {} fails with error {}, what now?"
    rows = [chat(ask.format(i, i, i * 7), f"Reset {i}.") for i in range(12)]
    rows[3:3] = [chat(LONG_TICKET, "Escalate.")]  # line 4
    rows.insert(6, rows[1])  # line 7: an exact repeat of line 2
    rows.insert(8, chat(LONG_TICKET.replace("thirty", "forty"), "Escalate."))  # line 9: near line 4
    rows.insert(10, chat("Tell me a very long story. " * 40, "Once upon a time."))  # line 11: over max_length
    rows.insert(12, {"messages": [{"role": "robot", "content": "beep"}]})  # line 13: a row error
    data = write_jsonl(tmp_path / "tickets.jsonl", rows)
    cfg = tiny_run_config(tiny_model_dir, {"train": data, "validation": data}, tmp_path / "run-original", max_steps=1)
    cfg["data"] = {
        "train": str(data),
        "validation": 0.25,
        "max_length": 256,
        "truncation": "drop",
        "dedup": "near",
        "on_error": "skip",
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config, cfg, rows


def test_prepare_writes_kept_and_dropped_rows_and_trains_on_the_same_examples(curated, tmp_path, monkeypatch, capsys):
    config, cfg, rows = curated
    out = tmp_path / "prepared"
    code, said, _ = cli(["data", "prepare", str(config), "--out", str(out)], monkeypatch, capsys)
    assert code == 0 and "rows left out" in said
    assert sorted(p.name for p in out.iterdir()) == ["dropped.jsonl", "summary.json", "train.jsonl", "valid.jsonl"]

    dropped = {d["line"]: d for d in read_jsonl(out / "dropped.jsonl")}
    data = cfg["data"]["train"]
    assert dropped[7]["reason"] == "duplicate" and dropped[7]["of"] == f"{data}:2" and dropped[7]["row"] == rows[6]
    assert dropped[9]["reason"] == "near_duplicate" and dropped[9]["of"] == f"{data}:4"
    assert 0.85 <= dropped[9]["similarity"] < 1
    assert dropped[11]["reason"] == "over_max_length" and dropped[11]["tokens"] > 256 == dropped[11]["max_length"]
    assert dropped[13]["reason"] == "error" and dropped[13]["errors"][0]["code"] == "unrecognized_role"
    assert sorted(dropped) == [7, 9, 11, 13]

    train_rows, valid_rows = read_jsonl(out / "train.jsonl"), read_jsonl(out / "valid.jsonl")
    kept = [r for i, r in enumerate(rows, 1) if i not in dropped]
    assert len(train_rows) + len(valid_rows) == len(kept) and valid_rows
    assert train_rows == [r for r in kept if r not in valid_rows]  # the rows as read, in file order
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == {
        "train": len(train_rows),
        "validation": len(valid_rows),
        "dropped": 4,
        "dropped_by_reason": {"duplicate": 1, "near_duplicate": 1, "over_max_length": 1, "error": 1},
    }

    assert summary["written_as"] == {"train": "as read", "validation": "as read"}
    assert_trains_the_same(config, cfg, out, summary, tmp_path)


def assert_trains_the_same(config, cfg: dict, out, summary: dict, tmp_path) -> None:
    """Training on the written files, deduplicated already, sees the same examples and tokens."""
    original = train(config, progress=False).output_dir
    written = {**cfg, "data": {**summary["train_with"]}, "output_dir": str(tmp_path / "run-written")}
    written["data"].update(train=str(out / "train.jsonl"), validation=str(out / "valid.jsonl"))
    assert written["data"]["dedup"] == "none"
    again = train(written, progress=False).output_dir
    reports = [json.loads((run / "data_report.json").read_text()) for run in (original, again)]
    for key in ("train", "validation"):
        assert reports[0]["counts"][key] == reports[1]["counts"][key]
    for key in ("total", "trained"):
        assert reports[0]["tokens"][key] == reports[1]["tokens"][key]


def mixed_config(tmp_path, tiny_model_dir, files: dict[str, list[dict]]):
    """A config over files of different formats, with a validation fraction drawn from all of them."""
    paths = [str(write_jsonl(tmp_path / name, rows)) for name, rows in files.items()]
    cfg = tiny_run_config(tiny_model_dir, {"train": paths[0], "validation": paths[0]}, tmp_path / "run", max_steps=1)
    cfg["data"] = {"train": paths, "validation": 0.25, "max_length": 256}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config, cfg


def test_prepare_writes_rows_of_files_in_different_formats_as_chat(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    config, cfg = mixed_config(
        tmp_path,
        tiny_model_dir,
        {
            "chat.jsonl": [
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": f"Chat question {i}?"},
                        {"role": "assistant", "content": f"Draft {i}.", "weight": 0},
                        {"role": "user", "content": "Again?"},
                        {"role": "assistant", "content": f"Chat answer {i}."},
                    ]
                }
                for i in range(6)
            ],
            "alpaca.jsonl": [
                {"instruction": f"Alpaca task {i}", "input": f"context {i}" if i % 2 else "", "output": f"Done {i}."}
                for i in range(6)
            ],
            "pc.jsonl": [{"prompt": f"Prompt {i}", "completion": f"Completion {i}."} for i in range(6)],
        },
    )
    out = tmp_path / "prepared"
    code, said, _ = cli(["data", "prepare", str(config), "--out", str(out)], monkeypatch, capsys)
    assert code == 0 and "train.jsonl's rows come from files of different formats" in said
    train_rows, valid_rows = read_jsonl(out / "train.jsonl"), read_jsonl(out / "valid.jsonl")
    assert len(train_rows) + len(valid_rows) == 18 and valid_rows
    assert all(list(row) == ["messages"] for row in train_rows + valid_rows)
    messages = [m for row in train_rows + valid_rows for m in row["messages"]]
    assert {"role": "assistant", "content": "Draft 2.", "weight": 0} in messages  # the weight kept
    assert {"role": "user", "content": "Alpaca task 3\n\ncontext 3"} in messages
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written_as"] == {"train": "chat", "validation": "chat"}
    assert_trains_the_same(config, cfg, out, summary, tmp_path)


def test_prepare_under_pii_redact_writes_placeholders_and_trains_the_same(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    rows = [chat(f"Ticket {i}: mail me at jane{i}@acme.io", f"Sent to jane{i}@acme.io.") for i in range(8)]
    rows.append({"messages": [{"role": "robot", "content": "call +1 415-555-0132"}]})  # a row error, left out
    config, cfg = mixed_config(tmp_path, tiny_model_dir, {"tickets.jsonl": rows})
    cfg["data"].update(pii="redact", on_error="skip")
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "prepared"
    code, said, _ = cli(["data", "prepare", str(config), "--out", str(out)], monkeypatch, capsys)
    assert code == 0 and "typed placeholders" in said
    written = "".join(
        (out / name).read_text() for name in ("train.jsonl", "valid.jsonl", "dropped.jsonl", "summary.json")
    )
    assert "acme.io" not in written and "415-555" not in written
    train_rows = read_jsonl(out / "train.jsonl")
    assert train_rows[0]["messages"][-1] == {"role": "assistant", "content": "Sent to <EMAIL>."}
    assert read_jsonl(out / "dropped.jsonl")[0]["row"]["messages"][0]["content"] == "call <PHONE>"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written_as"] == {"train": "chat", "validation": "chat"}
    assert_trains_the_same(config, cfg, out, summary, tmp_path)


def test_prepare_refuses_text_and_conversation_files_that_no_one_file_holds(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    config, _ = mixed_config(
        tmp_path,
        tiny_model_dir,
        {
            "chat.jsonl": [chat(f"Question {i}?", f"Answer {i}.") for i in range(4)],
            "notes.jsonl": [{"text": f"Plain note number {i}."} for i in range(4)],
        },
    )
    out = tmp_path / "prepared"
    code, _, err = cli(["data", "prepare", str(config), "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "notes.jsonl" in err and "separate" in err
    assert not out.exists()


def test_prepare_refuses_a_folder_that_is_not_empty_unless_forced(curated, tmp_path, monkeypatch, capsys):
    config, _, _ = curated
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(["data", "prepare", str(config), "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "not empty" in err and "--force" in err
    assert (out / "notes.txt").read_text() == "mine"
    code, _, _ = cli(["data", "prepare", str(config), "--out", str(out), "--force"], monkeypatch, capsys)
    assert code == 0 and not (out / "notes.txt").exists() and (out / "train.jsonl").is_file()


def test_prepare_refuses_a_mount_point_naming_a_folder_inside_it(curated, tmp_path, monkeypatch, capsys):
    """A container's volume as --out cannot be renamed away to swap the rows in: refused, nothing written."""
    import psutil

    config, _, _ = curated
    out = tmp_path / "volume"
    out.mkdir()
    partitions = psutil.disk_partitions(all=True)
    bound = SimpleNamespace(device="/srv/data", mountpoint=str(out), fstype="none", opts="rw,bind")
    monkeypatch.setattr(psutil, "disk_partitions", lambda all=False: [*partitions, bound])
    code, _, err = cli(["data", "prepare", str(config), "--out", str(out), "--force"], monkeypatch, capsys)
    assert code != 0 and f"{out}: a mount point" in " ".join(err.split()) and "Traceback" not in err
    assert list(out.iterdir()) == [] and not list(tmp_path.glob(".tmp-volume-*"))


def test_prepare_refuses_row_errors_under_strict_and_writes_nothing(curated, tmp_path, monkeypatch, capsys):
    config, _, _ = curated
    out = tmp_path / "prepared"
    code, _, err = cli(["data", "prepare", str(config), "data.on_error=strict", "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "unrecognized_role" in err and ":13" in err
    assert not out.exists() and list(tmp_path.glob(".tmp-*")) == []


def test_prepare_writes_a_weighted_files_rows_as_often_as_an_epoch_sees_them(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    small = [chat(f"Ticket {i}: my login fails, what now?", f"Reset {i}.") for i in range(6)]
    big = [chat(f"Invoice {i}: where is it?", f"Billing {i}.") for i in range(12)]
    config, cfg = mixed_config(tmp_path, tiny_model_dir, {"small.jsonl": small + small[:1], "big.jsonl": big})
    cfg["data"]["train"] = [
        {"path": cfg["data"]["train"][0], "weight": 2},
        {"path": cfg["data"]["train"][1], "weight": 0.5},
    ]
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "prepared"
    code, _, _ = cli(["data", "prepare", str(config), "--out", str(out)], monkeypatch, capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    small_file, big_file = summary["files"]
    train_rows = read_jsonl(out / "train.jsonl")
    assert len(train_rows) == small_file["rows_per_epoch"] + big_file["rows_per_epoch"]
    assert sum(r in small for r in train_rows) == 2 * small_file["train_rows"]
    assert sum(r in big for r in train_rows) == round(big_file["train_rows"] / 2)
    assert summary["train_with"]["train"] == "train.jsonl"  # the weights are in the rows written
    assert_trains_the_same(config, cfg, out, summary, tmp_path)
