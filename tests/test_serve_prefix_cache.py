"""Prefix caching in `serve`: a prompt that starts as one seen before (a long system prompt, a conversation's
earlier turns) starts from that prefix's keys and values, and answers token for token as without the cache."""

import httpx
import openai
import pytest
import torch
from families import FAMILIES, save_family_model, save_gemma3_vision_model
from test_serve import BASE, KEY, random_adapter, running_server

from tuneforge.generate import Batch, Sampling, encode_prompts
from tuneforge.kv_cache import PrefixCache
from tuneforge.models import load_model, load_tokenizer
from tuneforge.serve import AdapterPool, Engine, create_app

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = {"role": "system", "content": "You are the support desk of a web console. Answer briefly and kindly. " * 4}
QUESTIONS = ["Hi", "What is two plus two?", "How do I reset my password for the web console?"]


def chat(question: str, system: dict = SYSTEM) -> list[dict]:
    return [system, {"role": "user", "content": question}]


def decode(model, tokenizer, requests, cache=None, scope="base") -> list:
    """Each (prompt ids, sampling) added to one batch before its first step: the rows' completions."""
    batch = Batch(model, tokenizer, cache, scope)
    rows = [batch.add(ids, sampling) for ids, sampling in requests]
    while batch:
        batch.step()
    return [row.completion() for row in rows]


def test_greedy_answers_are_token_for_token_those_without_the_cache(base):
    """Rows of several lengths left-padded in one prefill, n rows of one prompt, log probabilities and a
    conversation's next turn, in fp32: the cache changes what runs, not what comes out."""
    model, tokenizer = base
    ids = encode_prompts(tokenizer, [chat(q) for q in QUESTIONS])
    cache = PrefixCache(64 << 20)
    first = decode(model, tokenizer, [(ids[0], Sampling(8))], cache)
    assert first[0].cached_tokens == 0 and (cache.hits, cache.misses) == (0, 1)

    greedy, scored = Sampling(12), Sampling(12, logprobs=3)
    requests = [(ids[1], greedy), (ids[2], greedy), (ids[2], greedy), (ids[1], scored)]
    on, off = decode(model, tokenizer, requests, cache), decode(model, tokenizer, requests)
    assert [c.token_ids for c in on] == [c.token_ids for c in off]
    system_tokens = next(t for t in range(len(ids[0])) if ids[0][t] != ids[1][t])
    assert [c.cached_tokens for c in on] == [system_tokens] * 4 and cache.hits == 2  # two distinct prompts
    for cached, plain in zip(on[3].logprobs, off[3].logprobs):
        assert cached.token == plain.token and cached.logprob == pytest.approx(plain.logprob, abs=1e-4)

    # The next turn resends the first: all of its prompt comes from the cache.
    turn = encode_prompts(tokenizer, [[*chat(QUESTIONS[2]), {"role": "assistant", "content": on[1].text}]])[0]
    turn += encode_prompts(tokenizer, [[{"role": "user", "content": "And then?"}]])[0]
    [again], [alone] = decode(model, tokenizer, [(turn, greedy)], cache), decode(model, tokenizer, [(turn, greedy)])
    assert again.token_ids == alone.token_ids and again.cached_tokens == len(ids[2])


