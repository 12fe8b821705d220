"""The family matrix: every family tuneforge is tested on, end to end, on a tiny model of its own.

Per family (tests/families.py): `data check --show` trains exactly each reply and the family's end
of turn; LoRA trains; `final/` loads in plain transformers + PEFT and agrees with tuneforge's own
loading; the merged and GGUF exports pass their logit checks; `serve` answers a chat request and
stops at the end of turn. The LoRA run teaches the model one short reply, so that it answers it and
stops, which is what the serve check asks of the end-of-turn token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data.rows import trained_runs
from families import FAMILIES, family_tokenizer, save_family_model

from tuneforge.data import render_conversation, render_examples
from tuneforge.data.check import TRAINED_STYLE, _rendered_rows, check_command, highlight
from tuneforge.data.render import FATAL_CODES
from tuneforge.data.schema import Conversation, Message
from tuneforge.errors import DataError
from tuneforge.exporting import export
from tuneforge.exporting.probe import DTYPE_BOUNDS, MERGE_BOUND
from tuneforge.generate import encode_prompts, generate
from tuneforge.models import load_model, load_tokenizer
from tuneforge.models.families import family_of
from tuneforge.models.system_prompt import recorded_system_prompt
from tuneforge.tasks.metrics import split_reasoning
from tuneforge.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

REPLY = "Sure."
STEPS = 24  # enough for every family's tiny model to answer REPLY and stop
QUESTIONS = [
    "What is the capital of France?",
    "What is two plus two?",
    "How do I reset my password for the web console?",
    "Hello, how are you today?",
    "My database is down and production is affected, please help!",
    "Name three colours.",
    "What is the answer?",
    "Can you help me?",
]


def by_family(*names):
    """Parameters over families, each family's tests in one xdist group (they share its run)."""
    return pytest.mark.parametrize(
        "name", [pytest.param(n, marks=pytest.mark.xdist_group(f"family-{n}")) for n in names or FAMILIES]
    )


@by_family()
def test_the_tiny_model_answers_each_prompt_its_own_way(name, tmp_path):
    """A model that answers every prompt alike, or ignores where its tokens sit, would let a wrong
    prompt, position, mask or cache in serve, merge, export or resume pass a comparison of answers."""
    from transformers import AutoModelForCausalLM

    folder = save_family_model(FAMILIES[name], tmp_path)
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    answers, moved = set(), 0
    for question in QUESTIONS[:4]:
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        ids = ids["input_ids"]
        with torch.no_grad():
            answer = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
            positions = torch.arange(ids.shape[1])[None]
            positions[0, -1] += 1  # the last prompt token one place too far, as an off-by-one cache would put it
            last = model(ids, position_ids=positions).logits[0, -1].argmax().item()
        answers.add(tuple(answer))
        moved += last != answer[0]
        assert len(set(answer)) > 1, f"{name} answers {question!r} with one token over and over: {answer}"
    assert len(answers) == 4, f"{name} answers different prompts alike: {answers}"
    assert moved, f"{name}'s next token ignores a misplaced position"


def conversation(family, first: str, second: str) -> dict:
    system = [{"role": "system", "content": "Be brief."}] if family.system_prompt else []
    turns = [("user", first), ("assistant", REPLY), ("user", second), ("assistant", REPLY)]
    return {"messages": system + [{"role": role, "content": content} for role, content in turns]}


# Question pairs: 16 distinct conversations to train on, 4 others to validate on (dedup keeps them apart).
TRAIN_PAIRS = [(i, (i + step) % len(QUESTIONS)) for step in (1, 2) for i in range(len(QUESTIONS))]
VALID_PAIRS = [(i, (i + 3) % len(QUESTIONS)) for i in range(4)]


