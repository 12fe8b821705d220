"""The demonstration task (generator, labels, scorer), the generic metrics and the general sets."""

from __future__ import annotations

import collections
import hashlib
import json
import random
import re
import string

import pytest

from tuneforge.tasks import support_triage as st
from tuneforge.tasks.general import (
    SOURCES,
    general_conversations,
    general_prompts,
    general_questions,
    general_text,
    replay_prompts,
)
from tuneforge.tasks.metrics import (
    METRICS,
    contains,
    exact,
    find_json_object,
    holds_answer,
    json_fields,
    normalize_text,
)
from tuneforge.tasks.support_triage import Intent


@pytest.fixture(scope="module")
def default_splits(tmp_path_factory):
    """The splits as the quickstart makes them: default sizes, seed 0."""
    paths = st.generate(tmp_path_factory.mktemp("triage"))
    return {split: [json.loads(line) for line in path.read_text().splitlines()] for split, path in paths.items()}


def _answer(row: dict) -> dict:
    return json.loads(row["messages"][2]["content"])


# --- generator ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    sizes = dict(n_train=300, n_valid=40, n_test=60)
    first = st.generate(tmp_path / "a", seed=3, **sizes)
    second = st.generate(tmp_path / "b", seed=3, **sizes)
    other = st.generate(tmp_path / "c", seed=4, **sizes)
    assert set(first) == {"train", "validation", "test"}
    for split in first:
        assert first[split].name == st.SPLIT_FILES[split]
        assert first[split].read_bytes() == second[split].read_bytes()
        assert first[split].read_bytes() != other[split].read_bytes()
    assert not list((tmp_path / "a").glob(".tmp-*"))  # atomic writes left no temporary files


def test_unlabelled_tickets_are_prompts_no_split_holds_and_leave_the_splits_as_they_were(tmp_path):
    sizes = dict(n_train=300, n_valid=40, n_test=60, seed=3)
    plain = st.generate(tmp_path / "plain", **sizes)
    paths = st.generate(tmp_path / "with", n_unlabelled=50, **sizes)
    again = st.generate(tmp_path / "again", n_unlabelled=50, **sizes)
    assert set(paths) == {"train", "validation", "test", "unlabelled"} and "unlabelled" not in plain
    for split in plain:
        assert paths[split].read_bytes() == plain[split].read_bytes()
    assert paths["unlabelled"].read_bytes() == again["unlabelled"].read_bytes()
    rows = [json.loads(line) for line in paths["unlabelled"].read_text().splitlines()]
    assert len(rows) == 50
    assert all([m["role"] for m in row["messages"]] == ["system", "user"] for row in rows)
    tickets = {row["messages"][1]["content"] for row in rows}
    labelled = {json.loads(line)["messages"][1]["content"] for path in plain.values() for line in path.open()}
    assert len(tickets) == 50 and not tickets & labelled
    # The same draw again, with the labels the file leaves out (what a teacher's answers are scored against).
    drawn = st.draw_unlabelled(3, 50, set(labelled))
    assert [t.text for t in drawn] == [row["messages"][1]["content"] for row in rows]
    assert all(st.has_valid_labels(json.loads(st.format_answer(t.labels))) for t in drawn)


# sha256 of the files `generate` wrote for these arguments when the phrasings moved into phrasings.json; the first
# are the quickstart's. A change to the generator or its phrasings that moves any byte fails here: it changes the
# quickstart's data and so its recorded results, so update the digests only on purpose (docs/LOG.md says why).
GOLDEN_DIGESTS = {
    (2000, 48, 300, 0): {
        "train": "b30a84ab7be63cb039959085517dfda97f6ad90ec1d195a4f68916d6be9493d4",
        "validation": "cb18a9f40ecb54ed46eae00b9bdacfd907681270bb125ae4d1754613f64287bf",
        "test": "cbdd452bb0619ae598cc248d1f20689f00351e66cda2835f61663e241b2ac23f",
    },
    (300, 20, 50, 1): {
        "train": "b0691ad2fc57c27dd633a4a4e6704bd7c54f1adaff3939bdc43783e2c222d19f",
        "validation": "a1bca7645b7534046e481959e100a0d90f89c2d81040c7000a08106df9006bec",
        "test": "1efbc133bf5b2f83e7e43136628cfe181435d1ee488a02f353d878beb865189e",
    },
    (64, 8, 120, 12345): {
        "train": "0987c575275bbbfa61cbeeb9c1a4cbdfa750df0ea31546203e1060c9c4921ec6",
        "validation": "8421c938da9c668dc1f585c5c2217fe7dbf10af0554dc6114dfdd6bb9046d664",
        "test": "09ae46e1b26ed333f4c89165be4b0b9a9864ee791a546e734532b41f3a625e41",
    },
}


