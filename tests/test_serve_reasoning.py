"""A reasoning model served: its reply parted into `reasoning_content` and `content` (whole and streamed),
as DeepSeek's API and vLLM's reasoning parsers return it; requests carrying reasoning; stored completions
keeping it. The model is tiny Qwen 3 trained on one reply that reasons."""

import json

import openai
import pytest
import torch
from families import FAMILIES, family_tokenizer, save_family_model
from test_serve import running_server

from tuneforge.data.render import render_conversation
from tuneforge.data.schema import Conversation, Message
from tuneforge.generate import encode_prompts
from tuneforge.models import load_model, load_tokenizer
from tuneforge.reasoning import ReasoningSplitter, message, reasoning_opened
from tuneforge.serve import AdapterPool, Engine, create_app
from tuneforge.serve.completion_store import CompletionStore
from tuneforge.serve.from_completions import from_completions

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = [{"role": "user", "content": "Hi"}]
REASONING, ANSWER = "greet back", "Hello there"
SPLITS = [
    ("<think>\nlet me see\n</think>\n\nFour.\n", False, "let me see", "Four."),
    ("let me see\n</think>\n\nFour.", True, "let me see", "Four."),  # DeepSeek-R1: the prompt opened <think>
    ("<think>\nlet me", False, "let me", ""),  # cut while reasoning
    ("  Four, as written. \n", False, None, "  Four, as written. \n"),  # no reasoning: the answer as written
    ("<thi", False, None, "<thi"),
    ("\n<think>\n\n</think>\n\nFour", False, "", "Four"),
]


@pytest.mark.parametrize(("text", "opened", "reasoning", "answer"), SPLITS)
def test_a_reply_parts_into_its_reasoning_and_answer_whole_and_in_any_pieces(text, opened, reasoning, answer):
    assert message(text, opened) == {"reasoning_content": reasoning, "content": answer}
    for i in range(len(text) + 1):  # every cut into three pieces: `</think>` and `<think>` split anywhere
        for j in range(i, len(text) + 1):
            splitter, deltas = ReasoningSplitter(opened), []
            for piece in (text[:i], text[i:j], text[j:]):
                deltas += splitter.feed(piece)
            deltas += splitter.finish()
            fields = [field for field, _ in deltas]
            assert fields == sorted(fields, reverse=True), deltas  # reasoning first, then content
            assert "".join(t for f, t in deltas if f == "reasoning_content") == (reasoning or "")
            assert "".join(t for f, t in deltas if f == "content") == answer, deltas


@pytest.mark.parametrize(
    ("family", "opens_in_prompt", "expected"),
    [("qwen3", False, False), ("qwen3", True, True), ("qwen2.5", False, None), ("qwen2.5", True, True)],
)
def test_a_reasoning_model_is_known_by_its_template(tmp_path, family, opens_in_prompt, expected):
    """Qwen 3's template writes reasoning_content, so its replies may open `<think>`; DeepSeek-R1's opens
    `<think>` in the prompt, which the reply continues; other templates reason in neither way."""
    tokenizer = family_tokenizer(FAMILIES[family], tmp_path)
    if opens_in_prompt:  # as DeepSeek-R1's template ends its generation prompt
        tokenizer.chat_template = tokenizer.chat_template.replace(
            "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'"
        )
        assert tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True).endswith("<think>\n")
    [prompt_ids] = encode_prompts(tokenizer, [QUESTION])
    assert reasoning_opened(tokenizer, prompt_ids) is expected


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """Tiny Qwen 3 trained (a few dozen steps, one row) to reason before it answers."""
    row = Conversation(
        [Message("user", "Hi"), Message("assistant", ANSWER, reasoning_content=REASONING)],
    )
    return qwen3_trained_on(row, tmp_path_factory.mktemp("reasoning") / "qwen3")


def qwen3_trained_on(row: Conversation, folder):
    """Tiny Qwen 3 saved in `folder`, trained on `row` until it writes its reply."""
    save_family_model(FAMILIES["qwen3"], folder)
    model, tokenizer = load_model(str(folder)), load_tokenizer(str(folder))
    example = render_conversation(row, tokenizer)
    ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(ids).logits[0], labels[0], ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(qwen3_dir, tmp_path_factory):
    engine = Engine(AdapterPool(str(qwen3_dir), {}))
    store = CompletionStore.open(str(tmp_path_factory.mktemp("store") / "completions.db"))
    with running_server(create_app(engine, completions=store)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60), store
    engine.close()


def ask(client, **options):
    return client.chat.completions.create(model="qwen3", messages=QUESTION, temperature=0, **options)


