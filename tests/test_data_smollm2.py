"""Masks with the real SmolLM2 tokenizer and template (integration: the model is pulled once into the cache)."""

from __future__ import annotations

import random

import pytest
from data.rows import trained_runs

from tuneforge.data import Conversation, Message, render_conversation
from tuneforge.data.render import renderer_for

pytestmark = pytest.mark.integration

TRIAGE_SYSTEM = (
    "You are the triage assistant for Nimbus Cloud. Read the customer's ticket and answer with JSON "
    'only: {"category": ..., "priority": ..., "product": ...}.'
)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """The real bundled model's tokenizer, pulled once into the cache as the other integration tests pull it."""
    from tuneforge.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


def test_replies_and_end_of_turn_are_trained_and_ids_match_the_template(smollm2):
    messages = [
        {"role": "system", "content": TRIAGE_SYSTEM},
        {"role": "user", "content": "our db is down!!! prod affected"},
        {"role": "assistant", "content": '{"category": "outage", "priority": "urgent", "product": "database"}'},
        {"role": "user", "content": "And the invoice for March is wrong."},
        {"role": "assistant", "content": '{"category": "billing", "priority": "medium", "product": "console"}'},
    ]
    example = render_conversation(messages, smollm2)
    assert trained_runs(example, smollm2) == [
        messages[2]["content"] + "<|im_end|>",
        messages[4]["content"] + "<|im_end|>",
    ]
    text = smollm2.apply_chat_template(messages, tokenize=False)
    assert example.input_ids.tolist() == smollm2(text, add_special_tokens=False)["input_ids"]
    renderer = renderer_for(smollm2)
    assert renderer.end_of_turn_id == smollm2.convert_tokens_to_ids("<|im_end|>") == smollm2.pad_token_id


def test_the_default_system_prompt_is_rendered_but_not_trained(smollm2):
    example = render_conversation(
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], smollm2
    )
    assert "You are a helpful AI assistant named SmolLM" in smollm2.decode(example.input_ids)
    assert trained_runs(example, smollm2) == ["4<|im_end|>"]


def test_piecewise_tokenization_matches_whole_text_tokenization(smollm2):
    rng = random.Random(1)
    words = ["the", " server", "  ", "\n", "é", "日本", "!!", " 2048", '{"a": [1, 2]}', "\t", "don't", "x"]
    conversations = [
        Conversation(
            [
                Message("user", "".join(rng.choices(words, k=rng.randint(1, 20))).strip() or "x"),
                Message("assistant", "".join(rng.choices(words, k=rng.randint(1, 20))).strip() or "y"),
            ]
        )
        for _ in range(300)
    ]
    for conversation, example in zip(conversations, renderer_for(smollm2).render(conversations)):
        text = smollm2.apply_chat_template([m.to_template() for m in conversation.messages], tokenize=False)
        assert example.input_ids.tolist() == smollm2(text, add_special_tokens=False)["input_ids"]
        assert trained_runs(example, smollm2) == [conversation.messages[1].content + "<|im_end|>"]