def test_the_next_turn_starts_from_the_keys_and_values_of_the_previous_reply(base):
    """A chat client sends the assistant's reply back with its next turn: that turn runs only what it adds, for
    rows prefilled together (a shared system prompt, left padding between it and their own tokens) and for a row
    cancelled mid-reply, and answers token for token as without the cache (fp32)."""
    model, tokenizer = base
    ids = encode_prompts(tokenizer, [chat(q) for q in QUESTIONS])
    cache = PrefixCache(64 << 20)
    batch = Batch(model, tokenizer, cache, "base")
    rows = [batch.add(prompt, Sampling(120)) for prompt in ids]
    for _ in range(30):
        batch.step()
    rows[0].cancelled = True
    while batch:
        batch.step()
    replies = [row.completion().token_ids for row in rows]
    assert len(replies[0]) == 30 and [len(reply) for reply in replies[1:]] == [120, 120]
    end = tokenizer.encode("<|im_end|>\n", add_special_tokens=False)
    follow_up = encode_prompts(tokenizer, [[{"role": "user", "content": "And then?"}]])[0]
    turns = [prompt + list(reply) + end + follow_up for prompt, reply in zip(ids, replies)]
    for turn, prompt, reply in zip(turns, ids, replies):
        [on], [off] = (
            decode(model, tokenizer, [(turn, Sampling(12))], cache),
            decode(model, tokenizer, [(turn, Sampling(12))]),
        )
        assert on.token_ids == off.token_ids
        assert on.cached_tokens == len(prompt) + len(reply) - 1  # the reply's last token was picked, never run
    assert cache.size_bytes <= cache.max_bytes


def test_a_row_joining_a_running_batch_starts_from_the_cache_and_answers_as_alone(base):
    model, tokenizer = base
    ids = encode_prompts(tokenizer, [chat(q) for q in QUESTIONS])
    cache = PrefixCache(64 << 20)
    batch = Batch(model, tokenizer, cache, "base")
    running = batch.add(ids[0], Sampling(10))
    batch.step()
    batch.step()
    joining = batch.add(ids[2], Sampling(10))
    while batch:
        batch.step()
    assert joining.completion().cached_tokens > 16
    assert [running.completion().token_ids, joining.completion().token_ids] == [
        c.token_ids for c in decode(model, tokenizer, [(ids[0], Sampling(10)), (ids[2], Sampling(10))])
    ]


def test_conversations_prefilled_together_each_start_from_their_own_earlier_turns(base):
    """Two clients' next turns arrive together (one prefill), their system prompts unlike: each starts from the
    keys and values of its own conversation so far, beside a prompt the cache has nothing of, and every row
    answers as alone."""
    model, tokenizer = base
    systems = ["You answer questions about cooking pasta and sauces in detail. ", "Reply as a terse Unix expert. "]
    first = encode_prompts(
        tokenizer, [[{"role": "system", "content": s * 3}, {"role": "user", "content": "Hi"}] for s in systems]
    )
    cache = PrefixCache(64 << 20)
    for prompt in first:
        decode(model, tokenizer, [(prompt, Sampling(2))], cache)
    follow_up = encode_prompts(tokenizer, [[{"role": "user", "content": "And then?"}]])[0]
    unseen = encode_prompts(tokenizer, [[{"role": "user", "content": "Something else entirely"}]])[0]
    requests = [(first[0] + follow_up, Sampling(8)), (unseen, Sampling(8)), (first[1] + follow_up, Sampling(8))]
    on, off = decode(model, tokenizer, requests, cache), decode(model, tokenizer, requests)
    assert [c.cached_tokens for c in on] == [len(first[0]), 0, len(first[1])]
    assert [c.token_ids for c in on] == [c.token_ids for c in off]
    assert (cache.hits, cache.misses) == (2, 3)


