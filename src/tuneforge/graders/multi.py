"""The multi grader: several graders' scores combined by a formula.

    build_grader({"type": "multi", "name": "total",
                  "graders": {"exact": {...}, "close": {...}},
                  "calculate_output": "0.7 * exact + 0.3 * close"})
    [result] = grader.grade(samples, items)
    result.score, result.parts              # 0.85, {"exact": 1.0, "close": 0.5}

`calculate_output` is parsed with `ast` and checked when the grader is built, and then evaluated
by walking that tree, never by eval(): numbers, the sub-graders' names, + - * / ** (and ^, read
as **: a power, as formulas usually mean it), unary minus and plus, parentheses, and the functions
min, max, abs, sqrt, log, exp, floor and ceil. Anything else (attribute access, other calls or
names, comparisons, subscripts) is refused with the construct it found. A formula that cannot be
computed for a sample (a division by zero, the log of 0) is a GraderError naming the sample.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Sequence

from .base import Grader, GraderError, GradeResult, checked_score, grading_failed

Scores = dict[str, float]
OPERATORS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
UNARY: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# name -> (function, the fewest arguments, the most)
FUNCTIONS: dict[str, tuple[Callable[..., float], int, int]] = {
    "min": (min, 2, 64),
    "max": (max, 2, 64),
    "abs": (abs, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 1),
    "exp": (math.exp, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
}


class Formula:
    """`calculate_output`, compiled into nested closures over the sub-graders' scores."""

    def __init__(self, text: str, names: Sequence[str], label: str):
        self.text = text
        self.label = label
        self.names = set(names)
        try:
            # Read as `**`, `^` is a power that binds as one; left to Python it would be xor, weaker than + and -.
            tree = ast.parse(text.strip().replace("^", "**"), mode="eval")
        except SyntaxError as error:
            raise self._invalid(f"it is not a formula ({error.msg})") from None
        self._evaluate = self._compile(tree.body)

    def _invalid(self, what: str) -> GraderError:
        return GraderError(
            f"grader {self.label}: calculate_output {self.text!r:.200}: {what}. A formula may use numbers, the "
            f"graders' names ({', '.join(sorted(self.names))}), + - * / ** ^, parentheses and "
            f"{', '.join(FUNCTIONS)}"
        )

    def _compile(self, node: ast.AST) -> Callable[[Scores], float]:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            # Numbers are floats, so a power that outgrows them overflows at once instead of building a huge int.
            number = float(node.value)
            return lambda scores: number
        if isinstance(node, ast.Name):
            if node.id not in self.names:
                raise self._invalid(f"`{node.id}` is not one of the graders")
            name = node.id
            return lambda scores: scores[name]
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            combine, left, right = OPERATORS[type(node.op)], self._compile(node.left), self._compile(node.right)
            return lambda scores: combine(left(scores), right(scores))
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            apply, operand = UNARY[type(node.op)], self._compile(node.operand)
            return lambda scores: apply(operand(scores))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            function, fewest, most = FUNCTIONS[node.func.id]
            if node.keywords or not fewest <= len(node.args) <= most:
                count = str(fewest) if fewest == most else f"{fewest} or more"
                raise self._invalid(f"{node.func.id}() takes {count} argument(s)")
            arguments = [self._compile(argument) for argument in node.args]
            return lambda scores: function(*(argument(scores) for argument in arguments))
        raise self._invalid(f"`{ast.unparse(node)}` is not allowed ({type(node).__name__})")

    def __call__(self, scores: Scores) -> float:
        return self._evaluate(scores)


class MultiGrader(Grader):
    type = "multi"
    keys = ("graders", "calculate_output")

    def __init__(self, spec: dict, name: str, label: str, graders: dict[str, Grader]):
        super().__init__(name, label)
        self.graders = graders
        formula = spec.get("calculate_output")
        if not isinstance(formula, str) or not formula.strip():
            raise GraderError(f"grader {label}: `calculate_output` must be a formula over {', '.join(graders)}")
        self.formula = Formula(formula, list(graders), label)

    @property
    def part_names(self) -> list[str]:
        return list(self.graders)

    def _results(self, samples: Sequence[dict], items: Sequence[dict]) -> list[GradeResult]:
        parts = self._parts(samples, items)
        return [GradeResult(score, part) for score, part in zip(self._combine(parts, samples), parts)]

    def _grade(self, samples: Sequence[dict], items: Sequence[dict]) -> list[float]:
        return self._combine(self._parts(samples, items), samples)

    def _parts(self, samples: Sequence[dict], items: Sequence[dict]) -> list[Scores]:
        # Each sub-grader takes the whole batch at once: a python one starts one process for it.
        columns = {key: grader._grade(samples, items) for key, grader in self.graders.items()}
        return [{key: column[index] for key, column in columns.items()} for index in range(len(samples))]

    def _combine(self, parts: list[Scores], samples: Sequence[dict]) -> list[float]:
        scores = []
        for index, part in enumerate(parts):
            try:
                value = self.formula(part)
            except (ArithmeticError, ValueError) as error:
                raise grading_failed(
                    self.label,
                    f"calculate_output {self.formula.text!r} failed with the scores {part}: {error}",
                    samples,
                    index,
                ) from None
            scores.append(checked_score(value, self.label, samples, index))
        return scores

    def templates(self) -> list:
        return [template for grader in self.graders.values() for template in grader.templates()]

    def model_files(self) -> list[tuple[str, int, int]]:
        return [file for grader in self.graders.values() for file in grader.model_files()]

    def reference_texts(self, samples: Sequence[dict], items: Sequence[dict]) -> list[str] | None:
        for grader in self.graders.values():
            texts = grader.reference_texts(samples, items)
            if texts is not None:
                return texts
        return None