@pytest.mark.parametrize("sizes", list(GOLDEN_DIGESTS), ids=lambda s: "train{}-valid{}-test{}-seed{}".format(*s))
def test_generator_writes_the_pinned_bytes(tmp_path, sizes):
    n_train, n_valid, n_test, seed = sizes
    paths = st.generate(tmp_path, n_train=n_train, n_valid=n_valid, n_test=n_test, seed=seed)
    digests = {split: hashlib.sha256(path.read_bytes()).hexdigest() for split, path in paths.items()}
    assert digests == GOLDEN_DIGESTS[sizes]


def test_phrasings_file_fills_every_pool_the_scenarios_name_with_known_slots():
    pools = {s.core for s in st.SCENARIOS} | {p for s in st.SCENARIOS for p in s.required + s.optional}
    pools |= {f"aside_{category}" for category in st.CATEGORIES} | {"greeting", "closing", "polite", "angry", "filler"}
    assert pools <= set(st.TEMPLATES)
    assert set(st.TRAIN_ONLY_TEMPLATES) <= set(st.TEMPLATES)
    slots = {"subject", "Subject", "since", "other", "Other"}
    for pool, templates in [*st.TEMPLATES.items(), *st.TRAIN_ONLY_TEMPLATES.items()]:
        for template in templates:
            used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            assert used <= (set() if pool == "filler" else slots), (pool, template)
    for table in st.SUBJECTS.values():
        assert set(table) <= set(st.PRODUCTS) and all(table.values())


def test_splits_are_openai_chat_jsonl_with_valid_one_line_answers(default_splits):
    sizes = {"train": 4000, "validation": 200, "test": 300}
    texts = []
    for split, rows in default_splits.items():
        assert len(rows) == sizes[split]
        for row in rows:
            assert list(row) == ["messages"]
            system, user, assistant = row["messages"]
            assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
            assert system["content"] == st.SYSTEM_PROMPT
            assert user["content"].strip() == user["content"] and user["content"]
            assert "\n" not in assistant["content"]
            answer = st.parse_answer(assistant["content"])
            assert list(answer) == list(st.FIELDS)
            assert st.has_valid_labels(answer)
            assert assistant["content"] == st.format_answer(answer)
            texts.append(user["content"])
    assert len(set(texts)) == len(texts), "a ticket repeats within or across splits"


def test_system_prompt_is_the_one_in_the_task_description():
    assert st.SYSTEM_PROMPT == (
        "You are the triage assistant for Nimbus Cloud. Read the customer's ticket and answer with JSON only: "
        '{"category": ..., "priority": ..., "product": ...}.'
    )


def test_test_split_uses_only_templates_train_never_saw():
    rng = random.Random(0)
    used = {split: set() for split in st.SPLITS}
    for split in st.SPLITS:
        for _ in range(3000):
            used[split].update(st.sample_ticket(rng, split).templates)
    assert used["train"].isdisjoint(used["test"])
    assert used["validation"] <= {tid for pool in st.split_templates("train").values() for tid, _ in pool}
    # Whole templates are held out, in every pool, and the test really draws on them.
    for pool in st.TEMPLATES:
        assert st.split_templates("train")[pool] and st.split_templates("test")[pool], pool
    test_pools = {tid.split(":")[0] for tid in used["test"]}
    assert {s.core for s in st.SCENARIOS} <= test_pools


def test_held_out_sentences_do_not_appear_in_train_file(default_splits):
    train_text = "\n".join(row["messages"][1]["content"] for row in default_splits["train"])
    for pool, templates in st.split_templates("test").items():
        for _, template in templates:
            # No fixed run of words of a held-out template (between its slots) occurs in train,
            # training-only phrasings included.
            for fixed in re.split(r"\{\w+\}", template):
                fixed = fixed.strip(" ,.?!:")
                if len(fixed) > 12:
                    assert fixed not in train_text, (pool, template)


