"""Secrets and personal data in training rows (`data.pii`): found by kind, line and field, masked in the
report, look-alikes left alone, and refused or redacted before training sees them."""

from __future__ import annotations

import json

import pytest
from data.rows import chat, write_jsonl

from tuneforge.config import DataConfig
from tuneforge.data import cache, check_data, prepare
from tuneforge.data.formats import read_conversations
from tuneforge.data.pii import find, redact, redact_record
from tuneforge.errors import DataError
from tuneforge.tasks.support_triage import generate

# (kind, the value, a masked sample the report may show)
FOUND = [
    ("email", "jane.doe@acme.io", "j***@a***.io"),
    ("phone", "+1 415-555-0132", "***32"),
    ("credit_card", "4111 1111 1111 1111", "***1111"),
    ("iban", "DE89 3704 0044 0532 0130 00", "DE***"),
    ("ipv4", "52.14.201.9", "52.***"),
    ("aws_access_key", "AKIAIOSFODNN7EXAMPLE", "AKIA***"),
    ("gcp_api_key", "AIzaSyA1234567890abcdefghijklmnopqrstuv", "AIza***"),
    ("github_token", "ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_***"),
    ("slack_token", "xoxb-123456789012-abcdefABCDEF", "xoxb***"),
    ("openai_key", "sk-proj-abcDEF1234567890abcdefghijklmnopqrstuv", "sk-p***"),
    ("jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "eyJh***"),
    ("url_password", "s3cr3tPw", "***"),
    ("private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", None),
]

LOOK_ALIKES = """\
sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855, commit 1e5c136a9f
md5 9e107d9d372bb6826bd81d3542a419d6, token 3f2504e0-4f89-11d3-9a0c-0305e82c3301
request 550e8400-e29b-41d4-a716-446655440000 at 2024-01-15 12:30:05, np.array(['+1980-02-29 01:02:03'])
pip install torch==2.4.0.1 'numpy>=1.26.4.0'; version 4.19.128.1; v10.2.3.4; see section 2.4.8.19 or 1.2.3.4
ip 192.168.1.20, 10.0.0.7, 127.0.0.1, 203.0.113.9; mail user@example.com; clone git@github.com:org/repo.git
postgres://user:password@localhost/db, mysql://scott:tiger@db/app, ${DB_URL}
rng = np.random.default_rng(235889269872456); x = 476837158203125*p*q; order 1234567890123; pi 3.14159265358979
sk-learn-is-not-a-key, AKIA-short, eyJ alone, price 1,234,567.89, build 20240115.1"""


def rows_with(value: str) -> list[dict]:
    """A row with `value` in its reply, then one with it in its prompt, among clean rows."""
    clean = [chat(f"Question {i}?", f"Answer {i}.", system="Be brief.") for i in range(4)]
    return [
        clean[0],
        chat("How do I connect?", f"Use this: {value} and retry.", system="Be brief."),
        clean[1],
        chat(f"My details: {value}. Please help.", "Done, thank you.", system="Be brief."),
        *clean[2:],
    ]


def data_config(path, **settings) -> DataConfig:
    return DataConfig(train=str(path), validation=None, max_length=256, **settings)


@pytest.mark.parametrize(("kind", "value", "sample"), FOUND, ids=[f[0] for f in FOUND])
def test_each_kind_is_found_by_line_and_field_masked_and_louder_in_replies(tmp_path, tokenizer, kind, value, sample):
    shown = value if kind != "url_password" else f"postgres://admin:{value}@db.acme.io/app"
    path = write_jsonl(tmp_path / "rows.jsonl", rows_with(shown))
    data, errors = check_data(data_config(path), tokenizer, keep_examples=False)
    assert not errors
    pii = data.report["pii"]
    assert pii["kinds"] == {kind: 2} and pii["rows"] == 2 and pii["in_replies"] == pii["in_prompts"] == 1
    assert [(f["line"], f["field"], f["in_reply"]) for f in pii["found"]] == [
        (2, "messages[2].content", True),
        (4, "messages[1].content", False),
    ]
    if sample:
        assert {f["sample"] for f in pii["found"]} == {sample}
    category = "secret" if kind not in ("email", "phone", "credit_card", "iban", "ipv4") else "personal_data"
    warnings = {w["code"]: w for w in data.report["warnings"]}
    assert warnings[f"{category}_in_reply"]["where"] == [f"{path}:2 messages[2].content"]
    assert warnings[f"{category}_in_prompt"]["where"] == [f"{path}:4 messages[1].content"]
    if category == "secret":
        assert data.report["warnings"][0]["code"] == "secret_in_reply"  # the loudest first
        assert "SECRET IN A REPLY" in warnings["secret_in_reply"]["message"]
    assert value not in json.dumps(data.report)  # never the value itself


def test_look_alikes_in_code_and_prose_are_not_flagged():
    assert [(h.kind.name, h.text) for h in find(LOOK_ALIKES)] == []


def test_the_demo_tasks_data_is_clean(tmp_path, tokenizer):
    paths = generate(tmp_path, n_train=300, n_valid=20, n_test=20, n_unlabelled=20)
    data, _ = check_data(data_config(paths["train"]), tokenizer, keep_examples=False)
    assert data.report["pii"]["kinds"] == {}
    for path in paths.values():
        assert not find(path.read_text())


def test_refuse_stops_preparation_listing_each_row_even_when_skipping_bad_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", rows_with("AKIAIOSFODNN7EXAMPLE"))
    for on_error in ("strict", "skip"):
        with pytest.raises(DataError) as refused:
            prepare(data_config(path, pii="refuse", on_error=on_error), tokenizer, use_cache=False, log=lambda _: None)
        said = str(refused.value)
        assert f"{path}:2 messages[2].content: [secret_in_reply]" in said
        assert f"{path}:4 messages[1].content: [secret_in_prompt]" in said
        assert "data.pii: redact" in said and "AKIAIOSFODNN7EXAMPLE" not in said


def test_redact_trains_on_placeholders_and_is_part_of_the_cache_key(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", rows_with("jane.doe@acme.io, card 4111 1111 1111 1111"))
    prepared = prepare(data_config(path, pii="redact"), tokenizer, use_cache=False, log=lambda _: None)
    texts = [tokenizer.decode(e.input_ids) for e in prepared.train]
    assert sum("<EMAIL>, card <CARD_NUMBER>" in t for t in texts) == 2
    assert not any("acme" in t or "4111" in t for t in texts)
    assert {w["code"] for w in prepared.report["warnings"]} >= {"personal_data_in_reply", "personal_data_in_prompt"}
    assert "replaced by placeholders" in prepared.report["warnings"][0]["message"]
    warned = prepare(data_config(path), tokenizer, use_cache=False, log=lambda _: None)
    assert any("jane.doe@acme.io" in tokenizer.decode(e.input_ids) for e in warned.train)  # warn trains as is
    keys = {cache.cache_key(data_config(path, pii=mode), tokenizer) for mode in ("warn", "redact")}
    assert len(keys) == 2


def test_redact_leaves_other_text_as_it_is():
    text = "Mail jane@acme.io from 52.14.201.9; version 1.2.3.4 stays."
    assert redact(text) == "Mail <EMAIL> from <IP_ADDRESS>; version 1.2.3.4 stays."


def test_fields_of_rows_in_other_formats_are_named_as_the_row_has_them(tmp_path, tokenizer):
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [{"instruction": "Reply to the customer.", "input": "From +49 151 23456789", "output": "Mail ops@acme.io."}],
    )
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Reach me on 415.555.0123", "completion": "Noted."}])
    data, _ = check_data(DataConfig(train=[str(alpaca), str(pc)], validation=None), tokenizer, keep_examples=False)
    found = [(f["file"], f["line"], f["field"], f["kind"]) for f in data.report["pii"]["found"]]
    assert found == [
        (str(alpaca), 1, "instruction (with its input)", "phone"),
        (str(alpaca), 1, "output", "email"),
        (str(pc), 1, "prompt", "phone"),
    ]


def test_a_sharegpt_turn_is_named_by_its_0_based_index_as_other_problems_name_it(tmp_path, tokenizer):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Mail ops@acme.io."}]
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": turns}])
    data, _ = check_data(DataConfig(train=str(sharegpt), validation=None), tokenizer, keep_examples=False)
    assert [(f["line"], f["field"]) for f in data.report["pii"]["found"]] == [(1, "conversations[1].value")]


def test_a_message_after_a_system_field_is_named_by_its_index_in_the_row_s_list(tmp_path, tokenizer):
    """A row's `system` field is the conversation's first message, but not one of the row's list: the list's
    messages are named by their index in it, the system prompt as `system`."""
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Mail ops@acme.io."}]
    rows = {
        "chat.jsonl": [chat("Hi", "Mail ops@acme.io.") | {"system": "Sign as jane.doe@acme.io."}],
        "sharegpt.jsonl": [{"system": "Sign as jane.doe@acme.io.", "conversations": turns}],
    }
    found = []
    for name, file_rows in rows.items():
        path = write_jsonl(tmp_path / name, file_rows)
        data, _ = check_data(DataConfig(train=str(path), validation=None), tokenizer, keep_examples=False)
        found += [(name, f["field"]) for f in data.report["pii"]["found"]]
    assert found == [
        ("chat.jsonl", "system"),
        ("chat.jsonl", "messages[1].content"),
        ("sharegpt.jsonl", "system"),
        ("sharegpt.jsonl", "conversations[1].value"),
    ]


def test_tool_call_arguments_given_as_an_object_are_looked_in_and_redacted(tmp_path, tokenizer):
    call = {"id": "call_1", "type": "function", "function": {"name": "send", "arguments": {"to": "ops@acme.io"}}}
    row = {
        "messages": [
            {"role": "user", "content": "Tell ops."},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sent"},
            {"role": "assistant", "content": "Done."},
        ]
    }
    path = write_jsonl(tmp_path / "tools.jsonl", [row])
    data, _ = check_data(data_config(path), tokenizer, keep_examples=False)
    assert [(f["field"], f["kind"], f["in_reply"]) for f in data.report["pii"]["found"]] == [
        ("messages[1].tool_calls[0].function.arguments", "email", True)
    ]
    # The tiny model's template writes no tool calls: the record training would render is checked instead.
    [(_, record)] = read_conversations(path)
    assert redact_record(record).messages[1].tool_calls[0]["function"]["arguments"] == {"to": "<EMAIL>"}
    assert record.messages[1].tool_calls[0]["function"]["arguments"] == {"to": "ops@acme.io"}  # not changed in place


def test_a_pair_whose_replies_differ_only_in_what_is_redacted_is_warned_of(tmp_path, tokenizer):
    pairs = [
        {"prompt": f"Who handles case {i}?", "chosen": f"Case {i}: ask the desk.", "rejected": f"No idea about {i}."}
        for i in range(4)
    ]
    pairs.append({"prompt": "Who do I mail?", "chosen": "Mail ann@acme.io.", "rejected": "Mail bob@corp.io."})
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    data, _ = check_data(data_config(path, pii="redact"), tokenizer, keep_examples=False)
    identical = [w for w in data.report["warnings"] if w["code"] == "identical_preference"]
    assert [w["where"] for w in identical] == [[f"{path}:5"]]
    assert "data.pii: redact" in identical[0]["message"]


def test_an_address_is_no_longer_than_its_standard_allows():
    # A local part of 64 characters is an address; one of 65 is none (RFC 5321), so a long run of letters and
    # dots before an @ (a blob, minified code) is not matched again from each of its characters.
    assert [h.text for h in find("mail " + "a" * 64 + "@mail.de")] == ["a" * 64 + "@mail.de"]
    assert find("mail " + "a" * 65 + "@mail.de") == []
    assert find("a." * 20_000 + "@" + "b." * 20_000) == []


def test_a_text_dense_with_hits_keeps_each_once_and_in_order():
    # Overlaps are looked up among the kept hits by position, not by going through them all for each match.
    text = " ".join(f"ana{i}@mail.de 81.{i % 200 + 20}.0.1" for i in range(20_000))
    hits = find(text)
    assert [h.kind.name for h in hits[:4]] == ["email", "ipv4", "email", "ipv4"]
    assert len(hits) == 40_000 and hits[-1].text == "81.219.0.1"
    assert find("x mail me: postgres://bob:hunter22@db.acme.io/x")[0].kind.name == "url_password"


def test_a_url_password_is_redacted_whole_with_an_empty_user_or_a_colon_in_it():
    # Redis writes its password with no user; a password may hold ':' after the one that ends the user.
    assert redact("redis://:s3cretPassw0rd@cache.acme.io:6379/0") == "redis://:<PASSWORD>@cache.acme.io:6379/0"
    assert redact("redis://:s3cretPassw0rd@localhost:6379") == "redis://:<PASSWORD>@localhost:6379"
    assert redact("postgres://admin:Sup3r:S3cret@db.internal/app") == "postgres://admin:<PASSWORD>@db.internal/app"
    assert [h.kind.name for h in find("redis://:s3cretPassw0rd@cache.acme.io")] == ["url_password"]


def test_a_warning_grouping_rows_names_the_kinds_of_each_row_not_the_first_rows_alone(tmp_path, tokenizer):
    rows = [
        chat("Call me?", "Call me at +1 415-555-0132 today.", system="Be brief."),
        chat("Pay how?", "Charge card 4111 1111 1111 1111 and mail jane.doe@acme.io now.", system="Be brief."),
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data, _ = check_data(data_config(path), tokenizer, keep_examples=False)
    said = {w["code"]: w for w in data.report["warnings"]}["personal_data_in_reply"]["message"]
    assert all(sample in said for sample in ("phone ***32", "credit_card ***1111", "email j***@a***.io")), said


def test_a_rendering_problem_names_the_same_field_as_the_pii_check(tmp_path, tokenizer):
    """A row's `system` field is not one of its list's messages: a problem found when rendering names the
    list's message by its index in the list, as the PII check names it, and a ShareGPT turn by its value."""

    def sharegpt(prompt: str, reply: str) -> dict:
        return {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]}

    reply = "Mail ops@acme.io. <|endoftext|> Split here."
    for name, row in (("chat", chat), ("sharegpt", sharegpt)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row("Hi", reply) | {"system": "Be brief."}, row("a", "b")])
        data, _ = check_data(DataConfig(train=str(path), validation=None), tokenizer, keep_examples=False)
        (pii_field,) = {f["field"] for f in data.report["pii"]["found"]}
        (error,) = data.report["errors"]
        assert (error["code"], error["field"]) == ("special_token_in_content", pii_field)


