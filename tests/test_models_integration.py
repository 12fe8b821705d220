"""The real bundled SmolLM2: the converted folder matches the GGUF it came from.

Pulls into the real cache once (about a minute); later runs reuse it.
"""

from __future__ import annotations

import pytest
import torch

from tuneforge.models import REGISTRY, load_model, load_tokenizer, model_info, pull

pytestmark = pytest.mark.integration

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory, smollm2_dir):
    """The original GGUF, fetched the way `pull` fetches it (pip's cache makes this quick)."""
    from rich.console import Console

    from tuneforge.models.convert import fetch_registry_gguf

    path, _ = fetch_registry_gguf(REGISTRY[NAME], tmp_path_factory.mktemp("smollm2-gguf"), Console(quiet=True))
    return path


def test_converted_model_matches_the_gguf(smollm2_dir, smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tokenizer = load_tokenizer(NAME)
    chat = [{"role": "user", "content": "What is 2+2? Answer briefly."}, {"role": "assistant", "content": "4."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == gguf_tokenizer.apply_chat_template(
        chat, tokenize=False
    )
    text = tokenizer.apply_chat_template(chat, tokenize=False) + "Once upon a time, a little robot"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == gguf_tokenizer(text).input_ids

    model = load_model(NAME)
    assert getattr(model, "hf_quantizer", None) is None
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        converted = model(ids).logits
    del model
    reference = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    with torch.no_grad():
        expected = reference(ids).logits
    assert (converted - expected).abs().max().item() < 1e-5


def test_model_info_of_smollm2(smollm2_dir):
    info = model_info(NAME)
    assert info["params"] == 134_515_008
    assert info["family"] == "SmolLM2 (Llama, ChatML)" and info["end_of_turn_tokens"] == ["<|im_end|>"]
    assert info["eos_token"] == info["pad_token"] == "<|im_end|>"
    assert info["stop_tokens"] == ["<|im_end|>"]
    assert info["context_length"] == 8192 and info["vocab_size"] == 49_152
    assert info["licence"] == "Apache-2.0" and info["path"] == str(smollm2_dir)
    assert (smollm2_dir / "LICENSE").is_file()


def test_second_pull_is_a_no_op(smollm2_dir, monkeypatch):
    from tuneforge.models import convert

    def fetched(*_args, **_kwargs):
        raise AssertionError("a second pull fetched the model's wheels again")

    monkeypatch.setattr(convert, "fetch_registry_gguf", fetched)
    written = {path: path.stat().st_mtime_ns for path in smollm2_dir.rglob("*")}
    assert pull(NAME, progress=False) == smollm2_dir
    assert {path: path.stat().st_mtime_ns for path in smollm2_dir.rglob("*")} == written
