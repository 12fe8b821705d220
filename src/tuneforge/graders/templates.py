"""OpenAI's grader templates: `{{ sample.output_text }}`, `{{ item.answer }}`, `{{ item.a.b }}`.

    template = Template("Answer: {{ item.answer }}", label='"exact" (string_check)', field="reference")
    template.render(samples, items, index)   # "Answer: 42" for samples[index] and items[index]
    template.value(samples, items, index)    # the raw value when the template is one reference alone

Every `{{ ... }}` is a dotted path into one of two namespaces: `sample` (output_text, output_json,
output_tools) and `item` (the data row). A numeric step indexes a list (`item.answers.0`). This is
a strict resolver, not Jinja: no filters, no expressions. Paths are checked when the grader is
built; a field an item lacks is an error naming the grader, the template and the field, while a
field the sample's output lacks (`sample.output_json.label` for an output that is not JSON) reads
as empty, because a malformed output is the model's mistake, to be scored, not a reason to stop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from .base import GraderError, grading_failed, sample_of

SAMPLE_FIELDS = ("output_text", "output_json", "output_tools")
_REFERENCE = re.compile(r"\{\{(.*?)\}\}")
_PATH = re.compile(r"\s*(\w+(?:\.\w+)+)\s*")
_MISSING = object()


def _as_text(value: Any) -> str:
    """How a resolved value reads inside text: strings as they are, None as empty, the rest as JSON."""
    if isinstance(value, str):
        return value
    return "" if value is None else json.dumps(value, ensure_ascii=False)


def _step(container: Any, key: str) -> Any:
    if isinstance(container, dict):
        return container.get(key, _MISSING)
    if isinstance(container, list) and key.isdigit() and int(key) < len(container):
        return container[int(key)]
    return _MISSING


class Template:
    """A grader's text field with its `{{ ... }}` references parsed and checked."""

    def __init__(self, text: str, *, label: str, field: str):
        self.text = text
        self.label = label
        self.field = field
        self.paths: list[tuple[str, ...]] = []
        for match in _REFERENCE.finditer(text):
            path = _PATH.fullmatch(match.group(1))
            if path is None:
                raise self._invalid(f"`{{{{{match.group(1)}}}}}` is not a dotted path such as {{{{ item.answer }}}}")
            steps = tuple(path.group(1).split("."))
            if steps[0] not in ("sample", "item"):
                raise self._invalid(f"`{steps[0]}` is not a namespace; use sample.<field> or item.<field>")
            if steps[0] == "sample" and steps[1] not in SAMPLE_FIELDS:
                raise self._invalid(f"sample has no field `{steps[1]}`; it has {', '.join(SAMPLE_FIELDS)}")
            self.paths.append(steps)
        leftover = _REFERENCE.sub("", text)
        if "{{" in leftover or "}}" in leftover:
            raise self._invalid("it has an unmatched `{{` or `}}`")
        self.single = len(self.paths) == 1 and _REFERENCE.fullmatch(text.strip()) is not None

    def _invalid(self, what: str) -> GraderError:
        return GraderError(f"grader {self.label}: `{self.field}` template {self.text!r:.200}: {what}")

    def _resolve(self, steps: tuple[str, ...], samples: Sequence[dict], items: Sequence[dict], index: int) -> Any:
        value: Any = samples[index] if steps[0] == "sample" else items[index]
        for depth, key in enumerate(steps[1:], start=1):
            value = _step(value, key)
            if value is _MISSING and steps[0] == "item":
                item = items[index]
                fields = ", ".join(item) if isinstance(item, dict) else f"none: it is {type(item).__name__}"
                raise grading_failed(
                    self.label,
                    f"`{self.field}` template {self.text!r:.200} reads {'.'.join(steps[: depth + 1])}, which the "
                    f"item does not have (its fields: {fields}); add it to every row or fix the template",
                    samples,
                    index,
                )
            if value is _MISSING:
                return None
        return value

    def check_items(self, items: Sequence[dict]) -> None:
        """Every item field the template reads, looked up on each item: a GraderError for the first item
        that lacks one, naming it as a grade would."""
        samples = [sample_of("")] * len(items)
        for index in range(len(items)):
            for steps in self.paths:
                if steps[0] == "item":
                    self._resolve(steps, samples, items, index)

    def value(self, samples: Sequence[dict], items: Sequence[dict], index: int) -> Any:
        """The template for sample `index`: the referenced value itself when the template is one
        reference alone (a dict stays a dict), else the rendered text.
        """
        if self.single:
            return self._resolve(self.paths[0], samples, items, index)
        return self.render(samples, items, index)

    def render(self, samples: Sequence[dict], items: Sequence[dict], index: int) -> str:
        """The template's text for sample `index`, every reference replaced by its value as text."""
        values = iter([_as_text(self._resolve(steps, samples, items, index)) for steps in self.paths])
        return _REFERENCE.sub(lambda _: next(values), self.text)