REPLY = "Mail ops@acme.io. <|endoftext|> Split here."
# Rows of each shape whose fields are not the conversation's messages one for one: one with REPLY in a field, the
# row's field that holds it (0-based indices, as every other problem names them), and a clean row of its shape.
SHAPES = {
    "kto_messages": (chat("Hi", REPLY) | {"label": True}, "messages[1].content", chat("a", "b") | {"label": True}),
    "kto_prompt_completion": (
        {"prompt": "Hi", "completion": REPLY, "label": True},
        "completion",
        {"prompt": "a", "completion": "b", "label": True},
    ),
    "prompt_list_completion": (
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "completion": REPLY,
        },
        "completion",
        {"prompt": "a", "completion": "b"},
    ),
    "completion_list": (
        {"prompt": "Hi", "completion": [{"role": "assistant", "content": REPLY}]},
        "completion[0].content",
        {"prompt": "a", "completion": "b"},
    ),
    "alpaca_output": (
        {"system": "Be brief.", "instruction": "Hi", "input": "Now.", "output": REPLY},
        "output",
        {"instruction": "a", "output": "b"},
    ),
    "alpaca_history": (
        {"system": "Be brief.", "history": [["Hello", "Hi."], ["Help?", REPLY]], "instruction": "Hi", "output": "Ok."},
        "history[1][1]",
        {"instruction": "a", "output": "b"},
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_the_pii_check_and_rendering_name_the_row_s_own_field(tmp_path, tokenizer, shape):
    row, field, clean = SHAPES[shape]
    path = write_jsonl(tmp_path / "rows.jsonl", [row, clean])
    data, _ = check_data(DataConfig(train=str(path), validation=None), tokenizer, keep_examples=False)
    assert [(f["line"], f["field"]) for f in data.report["pii"]["found"]] == [(1, field)]
    # (A KTO file whose one good row has one label is refused as a whole too, with no line.)
    assert [(e["code"], e["field"]) for e in data.report["errors"] if e["line"] == 1] == [
        ("special_token_in_content", field)
    ]


def test_alpaca_and_sharegpt_pairs_name_the_row_s_fields(tmp_path, tokenizer):
    """A pair whose prompt is built from several fields (alpaca's and ShareGPT's) names each message's field, as
    the other pairs do, not its place in the prompt."""
    turns = [{"from": "human", "value": "Mail ops@acme.io."}]
    reply, other = "Ok. <|endoftext|>", {"from": "gpt", "value": "No."}
    shapes = {
        "alpaca": (
            {"system": "Be brief.", "history": [["Hi", "Mail ops@acme.io."]], "instruction": "And?"}
            | {"chosen": reply, "rejected": "No."},
            ("history[0][1]", "chosen"),
        ),
        "sharegpt": (
            {
                "system": "Be brief.",
                "conversations": turns,
                "chosen": {"from": "gpt", "value": reply},
                "rejected": other,
            },
            ("conversations[0].value", "chosen.value"),
        ),
    }
    for name, (row, (pii_field, error_field)) in shapes.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        data, _ = check_data(DataConfig(train=str(path), validation=None), tokenizer, keep_examples=False)
        assert [f["field"] for f in data.report["pii"]["found"]] == [pii_field]
        assert [(e["code"], e["field"]) for e in data.report["errors"] if e["line"] == 1] == [
            ("special_token_in_content", error_field)
        ]


@pytest.mark.parametrize("prompt", ["Thanks", [{"role": "user", "content": "Thanks"}]], ids=["text", "list"])
def test_a_pair_of_hh_transcripts_beside_its_prompt_names_the_transcript(tmp_path, tokenizer, prompt):
    """The transcripts hold the turns before the prompt given beside them: a text in one is named by them."""
    said = "\n\nHuman: Mail ops@acme.io\n\nAssistant: Done.\n\nHuman: Thanks\n\nAssistant: "
    path = write_jsonl(
        tmp_path / "rows.jsonl", [{"prompt": prompt, "chosen": said + "Welcome.", "rejected": said + "No."}]
    )
    data, _ = check_data(DataConfig(train=str(path), validation=None), tokenizer, keep_examples=False)
    assert [f["field"] for f in data.report["pii"]["found"]] == ["chosen"]
