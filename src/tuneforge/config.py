"""The run config: one strict pydantic model, loaded from YAML plus dotted CLI overrides.

Strict means: an unknown key is an error that suggests the nearest known key, and every value is
checked before any model or data is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from .errors import (
    OUT_OF_BOUNDS,
    ConfigError,
    complaint,
    declared_bounds,
    key_path,
    out_of_bounds,
    unreadable_json,
    within,
)
from .wording import nearest, suggestion, to_utf8

DEFAULT_MODEL = "smollm2-135m-instruct"
# A number in exponent form without a dot (1e3): YAML 1.1, which PyYAML reads, leaves it a string.
_EXPONENT_FORM = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")
# An environment variable left in a path once the set ones are expanded: $NAME or ${NAME}.
_VARIABLE = re.compile(r"\$(?:([A-Za-z_]\w*)|\{([^}]*)\})")


class KeysError(ValueError):
    """A mistake in how keys go together: `keys` are the dotted keys it is about, so that the error names
    the line of each (a model validator's error has no location of its own)."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


class Strict(BaseModel):
    # No inf or NaN: YAML reads `.inf` and `.nan` as numbers, and an infinite learning rate or weight decay
    # passes every lower bound, to fail at the first step. No empty string: as a path it names the
    # working directory (`output_dir: ""` would write the run there).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, str_min_length=1)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_as_written(cls, value, info):
        # pydantic takes true as the number 1: `batch_size: true` (or `yes`, `on`, which YAML reads as
        # true) would train one row a step without a word. And it reads a float from the string "1e-4"
        # (YAML 1.1 leaves a number in exponent form without a dot a string) but no integer from "1e3":
        # that is read as the number it is, so `seed: 1e3` is 1000 and `batch_size: 1.5e0` a fraction.
        annotation = cls.model_fields[info.field_name].annotation
        kinds = set(get_args(annotation)) or {annotation}
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError(
                "true or false is no number (YAML reads yes, no, on and off as true and false); give a number"
            )
        # YAML 1.1 reads `off` and `on` as false and true: a choice that offers the word takes it back.
        if isinstance(value, bool) and (word := "on" if value else "off") in kinds:
            return word
        if isinstance(value, str) and int in kinds and str not in kinds and _EXPONENT_FORM.fullmatch(value):
            return float(value)
        return value


class LoraConfig(Strict):
    r: int = Field(16, ge=1, le=1024)
    # 32.0, not 32: a config reloaded (a run's config.yaml, the config `train` runs) holds the float, and an int
    # default would hash otherwise (results_hash), as another config.
    alpha: float = Field(32.0, gt=0)
    # 0 by default: dropout on the adapter input is a sizeable share of a CPU LoRA step and barely moves
    # the validation loss (docs/LOG.md, "LoRA dropout").
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    from_layer: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="adapt only the decoder layers from this fraction of the "
        "depth up: backpropagation then stops there, so a step costs less",
    )
    use_rslora: bool = False
    loraplus_lr_ratio: float = Field(
        1.0,
        gt=0,
        description="LoRA+ (Hayou et al., 2024): the B matrices learn at this "
        "multiple of train.learning_rate; 1 is plain LoRA",
    )
    modules_to_save: list[str] | None = None
    init: str = Field(
        "default",
        description="how the adapter starts, as PEFT's init_lora_weights: default (B = 0), gaussian (A drawn from a "
        "normal of std 1/r, B = 0), pissa (A and B the base weight's top singular vectors, the base keeping the "
        "rest), pissa_niter_N (the same by a randomized SVD of N iterations, faster on large layers) or olora (A and "
        "B from a QR decomposition of the base weight); pissa and olora subtract their start from the base while "
        "training, and every adapter the run writes is converted to one on the original base (rank 2r)",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names_with_commas(cls, value):
        # LLaMA-Factory writes its lora_target as one string of names with commas (q_proj,v_proj). A module name
        # is a Python attribute name, which holds no comma, so such a string is a list of names. Any other string
        # is refused: PEFT would read it as a regular expression, which tuneforge does not take.
        if not isinstance(value, str) or value == "all-linear":
            return value
        names = [name.strip() for name in value.split(",")]
        plain = all(re.fullmatch(r"[A-Za-z_][\w.]*", name) for name in names)
        if plain and len(names) > 1:
            return names
        # LLaMA-Factory's `all`, and all-linear in another case or with another separator (all_linear, All-Linear).
        if re.sub(r"[\W_]", "", value.lower()) in ("all", "alllinear"):
            raise ValueError("every linear layer is written all-linear here")
        listed = f"[{names[0]}]" if plain else "[q_proj, v_proj]"
        raise ValueError(f"a string here is all-linear alone; write the modules as a list: {listed}")

    @field_validator("target_modules")
    @classmethod
    def _some_names(cls, value):
        # PEFT reads an empty list as no module to adapt (for an adapter on parameters alone): nothing would train.
        if value == []:
            raise ValueError(
                "an empty list adapts no layer; write all-linear for every linear layer, or list the layers to "
                "adapt, such as [q_proj, v_proj]"
            )
        # PEFT would read all-linear inside a list as the name of a module, which no model has.
        if isinstance(value, list) and "all-linear" in value:
            raise ValueError(
                "all-linear is written alone, without brackets (target_modules: all-linear), for every linear layer; "
                "a list names modules, such as [q_proj, v_proj]"
            )
        return value

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        if value not in LORA_INITS and not re.fullmatch(r"pissa_niter_[1-9]\d*", value):
            raise ValueError(
                f"{value!r} is no LoRA initialisation; use one of default, gaussian, pissa, pissa_niter_N "
                "(N iterations of a randomized SVD, such as pissa_niter_4) or olora"
            )
        return value

    @property
    def changes_base(self) -> bool:
        """PiSSA and OLoRA: the adapter starts as a part of each base weight, which leaves the base while training."""
        return self.init != "default" and self.init != "gaussian"


LORA_INITS = ("default", "gaussian", "pissa", "olora")
"""`lora.init`'s values besides pissa_niter_N."""


class RopeScaling(Strict):
    """`model.rope_scaling`: rotary positions stretched past the base's window, as transformers' config
    (`rope_parameters`), Axolotl and LLaMA-Factory write it."""

    rope_type: Literal["linear", "yarn", "llama3"] = Field(
        description="linear (position interpolation), yarn, or llama3 (Llama 3.1's); `type:` is read as rope_type"
    )
    factor: float = Field(gt=1, description="the new window is the base's times this")
    original_max_position_embeddings: int | None = Field(
        None, ge=1, description="yarn, llama3: the window the base was trained for; default: its config's"
    )
    attention_factor: float | None = Field(None, gt=0, description="yarn: the attention scale; default from factor")
    beta_fast: float | None = Field(None, gt=0, description="yarn: where extrapolation ends (32)")
    beta_slow: float | None = Field(None, gt=0, description="yarn: where interpolation begins (1)")
    low_freq_factor: float | None = Field(None, gt=0, description="llama3: required, 1 in Llama 3.1")
    high_freq_factor: float | None = Field(None, gt=0, description="llama3: required, 4 in Llama 3.1")

    @model_validator(mode="before")
    @classmethod
    def _type_as_rope_type(cls, value):
        # transformers 4.x configs, Axolotl and LLaMA-Factory write `type`; transformers 5 writes `rope_type`.
        if isinstance(value, dict) and "type" in value:
            if "rope_type" in value:
                raise ValueError("give the scaling's kind once, as rope_type (type is its older name)")
            value = {("rope_type" if k == "type" else k): v for k, v in value.items()}
        if isinstance(value, dict) and value.get("rope_type") == "dynamic":
            # Dynamic NTK recomputes the frequencies from each input's length: rows of different lengths would
            # train under different positions, and llama.cpp has no such scaling for the GGUF export.
            raise ValueError(
                "rope_type dynamic (NTK) is an inference-time scaling that changes with each input's length, so a "
                "run does not train with it; use yarn (or linear) with the same factor"
            )
        return value

    @model_validator(mode="after")
    def _llama3_frequencies(self):
        if self.rope_type == "llama3" and (self.low_freq_factor is None or self.high_freq_factor is None):
            raise ValueError(
                "rope_type llama3 needs low_freq_factor and high_freq_factor (Llama 3.1 uses 1 and 4); "
                "or use linear or yarn"
            )
        return self

    def parameters(self) -> dict:
        """The scaling as transformers' `rope_parameters` holds it: the keys set, no others."""
        return self.model_dump(exclude_none=True)


class ModelConfig(Strict):
    """How the frozen weights of `base_model` are held: what lets a large model train on little memory."""

    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="the frozen weights (the base under adapters, a teacher or reference copy): auto = the compute "
        "precision train.precision resolves to (bf16 where the hardware has it natively, else fp32); trainable "
        "weights and optimizer state stay fp32",
    )
    quantize: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none",
        description="hold the frozen base quantized with bitsandbytes, adapters training on top: nf4 or fp4 (4-bit, "
        "QLoRA) or int8; needs an adapter method (lora, dora, or distill/dpo with a lora student/policy)",
    )
    double_quant: bool = Field(
        True, description="nf4/fp4: quantize the quantization constants too (QLoRA's double quantization)"
    )
    add_tokens: list[str] = Field(
        default_factory=list,
        description="tokens to add to the tokenizer, each one id that is never split and stays in decoded answers "
        "(<tool>, ChatML's <|im_start|> on a base without it); the embeddings grow by a row each, around the mean "
        "of the others, and the listed tokens' rows train (beside LoRA: those rows alone, saved with the adapter)",
    )
    chat_template: str | None = Field(
        None,
        description="the chat template the run trains with and saves with the model, instead of the tokenizer's "
        "own: a .jinja file (relative to the config's folder), Jinja written out (it holds {% or {{), the name of "
        "one of the tokenizer's named templates, or chatml",
    )

    rope_scaling: RopeScaling | None = Field(
        None,
        description="train past the base's window: {rope_type: linear | yarn | llama3, factor: F} "
        "stretches its rotary positions F times (data.max_length up to F times its window); saved with the model",
    )

    def rope_parameters(self) -> dict | None:
        """rope_scaling as transformers' `rope_parameters` take it, or None."""
        return self.rope_scaling.parameters() if self.rope_scaling else None

    @field_validator("add_tokens", mode="before")
    @classmethod
    def _each_token_once(cls, tokens):
        # Before the types are checked: an empty token would otherwise be told only as a string too short.
        if not isinstance(tokens, list):
            return tokens
        written = [t for t in tokens if isinstance(t, str)]
        if repeated := sorted({t for t in written if written.count(t) > 1}):
            raise ValueError(f"model.add_tokens lists {', '.join(repeated)} more than once; list each once")
        if blank := [t for t in written if not t.strip()]:
            raise ValueError(
                f"model.add_tokens holds {blank[0]!r}, which is empty or only whitespace; a token needs text"
            )
        return tokens

    @model_validator(mode="before")
    @classmethod
    def _not_a_model_name(cls, value):
        # `model: PATH` is how other tools (and a first guess) name the model to tune; here that is base_model.
        if isinstance(value, str):
            raise ValueError(
                f"model holds how the base's weights are held (dtype, quantize, double_quant); the model to "
                f"fine-tune is base_model: {value}"
            )
        return value