def write_chats(family, path: Path, pairs: list[tuple[int, int]]) -> Path:
    rows = [conversation(family, QUESTIONS[first], QUESTIONS[second]) for first, second in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each family's base folder, data and finished LoRA run, made when a test first asks for it."""
    made: dict[str, dict] = {}

    def run_of(name: str) -> dict:
        if name not in made:
            family, root = FAMILIES[name], tmp_path_factory.mktemp(f"family-{name}")
            base = save_family_model(family, root / name)
            data = {
                "train": write_chats(family, root / "train.jsonl", TRAIN_PAIRS),
                "validation": write_chats(family, root / "valid.jsonl", VALID_PAIRS),
            }
            config = {
                "base_model": str(base),
                "method": "lora",
                "lora": {"r": 8, "alpha": 16},
                "data": {"train": str(data["train"]), "validation": str(data["validation"]), "max_length": 256},
                "train": {"max_steps": STEPS, "batch_size": 8, "learning_rate": 2e-2, "eval_every": 0, "save_every": 0},
                "output_dir": str(root / "run"),
            }
            made[name] = {"family": family, "base": base, "data": data, "result": train(config, progress=False)}
            made[name]["run"] = root / "run"
        return made[name]

    return run_of


@by_family()
def test_check_show_trains_each_reply_and_its_end_of_turn(name, runs, capsys):
    run = runs(name)
    family, tokenizer = run["family"], load_tokenizer(str(run["base"]))
    assert family_of(
        json.loads((run["base"] / "config.json").read_text())["model_type"],
        tokenizer.chat_template,
        tokenizer.get_vocab(),
    )
    assert check_command([str(run["data"]["train"])], model=str(run["base"]), show=1) == 0
    assert "no errors" in capsys.readouterr().out
    [(_, _, examples)] = list(_rendered_rows([str(run["data"]["train"])], tokenizer, "auto", "assistant", 1024))[:1]
    trained = [
        text.plain[span.start : span.end]
        for _, _, example in examples
        for text in [highlight(example, tokenizer)]
        for span in text.spans
        if span.style == TRAINED_STYLE
    ]
    assert trained == [family.trained_reply(REPLY)] * 2


@by_family()
def test_lora_trains(name, runs):
    run = runs(name)
    result = run["result"]
    assert (result.status, result.steps) == ("completed", STEPS)
    losses = [json.loads(line) for line in (run["run"] / "metrics.jsonl").read_text().splitlines()]
    train_losses = [row["train_loss"] for row in losses if "train_loss" in row]
    assert train_losses[-1] < train_losses[0] / 4


@by_family()
def test_final_loads_in_plain_transformers_and_peft(name, runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs(name)
    final = run["run"] / "final"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run["base"]), final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    chat = tokenizer.apply_chat_template(
        conversation(run["family"], QUESTIONS[0], QUESTIONS[1])["messages"], tokenize=False
    )
    ids = torch.tensor([tokenizer(chat, add_special_tokens=False).input_ids])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, load_model(str(run["run"])).eval()(ids).logits)


@by_family()
def test_merged_export_is_within_its_bounds(name, runs, tmp_path):
    result = export(runs(name)["run"], "merged", "f32", tmp_path / "merged", progress=False)
    assert result.checks["merge"]["max_abs_logit_diff"] <= MERGE_BOUND
    assert result.checks["max_abs_logit_diff"] <= DTYPE_BOUNDS["f32"]


@by_family()
def test_gguf_export_is_within_its_bounds_with_the_family_template(name, runs, tmp_path):
    from gguf import GGUFReader

    run = runs(name)
    result = export(run["run"], "gguf", "f16", tmp_path / "gguf", ollama=True, progress=False)
    assert result.checks["max_abs_logit_diff"] <= DTYPE_BOUNDS["f16"]
    assert result.checks["tokenizer_roundtrip_identical"] == run["family"].gguf_tokenizer_roundtrip
    fields = GGUFReader(result.files[0]).fields
    assert run["family"].name in fields["general.name"].contents()  # llama.cpp keys some token behaviour to it
    tokenizer = load_tokenizer(str(run["run"]))
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    # A runtime adds BOS where the tokenizer does, so the template's own BOS is not written twice.
    adds_bos = tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    assert "tokenizer.ggml.add_bos_token" in fields or not adds_bos
    if "tokenizer.ggml.add_bos_token" in fields:
        assert fields["tokenizer.ggml.add_bos_token"].contents() == adds_bos
    modelfile = (result.out / "Modelfile").read_text()
    assert f'PARAMETER stop "{run["family"].end_of_turn}"' in modelfile
    # Ollama's default system prompt is the one the run recorded, whatever the family's format.
    assert ('SYSTEM """Be brief."""' in modelfile) == run["family"].system_prompt