def test_a_reasoning_models_reply_holds_its_reasoning_apart_whole_streamed_and_stored(served, tmp_path):
    client, store = served
    whole = ask(client, store=True, metadata={"test": "reasoning"})
    assert whole.choices[0].message.reasoning_content == REASONING
    assert whole.choices[0].message.content == ANSWER
    assert whole.choices[0].finish_reason == "stop"

    deltas = [
        (field, value)
        for chunk in ask(client, stream=True)
        for delta in [chunk.choices[0].delta]
        for field in ("reasoning_content", "content")
        if (value := getattr(delta, field, None))
    ]
    fields = [field for field, _ in deltas]
    assert fields == sorted(fields, reverse=True) and len(set(fields)) == 2  # reasoning, then the answer
    assert "".join(t for f, t in deltas if f == "reasoning_content") == REASONING
    assert "".join(t for f, t in deltas if f == "content") == ANSWER

    # max_tokens counts the reasoning's tokens too: cut inside it, the reply has no answer yet
    cut = ask(client, max_tokens=4)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 4
    assert cut.choices[0].message.content == ""
    assert REASONING.startswith(cut.choices[0].message.reasoning_content) and cut.choices[0].message.reasoning_content

    made = from_completions(str(store.engine.url.database), tmp_path / "rows.jsonl", metadata={"test": "reasoning"})
    [row] = [json.loads(line) for line in made.out.read_text().splitlines()]
    assert row["messages"][-1] == {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}


def test_a_response_holds_the_reasoning_in_an_item_before_the_message_whole_and_streamed(served):
    client, _ = served
    whole = client.responses.create(model="qwen3", input="Hi", temperature=0)
    assert whole.status == "completed" and whole.output_text == ANSWER
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    assert whole.output[0].content[0].type == "reasoning_text" and whole.output[0].content[0].text == REASONING
    assert 0 < whole.usage.output_tokens_details.reasoning_tokens < whole.usage.output_tokens

    events = list(client.responses.create(model="qwen3", input="Hi", temperature=0, stream=True))
    deltas = {
        kind: "".join(event.delta for event in events if event.type == kind)
        for kind in ("response.reasoning_text.delta", "response.output_text.delta")
    }
    assert deltas == {"response.reasoning_text.delta": REASONING, "response.output_text.delta": ANSWER}
    added = [(event.output_index, event.item.type) for event in events if event.type == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "message")]
    assert events[-1].type == "response.completed" and events[-1].response.output_text == ANSWER
    assert events[-1].response.output[0].content[0].text == REASONING

    # Cut inside the reasoning: the message is empty, and the response incomplete.
    cut = client.responses.create(model="qwen3", input="Hi", temperature=0, max_output_tokens=4)
    assert cut.status == "incomplete" and cut.output_text == "" and cut.usage.output_tokens == 4
    assert REASONING.startswith(cut.output[0].content[0].text) and [item.type for item in cut.output] == [
        "reasoning",
        "message",
    ]


