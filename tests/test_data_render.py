"""Chat rendering and loss masks: exactly the assistant replies plus their end-of-turn token are trained."""

from __future__ import annotations

import random
import re

import pytest
from data.rows import trained_runs
from tiny import CHATML_TEMPLATE as TINY_TEMPLATE
from tiny import tiny_tokenizer

from tuneforge.data import (
    IGNORE_INDEX,
    Conversation,
    Document,
    Message,
    Preference,
    render_conversation,
    render_examples,
    render_preference,
)
from tuneforge.data.formats import check_row
from tuneforge.data.render import ChatRenderer, renderer_for
from tuneforge.errors import DataError

TWO_TURNS = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": " The answer is four."},
]


def tokenizer_with_template(template: str | None):
    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


def test_trained_tokens_are_each_reply_plus_end_of_turn(tokenizer):
    example = render_conversation(TWO_TURNS, tokenizer)
    assert trained_runs(example, tokenizer) == ["I am fine, thank you.<|im_end|>", " The answer is four.<|im_end|>"]


def test_labels_are_shifted_targets(tokenizer):
    example = render_conversation(TWO_TURNS, tokenizer)
    assert len(example.labels) == len(example.input_ids)
    assert example.labels[-1] == IGNORE_INDEX
    for i, label in enumerate(example.labels):
        assert label in (IGNORE_INDEX, example.input_ids[min(i + 1, len(example.input_ids) - 1)])
        if label != IGNORE_INDEX:
            assert label == example.input_ids[i + 1]


def test_input_ids_are_what_the_tokenizer_gives_the_rendered_chat(tokenizer):
    example = render_conversation(TWO_TURNS, tokenizer)
    text = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert example.input_ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_weight_zero_replies_are_not_trained(tokenizer):
    messages = [dict(m) for m in TWO_TURNS]
    messages[2]["weight"] = 0
    example = render_conversation(messages, tokenizer)
    assert trained_runs(example, tokenizer) == [" The answer is four.<|im_end|>"]


def test_train_on_last_assistant_and_all(tokenizer):
    last = render_conversation(TWO_TURNS, tokenizer, train_on="last_assistant")
    assert trained_runs(last, tokenizer) == [" The answer is four.<|im_end|>"]

    messages = [dict(m) for m in TWO_TURNS]
    messages[2]["weight"] = 0
    everything = render_conversation(messages, tokenizer, train_on="all")
    whole = tokenizer.decode(everything.input_ids)
    start, end = whole.index("I am fine"), whole.index("<|im_end|>", whole.index("I am fine")) + len("<|im_end|>")
    first_token = tokenizer.decode(everything.input_ids[:1])
    assert trained_runs(everything, tokenizer) == [whole[len(first_token) : start], whole[end:]]


def test_no_trained_tokens_is_an_error(tokenizer):
    messages = [dict(m) for m in TWO_TURNS]
    messages[2]["weight"] = messages[4]["weight"] = 0
    with pytest.raises(DataError) as err:
        render_conversation(messages, tokenizer)
    assert err.value.code == "no_trained_tokens" and "every assistant message has weight 0" in str(err.value)


def test_a_row_without_an_assistant_message_is_an_error_that_says_so(tokenizer):
    with pytest.raises(DataError) as err:
        render_conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenizer)
    assert err.value.code == "no_trained_tokens"
    assert "it has no assistant message" in str(err.value) and "weight" not in str(err.value)


def test_invalid_messages_raise_coded_errors(tokenizer):
    with pytest.raises(DataError) as err:
        render_conversation([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], tokenizer)
    assert err.value.code == "data_type"


def test_a_conversation_starting_with_a_trained_reply_is_an_error(tokenizer):
    with pytest.raises(DataError) as err:
        render_conversation([{"role": "assistant", "content": "Hi"}], tokenizer)
    assert err.value.code == "no_prompt"


def test_special_tokens_inside_content_are_an_error(tokenizer):
    with pytest.raises(DataError) as err:
        render_conversation(
            [{"role": "user", "content": "end<|im_end|>"}, {"role": "assistant", "content": "x"}], tokenizer
        )
    assert (err.value.code, err.value.problems[0].field) == ("special_token_in_content", "messages[0].content")
    # A special token that marks no structure in this template is read as that token, as at inference.
    example = render_conversation(
        [{"role": "user", "content": "a<|endoftext|>b"}, {"role": "assistant", "content": "x"}], tokenizer
    )
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in example.input_ids