@pytest.mark.parametrize(
    "intent, expected",
    [
        (Intent("outage", "database", production_affected=True), ("outage", "urgent", "database")),
        (Intent("billing", "console", wrong_charge=True), ("billing", "high", "console")),
        (Intent("how_to", "compute"), ("how_to", "low", "compute")),
        (Intent("outage", "network"), ("outage", "high", "network")),  # outage not said to hit production
        (Intent("access", "console", security_breach=True), ("access", "urgent", "console")),
        (Intent("access", "database", blocked=True), ("access", "high", "database")),
        (Intent("access", "storage", has_workaround=True), ("access", "medium", "storage")),
        (Intent("bug", "storage", data_lost=True), ("bug", "urgent", "storage")),
        (Intent("bug", "database", blocked=True), ("bug", "high", "database")),
        (Intent("bug", "compute", has_workaround=True), ("bug", "medium", "compute")),
        (Intent("bug", "console"), ("bug", "low", "console")),  # cosmetic
        (Intent("billing", "database", unexpected_amount=True), ("billing", "medium", "database")),
        (Intent("billing", "console"), ("billing", "low", "console")),  # a general question on prices
        (Intent("feature_request", "network"), ("feature_request", "low", "network")),
        # first matching rule wins
        (Intent("bug", "storage", data_lost=True, has_workaround=True), ("bug", "urgent", "storage")),
        (Intent("outage", "compute", has_workaround=True), ("outage", "high", "compute")),
        (Intent("billing", "compute", wrong_charge=True, unexpected_amount=True), ("billing", "high", "compute")),
        # rule 1 counts production only for an outage
        (Intent("bug", "compute", production_affected=True, has_workaround=True), ("bug", "medium", "compute")),
    ],
)
def test_labels_follow_the_written_rules(intent, expected):
    labels = st.triage_labels(intent)
    assert list(labels) == list(st.FIELDS)
    assert tuple(labels.values()) == expected


def test_rendered_text_states_exactly_the_facts_that_set_priority():
    rng = random.Random(1)
    for split in ("train", "test"):
        for _ in range(2000):
            ticket = st.sample_ticket(rng, split)
            pools = {tid.split(":")[0] for tid in ticket.templates}
            intent = ticket.intent
            assert ("production_hit" in pools) == intent.production_affected
            assert bool(pools & {"blocked", "locked_out"}) == intent.blocked
            assert bool(pools & {"workaround", "access_workaround"}) == intent.has_workaround
            assert ("breach" in pools) == intent.security_breach
            assert ("wrong_charge" in pools) == intent.wrong_charge
            assert ("unexpected_amount" in pools) == intent.unexpected_amount
            if "not_production" in pools:
                assert ticket.labels["priority"] == "high"
            if intent.product == "console":  # a console ticket names no other product
                assert "other_product_fine" not in pools


def test_tickets_vary_in_tone_length_and_typos():
    rng = random.Random(2)
    tickets = [st.sample_ticket(rng, "train") for _ in range(2000)]
    assert {t.tone for t in tickets} == set(st.TONES)
    assert {t.sentences for t in tickets} == {1, 2, 3, 4, 5}
    assert len({t.text for t in tickets}) > 0.98 * len(tickets)
    # A typo makes a word that no template or subject phrase has; about a third of tickets get some.
    phrases = [
        *st.SINCE,
        *(t for split in ("train", "test") for pool in st.split_templates(split).values() for _, t in pool),
    ]
    phrases += [phrase for table in st.SUBJECTS.values() for pool in table.values() for phrase in pool]
    vocabulary = set(re.findall(r"[a-z]+", " ".join(phrases).lower()))
    with_typos = sum(bool(set(re.findall(r"[a-z]{4,}", t.text.lower())) - vocabulary) for t in tickets)
    assert 0.25 < with_typos / len(tickets) < 0.45


def test_no_label_is_rare_in_train(default_splits):
    rows = default_splits["train"]
    for field, labels in st.LABELS.items():
        counts = collections.Counter(_answer(row)[field] for row in rows)
        assert set(counts) == set(labels), field
        for label in labels:
            assert counts[label] / len(rows) >= 0.05, (field, label, counts[label])


def test_test_split_covers_every_label(default_splits):
    for field, labels in st.LABELS.items():
        assert {_answer(row)[field] for row in default_splits["test"]} == set(labels)