class TrainFile(Strict):
    """A `data.train` item with a weight: how many times each of its kept training rows is seen per epoch."""

    path: str
    weight: float = Field(
        1.0,
        gt=0,
        description="times each kept training row of the file is seen per epoch: 2 = every row twice, 0.5 = half "
        "of its rows, 1.5 = every row once and half of them twice (the half chosen by content hash, the same "
        "rows on every run); validation rows are never weighted",
    )


def folder_files(path: str) -> list[str]:
    """The files a `data.train` entry names: a file itself; a folder's files at any depth in name order (a
    folder of documents, `.txt`/`.md`, one each), hidden ones (`.git`, `.DS_Store`) left out, so that its
    other files are refused by name when read. An empty folder stays itself, which reading refuses."""
    if not os.path.isdir(path):
        return [path]
    root = Path(path)
    files = sorted(
        str(file)
        for file in root.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(root).parts)
    )
    return files or [path]


class DataConfig(Strict):
    train: str | list[str | TrainFile]
    validation: str | float | None = 0.1
    format: Literal["auto", "chat", "alpaca", "sharegpt", "prompt_completion", "text", "preference", "kto"] = "auto"
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    max_length: int = Field(1024, ge=8)
    truncation: Literal["truncate", "drop", "split"] = Field(
        "truncate",
        description="a row over max_length: truncate (its end is not trained) | drop | split (text rows only: "
        "the document is cut into consecutive windows of max_length tokens that train each token once)",
    )
    packing: bool = True
    share_prefixes: bool = Field(
        True,
        description="packed rows hold a prefix that examples share (a common system "
        "prompt) once; exact, and used where training attention is per_example",
    )
    dedup: Literal["none", "exact", "near"] = "exact"
    near_dedup_threshold: float = Field(0.85, gt=0, le=1)
    on_error: Literal["strict", "skip"] = "strict"
    pii: Literal["warn", "refuse", "redact", "off"] = Field(
        "warn",
        description="secrets and personal data in the rows: warn of each | refuse the data | redact: train on "
        "typed placeholders (<EMAIL>, <API_KEY>) in their place | off: do not look",
    )
    general_mix: float = Field(
        0.0, ge=0, le=0.5, description="share of the training set that is general replay data, against forgetting"
    )
    general_replay: str = Field(
        "chitchat",
        description="the replay conversations: chitchat (bundled human chit-chat, MIT) or a chat JSONL "
        "file, such as a model's own replies to general prompts written by `tuneforge distill generate`",
    )

    @field_validator("validation")
    @classmethod
    def _fraction(cls, v):
        if isinstance(v, float) and not 0 <= v < 1:
            raise ValueError("a validation fraction must be in [0, 1); or give a file path")
        return v

    @field_validator("train", mode="before")
    @classmethod
    def _train_items(cls, v):
        # Each mapping item is checked here, so that a mistake names its file, its place in the list and
        # its field once (the union of a path and a mapping would otherwise complain as both).
        if not isinstance(v, list):
            return v
        items = []
        for i, item in enumerate(v):
            if not isinstance(item, dict):
                items.append(item)
                continue
            try:
                items.append(TrainFile.model_validate(item))
            except ValidationError as e:
                error = e.errors()[0]
                field = ".".join(str(part) for part in error["loc"])
                which = f"data.train[{i}]" + (f" ({item['path']})" if isinstance(item.get("path"), str) else "")
                if error["type"] == "extra_forbidden":
                    said = f"unknown key {field}; an item takes path and weight"
                elif error["type"] == "missing":
                    said = f"{field} is required: the data file to read"
                elif field == "weight":
                    said = (
                        f"weight {item['weight']!r} is not a number above 0; give how many times each of its "
                        "training rows is seen per epoch (2: twice, 0.5: half of them), or leave the file out"
                    )
                else:
                    said = f"{field}: {complaint(error)}"
                raise KeysError(f"{which}: {said}", f"{i}.{field}") from None
        return items

    @model_validator(mode="after")
    def _each_file_once(self):
        # Dedup drops every row of a file's second listing as a repeat of its first: listed twice, a
        # file is not seen more often, and the report counts its rows as duplicates within one file.
        seen: dict[str, str] = {}
        for name in self.train_files:
            listed = seen.setdefault(os.path.realpath(name), name)
            if listed != name or self.train_files.count(name) > 1:
                if self.dedup == "none":
                    break
                raise KeysError(
                    f"data.train lists {name} more than once{'' if listed == name else f' (also as {listed})'}; "
                    f"with data.dedup: {self.dedup} every row of a later listing is a duplicate of the first and "
                    "is left out, so the file is not seen more often. List it once, or set data.dedup: none "
                    "to train on each listing",
                    "train",
                )
        return self

    @model_validator(mode="after")
    def _split_text_only(self):
        # A conversation or a preference pair cut into windows would train replies apart from their prompts.
        if self.truncation == "split" and self.format not in ("auto", "text"):
            raise KeysError(
                f"data.truncation: split cuts text documents into windows, but data.format is {self.format}: "
                "a window of a conversation would train a reply without its prompt. Use data.truncation: "
                'truncate or drop for it, or data.format: text for rows of raw text ({"text": ...})',
                "truncation",
            )
        return self

    @property
    def train_files(self) -> list[str]:
        """The training files, a folder of `data.train` as the files in it (`folder_files`)."""
        items = [self.train] if isinstance(self.train, str) else [getattr(f, "path", f) for f in self.train]
        return [file for item in items for file in folder_files(item)]

    @property
    def train_weights(self) -> list[float]:
        """Each training file's weight (`TrainFile.weight`; 1 for a plain path, a folder's for each of its
        files), in the order of `train_files`."""
        items = [self.train] if isinstance(self.train, str) else self.train
        return [getattr(f, "weight", 1.0) for f in items for _ in folder_files(getattr(f, "path", f))]

    @property
    def weighted(self) -> bool:
        return any(w != 1 for w in self.train_weights)


# Hugging Face's schedules that tuneforge has no value of its own for, and the nearest of its own.
HF_SCHEDULERS = {
    "constant_with_warmup": "constant (which warms up over train.warmup, then holds the learning rate)",
    "cosine_with_restarts": "cosine (one decay to 0, without restarts)",
    "cosine_with_min_lr": "cosine (which decays towards 0, with no floor)",
    "polynomial": "linear (a polynomial of power 1, decaying to 0)",
    "inverse_sqrt": "constant or linear",
    "warmup_stable_decay": "constant or linear",
    "reduce_lr_on_plateau": "constant or linear",
}


class WandbConfig(Strict):
    """Weights & Biases' run, for train.report_to: [wandb]. A key left out takes its environment variable."""

    project: str | None = Field(None, description="the W&B project (WANDB_PROJECT; else tuneforge)")
    entity: str | None = Field(None, description="the W&B team or user (WANDB_ENTITY; else your default entity)")
    name: str | None = Field(None, description="the W&B run's name (WANDB_NAME; else the run folder's name)")
    tags: list[str] | None = Field(None, description="the W&B run's tags (WANDB_TAGS, comma-separated)")


class MlflowConfig(Strict):
    """MLflow's run, for train.report_to: [mlflow]. A key left out takes its environment variable."""

    tracking_uri: str | None = Field(
        None, description="the MLflow tracking server (MLFLOW_TRACKING_URI; else MLflow's default)"
    )
    experiment: str | None = Field(None, description="the MLflow experiment (MLFLOW_EXPERIMENT_NAME; else tuneforge)")


TRACKERS = ("tensorboard", "wandb", "mlflow")