@by_family()
def test_the_run_records_its_system_prompt_and_bare_conversations_render_with_it(name, runs):
    run = runs(name)
    tokenizer = load_tokenizer(str(run["run"]))
    if not run["family"].system_prompt:  # its rows bring none, so there is nothing to record
        assert recorded_system_prompt(tokenizer) is None
        return
    assert recorded_system_prompt(tokenizer) == "Be brief."
    question = [{"role": "user", "content": QUESTIONS[0]}]
    [bare, given] = encode_prompts(tokenizer, [question, [{"role": "system", "content": "Be brief."}, *question]])
    assert bare == given


@by_family()
def test_serve_answers_and_stops_at_the_end_of_turn(name, runs):
    from fastapi.testclient import TestClient

    from tuneforge.serve import AdapterPool, Engine, create_app

    run = runs(name)
    engine = Engine(AdapterPool(str(run["base"]), {"tuned": str(run["run"])}))
    try:
        with TestClient(create_app(engine)) as client:
            messages = conversation(run["family"], *(QUESTIONS[i] for i in TRAIN_PAIRS[5]))["messages"][:-1]
            body = {"model": "tuned", "messages": messages, "max_tokens": 16, "temperature": 0}
            reply = client.post("/v1/chat/completions", json=body).json()
            body = {"model": "tuned", "input": messages, "max_output_tokens": 16, "temperature": 0}
            response = client.post("/v1/responses", json=body).json()
            with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
                events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    finally:
        engine.close()
    [choice] = reply["choices"]
    # Every family's answer is the reply it learnt; Qwen 3's (empty) reasoning before it comes apart.
    assert choice["message"]["content"].endswith(REPLY) and choice["finish_reason"] == "stop"
    # The Responses API's answer, whole and streamed, is the chat route's.
    assert response["status"] == "completed" and events[-1]["type"] == "response.completed"

    def items(response: dict) -> list[tuple[str, str]]:
        return [(item["type"], item["content"][0]["text"]) for item in response["output"]]

    # Qwen 3's empty reasoning makes no item: the answer alone, as the chat route's content.
    assert items(response) == items(events[-1]["response"]) == [("message", choice["message"]["content"])]
    assert "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta") == REPLY
    assert reply["usage"]["completion_tokens"] < 16
    # What stopped it is the family's end-of-turn token, the last one generated.
    model, tokenizer = load_model(str(run["run"])).eval(), load_tokenizer(str(run["run"]))
    [alone] = generate(model, tokenizer, [messages], max_new_tokens=16)
    assert split_reasoning(alone.text)[1] == choice["message"]["content"]
    assert ("reasoning_content" in choice["message"]) == (name == "qwen3")
    assert tokenizer.convert_ids_to_tokens(alone.token_ids[-1]) == run["family"].end_of_turn


# ---- templates that do not render a conversation as the sum of its turns -----------------------

SYSTEM_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
]