def test_a_prompt_scored_whole_runs_without_the_cache(base):
    """echo: every prompt token's log probability comes from one forward pass over the whole prompt."""
    model, tokenizer = base
    [prompt] = encode_prompts(tokenizer, [chat(QUESTIONS[1])])
    cache = PrefixCache(64 << 20)
    decode(model, tokenizer, [(prompt, Sampling(4))], cache)
    echo = Sampling(4, logprobs=2, prompt_logprobs=True)
    [on], [off] = decode(model, tokenizer, [(prompt, echo)], cache), decode(model, tokenizer, [(prompt, echo)])
    assert on.cached_tokens == 0 and on.token_ids == off.token_ids
    assert [e.logprob for e in on.prompt_logprobs[1:]] == [e.logprob for e in off.prompt_logprobs[1:]]


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def sliding(request, tmp_path_factory):
    """A tiny Gemma 2 or 3 whose sliding-window layer attends to the last 4 positions (prompts and replies run far
    past it) beside a full-attention one, its output layer tied to its embeddings as Gemma's is."""
    folder = save_family_model(
        FAMILIES[request.param],
        tmp_path_factory.mktemp(request.param),
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    return load_model(str(folder)).eval(), load_tokenizer(str(folder))


def transformers_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """What transformers' own `generate` answers alone, with its default cache (the window's columns only)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def sliding_prompts(tokenizer) -> list[list[int]]:
    # Gemma's templates take no system role: the shared instructions open the user's turn.
    return encode_prompts(tokenizer, [[{"role": "user", "content": SYSTEM["content"] + q}] for q in QUESTIONS])


def test_a_sliding_window_model_lets_rows_join_and_answers_as_transformers(sliding):
    """Rows of several lengths left-padded in one prefill (one a start of another, so they share all but its last
    token), two rows of one prompt, and rows joining mid-decode all answer token for token as transformers'
    `generate` does alone (fp32)."""
    model, tokenizer = sliding
    ids = sliding_prompts(tokenizer)
    expected = [transformers_greedy(model, prompt, 12) for prompt in ids]
    start = ids[2][:-30]
    together = decode(model, tokenizer, [(start, Sampling(12)), (ids[2], Sampling(12)), (ids[2], Sampling(12))])
    assert [list(c.token_ids) for c in together] == [transformers_greedy(model, start, 12), expected[2], expected[2]]

    batch = Batch(model, tokenizer)
    running = batch.add(ids[2], Sampling(20))
    for _ in range(3):
        batch.step()
    assert batch.can_join
    joining = [batch.add(ids[0], Sampling(12))]
    batch.step()
    assert len(batch._rows) == 2  # it joined the running row rather than waiting for it to finish
    joining.append(batch.add(ids[1], Sampling(12)))
    while batch:
        batch.step()
    assert list(running.completion().token_ids) == transformers_greedy(model, ids[2], 20)
    assert [list(row.completion().token_ids) for row in joining] == expected[:2]


def test_a_sliding_window_model_starts_from_the_prefix_cache_and_answers_as_transformers(sliding):
    """A second request sharing the first's long start, two rows of one prompt and a row joining mid-decode start
    from the cache; a conversation's next turn starts past the reply it sends back; every answer is transformers'
    own, and log probabilities are those without the cache (fp32)."""
    model, tokenizer = sliding
    ids = sliding_prompts(tokenizer)
    cache = PrefixCache(64 << 20)
    decode(model, tokenizer, [(ids[0], Sampling(2))], cache)
    scored = Sampling(12, logprobs=3)
    # The first request again (all but its last token cached) beside others that run more of theirs.
    requests = [(ids[0], scored), (ids[1], scored), (ids[2], scored), (ids[2], scored)]
    on, off = decode(model, tokenizer, requests, cache), decode(model, tokenizer, requests)
    expected = [transformers_greedy(model, prompt, 12) for prompt in ids]
    assert [list(c.token_ids) for c in on] == [*expected, expected[2]]
    shared = next(t for t in range(len(ids[0])) if ids[0][t] != ids[1][t])
    assert on[0].cached_tokens == len(ids[0]) - 1 and all(c.cached_tokens >= shared > 100 for c in on)
    for cached, plain in zip(on, off):
        assert [e.token for e in cached.logprobs] == [e.token for e in plain.logprobs]
        assert [e.logprob for e in cached.logprobs] == pytest.approx([e.logprob for e in plain.logprobs], abs=1e-4)

    batch = Batch(model, tokenizer, cache, "base")
    running = batch.add(ids[0], Sampling(10))
    batch.step()
    joining = batch.add(ids[2], Sampling(10))
    while batch:
        batch.step()
    assert joining.completion().cached_tokens > shared
    assert [list(running.completion().token_ids), list(joining.completion().token_ids)] == [
        expected[0][:10],
        expected[2][:10],
    ]

    end = tokenizer.encode("<end_of_turn>\n<start_of_turn>user\nAnd then?", add_special_tokens=False)
    turn = ids[1] + list(on[1].token_ids) + end + tokenizer.encode("<end_of_turn>\n", add_special_tokens=False)
    [again] = decode(model, tokenizer, [(turn, Sampling(12))], cache)
    assert again.cached_tokens == len(ids[1]) + len(on[1].token_ids) - 1
    assert list(again.token_ids) == transformers_greedy(model, turn, 12)


def test_a_sliding_window_model_prefills_together_prompts_that_leave_no_padding_inside(sliding):
    """With the prefix cache on, prompts that all miss it prefill in one step (each left-padded whole), as do prompts
    whose rests past the same cached start are as long; a prompt whose rest is longer waits a step, since padding
    would sit between another's prefix and rest. Answers are transformers' own (fp32)."""
    model, tokenizer = sliding
    ids = sliding_prompts(tokenizer)
    cache = PrefixCache(64 << 20)
    batch = Batch(model, tokenizer, cache, "base")
    missing = [batch.add(prompt, Sampling(8)) for prompt in ids]
    batch.step()
    assert len(batch._rows) == 3 and not batch._waiting and cache.misses == 3
    while batch:
        batch.step()
    assert [list(row.completion().token_ids) for row in missing] == [transformers_greedy(model, p, 8) for p in ids]

    start = ids[2][:-30]
    decode(model, tokenizer, [(start, Sampling(1))], cache)
    turns = [start + ids[0][-2:], start + ids[1][-2:], start + ids[2][-3:]]
    batch = Batch(model, tokenizer, cache, "base")
    rows = [batch.add(prompt, Sampling(8)) for prompt in turns]
    batch.step()
    assert len(batch._rows) == 2 and batch._waiting == rows[2:]
    while batch:
        batch.step()
    assert all(row.completion().cached_tokens == len(start) for row in rows)
    assert [list(row.completion().token_ids) for row in rows] == [transformers_greedy(model, p, 8) for p in turns]


def test_the_cache_keeps_to_its_memory_dropping_the_least_recently_used(base):
    model, tokenizer = base
    ids = encode_prompts(tokenizer, [chat(q) for q in QUESTIONS])
    one = PrefixCache(1 << 30)
    decode(model, tokenizer, [(ids[0], Sampling(1))], one)
    cache = PrefixCache(one.size_bytes * 3 // 2)  # room for one prompt's keys and values, not two
    decode(model, tokenizer, [(ids[0], Sampling(1))], cache)
    decode(model, tokenizer, [(ids[1][:-3] + [ids[1][-3] + 1, *ids[1][-2:]], Sampling(1))], cache)
    assert cache.size_bytes <= cache.max_bytes
    assert len(cache._entries) == 1
    assert PrefixCache(one.size_bytes - 1).find("base", ids[0]) == (0, None)


@pytest.fixture(scope="module")
def served(base_dir, tmp_path_factory):
    """A server with the prefix cache, one without, and two adapters with different weights."""
    root = tmp_path_factory.mktemp("prefix-adapters")
    adapters = {name: random_adapter(base_dir, root / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}
    cached = Engine(AdapterPool(str(base_dir), {"alpha": str(adapters["alpha"])}), max_batch=8)
    plain = Engine(AdapterPool(str(base_dir), {"alpha": str(adapters["alpha"])}), max_batch=8, prefix_cache_mb=0)
    with running_server(create_app(cached, api_keys=[KEY])) as url, running_server(create_app(plain)) as plain_url:
        yield url, plain_url, cached, adapters
    cached.close()
    plain.close()


def ask(url: str, model: str, question: str, system: dict = SYSTEM, **options):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    return client.chat.completions.create(
        model=model, messages=chat(question, system), max_tokens=8, temperature=0, **options
    )


def test_usage_reports_the_cached_tokens_and_metrics_count_hits_and_misses(served):
    url, plain_url, engine, _ = served
    # A system message no other test sends: the server's cache holds SYSTEM's keys once a test before asked with it.
    system = {"role": "system", "content": "The usage desk counts what each reply costs, briefly and kindly. " * 4}
    first, second = ask(url, BASE, QUESTIONS[0], system), ask(url, BASE, QUESTIONS[1], system, n=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 16 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    plain = ask(plain_url, BASE, QUESTIONS[1], system, n=2)
    assert [c.message.content for c in second.choices] == [c.message.content for c in plain.choices]
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    response = client.responses.create(model=BASE, instructions=system["content"], input="Hi", max_output_tokens=4)
    assert response.usage.input_tokens_details.cached_tokens > 16
    text = client.completions.create(model=BASE, prompt=system["content"] + " Hello", max_tokens=4)
    assert text.usage.prompt_tokens_details.cached_tokens == 0  # no chat template: another start
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    stats = engine.stats()
    assert stats["prefix_cache_hits"] >= 2 and stats["prefix_cache_misses"] >= 2
    assert f'tuneforge_prefix_cache_hits_total{{base="{BASE}"}} {float(stats["prefix_cache_hits"])}' in metrics
    assert f'tuneforge_prefix_cache_misses_total{{base="{BASE}"}} {float(stats["prefix_cache_misses"])}' in metrics


def test_an_adapter_never_starts_from_keys_another_model_computed(served):
    """Not from the base's, and not from those of the weights an adapter's name had before it was unloaded."""
    url, plain_url, engine, adapters = served
    ask(url, BASE, QUESTIONS[2])
    assert ask(url, "alpha", QUESTIONS[2]).usage.prompt_tokens_details.cached_tokens == 0
    assert ask(url, "alpha", QUESTIONS[1]).usage.prompt_tokens_details.cached_tokens > 16
    engine.unload("alpha").result(timeout=60)
    engine.pool.add_adapter("alpha", str(adapters["beta"]))  # the name again, other weights
    reloaded = ask(url, "alpha", QUESTIONS[1])
    assert reloaded.usage.prompt_tokens_details.cached_tokens == 0
    beta = Engine(AdapterPool(str(engine.pool.base_path), {"alpha": str(adapters["beta"])}), prefix_cache_mb=0)
    try:
        with running_server(create_app(beta)) as beta_url:
            expected = ask(beta_url, "alpha", QUESTIONS[1]).choices[0].message.content
    finally:
        beta.close()
    assert reloaded.choices[0].message.content == expected


def test_a_prompt_with_images_starts_only_from_keys_computed_with_the_same_images(tmp_path):
    """A conversation's next turn about the same image starts past it; the same words about another image
    run whole. (Gemma 3's sliding window layers are made full attention here, so the cache serves it.)"""
    from test_vision import GREEN, RED, png

    folder = save_gemma3_vision_model(tmp_path / "vision", layer_types=["full_attention"] * 2)
    model, tokenizer = load_model(str(folder)).eval(), load_tokenizer(str(folder))
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this? " * 4}]}]
    cache = PrefixCache(64 << 20)

    def answer(prompt, images, with_cache=True):
        batch = Batch(model, tokenizer, cache if with_cache else None, "base")
        row = batch.add(encode_prompts(tokenizer, [prompt])[0], Sampling(8), images=images)
        while batch:
            batch.step()
        return row.completion()

    first = answer(question, [png(RED)])
    turn = [*question, {"role": "assistant", "content": first.text}, {"role": "user", "content": "Are you sure?"}]
    again = answer(turn, [png(RED)])
    assert again.cached_tokens == first.prompt_tokens and again.token_ids == answer(turn, [png(RED)], False).token_ids
    other = answer(turn, [png(GREEN)])
    assert other.cached_tokens == 0 and other.token_ids == answer(turn, [png(GREEN)], False).token_ids
    assert other.token_ids != again.token_ids


def test_image_files_that_join_to_the_same_bytes_are_other_images_to_the_cache(tmp_path):
    """[red + green, blue] and [red, green + blue] join to the same bytes (a PNG is read to its end chunk, the bytes
    after it left alone, so they show red and blue, then red and green): the second starts from no keys of the
    first's."""
    from test_vision import BLUE, GREEN, RED, png

    folder = save_gemma3_vision_model(tmp_path / "vision", layer_types=["full_attention"] * 2)
    model, tokenizer = load_model(str(folder)).eval(), load_tokenizer(str(folder))
    image = {"type": "image"}
    question = [{"role": "user", "content": [image, image, {"type": "text", "text": "Which colours are these? " * 4}]}]
    ids = encode_prompts(tokenizer, [question])[0]
    cache = PrefixCache(64 << 20)

    def answer(images, with_cache=True):
        batch = Batch(model, tokenizer, cache if with_cache else None, "base")
        row = batch.add(ids, Sampling(8), images=images)
        while batch:
            batch.step()
        return row.completion()

    answer([png(RED) + png(GREEN), png(BLUE)])
    other = [png(RED), png(GREEN) + png(BLUE)]
    second = answer(other)
    assert second.cached_tokens == 0 and second.token_ids == answer(other, False).token_ids


def test_storing_tokens_an_entry_holds_copies_no_keys_and_values():
    """A prompt (or reply) the cache holds already is not copied out of the batch's cache for nothing."""
    cache = PrefixCache(1 << 20)
    layer = (torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))
    cache.store("base", [5, 6, 7, 8], lambda: [layer])
    held = cache.size_bytes

    def copied():
        raise AssertionError("the keys and values were copied")

    cache.store("base", [5, 6, 7], copied)  # a start of the entry's tokens
    cache.store("base", [5, 6, 7, 8], copied)
    assert cache.size_bytes == held and cache.find("base", [5, 6, 7, 8, 9])[0] == 4


def test_a_reply_too_big_to_keep_leaves_the_entry_of_its_prompt():
    """A prompt and reply past the cache's memory are not kept, and the prompt's own entry stays for its next turn."""
    layer = (torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))
    cache = PrefixCache(layer[0].nbytes + layer[1].nbytes)
    cache.store("base", [5, 6, 7, 8], lambda: [layer])
    longer = (torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8))
    cache.store("base", [5, 6, 7, 8, 9, 10], lambda: [longer])
    assert cache.find("base", [5, 6, 7, 8, 9, 10, 11])[0] == 4


