"""`tuneforge eval MODEL DATA [--compare BASE]`: evaluate and print the tables (or JSON)."""

from __future__ import annotations

import json
import re

import yaml

from ..errors import ConfigError
from .evaluate import compare as compare_models
from .evaluate import evaluate
from .report import examples_table, metrics_table, print_tables


def eval_command(
    model: str,
    data: str,
    compare: str | None = None,
    metric: str = "auto",
    json_out: bool = False,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    grader: str | None = None,
) -> int:
    """Evaluate MODEL on DATA (a chat JSONL); with `compare`, also the model named there, side by side.
    `max_new_tokens` None: `evaluate`'s default. `grader`: a grader object inline, a JSON/YAML file of one,
    or reward functions as FILE.py:FUNCTION (comma-separated for several, summed), which scores the answers
    too."""
    options = {"metric": metric, "limit": limit, "progress": not json_out}
    if grader is not None:
        options["grader"] = grader_spec(grader)
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    if compare:
        result = compare_models(model, compare, data, **options)
        base, tuned = result["base"], result["tuned"]
        tables = [metrics_table({f"base: {base['model']}": base, f"tuned: {tuned['model']}": tuned})]
        if "windows" not in tuned:  # documents of raw text have a loss and no answers
            tables.append(examples_table(result["samples"]))
    else:
        result = evaluate(model, data, **options)
        tables = [metrics_table({result["model"]: result})]
        if "windows" not in result:
            tables.append(examples_table(result["samples"], answers=(("answer", "prediction", "correct"),)))
    if json_out:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print_tables(tables)
    return 0


# One FILE.py:FUNCTION of a comma-separated list: a comma that ends no reference belongs to a file's path.
_FUNCTION_REFERENCE = re.compile(r"(.+?\.py:[A-Za-z_]\w*)(?:,|$)")


def grader_spec(grader: str) -> str | dict | list[str]:
    """`--grader` as `graders.load_grader` takes it: a grader object written inline (JSON, or YAML's
    `{type: ..., ...}`) as that object; reward functions, FILE.py:FUNCTION comma-separated, as a list (a
    path's own commas kept; a list that names no function in some part split at every comma, so that its
    error names that part); anything else (a JSON/YAML file) as given."""
    if grader.lstrip().startswith("{"):
        try:
            spec = yaml.safe_load(grader)
        except yaml.YAMLError as err:
            raise ConfigError(f"--grader: {grader} is not a valid JSON or YAML object ({err}).") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"--grader: {grader} must be one grader object (a mapping with a type).")
        return spec
    references = _FUNCTION_REFERENCE.findall(grader)
    if references and ",".join(references) == grader:
        return references
    return grader.split(",") if "," in grader and ".py:" in grader else grader