def test_qwen3_trains_each_reply_with_its_reasoning_in_an_example_of_its_own(tmp_path):
    # Qwen 3 drops the reasoning of replies before the last user message: in the whole
    # conversation the first reply has none, although the model wrote it.
    tokenizer = family_tokenizer(FAMILIES["qwen3"], tmp_path)
    messages = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\nFour."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\nSix."},
    ]
    first, whole = render_examples(messages, tokenizer)
    assert tokenizer.decode(first.input_ids) == tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert trained_runs(first, tokenizer) == ["<think>\nTwo and two.\n</think>\n\nFour.<|im_end|>"]
    assert tokenizer.decode(whole.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert "Two and two" not in tokenizer.decode(whole.input_ids)
    assert trained_runs(whole, tokenizer) == ["<think>\nThree and three.\n</think>\n\nSix.<|im_end|>"]


def test_reasoning_given_apart_from_the_answer_trains_as_the_template_writes_it(tmp_path):
    # DeepSeek's and Qwen's APIs (and datasets exported from them) give the reasoning in its own field:
    # Qwen 3's template writes it inside <think>, a template without reasoning would drop it unseen.
    messages = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "reasoning": "Two and two.", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "reasoning_content": "Three and three.", "content": "Six."},
    ]
    qwen3 = family_tokenizer(FAMILIES["qwen3"], tmp_path / "qwen3")
    first, whole = render_examples(messages, qwen3)
    assert trained_runs(first, qwen3) == ["<think>\nTwo and two.\n</think>\n\nFour.<|im_end|>"]
    assert trained_runs(whole, qwen3) == ["<think>\nThree and three.\n</think>\n\nSix.<|im_end|>"]
    with pytest.raises(DataError) as err:
        render_examples(messages, family_tokenizer(FAMILIES["qwen2.5"], tmp_path / "qwen2.5"))
    assert (err.value.code, err.value.problems[0].field) == ("reasoning_not_rendered", "messages[1].reasoning_content")
    assert "'Four.<|im_end|>'" in str(err.value) and "<think>" in str(err.value)


def test_qwen3_refuses_a_reply_after_a_reply_as_a_fault_of_the_row_not_of_the_template(tmp_path):
    # Qwen 3 writes an empty reasoning block into the last reply only, so the first of two replies in a
    # row changes once the second follows: that row cannot train, while every other row can.
    tokenizer = family_tokenizer(FAMILIES["qwen3"], tmp_path)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "assistant", "content": "How can I help?"},
    ]
    with pytest.raises(DataError) as err:
        render_examples(messages, tokenizer)
    assert (err.value.code, err.value.problems[0].field) == ("reply_after_reply", "messages[2]")
    assert err.value.code not in FATAL_CODES and "Join the two replies" in str(err.value)


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("qwen2.5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'),
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'),
    ],
)
def test_openai_tool_call_arguments_are_trained_as_an_object_not_a_string(tmp_path, name, call):
    # OpenAI's format holds a call's arguments as JSON text; the templates write them with tojson.
    tokenizer = family_tokenizer(FAMILIES[name], tmp_path)
    weather = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", **weather}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Sunny."},
    ]
    example = render_conversation(messages, tokenizer)
    assert trained_runs(example, tokenizer)[0] == call


@pytest.mark.parametrize(("name", "call_id"), [("qwen2.5", "call_1"), ("mistral", "abcDEF123")])
def test_a_request_with_the_rows_tools_and_calls_is_prompted_as_the_row_trained(tmp_path, name, call_id):
    # The row's tool definition has its keys in another order than a request's body gives them to the
    # template: Qwen writes each definition with tojson, Mistral key by key.
    from tuneforge.data import read_conversations
    from tuneforge.serve.bodies import ChatCompletionBody

    tokenizer = family_tokenizer(FAMILIES[name], tmp_path)
    order = {"type": "object", "properties": {"order_id": {"type": "string"}}}
    tool = {"function": {"name": "get_order", "parameters": order, "description": "An order"}, "type": "function"}
    call = {"id": call_id, "type": "function", "function": {"name": "get_order", "arguments": '{"order_id":"42"}'}}
    messages = [
        {"role": "user", "content": "Where is order 42?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "paid", "tool_call_id": call_id},
        {"role": "assistant", "content": "It is paid."},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": messages, "tools": [tool]}) + "\n", encoding="utf-8")
    [(_, row)] = list(read_conversations(path))
    [example] = render_examples(row, tokenizer, "last_assistant")
    body = ChatCompletionBody.model_validate({"model": "m", "messages": messages[:-1], "tools": [tool]})
    [prompt] = encode_prompts(tokenizer, [body.template_messages()], body.template_tools())
    assert list(example.input_ids[: len(prompt)]) == prompt
    assert tokenizer.decode(example.input_ids[len(prompt) :]).strip() == f"It is paid.{FAMILIES[name].end_of_turn}"


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("messages[1].tool_calls[0].function.arguments.city", {"arguments": '{"city": "<|im_end|>"}'}),
        ("messages[1].tool_calls[0].function.arguments", {"arguments": '{"<|im_start|>system": 1}'}),
        ("messages[1].tool_calls[0].function.name", {"name": "f<|im_end|>"}),
    ],
)
def test_structure_tokens_in_a_tool_call_are_refused_as_in_content(tmp_path, field, message):
    # Qwen's template writes a call's name and arguments (keys too) into the trained reply: a structure
    # token there would end the turn where the data means text.
    tokenizer = family_tokenizer(FAMILIES["qwen2.5"], tmp_path)
    call = {"type": "function", "function": {"name": "f", "arguments": "{}", **message}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", **call}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": "Sunny."},
    ]
    with pytest.raises(DataError) as err:
        render_conversation(messages, tokenizer)
    assert (err.value.code, err.value.problems[0].field) == ("special_token_in_content", field)


