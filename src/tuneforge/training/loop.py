"""The training recipe: one loop for every method, readable top to bottom.

    setup(cfg, world)  config -> tokenizer + data -> model + method -> rows -> [resumed weights] -> DDP | FSDP
                       -> optimizer + schedule -> [resumed optimizer]
    fit(run)           for each step: micro-batches (grpo: sampled and graded by its objective)
                       -> forward/backward (loss / trained tokens, pairs or answers of the whole step)
                       -> clip -> optimizer step -> log -> validate [+ sample answers] -> checkpoint
    finish(run)        final checkpoint + full validation [+ sample answers] + final model + summary

The loss of an optimizer step is the mean over its trained tokens (for DPO, its pairs: what the
objective counts) across all micro-batches and ranks. Each micro-batch therefore backpropagates
(its summed loss) / (the step's count), times the world size because DDP and FSDP average gradients
over ranks. What a config's `eval:` section asks for runs after this, in the caller (`tuneforge.pipeline`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shlex
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import data as tfdata
from ..config import Config, LoraConfig, TrainConfig, auto_epochs, load_config
from ..data.cache import CACHE_FORMAT
from ..errors import LAUNCHER_SHOWS_ERRORS, ModelSourceError, RunFailed, TuneforgeError
from ..fsio import atomic_file, write_json, writing
from ..methods import (
    adapter_on_merged_base,
    added_token_ids,
    batch_items,
    build_objective,
    check_inputs,
    frozen_dtype,
    load_for_training,
    loss_count,
    new_token_ids,
    per_count,
    prepare_items,
    reported_sums,
    sum_over_batches,
    trainable_parameters,
    unseen_added_tokens_warning,
)
from ..methods.dpo import kto_balance_warning
from ..methods.lora import experts_warning
from ..models import ModelSource, causal_lm, resolve_precision, run_tokenizer
from ..models.attention import own_attention, per_example_attention, supports_per_example_attention
from ..models.loading import image_inputs
from ..models.saving import save_model
from ..models.system_prompt import record_system_prompt, recorded_system_prompt
from ..progress import progress_bar
from ..wording import counted
from . import batches, best, checkpoint, distributed, samples, trackers
from .progress import TrainProgress, print_summary
from .run_folder import (
    check_output_dir,
    check_resumable,
    check_same_data,
    clear_earlier_run,
    forget_refused_report,
    refuse_earlier_run,
    refuse_other_runs_on_other_machines,
    refuse_resume_with_overwrite,
    refuse_run_in_progress,
    restart_step_log,
    resume_point,
    sole_run_in,
)
from .step_memory import allocator_warning, step_bytes, step_shape


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    status: str  # "completed" | "interrupted"
    metrics: dict = field(default_factory=dict)


# --- building blocks -----------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def make_optimizer(params: dict[str, torch.nn.Parameter], cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (`train.optimizer`: torch's, or bitsandbytes' 8-bit) with `train.adam_beta1`, `adam_beta2` and
    `adam_epsilon`; no weight decay on vectors (biases, norm weights); with
    `lora.loraplus_lr_ratio`, LoRA's B matrices (of any method that trains LoRA adapters) learn at that
    multiple of the learning rate (LoRA+)."""
    ratio = cfg.lora.loraplus_lr_ratio
    faster = {name for name in params if ratio != 1.0 and "lora_B" in name}

    def decay_groups(chosen: list[torch.nn.Parameter], lr: float) -> list[dict]:
        # A group with no parameters is left out: torch's distributed checkpoint cannot place the saved
        # state of an optimizer with more than one (LoRA+ over adapters that have no vectors).
        groups = [
            {"params": [p for p in chosen if p.ndim >= 2], "weight_decay": cfg.train.weight_decay, "lr": lr},
            {"params": [p for p in chosen if p.ndim < 2], "weight_decay": 0.0, "lr": lr},
        ]
        return [group for group in groups if group["params"]]

    groups = decay_groups([p for name, p in params.items() if name not in faster], cfg.train.learning_rate)
    if faster:
        groups += decay_groups([p for name, p in params.items() if name in faster], cfg.train.learning_rate * ratio)
    adam = {
        "lr": cfg.train.learning_rate,
        "betas": (cfg.train.adam_beta1, cfg.train.adam_beta2),
        "eps": cfg.train.adam_epsilon,
    }
    if cfg.train.optimizer != "adamw":
        import bitsandbytes as bnb

        # Paging moves optimizer state between GPU and host memory; on a CPU the state is in host memory already.
        paged = cfg.train.optimizer == "paged_adamw_8bit" and device.type == "cuda"
        return (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit)(groups, **adam)
    # fused is fastest where it exists (CUDA, recent CPU builds); foreach otherwise.
    try:
        return torch.optim.AdamW(groups, **adam, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **adam, foreach=True)


@dataclass
class StepPlan:
    """How many steps the run takes, derived from the data and the config."""

    rows: int
    step_rows: int  # rows a full step trains: train.batch_size, or every row where the data makes fewer
    epochs: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    micro_batch_rows: int  # the most rows a micro-batch holds
    examples: int  # training examples the rows hold (more than the rows where data.packing packs them)


def rows_made(cfg: Config, plan: StepPlan) -> str:
    """The rows the data makes, as a user reads it: packed rows say the examples they hold, since
    a count of packed rows alone reads as data gone missing."""
    rows = counted(plan.rows, "row")
    if not cfg.data.packing:
        return f"the data makes {rows}"
    return (
        f"the {counted(plan.examples, 'training example')} "
        f"{'pack' if plan.examples != 1 else 'packs'} into {rows} of up to {cfg.data.max_length} tokens (data.packing)"
    )


