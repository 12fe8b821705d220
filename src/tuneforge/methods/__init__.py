"""Methods: what is trainable and what the loss is. The training loop does not care which it runs.

Each method module exposes `prepare_model(model, cfg) -> model`, which marks the trainable
parameters (and wraps the model, for adapters). `build_objective` picks the loss: the SFT objective
in `sft.py` for full, LoRA and DoRA (cross-entropy, with the `kl_to_base.KLToBase` term and the
`neftune.NEFTune` hook when the config asks), the distillation objective in `distill.py` for
distill (whose student trains as `distill.student` says), the preference objective in `dpo.py` for
dpo (its policy trains as `dpo.policy` says), the policy-gradient objective in `grpo.py` for grpo,
which samples and grades its own batches during the step (`make_batches`), the Bradley-Terry objective
in `reward.py` for reward (a sequence classifier trained as `reward.trains` says). `prepare_items` reads
the data a method trains on (grpo: prompts with the fields its grader reads). `check_inputs` runs
the checks a method makes before any compute (data.max_length fits the model's positions; preference
data for dpo and reward and only for them; the lora section names modules the model has; distill: the teacher's
vocabulary is the student's and its window holds data.max_length; grpo: the grader is sound).

An objective returns sums. What they are sums over is its `count` of a batch (trained tokens
unless it says otherwise; DPO and reward count pairs), and the loop divides by the count of the whole
optimizer step. `reported_sums` names the sums the loop logs as train_/valid_ metrics, and
`logged_sums` the method's own sums, logged per count beside them; `train_only_sums` those of them
that validation leaves out. `sum_over_batches` runs an objective over batches without gradients
(validation, and evaluation's loss).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from pathlib import Path

import torch

from .. import data as tfdata
from ..config import is_jinja
from ..data import IGNORE_INDEX, collate
from ..data.render import check_template
from ..errors import ConfigError
from ..models import compute_dtype, frozen_base, load_model, meta_model, source_context_length
from ..models.loading import adapter_trained_rows, refuse_reward_model, tokens_added
from ..models.quantization import keep_trainable_layout, quantization_config
from . import distill, dpo, full, grpo, lora, reward
from .distill import DistillObjective
from .dpo import DPOObjective
from .kl_to_base import KLToBase
from .neftune import NEFTune
from .sft import SFTObjective

PREPARE = {
    "full": full.prepare_model,
    "lora": lora.prepare_model,
    "dora": lora.prepare_model,
    "distill": distill.prepare_model,
    "dpo": dpo.prepare_model,
    "grpo": grpo.prepare_model,
    "reward": reward.prepare_model,
}

TOKEN_SUMS = {"loss": "ce", "mean_token_accuracy": "correct"}
"""The loop's metric names (train_loss, valid_mean_token_accuracy, ...) and the sums they are, for
objectives that train on tokens."""


def frozen_dtype(cfg, precision: str) -> torch.dtype:
    """The dtype of the weights that do not train (a base under adapters, a teacher, a reference copy):
    `model.dtype`, where auto is the compute precision."""
    if cfg.model.dtype == "auto":
        return compute_dtype(precision)
    return torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32


def load_for_training(source, cfg, *, precision: str, device: torch.device, token_ids=(), new_ids=()):
    """The model to train on `device`, what trains marked: adapters (fp32) over a base held in
    `frozen_dtype`, quantized as `model.quantize` says; or, for full fine-tuning, every weight in fp32.
    `token_ids`: `added_token_ids`, whose embedding rows the model grows to and trains; `new_ids`:
    `new_token_ids`, whose rows start at the mean."""
    dtype = frozen_dtype(cfg, precision) if cfg.trains_adapters else torch.float32
    quantization = quantization_config(
        cfg.model.quantize, double_quant=cfg.model.double_quant, compute_dtype=compute_dtype(precision)
    )
    model = load_model(
        source,
        dtype=dtype,
        quantization=quantization,
        device=device,
        rope_scaling=cfg.model.rope_parameters(),
        classifier=cfg.method == "reward",
    )
    model = prepare_model(model, cfg, token_ids, new_ids)
    if quantization:
        keep_trainable_layout(model)
        return model
    return model.to(device)


def prepare_model(model, cfg, token_ids=(), new_ids=()):
    # The config lets model.add_tokens (`token_ids`, `new_ids`) only with full, lora and dora.
    return PREPARE[cfg.method](model, cfg, token_ids, new_ids) if token_ids else PREPARE[cfg.method](model, cfg)


def added_token_ids(cfg, tokenizer) -> list[int]:
    """The ids of `model.add_tokens` in `tokenizer` (a `load_tokenizer(source, cfg.model.add_tokens)`): the
    embedding rows that train beside the method's weights."""
    return tokenizer.convert_tokens_to_ids(list(cfg.model.add_tokens))


