"""Reading and normalising every input format; every bad input gives a coded problem at its line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data.rows import BAD_INPUTS, GOOD_ROW, chat, write_bad_input, write_jsonl

from tuneforge.data import Conversation, Document, Preference, Problem, read_conversations
from tuneforge.data.formats import check_row, detect_format, record_row
from tuneforge.lone_surrogates import LoneSurrogate, lone_surrogate


def read(path, format="auto"):
    return list(read_conversations(path, format))


def records(items):
    return [r for _, r in items if not isinstance(r, Problem)]


def errors(items):
    return [r for _, r in items if isinstance(r, Problem) and r.is_error]


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_each_bad_input_gives_its_code_at_its_line(tmp_path, name):
    path, code, line = write_bad_input(tmp_path, name)
    problems = errors(read(path))
    assert [(p.code, p.line) for p in problems if p.code == code] == [(code, line)], problems
    assert all(p.file == str(path) and p.message for p in problems)


def test_good_rows_around_a_bad_one_are_still_read(tmp_path):
    path, _, _ = write_bad_input(tmp_path, "huge_line")
    items = read(path)
    assert [line for line, r in items if isinstance(r, Conversation)] == [1, 3]


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_ROW).encode() + b"\n")
    items = read(path)
    assert not errors(items) and len(records(items)) == 1


def test_blank_lines_are_skipped_with_a_warning(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text(f"{json.dumps(GOOD_ROW)}\n\n   \n{json.dumps(GOOD_ROW)}\n")
    items = read(path)
    assert not errors(items)
    assert [(line, r.code) for line, r in items if isinstance(r, Problem)] == [(2, "blank_line"), (3, "blank_line")]
    assert [line for line, r in items if isinstance(r, Conversation)] == [1, 4]


def test_a_row_reports_all_its_problems_with_fields(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": 42, "extra": 1},
            {"role": "bot", "content": "x"},
            {"content": "y"},
            {"role": "assistant", "content": "ok", "weight": 2},
        ]
    }
    items = read(write_jsonl(tmp_path / "d.jsonl", [row]))
    found = {(p.code, p.field) for p in errors(items)}
    assert found == {
        ("data_type", "messages[0].content"),
        ("message_unrecognized_key", "messages[0].extra"),
        ("unrecognized_role", "messages[1].role"),
        ("message_missing_key", "messages[2].role"),
        ("invalid_weight", "messages[3].weight"),
    }
    assert not records(items)


def test_empty_content_and_a_non_object_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('[1, 2]\n{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}\n')
    assert [(p.code, p.line) for p in errors(read(path))] == [("data_type", 1), ("missing_content", 2)]


def test_chat_keeps_weights_names_and_tool_calls(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    row = {
        "messages": [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "name": "bob",
                "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
            },
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "assistant", "content": "It is 42.", "weight": 0},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        "tools": [{"type": "function", "function": {"name": "lookup"}}],
    }
    (conversation,) = records(read(write_jsonl(tmp_path / "d.jsonl", [row])))
    m = conversation.messages
    assert [x.role for x in m] == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert m[1].content == "hi there" and m[1].name == "bob"
    assert m[2].content == "" and m[2].tool_calls == [call]
    assert m[3].tool_call_id == "c1" and m[4].weight == 0
    assert conversation.tools == row["tools"]


def test_alpaca_history_becomes_the_earlier_turns_and_a_bad_one_is_named(tmp_path):
    """LLaMA-Factory's alpaca `history` holds the conversation before the instruction."""
    rows = [
        {"instruction": "And 3?", "output": "9", "history": [["Square 2", "4"]]},
        {"instruction": "x", "output": "y", "history": [["only the question"]]},
        {"instruction": "x", "output": "y", "history": "Square 2"},
    ]
    items = read(write_jsonl(tmp_path / "h.jsonl", rows), format="alpaca")
    [(_, first)] = [item for item in items if item[0] == 1]
    assert [(m.role, m.content) for m in first.messages] == [
        ("user", "Square 2"),
        ("assistant", "4"),
        ("user", "And 3?"),
        ("assistant", "9"),
    ]
    assert [(e.line, e.field) for e in errors(items)] == [(2, "history[0]"), (3, "history")]


def test_alpaca_sharegpt_prompt_completion_and_text(tmp_path):
    alpaca = records(
        read(
            write_jsonl(
                tmp_path / "a.jsonl",
                [
                    {"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be exact."},
                    {"instruction": "Greet", "input": "", "output": "Hello"},
                ],
            )
        )
    )
    assert [(m.role, m.content) for m in alpaca[0].messages] == [
        ("system", "Be exact."),
        ("user", "Add\n\n2 and 2"),
        ("assistant", "4"),
    ]
    assert [(m.role, m.content) for m in alpaca[1].messages] == [("user", "Greet"), ("assistant", "Hello")]

    (sharegpt,) = records(
        read(
            write_jsonl(
                tmp_path / "s.jsonl",
                [
                    {
                        "system": "sys",
                        "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}],
                    }
                ],
            )
        )
    )
    assert [(m.role, m.content) for m in sharegpt.messages] == [("system", "sys"), ("user", "hi"), ("assistant", "hey")]

    (pc,) = records(read(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}])))
    assert [(m.role, m.content) for m in pc.messages] == [("user", "2+2="), ("assistant", "4")]

    (doc,) = records(read(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}])))
    assert doc == Document("Once upon a time.")


def test_sharegpt_unknown_speaker_is_an_unrecognized_role(tmp_path):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "hey"}]}
    (problem,) = errors(read(write_jsonl(tmp_path / "s.jsonl", [row])))
    assert (problem.code, problem.field) == ("unrecognized_role", "conversations[1].from")


