"""`n` choices per request and OpenAI's presence and frequency penalties, served by a real uvicorn server
and checked against single requests and `tuneforge.generate` on the same prompt."""

import asyncio
import collections
import json

import httpx
import openai
import pytest
import torch
from test_serve import BASE, KEY, PROMPTS, QUESTION, TRIAGE_FORMAT, alone, running_server

from tuneforge.generate import Batch, Sampling, encode_prompts
from tuneforge.serve import AdapterPool, Engine, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_BATCH = 8


@pytest.fixture(scope="module")
def server(base_dir):
    engine = Engine(AdapterPool(str(base_dir)), max_batch=MAX_BATCH)
    with running_server(create_app(engine, api_keys=[KEY])) as url:
        yield url, engine
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_n_seeded_choices_are_reproducible_and_those_of_the_derived_seeds(server, client):
    sampled = {"model": BASE, "messages": QUESTION, "max_tokens": 10, "temperature": 1.0}
    reply = client.chat.completions.create(**sampled, n=3, seed=41)
    again = client.chat.completions.create(**sampled, n=3, seed=41)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in reply.choices]
    assert texts == [choice.message.content for choice in again.choices]
    assert len(set(texts)) == 3  # each choice samples its own stream
    # Choice i samples as a single request with seed + i.
    singles = [client.chat.completions.create(**sampled, seed=41 + i) for i in range(3)]
    assert texts == [single.choices[0].message.content for single in singles]
    assert [c.finish_reason for c in reply.choices] == [s.choices[0].finish_reason for s in singles]
    assert reply.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert reply.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
    assert health(server)["largest_batch"] >= 3 and health(server)["running"] == 0


def test_n_usage_counts_the_prompt_once_and_every_choice(client, base):
    reply = client.completions.create(model=BASE, prompt="The quick brown fox", max_tokens=6, n=4, seed=3)
    expected = alone(*base, "The quick brown fox", 6)
    assert [choice.index for choice in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == 4 * 6
    assert reply.usage.total_tokens == expected.prompt_tokens + 24


def test_n_greedy_choices_are_all_the_greedy_answer(client, base):
    reply = client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=8, temperature=0, n=2)
    assert [c.message.content for c in reply.choices] == [alone(*base, QUESTION, 8).text] * 2


def test_n_choices_under_a_json_schema_each_follow_it(client):
    request = {"model": BASE, "messages": [{"role": "user", "content": PROMPTS[3]}], "max_tokens": 60}
    request |= {"temperature": 1.0, "response_format": TRIAGE_FORMAT}
    reply = client.chat.completions.create(**request, n=3, seed=3)
    singles = [client.chat.completions.create(**request, seed=3 + i).choices[0] for i in range(3)]
    assert [c.message.content for c in reply.choices] == [s.message.content for s in singles]
    for choice in reply.choices:
        if choice.finish_reason == "stop":
            assert set(json.loads(choice.message.content)) == {"category", "count"}
        else:
            assert choice.message.content.startswith("{")


@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_streamed_n_choices_join_to_the_whole_ones(server, route):
    chat = route == "chat/completions"
    body = {"model": BASE, "max_tokens": 9, "temperature": 1.0, "seed": 7, "n": 2}
    body |= {"messages": QUESTION} if chat else {"prompt": "Hello, how are you"}
    headers = {"Authorization": f"Bearer {KEY}"}
    whole = httpx.post(f"{server[0]}/v1/{route}", json=body, headers=headers, timeout=60).json()
    streamed = httpx.post(
        f"{server[0]}/v1/{route}",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        headers=headers,
        timeout=60,
    )
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    texts, finish = collections.defaultdict(str), {}
    for chunk in chunks[:-1]:
        [choice] = chunk["choices"]
        texts[choice["index"]] += (choice["delta"].get("content") or "") if chat else choice["text"]
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    assert [texts[i] for i in (0, 1)] == [c["message"]["content"] if chat else c["text"] for c in whole["choices"]]
    assert [finish[i] for i in (0, 1)] == [c["finish_reason"] for c in whole["choices"]]
    # The streamed request's prompt was just answered, so the prefix cache may hold it where the whole one's
    # depended on the tests before: the counts agree, the cached share of the prompt is at least as large.
    usage, whole_usage = chunks[-1]["usage"], whole["usage"]
    cached = usage.pop("prompt_tokens_details")["cached_tokens"]
    assert cached >= whole_usage.pop("prompt_tokens_details")["cached_tokens"]
    assert chunks[-1]["choices"] == [] and usage == whole_usage


