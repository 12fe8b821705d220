"""Generation on tiny models: end of turn, max_new_tokens, stop strings, batching, streaming, sampling."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import train_to_say

from tuneforge.generate import encode_prompts, generate, stream
from tuneforge.models import load_model, load_tokenizer

REPLY = "Hello there, how are you?"
QUESTION = [{"role": "user", "content": "Hi!"}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parrot(tiny_model_dir):
    """The tiny model trained until it answers every chat with REPLY and then ends its turn."""
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    [prompt] = encode_prompts(tokenizer, [QUESTION])
    reply = tokenizer.encode(REPLY + "<|im_end|>", add_special_tokens=False)
    return train_to_say(model, prompt, reply, lr=3e-3, steps=60).eval(), tokenizer


def test_generation_stops_at_end_of_turn(parrot):
    model, tokenizer = parrot
    [done] = generate(model, tokenizer, [QUESTION], max_new_tokens=50)
    assert done.text == REPLY
    assert done.finish_reason == "stop"
    # The reply's tokens and the end-of-turn token that stopped it.
    assert done.completion_tokens == len(tokenizer(REPLY, add_special_tokens=False)["input_ids"]) + 1
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert done.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_max_new_tokens_cuts_the_answer(parrot):
    model, tokenizer = parrot
    [done] = generate(model, tokenizer, [QUESTION], max_new_tokens=3)
    assert done.finish_reason == "length" and done.completion_tokens == 3
    assert REPLY.startswith(done.text) and len(done.text) < len(REPLY)


def test_stop_strings_end_the_answer_before_them(parrot):
    model, tokenizer = parrot
    [done] = generate(model, tokenizer, [QUESTION], stop=[", how", "you"])
    assert done.text == "Hello there" and done.finish_reason == "stop"
    pieces = stream(model, tokenizer, QUESTION, stop=["how"])
    streamed = list(pieces)
    assert "".join(streamed) == pieces.completion.text == "Hello there, "
    assert pieces.completion.finish_reason == "stop"


def test_stream_pieces_join_to_the_batch_answer(base):
    model, tokenizer = base
    [done] = generate(model, tokenizer, [QUESTION], max_new_tokens=20)
    pieces = stream(model, tokenizer, QUESTION, max_new_tokens=20)
    assert len(streamed := list(pieces)) > 1
    assert "".join(streamed) == done.text
    assert pieces.completion == done


def test_batched_generation_equals_one_by_one(base):
    """Left padding with position ids counted from each row's first token: a prompt's greedy
    answer does not depend on the other prompts in its batch."""
    model, tokenizer = base
    prompts = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "My database is down and production is affected, please help!"},
        ],
        [{"role": "user", "content": "How do I reset my password for the web console?"}],
        "The quick brown fox",
        [{"role": "user", "content": "What is two plus two?"}],
    ]
    together = generate(model, tokenizer, prompts, batch_size=5, max_new_tokens=12)
    alone = [generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert together == alone
    assert len({c.token_ids for c in alone}) == len(prompts)  # the answers tell the prompts apart
    assert len({c.prompt_tokens for c in together}) > 1  # the batch really was padded
    # The same prompts as token ids (rendered and tokenized already), some mixed with messages: the same answers.
    ids = [tuple(row) for row in encode_prompts(tokenizer, prompts)]
    assert [len(row) for row in ids] == [c.prompt_tokens for c in together]
    mixed = [ids[i] if i % 2 else prompts[i] for i in range(len(prompts))]
    assert generate(model, tokenizer, mixed, batch_size=5, max_new_tokens=12) == together


TRIAGE_SYSTEM = {"role": "system", "content": "You are the triage assistant for Nimbus Cloud. Answer with JSON only."}


def generate_recording_forwards(model, tokenizer, prompts):
    """Greedy answers to `prompts`, and the shape of each forward's input ids."""
    run = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: run.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        return generate(model, tokenizer, prompts, max_new_tokens=8), run
    finally:
        hook.remove()


def test_a_shared_system_prompt_runs_once_and_changes_no_answer(base):
    """Prompts that open with the same system prompt: the batch runs it once, and each answer is the
    one the prompt gets alone."""
    model, tokenizer = base
    tickets = ["Our database is down!", "How do I resize a VM?", "I was charged twice this month, please refund one."]
    prompts = [[TRIAGE_SYSTEM, {"role": "user", "content": ticket}] for ticket in tickets]
    together, run = generate_recording_forwards(model, tokenizer, prompts)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone
    assert len({c.token_ids for c in alone}) == len(prompts)  # the answers tell the tickets apart
    prompt_tokens = sum(c.prompt_tokens for c in together)
    prefilled = run[0][0] * run[0][1] + run[1][0] * run[1][1]  # the shared prefix once, then the rows' rests
    assert run[0][0] == 1 and run[1][0] == len(prompts)
    assert prefilled < prompt_tokens - (len(prompts) - 1) * 16