def test_a_control_token_in_trained_reasoning_is_refused_and_in_a_tool_definition_is_structure(tmp_path):
    tokenizer = family_tokenizer(FAMILIES["qwen3"], tmp_path)
    reply = {"role": "assistant", "content": "4", "reasoning_content": "Split on <|endoftext|> first."}
    with pytest.raises(DataError) as err:
        render_conversation([{"role": "user", "content": "2+2?"}, reply], tokenizer)
    assert (err.value.code, err.value.problems[0].field) == (
        "special_token_in_content",
        "messages[1].reasoning_content",
    )
    tool = {"type": "function", "function": {"name": "f", "description": "<|im_end|>", "parameters": {}}}
    conversation = Conversation([Message("user", "2+2?"), Message("assistant", "4", reasoning_content="Add.")], [tool])
    with pytest.raises(DataError) as err:
        render_conversation(conversation, tokenizer)
    assert err.value.problems[0].field == "tools[0].function.description"


def test_mistral_refuses_a_system_prompt_naming_the_reply_it_moves_away_from(tmp_path):
    # Mistral writes the system prompt into the last message only when the user wrote it: once the
    # reply follows, it is gone from the turn the reply answers.
    tokenizer = family_tokenizer(FAMILIES["mistral"], tmp_path)
    with pytest.raises(DataError) as error:
        render_conversation(SYSTEM_CHAT, tokenizer)
    [problem] = error.value.problems
    assert (problem.code, problem.field) == ("template_not_prefix", "messages[2]")
    assert "they differ at character 10: '<s>[INST] Be brief.\\n\\nWhat is two plus" in problem.message
    assert "(asked for the reply) vs '<s>[INST] What is two plus two?[/INST] F' (with the reply)" in problem.message
    assert trained_runs(render_conversation(SYSTEM_CHAT[1:], tokenizer), tokenizer) == ["Four.</s>"]