def test_preference_formats(tmp_path):
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": "Hi"}]},
            "preferred_output": [{"role": "assistant", "content": "Hello!"}],
            "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
        },
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {
            "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
        },
    ]
    prefs = records(read(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert len(prefs) == 3 and all(isinstance(p, Preference) for p in prefs)
    for p in prefs:
        assert [(m.role, m.content) for m in p.prompt] == [("user", "Hi")]
        assert (p.chosen.content, p.rejected.content) == ("Hello!", "Go away.")


def test_ultrafeedback_pairs_repeat_their_prompt_in_whole_conversations(tmp_path):
    """UltraFeedback (HuggingFaceH4/ultrafeedback_binarized) has a text `prompt` beside `chosen` and
    `rejected` conversations that repeat it: the prompt is their shared turns, system prompt included."""
    system, user = {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}
    good = {"role": "assistant", "content": "Hello!"}
    bad = {"role": "assistant", "content": "Go away."}
    rows = [
        {"prompt": "Hi", "chosen": [user, good], "rejected": [user, bad], "score_chosen": 8.0, "score_rejected": 2.0},
        {"prompt": "Hi", "chosen": [system, user, good], "rejected": [system, user, bad]},
        {"prompt": [user], "chosen": [user, good], "rejected": [user, bad]},
        {"prompt": "Bye", "chosen": [user, good], "rejected": [user, bad]},
    ]
    items = read(write_jsonl(tmp_path / "uf.jsonl", rows))
    prompts = [[(m.role, m.content) for m in p.prompt] for p in records(items)]
    assert prompts == [[("user", "Hi")], [("system", "Be kind."), ("user", "Hi")], [("user", "Hi")]]
    assert {(p.chosen.content, p.rejected.content) for p in records(items)} == {("Hello!", "Go away.")}
    assert [(p.line, p.code, p.field) for p in errors(items)] == [(4, "invalid_preference", "prompt")]


def test_whole_conversations_beside_a_prompt_that_differ_before_their_replies_are_named_as_such(tmp_path):
    """A prompt beside chosen and rejected conversations that repeat it differently: the message speaks of the
    row as it is (a prompt given), not of a row without one."""
    hi, hey = {"role": "user", "content": "Hi"}, {"role": "user", "content": "Hey"}
    rows = [
        {
            "prompt": "Hi",
            "chosen": [hi, {"role": "assistant", "content": "Hello!"}],
            "rejected": [hey, {"role": "assistant", "content": "Go away."}],
        }
    ]
    (problem,) = errors(read(write_jsonl(tmp_path / "uf.jsonl", rows)))
    assert (problem.line, problem.code, problem.field) == (1, "invalid_preference", "rejected")
    assert "without a 'prompt'" not in problem.message
    assert "differ before their last message" in problem.message


def test_anthropic_hh_transcripts_read_as_conversations_that_differ_in_their_last_reply(tmp_path):
    """Anthropic/hh-rlhf rows: `chosen` and `rejected` are whole transcripts in text."""
    shared = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Two plus two?"
    rows = [
        {"chosen": shared + "\n\nAssistant: Four.", "rejected": shared + "\n\nAssistant: Five."},
        {"chosen": shared + "\n\nAssistant:", "rejected": shared + "\n\nAssistant: Five."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "\n\nHuman: Yo\n\nAssistant: b"},
    ]
    items = read(write_jsonl(tmp_path / "hh.jsonl", rows))
    (pair,) = records(items)
    assert [(m.role, m.content) for m in pair.prompt] == [
        ("user", "Hi"),
        ("assistant", "Hello."),
        ("user", "Two plus two?"),
    ]
    assert (pair.chosen.content, pair.rejected.content) == ("Four.", "Five.")
    assert [(p.line, p.code, p.field) for p in errors(items)] == [
        (2, "missing_content", "chosen"),
        (3, "invalid_preference", "chosen"),
    ]


def test_anthropic_hh_transcripts_beside_a_prompt_read_as_conversations_that_repeat_it(tmp_path):
    """A prompt beside HH transcripts is checked against their shared turns, as UltraFeedback's is; the
    transcripts are never trained as one reply holding 'Human:' and 'Assistant:'."""
    shared = "\n\nHuman: Two plus two?"
    pair = {"chosen": shared + "\n\nAssistant: Four.", "rejected": shared + "\n\nAssistant: Five."}
    rows = [{"prompt": "Two plus two?", **pair}, {"prompt": shared, **pair}]
    items = read(write_jsonl(tmp_path / "hh.jsonl", rows))
    (read_pair,) = records(items)
    assert [(m.role, m.content) for m in read_pair.prompt] == [("user", "Two plus two?")]
    assert (read_pair.chosen.content, read_pair.rejected.content) == ("Four.", "Five.")
    assert [(p.line, p.code, p.field) for p in errors(items)] == [(2, "invalid_preference", "prompt")]


def test_alpaca_preference_rows_take_the_instruction_and_its_input_as_prompt(tmp_path):
    """LLaMA-Factory's alpaca pairs: `input` is the instruction's text, not OpenAI's {"messages"} object."""
    row = {"system": "Be kind.", "instruction": "Translate", "input": "bonjour", "chosen": "hello", "rejected": "no"}
    jsonl = write_jsonl(tmp_path / "p.jsonl", [row, {**row, "input": ""}])
    spreadsheet = tmp_path / "p.csv"
    spreadsheet.write_text("instruction,input,chosen,rejected\nTranslate,bonjour,hello,no\n")
    prompts = [[(m.role, m.content) for m in p.prompt] for p in records(read(jsonl)) + records(read(spreadsheet))]
    assert prompts == [
        [("system", "Be kind."), ("user", "Translate\n\nbonjour")],
        [("system", "Be kind."), ("user", "Translate")],
        [("user", "Translate\n\nbonjour")],
    ]


def test_sharegpt_preference_rows_take_the_conversation_as_prompt_and_one_turn_per_reply(tmp_path):
    """LLaMA-Factory's ShareGPT pairs: `chosen` and `rejected` are single turns, not text."""
    row = {
        "system": "Be kind.",
        "conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello!"},
        "rejected": {"from": "gpt", "value": "Go away."},
    }
    bad = {**row, "rejected": {"from": "human", "value": "Go away."}}
    items = read(write_jsonl(tmp_path / "p.jsonl", [row, bad]))
    (pair,) = records(items)
    assert [(m.role, m.content) for m in pair.prompt] == [("system", "Be kind."), ("user", "Hi")]
    assert (pair.chosen.content, pair.rejected.content) == ("Hello!", "Go away.")
    assert [(line, p.code, p.field) for line, p in items if isinstance(p, Problem)] == [
        (2, "invalid_preference", "rejected")
    ]


def test_sharegpt_tools_as_llama_factory_writes_them_are_the_rows_tools(tmp_path):
    """LLaMA-Factory's ShareGPT rows hold their tools as JSON text of bare function definitions."""
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    turns = [{"from": "human", "value": "Weather in Paris?"}, {"from": "gpt", "value": "Sunny."}]
    tools = json.dumps([weather])
    items = read(
        write_jsonl(
            tmp_path / "sg.jsonl", [{"conversations": turns, "tools": tools}, {"conversations": turns, "tools": "[{"}]
        )
    )
    (conversation,) = records(items)
    assert conversation.tools == [{"type": "function", "function": weather}]
    assert [(line, p.code, p.field) for line, p in items if isinstance(p, Problem)] == [(2, "invalid_json", "tools")]

    replies = {"chosen": {"from": "gpt", "value": "Sunny."}, "rejected": {"from": "gpt", "value": "Rainy."}}
    (pair,) = records(
        read(write_jsonl(tmp_path / "pairs.jsonl", [{"conversations": turns[:1], **replies, "tools": tools}]))
    )
    assert pair.tools == [{"type": "function", "function": weather}]


def test_preference_problems(tmp_path):
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": "Hi"}]},
            "preferred_output": [{"role": "user", "content": "Hello!"}],
            "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
        },
        {"prompt": "Hi", "chosen": "Same", "rejected": "Same"},
        {
            "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "b"}],
        },
    ]
    items = read(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [(p.line, p.code) for p in errors(items)] == [(1, "invalid_preference"), (3, "invalid_preference")]
    warnings = [(line, p.code) for line, p in items if isinstance(p, Problem) and not p.is_error]
    assert warnings == [(2, "identical_preference")]


def test_a_preference_reply_of_weight_0_is_refused_where_its_weight_is(tmp_path):
    row = {
        "input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!", "weight": 0}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away.", "weight": 1}],
    }
    (problem,) = errors(read(write_jsonl(tmp_path / "p.jsonl", [row])))
    assert (problem.code, problem.field) == ("invalid_weight", "preferred_output")
    assert "remove the weight" in problem.message


