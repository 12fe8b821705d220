"""OpenAI's Responses API (`POST /v1/responses`) on a real server, driven by the official `openai` client:
answers checked against the chat route's for the same messages."""

import json
import time

import httpx
import openai
import pytest
import torch
from test_serve import KEY, QUESTION, running_server

from tuneforge.serve import AdapterPool, Engine, create_app

BASE = "base"
SYSTEM = "Answer briefly."
MESSAGES = [{"role": "system", "content": SYSTEM}, *QUESTION]
TRIAGE_SCHEMA = {
    "type": "object",
    "properties": {"category": {"enum": ["outage", "billing"]}, "count": {"type": "integer"}},
    "required": ["category", "count"],
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(base_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from tuneforge.models import load_model

    folder = tmp_path_factory.mktemp("adapter") / "alpha"
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(load_model(str(base_dir)), config).save_pretrained(folder)
    engine = Engine(AdapterPool(str(base_dir), {"alpha": str(folder)}), max_batch=4)
    with running_server(create_app(engine, api_keys=[KEY])) as url:
        yield url
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def chat_answer(client, model: str, max_tokens: int, **options):
    return client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, **options
    ).choices[0]


def test_a_response_is_the_chat_routes_greedy_answer_and_cut_short_is_incomplete(client):
    chat = chat_answer(client, BASE, 12)
    response = client.responses.create(
        model=BASE, instructions=SYSTEM, input=QUESTION[0]["content"], max_output_tokens=12, temperature=0
    )
    assert response.object == "response" and response.id.startswith("resp_") and response.model == BASE
    assert response.output_text == chat.message.content and chat.finish_reason == "length"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert response.usage.output_tokens == 12
    assert response.usage.total_tokens == response.usage.input_tokens + 12
    # The same as a list of items, content as input_text parts, and through an adapter picked by model.
    items = [
        {"role": "developer", "content": [{"type": "input_text", "text": SYSTEM}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION[0]["content"]}]},
    ]
    again = client.responses.create(model=BASE, input=items, max_output_tokens=12, temperature=0)
    assert again.output_text == response.output_text
    adapted = client.responses.create(model="alpha", input=items, max_output_tokens=12, temperature=0)
    assert adapted.output_text == chat_answer(client, "alpha", 12).message.content != response.output_text


def test_an_earlier_responses_output_sent_back_in_input_is_its_assistant_turn(client):
    """`input` holding an earlier response's `output` as the SDK gives it back (its objects, `model_dump()` with the
    message's null `phase`, or `to_dict()`) is answered as the chat route answers that reply as an assistant turn."""
    first = client.responses.create(model=BASE, input=QUESTION[0]["content"], max_output_tokens=4, temperature=0)
    follow = {"role": "user", "content": "And three plus three?"}
    turn = {"role": "assistant", "content": first.output_text}
    chat = client.chat.completions.create(
        model=BASE, messages=[*QUESTION, turn, follow], max_tokens=4, temperature=0
    ).choices[0]
    for output in (
        first.output,
        [item.model_dump() for item in first.output],
        [item.to_dict() for item in first.output],
    ):
        again = client.responses.create(
            model=BASE, input=[*QUESTION, *output, follow], max_output_tokens=4, temperature=0
        )
        assert again.output_text == chat.message.content


def test_streamed_deltas_join_to_the_answer(client, server):
    chat = chat_answer(client, BASE, 12)
    events = list(
        client.responses.create(
            model=BASE, instructions=SYSTEM, input=QUESTION, max_output_tokens=12, temperature=0, stream=True
        )
    )
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == chat.message.content == events[-1].response.output_text
    # The SDK's stream helper reads the events into the same response; the request is counted under its route.
    with client.responses.stream(model=BASE, input="Hi", max_output_tokens=40, text={"format": json_format()}) as s:
        streamed = "".join(event.delta for event in s if event.type == "response.output_text.delta")
        final = s.get_final_response()
    assert final.status == "completed" and final.output_text == streamed
    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'route="/v1/responses"' in metrics


def test_logprobs_are_the_chat_routes_whole_and_streamed(client):
    # Asked once before, the prompt is in the server's prefix cache whatever earlier tests asked it: every request
    # below starts from the same cached keys (logprobs from a cached start differ from a whole prefill's in the
    # last bits of a float).
    chat_answer(client, BASE, 8)
    chat = chat_answer(client, BASE, 8, logprobs=True, top_logprobs=3).logprobs.content
    options = {"model": BASE, "instructions": SYSTEM, "input": QUESTION, "max_output_tokens": 8, "temperature": 0}
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 3}
    response = client.responses.create(**options, **asked)
    entries = response.output[0].content[0].logprobs
    assert response.top_logprobs == 3 and len(entries) == len(chat) == 8
    for ours, theirs in zip(entries, chat):
        assert (ours.token, ours.bytes, ours.logprob) == (theirs.token, theirs.bytes, theirs.logprob)
        assert [(top.token, top.bytes, top.logprob) for top in ours.top_logprobs] == [
            (top.token, top.bytes, top.logprob) for top in theirs.top_logprobs
        ]
    # Streamed: each text delta carries its tokens', the done events the answer's, as the whole response has them.
    events = list(client.responses.create(**options, **asked, stream=True))
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert [entry.token for event in deltas for entry in event.logprobs] == [entry.token for entry in entries]
    assert all(len(event.logprobs) >= 1 for event in deltas)
    [done] = [event for event in events if event.type == "response.output_text.done"]
    whole = [entry.to_dict() for entry in entries]
    assert [entry.to_dict() for entry in done.logprobs] == whole
    assert [entry.to_dict() for entry in events[-1].response.output[0].content[0].logprobs] == whole
    # Not asked: empty, as OpenAI gives them.
    plain = client.responses.create(**options)
    assert plain.output[0].content[0].logprobs == [] and plain.output_text == response.output_text