def test_a_repeated_prompt_runs_once_and_its_rows_sample_apart(base):
    """A group of rows with one prompt (GRPO's answers to a ticket): the prompt is prefilled once, the
    greedy answers are the prompt's own, and sampled rows draw apart."""
    model, tokenizer = base
    tickets = ["Our database is down!", "How do I resize a VM?"]
    prompts = [[TRIAGE_SYSTEM, {"role": "user", "content": ticket}] for ticket in tickets for _ in range(3)]
    together, run = generate_recording_forwards(model, tokenizer, prompts)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts[::3]]
    assert together == [c for c in alone for _ in range(3)]
    assert alone[0].token_ids != alone[1].token_ids  # the answers tell the tickets apart
    assert run[0][0] == 1 and run[1][0] == len(tickets)  # the system prompt once, then each ticket once
    sampled = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert len({c.token_ids for c in sampled[:3]}) > 1
    assert generate(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, seed=3) == sampled


def test_sampling_is_repeatable_with_a_seed(base):
    """The same seed samples the same completion, given as an int or as a NumPy integer (one stream for all)."""
    model, tokenizer = base
    options = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    first = generate(model, tokenizer, [QUESTION], **options)
    assert generate(model, tokenizer, [QUESTION], **options) == first
    assert generate(model, tokenizer, [QUESTION], **{**options, "seed": np.int64(7)}) == first
    greedy = generate(model, tokenizer, [QUESTION], max_new_tokens=16)
    samples = {generate(model, tokenizer, [QUESTION], **{**options, "seed": s})[0].text for s in range(5)}
    assert samples != {greedy[0].text}


def test_a_seed_a_prompt_samples_each_as_it_samples_alone(base):
    """Seeds given one a prompt: a prompt's sampled completion is the same alone, beside others or in
    another batch (best-of-N resumes on it), and equal prompts with other seeds draw apart."""
    model, tokenizer = base
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(3) for _ in range(2)]
    options = dict(max_new_tokens=8, temperature=1.0)
    together = generate(model, tokenizer, prompts, seed=[10, 11, 12, 13, 14, 15], batch_size=4, **options)
    alone = [generate(model, tokenizer, [p], seed=[10 + i], **options)[0] for i, p in enumerate(prompts)]
    assert together == alone
    assert all(together[i].token_ids != together[i + 1].token_ids for i in range(0, 6, 2))
    with pytest.raises(ValueError, match="2 seeds for 6 prompts"):
        generate(model, tokenizer, prompts, seed=[1, 2], **options)


def test_bad_options_are_refused(base):
    model, tokenizer = base
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, [QUESTION], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tokenizer, [QUESTION], top_p=0)


def test_inference_dtype_is_bf16_only_where_native():
    from tuneforge.generate import inference_device, inference_dtype
    from tuneforge.models import bf16_supported

    assert inference_dtype() == inference_dtype("fp32") == torch.float32
    native = bf16_supported(inference_device())
    assert inference_dtype("auto") == (torch.bfloat16 if native else torch.float32)


FIXED_PROMPTS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "My database is down and production is affected, please help!"}],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "How do I reset my password for the web console?"},
    ],
    "The quick brown fox",
]


@pytest.mark.parametrize("first_columns", [256, 1], ids=["room-to-spare", "growing-every-doubling"])
def test_greedy_tokens_equal_transformers_generate_in_fp32(base, first_columns, monkeypatch):
    """The decoding loop (pre-allocated cache, own batching) picks the tokens transformers' `generate` picks,
    alone and batched, whether the cache has room from the start or grows."""
    from tuneforge import kv_cache
    from tuneforge.generate import encode_prompts, stop_token_ids

    monkeypatch.setattr(kv_cache, "MIN_COLUMNS", first_columns)
    model, tokenizer = base
    stops = sorted(stop_token_ids(model, tokenizer))
    expected = []
    for ids in encode_prompts(tokenizer, FIXED_PROMPTS):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
            )
        expected.append(tuple(out[0, len(ids) :].tolist()))
    alone = [generate(model, tokenizer, [p], max_new_tokens=24)[0].token_ids for p in FIXED_PROMPTS]
    together = [c.token_ids for c in generate(model, tokenizer, FIXED_PROMPTS, max_new_tokens=24)]
    assert alone == together == expected


