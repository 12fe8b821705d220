"""OpenAI's fine-tuning request onto a tuneforge `Config`.

`supervised` is a LoRA run, `dpo` tuneforge's `method: dpo` (LoRA policy) and `reinforcement`
its `method: grpo` (LoRA policy) with the job's grader, checked when the job is created. The
hyperparameters keep OpenAI's meaning: `batch_size` counts examples (so packing is off), `learning_rate_multiplier`
scales tuneforge's default learning rate, `n_epochs` "auto" is the same heuristic OpenAI uses. A
checkpoint is kept at the end of each epoch, the last three of them, as OpenAI does.

Two extensions in the hyperparameters: `tuneforge_processes` trains the job on that many processes
of the worker's machine (torchrun; DDP for LoRA); each step's examples are split between them.
`tuneforge_chat_template` is the run's model.chat_template, as Jinja text (a client names no file of the
server's): the job trains with it and its model is saved and served with it.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from ..config import Config, GRPOConfig, TrainConfig, auto_epochs, is_jinja, load_config
from ..errors import ConfigError, within
from ..training import make_plan
from ..web import Metadata, RequestBody, Shallow, StoredText

GROUP_SIZE = GRPOConfig.model_fields["group_size"].default
AUTO_BATCH_SIZE = 8  # tuneforge's default; fewer when the file has fewer examples
KEPT_EPOCH_CHECKPOINTS = 3
_SUFFIX = re.compile(r"[A-Za-z0-9._-]{0,64}")
DEFAULT_LEARNING_RATE = TrainConfig.model_fields["learning_rate"].default


def _auto_or(kind: type, low: float, high: float, *, low_inclusive: bool = True):
    """'auto' or a number of `kind` in range; checked before pydantic's union so errors name the field alone."""
    shown = "an integer" if kind is int else "a number"

    def check(value: Any):
        if value == "auto":
            return value
        # JSON as Python reads it spells NaN and Infinity (and 1e400 is infinity): no count or rate.
        not_finite = isinstance(value, float) and not math.isfinite(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not_finite
            or (kind is int and value != int(value))
        ):
            raise ValueError(f"must be 'auto' or {shown} (got {value!r})")
        if value > high or value < low or (value == low and not low_inclusive):
            bounds = within({"ge" if low_inclusive else "gt": low, "le": high})
            raise ValueError(f"must be 'auto' or {shown} of {bounds} (got {value!r})")
        return kind(value)

    return Annotated[Literal["auto"] | kind, BeforeValidator(check)]


class Hyperparameters(RequestBody):
    batch_size: _auto_or(int, 1, 256) = "auto"
    learning_rate_multiplier: _auto_or(float, 0, 10, low_inclusive=False) = "auto"
    n_epochs: _auto_or(int, 1, 50) = "auto"
    tuneforge_processes: int | None = Field(
        None, ge=1, le=64, description="tuneforge's extension: processes to train on, on the worker's machine"
    )
    tuneforge_chat_template: str | None = Field(
        None, min_length=1, max_length=65536, description="tuneforge's extension: the chat template to train with"
    )

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _gives_a_learning_rate(cls, value):
        # A multiplier of 1e-320 is above 0, but the learning rate it makes underflows to 0.
        if value != "auto" and DEFAULT_LEARNING_RATE * value == 0:
            raise ValueError(
                f"{value!r} times the default learning rate {DEFAULT_LEARNING_RATE} is 0 as a floating-point "
                "number, so nothing would train; give a larger multiplier"
            )
        return value

    @field_validator("tuneforge_chat_template")
    @classmethod
    def _jinja_text(cls, value):
        # model.chat_template also takes a file or a template's name: those name the server's files, not a client's.
        if value is not None and not is_jinja(value):
            raise ValueError(
                "give the chat template's Jinja text itself (with its {% ... %} and {{ ... }}); a file or a "
                "template's name is not taken from a job"
            )
        if value is not None:
            from ..models.loading import template_compile_problem

            if (problem := template_compile_problem(value)) is not None:
                raise ValueError(f"the chat template {problem}")
        return value


class DpoHyperparameters(Hyperparameters):
    beta: _auto_or(float, 0, 2, low_inclusive=False) = "auto"