class TrainConfig(Strict):
    epochs: Literal["auto"] | int = "auto"
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(
        8, ge=1, description="rows (sequences or packed rows) per optimizer step, all ranks together"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step on each rank")
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw",
        description="adamw (torch) or bitsandbytes' 8-bit AdamW, which holds the optimizer state in a quarter of the "
        "memory; paged_adamw_8bit pages that state to host memory under pressure (CUDA only: on a CPU it runs as "
        "adamw_8bit)",
    )
    adam_beta1: float = Field(
        0.9, ge=0, lt=1, description="AdamW's decay rate of its running mean of the gradients (every train.optimizer)"
    )
    adam_beta2: float = Field(
        0.999,
        ge=0,
        lt=1,
        description="AdamW's decay rate of its running mean of the squared gradients (every train.optimizer); "
        "0.95 is usual with large batches or bf16",
    )
    adam_epsilon: float = Field(
        1e-8, gt=0, description="added to the root of AdamW's squared-gradient mean (every train.optimizer)"
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="the learning rate after train.warmup (each schedule warms up first, constant too): cosine "
        "and linear decay towards 0 at the end of the run, constant holds it",
    )
    warmup: float = Field(0.03, ge=0, description="a fraction of all steps if < 1, else a number of steps")
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="clip the trained weights' gradients to this global norm each step (metrics' grad_norm is "
        "their norm before clipping, as in Hugging Face); null: no clipping",
    )
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    attention: Literal["per_example", "model"] = Field(
        "per_example",
        description="per_example: each packed example attends to itself alone, computed example by "
        "example (faster; models with plain causal attention); model: the model's own attention with a block mask",
    )
    freeze_embeddings: bool = False
    kl_to_base: float = Field(
        0.0, ge=0, description="weight of a KL(base || tuned) penalty on trained tokens, against forgetting"
    )
    replay_loss: Literal["ce", "kl_to_base"] = Field(
        "ce",
        description="how the general replay examples of data.general_mix train: ce = cross-entropy on their "
        "text; kl_to_base = KL(base || tuned) on their trained tokens, holding the model to the base's own "
        "distribution there instead of teaching it the replay's style (the base model runs on replay rows only)",
    )
    neftune_alpha: float = Field(
        0.0,
        ge=0,
        description="NEFTune: uniform noise of up to alpha / sqrt(L * d) on the input embeddings in training "
        "forwards (L = the example's length, packed or not; d = hidden size); 5 is the paper's usual value, 0 = off",
    )
    seed: int = 42
    eval_every: int = Field(50, ge=0, description="0 evaluates only at the end")
    eval_samples: int = Field(
        0,
        ge=0,
        description="validation prompts the model answers greedily at each validation and at the end, beside their "
        "reference replies (the same prompts each time), into samples.jsonl, the console, the dashboard and the "
        "trackers; an answer that never ends its turn is flagged 'did not stop'; 0 = off (Axolotl's eval_table_size). "
        "Off by default: on a CPU, 4 answers at each of the quickstart's 2 validations add 3-12% to its time",
    )
    eval_max_new_tokens: int = Field(
        128, ge=1, description="the most tokens a sample answer of train.eval_samples runs to (Axolotl's name)"
    )
    save_every: int = Field(50, ge=0, description="0 saves only at the end")
    keep_checkpoints: int = Field(2, ge=1)
    early_stopping_patience: int = Field(
        0,
        ge=0,
        description="stop after this many validations in a row (every train.eval_every steps) without a better "
        "valid_loss, and finish the run there (final validation, final model, eval section); 0 = off",
    )
    early_stopping_threshold: float = Field(
        0.0,
        ge=0,
        description="the least fall of valid_loss below the best so far that counts as better (for "
        "early_stopping_patience and keep_best)",
    )
    keep_best: bool = Field(
        False,
        description="the final model is the weights of the validation with the best valid_loss (not the last "
        "step's): each validation that improves on the best saves a checkpoint (besides train.save_every), and "
        "train.keep_checkpoints never removes the best one",
    )
    log_every: int = Field(
        1,
        ge=1,
        description="steps between records in metrics.jsonl; a record's train_ metrics and tokens_per_s are those "
        "of all the steps since the last record, per trained token (as one step over their rows would report), "
        "its lr and grad_norm the last step's",
    )
    distributed_timeout: float = Field(
        1800,
        gt=0,
        description="seconds a process of a multi-process run waits for the others at any collective "
        "before it stops the run with an error naming its rank and phase",
    )
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="how several processes share the model: ddp keeps a full copy in each; fsdp shards weights, "
        "gradients and optimizer state over them (FSDP2), for models one device cannot train alone; auto is "
        "fsdp for full fine-tuning and ddp for adapters",
    )
    cpu_offload: bool = Field(
        False,
        description="fsdp only: keep each process's shards of the weights and optimizer state in CPU memory "
        "and run the optimizer step there (slower; for models whose shards do not fit the devices)",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] | None = Field(
        None,
        description="experiment trackers that get metrics.jsonl's records and the config (Hugging Face's "
        "report_to): tensorboard, wandb, mlflow; none or [] for none; unset: tensorboard where it is installed",
    )
    wandb: WandbConfig = WandbConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v):
        # Hugging Face's report_to also takes one name, or "none"; its "all" (whatever is installed) is not offered.
        if isinstance(v, str):
            if v == "none":
                return []
            if v == "all":
                raise ValueError(f"name the trackers, such as [{', '.join(TRACKERS)}]")
            return [v]
        return v

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler(cls, v):
        # Hugging Face's lr_scheduler_type names (also Axolotl's and LLaMA-Factory's): a run brought from
        # there learns which of ours is nearest, and how it differs.
        if isinstance(v, str) and v in HF_SCHEDULERS:
            raise ValueError(
                f"Hugging Face's {v} schedule is not offered; the nearest here is {HF_SCHEDULERS[v]}. Give cosine, "
                "linear or constant: each warms up over train.warmup first"
            )
        return v

    @field_validator("max_grad_norm", mode="before")
    @classmethod
    def _no_clipping_is_null(cls, v):
        # Hugging Face and Axolotl turn clipping off with max_grad_norm: 0; here null does.
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0:
            raise ValueError("0 would clip every gradient to nothing; give null (~) to train without clipping")
        return v

    @field_validator("epochs", mode="before")
    @classmethod
    def _whole_epochs(cls, v):
        # Hugging Face's num_train_epochs may be a fraction (part of a last pass); here a step count says that.
        if isinstance(v, float) and math.isfinite(v) and not v.is_integer():
            raise ValueError(
                f"epochs counts whole passes over the data; for {v:g} of them, set train.max_steps to that many "
                "epochs' steps (`tuneforge validate` shows the steps an epoch takes)"
            )
        return v

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v):
        if isinstance(v, int) and not 1 <= v <= 100:
            raise ValueError(f"must be 'auto' or an integer of {within({'ge': 1, 'le': 100})}")
        return v


class DistillConfig(Strict):
    """`method: distill`: the student learns from the teacher's next-token distributions as well as the labels."""

    teacher: str | None = Field(
        None, description="the teacher model, named like base_model; required with method: distill"
    )
    student: Literal["full", "lora"] = Field(
        "lora", description="what of the student trains; lora uses the lora section"
    )
    alpha: float = Field(
        0.5, ge=0, le=1, description="weight of the cross-entropy on the labels; 1 - alpha weighs the divergence"
    )
    temperature: float = Field(2.0, gt=0, description="softens both distributions before they are compared")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="jsd only: the teacher's share of the mixture")
    positions: Literal["answers", "all"] = Field(
        "answers",
        description="where the divergence is taken: the trained tokens, or every token of an example up to its last "
        "trained one, prompt included (more of the teacher's signal per example, for a student cut from the "
        "teacher's layers); the cross-entropy stays on the trained tokens",
    )
    teacher_top_k: int | None = Field(
        None,
        ge=1,
        description="run the teacher once before training and keep its k likeliest tokens' logits at every "
        "trained position (cached on disk for later runs on the same rows), instead of running it every step; "
        "forward_kl only",
    )

    @model_validator(mode="after")
    def _top_k_needs_forward_kl(self):
        # Compared with the default, not looked up among the keys given: a run's config.yaml writes every key.
        if self.divergence != "jsd" and self.jsd_beta != DistillConfig.model_fields["jsd_beta"].default:
            raise KeysError(
                f"distill.jsd_beta weighs the mixture of divergence: jsd, which {self.divergence} has not, so it "
                "would be ignored; set divergence: jsd, or leave jsd_beta out",
                "jsd_beta",
                "divergence",
            )
        if self.teacher_top_k is not None and self.divergence != "forward_kl":
            raise KeysError(
                f"distill.teacher_top_k keeps the teacher's k likeliest tokens only, which {self.divergence} cannot "
                "use (it needs the teacher's probability of every token the student proposes); set divergence: "
                "forward_kl, or leave teacher_top_k out to run the teacher at every step",
                "teacher_top_k",
                "divergence",
            )
        return self


class DPOConfig(Strict):
    """`method: dpo`: preference tuning on (chosen, rejected) pairs, against a frozen reference model
    (sigmoid, ipo) or without one (simpo, orpo), or on single replies rated desirable or undesirable (kto)."""

    beta: float = Field(
        0.1,
        gt=0,
        description="sigmoid, ipo, kto: how far the policy may move from the reference, higher keeps it closer; simpo: "
        "the scale of the per-token reward (2.0 when not given, the paper's 2.0-2.5); orpo: unused",
    )
    loss: Literal["sigmoid", "ipo", "simpo", "orpo", "kto"] = Field(
        "sigmoid",
        description="sigmoid: DPO's logistic loss; ipo: squared distance of the log-ratio margin to 1 / (2 beta); "
        "simpo and orpo need no reference model: simpo: the logistic loss on the per-token mean log-probabilities, "
        "less a margin simpo_gamma; orpo: the chosen reply's per-token NLL plus orpo_lambda times the odds-ratio loss; "
        "kto: KTO on rated replies (data with a true/false label, not pairs), against the reference and a KL estimate",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="sigmoid and simpo only: the share of pairs assumed to be labelled the wrong way round "
        "(conservative DPO)",
    )
    simpo_gamma: float = Field(
        1.0,
        ge=0,
        description="simpo only: the target reward margin gamma (TRL's CPOConfig.simpo_gamma); the paper's "
        "gamma / beta is about 0.5",
    )
    orpo_lambda: float = Field(
        0.1,
        gt=0,
        description="orpo only: the weight of the odds-ratio loss beside the chosen reply's NLL (TRL's "
        "ORPOConfig.beta, the paper's lambda)",
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        description="kto only: the weight of a desirable reply's loss (TRL's KTOConfig.desirable_weight); the paper "
        "keeps desirable_weight x desirable rows / (undesirable_weight x undesirable rows) in [1, 4/3]",
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="kto only: the weight of an undesirable reply's loss (TRL's KTOConfig.undesirable_weight)",
    )
    policy: Literal["full", "lora"] = Field(
        "lora",
        description="what trains; lora uses the lora section and its disabled adapter is the reference, full keeps "
        "a frozen copy (sigmoid, ipo and kto; simpo and orpo have no reference)",
    )

    @model_validator(mode="after")
    def _simpo_beta(self):
        # SimPO's beta scales a per-token mean, not a sequence log-ratio: DPO's 0.1 would barely train it.
        if self.loss == "simpo" and "beta" not in self.model_fields_set:
            self.beta = SIMPO_BETA
        return self

    @property
    def has_reference(self) -> bool:
        """Whether the loss compares the policy with a reference model (sigmoid, ipo, kto), which the run holds or
        runs."""
        return self.loss in ("sigmoid", "ipo", "kto")


SIMPO_BETA = 2.0


class GRPOConfig(Strict):
    """`method: grpo`: reinforcement fine-tuning. The policy samples answers to the data's prompts, a
    grader scores them, and each answer is reinforced by how it scored against the others to its prompt."""

    grader: dict | str | list[str] | None = Field(
        None,
        description="the grader, as OpenAI's reinforcement fine-tuning takes it (string_check, text_similarity, "
        "python, multi, or json_fields), inline or in a JSON/YAML file; or TRL-style reward functions, "
        "FILE.py:FUNCTION or a list of them (summed); required with method: grpo",
    )
    grader_weights: list[float] | None = Field(
        None,
        description="with a list of reward functions in grader: one weight each, the reward their weighted sum "
        "(TRL's reward_weights)",
    )
    group_size: int = Field(4, ge=2, le=64, description="answers sampled per prompt; each is judged against its group")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="longest answer sampled")
    temperature: float = Field(1.0, gt=0, le=2, description="sampling temperature of the answers")
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(
        0.04, ge=0, description="weight of the KL penalty that keeps the policy near the reference (0: no penalty)"
    )
    loss: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="grpo: mean over answers of each answer's mean token loss, advantages scaled by the group's "
        "std; dr_grpo: token losses summed over max_new_tokens, advantages not scaled; dapo: mean over every "
        "token of the step",
    )
    skip_uniform_groups: bool = Field(
        False,
        description="train only on the groups whose answers scored differently (DAPO's dynamic sampling without "
        "refill): a group scored alike has zero advantages and would train its KL penalty alone; the step's "
        "compute goes to the answers that teach",
    )
    policy: Literal["full", "lora"] = Field(
        "lora",
        description="what trains; lora uses the lora section and its disabled adapter is the reference, full keeps "
        "a frozen copy",
    )