def test_a_prompt_batch_never_copies_the_output_layer_per_row(tiny_model_dir):
    """The prompts' last positions reach the output layer as one contiguous [rows, 1, hidden] tensor.
    A sliced last position is a strided view, which torch's matmul meets, for a weight that needs no
    gradient, by copying the weight once per row (5 GB for 16 prompts on Gemma 3's 262k vocabulary in
    bf16, and 11x the prefill's time)."""
    from torch.profiler import ProfilerActivity, profile

    from tuneforge.models import load_frozen_model

    model = load_frozen_model(str(tiny_model_dir), "test", dtype=torch.bfloat16, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [[{"role": "user", "content": f"Question number {i}: is it {'very ' * i}long?"}] for i in range(16)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        generate(model, tokenizer, prompts, max_new_tokens=1)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest < len(prompts) * model.get_output_embeddings().weight.nbytes


def test_a_reply_stops_where_the_models_context_ends(base):
    model, tokenizer = base
    window = model.config.max_position_embeddings
    prompt = tuple(tokenizer("Hi", add_special_tokens=False)["input_ids"] * (window - 5))[: window - 5]
    [done] = generate(model, tokenizer, [prompt], max_new_tokens=50)
    assert (done.prompt_tokens, done.completion_tokens, done.finish_reason) == (window - 5, 5, "length")
    with pytest.raises(ValueError, match=f"maximum context length is {window} tokens"):
        generate(model, tokenizer, [prompt + prompt[:5]], max_new_tokens=1)


def test_logprobs_are_the_raw_log_softmax_of_each_token_given_the_prompt_and_the_reply_before_it(base):
    # Rows asking for log probabilities share a batch with one that does not and one whose penalty changes what it
    # picks: each asking row's are the model's own distribution at each step, as a separate forward pass gives it.
    from tuneforge.generate import Batch, Sampling

    model, tokenizer = base
    prompts = encode_prompts(tokenizer, [QUESTION, [{"role": "user", "content": "What is two plus two?"}]])
    batch = Batch(model, tokenizer)
    plain = batch.add(prompts[0], Sampling(max_new_tokens=8))
    asking = [
        batch.add(prompts[0], Sampling(max_new_tokens=8, logprobs=3)),
        batch.add(prompts[1], Sampling(max_new_tokens=8, logprobs=0, frequency_penalty=2.0)),
    ]
    while batch:
        batch.step()
    assert plain.completion().logprobs is None
    for row in asking:
        completion = row.completion()
        ids = torch.tensor([row.prompt_ids + list(completion.token_ids)])
        with torch.no_grad():
            expected = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)[len(row.prompt_ids) - 1 :]
        assert len(completion.logprobs) == len(completion.token_ids)  # no end of turn in 8 tokens of a random model
        for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            assert entry.logprob == pytest.approx(expected[step, token].item(), abs=1e-4)
            assert len(entry.top) == row.sampling.logprobs
            assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
            if entry.top:
                best = expected[step].topk(3)
                assert entry.top[0] == replace(entry, top=(), offset=0)  # greedy: the token picked is the likeliest
                assert [t.logprob for t in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("stop", [(), ("ok",)])
def test_a_tokens_logprob_text_is_its_piece_of_the_reply_and_a_half_characters_its_own_bytes(base, stop):
    # The byte-level tokenizer spells "é" and "😀" in single bytes: each such token has its raw bytes (written as
    # \xNN in its text, as OpenAI's API gives them), so the bytes joined are the reply's; a token the stop string
    # cuts off is not in the reply's log probabilities.
    from tuneforge.generate import Row, Sampling

    model, tokenizer = base
    ids = tokenizer("café 😀 ok", add_special_tokens=False)["input_ids"]
    row = Row([1], Sampling(max_new_tokens=len(ids), logprobs=1, stop=stop), None)
    for token in ids:
        row.add(token, tokenizer, frozenset(), (-1.0, [(token, -1.0)]))
    completion = row.completion()
    text = "café 😀 " if stop else "café 😀 ok"
    assert completion.text == text
    entries = completion.logprobs
    assert [e.token for e in entries][:7] == ["c", "a", "f", "\\xc3", "\\xa9", " ", "\\xf0"]
    assert b"".join(e.bytes for e in entries).decode() == text
    assert [e.offset for e in entries] == [0, 1, 2, 3, 3, 4, 5, 5, 5, 5, 6][: len(entries)] + [7, 8][
        : len(entries) - 11
    ]
    assert all(e.top[0].token == e.token and e.top[0].bytes == e.bytes for e in entries)
