"""`tuneforge eval MODEL DATA [--compare BASE]`: evaluate and print the tables (or JSON)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import yaml

from ..config import load_yaml, yaml_syntax_error
from ..data.readers import not_a_file, one_file_by_name
from ..errors import ConfigError, TuneforgeError, check_counts, refuse_options
from .choices import (
    compare_choices,
    evaluate_choices,
    is_choice_file,
    layout_refusal,
    refuse_generation_options,
    write_choice_results,
)
from .evaluate import compare as compare_models
from .evaluate import evaluate
from .report import choices_table, examples_table, metrics_table, print_tables


def eval_command(model: str, data: str, *, json_out: bool = False, **options) -> int:
    """`tuneforge eval`: `evaluate_model`'s result (its `options` by name) printed as tables, or as JSON with
    `json_out`."""
    result = evaluate_model(model, data, progress=not json_out, **options)
    if json_out:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print_tables(result_tables(result))
        if "results" in result.get("files", {}):
            print(f"each question's results: {result['files']['results']}")
    return 0


def evaluate_model(
    model: str,
    data: str | Path,
    *,
    compare: str | None = None,
    metric: str = "auto",
    limit: int | None = None,
    max_new_tokens: int | None = None,
    grader: str | dict | list[str] | None = None,
    out: str | Path | None = None,
    num_fewshot: int = 0,
    fewshot_file: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """MODEL on DATA (a chat JSONL); with `compare`, also the model named there, side by side: the result
    `tuneforge eval --json` prints, as a dict. `max_new_tokens` None: `evaluate`'s default. `grader`: a grader
    object (a dict, or one written inline as JSON/YAML), a JSON/YAML file of one, or reward functions as
    FILE.py:FUNCTION (a list, or comma-separated; summed), which scores the answers too. A reward model (a
    sequence classifier) as MODEL is measured on DATA's preference pairs instead (`eval.reward`); `out`, a
    folder for its per-pair scores and histogram of margins. Multiple-choice rows (`eval.choices`) are scored by
    each choice's log-likelihood, each after `num_fewshot` solved examples (from `fewshot_file`, else from
    DATA); `out`, a folder for each question's results. `progress=False` leaves out the progress bars."""
    # The CLI's option types and bounds, which a Python caller's values have not been through.
    check_counts({"--limit": (limit, 1), "--max-new-tokens": (max_new_tokens, 1), "--num-fewshot": (num_fewshot, 0)})
    if not isinstance(data, str | Path):  # str() would make a path of None or a list, reported as missing
        raise ConfigError(
            f"DATA is one data file's path, as a str or Path (evaluate one file a call), got {type(data).__name__} "
            f"{data!r:.60}.",
            code="bad_option",
        )
    # str() would make a folder or file named "5" of a number, written into or read from unasked.
    for option, value in {"--out": out, "--fewshot-file": fewshot_file}.items():
        if value is not None and not isinstance(value, str | Path):
            raise ConfigError(
                f"{option} is a path, as a str or Path, got {type(value).__name__} {value!r:.60}; give one, or "
                "leave it out.",
                code="bad_option",
            )
    if not isinstance(metric, str):
        raise ConfigError(f"--metric takes one metric's name (auto, exact, ...), got {metric!r}.", code="bad_option")
    num_fewshot = num_fewshot or 0
    data = str(data)
    out = None if out is None else str(out)
    fewshot_file = None if fewshot_file is None else str(fewshot_file)
    # A missing file holds no rows of any kind: said so before the refusals below read it as the wrong kind.
    if (missing := not_a_file(data, one_file_by_name("eval scores"))) is not None:
        raise TuneforgeError(missing.message, code=missing.code)
    if fewshot_file is not None and not num_fewshot:
        raise ConfigError(
            f"--fewshot-file {fewshot_file} gives the solved examples shown before each question, but --num-fewshot "
            "is 0; set --num-fewshot N (5 for MMLU's published figures, 25 for ARC's)."
        )
    fewshot = {"--num-fewshot": num_fewshot > 0, "--fewshot-file": fewshot_file is not None}
    if reward_model(model):
        return _reward_evaluated(
            model,
            data,
            compare=compare,
            metric=metric,
            limit=limit,
            grader=grader,
            out=out,
            max_new_tokens=max_new_tokens,
            fewshot=fewshot,
            progress=progress,
        )
    if is_choice_file(data):
        return _choices_evaluated(
            model,
            data,
            compare=compare,
            limit=limit,
            out=out,
            fewshot={"num_fewshot": num_fewshot, "fewshot_file": fewshot_file},
            given={
                "--metric": metric != "auto",
                "--grader": grader is not None,
                "--max-new-tokens": max_new_tokens is not None,
            },
            progress=progress,
        )
    if out is not None:
        raise ConfigError(
            f"--out writes a reward model's per-pair scores, or each multiple-choice question's results, but "
            f"{data} holds neither for {model}; leave out --out (--json gives every answer and its score)."
        )
    refuse_options(f"{data} holds no multiple-choice questions, which few-shot examples precede", fewshot)
    options = {"metric": metric, "limit": limit, "progress": progress}
    if grader is not None:
        options["grader"] = grader_spec(grader) if isinstance(grader, str) else grader
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    if compare:
        return compare_models(model, compare, data, **options)
    return evaluate(model, data, **options)


