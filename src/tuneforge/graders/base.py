"""What every grader shares: the sample dict, results, errors and the `Grader` base class.

    sample = sample_of('{"label": "billing"}')   # output_text, output_json (a dict here), output_tools
    [result] = grader.grade([sample], [{"answer": "billing"}])
    result.score, result.parts                   # 1.0, {"exact": 1.0}

A grader scores a batch of samples, `samples[i]` against `items[i]` (its data row). Every failure
is a `GraderError` that names the grader, says what went wrong and shows the sample at fault, so
a bad grader stops a run with a message rather than a traceback or a silent 0.
"""

from __future__ import annotations

import math
import numbers
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import TuneforgeError
from ..tasks.metrics import parse_json_object, split_reasoning
from ..wording import did_you_mean

SHOWN_SAMPLE_CHARS = 200
_FENCE = re.compile(r"\A```(?:json)?\s*\n(.*?)\n?```\Z", re.DOTALL | re.IGNORECASE)


class GraderError(TuneforgeError):
    """A grader spec that cannot work ("invalid_grader"), or a grade that failed ("grader_failed").
    `sample` is the batch index of the sample a grade failed on, so that a caller that knows where
    the items come from can name the data row."""

    def __init__(self, message: str, *, code: str = "invalid_grader", sample: int | None = None):
        super().__init__(message, code=code)
        self.sample = sample


@dataclass(frozen=True)
class GradeResult:
    score: float
    parts: dict[str, float]  # each sub-grader's score for multi; {name: score} for the others


def parse_output_json(text: str) -> dict | None:
    """The JSON object a completion is (surrounding whitespace and a ```json fence allowed), else None."""
    text = text.strip()
    fenced = _FENCE.match(text)
    return parse_json_object(fenced.group(1) if fenced else text)


def sample_of(text: str, calls=None) -> dict:
    """The sample dict graders read for one completion, as OpenAI's graders see it: a reasoning model's
    output_text is its answer, without the reasoning before it. `calls`, a `tool_calls.ToolCallParser`
    (for an answer to a prompt with tools): an answer that calls tools has them as `output_tools`, OpenAI's
    chat completion `tool_calls`, and the text beside them as output_text, as `tuneforge serve` replies."""
    text = split_reasoning(text)[1]
    parsed = calls.parse(text) if calls is not None else None
    if parsed is not None:
        content = parsed.content or ""
        return {"output_text": content, "output_json": parse_output_json(content), "output_tools": parsed.tool_calls}
    return {"output_text": text, "output_json": parse_output_json(text), "output_tools": []}


def rollout_sample(text: str, calls=None) -> dict:
    """The sample of a sampled completion: `sample_of`'s, and the `completion` as it was sampled, reasoning
    included, which TRL-style reward functions read (a format reward looks for the <think> block)."""
    return {**sample_of(text, calls), "completion": text}


def rollout_samples(texts: Sequence[str], tools: Sequence[list[dict] | None], tokenizer) -> list[dict]:
    """`rollout_sample` of each completion; one to a prompt given tools (`tools[i]`) has its tool calls read as
    the server reads a reply's, by the parser of the model's chat template (`tokenizer`'s)."""
    calls = None
    if any(tools):
        from ..data.render import renderer_for
        from ..tool_calls import parser_for

        calls = parser_for(renderer_for(tokenizer).template)
    return [rollout_sample(text, calls if given else None) for text, given in zip(texts, tools)]


def shorten(text: str) -> str:
    """The text as an error message shows it: quoted, at most SHOWN_SAMPLE_CHARS characters of it."""
    if len(text) <= SHOWN_SAMPLE_CHARS:
        return repr(text)
    return f"{text[:SHOWN_SAMPLE_CHARS]!r}... ({len(text)} characters)"


def grading_failed(label: str, what: str, samples: Sequence[dict], index: int) -> GraderError:
    """The error for a grade that could not be given: which grader, what happened, on which sample."""
    text = samples[index].get("output_text", "")
    return GraderError(
        f"grader {label}: {what}\non sample {index} of the batch (item {index}), output_text {shorten(text)}",
        code="grader_failed",
        sample=index,
    )