def check_batch_split(cfg: Config, world_size: int) -> None:
    """Refuse a train.batch_size that does not split evenly into every process's micro-batches; it
    depends on the config and the process count alone, so `setup` runs it before any data or model."""
    t = cfg.train
    n_micro = t.grad_accum * world_size
    if t.batch_size % n_micro:
        raise TuneforgeError(
            f"{cfg.key_at('train.batch_size')}: {t.batch_size} is no multiple of train.grad_accum x processes "
            f"({t.grad_accum} x {world_size}); give train.batch_size a multiple of {n_micro}."
        )


def make_plan(cfg: Config, n_examples: int, n_rows: int, world_size: int) -> StepPlan:
    t = cfg.train
    n_micro = t.grad_accum * world_size
    check_batch_split(cfg, world_size)
    per_epoch = batches.steps_per_epoch(n_rows, t.batch_size, n_micro)
    if per_epoch == 0:  # a step may be short of batch_size, but needs a row for every micro-batch of every process
        raise TuneforgeError(
            f"{cfg.key_at('train.grad_accum')}: {n_rows} training rows are fewer than one step needs: {n_micro}, "
            f"a row for each micro-batch (train.grad_accum {t.grad_accum} x {world_size} processes); add data, or "
            "lower train.grad_accum or the processes."
        )
    epochs = auto_epochs(n_examples) if t.epochs == "auto" else t.epochs
    total = t.max_steps or epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    warmup = int(t.warmup * total) if t.warmup < 1 else int(t.warmup)
    if warmup >= total:
        # The rate would still be climbing at the last step: the run would never train at its learning rate.
        raise TuneforgeError(
            f"{cfg.key_at('train.warmup')}: {counted(warmup, 'step')}, but the run takes {total}: the learning "
            "rate would never reach train.learning_rate; give train.warmup fewer steps than that, or a fraction of "
            "the run (such as 0.03)."
        )
    step_rows = min(t.batch_size, n_rows)
    return StepPlan(n_rows, step_rows, epochs, per_epoch, total, warmup, math.ceil(step_rows / n_micro), n_examples)


def row_tokens(row) -> int:
    """The data's tokens in a row (a shared prefix counted per example), padding left out."""
    return row.example_tokens() if isinstance(row, tfdata.PackedRow) else len(row)


def shares_prefixes(cfg: Config, all_per_example: bool) -> bool:
    """Whether packed rows hold a common prefix once (`data.pack`): only where every model of the
    forward attends per example (`models.attention` reads the shared prefix), not for DPO or reward
    models, whose items are pairs already laid out, and not for distillation at every position
    (`distill.positions: all`), whose divergence is taken on the prompt tokens a shared prefix holds
    once: each example's prompt would count once per row instead of once per example."""
    return (
        cfg.data.packing
        and cfg.data.share_prefixes
        and cfg.method not in ("dpo", "reward")
        and not (cfg.method == "distill" and cfg.distill.positions == "all")
        and cfg.train.attention == "per_example"
        and all_per_example
    )


def to_rows(items, cfg: Config, share_prefixes: bool = False):
    # Rows are max_length long, or as long as the longest item (a DPO pair is two examples end to end).
    # Rows with images are not packed: the model's image attention reads a row as one sequence.
    if not cfg.data.packing or tfdata.shows_images(items):
        return items
    return tfdata.pack(items, max([cfg.data.max_length, *map(len, items)]), share_prefixes=share_prefixes)


# The rates fine-tuning uses, and the rate above which it is warned of (a loss that diverges, or pretrained
# weights overwritten), for adapters and for every weight. Tiny test models train well above them: a warning,
# not a refusal.
USUAL_RATES = {True: ("adapter training", "1e-5 to 1e-3", 1e-2), False: ("full fine-tuning", "1e-6 to 1e-4", 1e-3)}


def learning_rate_warning(cfg: Config) -> str | None:
    """The warning for a train.learning_rate far above the rates its kind of training uses (Axolotl's
    `learning_rate: 5`, or a full fine-tune at LoRA's rate), or None."""
    what, usual, most = USUAL_RATES[cfg.trains_adapters]
    rate = cfg.train.learning_rate
    if rate <= most:
        return None
    return (
        f"{cfg.key_at('train.learning_rate')}: {rate:g}, far above the rates {what} uses ({usual}); above "
        f"{most:g} the loss usually diverges or the base model's knowledge is lost; set it in that range."
    )