def result_tables(result: dict) -> list:
    """The tables that show `evaluate_model`'s result, by what it measured: a reward model's ranking; acc and
    acc_norm of multiple-choice questions (their results carry `num_fewshot`); otherwise loss and scores, and the
    answers beside their references (documents of raw text have a loss and no answers: `windows`)."""
    if result.get("kind") == "reward_model":
        from .reward import reward_table

        return [reward_table(result)]
    if "tuned" in result:
        base, tuned = result["base"], result["tuned"]
        measured, models = tuned, {f"base: {base['model']}": base, f"tuned: {tuned['model']}": tuned}
        answers = {}
    else:
        measured, models = result, {result["model"]: result}
        answers = {"answers": (("answer", "prediction", "correct"),)}
    if "num_fewshot" in measured:
        return [choices_table(models, result.get("difference"))]
    if "windows" in measured:
        return [metrics_table(models)]
    return [metrics_table(models), examples_table(result["samples"], **answers)]


def _choices_evaluated(model, data, *, compare, limit, out, fewshot, given, progress) -> dict:
    """Multiple-choice rows: acc and acc_norm, base vs tuned with the paired change."""
    refuse_generation_options(data, **given)
    if fewshot["fewshot_file"] is not None and (refusal := layout_refusal(fewshot["fewshot_file"])):
        raise ConfigError(f"--fewshot-file: {refusal}")
    if out is not None:
        check_out_folder(out)
    if compare:
        result = compare_choices(model, compare, data, limit=limit, progress=progress, **fewshot)
    else:
        result = evaluate_choices(model, data, limit=limit, progress=progress, **fewshot)
    if out is not None:
        result["files"] = {"results": write_choice_results(out, result)}
    return result


def check_out_folder(out: str) -> None:
    """`--out`, a folder written into after scoring, checked before any model loads: it, or the nearest of its
    parents that exists, must be a folder this process may write into (a file made there and dropped tells)."""
    path = Path(out)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"--out {out}: {existing} is a file, not a folder; give a folder for the results (a new one is made)."
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(
            f"--out {out}: {existing} cannot be written into ({err.strerror}); give a folder this user may write, "
            "or change its permissions."
        ) from None


def reward_model(model: str) -> bool:
    """Whether MODEL is a reward model (a sequence classifier with one output): a run, checkpoint or export of
    `method: reward`, or another such classifier."""
    from ..models import resolve
    from ..models.loading import is_sequence_classifier

    return is_sequence_classifier(resolve(model))


def _reward_evaluated(model, data, *, compare, metric, limit, grader, out, max_new_tokens, fewshot, progress) -> dict:
    """A reward model: the options that concern answers are refused, naming each."""
    from .reward import evaluate_reward_model

    given = {
        **fewshot,
        "--compare": compare is not None,
        "--metric": metric != "auto",
        "--grader": grader is not None,
        "--max-new-tokens": max_new_tokens is not None,
    }
    refuse_options(
        f"{model} is a reward model: eval scores the chosen and rejected replies of each pair of {data} and writes "
        "no answers",
        given,
        " (to compare two reward models, evaluate each)",
    )
    if out is not None:
        check_out_folder(out)
    return evaluate_reward_model(model, data, limit=limit, progress=progress, out=out)


# One FILE.py:FUNCTION of a comma-separated list: a comma that ends no reference belongs to a file's path.
_FUNCTION_REFERENCE = re.compile(r"(.+?\.py:[A-Za-z_]\w*)(?:,|$)")


def grader_spec(grader: str) -> str | dict | list[str]:
    """`--grader` as `graders.load_grader` takes it: a grader object written inline (JSON, or YAML's
    `{type: ..., ...}`) as that object; reward functions, FILE.py:FUNCTION comma-separated, as a list (a
    path's own commas kept; a list that names no function in some part split at every comma, so that its
    error names that part); anything else (a JSON/YAML file) as given."""
    if grader.lstrip().startswith("{"):
        try:
            spec = load_yaml(grader, "--grader")
        except yaml.YAMLError as err:
            raise ConfigError(
                yaml_syntax_error("--grader", err, f"{grader} is not a valid JSON or YAML object", one_line=True)
            ) from None
        if not isinstance(spec, dict):
            raise ConfigError(f"--grader: {grader} must be one grader object (a mapping with a type).")
        return spec
    references = _FUNCTION_REFERENCE.findall(grader)
    if references and ",".join(references) == grader:
        return references
    return grader.split(",") if "," in grader and ".py:" in grader else grader