def unseen_added_tokens_warning(cfg, tokenizer, items) -> str | None:
    """The tokens of `model.add_tokens` that no training example (`batch_items`) holds once tokenized: their rows
    never train, and the model never learns to write them. A spelling the data does not use (a space before or
    after the token) is the usual cause. None where each is there."""
    if not cfg.model.add_tokens:
        return None
    unseen = dict(zip(added_token_ids(cfg, tokenizer), cfg.model.add_tokens, strict=True))
    for item in items:
        for token_id in set(unseen).intersection(item.input_ids):
            del unseen[token_id]
        if not unseen:
            return None
    rows = (
        "its row never trains and the model does not learn to write it"
        if len(unseen) == 1
        else "their rows never train and the model does not learn to write them"
    )
    return (
        f"{cfg.key_at('model.add_tokens')}: {', '.join(map(repr, unseen.values()))} in none of the "
        f"{len(items):,} training examples as tokenized, so {rows}; spell each as the data does (a space before or "
        "after a token is part of it), or leave it out."
    )


def new_token_ids(tokenizer) -> list[int]:
    """The ids of the tokens of `model.add_tokens` that `tokenizer` did not hold (`tokens_added`): those after
    its own tokens, whose embedding rows start at the mean of its own."""
    return tokenizer.convert_tokens_to_ids(tokens_added(tokenizer))


def check_inputs(cfg, tokenizer, source) -> None:
    """Fail early, with a clear error, on inputs the method cannot use (`source`: the resolved base model); warn of
    inputs that run but waste the run (a distill teacher that is the student)."""
    if cfg.method != "reward":  # every other method trains a language model, which a reward model's folder lacks
        refuse_reward_model(source, "train", cfg.key_at("base_model"))
    window = source_context_length(source, cfg.model.rope_parameters(), cfg.key_at("model.rope_scaling"))
    stretched = cfg.model.rope_scaling is not None
    built = f"model.rope_scaling stretches {source.name} to" if stretched else f"{source.name} was built for"
    # A model knows positions up to its window only: past it a row fails (learned position embeddings) or
    # trains on positions the model never saw (rotary ones).
    if cfg.method == "grpo":  # a prompt shorter than data.max_length, then an answer of up to max_new_tokens
        longest = cfg.data.max_length - 1 + cfg.grpo.max_new_tokens
        if window and longest > window:
            raise ConfigError(
                f"{cfg.key_at('data.max_length')}, {cfg.key_at('grpo.max_new_tokens')}: a prompt of up to "
                f"{cfg.data.max_length - 1} tokens and an answer of up to {cfg.grpo.max_new_tokens} make rows of "
                f"{longest}, more than the {window} positions {built}; lower them to sum to "
                f"{window + 1} or less."
            )
    elif window and cfg.data.max_length > window:
        raise ConfigError(
            f"{cfg.key_at('data.max_length')}: {cfg.data.max_length} tokens is more than the {window} positions "
            f"{built}; set data.max_length to {window} or less, or stretch its rotary positions "
            f"{'further ' if stretched else ''}with model.rope_scaling (rope_type: yarn, factor: F for F times "
            f"{'its base window' if stretched else window})."
        )
    if cfg.model.chat_template is not None:
        check_template(tokenizer, template_where(cfg))
    dpo.check_data_kind(cfg)
    if cfg.method in ("lora", "dora") and source.adapter is not None and cfg.lora.init != "default":
        # lora and dora train base_model's adapter on from where it is: there is no new adapter to start.
        raise ConfigError(
            f"{cfg.key_at('lora.init')}: {cfg.lora.init} sets how a new adapter starts, and base_model "
            f"{source.name} is a LoRA adapter that trains on from its weights as they are. Leave lora.init out to "
            "continue it, or merge it first (tuneforge export RUN --format merged) and start a new adapter on the "
            "merged model."
        )
    if cfg.method in ("lora", "dora") and source.adapter is not None and cfg.model.add_tokens:
        # lora and dora train base_model's adapter on as it is: the embedding rows it trains, and no others.
        trained = adapter_trained_rows(source)
        if missing := [t for t, i in zip(cfg.model.add_tokens, added_token_ids(cfg, tokenizer)) if i not in trained]:
            raise ConfigError(
                f"{cfg.key_at('model.add_tokens')}: adds {', '.join(missing)}, whose embedding rows the LoRA adapter "
                f"of base_model {source.name} does not train: it trains on as it is, with the rows of the tokens it "
                "added. Merge it first (tuneforge export RUN --format merged) and add the tokens in a new run on the "
                "merged model."
            )
    check_trainable(cfg, source, added_token_ids(cfg, tokenizer), new_token_ids(tokenizer))
    if cfg.method == "dora" and cfg.model.quantize == "int8" and not torch.cuda.is_available():
        # DoRA's weight norm reads the frozen weight back through bitsandbytes, whose 8-bit layer on a
        # CPU keeps no scales for it: the first step would fail inside bitsandbytes.
        raise ConfigError(
            f"{cfg.key_at('method')}, {cfg.key_at('model.quantize')}: "
            "method: dora on model.quantize: int8 does not run on a CPU (bitsandbytes' 8-bit layer there cannot "
            "give DoRA the weights its norm needs). Use model.quantize: nf4 with DoRA, or method: lora on int8."
        )
    if cfg.method in ("dpo", "grpo", "reward"):
        dpo.check_start(cfg, source)
    if cfg.method == "distill":
        distill.check_teacher(cfg, tokenizer, source)
    if cfg.method == "grpo":
        grpo.load_grader(cfg)