def plan_warnings(cfg: Config, plan: StepPlan, n_valid: int) -> list[str]:
    """The warnings for settings the run's plan leaves without effect: train.eval_every with no validation
    examples to evaluate on, train.eval_every or save_every past its last step (it evaluates or saves at its
    end alone, with no checkpoint to resume from before it), and a train.batch_size beyond the rows of the
    data (every step trains on fewer rows than it says), and a lora section where every weight trains (no
    adapter reads it). Only a value other than the default counts as set: a run's saved config.yaml writes
    every key. And a train.learning_rate far above what fine-tuning uses (`learning_rate_warning`)."""
    warnings, eval_every = [w for w in [learning_rate_warning(cfg)] if w], cfg.train.eval_every
    cadences = [("save_every", "saves a checkpoint")]
    if n_valid:
        cadences.append(("eval_every", "evaluates"))
    elif eval_every not in (0, TrainConfig.model_fields["eval_every"].default):
        warnings.append(
            f"{cfg.key_at('train.eval_every')}: {eval_every}, but there are no validation examples "
            f"(data.validation: {cfg.data.validation}), so the run never evaluates; set data.validation to a "
            "fraction or a file, or train.eval_every to 0."
        )
    for key, does in cadences:
        every = getattr(cfg.train, key)
        if every > plan.total_steps and every != TrainConfig.model_fields[key].default:
            warnings.append(
                f"{cfg.key_at(f'train.{key}')}: {counted(every, 'step')}, but the run takes {plan.total_steps}, "
                f"so it {does} "
                f"only at its end; set train.{key} to {plan.total_steps} or fewer, or to 0 to say so."
            )
    if not cfg.trains_adapters:
        lora = [
            cfg.key_at(f"lora.{key}")
            for key, spec in LoraConfig.model_fields.items()
            if getattr(cfg.lora, key) != spec.default
        ]
        if lora:
            warnings.append(
                f"{', '.join(lora)}: set, but {cfg.trained_what} trains every weight and adds no adapter, so the "
                "lora section has no effect; leave it out, or train adapters (method: lora or dora, or "
                "distill.student, dpo.policy or grpo.policy: lora, reward.trains: lora or dora)."
            )
    if plan.rows < cfg.train.batch_size:
        to = f"{plan.rows}" if plan.rows == 1 else f"{plan.rows} or fewer"
        options = [f"set train.batch_size to {to}", "add data"]
        if cfg.data.packing:
            options.append("set data.packing to false for a row per example")
        warnings.append(
            f"{cfg.key_at('train.batch_size')}: {cfg.train.batch_size} rows a step, but {rows_made(cfg, plan)}, "
            f"so every step trains on all of the data; {', '.join(options[:-1])}, or {options[-1]}."
        )
    return warnings


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step, and the experiment trackers that get each record
    too (`trackers`); a resumed run drops lines past its checkpoint, and keeps the others (`kept`) for the
    trackers' catch-up with the sample answers (`Trackers.catch_up`)."""

    def __init__(self, cfg: Config, resume_step: int | None, enabled: bool):
        self.path, self.enabled = Path(cfg.output_dir) / "metrics.jsonl", enabled
        if not enabled:
            return
        self.kept = restart_step_log(self.path, resume_step)
        self.trackers = trackers.Trackers(cfg, resume_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.trackers.log(record)

    def close(self, status: str) -> None:
        if self.enabled:
            self.trackers.close(status)

    def step_record(self, step: int) -> dict:
        """The record logged for training step `step` ({} if none was): a resumed run's metrics until it
        trains a step, which a run resumed at its last step (to redo its final model) never does."""
        if not self.enabled or not self.path.exists():
            return {}
        records = (json.loads(line) for line in self.path.read_text().splitlines() if line)
        return next((r for r in records if r["step"] == step and "lr" in r), {})


class StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step. Python runs signal
    handlers in the main thread alone, and only it may set them: a run started from another thread (a
    notebook's or a service's worker) leaves the signals to the main thread's handlers."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def prepare_data(
    cfg: Config,
    tokenizer,
    world: distributed.World,
    report_path: Path | None,
    log,
    progress: bool = False,
    hashed: tuple[str | None, list] | None = None,
) -> tfdata.PreparedData:
    """Rank 0 prepares the data (and caches it under $TUNEFORGE_HOME, and writes the report to
    `report_path`, if any, where the data is refused). On several machines, the first process of each
    other machine then prepares it too: it reads rank 0's cache where $TUNEFORGE_HOME is shared, and
    tokenizes the data files again where it is not. The other processes then read their machine's cache.
    Rank 0 shows its progress. `hashed`: the data's cache key and file states where
    `refuse_other_runs_on_other_machines` hashed the files already, so no process hashes them again."""
    return distributed.cached_by_rank_0_first(
        world,
        "preparing data",
        lambda main: prepare_items(
            cfg,
            tokenizer,
            report_path=report_path if main else None,
            log=log,
            progress=progress and main,
            hashed=hashed,
        ),
    )


