"""General replay against forgetting: the base model's own replies (self) or chit-chat, mixed by `data.general_mix`."""

import json
import os

import pytest
from conftest import tiny_run_config
from tiny_sharp import save_sharp_tiny_model

from tuneforge.config import load_config
from tuneforge.data.replay import cache_path, replay_conversations
from tuneforge.models import load_model, load_tokenizer, resolve
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
    replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in replay_prompts()[:8]],
                       max_new_tokens=32)
    common = Counter(t for r in replies for t in r.token_ids).most_common(1)[0][0]
    config = GenerationConfig.from_pretrained(folder)
    config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), common]
    config.save_pretrained(folder)
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def replay_config(model_dir, general_replay: str = "self", general_mix: float = 0.2, replay_loss: str = "ce", **data):
    return load_config({"base_model": str(model_dir), "train": {"replay_loss": replay_loss},
                        "data": {"train": "unused.jsonl", "general_mix": general_mix, "general_replay": general_replay, **data}})


def test_self_replay_is_the_base_models_finished_greedy_replies_generated_once(ending_model_dir, home, one_thread):
    from tuneforge.generate import generate

    model_dir = str(ending_model_dir)
    tokenizer = load_tokenizer(model_dir)
    assert replay_conversations(replay_config(model_dir), tokenizer, generate=False) is None
    said = []
    replay = replay_conversations(replay_config(model_dir), tokenizer, log=said.append)
    prompts = replay_prompts()
    assert "answers 200 general prompts" in said[0]
    model = load_model(model_dir).eval()
    replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=160)
    finished = [(p, r.text) for p, r in zip(prompts, replies) if r.finish_reason == "stop" and r.text.strip()]
    assert 0 < len(finished) < len(prompts)  # the fixture's model finishes some replies and is cut on others
    assert replay == [[{"role": "user", "content": p}, {"role": "assistant", "content": text}] for p, text in finished]
    assert f"{len(finished)} of the base model's 200 replies" in said[-1]
    # Cached: a later call (another rank, the next run, the dry run) reads the same replies.
    assert replay_conversations(replay_config(model_dir), tokenizer, generate=False) == replay
    assert cache_path(resolve(model_dir), tokenizer, 160).parent == home / "replay-cache"


def test_replay_cache_follows_the_weights(tiny_model_dir, tmp_path, home):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    tokenizer = load_tokenizer(str(copy))
    before = cache_path(resolve(str(copy)), tokenizer, 160)
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert cache_path(resolve(str(copy)), tokenizer, 160) != before


def test_chitchat_replay_and_no_mix(tiny_model_dir, home):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert replay_conversations(replay_config(tiny_model_dir, "chitchat"), tokenizer) == general_conversations()
    assert replay_conversations(replay_config(tiny_model_dir, general_mix=0.0), tokenizer) is None
    assert not (home / "replay-cache").exists()


def test_a_training_run_mixes_in_the_self_replies(ending_model_dir, triage_data, tmp_path, home, one_thread):
    from tuneforge.training import train

    cfg = tiny_run_config(ending_model_dir, triage_data, tmp_path / "run", max_steps=2)
    cfg["data"].update(general_mix=0.25, general_replay="self")
    train(cfg, progress=False)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    counts = report["counts"]
    assert counts["general_mix"] > 0 and counts["general_mix"] == round(0.25 / 0.75 * (counts["train"] - counts["general_mix"]))
    assert len(list((home / "replay-cache").glob("*.jsonl"))) == 1


def test_kl_replay_keeps_the_replies_cut_at_the_limit(ending_model_dir, home, one_thread):
    """Learned as the base's distribution, a cut reply teaches no end of turn: it is kept, and a
    short limit makes replies cheap to generate."""
    from tuneforge.generate import generate

    model_dir = str(ending_model_dir)
    tokenizer = load_tokenizer(model_dir)
    replay = replay_conversations(replay_config(model_dir, replay_loss="kl_to_base", general_replay_tokens=12), tokenizer)
    prompts = replay_prompts()
    replies = generate(load_model(model_dir).eval(), tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                       max_new_tokens=12)
    assert {r.finish_reason for r in replies} == {"stop", "length"}
    expected = [(p, r.text) for p, r in zip(prompts, replies) if r.text.strip()]
    assert replay == [[{"role": "user", "content": p}, {"role": "assistant", "content": text}] for p, text in expected]
    # The same replies serve text replay, which leaves out the cut ones; another limit is another cache file.
    as_text = replay_conversations(replay_config(model_dir, general_replay_tokens=12), tokenizer, generate=False)
    assert len(as_text) == sum(r.finish_reason == "stop" and bool(r.text.strip()) for r in replies) < len(replay)
    assert cache_path(resolve(model_dir), tokenizer, 12) != cache_path(resolve(model_dir), tokenizer, 160)
    assert len(list((home / "replay-cache").glob("*.jsonl"))) == 1