def test_a_special_token_in_a_trained_reply_is_an_error(tokenizer):
    # The model would learn to write the control token where the text is meant, and decoding drops it.
    reply = {"role": "assistant", "content": "Split documents with <|endoftext|> between them."}
    with pytest.raises(DataError) as err:
        render_conversation([{"role": "user", "content": "How?"}, reply], tokenizer)
    assert (err.value.code, err.value.problems[0].field) == ("special_token_in_content", "messages[1].content")
    assert "'<|endoftext|>'" in str(err.value)
    # An untrained reply is context, read as at inference.
    untrained = [{"role": "user", "content": "How?"}, {**reply, "weight": 0}, {"role": "user", "content": "And?"}]
    example = render_conversation([*untrained, {"role": "assistant", "content": "x"}], tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in example.input_ids


def _random_text(rng: random.Random) -> str:
    alphabet = ["the", " fox", "  ", "\n", "\n\n", "é", "日本", "!", "?", " 42", '{"a": 1}', "\t", "ü ", "'s", "x"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).strip() or "x"


def test_token_ids_match_whole_text_tokenization_on_random_conversations(tokenizer):
    rng = random.Random(0)
    conversations = []
    for _ in range(200):
        messages = [Message("system", _random_text(rng))] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            messages += [Message("user", _random_text(rng)), Message("assistant", _random_text(rng))]
        conversations.append(Conversation(messages))
    for conversation, example in zip(conversations, renderer_for(tokenizer).render(conversations)):
        messages = [m.to_template() for m in conversation.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert example.input_ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
        replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert trained_runs(example, tokenizer) == replies


def test_a_tokenizer_that_does_not_cut_at_added_tokens_falls_back_to_whole_texts(tokenizer):
    renderer = ChatRenderer(tokenizer)
    renderer._cut_at = re.compile(" ")  # pretend cuts that the tokenizer does not make
    (example,) = renderer.render([Conversation([Message("user", "a b c"), Message("assistant", "d e")])])
    assert renderer._cut_at is None
    messages = [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert trained_runs(example, tokenizer) == ["d e<|im_end|>"]


def test_a_template_that_rewrites_earlier_turns_is_rendered_turn_by_turn():
    # Drops the content of every assistant turn but the last (as Qwen 3 drops past reasoning).
    template = TINY_TEMPLATE.replace(
        "message['content']", "('' if message['role'] == 'assistant' and not loop.last else message['content'])"
    )
    tok = tokenizer_with_template(template)
    first, last = render_examples(TWO_TURNS, tok)
    # Each reply is trained as the model writes it: after the prompt it answers, as the last turn.
    assert tok.decode(first.input_ids) == tok.apply_chat_template(TWO_TURNS[:3], tokenize=False)
    assert trained_runs(first, tok) == ["I am fine, thank you.<|im_end|>"]
    assert tok.decode(last.input_ids) == tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert trained_runs(last, tok) == [" The answer is four.<|im_end|>"]  # the emptied first reply is not trained
    with pytest.raises(DataError) as err:
        render_conversation(TWO_TURNS, tok)
    assert err.value.code == "rendered_turn_by_turn" and "2 examples" in err.value.message
    # Training only the last reply needs one example.
    example = render_conversation(TWO_TURNS, tok, train_on="last_assistant")
    assert trained_runs(example, tok) == [" The answer is four.<|im_end|>"]


def test_a_template_that_moves_the_system_prompt_is_refused_naming_the_reply():
    # Writes the system prompt into the last user message only, as Mistral's template does.
    template = (
        "{% for message in messages[1:] %}{% if message['role'] == 'user' %}{{ '<|im_start|>user\n' }}"
        "{% if loop.last %}{{ messages[0]['content'] + ' ' }}{% endif %}{{ message['content'] + '<|im_end|>\n' }}"
        "{% else %}{{ '<|im_start|>assistant\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(DataError) as err:
        render_conversation(TWO_TURNS, tokenizer_with_template(template))
    problem = err.value.problems[0]
    assert (problem.code, problem.field) == ("template_not_prefix", "messages[2]")
    assert "'<|im_start|>user\\nYou are brief. Hello, how are ' (asked for the reply)" in problem.message
    assert "'<|im_start|>user\\nHello, how are you?<|im_end|>\\n' (with the reply)" in problem.message


def test_text_a_template_writes_after_the_last_turn_is_not_trained():
    # Phi-3's template closes a conversation with EOS, after the last end of turn.
    template = TINY_TEMPLATE.replace(
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% else %}{{ '<|endoftext|>' }}{% endif %}",
    )
    tok = tokenizer_with_template(template)
    example = render_conversation(TWO_TURNS, tok)
    assert tok.decode(example.input_ids).endswith("<|im_end|>\n<|endoftext|>")
    assert trained_runs(example, tok) == ["I am fine, thank you.<|im_end|>", " The answer is four.<|im_end|>"]


def test_the_end_of_turn_is_found_when_the_template_refuses_a_system_message():
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    tok = tokenizer_with_template(template + TINY_TEMPLATE)
    assert renderer_for(tok).end_of_turn_id == tok.convert_tokens_to_ids("<|im_end|>")
    example = render_conversation(TWO_TURNS[1:3], tok)
    assert trained_runs(example, tok) == ["I am fine, thank you.<|im_end|>"]


def test_a_prompt_that_splits_a_token_is_caught_at_token_level():
    # The generation prompt ends with "T", the reply starts with "The": the text is a prefix, the tokens not.
    template = TINY_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\nT'")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The quick brown fox"}]
    with pytest.raises(DataError) as err:
        render_conversation(messages, tokenizer_with_template(template))
    assert err.value.code == "template_not_prefix" and "tokenizes differently" in str(err.value)


@pytest.mark.parametrize(
    ("refusal", "said"),
    [
        (
            "{% if messages | selectattr('role', 'equalto', 'tool') | list %}"
            "{{ raise_exception('no tools here') }}{% endif %}",
            "no tools here",
        ),
        # Jinja renders a macro's call by recursion: one called without end on some rows refuses those rows alone.
        (
            "{% macro again() %}{{ again() }}{% endmacro %}"
            "{% for m in messages if m.role == 'tool' %}{{ again() }}{% endfor %}",
            "recursion",
        ),
    ],
    ids=["raises", "recurses without end"],
)
def test_template_errors_are_row_problems(refusal, said):
    renderer = ChatRenderer(tokenizer_with_template(refusal + TINY_TEMPLATE))
    good = Conversation([Message("user", "Hi"), Message("assistant", "Hello")])
    bad = Conversation([Message("user", "Hi"), Message("tool", "42"), Message("assistant", "Hello")])
    results = renderer.render([good, bad, good])
    assert not isinstance(results[0], list) and not isinstance(results[2], list)
    assert [p.code for p in results[1]] == ["template_error"] and said in results[1][0].message


def test_a_template_refusing_one_side_of_a_pair_names_that_side():
    # A message with a name goes through the template itself, which refuses it: the chosen conversation alone.
    refusal = "{% for m in messages if m.name %}{{ raise_exception('no names') }}{% endfor %}"
    renderer = ChatRenderer(tokenizer_with_template(refusal + TINY_TEMPLATE))
    rows = [
        {"prompt": [{"role": "user", "content": "Hi"}]}
        | {"chosen": [{"role": "assistant", "content": "Hello", "name": "bot"}]}
        | {"rejected": [{"role": "assistant", "content": "No."}]},
        {"input": {"messages": [{"role": "user", "content": "Hi"}]}}
        | {"preferred_output": [{"role": "assistant", "content": "Hello", "name": "bot"}]}
        | {"non_preferred_output": [{"role": "assistant", "content": "No."}]},
    ]
    pairs = [check_row(row, "preference")[0] for row in rows]
    for problems in renderer.render_preferences(pairs):
        assert [(p.code, p.field) for p in problems] == [("template_error", "chosen messages")]


def test_a_tokenizer_without_chat_template_gets_chatml():
    tok = tokenizer_with_template(None)
    renderer = ChatRenderer(tok)
    assert renderer.uses_fallback_template
    example = render_conversation(TWO_TURNS[1:3], tok)
    assert tok.decode(example.input_ids).startswith("<|im_start|>user\nHello")
    assert trained_runs(example, tok) == ["I am fine, thank you.<|im_end|>"]


def test_documents_are_trained_in_full_and_end_with_eos(tokenizer):
    example = render_conversation(Document("The quick brown fox."), tokenizer)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.labels[:-1]) == tokenizer.decode(example.input_ids[1:])


def test_preference_pairs_share_the_prompt_and_train_only_their_reply(tokenizer):
    pref = Preference(
        [Message("user", "Hello, how are you?")], Message("assistant", "I am fine."), Message("assistant", "Go away.")
    )
    chosen, rejected = render_preference(pref, tokenizer)
    assert trained_runs(chosen, tokenizer) == ["I am fine.<|im_end|>"]
    assert trained_runs(rejected, tokenizer) == ["Go away.<|im_end|>"]
    shared = chosen.labels.index(next(label for label in chosen.labels if label != IGNORE_INDEX)) + 1
    assert chosen.input_ids[:shared] == rejected.input_ids[:shared]


def test_end_of_turn_token_is_found_from_the_template(tokenizer):
    renderer = renderer_for(tokenizer)
    assert renderer.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert renderer._direct_render is not None  # the direct renderer matched apply_chat_template on the probe


def test_tools_and_tool_calls_render_as_apply_chat_template_renders_them():
    template = (
        "{% if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
        "{% if message.tool_calls %}{{ message.tool_calls | tojson }}{% endif %}{{ '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok = tokenizer_with_template(template)
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "fox"}'}}
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    conversation = Conversation(
        [
            Message("user", "Find the fox"),
            Message("assistant", "", tool_calls=[call]),
            Message("tool", "in the forest", tool_call_id="c1"),
            Message("assistant", "In the forest."),
        ],
        tools=tools,
    )
    (example,) = ChatRenderer(tok).render([conversation])
    text = tok.apply_chat_template([m.to_template() for m in conversation.messages], tools=tools, tokenize=False)
    assert example.input_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    call_turn, answer = trained_runs(example, tok)
    assert '"name": "lookup"' in call_turn and call_turn.endswith("<|im_end|>")
    assert answer == "In the forest.<|im_end|>"


def test_chatml_shortcut_renders_exactly_as_the_template_and_only_for_chatml():
    from tuneforge.data.render import _chatml_shortcut

    rng = random.Random(0)
    words = ["Hi", " there", "\n", "{{ x }}", "  ", "<b>", "", "answer: 4 "]
    for template in (
        TINY_TEMPLATE,
        TINY_TEMPLATE.replace(
            "{% for",
            "{{ '<|im_start|>system\nBe kind.<|im_end|>\n' if messages and messages[0]['role'] != 'system' }}{% for",
        ),
    ):
        renderer = ChatRenderer(tokenizer_with_template(template))
        for _ in range(50):
            messages = [
                {
                    "role": rng.choice(["system", "user", "assistant", "tool"]),
                    "content": "".join(rng.choices(words, k=rng.randint(0, 4))),
                }
                for _ in range(rng.randint(1, 5))
            ]
            for generation_prompt in (False, True):
                official = renderer.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation_prompt
                )
                assert renderer._direct_render(messages, None, generation_prompt) == official
    trimming = TINY_TEMPLATE.replace("message['content']", "message['content'] | trim")
    renderer = ChatRenderer(tokenizer_with_template(trimming))
    assert _chatml_shortcut(lambda m, t, g: renderer._apply_template([m], t, g)[0]) is None


def test_a_template_that_drops_tool_calls_is_a_row_problem_not_an_empty_reply(tokenizer):
    # ChatML as SmolLM2 has it writes only a message's content: a tool call would train as an empty reply.
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "fox"}'}}
    conversation = Conversation(
        [
            Message("user", "Find the fox"),
            Message("assistant", "", tool_calls=[call]),
            Message("tool", "in the forest", tool_call_id="c1"),
            Message("assistant", "In the forest."),
        ]
    )
    [problem] = ChatRenderer(tokenizer).render([conversation])[0]
    assert (problem.code, problem.field) == ("tool_calls_not_rendered", "messages[1].tool_calls")
    assert "'<|im_end|>'" in problem.message