class RewardConfig(Strict):
    """`method: reward`: a reward model trained on (chosen, rejected) pairs, the base loaded as a sequence
    classifier with one output (its score at a reply's last token) and the Bradley-Terry loss
    -log sigmoid(r_chosen - r_rejected) (TRL's RewardTrainer)."""

    trains: Literal["lora", "dora", "full"] = Field(
        "lora",
        description="what trains: lora or dora adapters (the lora section) with the score head trained whole, "
        "or every weight (full)",
    )
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="weight of the penalty (r_chosen + r_rejected)^2 that keeps the rewards centred on 0 (TRL's "
        "RewardConfig.center_rewards_coefficient; 0.01 is common); none when not given",
    )


class BenchmarkConfig(Strict):
    """One multiple-choice file of `eval.benchmarks`; a plain path is `{file: PATH}`."""

    file: str = Field(description="the multiple-choice file (MMLU, ARC, HellaSwag, PIQA layouts, or your own quiz)")
    num_fewshot: int = Field(
        0,
        ge=0,
        description="solved examples before each question, as lm-evaluation-harness's few-shot prompts (MMLU's "
        "published figures are 5-shot, ARC's 25-shot)",
    )
    fewshot_file: str | None = Field(
        None, description="the file the examples are drawn from (a dev or train split); default: file, less the row"
    )

    @model_validator(mode="before")
    @classmethod
    def _path_as_file(cls, value):
        return {"file": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _examples_asked(self):
        if self.fewshot_file is not None and not self.num_fewshot:
            raise ValueError(
                f"fewshot_file {self.fewshot_file} gives the solved examples shown before each question, but "
                "num_fewshot is 0; set num_fewshot (5 for MMLU's published figures, 25 for ARC's)"
            )
        return self


class EvalConfig(Strict):
    """What runs on the final model when training ends (`eval/after_training.py`)."""

    task: str | None = Field(
        None,
        description="metric for the base and the final model's answers to the prompts of "
        "the data.validation file, side by side: auto, exact, contains, json_fields or support_triage",
    )
    grader: dict | str | list[str] | None = Field(
        None,
        description="with task: also score the answers with a grader, as grpo.grader takes it (a grader object, a "
        "JSON/YAML file with one, or reward functions as FILE.py:FUNCTION); a grpo run's default is grpo.grader",
    )
    forgetting: bool = Field(False, description="measure base vs final model on general data no training touches")
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=list,
        description="multiple-choice benchmark files (MMLU, ARC, HellaSwag, PIQA layouts, or your own quiz) the base "
        "and the final model are scored on by log-likelihood, side by side: acc, acc_norm and the paired change; "
        "each a path, or {file, num_fewshot, fewshot_file} for few-shot prompts",
    )

    @property
    def asked(self) -> bool:
        """Whether the run is evaluated after training (a task, forgetting or multiple-choice benchmarks)."""
        return bool(self.task or self.forgetting or self.benchmarks)