def start_run_folder(cfg: Config, world: distributed.World, report: dict, replaces_earlier: bool) -> None:
    """Once the run's data, model and plan are checked: the earlier run it replaces deleted, and the
    run's config.yaml and data_report.json written."""
    out = Path(cfg.output_dir)
    if world.is_main:
        if replaces_earlier:
            clear_earlier_run(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / "config.yaml") as f:
            f.write(cfg.to_yaml())
        write_json(out / "data_report.json", report)
    distributed.barrier(world, "starting the run folder (rank 0 writes it while the others wait)")


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a run holds from setup to finish."""

    cfg: Config
    world: distributed.World
    source: ModelSource
    tokenizer: object
    model: torch.nn.Module
    objective: torch.nn.Module  # on several processes, DDP-wrapped or FSDP-sharded (`distributed.wrap`)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: StepPlan
    train_rows: list
    valid_rows: list
    precision: str
    attention_models: list  # the causal LMs of the forward that run per-example attention
    metrics_log: MetricsLog
    state: dict  # step, tokens, elapsed, the unlogged steps' sums: what a checkpoint carries beside the weights
    last_metrics: dict = field(default_factory=dict)
    data_key: str | None = None  # the prepared data's cache key: its files' contents and the tokenizer
    sample_prompts: list = field(default_factory=list)  # train.eval_samples' prompts (`samples.sample_prompts`)
    samples_log: samples.SamplesLog | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def sums(self) -> dict[str, str]:
        """Logged metric name -> the objective's sum it is, per count: the reported ones (train_loss, ...)
        and the method's own (kl_to_base, rewards/*, ...)."""
        objective = getattr(self.objective, "module", self.objective)
        return {**reported_sums(objective), **{name: name for name in objective.logged_sums}}

    def autocast(self):
        return autocast(self.precision, self.world.device)

    def attention(self):
        return attention(self.cfg, self.attention_models)

    def save_checkpoint(self, step: int) -> Path:
        state = {
            **self.state,
            "step": step,
            "config_hash": self.cfg.results_hash(),
            "results_settings": self.cfg.recorded_results_settings(),  # to name what a resume's config changes
            "data_key": self.data_key,
            "data_format": CACHE_FORMAT,
        }
        return checkpoint.save(
            self.out / "checkpoints",
            step,
            self.model,
            self.tokenizer,
            self.source.path,
            self.optimizer,
            self.scheduler,
            state,
            self.cfg.train.keep_checkpoints,
            self.world,
            keep_also=self.state.get("best", {}).get("step") if self.cfg.train.keep_best else None,
        )

    def take_samples(self, step: int, log, final: bool = False) -> None:
        """The model's answers to the sample prompts, into samples.jsonl, the trackers and the console.
        Every process answers (no collective: none waits while another generates); rank 0 writes."""
        if not self.sample_prompts:
            return
        with own_attention(*self.attention_models):  # generation needs the model's own attention (a KV cache)
            answers = samples.answer(
                self.model, self.tokenizer, self.sample_prompts, self.cfg.train.eval_max_new_tokens
            )
        self.samples_log.write(step, answers, final)
        for line in samples.console_lines(step, answers, final):
            log(line)

    def validate(self, phase: str, bar: Callable) -> dict:
        """The validation metrics (the reported sums and the method's own, less training-only ones),
        each per count over all validation rows. Each rank runs its share of the rows, which may be
        none, outside DDP (whose forward is a collective every rank would have to join); the one
        collective is the sum. A sharded (FSDP) forward is a collective too: there, every rank runs as
        many batches as the busiest one, a rank with fewer running its first rows again, uncounted.
        `bar(description, total)` shows the pass over this rank's rows (`progress_bar`, `TrainProgress.phase`)."""
        objective = getattr(self.objective, "module", self.objective)
        sums = {k: v for k, v in self.sums.items() if k not in objective.train_only_sums}
        per_batch, world = self.plan.micro_batch_rows, self.world
        shard = [
            self.valid_rows[start : start + per_batch]
            for start in range(world.rank * per_batch, len(self.valid_rows), per_batch * world.size)
        ]
        with distributed.phase(phase, world), bar(phase, sum(map(len, shard))) as advance:
            if hasattr(objective, "validation_sums"):  # a method whose validation grades answers (grpo)
                # Samples as training does, outside autocast.
                totals, count = objective.validation_sums(shard, advance=lambda rows: advance(len(rows)))
            else:
                totals, count = sum_over_batches(
                    objective,
                    shard,
                    self.tokenizer.pad_token_id,
                    world.device,
                    sums=sums,
                    autocast=self.autocast,
                    advance=lambda rows: advance(len(rows)),
                    images=image_inputs(self.tokenizer),
                )
                if distributed.is_sharded(objective):
                    busiest = math.ceil(len(self.valid_rows) / (per_batch * world.size))
                    filler = [self.valid_rows[:per_batch]] * (busiest - len(shard))
                    sum_over_batches(
                        objective,
                        filler,
                        self.tokenizer.pad_token_id,
                        world.device,
                        sums=sums,
                        images=image_inputs(self.tokenizer),
                    )
        totals = distributed.sum_across({**totals, "count": count}, world, phase)
        n = max(totals.pop("count"), 1)
        return per_count(totals, n, objective)


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def attention(cfg: Config, lms: list):
    """Per-example attention in every training and validation forward (`train.attention`)."""
    if cfg.train.attention == "per_example":
        return per_example_attention(*lms)
    return contextlib.nullcontext()