def test_format_override_reads_rows_as_that_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    (problem,) = errors(read(path, format="chat"))
    assert problem.code == "missing_messages_list"
    assert len(records(read(path, format="alpaca"))) == 1


def test_a_file_of_another_format_than_the_one_set_says_the_setting_is_the_cause(tmp_path):
    # data.format applies to every file of data.train: a user's alpaca file beside chat files is
    # refused with the way out (auto), not with advice to add `messages` to each row.
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    (problem,) = errors(read(path, format="chat"))
    assert problem.code == "missing_messages_list"
    assert "rows are alpaca data, but the format is set to chat" in problem.message
    assert "set it to auto" in problem.message
    table = tmp_path / "sheet.parquet"
    pq.write_table(pa.table({"prompt": ["Say hi"], "completion": ["hi"]}), table)
    (problem,) = errors(read(table, format="chat"))
    assert problem.code == "missing_column"
    assert "rows are prompt_completion data, but the format is set to chat" in problem.message
    # A row of the format set keeps its own message.
    (problem,) = errors(read(write_jsonl(tmp_path / "chat.jsonl", [{"messages": "hi"}]), format="chat"))
    assert "format is set" not in problem.message


def test_detect_format():
    assert detect_format(GOOD_ROW) == "chat"
    assert detect_format({"instruction": 1}) == "alpaca"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"prompt": 1, "completion": 2}) == "prompt_completion"
    assert detect_format({"text": 1}) == "text"
    assert detect_format({"prompt": 1, "chosen": 2, "rejected": 3}) == "preference"
    assert detect_format({"foo": 1}) is None


def test_unknown_keys_suggest_the_nearest_format_key(tmp_path):
    (problem,) = errors(read(write_jsonl(tmp_path / "d.jsonl", [{"mesages": []}])))
    assert problem.code == "unknown_format" and "did you mean 'messages'" in problem.message


def test_a_short_form_of_an_openai_preference_key_is_offered_the_key(tmp_path):
    row = {"input": chat("Hi", "Hello"), "preferred": [], "non_preferred": []}
    (problem,) = errors(read(write_jsonl(tmp_path / "d.jsonl", [row])))
    assert "(did you mean 'preferred_output' for 'preferred'?)" in problem.message


def test_message_keys_of_the_other_shape_say_what_they_are_called_here(tmp_path):
    # Datasets mix the shapes: ShareGPT's "conversations" holding role/content, "messages" holding from/value.
    rows = [
        {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    for row, key, ours, other in (
        (rows[0], "role", "from", "rename the row's 'conversations' to 'messages'"),
        (rows[1], "value", "content", "rename the row's 'messages' to 'conversations'"),
    ):
        problems = errors(read(write_jsonl(tmp_path / "d.jsonl", [row])))
        (problem,) = [p for p in problems if p.code == "message_unrecognized_key" and p.field.endswith(f"[0].{key}")]
        assert f"rename '{key}' to '{ours}'" in problem.message and other in problem.message


def test_legacy_function_calls_say_how_tool_use_is_written(tmp_path):
    # OpenAI's deprecated functions format, and LLaMA-Factory's ShareGPT function_call turns.
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": "{}"}},
                {"role": "function", "name": "weather", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "Weather?"},
                {"from": "function_call", "value": '{"name": "weather", "arguments": {}}'},
                {"from": "observation", "value": "sunny"},
                {"from": "gpt", "value": "Sunny."},
            ]
        },
    ]
    found = {}
    for i, row in enumerate(rows):
        for p in errors(read(write_jsonl(tmp_path / f"{i}.jsonl", [row]))):
            found[p.field] = p.message
    for field in ("messages[1].function_call", "messages[2].role", "conversations[1].from"):
        assert "an assistant message's 'tool_calls'" in found[field], field