def json_format() -> dict:
    return {"type": "json_schema", "name": "triage", "schema": TRIAGE_SCHEMA, "strict": True}


def test_text_format_constrains_the_answer_to_the_schema(client):
    # Sampled with a seed: the random model's greedy reply writes the integer's digits until the limit.
    options = {"max_tokens": 60, "temperature": 1.0, "seed": 3}
    chat = client.chat.completions.create(
        model=BASE,
        messages=QUESTION,
        **options,
        response_format={"type": "json_schema", "json_schema": {"name": "triage", "schema": TRIAGE_SCHEMA}},
    ).choices[0]
    response = client.responses.create(
        model=BASE,
        input=QUESTION,
        max_output_tokens=60,
        temperature=1.0,
        text={"format": json_format()},
        extra_body={"seed": 3},
    )
    assert response.status == "completed" and chat.finish_reason == "stop"
    assert response.output_text == chat.message.content and set(json.loads(response.output_text)) == {
        "category",
        "count",
    }


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"store": True}, "store"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "{}"}]}, "input.0"),
        # An earlier response's reasoning item: before its assistant message, its reasoning as text, in its shape.
        ({"input": [{"type": "reasoning", "summary": [], "content": []}, *QUESTION]}, "input.0"),
        (
            {
                "input": [
                    {"type": "reasoning", "summary": [], "encrypted_content": "gAAA"},
                    {"role": "assistant", "content": "Hi"},
                ]
            },
            "input.0.encrypted_content",
        ),
        (
            {"input": [*QUESTION, {"type": "reasoning", "summary": "x"}, {"role": "assistant", "content": "Hi"}]},
            "input.1.summary",
        ),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objekt"}}}},
            "text.format.schema",
        ),
        ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format.name"),
        (
            {"text": {"format": {"type": "json_schema", "name": "a.b", "schema": {"type": "object"}}}},
            "text.format.name",
        ),
        ({"max_output_tokens": 10**6}, "max_output_tokens"),
        ({"instructions": "Be <|im_end|> brief."}, "instructions"),  # a structure token of the chat template
        ({"instructions": "Be brief.", "input": [{"role": "user", "content": "Hi <|im_end|>"}]}, "input.0.content"),
        ({"stop": ["."]}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without include's "message.output_text.logprobs"
        ({"include": ["reasoning.encrypted_content"]}, "include.0"),
        ({"top_logprobs": 21, "include": ["message.output_text.logprobs"]}, "top_logprobs"),
        # The served model is a text model; an image part outside a user message is refused whatever the model.
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content"),
        ({"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "input.0.content"),
    ],
)
def test_what_is_not_served_is_refused_naming_the_field(client, request_fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=BASE, extra_body={"input": "Hi", **request_fields})
    assert caught.value.body["param"] == param, caught.value.body
    assert caught.value.body["type"] == "invalid_request_error"


def test_chats_nested_json_schema_in_text_format_is_refused_saying_the_fields_sit_flat(client):
    nested = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=BASE, input="Hi", text={"format": nested})
    assert caught.value.body["param"] == "text.format"
    assert "flat in text.format" in caught.value.body["message"], caught.value.body


def test_each_field_responses_not_served_lists_is_refused_by_name_and_its_harmless_values_pass(monkeypatch):
    """RESPONSES_NOT_SERVED alone says what /v1/responses refuses by name: a field listed there is taken by the
    body, refused with its reason when set, and passed at the values that ask for nothing."""
    from tuneforge.serve.bodies import RESPONSES_NOT_SERVED, ResponsesBody
    from tuneforge.web import APIError

    monkeypatch.setitem(RESPONSES_NOT_SERVED, "modalities", ("this server answers in text", (["text"],)))
    for param, (why, harmless) in RESPONSES_NOT_SERVED.items():
        for value in (None, *harmless):
            ResponsesBody.model_validate({"model": BASE, "input": "Hi", param: value}).check_supported()
        body = ResponsesBody.model_validate({"model": BASE, "input": "Hi", param: {"asks": "something"}})
        with pytest.raises(APIError) as caught:
            body.check_supported()
        assert caught.value.param == param and caught.value.message == f"{param} is not supported: {why}."


def test_a_streamed_response_whose_client_hangs_up_stops_decoding(server):
    body = {"model": BASE, "input": "Hi", "max_output_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY}"}) as sent:
        lines = sent.iter_lines()
        assert next(lines) == "event: response.created"
    gone = time.monotonic()
    while httpx.get(f"{server}/health").json()["running"]:
        assert time.monotonic() - gone < 3, "the abandoned generation is still decoding"
        time.sleep(0.02)


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_chats_length_limit_sent_to_responses_is_refused_naming_max_output_tokens(param):
    """A client moved from the chat route sends its limit by chat's name: the refusal says the one this route reads."""
    from tuneforge.serve.bodies import ResponsesBody
    from tuneforge.web import APIError

    body = ResponsesBody.model_validate({"model": BASE, "input": "Hi", param: 5})
    with pytest.raises(APIError) as caught:
        body.check_supported()
    assert caught.value.param == param and "max_output_tokens" in caught.value.message, caught.value.message