def check_before_launch(
    cfg: Config, processes: int, *, resume: str | bool | None = None, force: bool = False, overwrite: bool = False
) -> ModelSource | None:
    """The checks of `train` and `setup` that need no process group, data or model weights, for the
    launcher of a run of `processes` processes to run before torchrun starts them: a refused config is
    refused once, as one process refuses it, instead of by every process after each has started.
    Returns the base model, or None where it is not yet pulled or converted (the processes fetch it,
    and check it then)."""
    cfg.check_data_files()
    refuse_resume_with_overwrite(cfg, resume, overwrite)
    check_output_dir(cfg)
    refuse_run_in_progress(Path(cfg.output_dir))
    resolve_precision(cfg.train.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    resume_point(cfg, resume, force)
    refuse_earlier_run(Path(cfg.output_dir), resume, overwrite)
    try:
        source = cfg.base_source(pull_missing=False)
    except ModelSourceError as error:
        if error.code not in ("model_not_pulled", "model_not_converted"):
            raise
        source = None
    distributed.strategy(cfg, processes, saves_merged=source is not None and adapter_on_merged_base(cfg, source))
    check_batch_split(cfg, processes)
    if source is not None:
        check_inputs(cfg, run_tokenizer(cfg, source), source)
    return source


def setup(
    cfg: Config,
    world: distributed.World,
    *,
    resume: str | bool | None = None,
    force: bool = False,
    overwrite: bool = False,
    log=print,
    progress: bool = False,
) -> Run:
    """Everything the steps need: data, model, objective, rows, optimizer and schedule, restored
    from a checkpoint when resuming."""
    precision = resolve_precision(cfg.train.precision, world.device)
    seed_everything(cfg.train.seed)
    resume_from, saved = resume_point(cfg, resume, force)
    out = Path(cfg.output_dir)
    replaces_earlier = refuse_earlier_run(out, resume, overwrite)
    if world.is_main and not (resume or replaces_earlier):
        forget_refused_report(out)
    source = cfg.base_source()
    spread = distributed.strategy(cfg, world.size, saves_merged=adapter_on_merged_base(cfg, source))
    check_batch_split(cfg, world.size)
    if world.is_main:
        trackers.check_installed(cfg)
    # A warning reads once: rank 0's, or none in the processes `tuneforge train --nproc` started, whose
    # launcher warned as it loaded the tokenizer and checked the config (`check_before_launch`).
    with warnings.catch_warnings():
        if not world.is_main or LAUNCHER_SHOWS_ERRORS in os.environ:
            warnings.simplefilter("ignore")
        tokenizer = run_tokenizer(cfg, source)
        hashed = refuse_other_runs_on_other_machines(cfg, tokenizer, world)
        check_inputs(cfg, tokenizer, source)
    # Data refused gets its report in output_dir only where no earlier run's files are there to mix with;
    # data that passes gets it as the run starts (`start_run_folder`), so a run refused before then leaves none.
    keeps_earlier = resume or replaces_earlier
    report_path = None if keeps_earlier else out / "data_report.json"
    prepared = prepare_data(cfg, tokenizer, world, report_path, log, progress, hashed=hashed)
    data_key = prepared.report.get("cache", {}).get("key")
    if resume_from is not None and not force:
        check_same_data(resume_from, saved, data_key)
    # The model is saved with the system prompt its data shares, so it answers bare requests as trained.
    record_system_prompt(tokenizer, prepared.report["system_prompt"]["shared"])
    train_items, valid_items = batch_items(prepared, cfg)
    distributed.refuse_skipped_vision(cfg, spread, train_items)
    sample_prompts = samples.sample_prompts(valid_items, cfg.train.eval_samples)
    if cfg.train.eval_samples and not sample_prompts:
        log(
            f"warning: {cfg.key_at('train.eval_samples')}: {cfg.train.eval_samples}, but no validation example has "
            f"a prompt before its reply (data.validation: {cfg.data.validation}; text rows have none), so the run "
            "answers none; set data.validation to a chat file or fraction, or leave train.eval_samples out."
        )

    # FSDP moves each process's shards to the device itself, never the whole model.
    model = load_for_training(
        source,
        cfg,
        precision=precision,
        device=torch.device("cpu") if spread == "fsdp" else world.device,
        token_ids=added_token_ids(cfg, tokenizer),
        new_ids=new_token_ids(tokenizer),
    )
    if cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    objective = build_objective(model, cfg, tokenizer, dtype=frozen_dtype(cfg, precision), device=world.device)

    # Every model a training forward runs: the trained one, and a teacher or reference copy if any.
    lms = [causal_lm(m) for m in (model, *objective.frozen)]
    # Rows with images run the model's own attention: per-example attention is causal over 1-D positions, and
    # Gemma 3 attends within an image both ways, Qwen2-VL places an image's tokens by 3-D positions.
    images_shown = tfdata.shows_images(train_items + valid_items)
    per_example = [
        lm for lm in lms if not images_shown and supports_per_example_attention(lm.config, cfg.data.max_length)
    ]
    if cfg.train.attention == "per_example" and len(per_example) < len(lms):
        log(
            "attention: rows with images keep the model's own attention (within an image both ways, or by 3-D "
            "positions), with a padding mask"
            if images_shown
            else "attention: a model's attention is not plain causal attention over a whole row "
            "(sliding window or soft-capping); it keeps its own attention with a block mask"
        )
    # A shared prefix needs every model of the forward to run per-example attention.
    # Rows with images run no per-example attention, so they share no prefix either.
    share = shares_prefixes(cfg, all_per_example=len(per_example) == len(lms))
    train_rows, valid_rows = to_rows(train_items, cfg, share), to_rows(valid_items, cfg, share)
    if cfg.data.packing and images_shown:
        log(f"data: {cfg.key_at('data.packing')} is on, but rows with images are not packed: each example is a row")
    plan = make_plan(cfg, len(train_items), len(train_rows), world.size)
    micro_batch_rows, longest, trained_share = step_shape(cfg, train_rows, plan.micro_batch_rows)
    step = step_bytes(lms[0].config, cfg, micro_batch_rows * longest, precision, trained_share)
    for warning in plan_warnings(cfg, plan, len(valid_items)) + [
        kto_balance_warning(cfg, prepared.report),
        experts_warning(cfg, model),
        unseen_added_tokens_warning(cfg, tokenizer, train_items),
        allocator_warning(world.device, step["activations"] + step["logits"]),
    ]:
        if warning:
            log(f"warning: {warning}")
    if resume_from is not None:
        check_resumable(resume_from, saved, plan)
    start_run_folder(cfg, world, prepared.report, replaces_earlier)
    if share:
        log(
            f"data: shared prefixes: {counted(len(train_items), 'example')} in {counted(len(train_rows), 'row')}, "
            f"{sum(len(r) for r in train_rows):,} tokens ({sum(map(len, train_items)):,} without sharing)"
        )

    if hasattr(objective, "cache_teacher"):  # distill.teacher_top_k: the teacher runs here, once, then is freed
        with autocast(precision, world.device), attention(cfg, per_example):
            distributed.cached_by_rank_0_first(
                world,
                "the teacher's top-k logits",
                lambda main: objective.cache_teacher(
                    train_rows + valid_rows,
                    tokenizer.pad_token_id,
                    world.device,
                    batch_rows=plan.micro_batch_rows,
                    progress=main,
                    log=log,
                ),
            )
        per_example = [lm for lm in per_example if any(lm is causal_lm(m) for m in (model, *objective.frozen))]

    if resume_from is not None:
        checkpoint.restore_weights(resume_from, model)
    objective = distributed.wrap(
        objective,
        model,
        cfg,
        world,
        spread=spread,
        bf16=precision == "bf16",
        skipped_vision=distributed.skips_vision(model, cfg, train_items),
    )
    # After sharding, which replaces the model's parameters with its shards.
    optimizer = make_optimizer(trainable_parameters(model), cfg, world.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.scheduler, plan.warmup_steps, plan.total_steps)
    )
    state = {"step": 0, "tokens": 0, "elapsed": 0.0, "interval": new_interval()}
    if resume_from is not None:
        state = checkpoint.load(resume_from, model, optimizer, scheduler, world)
        log(f"resumed from {resume_from} at step {state['step']}")
    metrics_log = MetricsLog(cfg, state["step"] if resume_from else None, world.is_main)
    samples_log = samples.SamplesLog(
        out,
        state["step"] if resume_from else None,
        world.is_main and (bool(sample_prompts) or resume_from is not None),
        metrics_log.trackers if world.is_main else None,
    )
    if world.is_main:
        metrics_log.trackers.catch_up(metrics_log.kept, samples_log.kept)
    if world.is_main:  # the files a method writes a record a step to (grpo's rollouts) start as metrics.jsonl does
        for path in getattr(getattr(objective, "module", objective), "step_logs", ()):
            restart_step_log(path, state["step"] if resume_from else None)
    objective.train()
    return Run(
        cfg,
        world,
        source,
        tokenizer,
        model,
        objective,
        optimizer,
        scheduler,
        plan,
        train_rows,
        valid_rows,
        precision,
        per_example,
        metrics_log,
        state,
        last_metrics=metrics_log.step_record(state["step"]) if resume_from else {},
        data_key=data_key,
        sample_prompts=sample_prompts,
        samples_log=samples_log,
    )