def test_legacy_functions_are_an_error_even_on_a_row_that_calls_none(tmp_path):
    # Unread, they would leave a reply that declines to call a function to train with no functions in sight.
    weather = {"name": "weather", "parameters": {"type": "object"}}
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    [problem] = errors(read(write_jsonl(tmp_path / "f.jsonl", [{**row, "functions": [weather]}])))
    assert problem.field == "functions" and '\'tools\': [{"type": "function"' in problem.message


@pytest.mark.parametrize(
    "arguments, said",
    [
        ("{city: 'Paris'}", "not JSON"),
        ('{"city": "Paris"', "not JSON"),
        ('["Paris"]', "holds a list"),
        (None, "missing"),
        # JSON that Python's reader gives up on is said, not a traceback.
        ('{"days": 1' + "0" * 5000 + "}", "more than 4,300 digits"),
        ('{"city": ' + "[" * 5000 + "]" * 5000 + "}", "too deeply"),
    ],
)
def test_tool_call_arguments_that_are_not_a_json_object_are_an_error(tmp_path, arguments, said):
    # The template would write them as a string (or null) and the model would learn to call with that.
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": arguments}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    [problem] = errors(read(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])))
    assert problem.field == "messages[1].tool_calls[0].function.arguments" and said in problem.message


def test_bare_function_definitions_in_chat_tools_are_read_as_openais_tools(tmp_path):
    # Rendered bare, the model would train on tools shaped unlike those OpenAI's clients send at inference.
    weather = {"name": "weather", "parameters": {"type": "object"}}
    row = {**chat("Weather?", "Sunny."), "tools": [weather, {"type": "function", "function": weather}]}
    [(_, conversation)] = read(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert conversation.tools == [{"type": "function", "function": weather}] * 2


def test_the_responses_apis_flat_tools_are_read_as_openais_chat_tools(tmp_path):
    # Kept flat, Qwen and Llama 3.1 would train on tools unlike a request's, and Mistral's template fails on them.
    weather = {"name": "weather", "parameters": {"type": "object"}}
    row = {**chat("Weather?", "Sunny."), "tools": [{"type": "function", **weather}]}
    [(_, conversation)] = read(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert conversation.tools == [{"type": "function", "function": weather}]


@pytest.mark.parametrize(
    "tool, field",
    [
        ({"type": "function", "function": {"description": "Weather."}}, "tools[1].function.name"),
        ({"type": "function", "function": "weather"}, "tools[1].function.name"),
        ({"type": "code_interpreter"}, "tools[1].type"),
        ("weather", "tools[1]"),
    ],
)
def test_a_tool_that_is_not_a_named_function_is_an_error(tmp_path, tool, field):
    weather = {"type": "function", "function": {"name": "weather"}}
    row = {**chat("Weather?", "Sunny."), "tools": [weather, tool]}
    [problem] = errors(read(write_jsonl(tmp_path / "t.jsonl", [row])))
    assert (problem.line, problem.field) == (1, field)


def test_json_array_is_streamed_with_element_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(json.dumps(chat(f"q{i}", f"a{i}"), indent=1) for i in range(3)) + "\n]\n")
    items = read(path)
    assert not errors(items)
    starts = [n + 1 for n, text in enumerate(path.read_text().splitlines()) if text.startswith("{")]
    assert [line for line, _ in items] == starts


def test_a_pretty_printed_json_array_named_jsonl_is_read_as_an_array(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps([chat(f"q{i}", f"a{i}") for i in range(3)], indent=2))
    items = read(path)
    assert not errors(items) and [r.messages[0].content for r in records(items)] == ["q0", "q1", "q2"]
    # A JSON Lines row that is a list on its line is still one row (refused: rows are objects).
    path.write_text(f"{json.dumps([GOOD_ROW])}\n{json.dumps(GOOD_ROW)}\n")
    items = read(path)
    assert [(p.code, p.line) for p in errors(items)] == [("data_type", 1)] and len(records(items)) == 1


def test_json_array_broken_element_reports_its_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(f'[\n{json.dumps(GOOD_ROW)},\n{{"messages": [}},\n{json.dumps(GOOD_ROW)}\n]')
    items = read(path)
    assert [line for line, r in items if isinstance(r, Conversation)] == [2]
    (problem,) = errors(items)
    assert (problem.code, problem.line) == ("invalid_json", 3)


def test_json_array_larger_than_the_read_buffer(tmp_path):
    path = tmp_path / "d.json"
    rows = [chat(f"question {i} " + "x" * 3000, f"answer {i}") for i in range(800)]  # about 2.5 MB
    path.write_text(json.dumps(rows))
    items = read(path)
    assert not errors(items) and len(records(items)) == 800
    assert records(items)[-1].messages[1].content == "answer 799"


def test_empty_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[ ]")
    assert [p.code for p in errors(read(path))] == ["empty_file"]


def test_csv_rows_with_json_cells_and_field_count(tmp_path):
    path = tmp_path / "d.csv"
    messages = json.dumps(GOOD_ROW["messages"]).replace('"', '""')
    path.write_text(f'messages\n"{messages}"\n\n"[not json"\n', encoding="utf-8")
    items = read(path)
    assert [line for line, r in items if isinstance(r, Conversation)] == [2]
    assert [(p.code, p.line) for p in errors(items)] == [("invalid_json", 4)]

    path.write_text("prompt,completion\nhi,hello\nonly one\n")
    items = read(path)
    assert len(records(items)) == 1
    assert [(p.code, p.line) for p in errors(items)] == [("csv_field_count", 3)]


def test_csv_preference_rows_with_message_cells_read_as_in_jsonl(tmp_path):
    """OpenAI's `input` object and TRL's message lists, as a spreadsheet holds them: JSON text in cells."""
    import csv

    user, good, bad = (
        {"role": r, "content": c} for r, c in (("user", "Hi"), ("assistant", "Hi!"), ("assistant", "No."))
    )
    shapes = {
        "openai": {"input": {"messages": [user]}, "preferred_output": [good], "non_preferred_output": [bad]},
        "trl": {"prompt": [user], "chosen": [good], "rejected": [bad]},
        "implicit": {"chosen": [user, good], "rejected": [user, bad]},
    }
    for name, row in shapes.items():
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(row)
            writer.writerow([json.dumps(v) for v in row.values()])
        (pair,) = records(read(path))
        assert [m.to_template() for m in (*pair.prompt, pair.chosen, pair.rejected)] == [user, good, bad], name
    # Text that only looks like a list stays text, and alpaca's `input` is text.
    path = tmp_path / "text.csv"
    path.write_text('prompt,chosen,rejected\n"[INST] Hi",Hello!,"[1, 2]"\n')
    (pair,) = records(read(path))
    assert (pair.prompt[0].content, pair.rejected.content) == ("[INST] Hi", "[1, 2]")
    path.write_text("instruction,input,output\nTranslate,bonjour,hello\n")
    assert len(records(read(path))) == 1


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_csv_with_the_semicolons_or_tabs_of_a_spreadsheet_export(tmp_path, delimiter):
    path = tmp_path / "d.csv"
    path.write_bytes(f'\ufeffprompt{delimiter}completion\r\n"Hi{delimiter} there, you"{delimiter}Hello\r\n'.encode())
    items = read(path)
    assert not errors(items)
    assert [(m.role, m.content) for r in records(items) for m in r.messages] == [
        ("user", f"Hi{delimiter} there, you"),
        ("assistant", "Hello"),
    ]
    # A row split by an unquoted delimiter is named with the advice for that delimiter.
    path.write_text(f"prompt{delimiter}completion\nHi{delimiter} there{delimiter}Hello\n", encoding="utf-8")
    [problem] = errors(read(path))
    name = {";": "semicolon", "\t": "tab"}[delimiter]
    assert problem.code == "csv_field_count" and f"Quote any field that contains a {name}" in problem.message


def test_parquet_rows(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["Add", "Greet"], "output": ["4", None]}), path)
    items = read(path)
    assert len(records(items)) == 1
    assert [(p.code, p.line, p.field) for p in errors(items)] == [("missing_field", 2, "output")]


