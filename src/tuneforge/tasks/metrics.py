"""Metrics over generated text.

Every metric is `score(predictions, references) -> dict`: two lists of the same length, one
reference per prediction; the dict holds `n` and shares in [0, 1]. `METRICS` maps the names that
`eval.task` accepts to a `Metric`: the function, the share that says an answer is right, what it counts and
why it cannot score against a reference answer (one that is no JSON object, for `json_fields`);
`split_reasoning(text)` parts a reasoning model's reply into its reasoning and the answer scored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_JSON = json.JSONDecoder()


def _check_lengths(predictions: Sequence, references: Sequence) -> int:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; give one reference per prediction"
        )
    if not predictions:
        raise ValueError("nothing to score: predictions and references are empty")
    return len(predictions)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a reasoning model's reply: the reasoning is what comes before the last
    `</think>` (its `<think>` may be the template's, in the prompt, as DeepSeek-R1's writes it), the
    answer what follows it. A reply that opens `<think>` and never closes it stopped while reasoning:
    all reasoning, no answer. Other text is all answer."""
    head, close, answer = text.rpartition(THINK_CLOSE)
    if close:
        return head.strip().removeprefix(THINK_OPEN).strip(), answer.strip()
    if text.lstrip().startswith(THINK_OPEN):
        return text.lstrip().removeprefix(THINK_OPEN).strip(), ""
    return None, text


def normalize_text(text: str) -> str:
    """Lower case, every run of characters other than letters and digits made one space."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def parse_json_object(text: str) -> dict | None:
    """The JSON object that the whole text is (surrounding whitespace allowed), else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def same_json_value(a, b) -> bool:
    """Equality of two parsed JSON values as JSON has it: `true` is not `1` (Python's bool is an int,
    so `True == 1`), while `1` and `1.0` are the same number; objects and arrays compare value by value."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json_value(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same_json_value, a, b))
    return a == b


def find_json_object(text: str) -> dict | None:
    """The first JSON object found anywhere in the text (say, inside a chatty answer), else None."""
    for match in re.finditer(r"\{", text):
        try:
            value, _ = _JSON.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def exact(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Share of predictions equal to their reference once both are stripped of outer whitespace."""
    n = _check_lengths(predictions, references)
    return {"n": n, "exact": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n}


def contains(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """Share of predictions that contain their reference, case-insensitively.

    A reference may be a list of accepted answers (any one counts). Both sides are normalised
    (`normalize_text`) and matched on word boundaries, so "8" is found in "It has 8 legs." but
    not in "18", and "red" not in "hundred".
    """
    n = _check_lengths(predictions, references)
    return {"n": n, "contains": sum(holds_answer(p, r) for p, r in zip(predictions, references)) / n}


def holds_answer(prediction: str, reference: str | Sequence[str]) -> bool:
    """Whether one prediction contains its reference (or one of its accepted answers), as `contains` counts it."""
    accepted = [reference] if isinstance(reference, str) else reference
    haystack = f" {normalize_text(prediction)} "
    return any(f" {normalize_text(a)} " in haystack for a in accepted if normalize_text(a))


def json_fields(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Answers that must be a JSON object, compared with a reference JSON object field by field.

    Returns `valid_json` (the whole answer is a JSON object), `contains_json` (a JSON object
    appears somewhere in it), `exact` (valid and every reference field matches; extra keys are
    not counted against it) and `fields`: per reference key, the share of answers that are valid
    JSON and hold the reference's value under that key.
    """
    n = _check_lengths(predictions, references)
    parsed_references = []
    for i, reference in enumerate(references):
        parsed = parse_json_object(reference)
        if parsed is None:
            raise ValueError(f"reference {i} is not a JSON object: {reference!r}")
        parsed_references.append(parsed)
    answers = [parse_json_object(p) for p in predictions]

    field_hits: dict[str, int] = {}
    field_counts: dict[str, int] = {}
    all_match = 0
    for answer, reference in zip(answers, parsed_references):
        matches = {
            key: answer is not None and key in answer and same_json_value(answer[key], value)
            for key, value in reference.items()
        }
        for key, matched in matches.items():
            field_counts[key] = field_counts.get(key, 0) + 1
            field_hits[key] = field_hits.get(key, 0) + matched
        all_match += answer is not None and all(matches.values())
    return {
        "n": n,
        "valid_json": sum(a is not None for a in answers) / n,
        "contains_json": sum(find_json_object(p) is not None for p in predictions) / n,
        "exact": all_match / n,
        "fields": {key: field_hits[key] / field_counts[key] for key in field_counts},
    }


def _support_triage(predictions: Sequence[str], references: Sequence[str]) -> dict:
    # Imported on use: support_triage builds on this module, so a top-level import would be circular.
    from tuneforge.tasks.support_triage import score

    return score(predictions, references)


def _contains_fault(reference: str) -> str | None:
    return None if normalize_text(reference) else "holds no letter or digit, so no answer can contain it"


def _json_fields_fault(reference: str) -> str | None:
    return None if parse_json_object(reference) is not None else "is not a JSON object"


def _support_triage_fault(reference: str) -> str | None:
    from tuneforge.tasks.support_triage import reference_fault as triage_fault

    return triage_fault(reference)


def _any_reference(reference: str) -> None:
    return None


@dataclass(frozen=True)
class Metric:
    """A metric `eval.task` names: `score(predictions, references) -> dict`; `headline`, the key of that dict that
    says whether one answer is right (a sample's `correct`), and `said`, what it counts (the eval table's caption
    writes it after the headline's name);
    `reference_fault(reference)`, why it cannot score answers against a reference, or None when it can."""

    score: Callable[[Sequence, Sequence], dict]
    headline: str
    said: str
    reference_fault: Callable[[str], str | None] = _any_reference


_EXACT_SAID = "the whole answer right (every field, for JSON answers)"
METRICS: dict[str, Metric] = {
    "exact": Metric(exact, "exact", _EXACT_SAID),
    "contains": Metric(
        contains,
        "contains",
        "the answer holds the reference as whole words, case and punctuation aside",
        _contains_fault,
    ),
    "json_fields": Metric(json_fields, "exact", _EXACT_SAID, _json_fields_fault),
    "support_triage": Metric(_support_triage, "exact", _EXACT_SAID, _support_triage_fault),
}
