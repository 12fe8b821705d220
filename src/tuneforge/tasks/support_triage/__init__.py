"""The demonstration task: triage of support tickets for the fictional "Nimbus Cloud".

A customer writes a ticket; the model answers with one line of JSON holding a category, a priority
and a product (the rules are in docs/demo-task.md). This module holds the task's definition, a
seeded data generator and the scorer; the generator's words live in `phrasings.json` beside it.

How tickets are made: each ticket starts as a structured `Intent` (category, product and the
facts that decide priority: production hit, data lost, no workaround, ...). Labels come from the
intent through `triage_labels`, which applies the written rules; the text is then rendered from
sentence templates that state exactly those facts. The generator only builds situations whose
labels the rules settle without doubt, e.g. billing and sign-in topics are never phrased as
how-to questions, and outages never come with a workaround.

`phrasings.json` holds the words: `subjects` (per product, what fills a template's {subject}
slot; all splits share them), `templates` (sentence pools with the slots {subject} / {Subject},
{since}, {other} / {Other}: another product's service, said to be fine; grouped as `core`, one a
ticket, `facts` that set the priority, `asides` that must not move the labels, and `framing`),
`train_only_templates` (more phrasings of the core and fact pools, so that training teaches the
concept behind a label rather than a few sentences; none reuses a held-out template's wording),
`since` and `terse_words` (how terse writers shorten words).

Every template pool is cut in two: every fourth template is held out for the test split, so the
test measures phrasings the model never trained on; validation shares train's templates.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from tuneforge.errors import TuneforgeError
from tuneforge.fsio import atomic_file
from tuneforge.tasks.metrics import json_fields, parse_json_object

SYSTEM_PROMPT = (
    "You are the triage assistant for Nimbus Cloud. Read the customer's ticket and answer with "
    'JSON only: {"category": ..., "priority": ..., "product": ...}.'
)

CATEGORIES = ("billing", "outage", "access", "bug", "feature_request", "how_to")
PRIORITIES = ("urgent", "high", "medium", "low")
PRODUCTS = ("compute", "storage", "database", "network", "console")
# The answer's keys, in the order the answer writes them.
FIELDS = ("category", "priority", "product")
LABELS = {"category": CATEGORIES, "priority": PRIORITIES, "product": PRODUCTS}

SPLITS = ("train", "validation", "test")
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
UNLABELLED_FILE = "unlabelled.jsonl"
# Every TEST_EVERY-th template of each pool (index % TEST_EVERY == TEST_EVERY - 1) is test-only.
TEST_EVERY = 4
MAX_SENTENCES = 5


@dataclass(frozen=True)
class Intent:
    """What a ticket is about and the facts that decide its priority."""

    category: str
    product: str
    production_affected: bool = False  # the outage hits production or the customer's own users
    data_lost: bool = False
    security_breach: bool = False  # leaked keys, someone else in the account
    blocked: bool = False  # no workaround: locked out, a broken feature needed now
    wrong_charge: bool = False  # double charge, charge after cancelling
    has_workaround: bool = False
    unexpected_amount: bool = False  # asks about an unexpected amount on a bill


def triage_priority(intent: Intent) -> str:
    """The priority rules of docs/demo-task.md, in order: the first rule that matches wins."""
    if (intent.category == "outage" and intent.production_affected) or intent.data_lost or intent.security_breach:
        return "urgent"
    if intent.blocked or intent.category == "outage" or intent.wrong_charge:
        return "high"
    if intent.has_workaround or intent.unexpected_amount:
        return "medium"
    return "low"


def triage_labels(intent: Intent) -> dict[str, str]:
    """The three labels of a ticket, keys in answer order."""
    return {"category": intent.category, "priority": triage_priority(intent), "product": intent.product}


def format_answer(labels: dict[str, str]) -> str:
    """The answer the model must give: one line of JSON, keys in answer order, as in docs/demo-task.md."""
    return json.dumps({field: labels[field] for field in FIELDS})


# ----------------------------------------------------------------------------------------------
# The generator


def _pools(table: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    return {name: tuple(phrases) for name, phrases in table.items()}


_PHRASINGS = json.loads(resources.files(__name__).joinpath("phrasings.json").read_text(encoding="utf-8"))
# Per table, product -> phrases. A product missing from a table has no such tickets (network products
# hold no data, so they lose none); a console ticket names no product, so its charge is for nothing named.
SUBJECTS = {table: _pools(by_product) for table, by_product in _PHRASINGS["subjects"].items()}
SINCE = tuple(_PHRASINGS["since"])
TEMPLATES = {pool: t for group in _PHRASINGS["templates"].values() for pool, t in _pools(group).items()}
TRAIN_ONLY_TEMPLATES = _pools(_PHRASINGS["train_only_templates"])
TERSE_WORDS: dict[str, str] = _PHRASINGS["terse_words"]


@dataclass(frozen=True)
class Scenario:
    """A kind of ticket: its intent facts, its core sentence pool, what fills the core sentence and
    which fact sentences it must (or may) carry."""

    name: str
    category: str
    core: str  # template pool of the core sentence
    subjects: dict[str, tuple[str, ...]]  # product -> fillers of {subject}; its keys are the products it can be about
    weight: int  # relative frequency, set so that no category or priority is rare
    facts: tuple[str, ...] = ()  # Intent flags set to True
    required: tuple[str, ...] = ()  # pools that state the facts: one sentence of each, always
    optional: tuple[str, ...] = ()  # pools of neutral context: one sentence of each, sometimes


# A production hit needs a product the customer's own service runs on, so not the dashboard.
_HOSTING = ("compute", "storage", "database", "network")
_HOSTED_SERVICES = {product: SUBJECTS["services"][product] for product in _HOSTING}

SCENARIOS = (
    Scenario(
        "outage_production",
        "outage",
        "outage",
        _HOSTED_SERVICES,
        3,
        facts=("production_affected",),
        required=("production_hit",),
        optional=("other_product_fine",),
    ),
    Scenario(
        "outage_unspecified",
        "outage",
        "outage",
        SUBJECTS["services"],
        2,
        optional=("not_production", "other_product_fine"),
    ),
    Scenario("billing_wrong_charge", "billing", "wrong_charge", SUBJECTS["billed_for"], 2, facts=("wrong_charge",)),
    Scenario(
        "billing_unexpected_amount",
        "billing",
        "unexpected_amount",
        SUBJECTS["billed_for"],
        2,
        facts=("unexpected_amount",),
    ),
    Scenario("billing_question", "billing", "billing_question", SUBJECTS["billed_for"], 1),
    Scenario("access_breach", "access", "breach", SUBJECTS["security_events"], 2, facts=("security_breach",)),
    Scenario(
        "access_locked_out",
        "access",
        "access_problem",
        SUBJECTS["access_problems"],
        2,
        facts=("blocked",),
        required=("locked_out",),
    ),
    Scenario(
        "access_workaround",
        "access",
        "access_problem",
        SUBJECTS["access_problems"],
        1,
        facts=("has_workaround",),
        required=("access_workaround",),
    ),
    Scenario(
        "bug_data_loss", "bug", "bug", SUBJECTS["data_loss_symptoms"], 1, facts=("data_lost",), optional=("data_gone",)
    ),
    Scenario("bug_blocking", "bug", "bug", SUBJECTS["bug_symptoms"], 1, facts=("blocked",), required=("blocked",)),
    Scenario(
        "bug_workaround", "bug", "bug", SUBJECTS["bug_symptoms"], 2, facts=("has_workaround",), required=("workaround",)
    ),
    Scenario("bug_cosmetic", "bug", "bug", SUBJECTS["cosmetic_symptoms"], 1, optional=("cosmetic_note",)),
    Scenario("feature_request", "feature_request", "feature", SUBJECTS["feature_wishes"], 4),
    Scenario("how_to", "how_to", "how_to", SUBJECTS["how_to_tasks"], 4),
)


class Tone(NamedTuple):
    """How often a tone is drawn (weight), the chances of each optional sentence, and how many fillers at most."""

    weight: int
    greeting: float
    tone_sentence: float
    aside: float
    closing: float
    fillers: int


TONES = {
    "plain": Tone(5, 0.3, 0.0, 0.3, 0.4, 0),
    "polite": Tone(4, 0.9, 0.8, 0.3, 0.9, 0),
    "angry": Tone(4, 0.1, 0.9, 0.3, 0.2, 0),
    "terse": Tone(4, 0.0, 0.0, 0.15, 0.0, 0),
    "rambling": Tone(3, 0.7, 0.0, 0.6, 0.7, 2),
}
TYPO_CHANCE = 0.35
# Context that only makes sense for a service the customer runs, not for the dashboard.
_NOT_FOR_CONSOLE = ("not_production", "other_product_fine")


def template_split(index: int) -> str:
    """The split a template belongs to, by its index in its pool."""
    return "test" if index % TEST_EVERY == TEST_EVERY - 1 else "train"


@functools.cache
def split_templates(split: str) -> dict[str, list[tuple[str, str]]]:
    """Pool name -> [(template id, template)] usable by `split` (validation uses train's). A
    training-only template's index continues its pool's, so every id names one template."""
    source = "test" if split == "test" else "train"
    pools = {
        pool: [(f"{pool}:{i}", t) for i, t in enumerate(templates) if template_split(i) == source]
        for pool, templates in TEMPLATES.items()
    }
    if source == "train":
        for pool, templates in TRAIN_ONLY_TEMPLATES.items():
            pools[pool] += [(f"{pool}:{len(TEMPLATES[pool]) + i}", t) for i, t in enumerate(templates)]
    return pools


@dataclass(frozen=True)
class Ticket:
    text: str
    intent: Intent
    labels: dict[str, str]
    templates: tuple[str, ...]  # ids ("pool:index") of the templates the text was rendered from
    tone: str
    sentences: int  # how many sentences, not counting a greeting


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_start(sentence: str) -> str:
    """Lower-case a sentence's first letter after a comma greeting, unless the word is 'I' or an
    acronym/name (which keep their capitals)."""
    first = sentence.split(" ", 1)[0]
    if first in ("I", "I'm", "I've", "I'd") or any(c.isupper() for c in first[1:]):
        return sentence
    return sentence[:1].lower() + sentence[1:]


def _sentence_count(piece: str) -> int:
    return max(1, len(re.findall(r"[.!?]+(?:\s|$)", piece)))


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:  # drop a letter
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # double a letter


def _add_typos(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    for i in rng.sample(candidates, min(len(candidates), rng.randint(1, 3))):
        words[i] = _typo(words[i], rng)
    return " ".join(words)


def _make_terse(text: str, rng: random.Random) -> str:
    text = text.lower()
    for long, short in TERSE_WORDS.items():
        text = re.sub(rf"\b{re.escape(long)}\b", short, text)
    text = re.sub(r"\bthe ", "", text)
    # Terse writers drop the last full stop and often run sentences together with a comma or dash.
    joint = rng.choice((". ", ", ", " - "))
    return re.sub(r"\.\s+", joint, text).removesuffix(".")


def _make_angry(pieces: list[str], rng: random.Random) -> list[str]:
    return [p[:-1] + rng.choice(("!", "!!", "!!!")) if p.endswith(".") and rng.random() < 0.6 else p for p in pieces]


def sample_ticket(rng: random.Random, split: str) -> Ticket:
    """Draw one ticket for `split`, rendered only from that split's templates."""
    pools = split_templates(split)
    scenario = rng.choices(SCENARIOS, weights=[s.weight for s in SCENARIOS])[0]
    product = rng.choice(list(scenario.subjects))
    intent = Intent(scenario.category, product, **{fact: True for fact in scenario.facts})
    subject = rng.choice(scenario.subjects[product])
    other = rng.choice([s for p in _HOSTING if p != product for s in _HOSTED_SERVICES[p]])
    slots = {
        "subject": subject,
        "Subject": _capitalise(subject),
        "since": rng.choice(SINCE),
        "other": other,
        "Other": _capitalise(other),
    }

    def render(pool: str) -> tuple[str, str]:
        template_id, template = rng.choice(pools[pool])
        return template_id, template.format(**slots)

    tone = rng.choices(list(TONES), weights=[t.weight for t in TONES.values()])[0]
    pieces, sentences = _compose(scenario, product, tone, render, pools["filler"], rng)
    template_ids = [template_id for template_id, _ in pieces]
    texts = [text for _, text in pieces]
    if tone == "angry":
        texts = _make_angry(texts, rng)
    if rng.random() < TONES[tone].greeting:
        greeting_id, greeting = render("greeting")
        template_ids.insert(0, greeting_id)
        texts[0] = f"{greeting} {_lower_start(texts[0]) if greeting.endswith(',') else texts[0]}"
    text = " ".join(texts)
    if tone == "terse":
        text = _make_terse(text, rng)
    if rng.random() < TYPO_CHANCE:
        text = _add_typos(text, rng)
    return Ticket(text, intent, triage_labels(intent), tuple(template_ids), tone, sentences)


def _compose(
    scenario: Scenario, product: str, tone: str, render, fillers: list[tuple[str, str]], rng: random.Random
) -> tuple[list[tuple[str, str]], int]:
    """(template id, sentence) in the order a ticket reads, and the sentence count: the core and
    the facts always, then extras in random order and a closing, up to MAX_SENTENCES."""
    chances = TONES[tone]
    pieces = [render(scenario.core)] + [render(pool) for pool in scenario.required]
    extras = [
        render(pool)
        for pool in scenario.optional
        if rng.random() < 0.4 and not (product == "console" and pool in _NOT_FOR_CONSOLE)
    ]
    if rng.random() < chances.aside:
        extras.append(render(f"aside_{scenario.category}"))
    if tone in ("polite", "angry") and rng.random() < chances.tone_sentence:
        extras.append(render(tone))
    if chances.fillers:
        extras += rng.sample(fillers, rng.randint(1, chances.fillers))  # fillers have no slots
    rng.shuffle(extras)
    closing = [render("closing")] if rng.random() < chances.closing else []
    sentences = sum(_sentence_count(text) for _, text in pieces)
    for piece in extras + closing:
        if sentences + _sentence_count(piece[1]) <= MAX_SENTENCES:
            pieces.append(piece)
            sentences += _sentence_count(piece[1])
    return pieces, sentences


def chat_example(ticket_text: str, labels: dict[str, str]) -> dict:
    """One training row in OpenAI chat format."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ticket_text},
            {"role": "assistant", "content": format_answer(labels)},
        ]
    }


def _draw_unique(rng: random.Random, split: str, n: int, seen: set[str]) -> list[Ticket]:
    """`n` tickets whose texts appear nowhere in `seen` (which they are added to), so no ticket
    repeats within or across splits."""
    tickets: list[Ticket] = []
    attempts = 0
    while len(tickets) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise TuneforgeError(
                f"could not draw {n} distinct {split} tickets after {attempts - 1} tries: the templates "
                f"give too few different texts; ask for fewer {split} tickets"
            )
        ticket = sample_ticket(rng, split)
        if ticket.text not in seen:
            seen.add(ticket.text)
            tickets.append(ticket)
    return tickets


def draw_unlabelled(seed: int, n: int, seen: set[str]) -> list[Ticket]:
    """The tickets `generate` writes without answers, with their labels: `seen` holds every split's
    ticket texts. For scoring a teacher's answers to them; training never reads these labels."""
    return _draw_unique(random.Random(f"support_triage/{seed}/unlabelled"), "train", n, seen)


def generate(
    out_dir, *, n_train: int = 4000, n_valid: int = 200, n_test: int = 300, n_unlabelled: int = 0, seed: int = 0
) -> dict[str, Path]:
    """Write train.jsonl, validation.jsonl and test.jsonl (OpenAI chat JSONL) into `out_dir`, and with
    `n_unlabelled` also unlabelled.jsonl: tickets in the training phrasings without their answers (the
    system prompt and the ticket), for a teacher to answer (`tuneforge distill generate`).

    The same seed gives byte-identical files. Each split draws from its own random stream, so the
    size of one split does not reshuffle another; the unlabelled tickets are drawn last, so asking
    for them leaves the other splits as they were. No ticket text appears twice across the files.
    """
    out_dir = Path(out_dir)
    sizes = {"train": n_train, "validation": n_valid, "test": n_test}
    seen: set[str] = set()
    paths = {}
    for split in SPLITS:
        rng = random.Random(f"support_triage/{seed}/{split}")
        tickets = _draw_unique(rng, split, sizes[split], seen)
        paths[split] = out_dir / SPLIT_FILES[split]
        with atomic_file(paths[split]) as f:
            for ticket in tickets:
                f.write(json.dumps(chat_example(ticket.text, ticket.labels), ensure_ascii=False) + "\n")
    if n_unlabelled:
        tickets = draw_unlabelled(seed, n_unlabelled, seen)
        paths["unlabelled"] = out_dir / UNLABELLED_FILE
        with atomic_file(paths["unlabelled"]) as f:
            for ticket in tickets:
                prompt = chat_example(ticket.text, ticket.labels)["messages"][:-1]
                f.write(json.dumps({"messages": prompt}, ensure_ascii=False) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------
# Scoring


def parse_answer(text: str) -> dict | None:
    """The answer's JSON object, or None when the whole answer (whitespace aside) is not one.

    A chatty answer with JSON inside is not valid: the task asks for JSON only (`score` reports
    such answers apart, as `contains_json`).
    """
    return parse_json_object(text)


def has_valid_labels(answer: dict | None) -> bool:
    """Exactly the three keys, each holding one of its labels."""
    return (
        answer is not None
        and set(answer) == set(FIELDS)
        and all(isinstance(answer[f], str) and answer[f] in LABELS[f] for f in FIELDS)
    )


def reference_fault(reference: str) -> str | None:
    """Why `reference` is no triage answer that `score` can score against, or None when it is one."""
    if has_valid_labels(parse_answer(reference)):
        return None
    labels = "; ".join(f"{field}: {', '.join(LABELS[field])}" for field in FIELDS)
    return f"is not a triage answer: a JSON object with exactly {', '.join(FIELDS)}, each one of its labels ({labels})"


def score(predictions: list[str], references: list[str]) -> dict:
    """Shares over all tickets: `valid_json` (the whole answer is a JSON object), `contains_json`
    (a JSON object somewhere in it), `valid_labels`, per-field accuracy and `exact` (all three)."""
    generic = json_fields(predictions, references)
    n = generic["n"]
    return {
        "n": n,
        "valid_json": generic["valid_json"],
        "contains_json": generic["contains_json"],
        "valid_labels": sum(has_valid_labels(parse_answer(p)) for p in predictions) / n,
        **{field: generic["fields"].get(field, 0.0) for field in FIELDS},
        "exact": generic["exact"],
    }