class Config(Strict):
    base_model: str = DEFAULT_MODEL
    model: ModelConfig = ModelConfig()
    method: Literal["full", "lora", "dora", "distill", "dpo", "grpo", "reward"] = "lora"
    lora: LoraConfig = LoraConfig()
    distill: DistillConfig = DistillConfig()
    dpo: DPOConfig = DPOConfig()
    grpo: GRPOConfig = GRPOConfig()
    reward: RewardConfig = RewardConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output_dir: str = "runs/run"
    # Where each key was set ("line 8" of the file `_source`, or "override"), by dotted key: `load_config`
    # fills them in, and keeps them for a Config loaded again.
    _source: str = PrivateAttr("config")
    _places: dict[str, str] = PrivateAttr(default_factory=dict)
    # The name a key has where it was written under another one (a fine-tuning job's field), by dotted key.
    _names: dict[str, str] = PrivateAttr(default_factory=dict)

    def base_source(self, *, pull_missing: bool = True):
        """The base model's source (`models.sources.resolve`); one that cannot be resolved is refused naming the
        line that set base_model, as a missing data file is."""
        from .models.sources import resolve_at

        return resolve_at(self.base_model, self.key_at("base_model"), pull_missing=pull_missing)

    def key_at(self, key: str) -> str:
        """`key (where it was set)`, for a mistake found after loading, against the model or the data; a key
        written under another name (`_names`) is named as it was written."""
        if key in self._names:
            return self._names[key]
        return _placed(key, {k: p if p == "override" else f"{self._source} {p}" for k, p in self._places.items()})

    @model_validator(mode="after")
    def _consistent(self):
        if self.train.batch_size % self.train.grad_accum:
            raise KeysError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of train.grad_accum "
                f"({self.train.grad_accum}): each optimizer step is batch_size rows split into grad_accum "
                "micro-batches",
                "train.batch_size",
                "train.grad_accum",
            )
        if self.model.add_tokens:
            self._check_added_tokens()
        if self.method == "distill" and not self.distill.teacher:
            raise KeysError(
                "method: distill needs distill.teacher (a model named like base_model)", "method", "distill.teacher"
            )
        # A teacher or grader under another method would be ignored: a config that forgot `method:`
        # (lora by default) would train plain SFT with no teacher or grader, and say nothing.
        for section, key, value in (
            ("distill", "teacher", self.distill.teacher),
            ("grpo", "grader", self.grpo.grader),
            ("grpo", "grader_weights", self.grpo.grader_weights),
            ("reward", "trains", self.reward.trains if self.reward.trains != "lora" else None),
            ("reward", "center_rewards_coefficient", self.reward.center_rewards_coefficient),
        ):
            if value and self.method != section:
                raise KeysError(
                    f"{section}.{key} is set, but method: {self.method} does not use the {section} section, so it "
                    f"would be ignored; set method: {section}, or leave {section}.{key} out",
                    f"{section}.{key}",
                    "method",
                )
        if self.method == "grpo":
            if not self.grpo.grader:
                raise KeysError(
                    "method: grpo needs grpo.grader (a grader object, a JSON/YAML file with one, or reward "
                    "functions as FILE.py:FUNCTION)",
                    "method",
                    "grpo.grader",
                )
            # Each prompt and its sampled answers are rows of their own, padded, and sampling needs a KV cache.
            for section, key, value in ((self.data, "packing", False), (self.train, "attention", "model")):
                if getattr(section, key) != value:
                    if key in section.model_fields_set:
                        name = f"{'data' if section is self.data else 'train'}.{key}"
                        raise KeysError(
                            f"method: grpo samples answers to each prompt on its own, in padded rows; set {name} to "
                            f"{str(value).lower()}",
                            "method",
                            name,
                        )
                    setattr(section, key, value)
        no_samples = {
            "grpo": "method: grpo writes its sampled answers to rollouts.jsonl and grades its validation answers "
            "(valid_reward)",
            "dpo": "method: dpo validates on preference pairs, whose rewards/* metrics show the replies it prefers",
            "reward": "method: reward scores replies and writes none (its accuracy and margin show how it ranks them)",
        }.get(self.method)
        if self.data.train_on == "all" and not no_samples:
            no_samples = (
                "data.train_on: all trains the prompts too, so a validation row has no prompt apart from its reply"
            )
        if self.train.eval_samples and no_samples:
            raise KeysError(
                f"train.eval_samples answers the validation prompts of SFT and distill runs, and {no_samples}; "
                "leave train.eval_samples out (or 0)",
                "train.eval_samples",
                "method" if self.method in ("dpo", "grpo", "reward") else "data.train_on",
            )
        if self.model.quantize != "none" and not self.trains_adapters:
            raise KeysError(
                f"model.quantize: {self.model.quantize} holds the base frozen in a few bits, but {self.trained_what} "
                "trains every weight; train adapters on it (method: lora or dora, or distill.student / dpo.policy: "
                "lora), or set model.quantize: none",
                "model.quantize",
                self.trained_what.split(":")[0],
            )
        if self.model.dtype == "bf16" and self.train.precision == "fp32":
            raise KeysError(
                "model.dtype: bf16 holds the frozen weights in bf16, which computes in bf16; set train.precision to "
                "bf16 or auto (or model.dtype to fp32 or auto)",
                "model.dtype",
                "train.precision",
            )
        sft_only = [
            key
            for key, on in (
                ("train.kl_to_base", self.train.kl_to_base),
                ("train.replay_loss: kl_to_base", self.train.replay_loss == "kl_to_base"),
                ("train.neftune_alpha", self.train.neftune_alpha),
            )
            if on
        ]
        if sft_only and self.method in ("distill", "dpo", "grpo", "reward"):
            raise KeysError(
                f"method: {self.method} does not take {', '.join(sft_only)}: these shape the SFT "
                f"objective of methods full, lora and dora, and {self.method} "
                + (
                    "scores pairs, not tokens"
                    if self.method == "reward"
                    else "compares the model with a teacher or reference already"
                )
                + "; leave them out",
                "method",
                *(key.split(":")[0] for key in sft_only),
            )
        if self.train.replay_loss == "kl_to_base" and not self.data.general_mix:
            raise KeysError(
                "train.replay_loss: kl_to_base applies to the replay examples that data.general_mix adds; "
                "set data.general_mix above 0, or replay_loss to ce",
                "train.replay_loss",
                "data.general_mix",
            )
        if self.method in ("dpo", "grpo", "reward") and self.data.general_mix:
            raise KeysError(
                f"data.general_mix mixes SFT conversations into training, which method: {self.method} does not "
                "train on; set it to 0",
                "method",
                "data.general_mix",
            )
        if self.eval.grader and not self.eval.task:
            raise KeysError(
                "eval.grader scores the answers of the evaluation eval.task asks for; set eval.task too (auto "
                "picks a metric from the data), or leave eval.grader out",
                "eval.grader",
            )
        if self.eval.task and not isinstance(self.data.validation, str):
            raise KeysError(
                "eval.task scores answers to the prompts of the data.validation file; give "
                "data.validation as a file path (a fraction has no file), or leave eval.task out",
                "eval.task",
                "data.validation",
            )
        if self.data.format == "preference" and self.method not in ("dpo", "reward"):
            raise KeysError(
                f"data.format: preference reads each row as a chosen and a rejected reply, which method: {self.method} "
                "cannot train on; set method: dpo or reward, or data.format to the format of the rows (or auto)",
                "data.format",
                "method",
            )
        if self.method == "grpo" and self.data.weighted:
            raise KeysError(
                "data.train weights repeat the examples of the data pipeline, but method: grpo samples its "
                "prompts from the files as they are, so a weight would be ignored; list the files as plain paths",
                "method",
                "data.train",
            )
        if self.method in ("dpo", "reward") and self.data.train_on == "all":
            raise KeysError(
                f"data.train_on: all trains the prompt too, but method: {self.method} compares the chosen and "
                "rejected replies alone (each reply and its end of turn), so it would be ignored; leave data.train_on "
                "out",
                "method",
                "data.train_on",
            )
        t = self.train
        judged = [f"train.{key}" for key in ("early_stopping_patience", "keep_best") if getattr(t, key)]
        they, judge = " and ".join(judged), "judge" if len(judged) > 1 else "judges"
        if t.early_stopping_threshold and not judged:
            raise KeysError(
                "train.early_stopping_threshold is the fall of valid_loss that counts as better for "
                "train.early_stopping_patience or train.keep_best, and neither is set, so it would be ignored; set "
                "one of them, or leave early_stopping_threshold out",
                "train.early_stopping_threshold",
            )
        if judged and self.method == "grpo":
            raise KeysError(
                f"{they} {judge} validations by valid_loss, and method: grpo validates by the reward of its "
                f"answers (valid_reward), with no loss; leave {'them' if len(judged) > 1 else 'it'} out",
                "method",
                *judged,
            )
        if judged and not self.data.validation:
            given = "null" if self.data.validation is None else self.data.validation
            raise KeysError(
                f"{they} {judge} the run by its valid_loss, and data.validation is {given}, so there is none; set "
                "data.validation to a file or a fraction (such as 0.1)",
                *judged,
                "data.validation",
            )
        if judged and not t.eval_every:
            raise KeysError(
                f"{they} {judge} each validation during the run, and train.eval_every: 0 validates "
                "at the end alone; set train.eval_every to the steps between validations (such as 50)",
                *judged,
                "train.eval_every",
            )
        self._check_dpo_keys()
        self._check_lora_init()
        return self

    def _check_lora_init(self) -> None:
        """PiSSA and OLoRA train on a base with the adapter's start taken out: refuse what needs the base as it
        was, or cannot hold the residual, before any weights load."""
        init = self.lora.init
        if not self.lora.changes_base:
            return
        if self.method in ("dpo", "grpo"):
            raise KeysError(
                f"lora.init: {init} takes the adapter's start out of the base weights while training, and method: "
                f"{self.method} takes its reference from the policy with the adapter switched off, which would be "
                "that residual, not the starting model; use lora.init: default or gaussian",
                "lora.init",
                "method",
            )
        if self.method not in ("lora", "dora"):
            raise KeysError(
                f"lora.init: {init} is offered for method: lora and dora, whose written adapters are converted to "
                f"the original base and checked; method: {self.method} is not; use lora.init: default or gaussian",
                "lora.init",
                "method",
            )
        if self.model.quantize != "none":
            raise KeysError(
                f"lora.init: {init} takes the adapter's start out of each base weight, which a "
                f"model.quantize: {self.model.quantize} base cannot hold exactly (the quantized residual is another "
                "model than the quantized base, so the adapter on the original base would not be the one trained); "
                "set model.quantize: none, or lora.init: default or gaussian",
                "lora.init",
                "model.quantize",
            )
        on_base = [
            key
            for key, on in (
                ("train.kl_to_base", self.train.kl_to_base),
                ("train.replay_loss", self.train.replay_loss == "kl_to_base"),
            )
            if on
        ]
        if on_base:
            raise KeysError(
                f"lora.init: {init} takes the adapter's start out of the base weights while training, and "
                f"{' and '.join(on_base)} compare the model with the base as the adapter switched off leaves it, "
                "which would be that residual, not the base; use lora.init: default or gaussian, or leave "
                f"{' and '.join(on_base)} out",
                "lora.init",
                *on_base,
            )

    def _check_dpo_keys(self) -> None:
        """Refuse a dpo key that the chosen dpo.loss does not read (a value other than its default: a run's
        saved config.yaml writes every key)."""
        d, defaults = self.dpo, DPOConfig.model_fields
        loss = d.loss
        if loss in ("ipo", "orpo", "kto") and d.label_smoothing:
            raise KeysError(
                f"dpo.label_smoothing is for loss: sigmoid or simpo (conservative DPO); {loss} has none, so set it "
                "to 0",
                "dpo.loss",
                "dpo.label_smoothing",
            )
        if loss == "orpo" and d.beta != defaults["beta"].default:
            raise KeysError(
                "loss: orpo has no beta (it compares no reference); its odds-ratio weight is dpo.orpo_lambda "
                "(TRL's ORPOConfig.beta): set that instead and leave dpo.beta out",
                "dpo.loss",
                "dpo.beta",
            )
        owners = (("simpo_gamma", "simpo"), ("orpo_lambda", "orpo"), ("desirable_weight", "kto"))
        for key, owner in (*owners, ("undesirable_weight", "kto")):
            if loss != owner and getattr(d, key) != defaults[key].default:
                raise KeysError(
                    f"dpo.{key} is for loss: {owner}, and this run's loss is {loss}; set dpo.loss: {owner}, or "
                    f"leave dpo.{key} out",
                    "dpo.loss",
                    f"dpo.{key}",
                )

    def _check_added_tokens(self) -> None:
        """model.add_tokens grows the vocabulary, which only the SFT methods train from a plain base."""
        if self.method in ("distill", "dpo", "grpo", "reward"):
            other = {
                "distill": "a teacher's vocabulary must be the student's",
                "dpo": "the reference model would score tokens it has no trained rows for",
                "grpo": "the reference model would score tokens it has no trained rows for",
                "reward": "a reward model's score does not train the embeddings of new tokens to mean anything",
            }[self.method]
            raise KeysError(
                f"model.add_tokens grows the vocabulary, which method: {self.method} cannot use ({other}); add the "
                "tokens in a method: lora, dora or full run first and give that run as base_model here",
                "model.add_tokens",
                "method",
            )
        if self.model.quantize != "none":
            raise KeysError(
                "model.add_tokens needs the embeddings resized, which a quantized base (model.quantize: "
                f"{self.model.quantize}) cannot be; train with model.quantize: none, or add the tokens in a run "
                "without quantization and give it as base_model",
                "model.add_tokens",
                "model.quantize",
            )
        if self.train.freeze_embeddings:
            raise KeysError(
                "model.add_tokens adds embedding rows that start at the mean of the others and must train, but "
                "train.freeze_embeddings: true keeps them frozen; leave one of them out",
                "model.add_tokens",
                "train.freeze_embeddings",
            )

    def check_data_files(self) -> None:
        """Refuse data files (eval.benchmarks' and the graders' files too) that do not exist before a tokenizer, model
        or row is loaded:
        each named by its key, the line that sets it, and the folders a relative path was looked for in. A folder
        that Hugging Face datasets' `save_to_disk` wrote is refused too, saying how to write its rows out: read as a
        folder of data files, its Arrow and JSON files would each be refused as files of no known kind."""
        d = self.data
        given = [("data.train", d.train)] if isinstance(d.train, str) else []
        for i, item in enumerate([] if isinstance(d.train, str) else d.train):
            given.append(
                (f"data.train.{i}.path", item.path) if isinstance(item, TrainFile) else (f"data.train.{i}", item)
            )
        if isinstance(d.validation, str):
            given.append(("data.validation", d.validation))
        for section in ("grpo", "eval"):
            grader = getattr(self, section).grader
            refs = [(f"{section}.grader", grader)] if isinstance(grader, str) else []
            refs += [(f"{section}.grader.{i}", ref) for i, ref in enumerate(grader if isinstance(grader, list) else [])]
            given += [(key, file) for key, ref in refs if (file := grader_file(ref)) is not None]
        if d.general_mix and d.general_replay != "chitchat":  # without general_mix, the replay file is not read
            given.append(("data.general_replay", d.general_replay))
        for i, benchmark in enumerate(self.eval.benchmarks):
            # A plain path is the entry itself (`- mmlu.csv`), placed as the entry.
            file_key = f"eval.benchmarks.{i}.file"
            given.append((file_key if file_key in self._places else f"eval.benchmarks.{i}", benchmark.file))
            if benchmark.fewshot_file is not None:
                given.append((f"eval.benchmarks.{i}.fewshot_file", benchmark.fewshot_file))
        # A YAML file's relative path left relative was not found beside the file (`load_config` makes a found
        # one absolute), and is read against the working directory, as an override's is.
        saved = [
            f"{self.key_at(key)}: {path} is a folder of Hugging Face datasets' save_to_disk, which is not read as "
            f"data; write its rows to a JSON Lines file (datasets.load_from_disk('{path}').to_json('FILE.jsonl')) "
            "and name that file."
            for key, path in given
            if (Path(path) / "dataset_info.json").is_file() and (Path(path) / "state.json").is_file()
        ]
        if saved:
            raise ConfigError("\n".join(saved))
        beside = Path(self._source).parent.resolve() if Path(self._source).is_file() else None
        missing = []
        for key, path in given:
            if os.path.exists(path):
                continue
            parts = key.split(".")
            overridden = any(self._places.get(".".join(parts[:n])) == "override" for n in range(1, len(parts) + 1))
            if Path(path).is_absolute():
                where = "does not exist"
            elif beside and not overridden:
                where = f"is neither in {beside} (the config's folder) nor in the working directory {Path.cwd()}"
            else:
                where = f"is not in the working directory {Path.cwd()}"
            pattern = " (a pattern is not expanded: list the files one by one)" if set("*?[") & set(path) else ""
            missing.append(f"{self.key_at(key)}: {path} {where}{pattern}")
        if missing:
            raise ConfigError("\n".join(missing) + "\nCorrect the path, or give it absolute.")

    @property
    def trains_adapters(self) -> bool:
        """Whether the trained weights are adapters over a frozen base (LoRA or DoRA), not every weight."""
        return (
            self.method in ("lora", "dora")
            or (self.method == "distill" and self.distill.student == "lora")
            or (self.method == "dpo" and self.dpo.policy == "lora")
            or (self.method == "grpo" and self.grpo.policy == "lora")
            or (self.method == "reward" and self.reward.trains != "full")
        )

    @property
    def trained_what(self) -> str:
        """The config key that says every weight trains (for messages)."""
        return {
            "distill": "distill.student: full",
            "dpo": "dpo.policy: full",
            "grpo": "grpo.policy: full",
            "reward": "reward.trains: full",
        }.get(self.method, f"method: {self.method}")

    def results_hash(self) -> str:
        """Hash of everything that changes training results (not logging or checkpoint cadence)."""
        return hashlib.sha256(json.dumps(self.results_settings(), sort_keys=True).encode()).hexdigest()[:16]

    def changed_results_settings(self, other: Config) -> list[str]:
        """`key: this value -> other's`, for each setting that changes results and differs between the two."""
        # Shown from the whole configs: a setting the hash leaves out at its default shows that default.
        return changed_settings(self.recorded_results_settings(), other, self.model_dump())

    def recorded_results_settings(self) -> dict:
        """`results_settings` as a checkpoint records them (through JSON), to be compared with a config's later
        (`changed_settings`)."""
        return json.loads(json.dumps(self.results_settings()))

    def results_settings(self) -> dict:
        """The settings that change training results: all but logging, checkpoint cadence and how the
        processes share the model."""
        d = self.model_dump()
        # How the processes share the model changes how, not what, a run computes (like their number).
        for k in (
            "eval_every",
            "eval_samples",
            "eval_max_new_tokens",
            "save_every",
            "keep_checkpoints",
            "log_every",
            "distributed_timeout",
            "distributed",
            "cpu_offload",
        ):
            d["train"].pop(k)
        d.pop("output_dir")
        d.pop("eval")
        for key in (
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "early_stopping_patience",
            "early_stopping_threshold",
            "keep_best",
        ):
            if d["train"][key] == TrainConfig.model_fields[key].default:
                d["train"].pop(key)  # added later: a run at the defaults resumes a checkpoint from before them
        for key in ("chat_template", "rope_scaling"):
            if d["model"][key] is None:
                d["model"].pop(key)  # added later: the tokenizer's own template, the base's positions, as before
        if d["lora"]["init"] == "default":
            d["lora"].pop("init")  # added later: an adapter started as before resumes a checkpoint from before it
        for section in ("distill", "dpo", "grpo", "reward"):
            if self.method != section:
                # Other methods ignore the section, and leaving it out keeps their hashes (and resumes) as they were.
                d.pop(section)
        # Options added later leave the hash as it was while they keep their defaults.
        for key, default in (("teacher_top_k", None), ("positions", "answers")):
            if key in d.get("distill", {}) and d["distill"][key] == default:
                d["distill"].pop(key)
        return d

    def to_yaml(self) -> str:
        # Each path as it reads, on its own line: é or 中文 not as \xE9 or \u4E2D escapes, a long path not
        # folded over two lines.
        return yaml.safe_dump(self.model_dump(), sort_keys=False, allow_unicode=True, width=float("inf"))