def test_a_sliding_window_model_looks_each_prompt_up_once_per_prefill(sliding, monkeypatch):
    """Grouping the rows that prefill together and starting them from the cache read one lookup per prompt: the
    cache's entries are compared with each distinct prompt once, however many rows ask for it."""
    import tuneforge.kv_cache as kv_cache

    model, tokenizer = sliding
    ids = sliding_prompts(tokenizer)
    start = ids[2][:-30]
    cache = PrefixCache(64 << 20)
    decode(model, tokenizer, [(start, Sampling(1))], cache)
    turns = [start + [token, *ids[2][-2:]] for token in ids[2][-30:-28]]  # two prompts, each 3 tokens past it
    assert turns[0] != turns[1]
    looked_up = []
    compare = kv_cache._shared_length

    def counting(held, tokens):
        if len(tokens) == len(start) + 2:  # a lookup compares a prompt less its last token
            looked_up.append(tuple(tokens))
        return compare(held, tokens)

    monkeypatch.setattr(kv_cache, "_shared_length", counting)
    batch = Batch(model, tokenizer, cache, "base")
    rows = [batch.add(prompt, Sampling(4)) for prompt in [turns[0], *turns]]
    batch.step()
    assert len(batch._rows) == 3
    assert sorted(looked_up) == sorted(tuple(turn[:-1]) for turn in turns)
    assert (cache.hits, cache.misses) == (2, 1) and all(row.cached_tokens == len(start) for row in rows)