def template_where(cfg) -> str:
    """Where the config set model.chat_template, and the file it names, if any: what errors about it name."""
    template = cfg.model.chat_template
    path = template if not is_jinja(template) and Path(template).is_file() else None
    return cfg.key_at("model.chat_template") + (f", the template {path}" if path else "")


# The structures `check_trainable` passed while `trainable_checked_once` holds: a sweep's points that differ in
# settings no `prepare_model` reads (a learning rate) share one check of the model's structure.
_PASSED: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("trainable_passed", default=None)


@contextlib.contextmanager
def trainable_checked_once():
    """Within it, `check_trainable` builds each structure once (the model's files being as they are)."""
    token = _PASSED.set(set())
    try:
        yield
    finally:
        _PASSED.reset(token)


def check_trainable(cfg, source, token_ids=(), new_ids=()) -> None:
    """Mark what trains on the model's structure alone, built on the meta device (no weights, no memory): what
    `prepare_model` refuses (a lora.target_modules or modules_to_save name the model lacks) is refused before
    the data is read and the weights load."""
    from transformers import AutoConfig

    passed = _PASSED.get()
    # Everything `prepare_model` reads: the config but its training (save freeze_embeddings), eval and output_dir.
    key = json.dumps(
        [
            str(source.path),
            list(token_ids),
            list(new_ids),
            cfg.train.freeze_embeddings,
            cfg.model_dump(mode="json", exclude={"train", "eval", "output_dir"}),
        ],
        sort_keys=True,
        default=str,
    )
    if passed is not None and key in passed:
        return
    with torch.device("meta"):  # the adapter's layers too
        classifier = cfg.method == "reward"
        prepare_model(
            meta_model(AutoConfig.from_pretrained(source.path), classifier=classifier), cfg, token_ids, new_ids
        )
    if passed is not None:
        passed.add(key)


def prepare_items(cfg, tokenizer, *, report_path=None, log=print, progress=False, hashed=None) -> tfdata.PreparedData:
    """The data the method trains on, checked, its report written to `report_path` where the data is
    refused: grpo's prompts, or the examples (and pairs) of the data pipeline (with `progress`, shown as it
    goes; `hashed`: its cache key and file states where already hashed, `data.prepare.hash_data`)."""
    if cfg.method == "grpo":
        return grpo.prepare(cfg, tokenizer, report_path=report_path, log=log)
    return tfdata.prepare(cfg.data, tokenizer, report_path=report_path, log=log, progress=progress, hashed=hashed)


def build_objective(model, cfg, tokenizer, *, dtype: torch.dtype, device: torch.device):
    """The module the loop calls on each micro-batch; it returns sums (see `SFTObjective`)."""
    if cfg.method == "distill":
        return distill.build_objective(model, cfg, dtype=dtype, device=device)
    if cfg.method == "dpo":
        return dpo.build_objective(model, cfg, dtype=dtype, device=device)
    if cfg.method == "grpo":
        return grpo.build_objective(model, tokenizer, cfg, dtype=dtype, device=device)
    if cfg.method == "reward":
        return reward.build_objective(model, cfg, tokenizer)
    t = cfg.train
    if t.neftune_alpha:
        NEFTune(t.neftune_alpha).attach(model)
    replay = t.replay_loss == "kl_to_base"
    if not (t.kl_to_base or replay):
        return SFTObjective(model)
    # Full fine-tuning changes every weight: the base distribution needs its own frozen copy.
    reference = None
    if cfg.method == "full":
        reference = frozen_base(cfg, dtype=dtype, device=device)
    return SFTObjective(model, terms=(KLToBase(weight=t.kl_to_base, replay=replay, reference=reference),))