def changed_settings(then: dict, now: Config, shown: dict) -> list[str]:
    """`key: then -> now`, for each setting that changes results and differs between `then` (a config's
    `recorded_results_settings`, as a checkpoint records them) and the config `now`. Each is shown as `shown` (the
    whole config `then` is of, or `then` alone where only a checkpoint's record is left) and `now` hold it: a setting
    the hash leaves out at its default shows that default, or "unset" where `shown` leaves it out too."""
    mine, theirs = dotted(then), dotted(now.recorded_results_settings())
    shown_mine, shown_theirs = dotted(shown), dotted(now.model_dump())
    return [
        f"{key}: {shown_mine.get(key, 'unset')} -> {shown_theirs.get(key)}"
        for key in sorted(mine.keys() | theirs.keys())
        if mine.get(key) != theirs.get(key)
    ]


def dotted(d: dict, prefix: str = "") -> dict:
    """A nested dict's values by dotted key: {"train": {"seed": 1}} -> {"train.seed": 1}."""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- loading -------------------------------------------------------------------------------------


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        # A list of sections (eval.benchmarks) holds its items' keys under its own, without their index.
        item = get_args(ann)[0] if get_origin(ann) is list and get_args(ann) else None
        for section in (ann, item):
            if isinstance(section, type) and issubclass(section, BaseModel):
                keys.extend(_known_keys(section, prefix + name + "."))
    return keys


# What people coming from Hugging Face's TrainingArguments, PEFT's LoraConfig, TRL's GRPOConfig,
# Axolotl or LLaMA-Factory write, and tuneforge's key for it: their names share too little with ours
# for a spelling match to find it.
KNOWN_ELSEWHERE = {
    "model_name_or_path": "base_model",
    "adapter": "method: lora (QLoRA is method: lora with model.quantize: nf4)",
    "finetuning_type": "method",
    "datasets": "data.train",
    "dataset": "data.train",
    "val_set_size": "data.validation",
    "eval_dataset": "data.validation",
    "cutoff_len": "data.max_length",
    "train_on_inputs": "data.train_on (all trains the prompts too)",
    "quantization_bit": "model.quantize (nf4 or fp4 for 4 bits, int8 for 8)",
    "lora_rank": "lora.r",
    "lora_target": "lora.target_modules",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "eval_table_size": "train.eval_samples",
    "eval_max_new_tokens": "train.eval_max_new_tokens",
    "logging_steps": "train.log_every",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    # Their batch size is one micro-batch on one device; ours is every row of an optimizer step, so the same
    # number there trains grad_accum x processes times fewer rows a step here.
    "per_device_train_batch_size": "train.batch_size (every row of an optimizer step: "
    "per_device_train_batch_size x gradient_accumulation_steps x processes)",
    "micro_batch_size": "train.batch_size (every row of an optimizer step: "
    "micro_batch_size x gradient_accumulation_steps x processes)",
    "gradient_accumulation_steps": "train.grad_accum (train.batch_size counts the rows of all the micro-batches of "
    "a step, so multiply the per-device batch size by it there)",
    "lr": "train.learning_rate",
    "warmup_ratio": "train.warmup",
    "warmup_steps": "train.warmup",
    "lr_scheduler_type": "train.scheduler",
    "lr_scheduler": "train.scheduler",
    "save_total_limit": "train.keep_checkpoints",
    "bf16": "train.precision: bf16",
    "fp16": "train.precision",
    "optim": "train.optimizer",
    "max_seq_length": "data.max_length",
    "sequence_len": "data.max_length",
    "sample_packing": "data.packing",
    "load_in_4bit": "model.quantize: nf4",
    "load_in_8bit": "model.quantize: int8",
    "tokens": "model.add_tokens",
    "new_special_tokens": "model.add_tokens",
    "chat_template_jinja": "model.chat_template (a .jinja file, or the template written out)",
    "chat_template": "model.chat_template",
    "template": "model.chat_template",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "target_modules": "lora.target_modules",
    "use_dora": "method: dora",
    "init_lora_weights": "lora.init (default | gaussian | pissa | pissa_niter_N | olora)",
    "peft_init_lora_weights": "lora.init (default | gaussian | pissa | pissa_niter_N | olora)",
    "pissa_init": "lora.init: pissa (pissa_niter_N for pissa_iter: N)",
    "num_generations": "grpo.group_size",
    "max_completion_length": "grpo.max_new_tokens",
    "reward_funcs": "grpo.grader (FILE.py:FUNCTION, or a list of them)",
    "reward_weights": "grpo.grader_weights",
    "scale_rewards": "grpo.loss (dr_grpo leaves the advantages unscaled)",
    "load_best_model_at_end": "train.keep_best (the best is the lowest valid_loss)",
    "early_stopping_patience": "train.early_stopping_patience (validations without a better valid_loss)",
    "early_stopping_threshold": "train.early_stopping_threshold",
    "metric_for_best_model": "train.keep_best and train.early_stopping_patience, which judge by valid_loss alone "
    "(no other metric is offered)",
    "greater_is_better": "train.keep_best and train.early_stopping_patience, which judge by valid_loss alone "
    "(lower is better)",
}


def _unknown_key(key: str) -> str:
    """What an unknown key is told: tuneforge's name for a key of another trainer's, or the known key it most
    likely misspells."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf in KNOWN_ELSEWHERE:
        return f"unknown key. tuneforge calls it {KNOWN_ELSEWHERE[leaf]}."
    return f"unknown key{suggestion(_nearest_key(key))}."


def _nearest_key(key: str) -> str | None:
    """The known key that the unknown `key` most likely misspells, or None."""
    leaf = key.rsplit(".", 1)[-1]
    # A list item's key (eval.benchmarks.1.num_fewshots) is matched as its list's keys are known, without the
    # index, and a match in the same list is named with it.
    if indexed := re.match(r"(.+?)\.\d+\.", key):
        listed = indexed[1] + "."
        close = _nearest_key(listed + key[len(indexed[0]) :])
        return indexed[0] + close[len(listed) :] if close is not None and close.startswith(listed) else close
    # No suggestion rather than a wrong one: the unknown key's own sections are no match for it (`train.lr` is no
    # misspelt `train`), and a shared section prefix alone must not carry a match (`train.lr` is no `train.warmup`).
    # A key in the unknown key's own section is matched by its name alone, as a long section name
    # (`eval.benchmarks.`) would carry any of its keys past the cutoff (`eval.benchmarks.limt` is no `file`).
    section = key[: len(key) - len(leaf)]
    known = [
        k
        for k in _known_keys(Config)
        if not key.startswith(k + ".")
        and (not k.startswith(section) or "." in k[len(section) :] or nearest(leaf, [k[len(section) :]]))
    ]
    return nearest(key, known) or next((k for k in known if nearest(leaf, [k.rsplit(".", 1)[-1]])), None)


def _format_validation_error(err: ValidationError, source: str, places: dict[str, str]) -> str:
    """One line per key, naming it and where it was set (`places`: "line N" or an override, by dotted key;
    a key not set there is placed at its nearest section that is). A key that takes one of several types
    gets one line for them all: "Input should be a valid string or Input should be a valid list"."""
    said: dict[str, list[str]] = {}
    shown: dict[str, str] = {}  # the value the key was given, said once after its complaints
    for e in err.errors():
        parts = key_path(e["loc"])
        if e["type"] != "extra_forbidden" and e.get("input", ...) is None and parts and _names_model(parts[-1]):
            parts = parts[:-1]  # a null tried as a union's model (data.train's TrainFile) is the key's own null
        loc = ".".join(parts)
        # A mistake in how keys go together is told at each of its keys (below the section that found it).
        keys = getattr(e.get("ctx", {}).get("error"), "keys", ())
        named = [".".join([*parts, k]) for k in dict.fromkeys(keys)] or [loc]
        key = ", ".join(_placed(k, places) for k in named)
        if e["type"] == "extra_forbidden":
            what = _unknown_key(loc)
        elif e["type"] == "missing":
            what = "required, but not set."
        elif e.get("input", ...) is None and e["type"] != "value_error" and parts and parts[-1].isdigit():
            what = "is an empty list item (a '-' with nothing after it); give it a value or delete the line."
        elif e.get("input", ...) is None and e["type"] != "value_error":
            # `learning_rate:` with nothing after it (or a section whose keys are all commented out) is null.
            what = "has no value (YAML reads a key with nothing after it as null); give it one" + (
                "." if _required(parts) else ", or leave the key out for its default."
            )
        elif e["type"] in OUT_OF_BOUNDS:
            what = _out_of_bounds(parts, e)
        else:
            what = complaint(e)
            if (got := e.get("input")) is not None and not isinstance(got, dict):
                shown[key] = f" (got {got!r})"
        said.setdefault(key, []).append(what)
    lines = [f"{source}: invalid config"]
    lines += [f"  {key}: {' or '.join(dict.fromkeys(c))}{shown.get(key, '')}" for key, c in said.items()]
    return "\n".join(lines)


def _names_model(part: str) -> bool:
    """Whether a pydantic error's location part is the name of a model of this module: the tag of a union's
    member that is a model, as `data.train`'s items are a path or a `TrainFile`."""
    named = globals().get(part)
    return isinstance(named, type) and issubclass(named, BaseModel)


