"""Graders: the rewards of reinforcement fine-tuning, in the format of OpenAI's graders.

    from tuneforge.graders import build_grader, sample_of
    grader = build_grader({"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
                           "reference": "{{ item.answer }}", "operation": "eq"})
    grader.check(items)                                    # before training: GraderError if it cannot work
    results = grader.grade([sample_of(text) for text in completions], items)
    [r.score for r in results], results[0].parts          # floats; {"exact": 1.0}

Types: string_check and text_similarity (`text.py`), python (`python.py`, a separate process per
batch), multi (`multi.py`, a formula over sub-graders), json_fields (ours, `text.py`: the share
of a JSON output's fields that match a reference object) and reward_model (ours, `reward_model.py`:
a `method: reward` model's score of the answer to the item's prompt). OpenAI's score_model and
label_model need a judge model and are refused. `build_grader` checks the whole spec (keys, templates, the
python source, the formula) and raises `GraderError` naming the grader and the field. A grader may
hold OpenAI's `pass_threshold` (`Grader.pass_threshold`): the score at or above which an answer
passes, which evaluation counts (`tuneforge eval --grader`) and training leaves alone.
`load_grader` takes a spec as `grpo.grader` and `tuneforge eval --grader` do: an object, a JSON/YAML
file of one, or reward functions.

`reward_functions` builds TRL-style reward functions, FUNCTION(prompts, completions, **columns) in a
Python file (`python.py`'s RewardFunctionGrader, run by the python grader's process); several are a
multi grader that sums them, or weighs them as TRL's reward_weights do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from ..config import load_yaml, yaml_syntax_error, yaml_text
from ..errors import ConfigError, unreadable_json
from ..wording import did_you_mean
from .base import Grader, GraderError, GradeResult, rollout_sample, rollout_samples, sample_of, spec_choice
from .multi import FUNCTIONS, MultiGrader
from .python import PythonGrader, PythonLimits, RewardFunctionGrader
from .reward_model import RewardModelGrader
from .text import JsonFieldsGrader, StringCheckGrader, TextSimilarityGrader

__all__ = [
    "GradeResult",
    "Grader",
    "GraderError",
    "PythonLimits",
    "build_grader",
    "grader_types",
    "load_grader",
    "reward_functions",
    "rollout_sample",
    "rollout_samples",
    "runs_python",
    "sample_of",
]

GRADERS: dict[str, type[Grader]] = {
    grader.type: grader
    for grader in (
        StringCheckGrader,
        TextSimilarityGrader,
        PythonGrader,
        MultiGrader,
        JsonFieldsGrader,
        RewardModelGrader,
    )
}
MODEL_GRADERS = ("score_model", "label_model")


def build_grader(spec: dict, *, limits: PythonLimits | None = None) -> Grader:
    """The grader a spec describes, fully checked. `limits` applies to every python grader in it."""
    if not isinstance(spec, dict):
        raise GraderError(f"a grader must be a JSON object with a `type`, got {spec!r:.100}")
    return _build(spec, (str(spec.get("name", spec.get("type"))),), limits or PythonLimits())


def reward_functions(
    functions: list[tuple[Path, str]], weights: list[float] | None = None, *, limits: PythonLimits | None = None
) -> Grader:
    """TRL-style reward functions, each `(file, function name)`: one is its own grader; several are a multi
    grader whose score is their sum, or with `weights` their weighted sum, and whose parts are each
    function's reward (a None from one of them counts 0, as TRL's nansum has it)."""
    limits = limits or PythonLimits()
    if weights is not None and len(weights) != len(functions):
        raise GraderError(f"{len(weights)} weights for {len(functions)} reward functions; give one weight per function")
    if len(functions) == 1 and weights is None:
        path, name = functions[0]
        return RewardFunctionGrader(path, name, limits)
    graders: dict[str, Grader] = {}
    for path, name in functions:
        if name in graders:
            raise GraderError(f"two reward functions are named {name} ({graders[name].path} and {path}); rename one")
        if name in FUNCTIONS:
            raise GraderError(f"a reward function cannot be named {name} ({path}); {', '.join(FUNCTIONS)} are taken")
        graders[name] = RewardFunctionGrader(path, name, limits, allow_none=len(functions) > 1)
    terms = [name if weights is None else f"{weight!r} * {name}" for name, weight in zip(graders, weights or graders)]
    return MultiGrader({"calculate_output": " + ".join(terms)}, "rewards", '"rewards" (multi)', graders)


def load_grader(
    spec: dict | str | list, weights: list[float] | None = None, *, key: str = "grader", placed: str | None = None
) -> Grader:
    """The grader a spec names, as `grpo.grader` and `tuneforge eval --grader` take it: a grader object, the path
    of a JSON/YAML file holding one, or TRL-style reward functions as FILE.py:FUNCTION, alone or in a list
    (`weights` weighs those). Fully checked; an error names `key`, where the spec was given, and an error in a
    grader object names it as `placed` (the key and the config line that wrote the object) where given."""
    where = placed or key
    if isinstance(spec, list) or (isinstance(spec, str) and _function_ref(spec)):
        return _reward_functions(spec, weights, key)
    if weights is not None:
        raise ConfigError(
            f"{key}_weights weighs TRL-style reward functions ({key}: [FILE.py:FUNCTION, ...]); a "
            "grader object weighs its parts in a multi grader's calculate_output"
        )
    if isinstance(spec, str):
        where = f"{key} ({spec})"
        path = Path(spec)
        if path.suffix == ".py":
            # A TRL-style reward file parses as YAML (or fails to) and would be told it lacks a grader `type`.
            raise ConfigError(
                f"{key}: {spec} is Python source; name the reward function in it as {spec}:FUNCTION "
                "(TRL's FUNCTION(prompts, completions, **columns) -> list[float], a list of several to sum), or "
                "give a python grader, {type: python, name: NAME, source: ...}, whose grade(sample, item) -> float "
                "scores one answer."
            )
        if not path.is_file():
            raise ConfigError(
                f"{key}: {spec} is no file. Give a grader object, the path of a JSON/YAML file, or reward "
                "functions as FILE.py:FUNCTION."
            )
        text = yaml_text(path)
        # A .json file is read as JSON: YAML refuses the tabs that indent many a JSON file. A byte-order mark
        # before it (as Windows editors save UTF-8) is no part of the JSON, and YAML skips it as well.
        try:
            spec = (
                json.loads(text.removeprefix("\ufeff"))
                if path.suffix.lower() == ".json"
                else load_yaml(text, str(path))
            )
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: {yaml_syntax_error(path, err, 'not valid JSON')}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: {yaml_syntax_error(path, err, 'not valid JSON or YAML')}") from None
        except (RecursionError, ValueError) as err:  # well-formed JSON that Python's reader gives up on
            if (what := unreadable_json(err)) is None:
                raise
            raise ConfigError(f"{key}: {path}: the JSON {what}; no grader needs that.") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: {path} must hold one grader object (a mapping with a type).")
    try:
        return build_grader(spec)
    except GraderError as error:
        raise GraderError(f"{where}: {error.message}", code=error.code) from None


def _function_ref(text: str) -> tuple[Path, str] | None:
    """(file, function) of a `FILE.py:FUNCTION` reference, else None."""
    file, colon, function = text.rpartition(":")
    return (Path(file), function) if colon and file.endswith(".py") else None


def _reward_functions(spec: str | list, weights: list[float] | None, key: str) -> Grader:
    functions = []
    # A list's entries are named by their index; a lone function by the key alone.
    named = [(f"{key}[{index}]", ref) for index, ref in enumerate(spec)] if isinstance(spec, list) else [(key, spec)]
    for where, ref in named:
        found = _function_ref(ref) if isinstance(ref, str) else None
        if found is None or not found[1].isidentifier():
            raise ConfigError(
                f"{where}: {ref!r:.100} is no reward function; name each as FILE.py:FUNCTION, as rewards.py:correctness"
            )
        if not found[0].is_file():
            looked = "" if found[0].is_absolute() else f" in the working directory {Path.cwd()}"
            raise ConfigError(
                f"{where}: {found[0]} is no file{looked} (from {ref}); correct the path, or give it absolute."
            )
        functions.append(found)
    if weights is not None and not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"{key}_weights must be finite numbers, got {weights}")
    try:
        return reward_functions(functions, weights)
    except GraderError as error:
        raise GraderError(f"{key}: {error.message}", code=error.code) from None


def runs_python(spec: dict) -> bool:
    """Whether a grader spec (a multi one through its sub-graders) runs Python code of its author's."""
    return "python" in grader_types(spec)