def train_step(run: Run, step: int, stop: StopRequest, lengths: np.ndarray) -> tuple[dict, bool]:
    """One optimizer step: its record for the log, and whether any rank asked to stop."""
    cfg, world, objective = run.cfg, run.world, run.objective
    epoch, step_in_epoch = divmod(step, run.plan.steps_per_epoch)
    order = batches.epoch_order(len(run.train_rows), cfg.train.seed, epoch)
    micro = batches.step_micro_batches(
        order, step_in_epoch, cfg.train.batch_size, cfg.train.grad_accum, world.size, world.rank, lengths
    )
    rows = [[run.train_rows[i] for i in idx] for idx in micro]
    module = getattr(objective, "module", objective)
    phase = f"training step {step + 1}"
    if hasattr(module, "make_batches"):  # a method that samples its batches from the step's rows (grpo)
        micro = module.make_batches(rows, step, world.rank, lambda t: distributed.all_sum(t, world, phase))
        real_tokens = sum(
            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro
        )
    else:
        real_tokens = sum(row_tokens(row) for batch_rows in rows for row in batch_rows)
        images = image_inputs(run.tokenizer)
        micro = [tfdata.collate(batch_rows, run.tokenizer.pad_token_id, images=images) for batch_rows in rows]
    count = loss_count(module)
    # The step's count (trained tokens, or pairs), over all micro-batches and ranks: the loss denominator.
    step_count = distributed.all_sum(torch.tensor([float(sum(count(b) for b in micro))]), world, phase)
    started = time.perf_counter()
    totals = dict.fromkeys(run.sums.values(), 0.0)  # the objective's sums over this rank's micro-batches
    with distributed.phase(phase, world):
        for i, batch in enumerate(micro):
            batch = {k: v.to(world.device) for k, v in batch.items()}
            with distributed.gradient_sync(objective, last=i == len(micro) - 1):
                with run.autocast():
                    sums = objective(**batch)
                # Scaled by the world size because DDP and FSDP average the ranks' gradients, where we want their sum.
                (sums["loss"] * (world.size / step_count.to(world.device))).backward()
            for key in totals:
                totals[key] += sums[key].item()
    grad_norm = distributed.clip_grad_norm(
        trainable_parameters(run.model).values(), cfg.train.max_grad_norm or float("inf"), world, phase
    )
    # One all-reduce for the step's sums, its real tokens and the ranks asked to stop: every rank
    # sees the same sum, so all of them stop after the same step.
    summed = distributed.sum_across(
        {**totals, "_tokens": real_tokens, "_stop": float(stop.signal is not None)}, world, phase
    )
    means = {name: summed[key] / step_count.item() for name, key in run.sums.items()}
    seconds = time.perf_counter() - started
    if not math.isfinite(means["loss"]) or not math.isfinite(grad_norm):
        raise RunFailed(
            f"step {step + 1}: {'loss' if not math.isfinite(means['loss']) else 'gradient norm'} is not finite. "
            "Likely causes: a learning rate too high for this model, or bf16 overflow (try precision: fp32). "
            f"Last good checkpoint: {checkpoint.latest(run.out / 'checkpoints') or 'none yet'} (resume with --resume "
            "after changing the config and --force)."
        )
    lr = run.scheduler.get_last_lr()[0]  # this step's; the scheduler's step sets the next one's
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state["tokens"] += int(summed["_tokens"])
    # The steps since the last record, this one too: the record's per-count metrics and speed are theirs
    # together, what one step over all their rows would report. A checkpoint carries it, so a resumed run
    # logs what the uninterrupted one would.
    interval = run.state.setdefault("interval", new_interval())
    for name, key in run.sums.items():
        interval["sums"][name] = interval["sums"].get(name, 0.0) + summed[key]
    interval["count"] += step_count.item()
    interval["tokens"] += int(summed["_tokens"])
    interval["seconds"] += seconds
    means = per_count(interval["sums"], interval["count"], getattr(objective, "module", objective))
    reported = reported_sums(getattr(objective, "module", objective))
    record = {
        "step": step + 1,
        "epoch": round((step + 1) / run.plan.steps_per_epoch, 4),
        **{f"train_{name}": means[name] for name in reported},
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": run.state["tokens"],
        "tokens_per_s": interval["tokens"] / interval["seconds"],
        **{name: means[name] for name in run.sums if name not in reported and name in means},
    }
    return record, summed["_stop"] > 0