class ReinforcementHyperparameters(Hyperparameters):
    compute_multiplier: _auto_or(float, 0, 16, low_inclusive=False) = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    eval_interval: _auto_or(int, 1, 10_000) = "auto"
    eval_samples: _auto_or(int, 1, 100) = "auto"

    @model_validator(mode="after")
    def _supported(self):
        if self.reasoning_effort != "default":
            raise ValueError(
                "reasoning_effort sets how long a reasoning model thinks; tuneforge samples the model's answers as "
                "they come, so leave it 'default'"
            )
        if self.eval_samples not in ("auto", 1):
            raise ValueError(
                "eval_samples: tuneforge grades one greedy answer to each validation prompt; leave it 'auto' or 1"
            )
        return self


class SupervisedMethod(RequestBody):
    hyperparameters: Hyperparameters = Hyperparameters()


class DpoMethod(RequestBody):
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class ReinforcementMethod(RequestBody):
    grader: Annotated[dict, Shallow]  # stored, and serialized into the run's config, with the job
    hyperparameters: ReinforcementHyperparameters = ReinforcementHyperparameters()

    @field_validator("grader")
    @classmethod
    def _grader(cls, value):
        from ..graders import LOCAL_MODEL_GRADER, GraderError, build_grader, grader_types

        if "reward_model" in grader_types(value):
            raise ValueError(LOCAL_MODEL_GRADER)
        try:
            build_grader(value)
        except GraderError as err:
            raise ValueError(err.message) from None
        return value


class Method(RequestBody):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _section_matches_type(self):
        for other in ("supervised", "dpo", "reinforcement"):
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.{other} is given, but method.type is '{self.type}'")
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("method.type 'reinforcement' needs method.reinforcement with its grader")
        return self


FileId = Annotated[StoredText, Field(min_length=1, max_length=40)]


class WandbSettings(RequestBody):
    """OpenAI's wandb integration: the W&B run a job's metrics go to (tuneforge's train.wandb)."""

    project: str = Field(min_length=1, max_length=128)
    name: str | None = Field(None, min_length=1, max_length=128)  # else the job's id, as OpenAI names it
    entity: str | None = Field(None, min_length=1, max_length=128)
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, max_length=50)


class Integration(RequestBody):
    type: Literal["wandb"]
    wandb: WandbSettings


