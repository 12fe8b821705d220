"""General replay against forgetting: a chat file (bundled chit-chat, or a model's own replies written
by the teacher-data generator) mixed into training by `data.general_mix`."""

import io
import json

import pytest
from conftest import tiny_run_config
from rich.console import Console
from tiny_sharp import save_sharp_tiny_model

from tuneforge.config import DataConfig
from tuneforge.data import prepare
from tuneforge.errors import DataError
from tuneforge.models import load_model, load_tokenizer
from tuneforge.quickstart import write_self_replay
from tuneforge.tasks.general import general_conversations, replay_prompts


@pytest.fixture(scope="module")
def ending_model_dir(tmp_path_factory):
    """A tiny model whose greedy replies differ from prompt to prompt and often end before the limit:
    the token its replies use most is listed as a second end-of-reply id in its generation config
    (as Llama 3 lists two), so some replies finish and others are cut."""
    from collections import Counter

    from transformers import AutoModelForCausalLM, GenerationConfig

    from tuneforge.generate import generate

    folder = save_sharp_tiny_model(tmp_path_factory.mktemp("replay") / "model")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), load_tokenizer(str(folder))
    replies = generate(
        model, tokenizer, [[{"role": "user", "content": p}] for p in replay_prompts()[:8]], max_new_tokens=32
    )
    common = Counter(t for r in replies for t in r.token_ids).most_common(1)[0][0]
    config = GenerationConfig.from_pretrained(folder)
    config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), common]
    config.save_pretrained(folder)
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def mixed_replay(prepared) -> list[list[int]]:
    return [e.input_ids for e in prepared.train if e.is_replay]


def test_a_replay_file_is_mixed_in_like_the_bundled_chitchat(triage_data, tmp_path, tokenizer, home):
    chitchat = DataConfig(train=str(triage_data["train"]), validation=None, general_mix=0.2, max_length=4096)
    bundled = prepare(chitchat, tokenizer, log=lambda _: None)
    own = tmp_path / "replay.jsonl"
    own.write_text("".join(json.dumps({"messages": m}) + "\n" for m in general_conversations()))
    from_file = prepare(chitchat.model_copy(update={"general_replay": str(own)}), tokenizer, log=lambda _: None)
    assert mixed_replay(bundled) == mixed_replay(from_file) and len(mixed_replay(bundled)) == 24  # 24 / 120 = 20%
    # The cache is keyed by the replay file's content: other replies, another data set.
    own.write_text("".join(json.dumps({"messages": m}) + "\n" for m in general_conversations()[1:]))
    changed = prepare(chitchat.model_copy(update={"general_replay": str(own)}), tokenizer, log=lambda _: None)
    assert not changed.report["cache"]["reused"] and mixed_replay(changed) != mixed_replay(from_file)


def test_a_missing_or_broken_replay_file_names_the_file_and_line(triage_data, tmp_path, tokenizer, home):
    cfg = DataConfig(
        train=str(triage_data["train"]),
        validation=None,
        general_mix=0.2,
        general_replay=str(tmp_path / "nowhere.jsonl"),
    )
    with pytest.raises(DataError, match=r"data.general_replay: .*nowhere.jsonl is not a file.*chitchat"):
        prepare(cfg, tokenizer, log=lambda _: None)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}) + "\n")
    with pytest.raises(DataError, match=r"broken.jsonl:1 messages\[1\].content: \[missing_content\]"):
        prepare(cfg.model_copy(update={"general_replay": str(broken)}), tokenizer, log=lambda _: None)
    for rows, kind in (
        ([{"text": "Some prose."}], "text"),
        ([{"prompt": "Hi", "chosen": "Hello", "rejected": "No"}], "preference"),
    ):
        other = tmp_path / f"{kind}.jsonl"
        other.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match=rf"{kind}.jsonl:1: \[data_type\] this row is {kind} data, but replay rows"):
            prepare(cfg.model_copy(update={"general_replay": str(other)}), tokenizer, log=lambda _: None)


def test_self_replay_is_the_base_models_greedy_replies_without_the_empty_ones(ending_model_dir, tmp_path, one_thread):
    from tuneforge.generate import generate

    model_dir = str(ending_model_dir)
    replay = write_self_replay(model_dir, tmp_path, max_new_tokens=12)
    tokenizer = load_tokenizer(model_dir)
    prompts = replay_prompts()
    replies = generate(
        load_model(model_dir).eval(), tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=12
    )
    assert {r.finish_reason for r in replies} == {"stop", "length"}  # cut replies stay: replay_loss kl_to_base
    expected = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": r.text}]
        for p, r in zip(prompts, replies)
        if r.text.strip()
    ]
    assert [json.loads(line)["messages"] for line in replay.read_text().splitlines()] == expected
    first = replay.read_text()
    assert write_self_replay(model_dir, tmp_path, max_new_tokens=12).read_text() == first
    # A rerun finds the answers complete: none is generated (or appended) twice.
    assert (tmp_path / "replay-answers.jsonl").read_text().count("\n") == len(prompts)


def test_self_replay_written_by_another_model_is_written_anew(ending_model_dir, tmp_path, one_thread):
    # A quickstart rerun into the same folder with another --model replays that model's replies, not the first's.
    sharp = str(save_sharp_tiny_model(tmp_path / "sharp"))
    write_self_replay(sharp, tmp_path / "data", max_new_tokens=12)
    printed = io.StringIO()
    replay = write_self_replay(str(ending_model_dir), tmp_path / "data", 12, Console(file=printed, width=300))
    assert replay.read_text() == write_self_replay(str(ending_model_dir), tmp_path / "fresh", 12).read_text()
    assert "does not hold" in printed.getvalue() and "writing them anew" in printed.getvalue()


def test_a_training_run_mixes_in_the_replay_file(tiny_model_dir, triage_data, tmp_path, home, one_thread):
    from tuneforge.training import train

    cfg = tiny_run_config(tiny_model_dir, triage_data, tmp_path / "run", max_steps=2)
    cfg["data"].update(general_mix=0.25, general_replay="chitchat")
    train(cfg, progress=False)
    counts = json.loads((tmp_path / "run" / "data_report.json").read_text())["counts"]
    assert counts["general_mix"] > 0 and counts["general_mix"] == round(
        0.25 / 0.75 * (counts["train"] - counts["general_mix"])
    )


def test_a_model_that_replies_with_no_text_gives_no_replay_and_says_so(tiny_model_dir, tmp_path, one_thread):
    from tuneforge.errors import RunFailed

    # The plain tiny model answers every prompt with newlines only.
    with pytest.raises(RunFailed, match=r"answered none of the 200 general prompts with any text"):
        write_self_replay(str(tiny_model_dir), tmp_path, max_new_tokens=4)