def new_interval() -> dict:
    """The sums (by metric name), count, real tokens and seconds of the steps since the last record."""
    return {"sums": {}, "count": 0.0, "tokens": 0, "seconds": 0.0}


def resume_command(out: Path, world: distributed.World) -> str:
    """The command that continues a stopped run as it was started: the run's own config.yaml (it holds the
    command line's overrides too) with --resume, on the processes and machines it ran on."""
    command = f"tuneforge train {shlex.quote(str(out / 'config.yaml'))} --resume"
    if world.size > 1:
        command += f" --nproc {world.local_size}"
    if world.machines > 1:
        command += f" --nnodes {world.machines}"
    said = f"`{command}`"
    if world.machines > 1:
        said += " on every machine, each with its own --node-rank and the same --master as before"
    if not out.is_absolute():  # output_dir is relative to the working directory
        said += f" in {Path.cwd()}"
    return said


def launched_world() -> distributed.World:
    """The processes and machines this process was launched among, as torchrun's environment says (one process
    without it), for a message said before or after the process group."""
    return distributed.World(
        size=int(os.environ.get("WORLD_SIZE", "1")), local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    )


def interrupted_before_saving(out: Path, overwrite: bool = False) -> str:
    """What a process that Ctrl-C stopped before it saved a checkpoint says: where the run in `out` continues
    from (an earlier run's latest checkpoint), and how. A run started with `overwrite` over an earlier completed
    run, which `clear_earlier_run` had not yet deleted (its summary.json is there), has nothing to continue."""
    if overwrite and (out / "summary.json").is_file():
        return (
            f"interrupted before this run started over: the earlier run in {out} is as it was; run the same "
            "command to start over."
        )
    world = launched_world()
    saved = checkpoint.latest(out / "checkpoints")
    if saved is None:
        return (
            "interrupted before the run saved a checkpoint: nothing to resume; run the same command to start it again."
        )
    return f"interrupted; continue from {saved} with {resume_command(out, world)}."


def fit(run: Run, *, progress: bool = True, log=print) -> str:
    """The steps, with logging, validation and checkpoints; "completed", or "interrupted" by a signal."""
    cfg, plan = run.cfg, run.plan
    lengths = np.array([len(r.input_ids) for r in run.train_rows])
    started = time.perf_counter() - run.state["elapsed"]
    if run.state.get("stopped_early"):  # resumed from where it stopped early: only its finish is left
        return "completed"
    if run.world.is_main and run.state["step"] < plan.total_steps:
        # A finished run continued past its end (a raised train.max_steps) is no longer complete: its summary
        # goes, and this run writes its own when it completes. final/ stays the earlier end's model (served or
        # exported, maybe) until the new end replaces it.
        (run.out / "summary.json").unlink(missing_ok=True)
    bar = TrainProgress(plan.total_steps, run.state["step"], enabled=progress and run.world.is_main)
    with StopRequest() as stop, bar, run.attention():
        for step in range(run.state["step"], plan.total_steps):
            record, stop_requested = train_step(run, step, stop, lengths)
            run.state["step"] = step + 1
            run.state["elapsed"] = time.perf_counter() - started
            record["elapsed"] = round(run.state["elapsed"], 3)
            is_last = step + 1 == plan.total_steps
            valid, improved = {}, False
            if run.valid_rows and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and not is_last:
                valid = run.validate(f"validation at step {step + 1}", bar.phase)
                record.update({f"valid_{name}": value for name, value in valid.items()})
                run.take_samples(step + 1, log)
                if best.judging(cfg.train):
                    improved = best.judge(run.state, valid["loss"], step + 1, cfg.train)
                    run.state["stopped_early"] = best.stop_reason(run.state, cfg.train)
            if (step + 1) % cfg.train.log_every == 0 or is_last or valid:
                run.metrics_log.write(record)
                run.state["interval"] = new_interval()
            run.last_metrics = record
            bar.update(record)
            if run.state.get("stopped_early"):  # the run ends here, as at its last step: finish saves and validates
                bar.stopped_early(step + 1)
                log(f"\nstopped early at step {step + 1} of {plan.total_steps}: {run.state['stopped_early']}.")
                return "completed"
            if stop_requested:
                path = run.save_checkpoint(step + 1)
                log(f"\n{stop.signal or 'stop'}: saved {path}; continue with {resume_command(run.out, run.world)}.")
                return "interrupted"
            saves = cfg.train.save_every and (step + 1) % cfg.train.save_every == 0
            # train.keep_best: the final model may be this step's weights, so they are saved.
            if (saves or (improved and cfg.train.keep_best)) and not is_last:
                run.save_checkpoint(step + 1)
    return "completed"