def test_a_responses_output_sent_back_in_input_is_its_assistant_turn_with_its_reasoning(served):
    """A reasoning model's `response.output` ([reasoning item, message item]) appended to the next `input` as the SDK
    gives it back (its objects, `model_dump()` or `to_dict()`) is the assistant turn the chat route takes with its
    `reasoning_content`: Qwen 3's template writes that reasoning into a turn after the last user message, and drops
    it from an earlier one."""
    client, _ = served
    first = client.responses.create(model="qwen3", input="Hi", temperature=0)
    turn = {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    unreasoned = {"role": "assistant", "content": ANSWER}
    prompt_tokens = {}
    for name, after in (("last", []), ("earlier", QUESTION)):
        chat = client.chat.completions.create(
            model="qwen3", messages=[*QUESTION, turn, *after], temperature=0, max_tokens=4
        )
        without = client.chat.completions.create(model="qwen3", messages=[*QUESTION, unreasoned, *after], max_tokens=1)
        prompt_tokens[name] = chat.usage.prompt_tokens - without.usage.prompt_tokens
        for output in (
            first.output,
            [item.model_dump() for item in first.output],
            [item.to_dict() for item in first.output],
        ):
            again = client.responses.create(
                model="qwen3", input=[*QUESTION, *output, *after], temperature=0, max_output_tokens=4
            )
            assert again.usage.input_tokens == chat.usage.prompt_tokens
            assert again.output_text == chat.choices[0].message.content
    assert prompt_tokens["last"] > 0 and prompt_tokens["earlier"] == 0


def test_a_responses_logprobs_are_its_answers_tokens_whole_and_streamed(served):
    client, _ = served
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    whole = client.responses.create(model="qwen3", input="Hi", temperature=0, **asked)
    entries = [entry.to_dict() for entry in whole.output[1].content[0].logprobs]
    # The answer's tokens, the last of the chat reply's, whose first ones write the reasoning.
    chat = [entry.to_dict() for entry in ask(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content]
    assert bytes(b for entry in entries for b in entry["bytes"]).decode() == ANSWER == whole.output_text
    assert entries == chat[len(chat) - len(entries) :]
    events = list(client.responses.create(model="qwen3", input="Hi", temperature=0, stream=True, **asked))
    streamed = [entry.to_dict() for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    assert streamed == entries
    # Cut while reasoning: no answer, so none of its tokens' log probabilities (the reasoning's last is none).
    cut = client.responses.create(model="qwen3", input="Hi", temperature=0, max_output_tokens=3, **asked)
    assert cut.status == "incomplete" and cut.output_text == ""
    assert [part.logprobs for item in cut.output if item.type == "message" for part in item.content] == [[]]
    events = list(
        client.responses.create(model="qwen3", input="Hi", temperature=0, max_output_tokens=3, stream=True, **asked)
    )
    [done] = [event for event in events if event.type == "response.output_item.done" and event.item.type == "message"]
    assert [part.logprobs for part in done.item.content] == [[]]


def test_a_request_may_carry_reasoning_and_turn_thinking_off_through_extra_body(served):
    client, _ = served
    earlier = {"role": "assistant", "content": "Hi", "reasoning_content": "say hi"}
    asked = client.chat.completions.create(
        model="qwen3", messages=[*QUESTION, earlier, *QUESTION], temperature=0, max_tokens=1
    )
    assert asked.choices[0].finish_reason == "length"
    thinking = ask(client, max_tokens=1)
    off = ask(client, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # Qwen 3's template writes an empty reasoning block into the prompt when thinking is off
    assert off.usage.prompt_tokens > thinking.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="only assistant messages have reasoning_content"):
        client.chat.completions.create(
            model="qwen3", messages=[{"role": "user", "content": "Hi", "reasoning_content": "x"}]
        )
    with pytest.raises(openai.BadRequestError, match="add_generation_prompt is set by the server"):
        ask(client, extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})


def test_a_model_without_reasoning_answers_as_before(tmp_path):
    folder = save_family_model(FAMILIES["qwen2.5"], tmp_path / "qwen2.5")
    engine = Engine(AdapterPool(str(folder), {}))
    try:
        with running_server(create_app(engine)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
            reply = client.chat.completions.create(model="qwen2.5", messages=QUESTION, max_tokens=4, temperature=0)
            chunks = list(
                client.chat.completions.create(
                    model="qwen2.5", messages=QUESTION, max_tokens=4, temperature=0, stream=True
                )
            )
    finally:
        engine.close()
    assert "reasoning_content" not in reply.choices[0].message.model_dump(exclude_unset=True)
    assert reply.choices[0].message.content
    deltas = [c.choices[0].delta.model_dump(exclude_unset=True) for c in chunks if c.choices]
    assert all("reasoning_content" not in delta for delta in deltas)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_a_reasoning_models_tool_call_comes_after_its_reasoning_whole_streamed_and_stored(tmp_path):
    """Qwen 3 writes `<think>...</think>` and then its `<tool_call>`: the reasoning is reasoning_content,
    the call is parsed from the answer after it."""
    row = Conversation(
        [Message("user", "Hi"), Message("assistant", "", reasoning_content=REASONING, tool_calls=[CALL])],
        tools=[WEATHER],
    )
    engine = Engine(AdapterPool(str(qwen3_trained_on(row, tmp_path / "qwen3")), {}))
    store = CompletionStore.open(str(tmp_path / "completions.db"))
    try:
        with running_server(create_app(engine, completions=store)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
            whole = ask(client, tools=[WEATHER], store=True, metadata={"test": "calls"})
            chunks = list(ask(client, tools=[WEATHER], stream=True))
    finally:
        engine.close()
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert (message.reasoning_content, message.content) == (REASONING, None)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]

    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    kinds = [
        kind
        for delta in deltas
        for kind in ("reasoning_content", "content", "tool_calls")
        if getattr(delta, kind, None)
    ]
    assert kinds == sorted(kinds, key=["reasoning_content", "tool_calls"].index)  # the reasoning, then the call
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == REASONING
    [streamed] = [call for d in deltas for call in d.tool_calls or []]
    assert (streamed.function.name, json.loads(streamed.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    made = from_completions(str(tmp_path / "completions.db"), tmp_path / "rows.jsonl", metadata={"test": "calls"})
    [written] = [json.loads(line) for line in made.out.read_text().splitlines()]
    reply = written["messages"][-1]
    assert written["tools"] == [WEATHER]
    assert reply["reasoning_content"] == REASONING and reply["content"] is None
    assert reply["tool_calls"] == [{**CALL, "id": message.tool_calls[0].id}]