# --- task scoring ------------------------------------------------------------------------------

REF = st.format_answer({"category": "outage", "priority": "urgent", "product": "database"})


def test_parse_answer_accepts_only_a_whole_json_object():
    assert st.parse_answer(f"  {REF}\n") == {"category": "outage", "priority": "urgent", "product": "database"}
    assert st.parse_answer(f"Sure! {REF}") is None
    assert st.parse_answer('{"category": "outage",') is None
    assert st.parse_answer('["outage", "urgent", "database"]') is None
    assert st.parse_answer("") is None


def test_score_on_hand_made_answers():
    predictions = [
        REF,  # right
        f"\n {REF} \n",  # right, whitespace around
        '{"category": "outage", "priority": "high", "product": "database"}',  # wrong priority
        f"Here is the triage: {REF} Hope this helps!",  # chatty: not valid, but contains JSON
        '{"category": "outage", "priority": "urgent", "product": "database"',  # malformed
        '{"type": "outage", "priority": "urgent", "product": "database"}',  # wrong key
        '{"category": "outages", "priority": "urgent", "product": "database"}',  # unknown label
        '{"category": "outage", "priority": "urgent", "product": "database", "note": "x"}',  # extra key
    ]
    result = st.score(predictions, [REF] * len(predictions))
    assert result == {
        "n": 8,
        "valid_json": 6 / 8,
        "contains_json": 7 / 8,
        "valid_labels": 3 / 8,
        "category": 4 / 8,
        "priority": 5 / 8,
        "product": 6 / 8,
        "exact": 3 / 8,  # the extra key does not spoil the three fields; it does spoil valid_labels
    }
    assert METRICS["support_triage"].score(predictions, [REF] * 8) == result


def test_score_perfect_and_empty_answers():
    perfect = st.score([REF, REF], [REF, REF])
    assert all(perfect[k] == 1.0 for k in perfect if k != "n")
    nothing = st.score(["", "I don't know."], [REF, REF])
    assert all(nothing[k] == 0.0 for k in nothing if k != "n")


# --- generic metrics ---------------------------------------------------------------------------


def test_exact_strips_outer_whitespace_only():
    assert exact([" Paris\n", "paris", "Paris."], ["Paris", "Paris", "Paris"]) == {"n": 3, "exact": 1 / 3}


def test_contains_is_case_insensitive_word_bounded_and_takes_answer_lists():
    predictions = ["The capital is PARIS.", "It has 18 legs.", "Eight legs, of course", "a hundred", "mice!"]
    references = ["Paris", ["8", "eight"], ["8", "eight"], "red", ["mice"]]
    assert contains(predictions, references) == {"n": 5, "contains": 3 / 5}
    assert [holds_answer(p, r) for p, r in zip(predictions, references)] == [True, False, True, False, True]
    assert normalize_text("  Twenty-Five,  (25)! ") == "twenty five 25"


def test_json_fields_compares_values_as_json_does():
    # Python has True == 1; JSON's true is no number. 1 and 1.0 are one number; nested values count too.
    references = ['{"urgent": 1, "n": 2}', '{"urgent": true, "tags": [true, 3]}']
    predictions = ['{"urgent": true, "n": 2.0}', '{"urgent": true, "tags": [1, 3]}']
    assert json_fields(predictions, references)["fields"] == {"urgent": 1 / 2, "n": 1.0, "tags": 0.0}


def test_json_fields_on_arbitrary_keys():
    references = ['{"name": "Ada", "year": 1815}', '{"name": "Alan", "year": 1912}', '{"name": "Grace"}']
    predictions = [
        '{"name": "Ada", "year": 1815, "extra": true}',  # extra keys are allowed
        'name: Alan, {"name": "Alan", "year": 1912}',  # chatty
        '{"name": "grace"}',  # case matters
    ]
    result = json_fields(predictions, references)
    assert result == {
        "n": 3,
        "valid_json": 2 / 3,
        "contains_json": 1.0,
        "exact": 1 / 3,
        "fields": {"name": 1 / 3, "year": 1 / 2},
    }
    assert find_json_object("no json here {oops}") is None
    assert find_json_object('a {"b": {"c": 1}} d') == {"b": {"c": 1}}