def _field(parts: list[str]) -> FieldInfo | None:
    """The config key of these parts, as its model declares it; None for a key outside the config's sections
    (a list item's, a union member's). A section that may be null (model.rope_scaling) declares its keys."""
    model, field = Config, None
    for part in parts:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        given = [a for a in get_args(field.annotation) if a is not type(None)]
        model = given[0] if len(given) == 1 and type(None) in get_args(field.annotation) else field.annotation
    return field


def _required(parts: list[str]) -> bool:
    """Whether the config key of these parts must be given (a key outside the config's sections is not)."""
    field = _field(parts)
    return field is not None and field.is_required()


def _out_of_bounds(parts: list[str], error: dict) -> str:
    """A number out of its key's bounds: all of its bounds, what the key is (its description) and what to give;
    the bound it missed alone where the bounds are not the key's own (a list item's)."""
    field = _field(parts)
    bounds = declared_bounds(field.metadata if field else ())
    if not bounds:
        return complaint(error)
    said = out_of_bounds(bounds, error["input"]) + (f": {field.description}" if field.description else "")
    if field.is_required():
        return f"{said}; give a number in range."
    default = field.get_default(call_default_factory=True)
    default = f" ({default!r})" if isinstance(default, (int, float)) and not isinstance(default, bool) else ""
    return f"{said}; give a number in range, or leave the key out for its default{default}."


def _placed(key: str, places: dict[str, str]) -> str:
    """`key (where it was set)`: its own place, or its nearest section's, or else that of a key in it (an
    override `trian.max_steps=1` places the section it misspells); a key set nowhere is left bare."""
    parts = key.split(".")
    placed = next((places[k] for n in range(len(parts), 0, -1) if (k := ".".join(parts[:n])) in places), None)
    placed = placed or next((place for k, place in places.items() if k.startswith(f"{key}.")), None)
    return f"{key} ({placed})" if placed else key or "(top level)"


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for n, p in enumerate(parts[:-1], 1):
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            held = ".".join(parts[:n])
            what = "a list, whose items an override cannot name one by one" if isinstance(nxt, list) else "no section"
            raise ConfigError(f"override {key}: {held} is {what}; give it whole, as {held}=VALUE.")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: str | Iterable[str] | None) -> list[tuple[str, Any]]:
    """`train.learning_rate=1e-4` -> ("train.learning_rate", 1e-4); values parse as YAML scalars. One
    override may come as a string alone (iterating over it would take each character for an override)."""
    if overrides is None or isinstance(overrides, str):
        overrides = [overrides] if overrides else []
    overrides = list(overrides)  # read twice: each in turn, and each earlier one again for a key given twice
    parsed = []
    for o in overrides:
        if not isinstance(o, str):
            raise ConfigError(
                f"override {o!r} is {type(o).__name__}: give each override as a KEY=VALUE string, for example "
                "train.learning_rate=1e-4"
            )
        if "=" not in o:
            raise ConfigError(f"override '{o}': expected KEY=VALUE, for example train.learning_rate=1e-4")
        key, raw = o.split("=", 1)
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(
                f"override '{o}': '{key}' is no key; give a dotted KEY=VALUE, for example train.learning_rate=1e-4"
            )
        try:
            value = load_yaml(raw, f"override '{o}': the value of {key.strip()}") if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(
                yaml_syntax_error(f"override '{o}'", e, f"the value of {key.strip()} is not valid YAML", one_line=True)
            ) from None
        key = key.strip()
        # Applied in turn, a later override replaces an earlier one of its key, or of a key in its section,
        # whole: given twice, a key would take its last value without a word, as a YAML file's would.
        for (earlier, _), given in zip(parsed, overrides):
            if earlier == key:
                raise ConfigError(f"override '{o}': {key} is already given ('{given}'); give each key once.")
            if earlier.startswith(f"{key}."):
                raise ConfigError(
                    f"override '{o}': it replaces the section {key} whole, and with it the earlier '{given}'; "
                    f"give {key} first, or each of its keys on its own."
                )
        parsed.append((key, value))
    return parsed


def _as_yaml_value(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    raise ConfigError(f"a config holds {value!r}, a {type(value).__name__}: give strings, numbers, lists and dicts.")


def load_config(source: str | Path | dict | Config, overrides: str | Iterable[str] | None = ()) -> Config:
    """Load a config from a YAML path (or, where no such file exists, a shipped recipe's name), a dict or a
    Config, apply dotted overrides, validate.

    Relative data and model paths in a YAML file are resolved against the file's folder, so a config runs
    the same from any working directory; those of overrides and dicts against the working directory.
    """
    name, places, names = "config", {}, {}
    if isinstance(source, Config):
        name, places, names, source = source._source, source._places, source._names, source.model_dump()
    if isinstance(source, dict):
        # A deep copy, with paths as the strings a YAML file would hold (Python callers pass Path objects).
        raw = json.loads(json.dumps(source, default=_as_yaml_value))
    elif not isinstance(source, (str, Path)):
        raise ConfigError(
            f"a config is a YAML file's path, a shipped recipe's name, a dict or a Config, not {type(source).__name__}."
        )
    else:
        from .recipes import config_file, nearest_recipe  # here: the recipes module checks its configs with this one

        path = config_file(source)
        if path.is_dir():
            inside = path / "config.yaml"
            raise ConfigError(
                f"{path} is a folder, not a config file; give the YAML file"
                + (f" (a run's folder holds its config: {inside})." if inside.is_file() else ".")
            )
        if not path.is_file():
            # A bare name (no folder, no suffix) may be a recipe's, misspelt.
            meant = nearest_recipe(str(source)) if path.name == str(source) and not path.suffix else None
            raise ConfigError(
                f"{path}{suggestion(meant)}: no such config file, nor a shipped recipe of that name (`tuneforge "
                "recipes` lists them). Write one (see `tuneforge validate --help`) or check the path."
            )
        # One parse: the node tree gives each key's line, and the document is built from it.
        try:
            raw, lines = load_yaml(yaml_text(path), str(path), lines=True)
        except yaml.YAMLError as e:
            raise ConfigError(yaml_syntax_error(path, e, "not valid YAML")) from None
        places = {key: f"line {line}" for key, line in lines.items()}
        if raw is None:
            raise ConfigError(
                f"{path}: the file holds no keys (it is empty, or all comments); write the run's config in it "
                "(`tuneforge recipes show quickstart` prints one to start from)."
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys (base_model, method, data, ...).")
        name = str(path)
        # The file's paths are relative to its folder, so a config runs the same from any working directory.
        _resolve_relative_paths(raw, path.parent)
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
        # The override replaces what the file said under this key.
        places = {k: v for k, v in places.items() if not k.startswith(f"{key}.")} | {key: "override"}
    if isinstance(source, (str, Path)) and path != Path(source):  # a shipped recipe, named
        from .recipes import check_earlier_outputs

        check_earlier_outputs(str(source), raw)
    # Overrides and a Python caller's paths are relative to the working directory, where the shell completes
    # them, as are a file's paths not found beside it (a recipe's runs/...): each is stored absolute, so the
    # run's config.yaml runs the same from any folder.
    _resolve_relative_paths(raw, Path.cwd(), name, places)
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, name, places)) from None
    config._source, config._places, config._names = name, places, names
    return config