def checked_score(value: Any, label: str, samples: Sequence[dict], index: int) -> float:
    """`value` as a float score; anything else (a string, None, NaN, an infinity) is a GraderError."""
    if not isinstance(value, numbers.Real):
        raise grading_failed(label, f"gave {value!r:.100}, not a number", samples, index)
    if not math.isfinite(value):
        raise grading_failed(label, f"gave {value}, not a finite number", samples, index)
    return float(value)


def spec_text(spec: dict, key: str, label: str) -> str:
    """A spec's required text field."""
    value = spec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise GraderError(f"grader {label}: `{key}` must be a non-empty string, got {value!r:.100}")
    return value


def spec_choice(spec: dict, key: str, choices: Sequence[str], label: str) -> str:
    """A spec's required field that takes one of a few values; a misspelt one is offered the nearest."""
    value = spec.get(key)
    if value not in choices:
        meant = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise GraderError(f"grader {label}: `{key}` must be one of {', '.join(choices)}; got {value!r:.100}{meant}")
    return value


class Grader(ABC):
    """Scores samples against their items. Subclasses give `_grade` (the scores of a batch).

    `label` is how errors name the grader: its name and type, and for a sub-grader of a multi
    grader the path to it, `"total" > "format" (python)`.
    """

    type: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]  # the spec's fields besides type, name and pass_threshold
    pass_threshold: float | None = None  # OpenAI's: an answer whose score reaches it passes (evaluation counts them)

    def __init__(self, name: str, label: str):
        self.name = name
        self.label = label

    @property
    def part_names(self) -> list[str]:
        """The keys of every result's `parts`, known before any grade (a run logs a reward per part)."""
        return [self.name]

    def grade(self, samples: Sequence[dict], items: Sequence[dict]) -> list[GradeResult]:
        """One result per sample, in order; `samples[i]` is graded against `items[i]`."""
        if len(samples) != len(items):
            raise ValueError(f"{len(samples)} samples but {len(items)} items; give one item per sample")
        return self._results(samples, items)

    def check(self, items: Sequence[dict]) -> None:
        """Grade each item with plausible samples before the grader is used: an empty output, and the reference
        itself where the grader has one. A template error, an exception, a timeout or a result that
        is not a number is a GraderError here rather than a failed run later.
        """
        what = "an empty output"
        try:
            empty = [sample_of("") for _ in items]
            self._grade(empty, items)
            what = "the reference as the output"
            references = self.reference_texts(empty, items)
            if references is not None:
                self._grade([sample_of(text) for text in references], items)
        except GraderError as error:
            raise GraderError(
                f"{error.message}\nThe grader was checked on the items with {what}; fix it (or the items) and run "
                "again.",
                code="invalid_grader",
                sample=error.sample,
            ) from None

    def check_items(self, items: Sequence[dict]) -> None:
        """Every item field this grader's templates read, looked up on each item without grading: cheap
        enough for every data row, so a row that lacks a field fails before training, not when sampled."""
        for template in self.templates():
            template.check_items(items)

    def templates(self) -> list:
        """The grader's `Template`s, those of its sub-graders included."""
        return []

    def model_files(self) -> list[tuple[str, int, int]]:
        """The files of the models this grader scores with (a reward model's), sub-graders' included, as
        (path, size, modification time): a model retrained in place makes it another grader."""
        return []

    def reference_texts(self, samples: Sequence[dict], items: Sequence[dict]) -> list[str] | None:
        """The text this grader compares each sample's output with, for `check`; None when it has no reference."""
        return None

    def _results(self, samples: Sequence[dict], items: Sequence[dict]) -> list[GradeResult]:
        return [GradeResult(score, {self.name: score}) for score in self._grade(samples, items)]

    @abstractmethod
    def _grade(self, samples: Sequence[dict], items: Sequence[dict]) -> list[float]:
        """One checked score (`checked_score`) per sample, in order."""