def test_metrics_reject_mismatched_or_bad_input():
    with pytest.raises(ValueError, match="references"):
        exact(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        contains([], [])
    with pytest.raises(ValueError, match="reference 0"):
        json_fields(["{}"], ["not json"])


def test_metrics_registry():
    assert set(METRICS) == {"exact", "contains", "json_fields", "support_triage"}
    for name, metric in METRICS.items():
        reference = REF
        result = metric.score([reference], [reference])
        assert result["n"] == 1, name
        assert result[metric.headline] == 1, name  # the share that says an answer is right is in its result
        assert metric.reference_fault(reference) is None, name


# --- general sets ------------------------------------------------------------------------------


def test_general_questions():
    questions = general_questions()
    assert len(questions) >= 160
    assert len({q["question"] for q in questions}) == len(questions)
    for q in questions:
        assert set(q) == {"question", "answers"}
        assert q["question"].endswith("?")
        assert q["answers"] and all(isinstance(a, str) and a.strip() for a in q["answers"])
        # Echoing the question must not count as a right answer.
        assert contains([q["question"]], [q["answers"]])["contains"] == 0.0, q["question"]


def test_general_text_prompts_and_conversations():
    texts, prompts, conversations = general_text(), general_prompts(), general_conversations()
    assert len(texts) >= 50 and len(set(texts)) == len(texts)
    assert all(len(t.split()) >= 20 for t in texts)
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
    assert all(p.strip() == p and p for p in prompts)
    assert len(conversations) == 100
    for messages in conversations:
        assert len(messages) >= 6
        assert [m["role"] for m in messages] == [("user", "assistant")[i % 2] for i in range(len(messages))]
        assert all(m["content"].strip() for m in messages)
    # Nothing of the triage task leaks into the general sets.
    assert not any("Nimbus" in t for t in texts + prompts)


def test_replay_prompts_are_disjoint_from_every_forgetting_measure():
    replay = replay_prompts()
    assert len(replay) == 200 and len({p.lower() for p in replay}) == len(replay)
    measured = {q["question"].lower() for q in general_questions()} | {p.lower() for p in general_prompts()}
    assert not {p.lower() for p in replay} & measured
    texts = " ".join(general_text()).lower()
    assert not [p for p in replay if p.lower() in texts]
    # Nothing of the triage task: replay must not teach the task's domain either.
    task_words = ("ticket", "billing", "invoice", "server", "database", "password", "dns", "outage", "json", "cloud")
    assert not [p for p in replay if any(w in p.lower() for w in task_words)]


def test_general_sources_name_their_files_and_licences():
    from importlib import resources

    folder = resources.files("tuneforge.tasks.general")
    assert set(SOURCES) == {"questions", "text", "prompts", "replay_prompts", "chitchat"}
    for source in SOURCES.values():
        assert folder.joinpath(source["file"]).is_file()
        assert source["licence"] and source["description"]
    assert "MIT License" in folder.joinpath("chitchat-LICENSE.txt").read_text()


@pytest.mark.parametrize(
    ("read", "file", "damage"),
    [
        (general_questions, "questions.jsonl", b'{"question": "What is'),
        (general_questions, "questions.jsonl", b'{"question": "Hi?", "answers": "hello"}\n'),
        (general_text, "text.jsonl", b"\xff\n"),
        (general_prompts, "prompts.jsonl", b"[1]\n"),
        (general_conversations, "chitchat.jsonl", b'{"messages": 3}\n'),
        (general_questions, "questions.jsonl", None),
    ],
)
def test_a_damaged_bundled_general_set_is_refused_as_a_damaged_install(tmp_path, monkeypatch, read, file, damage):
    from types import SimpleNamespace

    from tuneforge.errors import TuneforgeError
    from tuneforge.tasks import general

    monkeypatch.setattr(general, "resources", SimpleNamespace(files=lambda package: tmp_path))
    if damage is not None:
        (tmp_path / file).write_bytes(damage)
    with pytest.raises(TuneforgeError) as refused:
        read()
    assert refused.value.code == "damaged_install"
    assert refused.value.message.startswith(f"{tmp_path / file}: ") and "reinstall tuneforge" in refused.value.message
    # `pip install -e .` from a clone reads the clone's file: git restores it, a reinstall would replace the clone's.
    assert f"from a clone: git -C {tmp_path} checkout -- {file})" in refused.value.message