def test_parquet_chat_rows_with_struct_fields(tmp_path):
    path = tmp_path / "d.parquet"
    messages = [
        [
            {"role": "user", "content": "Hi", "weight": None, "refusal": None},
            {"role": "assistant", "content": "Hello", "weight": 1, "refusal": None},
        ]
    ]
    pq.write_table(pa.table({"messages": messages}), path)
    (conversation,) = records(read(path))
    assert [(m.role, m.content, m.weight) for m in conversation.messages] == [
        ("user", "Hi", None),
        ("assistant", "Hello", 1),
    ]


def test_a_lone_surrogate_is_a_row_problem_in_a_json_array_too(tmp_path):
    cut = chat("Hi", "Bye \ud83d")  # json.dumps writes it as the escape \\ud83d
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD_ROW, cut, chat("Smile", "\U0001f600")], indent=1), encoding="utf-8")
    items = read(path)
    assert [(p.code, p.field) for p in errors(items)] == [("invalid_unicode", "messages[1].content")]
    assert [m.content for r in records(items) for m in r.messages][-1] == "\U0001f600"  # a whole pair is fine


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"messages": [{"role": "user", "content": "Hi", "\udc00": 1}]}, "messages[0]"),  # in a key: its object
        ({"messages": [{"role": "user", "content": ["Hi", {"text": "\ud800"}]}]}, "messages[0].content[1].text"),
        ({"\ud800": "Hi", "messages": []}, None),  # a key of the row itself
    ],
)
def test_a_lone_surrogate_names_the_field_it_is_in(tmp_path, row, field):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert [(p.code, p.field) for p in errors(read(path))] == [("invalid_unicode", field)]


def test_the_lone_surrogate_walk_gives_the_keys_down_to_it_whether_it_is_a_key_and_where_in_the_text():
    assert lone_surrogate({"a": [1, "fine \U0001f600", {"b": "x \ud83d"}]}) == LoneSurrogate(
        ("a", 2, "b"), False, 2, "\ud83d"
    )
    assert lone_surrogate([{"ok": 1, "k\udc00": 2}]) == LoneSurrogate((0, "k\udc00"), True, 1, "\udc00")
    assert lone_surrogate({"a": ["\U0001f600", None, 3.5]}) is None


def test_csv_row_with_invalid_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\nhi,hello\ncaf\xe9,ok\n")
    items = read(path)
    assert len(records(items)) == 1
    assert [(p.code, p.line) for p in errors(items)] == [("invalid_utf8", 3)]


def test_missing_and_unknown_files(tmp_path):
    assert [p.code for p in errors(read(tmp_path / "nope.jsonl"))] == ["file_not_found"]
    (folder := tmp_path / "data").mkdir()
    (problem,) = errors(read(folder))
    assert "is an empty folder. Give the data files by name" in problem.message
    (problem,) = errors(read(tmp_path / "*.jsonl"))
    assert "does not exist: a pattern is not expanded. Give the data files by name" in problem.message
    odd = tmp_path / "scan.pdf"
    odd.write_bytes(b"%PDF-1.4\n\x00\x01")
    (problem,) = errors(read(odd))
    assert problem.code == "unknown_file_type" and ".txt or .md for a document of raw text" in problem.message


def test_a_txt_or_md_file_is_one_document_and_a_binary_one_is_refused_by_name(tmp_path):
    import gzip

    page = "# Runbook\n\nRestart the database.\n\nThen check the replicas.\n"
    (tmp_path / "runbook.md").write_text(page, encoding="utf-8")
    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress(page.encode()))
    for name in ("runbook.md", "notes.txt.gz"):
        assert [(line, r) for line, r in read(tmp_path / name)] == [(1, Document(page))]
    (tmp_path / "scan.txt").write_bytes(b"%PDF-1.4\n\x00\x01\x02")
    (problem,) = errors(read(tmp_path / "scan.txt"))
    assert (problem.code, problem.file) == ("binary_file", str(tmp_path / "scan.txt"))
    assert "scan.txt is a binary file" in problem.message
    (tmp_path / "latin1.txt").write_bytes(b"line one\ncaf\xe9\n")
    assert [(p.code, p.line) for p in errors(read(tmp_path / "latin1.txt"))] == [("invalid_utf8", 2)]
    (tmp_path / "blank.md").write_text("\n  \n")
    assert [p.code for p in errors(read(tmp_path / "blank.md"))] == ["empty_file"]