def finish(run: Run, status: str, *, progress: bool = True, log=print) -> TrainResult:
    """The final checkpoint, full validation and final model of a completed run (one stopped early too),
    and the summary. With `train.keep_best`, the final model is the best validation's weights: the last
    step's, where its validation is the best, else those of the best checkpoint."""
    final_dir = None
    metrics = run.last_metrics
    step = run.state["step"]  # the last step, or the step the run stopped early at
    if status == "completed":
        run.save_checkpoint(step)
        if run.valid_rows:
            shown = progress and run.world.is_main

            def final_validation(phase: str = "final validation") -> dict:
                with run.attention():
                    return run.validate(phase, lambda what, rows: progress_bar(what, rows, shown))

            valid = final_validation()
            if run.cfg.train.keep_best and not best.judge(run.state, valid["loss"], step, run.cfg.train):
                best_folder = best.best_checkpoint(run.state, run.cfg.train, run.out / "checkpoints")
                if not (best_folder / checkpoint.STATE).is_file():  # keep_best turned on by a forced resume
                    raise RunFailed(
                        f"train.keep_best: the best validation was at step {run.state['best']['step']}, and its "
                        f"checkpoint {best_folder} is gone (train.keep_best was off when it was written); the "
                        f"final model is not written. Turn train.keep_best off and resume to write the last "
                        "step's weights, or start the run again with it on."
                    )
                checkpoint.restore_weights(best_folder, run.model)
                valid = final_validation(f"final validation of the best checkpoint, {best_folder.name}")
            full_valid = {f"full_valid_{name}": value for name, value in valid.items()}
            if best.judging(run.cfg.train):
                full_valid.update(best_step=run.state["best"]["step"], best_valid_loss=run.state["best"]["valid_loss"])
            metrics.update(full_valid)
            run.metrics_log.write({"step": step, **full_valid})
            run.take_samples(step, log, final=True)
        weights = checkpoint.gathered_weights(run.model, run.world, "writing the final model")
        if run.world.is_main:
            final_dir = save_model(
                checkpoint.savable(run.model, weights),
                run.tokenizer,
                run.source.path,
                run.out / "final",
                merge=adapter_on_merged_base(run.cfg, run.source),
            )
            write_json(
                run.out / "summary.json",
                {
                    "status": status,
                    "steps": step,
                    "precision": run.precision,
                    # The epochs trained, as Hugging Face logs them (0.6 for a run cut or stopped early there).
                    "epochs": round(step / run.plan.steps_per_epoch, 2),
                    **best.summary(run.state, step, run.plan.total_steps),
                    "metrics": metrics,
                    "system_prompt": recorded_system_prompt(run.tokenizer),
                },
            )
        distributed.barrier(run.world, "writing the final model (rank 0 writes it while the others wait)")
    if run.world.is_main and progress:
        print_summary(metrics, run.out)
    return TrainResult(run.out, final_dir, run.state["step"], status, metrics)


def train(
    config,
    overrides: list[str] = (),
    *,
    resume: str | bool | None = None,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    checks: Callable[[Config], object] | None = None,
) -> TrainResult:
    """Fine-tune as the config says. `resume` is "latest" (or True) or a checkpoint folder; `overwrite` starts
    afresh in an output_dir that holds an earlier run (`refuse_earlier_run`, `clear_earlier_run`).
    `checks`: a caller's own checks of the config (`pipeline.train`'s of its evaluation), run once its data
    files are found and before any process group, data or model."""
    cfg = load_config(config, overrides)
    cfg.check_data_files()
    if checks is not None:
        checks(cfg)
    refuse_resume_with_overwrite(cfg, resume, overwrite)
    check_output_dir(cfg)
    world = distributed.setup(cfg.train.distributed_timeout)
    log = print if world.is_main else (lambda *a, **k: None)
    run = None
    ended = "failed"  # what the trackers' runs are told at the end: an error unless the run gets past finish
    callers_rng = checkpoint.rng_states()
    try:
        with sole_run_in(Path(cfg.output_dir), world):
            run = setup(cfg, world, resume=resume, force=force, overwrite=overwrite, log=log, progress=progress)
            status = fit(run, progress=progress, log=log)
            result = finish(run, status, progress=progress, log=log)
            ended = status
            return result
    finally:
        if run is not None:
            run.metrics_log.close(ended)
        # The run goes before the process group: DDP's reducer holds the group, and were it the last
        # holder it would end the group holding the GIL, which gloo's threads may still wait for.
        del run
        distributed.teardown()
        # The run seeds and draws from the global generators (Python's, NumPy's, torch's); a caller's own
        # draws after it (a notebook's next cell) continue as if it had not run.
        checkpoint.set_rng_states(callers_rng)