def batch_items(prepared, cfg) -> tuple[list, list]:
    """What the loop makes rows of, for training and validation: the examples, or for dpo and reward one item
    per pair (its chosen and rejected examples end to end, so they always share a forward), or for
    dpo.loss: kto one per rated example (it and its mismatched example for the KL estimate)."""
    refuse_images(prepared, cfg)
    if cfg.method == "dpo" and cfg.dpo.loss == "kto":
        return dpo.kto_rows(prepared.train, cfg.data.max_length), dpo.kto_rows(prepared.valid, cfg.data.max_length)
    if cfg.method in ("dpo", "reward"):
        return dpo.rows(prepared.train_pairs), dpo.rows(prepared.valid_pairs)
    return prepared.train, prepared.valid


def refuse_images(prepared, cfg) -> None:
    """Rows with images train with the supervised objective, with dpo (every loss, kto too: its policy and
    reference forwards read the images) and with grpo (its sampling, policy and reference read them): another
    method's forwards (a teacher, a reward model's scores) and the KL terms would run without the images, on
    their bare tokens."""
    pairs = [e for pair in (*prepared.train_pairs, *prepared.valid_pairs) for e in pair]
    if not tfdata.shows_images([*prepared.train, *prepared.valid, *pairs]):
        return
    if cfg.method not in ("full", "lora", "dora", "dpo", "grpo"):
        raise ConfigError(
            f"{cfg.key_at('method')}: {cfg.method} does not train on rows with images yet; train them with "
            "method: lora, dora, full, dpo or grpo, or remove the image parts."
        )
    if cfg.train.kl_to_base or (cfg.data.general_mix and cfg.train.replay_loss == "kl_to_base"):
        key = "train.kl_to_base" if cfg.train.kl_to_base else "train.replay_loss"
        raise ConfigError(
            f"{cfg.key_at(key)}: the KL to the base model does not run on rows with images yet; "
            "leave it out for this data."
        )


def per_count(totals: dict[str, float], count: float, objective) -> dict[str, float]:
    """The logged metrics from their sums: each sum per `count`, or per the sum the objective names as its
    denominator (KTO's rewards/chosen: per desirable reply), left out where that is 0; the denominators
    themselves (named _...) are not metrics."""
    denominators = getattr(objective, "denominators", {})
    out = {}
    for name, total in totals.items():
        n = totals[denominators[name]] if name in denominators else count
        if not name.startswith("_") and (n or name not in denominators):
            out[name] = total / (n or 1)
    return out


def trained_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def loss_count(objective):
    """The function that counts what an objective's sums are sums over in a batch (its loss denominator)."""
    return getattr(objective, "count", trained_tokens)


def reported_sums(objective) -> dict[str, str]:
    """Metric name (logged as train_NAME and valid_NAME) -> the objective's sum it is, per count."""
    return getattr(objective, "reported_sums", TOKEN_SUMS)


def adapter_on_merged_base(cfg, source) -> bool:
    """Whether the trained adapter sits on a base that exists only in memory: dpo, grpo and reward merge a LoRA
    `base_model` before their LoRA policy trains, so that final model is saved merged. (lora and dora
    train such an adapter on; full merges it and trains every weight.)"""
    policy = {"dpo": cfg.dpo.policy, "grpo": cfg.grpo.policy, "reward": cfg.reward.trains}.get(cfg.method)
    return source.adapter is not None and policy in ("lora", "dora")


@torch.no_grad()
def sum_over_batches(
    objective,
    batches,
    pad_id: int,
    device: torch.device,
    *,
    sums: dict[str, str],
    count=None,
    autocast=contextlib.nullcontext,
    advance=lambda rows: None,
    images=None,
) -> tuple[dict[str, float], float]:
    """Run `objective` in eval mode over `batches` (lists of rows) and add up the sums it returns:
    ({metric name: total of the objective's sum named in `sums`}, total count). `advance(rows)` is
    called after each batch; `images` collates rows that show images (`models.loading.image_inputs`)."""
    count = count or loss_count(objective)
    was_training = objective.training
    objective.eval()
    totals = torch.zeros(len(sums) + 1, dtype=torch.float64)
    try:
        for rows in batches:
            batch = {k: v.to(device) for k, v in collate(rows, pad_id, images=images).items()}
            with autocast():
                out = objective(**batch)
            totals += torch.tensor([*(out[key].item() for key in sums.values()), count(batch)], dtype=torch.float64)
            advance(rows)
    finally:
        objective.train(was_training)
    return dict(zip(sums, totals[:-1].tolist())), float(totals[-1])


def trainable_parameters(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


__all__ = [
    "adapter_on_merged_base",
    "added_token_ids",
    "new_token_ids",
    "prepare_model",
    "check_inputs",
    "build_objective",
    "prepare_items",
    "batch_items",
    "loss_count",
    "per_count",
    "reported_sums",
    "sum_over_batches",
    "trainable_parameters",
    "SFTObjective",
    "DistillObjective",
    "DPOObjective",
    "KLToBase",
    "NEFTune",
]