def test_invalid_json_line_says_where_in_the_line_it_breaks(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(GOOD_ROW)
    path.write_text(f'{good}\n{good[:-2]}\n{{"messages": [] x}}\n')
    cut, stray = errors(read(path))
    assert (cut.code, cut.line) == ("invalid_json", 2) and "end of the line" in cut.message, cut.message
    assert "column 1." not in cut.message
    assert (stray.code, stray.line) == ("invalid_json", 3) and "at column 17" in stray.message, stray.message


@pytest.mark.parametrize(("encoding", "name"), [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_utf16_or_utf32_file_is_refused_once_naming_its_encoding(tmp_path, encoding, name, suffix):
    # PowerShell 5's `>` and Notepad's "Unicode" write UTF-16 with a byte-order mark.
    path = tmp_path / f"d{suffix}"
    text = {
        ".jsonl": f"{json.dumps(GOOD_ROW)}\n{json.dumps(GOOD_ROW)}\n",
        ".json": json.dumps([GOOD_ROW]),
        ".csv": "prompt,completion\nhi,hello\n",
    }[suffix]
    bom = "\ufeff" if encoding == "utf-16-be" else ""  # the plain codecs write their own
    path.write_bytes((bom + text).encode(encoding))
    [problem] = [p for _, p in read(path)]
    assert (problem.code, problem.line) == ("invalid_utf8", 1)
    assert f"the file is {name}" in problem.message and f"iconv -f {name.lower()} -t utf-8" in problem.message


def test_sharegpt_system_field_and_another_system_turn_conflict(tmp_path):
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    rows = [{"system": "Be brief.", "conversations": turns}, {"system": "Be verbose.", "conversations": turns}]
    items = read(write_jsonl(tmp_path / "s.jsonl", rows))
    assert [m.content for m in records(items)[0].messages] == ["Be brief.", "hi", "yo"]
    assert [(p.code, p.line, p.field) for p in errors(items)] == [("conflicting_system", 2, "system")]


def test_a_system_field_that_differs_from_the_system_turn_only_in_surrounding_whitespace_agrees(tmp_path):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    turns.append({"role": "assistant", "content": "yo"})
    rows = [{"system": "Be brief.\n", "messages": turns}, {"system": " Be brief.  ", "messages": turns}]
    items = read(write_jsonl(tmp_path / "s.jsonl", rows))
    assert errors(items) == []
    assert [[m.content for m in r.messages] for r in records(items)] == [["Be brief.", "hi", "yo"]] * 2


CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    ("row", "format", "canonical"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "Weather?", "name": "ann"},
                    {"role": "assistant", "tool_calls": [CALL], "reasoning_content": "Ask the tool."},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                    {"role": "assistant", "content": "Draft.", "weight": 0},
                    {"role": "user", "content": "Again?"},
                    {"role": "assistant", "content": "Sunny."},
                ],
                "tools": TOOLS,
            },
            "chat",
            "chat",
        ),
        (
            {
                "instruction": "Add",
                "input": "2 and 2",
                "output": "4",
                "system": "Be exact.",
                "history": [["Hi", "Hello"]],
            },
            "alpaca",
            "chat",
        ),
        (
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "S"},
            "sharegpt",
            "chat",
        ),
        ({"prompt": "Say hi", "completion": "Hi."}, "prompt_completion", "chat"),
        ({"text": "Plain text."}, "text", "text"),
        ({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "tools": TOOLS}, "preference", "preference"),
    ],
)
def test_a_record_written_as_its_canonical_row_reads_back_as_the_same_record(row, format, canonical):
    record, problems = check_row(row, format)
    assert record is not None and not problems
    written = record_row(record)
    assert detect_format(written) == canonical
    again, problems = check_row(json.loads(json.dumps(written)), canonical)
    assert not problems
    if isinstance(record, Preference):  # where the messages sit in the row differs, by design
        record.fields = again.fields = None
    assert again == record


def test_role_markers_written_into_replies_are_flagged_where_they_are(tmp_path):
    rows = [
        chat("Hi", "Assistant: Hello!"),
        chat("Sum 2 and 2", "4"),
        {"instruction": "Name a colour", "output": "Red.\n\n### Instruction:\nName another"},
        {"prompt": "Hi", "completion": "Hello.\nUser: and you?"},
        chat("Who are you?", "I help users: ask me anything.\nThe assistant: that is me."),
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "### Response: Hello"}]},
    ]
    items = []
    for i, row in enumerate(rows):  # one file per format: a file holds one format
        items += [(i + 1, p) for _, p in read(write_jsonl(tmp_path / f"{i}.jsonl", [row]))]
    warnings = [(line, p.code, p.field) for line, p in items if isinstance(p, Problem)]
    assert warnings == [
        (1, "role_marker_in_reply", "messages[1].content"),
        (3, "role_marker_in_reply", "output"),
        (4, "role_marker_in_reply", "completion"),
        (6, "role_marker_in_reply", "conversations[1].value"),
    ]
    assert all(p.severity == "warning" for _, p in items if isinstance(p, Problem))
    assert len(records(items)) == len(rows)  # flagged, still trained


def test_gzip_compressed_files_are_read_as_the_kind_under_the_gz(tmp_path):
    import gzip

    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(3)]
    jsonl = tmp_path / "train.jsonl.gz"
    jsonl.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    array = tmp_path / "train.json.gz"
    array.write_bytes(gzip.compress(json.dumps(rows, indent=2).encode()))
    table = tmp_path / "train.csv.gz"
    table.write_bytes(gzip.compress(b"instruction,output\nName a colour,Red\n\nName a fruit,Apple\n"))
    for path in (jsonl, array):
        assert [line for line, r in read(path) if isinstance(r, Conversation)] == (
            [1, 2, 3] if path == jsonl else [2, 14, 26]
        )
    items = read(table)
    assert [line for line, r in items if isinstance(r, Conversation)] == [2, 4] and not errors(items)

    plain = tmp_path / "plain.jsonl.gz"  # named .gz but never compressed
    plain.write_text(json.dumps(rows[0]) + "\n")
    [(line, problem)] = read(plain)
    assert problem.code == "unreadable_file" and "Rename it to plain.jsonl" in problem.message


