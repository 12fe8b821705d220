"""Tool calls parsed from replies as each family's chat template trains a model to write them."""

import json

import pytest
from families import FAMILIES, TEMPLATES

from tuneforge.tool_calls import HERMES, LLAMA3_JSON, MISTRAL, parser_for


def calls(parsed) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


@pytest.mark.parametrize(
    ("family", "parser"),
    [("qwen2.5", HERMES), ("qwen3", HERMES), ("llama3", LLAMA3_JSON), ("mistral", MISTRAL), ("gemma2", None)],
)
def test_the_parser_is_the_one_the_families_chat_template_writes_calls_for(family, parser):
    assert parser_for((TEMPLATES / FAMILIES[family].template).read_text(encoding="utf-8")) is parser


def test_hermes_calls_with_the_text_before_them():
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    parsed = HERMES.parse(text)
    assert parsed.content == "Let me look."
    assert calls(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in parsed.tool_calls)
    assert len({c["id"] for c in parsed.tool_calls}) == 2
    # The last block may end at the end of the reply, its closing tag not written.
    assert calls(HERMES.parse('<tool_call>\n{"name": "f", "arguments": {}}\n')) == [("f", {})]


def test_llama3_json_calls_with_or_without_the_python_tag():
    assert LLAMA3_JSON.parse('{"name": "get_weather", "parameters": {"city": "Paris"}}').content is None
    two = '<|python_tag|>{"name": "f", "parameters": {"a": "é"}}; {"name": "g", "parameters": {}}'
    parsed = LLAMA3_JSON.parse(two)
    assert calls(parsed) == [("f", {"a": "é"}), ("g", {})]
    assert parsed.tool_calls[0]["function"]["arguments"] == '{"a": "é"}'  # JSON text as written, not escaped


def test_mistral_calls_keep_their_id_and_read_without_the_marker_decoding_drops():
    parsed = MISTRAL.parse('Sure. [TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}, "id": "abcDEF123"}]')
    assert parsed.content == "Sure." and calls(parsed) == [("f", {"a": 1})]
    assert parsed.tool_calls[0]["id"] == "abcDEF123"
    # Mistral's template takes back only ids of 9 letters and digits.
    [call] = MISTRAL.parse('[{"name": "f", "arguments": {}}]').tool_calls
    assert len(call["id"]) == 9 and call["id"].isalnum()


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (HERMES, "The weather is fine."),
        (HERMES, "<tool_call>\n{not json}\n</tool_call>"),
        (HERMES, '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
        (HERMES, '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> and then some text'),
        (LLAMA3_JSON, '{"answer": 4}'),
        (LLAMA3_JSON, '{"name": "f", "parameters": [1, 2]}'),
        (LLAMA3_JSON, '{"name": "f", "parameters": {}} is what I would call'),
        (MISTRAL, "[1, 2, 3]"),
        (MISTRAL, '[TOOL_CALLS] [{"name": "f", "arguments": {}'),  # cut short
        # An answer in JSON whose objects have a name: calls always carry their arguments.
        (LLAMA3_JSON, '{"name": "Alice", "email": "alice@example.com"}'),
        (MISTRAL, '[{"name": "Alice", "role": "admin"}, {"name": "Bob", "role": "user"}]'),
        (HERMES, '<tool_call>\n{"name": "f"}\n</tool_call>'),
    ],
)
def test_text_that_is_not_a_call_stays_text(parser, text):
    assert parser.parse(text) is None


@pytest.mark.parametrize(
    ("parser", "text", "held"),
    [
        (HERMES, "Let me look. <tool", 13),  # a marker's start: held until it is one or is not
        (HERMES, "Let me look. <tool_call>\n{", 13),
        (HERMES, "The weather is fine.", None),
        (LLAMA3_JSON, "  ", 0),  # the reply may still open with a call
        (LLAMA3_JSON, '{"name', 0),
        (LLAMA3_JSON, "The answer is {", None),
        (MISTRAL, "Sure. [TOOL_", 6),
        (MISTRAL, "[{", 0),
    ],
)
def test_a_stream_holds_back_the_text_from_where_a_call_may_start(parser, text, held):
    assert parser.held_from(text) == held


def test_a_held_stream_sends_the_text_before_a_call_and_the_rest_once_the_reply_is_whole():
    from tuneforge.tool_calls import HeldStream

    stream = HeldStream(HERMES)
    sent = [stream.feed(piece) for piece in ["Let me ", "look. <tool", '_call>\n{"name": "a", "arguments": {}}']]
    assert sent == ["Let me ", "look. ", ""] and stream.finish(called=True) == ""
    plain = HeldStream(HERMES)
    assert plain.feed("a <tool") == "a " and plain.finish(called=False) == "<tool"
    assert plain.finish(called=False) == ""  # sent once


def test_a_llama3_call_after_some_text_is_decoded_with_its_python_tag_and_parsed(tmp_path):
    # Decoding drops special tokens; without <|python_tag|> the text before the call makes the reply plain text.
    from families import save_family_model

    from tuneforge.generate import Row, Sampling
    from tuneforge.models import load_tokenizer

    tokenizer = load_tokenizer(str(save_family_model(FAMILIES["llama3"], tmp_path / "llama3")))
    reply = 'Let me look.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
    row = Row([1], Sampling(64, keep_tokens=LLAMA3_JSON.markers), None)
    for token in tokenizer.encode(reply, add_special_tokens=False):
        row.add(token, tokenizer, frozenset({tokenizer.eos_token_id}))
    assert row.completion().text == reply
    parsed = LLAMA3_JSON.parse(row.completion().text)
    assert parsed.content == "Let me look." and calls(parsed) == [("get_weather", {"city": "Paris"})]
    # Any other special token is dropped as ever.
    assert (
        Row([1], Sampling(4, keep_tokens=LLAMA3_JSON.markers), None).add(
            tokenizer.convert_tokens_to_ids("<|eom_id|>"), tokenizer, frozenset()
        )
        == ""
    )


CALL_BLOCK = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize(
    ("text", "opened", "reasoning", "content", "called"),
    [
        # A reasoning model's calls are those of its answer; a call written while reasoning is its reasoning.
        (f"<think>\nlook it up\n</think>\n\n{CALL_BLOCK}", False, "look it up", None, True),
        (f"maybe {CALL_BLOCK}\n</think>\n\nIt is sunny.", True, f"maybe {CALL_BLOCK}", "It is sunny.", False),
        ("It is sunny.", False, None, "It is sunny.", False),  # a reasoning model's reply that opens no reasoning
        (f"Let me look.\n{CALL_BLOCK}", None, "absent", "Let me look.", True),  # a model that does not reason
    ],
)
def test_an_assistant_message_parts_the_reasoning_then_parses_the_answer_s_calls(
    text, opened, reasoning, content, called
):
    from tuneforge.reasoning import assistant_message

    message = assistant_message(text, opened, HERMES.parse)
    assert message["role"] == "assistant" and message.get("reasoning_content", "absent") == reasoning
    assert message["content"] == content and ("tool_calls" in message) == called
    if called:
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
            ("get_weather", {"city": "Paris"})
        ]