MOST_KEYS = 100_000
"""Keys and list items a config may hold, its aliases expanded: thousands of times what a run's config holds."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader; an integer of more digits than Python converts (its ValueError) says its line."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError as e:
            e.line = node.start_mark.line + 1
            raise


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def yaml_syntax_error(
    path: Path | str, error: yaml.YAMLError | json.JSONDecodeError, what: str, *, one_line: bool = False
) -> str:
    """A YAML (or JSON) file's syntax error as its user reads it: the file, line and column, the parser's problem
    and what to check there (PyYAML's own message names "<unicode string>" and quotes the text). `one_line`: a
    value given on one line (an option's, an override's; `path` names it), placed by its column alone."""
    if isinstance(error, json.JSONDecodeError):
        where, problem = f" line {error.lineno}, column {error.colno}", error.msg
    else:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(error, "problem", error))
        if one_line:
            where, problem = "", problem + (f" at column {mark.column + 1}" if mark else "")
    if "'\\t'" in problem:
        do = "YAML indents with spaces, never tabs: replace the tab there with spaces"
    elif isinstance(error, json.JSONDecodeError) or "flow" in str(getattr(error, "context", "")):  # in { } or [ ]
        do = "close the brackets and quotes that open there or above, and put a comma between the items of a { } or [ ]"
    elif one_line:
        do = "close its brackets and quotes, or quote it whole as a string"
    else:
        do = (
            "check the indentation there and on the line above (a section's keys line up, indented by "
            "spaces under it), that each key has ': ' after it, and that brackets and quotes close"
        )
    return f"{path}{where}: {what} ({problem}); {do}."


def yaml_text(path: Path) -> str:
    """A YAML (or JSON) file's text, refused by file and line where it is not UTF-8 or holds a character YAML
    does not take (a NUL byte or another control character, as a binary or a UTF-16 file holds)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8 (for example "
            f"{to_utf8(path.name)})."
        ) from None
    if bad := yaml.reader.Reader.NON_PRINTABLE.search(text):
        raise ConfigError(
            f"{path} line {text.count(chr(10), 0, bad.start()) + 1}: a control character (U+{ord(bad.group()):04X}), "
            "which YAML does not take; remove it (NUL bytes mean a binary or a UTF-16 file: save it as UTF-8 text)."
        )
    return text


def load_yaml(text: str, where: str, *, loader: type = _Loader, most: int = MOST_KEYS, lines: bool = False):
    """A user's YAML text as Python values, and with `lines` the line of each of its keys (`_key_lines`). What
    YAML reads but Python gives up on (nesting too deep, an integer of too many digits), and aliases that never
    end or expand past `most` keys and list items, are a ConfigError naming `where` and the line; a syntax error
    is PyYAML's YAMLError, which each caller words for its input."""
    reader = loader(text)

    def at(line: int | None) -> str:
        """`where` with the line; text of no lines (an override, an option's value) is named without one."""
        return f"{where} line {line}" if line and "\n" in text else where

    try:
        node = reader.get_single_node()
        _check_aliases(node, at, most)
        # The lines are read first: building the document flattens each merge key (`<<: *defaults`) into its mapping.
        places = _key_lines(node, where) if lines else None
        value = reader.construct_document(node) if node is not None else None
    except (RecursionError, ValueError) as e:
        if (what := unreadable_json(e)) is None:
            raise
        # An integer's line is known; nesting stops where it is read (libyaml's reader gives no mark).
        line = getattr(e, "line", None) or (reader.get_mark().line + 1 if hasattr(reader, "get_mark") else None)
        raise ConfigError(f"{at(line)}: the YAML {what}, which no config needs; fix the value there.") from None
    finally:
        reader.dispose()
    return (value, places) if lines else value


def _check_aliases(root: yaml.Node | None, at: Callable[[int], str], most: int) -> None:
    """Refuse a document whose aliases (`*name`) never end (one inside its anchor's own value) or multiply past
    `most` keys and list items (nine of nine, nine deep, are a "billion laughs", hundreds of millions of items).
    An alias is its anchor's node again, so each node's expanded size is counted once and reused."""
    size: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)] if isinstance(root, (yaml.SequenceNode, yaml.MappingNode)) else []
    while stack:
        node, done = stack.pop()
        inner = [v for _, v in node.value] if isinstance(node, yaml.MappingNode) else node.value
        inner = [n for n in inner if isinstance(n, (yaml.SequenceNode, yaml.MappingNode))]
        if done:
            open_nodes.discard(id(node))
            size[id(node)] = len(node.value) + sum(size[id(n)] for n in inner)
            if size[id(node)] > most:
                raise ConfigError(
                    f"{at(node.start_mark.line + 1)}: the list or mapping there, with its aliases (*name), "
                    f"holds over {most:,} keys and list items, which no config needs (aliases of aliases multiply); "
                    "write the values out, or alias each once."
                )
            continue
        if id(node) in size:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for n in inner:
            if id(n) in open_nodes:
                raise ConfigError(
                    f"{at(n.start_mark.line + 1)}: the list or mapping there holds an alias (*name) of "
                    "itself, which never ends; write the value out instead."
                )
            stack.append((n, False))


def _key_lines(node: yaml.Node | None, path: Path | str) -> dict[str, int]:
    """The line of each key and list item in a YAML document whose aliases `_check_aliases` has bounded, by
    dotted key (list items by index: `data.train.0`).

    YAML reads a key given twice in one mapping as its last value, dropping the first without a word (a
    second `train:` section replaces the first whole): such a key is refused, naming both lines. A key that
    a merge key (`<<: *defaults`) brings in is placed where the merged mapping sets it, and yields to the
    mapping's own key of that name, as YAML's merge does."""

    def walk(node: yaml.Node | None, prefix: str) -> dict[str, int]:
        lines = {}
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[f"{prefix}{i}"] = item.start_mark.line + 1
                lines |= walk(item, f"{prefix}{i}.")
        elif isinstance(node, yaml.MappingNode):
            merged: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    # `<<: *a` or `<<: [*a, *b]`: of the merged mappings, the first to set a key gives it.
                    sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    for source in reversed(sources):
                        merged |= walk(source, prefix)
                    continue
                key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
                if key_node.tag == "tag:yaml.org,2002:null":  # `~:`, `null:`, `? ` with nothing after it
                    raise ConfigError(
                        f"{path} line {line}: a key{f' under {prefix[:-1]}' if prefix else ''} written as "
                        f"{key_node.value or 'nothing'}, which YAML reads as no name (null); name the key, or delete "
                        "the line."
                    )
                if key in lines:
                    raise ConfigError(
                        f"{path} line {line}: {key} is given twice (also on line {lines[key]}), and YAML would keep "
                        "only this one; merge the two into one."
                    )
                lines[key] = line
                lines |= walk(value_node, f"{key}.")
            own = {key.removeprefix(prefix).split(".", 1)[0] for key in lines}
            lines |= {key: line for key, line in merged.items() if key.removeprefix(prefix).split(".", 1)[0] not in own}
        return lines

    return walk(node, "")


def _expand(p: str, key: str, source: str, places: dict[str, str] | None) -> str:
    """A path with `~` and environment variables (`$HOME/data`, `${DATA}`) expanded, as a shell does; a
    variable that is not set is refused (where `places` are given) rather than read as part of a file's name,
    unless the path names a file or folder as written (a `$` in its name, read against the working directory)."""
    p = os.path.expandvars(os.path.expanduser(p))
    if places is not None and (unset := _VARIABLE.search(p)) and not Path(p).exists():
        raise ConfigError(
            f"{source}: {_placed(key, places)}: {p} names the environment variable {unset.group(1) or unset.group(2)}, "
            "which is not set; set it, or write the path out."
        )
    return p


def _resolve_relative_paths(raw: dict, base_dir: Path, source: str = "config", places: dict | None = None) -> None:
    """The config's paths with `~` and environment variables expanded, as a shell does, and relative ones
    that exist under `base_dir` made absolute (`output_dir` stays relative: it names the working directory's
    folder). With `places`, a path whose variable is not set is refused, naming `source` and the key's place;
    without, it is left for that check (an override may yet replace it)."""

    def fix(p, key):
        # An empty path is left for validation to refuse: joined to the config's folder, it would name that folder.
        if not isinstance(p, str) or not p:
            return p
        p = _expand(p, key, source, places)
        return str((base_dir / p).resolve()) if not Path(p).is_absolute() and (base_dir / p).exists() else p

    if isinstance(raw.get("output_dir"), str):
        raw["output_dir"] = _expand(raw["output_dir"], "output_dir", source, places)

    data = raw.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("train"), list):
            data["train"] = [
                {**p, "path": fix(p["path"], f"data.train.{i}.path")}
                if isinstance(p, dict) and "path" in p
                else fix(p, f"data.train.{i}")
                for i, p in enumerate(data["train"])
            ]
        elif "train" in data:
            data["train"] = fix(data["train"], "data.train")
        for key in ("validation", "general_replay"):
            if isinstance(data.get(key), str):
                data[key] = fix(data[key], f"data.{key}")
    if isinstance(raw.get("base_model"), str):
        raw["base_model"] = fix(raw["base_model"], "base_model")
    model = raw.get("model")
    # A template written out (Jinja) is no path; a file's name is read against the config's folder.
    if isinstance(model, dict) and isinstance(template := model.get("chat_template"), str) and not is_jinja(template):
        model["chat_template"] = fix(template, "model.chat_template")
    distill = raw.get("distill")
    if isinstance(distill, dict) and isinstance(distill.get("teacher"), str):
        distill["teacher"] = fix(distill["teacher"], "distill.teacher")

    def fix_grader(p, key):
        # A reward function, FILE.py:FUNCTION, has its file read against the config's folder.
        file = grader_file(p)
        if file is None or file == p:
            return fix(p, key)
        return f"{fix(file, key)}:{p.rpartition(':')[2]}"

    if isinstance(raw.get("eval"), dict) and isinstance(raw["eval"].get("benchmarks"), list):
        benchmarks = raw["eval"]["benchmarks"]
        for i, entry in enumerate(benchmarks):
            if isinstance(entry, dict):  # {file, num_fewshot, fewshot_file}
                for key in ("file", "fewshot_file"):
                    if key in entry:
                        entry[key] = fix(entry[key], f"eval.benchmarks.{i}.{key}")
            else:
                benchmarks[i] = fix(entry, f"eval.benchmarks.{i}")

    for name in ("grpo", "eval"):
        section = raw.get(name)
        if isinstance(section, dict) and isinstance(section.get("grader"), str):
            section["grader"] = fix_grader(section["grader"], f"{name}.grader")
        elif isinstance(section, dict) and isinstance(section.get("grader"), list):
            section["grader"] = [fix_grader(p, f"{name}.grader.{i}") for i, p in enumerate(section["grader"])]


def grader_file(ref) -> str | None:
    """The file a grader reference names: FILE of a reward function's FILE.py:FUNCTION, or a JSON/YAML file holding
    a grader; None for a grader object, or a string that names neither (the grader's own checks say what it is)."""
    if not isinstance(ref, str):
        return None
    file, colon, _ = ref.rpartition(":")
    if colon and file.endswith(".py"):
        return file
    return ref if Path(ref).suffix.lower() in (".json", ".yaml", ".yml") else None


def is_jinja(chat_template: str) -> bool:
    """Whether a model.chat_template is a template written out, rather than a file or a template's name."""
    return "{%" in chat_template or "{{" in chat_template


def auto_epochs(n_examples: int) -> int:
    """OpenAI's heuristic: aim for 3 epochs, keep examples x epochs within 100..25,000, epochs in 1..25."""
    epochs = 3
    if n_examples * epochs < 100:
        epochs = -(-100 // max(n_examples, 1))
    elif n_examples * epochs > 25_000:
        epochs = 25_000 // n_examples
    return max(1, min(25, epochs))