@pytest.mark.parametrize("name", ["train.jsonl.gz", "train.json.gz", "train.csv.gz", "notes.txt.gz"])
@pytest.mark.parametrize("damage", ["cut short", "corrupt"])
def test_a_damaged_gzip_file_is_a_problem_that_names_it(tmp_path, name, damage):
    import gzip

    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(2000)]
    if name.startswith("train.csv"):
        text = "instruction,output\n" + "".join(f"Question {i}?,Answer {i}.\n" for i in range(2000))
    elif name.startswith("train.jsonl"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        text = json.dumps(rows if name.startswith("train") else "A document. " * 2000)
    data = gzip.compress(text.encode())
    path = tmp_path / name
    # Cut short: half the stream. Corrupt: the stream whole, its checksum wrong (gzip's trailer).
    path.write_bytes(data[: len(data) // 2] if damage == "cut short" else data[:-8] + bytes(8))
    items = read(path)
    *_, (line, problem) = items
    assert (line, problem.code, problem.file) == (None, "unreadable_file", str(path))
    assert problem.message.startswith("the gzip data is damaged or cut short (")
    assert f"`gzip -t {name}` tests a file" in problem.message
    assert errors(items) == [problem]


@pytest.mark.parametrize("name", ["train.jsonl", "train.json", "train.csv", "notes.txt"])
def test_a_gzip_file_without_the_gz_in_its_name_is_told_to_take_it(tmp_path, name):
    import gzip

    path = tmp_path / name
    path.write_bytes(gzip.compress(json.dumps(chat("Hi", "Hello")).encode() + b"\n"))
    [(line, problem)] = read(path)
    assert (line, problem.code, problem.file) == (None, "unreadable_file", str(path))
    assert f"the file is gzip-compressed, but its name does not end in .gz. Rename it to {name}.gz" in problem.message


def test_a_pretty_printed_json_lines_file_is_one_error_that_says_how_to_fix_it(tmp_path):
    path = tmp_path / "pretty.jsonl"
    path.write_text("\n" + "".join(json.dumps(chat(f"Q{i}?", f"A{i}."), indent=2) + "\n" for i in range(5)))
    [(line, problem)] = read(path)
    assert (line, problem.line, problem.code) == (2, 2, "invalid_json")
    assert "jq -c . pretty.jsonl" in problem.message


def test_a_raw_control_character_is_named_with_what_to_do(tmp_path):
    path = tmp_path / "nul.jsonl"
    path.write_bytes(json.dumps(chat("Hi", "Hello")).replace("Hello", "Hel\x00lo").encode() + b"\n")
    [problem] = errors(read(path))
    assert (problem.line, problem.code) == (1, "invalid_json")
    assert "a raw control character (0x00), which JSON strings take only escaped" in problem.message
    assert "at at" not in problem.message


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_too_deep_or_with_too_long_an_integer_is_a_problem_of_its_row(tmp_path, suffix):
    big = json.dumps({**chat("Hi", "Hello"), "n": 0}).replace('"n": 0', '"n": ' + "9" * 5_000)
    lines = ["[" * 10_000 + "]" * 10_000, json.dumps(chat("Hi", "Hello")), big]
    path = tmp_path / f"train{suffix}"
    path.write_text("\n".join(lines) + "\n" if suffix == ".jsonl" else "[\n" + ",\n".join(lines) + "\n]\n")
    problems = errors(read(path))
    said = [p.message.split(";")[0] for p in problems]
    if suffix == ".jsonl":
        assert [(p.line, p.code) for p in problems] == [(1, "invalid_json"), (3, "invalid_json")]
        assert said == [
            "the JSON nests arrays or objects too deeply to be read",
            "the JSON has an integer of more than 4,300 digits, more than Python reads",
        ]
    else:  # the array's reader cannot tell where an element it gave up on ends, so it stops there
        assert [(p.line, p.code) for p in problems] == [(2, "invalid_json")]
        assert said == ["the JSON nests arrays or objects too deeply to be read"]
        assert "The rest of the file was not read" in problems[0].message


def test_a_csv_line_longer_than_a_row_may_be_is_refused_without_reading_it_whole(tmp_path):
    import tracemalloc

    from tuneforge.data.readers import MAX_ROW_BYTES

    path = tmp_path / "train.csv"
    path.write_bytes(b"prompt,completion\nSay hi,hi\nSay hi," + b"x" * (10 * MAX_ROW_BYTES) + b"\nSay ho,ho\n")
    tracemalloc.start()
    try:
        items = read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(p.line, p.code) for p in errors(items)] == [(3, "row_too_large")]
    assert peak < 4 * MAX_ROW_BYTES  # the line's 20 MiB never held at once


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_row_s_limit_counts_bytes_however_many_characters_hold_them(tmp_path, suffix):
    from tuneforge.data.readers import MAX_ROW_BYTES

    def line(completion: str) -> str:
        return (
            f"Say hi,{completion}\n"
            if suffix == ".csv"
            else json.dumps({"prompt": "Say hi", "completion": completion}, ensure_ascii=False) + "\n"
        )

    # "é" is two bytes of UTF-8: the first row is under the limit, the second over it with half as many characters.
    under, over = "é" * (MAX_ROW_BYTES // 2 - 100), "é" * (MAX_ROW_BYTES // 2 + 1)
    head = "prompt,completion\n" if suffix == ".csv" else ""
    path = tmp_path / f"train{suffix}"
    path.write_text(head + line(under) + line(over), encoding="utf-8")
    items = read(path)
    assert [r.messages[-1].content for r in records(items)] == [under]
    assert [p.code for p in errors(items)] == ["row_too_large"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_whose_only_row_is_too_large_is_told_that_alone(tmp_path, suffix):
    """The oversized row is the file's one problem: the file is not also told it has no rows, only blank lines."""
    from tuneforge.data.readers import MAX_ROW_BYTES

    path = tmp_path / f"train{suffix}"
    big = "x" * (MAX_ROW_BYTES + 1)
    path.write_text(
        f"prompt,completion\nSay hi,{big}\n" if suffix == ".csv" else json.dumps({"prompt": "hi", "completion": big})
    )
    assert [(p.line, p.code) for p in errors(read(path))] == [(2 if suffix == ".csv" else 1, "row_too_large")]


def test_a_windows_1252_file_is_told_a_conversion_that_gives_its_text_back(tmp_path):
    import codecs
    import re

    text = '{"prompt": "Quote", "completion": "He said \u201chello\u201d \u2013 caf\u00e9"}\n'
    path = tmp_path / "export.jsonl"
    path.write_bytes(text.encode("cp1252"))
    (problem,) = errors(read(path))
    assert problem.code == "invalid_utf8"
    told = re.search(r"`iconv -f (\S+) -t utf-8 export\.jsonl > utf8-export\.jsonl`", problem.message)
    assert told, problem.message
    assert path.read_bytes().decode(codecs.lookup(told.group(1)).name) == text


@pytest.mark.parametrize(
    "line", ['{"prompt": "Hi", "completion": "Hello",}', '{"prompt": "Hi", "completion": ["a", "b",]}']
)
def test_a_trailing_comma_is_named_as_such(tmp_path, line):
    path = tmp_path / "rows.jsonl"
    path.write_text(f'{{"prompt": "Hey", "completion": "Hi"}}\n{line}\n')
    (problem,) = errors(read(path))
    assert (problem.code, problem.line) == ("invalid_json", 2)
    assert "a trailing comma (a ',' before a closing" in problem.message, problem.message
    assert f"remove it) at column {line.rindex(',') + 2}." in problem.message, problem.message


@pytest.mark.parametrize(("role", "ours"), [("bot", "assistant"), ("model", "assistant"), ("ai", "assistant")])
def test_a_reply_role_of_another_convention_is_told_ours(tmp_path, role, ours):
    chat_row = {"messages": [{"role": "user", "content": "hi"}, {"role": role, "content": "hey"}]}
    sharegpt_row = {"conversations": [{"from": "human", "value": "hi"}, {"from": role, "value": "hey"}]}
    for row, said in ((chat_row, ours), (sharegpt_row, "gpt")):
        (problem,) = errors(read(write_jsonl(tmp_path / "rows.jsonl", [row])))
        assert problem.code == "unrecognized_role"
        assert f"'{role}' is '{said}' here" in problem.message, problem.message


@pytest.mark.parametrize("role", [["assistant"], {"name": "assistant"}, 1])
def test_a_role_that_is_not_a_string_is_a_data_type_error(tmp_path, role):
    chat_row = {"messages": [{"role": "user", "content": "hi"}, {"role": role, "content": "hey"}]}
    sharegpt_row = {"conversations": [{"from": "human", "value": "hi"}, {"from": role, "value": "hey"}]}
    for row, field in ((chat_row, "messages[1].role"), (sharegpt_row, "conversations[1].from")):
        (problem,) = errors(read(write_jsonl(tmp_path / "rows.jsonl", [row])))
        assert (problem.code, problem.field) == ("data_type", field)
        assert "must be a string" in problem.message


def test_a_chat_rows_system_field_is_its_system_prompt_as_in_sharegpt(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]
    (conv,) = records(read(write_jsonl(tmp_path / "chat.jsonl", [{"system": "Be terse.", "messages": turns}])))
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "Be terse."),
        ("user", "hi"),
        ("assistant", "hey"),
    ]
    other = {"system": "Be terse.", "messages": [{"role": "system", "content": "Be kind."}, *turns]}
    (problem,) = errors(read(write_jsonl(tmp_path / "both.jsonl", [other])))
    assert (problem.code, problem.field) == ("conflicting_system", "system")
    assert "messages[0] is a system turn" in problem.message


@pytest.mark.parametrize("system", ["", "  \n"])
def test_a_blank_system_field_is_no_system_prompt_in_each_format(tmp_path, system):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]
    rows = [
        {"system": system, "messages": turns},
        {"system": system, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]},
        {"system": system, "instruction": "hi", "input": system, "output": "hey"},
    ]
    for i, row in enumerate(rows):
        (conv,) = records(read(write_jsonl(tmp_path / f"rows{i}.jsonl", [row])))
        assert [(m.role, m.content) for m in conv.messages] == [("user", "hi"), ("assistant", "hey")], row