def test_more_choices_than_the_batch_is_a_400_naming_n(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=4, n=MAX_BATCH + 1)
    assert caught.value.param == "n"
    assert f"n={MAX_BATCH + 1}" in caught.value.message and str(MAX_BATCH) in caught.value.message


def test_frequency_penalty_stops_a_greedy_reply_repeating_its_tokens(client, base):
    prompt = [{"role": "user", "content": "Hi"}]
    plain = alone(*base, prompt, 24)
    assert max(collections.Counter(plain.token_ids).values()) > 1  # the penalty-free reply repeats a token
    ask = {"model": BASE, "messages": prompt, "max_tokens": 24, "temperature": 0}
    assert client.chat.completions.create(**ask).choices[0].message.content == plain.text
    penalized = client.chat.completions.create(**ask, frequency_penalty=2.0).choices[0].message.content
    assert penalized != plain.text
    [ids] = encode_prompts(base[1], [prompt])
    batch = Batch(*base)
    row = batch.add(ids, Sampling(24, frequency_penalty=2.0))
    while batch:
        batch.step()
    assert row.text == penalized and max(collections.Counter(row.tokens).values()) == 1


def test_penalties_lower_the_logits_as_openai_documents_them(base):
    """logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty, over the reply's tokens."""
    model, tokenizer = base
    batch = Batch(model, tokenizer)
    [ids] = encode_prompts(tokenizer, [QUESTION])
    plain = batch.add(ids, Sampling(4))
    penalized = batch.add(ids, Sampling(4, presence_penalty=0.5, frequency_penalty=1.5))
    logits = torch.zeros(2, model.config.vocab_size)
    plain.tokens = penalized.tokens = [5, 5, 9]
    batch._pick(logits, [plain, penalized])
    assert logits[0].abs().sum() == 0
    assert logits[1, 5] == -(2 * 1.5 + 0.5) and logits[1, 9] == -(1.5 + 0.5) and logits[1, 7] == 0


def health(server) -> dict:
    return httpx.get(f"{server[0]}/health").json()


def test_a_reply_counts_each_prompt_once_as_its_generation_groups_the_choices():
    """Usage reads the choices per prompt from the generation, so no route has to restate them on its reply."""
    from tuneforge.generate import Completion
    from tuneforge.serve.app import _Reply
    from tuneforge.serve.engine import Generation, Generations

    loop = asyncio.new_event_loop()
    try:

        def answered(prompt_tokens: int, n: int, cached: int = 0) -> Generation:
            generation = Generation(BASE, [1] * prompt_tokens, Sampling(), loop, n=n)
            generation.completions = [
                Completion("ok", prompt_tokens, 2, "stop", cached_tokens=cached) for _ in range(n)
            ]
            return generation

        def usage(prompt: int, completion: int, cached: int) -> dict:
            return {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
            }

        chat = _Reply.start(True, BASE).whole(answered(7, 3, cached=4))
        assert chat["usage"] == usage(7, 6, 4)
        prompts = Generations([answered(5, 2), answered(9, 2, cached=8)])
        completions = _Reply.start(False, BASE).usage_chunk(prompts)
        assert completions["usage"] == usage(14, 8, 8)
    finally:
        loop.close()


def test_echoed_choices_of_a_list_of_prompts_start_with_their_own_prompt(client):
    reply = client.completions.create(model=BASE, prompt=["The fox", "A cat"], max_tokens=1, n=2, echo=True, seed=1)
    assert [choice.text[: len("The fox")] for choice in reply.choices[:2]] == ["The fox"] * 2
    assert [choice.text[: len("A cat")] for choice in reply.choices[2:]] == ["A cat"] * 2