def grader_types(spec: dict) -> set[str]:
    """The types of a grader spec and, for a multi one, of its sub-graders: what it would run (a `type` that is not
    a string names none, and `build_grader` refuses it)."""
    if not isinstance(spec, dict):
        return set()
    subs = spec.get("graders") if spec.get("type") == "multi" else None
    inner = set().union(*map(grader_types, subs.values())) if isinstance(subs, dict) else set()
    kind = spec.get("type")
    return {kind, *inner} if isinstance(kind, str) else inner


LOCAL_MODEL_GRADER = (
    "reward_model graders read a model folder on the machine that grades, which a client of the API cannot name; "
    "grade with string_check, text_similarity, json_fields, multi or python, or run the reward model's grading "
    "with tuneforge train or tuneforge eval --grader on that machine"
)


def _build(spec: dict, path: tuple[str, ...], limits: PythonLimits) -> Grader:
    """`path` names the grader in errors: its name, or for a sub-grader the multi graders' names and its key."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    label = " > ".join(f'"{step}"' for step in path) + f" ({kind})"
    if not isinstance(spec, dict):
        raise GraderError(f"grader {label}: a grader must be a JSON object with a `type`, got {spec!r:.100}")
    named = isinstance(kind, str)  # a list or object names no type (and cannot be looked up as one)
    if named and kind in MODEL_GRADERS:
        raise GraderError(
            f"grader {label}: {kind} graders need a judge model, which tuneforge does not run; score with a python "
            "grader, or combine graders with multi"
        )
    spec_choice(spec, "type", tuple(GRADERS), label)
    name = spec.get("name", kind)
    if not isinstance(name, str) or not name:
        raise GraderError(f"grader {label}: `name` must be a non-empty string, got {name!r:.100}")
    grader_class = GRADERS[kind]
    fields = ("type", "name", "pass_threshold", *grader_class.keys)
    # YAML reads a key such as `1:` as a number: it is named as written.
    unknown = sorted(map(str, set(spec) - set(fields)))
    if unknown:
        meant = ", ".join(field + did_you_mean(field, fields) for field in unknown)
        raise GraderError(
            f"grader {label}: unknown field(s) {meant}; a {kind} grader takes {', '.join(grader_class.keys)}"
        )
    threshold = spec.get("pass_threshold")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
    ):
        raise GraderError(f"grader {label}: `pass_threshold` must be a number, got {threshold!r:.100}")
    if grader_class is PythonGrader:
        grader = PythonGrader(spec, name, label, limits)
    elif grader_class is MultiGrader:
        grader = MultiGrader(spec, name, label, _sub_graders(spec, path, label, limits))
    else:
        grader = grader_class(spec, name, label)
    grader.pass_threshold = None if threshold is None else float(threshold)
    return grader


def _sub_graders(spec: dict, path: tuple[str, ...], label: str, limits: PythonLimits) -> dict[str, Grader]:
    graders = spec.get("graders")
    if not isinstance(graders, dict) or not graders:
        raise GraderError(f'grader {label}: `graders` must be an object of named graders, as {{"a": {{...}}}}')
    for key in graders:
        if not key.isidentifier() or key in FUNCTIONS:
            raise GraderError(
                f"grader {label}: {key!r} cannot name a grader in calculate_output; use letters, digits and "
                f"underscores, and none of {', '.join(FUNCTIONS)}"
            )
    return {key: _build(sub, (*path, key), limits) for key, sub in graders.items()}