def test_a_null_field_is_named_null_not_missing(tmp_path):
    completions = [{"prompt": "Hi", "completion": None}, {"prompt": "Hi"}, {"prompt": "Hi", "completion": "Hello"}]
    chats = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
        chat("Hi", "Hello"),
    ]
    found = {}
    for name, rows in (("pc", completions), ("chat", chats)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        found |= {(name, p.line, p.field): p.message for p in errors(read(path))}
    assert "'completion' is null" in found["pc", 1, "completion"] and "string" in found["pc", 1, "completion"]
    assert "'completion' is missing" in found["pc", 2, "completion"]
    assert "'content' is missing" in found["chat", 1, "messages[1].content"]
    assert "'content' is null" in found["chat", 2, "messages[1].content"]


def test_a_null_list_of_messages_is_named_null_with_what_to_give(tmp_path):
    files = {
        "chat": [chat("Hi", "Hello"), {"messages": None}],
        "sharegpt": [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}]
        + [{"conversations": None}],
    }
    for name, rows in files.items():
        field = "messages" if name == "chat" else "conversations"
        (problem,) = errors(read(write_jsonl(tmp_path / f"{name}.jsonl", rows)))
        assert (problem.line, problem.field) == (2, field)
        assert f"'{field}' is null: give it a list of messages like [{{" in problem.message