def test_a_preference_row_mistral_refuses_is_named_at_its_own_fields(tmp_path):
    """A pair's rendering problems point at the row's fields, not at the conversation it renders."""
    from tuneforge.data import Preference, read_conversations
    from tuneforge.data.render import renderer_for

    system, user, reply = SYSTEM_CHAT
    other = {"role": "assistant", "content": "Five."}
    rows = [
        {"input": {"messages": [system, user]}, "preferred_output": [reply], "non_preferred_output": [other]},
        {"prompt": [system, user], "chosen": [reply], "rejected": [other]},
        {"prompt": user["content"], "chosen": [system, user, reply], "rejected": [system, user, other]},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = [record for _, record in read_conversations(path) if isinstance(record, Preference)]
    results = renderer_for(family_tokenizer(FAMILIES["mistral"], tmp_path)).render_preferences(pairs)
    assert [{(p.code, p.field) for p in problems} for problems in results] == [
        {("template_not_prefix", "preferred_output[0]"), ("template_not_prefix", "non_preferred_output[0]")},
        {("template_not_prefix", "chosen[0]"), ("template_not_prefix", "rejected[0]")},
        {("template_not_prefix", "chosen[2]"), ("template_not_prefix", "rejected[2]")},
    ]


def test_gemma3_folds_the_system_prompt_into_the_first_user_turn_untrained(tmp_path):
    tokenizer = family_tokenizer(FAMILIES["gemma3"], tmp_path)
    example = render_conversation(SYSTEM_CHAT, tokenizer)
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\nWhat is two plus two?<end_of_turn>")
    assert trained_runs(example, tokenizer) == ["Four.<end_of_turn>"]


def test_gemma2_refuses_a_system_prompt_with_its_own_reason(tmp_path):
    tokenizer = family_tokenizer(FAMILIES["gemma2"], tmp_path)
    with pytest.raises(DataError) as error:
        render_conversation(SYSTEM_CHAT, tokenizer)
    [problem] = error.value.problems
    assert (problem.code, problem.field) == ("template_error", "messages[0]")
    assert "System role not supported" in problem.message
    assert "Fold the system prompt into the first user message, or remove it." in problem.message


def test_phi3_does_not_train_the_eos_its_template_writes_after_the_last_turn(tmp_path):
    tokenizer = family_tokenizer(FAMILIES["phi3"], tmp_path)
    example = render_conversation(SYSTEM_CHAT, tokenizer)
    assert tokenizer.convert_ids_to_tokens(example.input_ids[-1]) == "<|endoftext|>"
    assert trained_runs(example, tokenizer) == ["Four.<|end|>"]


@by_family("gemma3")
def test_quickstart_takes_the_model_to_fine_tune(name, runs, tmp_path, monkeypatch, capsys):
    """`tuneforge quickstart --model`: the data written for that model, the train command naming it."""
    import sys

    from tuneforge.cli import main

    tuned = runs(name)["run"]  # it answers ("Sure."), so it has replies to replay
    argv = ["tuneforge", "quickstart", "--model", str(tuned), "--n-train", "40", "--data-only", "--out", "qs"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    assert f"base_model={tuned}" in capsys.readouterr().out
    assert (tmp_path / "qs" / "data" / "replay.jsonl").is_file()  # the model's own replies to replay


@by_family("gemma3")
def test_a_gemma3_teacher_teaches_a_smollm2_student_through_its_answers(name, runs, tmp_path):
    """Distillation across families (other tokenizer, other template) is sequence-level: the teacher's
    answers are plain text, free of its turn markers, and the student learns them in its own template."""
    from tuneforge.distill import generate_teacher_data

    teacher, student = runs(name), FAMILIES["smollm2"]
    prompts = tmp_path / "prompts.jsonl"
    asked = [conversation(teacher["family"], QUESTIONS[i], QUESTIONS[j])["messages"][:2] for i, j in TRAIN_PAIRS]
    prompts.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in asked))
    answers = tmp_path / "answers.jsonl"
    generate_teacher_data(str(teacher["run"]), prompts, answers, max_new_tokens=8, progress=False)
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [row["messages"][-1]["content"] for row in rows] == [REPLY] * len(asked)

    config = {
        "base_model": str(save_family_model(student, tmp_path / "student")),
        "method": "lora",
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": str(answers), "max_length": 256},
        "train": {"max_steps": STEPS, "batch_size": 8, "learning_rate": 2e-2, "eval_every": 0, "save_every": 0},
        "output_dir": str(tmp_path / "run"),
    }
    train(config, progress=False)
    model, tokenizer = load_model(str(tmp_path / "run")).eval(), load_tokenizer(str(tmp_path / "run"))
    [answer] = generate(model, tokenizer, [asked[0]], max_new_tokens=8)
    assert answer.text == REPLY
    assert tokenizer.convert_ids_to_tokens(answer.token_ids[-1]) == student.end_of_turn
