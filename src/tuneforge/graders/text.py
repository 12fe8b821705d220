"""Graders that compare an output's text with a reference: string_check, text_similarity, json_fields.

    build_grader({"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
                  "reference": "{{ item.answer }}", "operation": "eq"})        # 1.0 or 0.0
    build_grader({"type": "text_similarity", "name": "close", "input": "{{ sample.output_text }}",
                  "reference": "{{ item.answer }}", "evaluation_metric": "rouge_l"})   # in [0, 1]
    build_grader({"type": "json_fields", "name": "fields", "input": "{{ sample.output_text }}",
                  "reference": "{{ item.reference }}", "fields": ["label", "priority"]})

string_check: eq, ne, like (the input contains the reference), ilike (the same, ignoring case).

text_similarity metrics, each in [0, 1]:
- fuzzy_match: the normalised Indel similarity of the two texts, 1 - (insertions + deletions) /
  (len(a) + len(b)) = 2 LCS / (len(a) + len(b)), case-sensitive: what rapidfuzz's `fuzz.ratio`
  gives (divided by 100), computed here with a bit-parallel LCS.
- bleu: sentence BLEU-4 with the brevity penalty, smoothed as Lin and Och's BLEU+1 (one is added to
  the matches and the count of 2-, 3- and 4-grams), so a short answer without a matching 4-gram
  still scores by its other n-grams. 0 when no word matches.
- gleu: Google-BLEU (Wu et al. 2016): matching 1- to 4-grams over the output's n-grams and over the
  reference's, the smaller of the two.
- rouge_1 ... rouge_5: F1 of the matching n-grams; rouge_l: F1 of the longest common subsequence of words.
Word metrics read words as runs of letters and digits, lower-cased (punctuation is not a word).
cosine (needs an embedding model) and meteor (needs WordNet's synonyms) are refused.

json_fields (tuneforge's own, for structured outputs): the share of the fields whose value in the
output, parsed as a JSON object, equals the reference's; 0 when the output is not a JSON object.
"""

from __future__ import annotations

import math
import re
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence

from ..tasks.metrics import same_json_value
from .base import Grader, GraderError, checked_score, grading_failed, parse_output_json, spec_choice, spec_text
from .templates import Template

STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
BLEU_ORDER = 4
_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (characters or words).

    Bit-parallel (Allison and Dix; Crochemore et al.): bit i of `row` is set while a[i] is not yet
    matched, and each element of `b` updates all of `a` at once with integer arithmetic, so long
    texts cost len(b) big-integer steps instead of len(a) * len(b) Python ones.
    """
    if not a or not b:
        return 0
    positions: dict = {}
    for i, element in enumerate(a):
        positions[element] = positions.get(element, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for element in b:
        matched = row & positions.get(element, 0)
        row = ((row + matched) | (row - matched)) & full
    return len(a) - row.bit_count()


def fuzzy_match(output: str, reference: str) -> float:
    if not output and not reference:
        return 1.0
    return 2 * lcs_length(output, reference) / (len(output) + len(reference))


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _overlap(output: Counter, reference: Counter) -> int:
    return sum((output & reference).values())


def _f1(matches: int, output_count: int, reference_count: int) -> float:
    if matches == 0:
        return 0.0
    precision, recall = matches / output_count, matches / reference_count
    return 2 * precision * recall / (precision + recall)


def bleu(output: str, reference: str) -> float:
    out, ref = _words(output), _words(reference)
    if not out or not ref:
        return 0.0
    log_precisions = []
    for n in range(1, BLEU_ORDER + 1):
        matches = _overlap(_ngrams(out, n), _ngrams(ref, n))
        count = max(len(out) - n + 1, 0)
        if n == 1 and matches == 0:
            return 0.0
        smoothing = 0 if n == 1 else 1
        log_precisions.append(math.log((matches + smoothing) / (count + smoothing)))
    brevity = 1.0 if len(out) > len(ref) else math.exp(1 - len(ref) / len(out))
    return brevity * math.exp(sum(log_precisions) / BLEU_ORDER)


def gleu(output: str, reference: str) -> float:
    out, ref = _words(output), _words(reference)
    out_grams = sum((_ngrams(out, n) for n in range(1, BLEU_ORDER + 1)), Counter())
    ref_grams = sum((_ngrams(ref, n) for n in range(1, BLEU_ORDER + 1)), Counter())
    if not out_grams or not ref_grams:
        return 0.0
    matches = _overlap(out_grams, ref_grams)
    return min(matches / out_grams.total(), matches / ref_grams.total())


def rouge_n(n: int) -> Callable[[str, str], float]:
    def rouge(output: str, reference: str) -> float:
        out, ref = _ngrams(_words(output), n), _ngrams(_words(reference), n)
        return _f1(_overlap(out, ref), out.total(), ref.total())

    return rouge


def rouge_l(output: str, reference: str) -> float:
    out, ref = _words(output), _words(reference)
    return _f1(lcs_length(out, ref), len(out), len(ref))


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    **{f"rouge_{n}": rouge_n(n) for n in range(1, 6)},
    "rouge_l": rouge_l,
}
REFUSED_METRICS = {"cosine": "it needs an embedding model", "meteor": "it needs WordNet's synonyms and a stemmer"}


class _ComparesToReference(Grader):
    """A grader with an `input` and a `reference` template."""

    keys = ("input", "reference")

    def __init__(self, spec: dict, name: str, label: str):
        super().__init__(name, label)
        self.input = Template(spec_text(spec, "input", label), label=label, field="input")
        self.reference = Template(spec_text(spec, "reference", label), label=label, field="reference")

    def templates(self) -> list[Template]:
        return [self.input, self.reference]

    def reference_texts(self, samples: Sequence[dict], items: Sequence[dict]) -> list[str]:
        return [self.reference.render(samples, items, index) for index in range(len(items))]

    def _grade(self, samples: Sequence[dict], items: Sequence[dict]) -> list[float]:
        scores = (self._score(samples, items, index) for index in range(len(samples)))
        return [checked_score(score, self.label, samples, index) for index, score in enumerate(scores)]

    @abstractmethod
    def _score(self, samples: Sequence[dict], items: Sequence[dict], index: int) -> float:
        """The score of sample `index` against its item."""


class StringCheckGrader(_ComparesToReference):
    type = "string_check"
    keys = ("input", "reference", "operation")

    def __init__(self, spec: dict, name: str, label: str):
        super().__init__(spec, name, label)
        self.operation = spec_choice(spec, "operation", STRING_OPERATIONS, label)

    def _score(self, samples: Sequence[dict], items: Sequence[dict], index: int) -> float:
        text = self.input.render(samples, items, index)
        reference = self.reference.render(samples, items, index)
        if self.operation == "ilike":
            text, reference = text.lower(), reference.lower()
        if self.operation == "eq":
            return float(text == reference)
        if self.operation == "ne":
            return float(text != reference)
        return float(reference in text)


class TextSimilarityGrader(_ComparesToReference):
    type = "text_similarity"
    keys = ("input", "reference", "evaluation_metric")

    def __init__(self, spec: dict, name: str, label: str):
        super().__init__(spec, name, label)
        metric = spec.get("evaluation_metric")
        if isinstance(metric, str) and metric in REFUSED_METRICS:  # a list or object is no name (nor a key)
            raise GraderError(
                f"grader {label}: evaluation_metric {metric} is not supported here: {REFUSED_METRICS[metric]}. "
                f"Use one of {', '.join(METRICS)}, or a python grader"
            )
        self.metric = METRICS[spec_choice(spec, "evaluation_metric", tuple(METRICS), label)]

    def _score(self, samples: Sequence[dict], items: Sequence[dict], index: int) -> float:
        return self.metric(self.input.render(samples, items, index), self.reference.render(samples, items, index))


def _json_object(value) -> dict | None:
    """A template's value as a JSON object: a dict as it is, a string parsed, anything else None."""
    if isinstance(value, str):
        return parse_output_json(value)
    return value if isinstance(value, dict) else None


class JsonFieldsGrader(_ComparesToReference):
    type = "json_fields"
    keys = ("input", "reference", "fields")

    def __init__(self, spec: dict, name: str, label: str):
        super().__init__(spec, name, label)
        fields = spec.get("fields")
        if fields is not None and (
            not isinstance(fields, list) or not fields or not all(isinstance(f, str) and f for f in fields)
        ):
            raise GraderError(f"grader {label}: `fields` must be a non-empty list of field names, got {fields!r:.100}")
        self.fields = fields

    def _reference_object(self, samples: Sequence[dict], items: Sequence[dict], index: int) -> dict:
        value = self.reference.value(samples, items, index)
        parsed = _json_object(value)
        if not parsed:
            raise grading_failed(
                self.label, f"the reference is not a JSON object with fields: {value!r:.200}", samples, index
            )
        missing = [field for field in self.fields or () if field not in parsed]
        if missing:
            raise grading_failed(
                self.label, f"the reference lacks the field(s) {', '.join(missing)}: {value!r:.200}", samples, index
            )
        return parsed

    def _score(self, samples: Sequence[dict], items: Sequence[dict], index: int) -> float:
        reference = self._reference_object(samples, items, index)
        value = self.input.value(samples, items, index)
        output = _json_object(value)
        fields = self.fields or list(reference)
        if output is None:
            return 0.0
        return sum(field in output and same_json_value(output[field], reference[field]) for field in fields) / len(
            fields
        )