class CreateJobBody(RequestBody):
    model: StoredText = Field(min_length=1, max_length=1024)
    training_file: FileId
    validation_file: FileId | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: Metadata | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    integrations: list[Integration] | None = Field(None, max_length=1)

    @field_validator("integrations")
    @classmethod
    def _wandb_installed(cls, value):
        if value and importlib.util.find_spec("wandb") is None:
            raise ValueError(
                "this server sends metrics to no integration, since wandb is not installed (its operator installs "
                "it with `pip install 'tuneforge[wandb]'`); they are in the job's events and its result file. Leave "
                "integrations out or empty"
            )
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        if value is not None and not _SUFFIX.fullmatch(value):
            raise ValueError(f"up to 64 characters from letters, digits, '.', '_' and '-', got {value!r}")
        # An empty suffix is no suffix, as OpenAI takes it: the model is named `ft:{base}:{org}::{id}`.
        return value or None

    @field_validator("validation_file")
    @classmethod
    def _validation_file(cls, value, info: ValidationInfo):
        if value is not None and value == info.data.get("training_file"):
            raise ValueError(
                "the validation file must be another file than the training file; leave it out to train without one"
            )
        return value

    @model_validator(mode="after")
    def _eval_interval_needs_validation(self):
        reinforcement = self.method.reinforcement if self.method else None
        if reinforcement and reinforcement.hyperparameters.eval_interval != "auto" and self.validation_file is None:
            raise ValueError(
                "method.reinforcement.hyperparameters.eval_interval sets how often the validation file's prompts "
                "are graded, and the job has no validation_file; give one, or leave eval_interval 'auto'"
            )
        return self

    @field_validator("hyperparameters")
    @classmethod
    def _one_place_for_hyperparameters(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("method") is not None:
            raise ValueError(
                "give hyperparameters in method.<type>.hyperparameters or in the legacy top-level "
                "hyperparameters, not both"
            )
        return value

    def files(self) -> dict[str, str]:
        """The file ids the job reads, by the parameter that names them."""
        given = {"training_file": self.training_file, "validation_file": self.validation_file}
        return {param: file_id for param, file_id in given.items() if file_id is not None}

    def integrations_list(self) -> list[dict]:
        """The integrations as the job object shows them, every field present."""
        return [integration.model_dump() for integration in self.integrations or []]

    def method_dict(self) -> dict:
        """The method as the job object shows it, with every hyperparameter present ('auto' or a value)."""
        kind = self.method.type if self.method else "supervised"
        section = getattr(self.method, kind, None) if self.method else None
        default = DpoHyperparameters() if kind == "dpo" else Hyperparameters()
        hyperparameters = (section.hyperparameters if section else self.hyperparameters) or default
        described = {"hyperparameters": hyperparameters.model_dump(exclude_none=True)}
        if kind == "reinforcement":
            described["grader"] = section.grader
        return {"type": kind, kind: described}


def processes(method: dict) -> int:
    """The processes a job trains on: its `tuneforge_processes`, or 1."""
    return method[method["type"]]["hyperparameters"].get("tuneforge_processes") or 1


def training_config(
    model: str,
    method: dict,
    seed: int,
    train_file: Path,
    validation_file: Path | None,
    output_dir: Path,
    n_examples: int | None = None,
    integrations: list[dict] | None = None,
) -> Config:
    """The run's config; with `n_examples` (known once the file is read) every 'auto' is decided;
    a wandb integration reports the run to W&B (train.report_to).

    Raises `ConfigError` for a combination tuneforge refuses, e.g. a method it does not have.
    """
    kind = method["type"]
    hyper = method[kind]["hyperparameters"]
    n_processes = processes(method)
    batch_size = hyper["batch_size"]
    if batch_size == "auto":
        batch_size = max(1, min(AUTO_BATCH_SIZE, n_examples or AUTO_BATCH_SIZE))
        batch_size = max(n_processes, batch_size // n_processes * n_processes)
    elif batch_size % n_processes:
        raise ConfigError(
            f"batch_size {batch_size} is not a multiple of tuneforge_processes {n_processes}: every process takes "
            "an equal share of each step's examples"
        )
    multiplier = 1.0 if hyper["learning_rate_multiplier"] == "auto" else hyper["learning_rate_multiplier"]
    epochs = hyper["n_epochs"]
    if epochs == "auto" and n_examples:
        epochs = auto_epochs(n_examples)
    raw = {
        "base_model": model,
        "method": {"supervised": "lora", "reinforcement": "grpo"}.get(kind, kind),
        "data": {
            "train": str(train_file),
            "validation": str(validation_file) if validation_file else None,
            "packing": False,
        },
        "train": {
            "batch_size": batch_size,
            "epochs": epochs,
            "seed": seed,
            "learning_rate": DEFAULT_LEARNING_RATE * multiplier,
            "keep_checkpoints": KEPT_EPOCH_CHECKPOINTS,
        },
        "output_dir": str(output_dir),
    }
    for integration in integrations or []:
        wandb = {key: value for key, value in integration["wandb"].items() if value is not None}
        raw["train"].update(report_to=["wandb"], wandb=wandb)
    if hyper.get("tuneforge_chat_template") is not None:
        raw["model"] = {"chat_template": hyper["tuneforge_chat_template"]}
    if kind == "dpo" and hyper["beta"] != "auto":
        raw["dpo"] = {"beta": hyper["beta"]}
    if kind == "reinforcement":
        raw["grpo"] = {"grader": method[kind]["grader"], "group_size": group_size(hyper)}
    if n_examples:
        steps_per_epoch = make_plan(load_config(raw), n_examples, n_examples, n_processes).steps_per_epoch
        raw["train"].update(save_every=steps_per_epoch, eval_every=steps_per_epoch)
    if kind == "reinforcement" and hyper["eval_interval"] != "auto":
        raw["train"]["eval_every"] = hyper["eval_interval"]
    config = load_config(raw)
    # An error about the template names the job's field, which the client wrote, not the config's key.
    config._names = {"model.chat_template": f"method.{kind}.hyperparameters.tuneforge_chat_template"}
    return config


def resolved_method(method: dict, config: Config) -> dict:
    """The method with its 'auto' values replaced by what the run uses, as OpenAI reports them."""
    kind = method["type"]
    hyper = dict(method[kind]["hyperparameters"])
    hyper.update(
        batch_size=config.train.batch_size,
        n_epochs=config.train.epochs,
        # Six significant digits: the float noise of the division goes, and a small multiplier (1e-9) stays.
        learning_rate_multiplier=float(f"{config.train.learning_rate / DEFAULT_LEARNING_RATE:.6g}"),
    )
    if kind == "dpo":
        hyper["beta"] = config.dpo.beta
    if kind == "reinforcement":
        hyper.update(
            compute_multiplier=config.grpo.group_size / GROUP_SIZE,
            eval_interval=config.train.eval_every,
            eval_samples=1,
        )
    return {**method, kind: {**method[kind], "hyperparameters": hyper}}


def group_size(hyperparameters: dict) -> int:
    """Answers sampled per prompt: tuneforge's default scaled by `compute_multiplier` (at least 2, to compare)."""
    multiplier = hyperparameters.get("compute_multiplier", "auto")
    return GROUP_SIZE if multiplier == "auto" else max(2, min(64, round(GROUP_SIZE * multiplier)))


API_ADVICE = (
    # Settings a job cannot make: the clause that advises one goes (up to its sentence's end or the bracket it
    # is in), the rest of the sentence stays.
    (re.compile(r", or set data\.format to read every row as one format"), ""),
    (re.compile(r", or set data\.(?:on_error|truncation): \w+[^.)]*"), ""),
    # A job's rows are fitted to data.max_length's default, and a reinforcement job's answers to
    # grpo.max_new_tokens', which no job field sets: the rows are what it can shorten, or its base model what it
    # can change.
    (
        re.compile(r"Raise data\.max_length or set data\.truncation: drop[^.]*\."),
        "Shorten those rows to train them whole.",
    ),
    (re.compile(r"Raise data\.max_length, (\w)"), lambda m: m[1].upper()),
    (re.compile(r"\(raise data\.max_length\)"), "(shorten the rows)"),
    (re.compile(r" or raise data\.max_length"), ""),
    (
        re.compile(r"(data\.max_length: (\d+) tokens is more than .*?); set data\.max_length .*?\)\."),
        r"\1; give the job a base model of \2 positions or more (a job's rows are fitted to \2 tokens, "
        "tuneforge's default data.max_length).",
    ),
    (
        re.compile(
            r"data\.max_length, grpo\.max_new_tokens: (a prompt of up to (\d+) tokens and an answer of up to (\d+) "
            r"make rows of (\d+), more than the \d+ positions [^;]*); lower them to sum to \d+ or less\."
        ),
        r"\1; give the job a base model of \4 positions or more (a job's prompts may have up to \2 tokens, one "
        r"fewer than tuneforge's default data.max_length, and its answers \3, the default grpo.max_new_tokens).",
    ),
    # A job validates on its validation_file or on nothing (data.validation is the file, or null without one).
    (
        re.compile(r"give data\.validation: null to train without validation \(or a fraction[^)]*\)"),
        "leave validation_file out to train without validation",
    ),
    # KTO (rated replies) has no method.type; preference pairs are what a dpo job trains on.
    (re.compile(r"set dpo\.loss: kto to train on them"), "give each prompt's chosen and rejected replies as one row"),
    (re.compile(r"Use method: dpo with dpo\.loss: kto, or give"), "Give"),
    (re.compile(r"Use method: dpo \(with a dpo section\) or method: reward \(a reward model\)"), "Use method.type dpo"),
    (
        re.compile(r"Use separate runs \(method: dpo for preference data, with dpo\.loss: kto for rated replies\)"),
        "Give rows of one kind in the job's files",
    ),
    (re.compile(r"method: lora, dora or full"), "method.type supervised"),
    (re.compile(r"method: (lora|dpo|grpo)\b"), lambda m: f"method.type {_JOB_METHOD[m[1]]}"),
)
"""The advice of training's messages in the fields a job's client sets: a config key a job cannot set
(data.format, dpo.loss, data.max_length, grpo.max_new_tokens) goes or becomes what the client can do instead
(the file's rows, `method.type`, `validation_file`, the base model)."""

_JOB_METHOD = {"lora": "supervised", "dpo": "dpo", "grpo": "reinforcement"}


def api_advice(message: str) -> str:
    """`message` (training's or the data check's) with its advice in the job's fields (`API_ADVICE`)."""
    for pattern, replacement in API_ADVICE:
        message = pattern.sub(replacement, message)
    return message
